"""The VMM's monitor: QEMU's QMP through QEMU's own client library (`qemu.qmp`).

A session that knows the VMM's QMP socket can freeze the guest's vCPUs while the controller is
stopped and thaw them when it goes on, so a person single-stepping the controller does not trip
the guest driver's timeouts (Linux: 5 s per xHCI command, 30 s per usb-storage command).

    vmm = await Vmm.connect("/tmp/qmp.sock")     # a QEMU the user started (-qmp unix:...,server)
    await vmm.freeze()                           # QMP `stop`: every vCPU halts, guest time too
    await vmm.thaw()                             # QMP `cont`
    vmm = await Vmm.listen(path); ...; await vmm.accept()   # a QEMU that connects to us

The guest kit's `Vm` uses the listening form.  Events QEMU sends (STOP, RESUME, SHUTDOWN, ...)
are kept in `events`; `frozen` follows them, so a pause from elsewhere (a second monitor, a
`-S` start) shows too.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from qemu.qmp import EventListener, QMPClient, QMPError, Runstate

log = logging.getLogger("xhcidbg.session")
# The library logs each failure at ERROR as well as raising it; VmmError says it once, with what
# to do, so its own log stays quiet unless asked for.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

KEEP_EVENTS = 256
CLOSE_TIMEOUT_S = 5.0
STOPPED_STATES = {"paused", "suspended", "debug", "inmigrate", "prelaunch", "finish-migrate",
                  "postmigrate", "save-vm", "restore-vm", "watchdog", "guest-panicked",
                  "io-error", "internal-error", "shutdown"}


class VmmError(RuntimeError):
    """The VMM refused a command or is gone; the message says which and why."""


class Vmm:
    """One QMP connection.  `frozen` is the guest's state as QEMU last reported it."""

    def __init__(self, client: QMPClient, gone: Callable[[], BaseException | None] | None = None):
        self.client = client
        self.events: list[dict[str, Any]] = []      # the last KEEP_EVENTS, oldest first
        self.frozen = False
        self.freezes = 0                            # freezes we asked for
        self._frozen_total = 0.0                    # frozen time before the current freeze
        self._frozen_at: float | None = None
        self._gone = gone          # what ended the VMM (its exit), when the connection drops
        self._event_added = asyncio.Event()
        self._listener = EventListener()
        client.register_listener(self._listener)
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self.on_change: list[Callable[[bool], None]] = []   # frozen / thawed, whoever did it

    # ---- connecting --------------------------------------------------------------------------
    @classmethod
    async def connect(cls, path: str, timeout: float = 10.0) -> Vmm:
        """Connect to the QMP socket of a running QEMU (`-qmp unix:PATH,server=on,wait=off`)."""
        client = QMPClient("xhcidbg")
        try:
            await asyncio.wait_for(client.connect(path), timeout)
        except (QMPError, OSError, TimeoutError) as e:
            raise VmmError(f"cannot connect to QMP at {path}: {_reason(e)} (start QEMU with "
                           f"-qmp unix:{path},server=on,wait=off)") from None
        vmm = cls(client)
        await vmm._started()
        return vmm

    @classmethod
    async def listen(cls, path: str, gone: Callable[[], BaseException | None] | None = None
                     ) -> Vmm:
        """Listen on `path` for a QEMU started with `-chardev socket,path=PATH,server=off`;
        `accept` then waits for it."""
        client = QMPClient("xhcidbg")
        try:
            await client.start_server(path)
        except (QMPError, OSError) as e:
            raise VmmError(f"cannot listen for QMP on {path}: {_reason(e)}") from None
        return cls(client, gone)

    async def accept(self) -> None:
        try:
            await self.client.accept()
        except (QMPError, OSError) as e:
            raise self._error("accepting QEMU's QMP connection", e) from None
        await self._started()

    async def _started(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow())
        status = await self.status()
        self._set_frozen(status.get("status") in STOPPED_STATES, counted=False)

    @property
    def frozen_s(self) -> float:
        """Seconds the guest has spent frozen, the current freeze included."""
        ongoing = time.monotonic() - self._frozen_at if self._frozen_at is not None else 0.0
        return self._frozen_total + ongoing

    # ---- commands ----------------------------------------------------------------------------
    async def execute(self, command: str, timeout: float = 30.0, **arguments: Any) -> Any:
        """Run a QMP command; its `return` value.  VmmError if QEMU refuses or is gone."""
        try:
            return await asyncio.wait_for(
                self.client.execute(command, arguments or None), timeout)
        except (QMPError, OSError, EOFError, TimeoutError) as e:
            raise self._error(command, e) from None

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = await self.execute("query-status")
        return status

    async def freeze(self) -> bool:
        """Stop the guest's vCPUs; False if they were stopped already."""
        if self.frozen:
            return False
        await self.execute("stop")
        self.freezes += 1
        self._set_frozen(True)
        return True

    async def thaw(self) -> bool:
        """Let the guest's vCPUs run; False if they were running."""
        if not self.frozen:
            return False
        await self.execute("cont")
        self._set_frozen(False)
        return True

    # the kit's Vm and its tests call these by QMP's names
    async def stop(self) -> None:
        await self.freeze()

    async def cont(self) -> None:
        await self.thaw()

    async def query_status(self) -> dict[str, Any]:
        return await self.status()

    async def system_reset(self) -> None:
        await self.execute("system_reset")

    async def quit(self) -> None:
        await self.execute("quit")

    async def wait_event(self, name: str, timeout: float = 30.0, start: int = 0
                         ) -> dict[str, Any]:
        """The first event called `name` at or after index `start` of `events`."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events[start:]:
                if event.get("event") == name:
                    return event
            self._event_added.clear()
            await asyncio.wait_for(self._event_added.wait(), max(0.0, deadline - time.monotonic()))

    async def wait_gone(self) -> None:
        """Return once the connection has ended (QEMU quit or closed the socket)."""
        while self.client.runstate == Runstate.RUNNING:
            await self.client.runstate_changed()

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """End the connection.  Safe to call twice, from two tasks at once, and from a task
        that is being cancelled; bounded, so a QEMU that hangs up half-way cannot hold it."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        try:
            await asyncio.wait_for(asyncio.shield(self._closing), timeout)
        except TimeoutError:
            log.warning("QMP: the connection did not close within %g s; left to close itself",
                        timeout)

    async def _close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            self.client.remove_listener(self._listener)
        with contextlib.suppress(Exception):
            await self.client.disconnect()

    # ---- what QEMU tells us ------------------------------------------------------------------
    async def _follow(self) -> None:
        while True:
            message = await self._listener.get()
            event = dict(message)
            self.events.append(event)
            del self.events[:-KEEP_EVENTS]
            self._event_added.set()
            name = event.get("event")
            if name == "STOP":
                self._set_frozen(True, counted=False)
            elif name == "RESUME":
                self._set_frozen(False)

    def _set_frozen(self, frozen: bool, counted: bool = True) -> None:
        if frozen == self.frozen:
            return
        self.frozen = frozen
        now = time.monotonic()
        if frozen:
            self._frozen_at = now
        elif self._frozen_at is not None:
            self._frozen_total += now - self._frozen_at
            self._frozen_at = None
        for fn in list(self.on_change):
            try:
                fn(frozen)
            except Exception:
                log.exception("a frozen/thawed listener failed")

    def _error(self, what: str, e: BaseException) -> BaseException:
        gone = self._gone() if self._gone is not None else None
        if gone is not None:
            return gone
        return VmmError(f"QMP {what}: {_reason(e)}")


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f": {cause}"
    return text
