"""The console: a prompt_toolkit prompt over the command registry, on the session's one loop.

    con = Console(WorldOptions())          # builds the in-process world
    con.start()                            # controller up, guest enumerates the devices
    print(con.execute("ports"))            # plain text, for scripts and tests
    con.close()

    con = Console(session=backend)         # any session: `xhcidbg vm` and `serve` pass theirs
    await con.astart()                     # from inside the session's running loop
    await con.arun_script(["pause", "ports"])

`Console.interact()` is the interactive prompt (history, completion, a status toolbar, context
panes redrawn after each stop); `Console.run_script(lines)` is batch mode.  Both run
everything -- the prompt, the controller's timers, the vfio-user server or the scripted guest --
in one asyncio loop, so a VM is served while the user types.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import logging
import os
import sys
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from difflib import get_close_matches
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console as RichConsole
from rich.rule import Rule
from rich.text import Text

from ..emu.controller import XhciController
from ..session import DeviceChoice, Session
from . import change as _change  # noqa: F401  (registers poke, edit, post)
from . import commands as _commands
from . import faults as _faults  # noqa: F401  (registers fault)
from . import live as _live  # noqa: F401  (registers the guest, wait and set commands)
from . import passthrough as _passthrough  # noqa: F401  (registers attach, detach)
from . import pyshell as _pyshell  # noqa: F401  (registers py)
from . import render
from . import watch as _watch  # noqa: F401  (registers watch, rwatch, awatch)
from .history import History  # (the module registers log and history)
from .observe import Breakpoint, Breakpoints
from .registry import REGISTRY, HelpShown, UsageError
from .top import Counters  # (the module registers top)
from .world import World, WorldOptions

if TYPE_CHECKING:
    from prompt_toolkit.formatted_text import HTML

log = logging.getLogger("xhcidbg.ui")

HISTORY_FILE = os.path.join(os.path.expanduser("~"), ".xhcidbg_history")
PROMPT = "xhcidbg> "
ACTIVITY_LINES = 24
MAX_HIT_COMMAND_RUNS = 64       # breakpoint command lists run in a row (each `continue`-ing)


class Console:
    PANES = ("status", "hit", "ring", "events", "ports", "slots")

    def __init__(self, options: WorldOptions | None = None, *, session: Session | None = None,
                 devices: DeviceChoice | None = None, width: int | None = None,
                 color: bool = False):
        self.options = options or WorldOptions()
        self.width = width
        self.color = color
        self._own_loop: asyncio.AbstractEventLoop | None = None   # the sync API's loop
        self._session: Session | None = session       # given: a session someone else runs
        self._owns_session = session is None
        self._choice = devices or (self.options.devices if session is None else DeviceChoice())
        self.activity = History()               # every announcement, typed (`log`, `history`)
        self.counters: Counters | None = None     # traffic counts (`top`), from `start` on
        self._breakpoints: Breakpoints | None = None
        # Where commands print: per asyncio task, so the prompt and API requests running at
        # the same time each get their own output; `_main_out` is the prompt's (or a buffer).
        self._main_out: RichConsole = self._text_console(io.StringIO())
        self._out: ContextVar[RichConsole] = ContextVar(f"xhcidbg-out-{id(self)}")
        self._data_var: ContextVar[object] = ContextVar(f"xhcidbg-data-{id(self)}",
                                                        default=None)
        self.on_stop: list[Callable[[Breakpoint, str], None]] = []   # breakpoint hits
        self.interactive = False
        self.panes = ["status", "hit", "ring", "events"]
        self.context_enabled = True
        self.stepped_ring: str | None = None
        self._quit = asyncio.Event()
        self._busy = False              # a command is running (it reports stops itself)
        self.extras: dict[str, object] = {}     # state commands keep between calls
        self._context_shown = False
        self._hit_commands: deque[Breakpoint] = deque()   # stops whose commands are to run
        self._running_hit_commands = False
        self._hit_task: asyncio.Task[None] | None = None

    @property
    def out(self) -> RichConsole:
        """Where the running command prints."""
        return self._out.get(self._main_out)

    @out.setter
    def out(self, console: RichConsole) -> None:
        self._out.set(console)

    @property
    def quit_requested(self) -> bool:
        """`quit` ran: the console ends after the running command."""
        return self._quit.is_set()

    @quit_requested.setter
    def quit_requested(self, value: bool) -> None:
        if value:
            self._quit.set()
        else:
            self._quit.clear()

    async def wait_quit(self) -> None:
        await self._quit.wait()

    @property
    def at_prompt(self) -> bool:
        """The running command was typed at the interactive prompt (not a script, not an API
        request): it may take the terminal (`top`, `py` alone)."""
        return self.interactive and self.out is self._main_out

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the synchronous methods (`start`, `execute`, ...) run the console on."""
        if self._own_loop is None:
            self._own_loop = asyncio.new_event_loop()
        return self._own_loop

    @property
    def session(self) -> Session:
        """The session the console runs on (from `start` on)."""
        if self._session is None:
            raise RuntimeError("the console has not started")
        return self._session

    @property
    def world(self) -> World:
        """The in-process world, for the commands that drive its scripted guest."""
        session = self.session
        if not isinstance(session, World):
            raise RuntimeError(f"this command drives the in-process scripted guest (`xhcidbg "
                               f"console`); this session's guest is a real VM ({session.kind})")
        return session

    @property
    def device_choice(self) -> DeviceChoice:
        """How new devices are made (`plug`): the session's device options."""
        return self._choice

    @property
    def controller(self) -> XhciController:
        return self.session.controller

    @property
    def breakpoints(self) -> Breakpoints:
        if self._breakpoints is None:
            raise RuntimeError("the console has not started")
        return self._breakpoints

    # ---- life cycle -------------------------------------------------------------------------
    def start(self) -> Console:
        self.loop.run_until_complete(self.astart())
        return self

    async def astart(self) -> None:
        """Attach to the session (building and starting the in-process world if none was
        given); from inside the loop the session runs on."""
        if self._session is None:
            self._session = World(self.options)
        session = self._session
        hooks = session.controller.hooks
        self.activity.use_clock(session.controller.scheduler.now_ns)
        hooks.attach(self.activity)
        self.counters = hooks.attach(Counters(session.controller.scheduler.now_ns))
        self._breakpoints = Breakpoints(session.controller, self._on_breakpoint)
        hooks.attach(self._breakpoints)
        session.faults.listeners.append(self._fault_injected)
        if self._owns_session:
            await session.start()
            await session.settle(10.0)

    def _fault_injected(self, inj: Any) -> None:
        self.notice(Text(inj.text(), style="bold magenta"))

    async def aclose(self) -> None:
        """Detach from a session someone else runs; end one the console built."""
        if self._session is None:
            return
        with contextlib.suppress(ValueError):
            self._session.faults.listeners.remove(self._fault_injected)
        hooks = self._session.controller.hooks
        if self._owns_session:
            await self._session.stop()
        else:
            hooks.detach(self.activity)
            if self.counters is not None:
                hooks.detach(self.counters)
            if self._breakpoints is not None:
                hooks.detach(self._breakpoints)
                self._breakpoints.detach()
        self._session = None

    def close(self) -> None:
        loop = self._own_loop
        if loop is not None and not loop.is_closed():
            loop.run_until_complete(self.aclose())
            loop.close()

    def __enter__(self) -> Console:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- running commands -------------------------------------------------------------------
    def execute(self, line: str) -> str:
        """Run one line (commands separated by `;`) and return its plain-text output."""
        return self.loop.run_until_complete(self.aexecute(line))

    async def aexecute(self, line: str) -> str:
        buf = io.StringIO()
        saved = self.out
        self.out = self._text_console(buf)
        try:
            for cmd in _commands.split_commands(line):
                await self.run_one(cmd)
                if self.quit_requested:
                    break
        finally:
            self.out = saved
        return buf.getvalue()

    async def run_one(self, line: str) -> bool:
        """Run one command, printing to `self.out`; False if it failed.  `--json` anywhere
        after the command's name prints the command's JSON form instead of its text.  Then
        the commands of breakpoints that stopped meanwhile run."""
        ok = await self._run_line(line)
        await self.run_hit_commands()
        return ok

    async def run_hit_commands(self) -> None:
        """Run the command lists of the breakpoints that stopped, in order; a list that
        continues and stops again runs again, up to MAX_HIT_COMMAND_RUNS times."""
        if self._running_hit_commands:
            return                          # the loop below picks up stops made meanwhile
        self._running_hit_commands = True
        runs = 0
        try:
            while self._hit_commands:
                bp = self._hit_commands.popleft()
                runs += 1
                if runs > MAX_HIT_COMMAND_RUNS:
                    self._hit_commands.clear()
                    self.out.print(Text(f"breakpoint commands ran {MAX_HIT_COMMAND_RUNS} times "
                                        f"in a row: no more of them now", style="red"))
                    break
                self.out.print(Text(f"{bp.title} commands:", style="magenta"))
                for cmd in list(bp.commands):
                    self.out.print(Text(f"{PROMPT}{cmd}", style="bold"))
                    await self._run_line(cmd)
                    if self.quit_requested:
                        return
        finally:
            self._running_hit_commands = False

    async def _run_line(self, line: str) -> bool:
        try:
            words = _commands.split_words(line)
        except ValueError as e:
            self.out.print(Text(f"error: {e}", style="red"))
            return False
        if not words:
            return True
        as_json = "--json" in words[1:]
        if not as_json:
            return await self._run_words(words)
        words = [w for w in words if w != "--json"]
        text = io.StringIO()
        saved, self.out = self.out, self._text_console(text)
        try:
            ok, data = await self.run_for_data(words)
        finally:
            self.out = saved
        self.out.print(Text(json.dumps(data if ok and data is not None
                                       else {"ok": ok, "text": text.getvalue()},
                                       default=_json_default)), soft_wrap=True)
        return ok

    async def run_for_data(self, words: list[str]) -> tuple[bool, object]:
        """Run a command given as words; (succeeded, the JSON form it gave via `data`)."""
        self._data_var.set(None)
        ok = await self._run_words([w for w in words if w != "--json"])
        data = self._data_var.get()
        self._data_var.set(None)
        return ok, data

    async def run_captured(self, line: str) -> tuple[bool, object, str]:
        """Run a line (commands separated by `;`) with output of its own, for the API:
        (all succeeded, the last command's JSON form, the text printed)."""
        buf = io.StringIO()
        saved, self.out = self.out, self._text_console(buf)
        ok, data = True, None
        try:
            for cmd in _commands.split_commands(line):
                try:
                    words = _commands.split_words(cmd)
                except ValueError as e:
                    self.out.print(Text(f"error: {e}"))
                    ok = False
                    continue
                if words:
                    done, data = await self.run_for_data(words)
                    ok = ok and done
        finally:
            self.out = saved
        return ok, data, buf.getvalue()

    def data(self, value: object) -> None:
        """A command's result as data (dicts, lists, numbers, strings): what `--json` and the
        API socket give; its text stays what the console prints."""
        self._data_var.set(value)

    async def _run_words(self, words: list[str]) -> bool:
        cmd = REGISTRY.lookup(words[0])
        if cmd is None:
            near = get_close_matches(words[0], REGISTRY.names(), n=3)
            hint = f"; did you mean {' or '.join(near)}?" if near else "; `help` lists commands"
            self.out.print(Text(f"unknown command {words[0]!r}{hint}", style="red"))
            return False
        self._busy = True
        self._context_shown = False
        hits = self.breakpoints.hits
        try:
            args = cmd.parser.parse(words[1:])
            result = cmd.func(self, args)
            if inspect.isawaitable(result):
                await result
            if self.breakpoints.hits != hits and not self._context_shown:
                await self.guest_settled()
                self.show_context()      # a breakpoint hit while the command ran
            return True
        except HelpShown as h:
            self.out.print(Text(str(h).rstrip()))
            return True
        except UsageError as e:
            self.out.print(Text(str(e), style="red"))
        except (ValueError, LookupError, RuntimeError, OSError) as e:   # OSError: timeouts too
            self.out.print(Text(f"{cmd.name}: {e}", style="red"))
        except Exception as e:                    # a console bug: say so, keep the console
            log.debug("command %r failed", words, exc_info=True)
            self.out.print(Text(f"{cmd.name}: internal error: {e!r}\n"
                                f"{traceback.format_exc(limit=-3)}", style="red"))
        finally:
            self._busy = False
        return False

    def run_script(self, lines: Iterable[str], echo: bool = True,
                   file: TextIO | None = None) -> int:
        """Batch mode: run each line, print its output; returns the number of failed commands."""
        return self.loop.run_until_complete(self.arun_script(lines, echo, file))

    async def arun_script(self, lines: Iterable[str], echo: bool = True,
                          file: TextIO | None = None) -> int:
        """`run_script` from inside the session's loop."""
        out = file or sys.stdout
        failed = 0
        for raw in lines:
            for cmd in _commands.split_commands(raw):
                buf = io.StringIO()
                saved, self.out = self.out, self._text_console(buf)
                try:
                    if echo:
                        self.out.print(Text(f"{PROMPT}{cmd}", style="bold"))
                    ok = await self.run_one(cmd)
                finally:
                    self.out = saved
                out.write(buf.getvalue())
                out.flush()
                failed += not ok
                if self.quit_requested:
                    return failed
        return failed

    # ---- what commands use -------------------------------------------------------------------
    def current_ring(self) -> str:
        names = render.ring_names(self.controller)
        for cand in (self.stepped_ring, self.activity.last_ring):
            if cand in names:
                return cand
        return "cmd"

    def show_activity(self, since: int, limit: int = ACTIVITY_LINES) -> None:
        recs = self.activity.since(since)
        if not recs:
            return
        self.out.print(Rule("activity", style="dim"))
        for r in recs[:limit]:
            self.out.print(Text(r.text, style=_KIND_STYLE.get(r.kind, "")))
        if len(recs) > limit:
            self.out.print(Text(f"... {len(recs) - limit} more (`log -n {len(recs)}`)",
                                style="dim"))

    def mark(self) -> tuple[int, int]:
        """Where the activity log and the scripted guest's report count stand now."""
        session = self.session
        return self.activity.seq, session.report_count if isinstance(session, World) else 0

    async def after_device_action(self, mark: tuple[int, int]) -> None:
        """A device did something: let the controller and the guest react, show what
        happened."""
        since, reports_before = mark
        session = self.session
        session.changed()
        await session.settle(2.0)
        self.show_activity(since)
        self.show_new_reports(reports_before)
        if self.controller.gate.paused:
            self.out.print(Text("(paused: rings are not processed until `step` or `continue`)",
                                style="yellow"))

    def show_new_reports(self, reports_before: int) -> None:
        w = self.session
        if not isinstance(w, World):
            return
        new = min(w.report_count - reports_before, len(w.reports))
        for r in list(w.reports)[len(w.reports) - new:]:
            self.out.print(Text(f"guest received report: {r}", style="green"))

    def show_context(self) -> None:
        self._context_shown = True
        if not self.context_enabled:
            return
        c = self.controller
        for pane in self.panes:
            if pane == "status":
                self.out.print(Rule("status", style="blue"))
                self.out.print(render.status_line(c))
                guest = self.guest_state()
                if guest:
                    self.out.print(Text(guest, style="yellow" if "keeps running" in guest
                                        else ""))
            elif pane == "hit":
                hit = self.breakpoints.last_hit
                if hit is not None and c.gate.paused:
                    bp, what = hit
                    head = f"stopped ({bp.label})" if bp.internal else f"{bp.title} hit"
                    self.out.print(Text(f"{head}: {what}", style="bold magenta"))
            elif pane == "ring":
                name = self.current_ring()
                self.out.print(Rule(f"ring {name}", style="blue"))
                self.out.print(render.ring_view(c, name, before=2, after=4))
            elif pane == "events":
                self.out.print(Rule("events", style="blue"))
                self.out.print(render.events_view(c, 0, 4))
            elif pane == "ports":
                self.out.print(render.ports_view(c))
            elif pane == "slots":
                self.out.print(render.slots_view(c))

    def guest_state(self) -> str:
        """One line on what the guest does while the controller is stopped (live guests)."""
        session = self.session
        if not session.live_guest:
            return ""
        vmm, freeze = session.vmm, session.freeze
        if vmm is None:
            return ("guest: no QMP -- while the controller is stopped the guest keeps running "
                    "and its driver's timers will fire (`serve --qmp PATH` lets xhcidbg "
                    "freeze it)")
        state = "frozen" if vmm.frozen else "running"
        if freeze is not None and not freeze.enabled:
            state += (" (freezing is off: the guest keeps running at stops and its timers "
                      "will fire; `set freeze on`)")
        elif freeze is not None and freeze.error:
            state += f" (the last freeze failed: {freeze.error})"
        return f"guest: {state}"

    async def guest_settled(self) -> None:
        """Wait until a freeze or thaw the last stop or continue asked for is in effect."""
        freeze = self.session.freeze
        if freeze is not None:
            await freeze.settled()

    def _on_breakpoint(self, bp: Breakpoint, what: str) -> None:
        for fn in list(self.on_stop):
            try:
                fn(bp, what)
            except Exception:
                log.exception("a breakpoint listener failed")
        if self.breakpoints.last_ring:
            self.stepped_ring = self.breakpoints.last_ring  # show the ring it stopped on
        if bp.commands:
            self._hit_commands.append(bp)
        if self.interactive and not self._busy and not self._running_hit_commands:
            asyncio.get_running_loop().call_soon(self._announce_stop)

    def _announce_stop(self) -> None:
        asyncio.get_running_loop().create_task(self._announce_stop_when_frozen())

    async def _announce_stop_when_frozen(self) -> None:
        await self.guest_settled()           # the context then shows the guest frozen
        if self._busy:
            return                          # a command started meanwhile: it shows the stop
        self.show_context()
        if self._hit_commands:
            self._hit_task = asyncio.get_running_loop().create_task(self.run_hit_commands())

    def notice(self, text: Text) -> None:
        """Something that happened on its own (a followed kernel log line): above the prompt
        when interactive (the prompt's output, whatever task prints it)."""
        self._main_out.print(text)

    # ---- output -----------------------------------------------------------------------------
    def _text_console(self, file: TextIO) -> RichConsole:
        return RichConsole(file=file, width=self.width or 150, force_terminal=False,
                           no_color=True, highlight=False, emoji=False, soft_wrap=False)

    # ---- interactive ------------------------------------------------------------------------
    def interact(self) -> None:
        self.loop.run_until_complete(self.ainteract())

    async def ainteract(self) -> None:
        """The interactive prompt, from inside the session's loop; returns at `quit` or EOF."""
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.history import History as PromptHistory
        from prompt_toolkit.patch_stdout import patch_stdout

        from .completion import CommandCompleter

        history: PromptHistory
        try:
            history = FileHistory(HISTORY_FILE)
        except OSError:
            history = InMemoryHistory()
        session: PromptSession[str] = PromptSession(
            history=history, completer=CommandCompleter(self), complete_while_typing=False,
            bottom_toolbar=self._toolbar, refresh_interval=0.5)
        self.interactive = True
        with patch_stdout(raw=True):
            self._main_out = self.out = RichConsole(file=sys.stdout, force_terminal=True,
                                                    highlight=False, width=self.width)
            self.out.print(banner(self.session))
            while not self.quit_requested:
                try:
                    line = await session.prompt_async(self._prompt)
                except KeyboardInterrupt:
                    continue
                except EOFError:
                    break
                for cmd in _commands.split_commands(line):
                    await self.run_one(cmd)
                    if self.quit_requested:
                        break

    def _prompt(self) -> HTML:
        from prompt_toolkit.formatted_text import HTML
        if self._session is not None and self._session.controller.gate.paused:
            return HTML("<ansired>xhcidbg (paused)&gt;</ansired> ")
        return HTML("<ansigreen>xhcidbg&gt;</ansigreen> ")

    def toolbar_text(self) -> str:
        """The status toolbar: controller, guest, capture, faults."""
        if self._session is None:
            return ""
        session = self._session
        gate = session.controller.gate
        parts = [f"controller: {'paused' if gate.paused else 'running'}"
                 + (f" ({len(gate.work)} ring(s) with work)" if gate.paused and gate.work
                    else "")]
        if session.live_guest:
            vmm = session.vmm
            parts.append("guest: no QMP" if vmm is None else
                         f"guest: {'frozen' if vmm.frozen else 'running'}")
        else:
            parts.append(f"guest: {session.kind}")
        trace = session.trace
        parts.append(f"capture: {trace.tracer.path}" if trace.running and trace.tracer
                     else "capture: off")
        faults = session.faults
        parts.append(f"faults: {faults.summary()}" if faults.rules or faults.log
                     else "faults: none")
        return " | ".join(parts)

    def _toolbar(self) -> HTML:
        from prompt_toolkit.formatted_text import HTML
        return HTML(f"<b>{_escape(self.toolbar_text())}</b>")


def _json_default(value: object) -> object:
    """JSON for what commands hand to `data` beyond plain types: bytes as hex, the rest by
    its str()."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_KIND_STYLE = {"event": "green", "doorbell": "yellow", "command": "cyan", "urb": "magenta",
               "port": "blue", "log": "red", "trb": ""}


def banner(session: Session) -> Text:
    t = Text()
    t.append("xhcidbg", style="bold")
    t.append(f" -- xHCI controller with {len(session.controller.ports)} root ports, "
             f"{session.kind}\n")
    world = session if isinstance(session, World) else None
    for port, dev in sorted(session.devices.items()):
        if world is not None:
            gd = world.guest_devices.get(port)
            state = f"slot {gd.device.slot}" if gd else "not enumerated"
        else:
            slot = render.slot_of_port(session.controller, port)
            state = f"slot {slot.id}" if slot else "no slot yet"
        t.append(f"  port {port}: {render.describe_device(dev)} ({state})\n")
    for e in world.guest_errors if world is not None else ():
        t.append(f"  guest error: {e}\n", style="red")
    t.append("`help` lists commands, `help CMD` shows examples; Tab completes.")
    return t


__all__ = ["Console", "WorldOptions", "banner"]
