"""The console's machine interface: JSON lines over a UNIX socket (`--api PATH`).

Each line a client sends is one request; each request gets one reply line with the same `id`:

    -> {"id": 1, "command": "ports 1"}
    <- {"id": 1, "ok": true, "data": [{"port": 1, "portsc": 1539, ...}], "text": "root hub..."}

`command` is any console command line; `data` is its JSON form (what `--json` prints; null for a
command without one) and `text` what the console would print.  Between replies the server
sends events, lines with an `event` key and no `id`:

    <- {"event": "hello", "controller": "running", "guest": "running"}   (first, on connect)
    <- {"event": "stop", "reason": "breakpoint", "breakpoint": 1, "what": "command ..."}
    <- {"event": "resume"}
    <- {"event": "guest", "state": "frozen"}            (or "running")
    <- {"event": "device", "action": "plugged", "port": 5, "name": "storage"}
    <- {"event": "enumerated", "port": 5, "slot": 2}    (the guest configured it)

Requests from several clients, and from the prompt, run concurrently on the session's loop;
each has its own output.  A malformed line gets an error reply and the connection stays open.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..emu.context import SLOT_STATE_NAMES, SlotState
from . import render

if TYPE_CHECKING:
    from .console import Console
    from .observe import Breakpoint

log = logging.getLogger("xhcidbg.ui")

MAX_LINE = 1 << 20                 # a request longer than this is refused
Event = dict[str, Any]


class ApiServer:
    def __init__(self, console: Console, path: str):
        self.console = console
        self.path = os.path.abspath(path)
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._events = _EventSource(self.broadcast)

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)              # a stale socket from an earlier run
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path,
                                                           limit=MAX_LINE)
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {self.path} for the API: "
                                   f"{e.strerror}") from None
        self._events.attach(self.console)

    async def close(self) -> None:
        self._events.detach()
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._clients):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    # ---- requests ----------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        self._send(writer, self.hello())
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:                 # longer than MAX_LINE
                    self._send(writer, {"id": None, "ok": False,
                                        "error": f"request longer than {MAX_LINE} bytes"})
                    break
                except (ConnectionError, OSError):
                    break
                if not line:
                    break
                if line.strip():
                    task = asyncio.get_running_loop().create_task(self._answer(writer, line))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            self._clients.discard(writer)
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, line: bytes) -> None:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            self._send(writer, {"id": None, "ok": False, "error": f"not JSON: {e}"})
            return
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            self._send(writer, {"id": request.get("id") if isinstance(request, dict) else None,
                                "ok": False,
                                "error": 'a request is {"id": ..., "command": "CONSOLE COMMAND"}'})
            return
        ok, data, text = await self.console.run_captured(request["command"])
        self._send(writer, {"id": request.get("id"), "ok": ok, "data": data, "text": text})

    def hello(self) -> Event:
        """What a new client is told first: the state events would have told it so far."""
        session = self.console.session
        vmm = session.vmm
        guest = ("no QMP" if vmm is None else "frozen" if vmm.frozen else "running") \
            if session.live_guest else session.kind
        return {"event": "hello", "controller": "paused" if session.controller.gate.paused
                else "running", "guest": guest}

    def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        if writer.is_closing():
            return
        try:
            writer.write(json.dumps(message, default=str).encode() + b"\n")
        except (ConnectionError, OSError):
            writer.close()

    def broadcast(self, event: Event) -> None:
        for writer in list(self._clients):
            self._send(writer, event)


class _EventSource:
    """What happened on its own, as API events: stops and resumes of the controller, the
    guest frozen or thawed, devices plugged or pulled, the guest configuring a device."""

    def __init__(self, emit: Callable[[Event], None]):
        self.emit = emit
        self.console: Console | None = None
        self._connected: dict[int, bool] = {}
        self._pause_pending = False        # a pause whose cause (a breakpoint?) is not known yet

    def attach(self, console: Console) -> None:
        self.console = console
        session = console.session
        session.controller.gate.on_change.append(self._gate)
        session.controller.hooks.attach(self)
        console.on_stop.append(self._breakpoint)
        session.on_guest.append(self._guest)
        self._connected = {p.number: bool(p.portsc & 1) for p in session.controller.ports}

    def detach(self) -> None:
        console = self.console
        if console is None:
            return
        self.console = None
        with contextlib.suppress(RuntimeError):
            session = console.session
            gate = session.controller.gate
            if self._gate in gate.on_change:
                gate.on_change.remove(self._gate)
            session.controller.hooks.detach(self)
            if self._guest in session.on_guest:
                session.on_guest.remove(self._guest)
        if self._breakpoint in console.on_stop:
            console.on_stop.remove(self._breakpoint)

    def _gate(self, paused: bool) -> None:
        if not paused:
            self._pause_pending = False
            self.emit({"event": "resume"})
            return
        # A breakpoint pauses the gate before it says so: wait a turn to tell which it was.
        self._pause_pending = True
        asyncio.get_running_loop().call_soon(self._paused)

    def _paused(self) -> None:
        if self._pause_pending:
            self._pause_pending = False
            self.emit({"event": "stop", "reason": "pause"})

    def _breakpoint(self, bp: Breakpoint, what: str) -> None:
        self._pause_pending = False
        self.emit({"event": "stop", "reason": "breakpoint", "breakpoint": bp.number,
                   "what": what})

    def _guest(self, frozen: bool) -> None:
        self.emit({"event": "guest", "state": "frozen" if frozen else "running"})

    # hooks
    def on_port(self, port: int, old: int, new: int) -> None:
        connected = bool(new & 1)
        if self._connected.get(port) == connected or self.console is None:
            return
        self._connected[port] = connected
        root = next((p for p in self.console.session.controller.ports if p.number == port), None)
        device = root.device if root is not None else None
        self.emit({"event": "device", "action": "plugged" if connected else "unplugged",
                   "port": port, "name": device.name if device is not None else None})

    def on_state(self, kind: str, ident: str, old: str, new: str) -> None:
        if kind != "slot" or new != SLOT_STATE_NAMES[SlotState.CONFIGURED] or \
                self.console is None or not ident.isdigit():
            return
        slot = self.console.session.controller.slots.get(int(ident))
        port = slot.port.number if slot is not None and slot.port is not None else None
        self.emit({"event": "enumerated", "port": port, "slot": int(ident),
                   "device": render.describe_device(slot.port.device)
                   if slot is not None and slot.port is not None and slot.port.device else None})
