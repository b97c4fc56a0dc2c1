"""The console: a prompt_toolkit prompt over the command registry, on the world's one loop.

    con = Console(WorldOptions())          # builds the in-process world
    con.start()                            # controller up, guest enumerates the devices
    print(con.execute("ports"))            # plain text, for scripts and tests
    con.close()

`Console.interact()` is the interactive prompt (history, completion, context panes redrawn
after each stop); `Console.run_script(lines)` is batch mode.  Both run everything -- the prompt,
the controller's timers, the guest -- in one asyncio loop.
"""
from __future__ import annotations

import asyncio
import inspect
import io
import logging
import os
import sys
import traceback
from collections.abc import Iterable
from difflib import get_close_matches
from typing import TYPE_CHECKING, TextIO

from rich.console import Console as RichConsole
from rich.rule import Rule
from rich.text import Text

from ..emu.controller import XhciController
from . import commands as _commands
from . import render
from .observe import ActivityLog, Breakpoint, Breakpoints
from .registry import REGISTRY, HelpShown, UsageError
from .world import World, WorldOptions

if TYPE_CHECKING:
    from prompt_toolkit.formatted_text import HTML

log = logging.getLogger("xhcidbg.ui")

HISTORY_FILE = os.path.join(os.path.expanduser("~"), ".xhcidbg_history")
PROMPT = "xhcidbg> "
ACTIVITY_LINES = 24


class Console:
    PANES = ("status", "hit", "ring", "events", "ports", "slots")

    def __init__(self, options: WorldOptions | None = None, *, width: int | None = None,
                 color: bool = False):
        self.options = options or WorldOptions()
        self.width = width
        self.color = color
        self.loop = asyncio.new_event_loop()
        self._world: World | None = None
        self.activity = ActivityLog()
        self._breakpoints: Breakpoints | None = None
        self.out: RichConsole = self._text_console(io.StringIO())
        self.interactive = False
        self.panes = ["status", "hit", "ring", "events"]
        self.context_enabled = True
        self.stepped_ring: str | None = None
        self.quit_requested = False
        self._busy = False              # a command is running (it reports stops itself)
        self._context_shown = False

    @property
    def world(self) -> World:
        """The session the console runs on (from `start` on)."""
        if self._world is None:
            raise RuntimeError("the console has not started")
        return self._world

    @property
    def controller(self) -> XhciController:
        return self.world.controller

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
        world = self._world = World(self.options)
        hooks = world.controller.hooks
        hooks.attach(self.activity)
        self._breakpoints = Breakpoints(world.controller.gate, self._on_breakpoint)
        hooks.attach(self._breakpoints)
        await world.start()
        await world.settle(10.0)

    def close(self) -> None:
        if self._world is not None and not self.loop.is_closed():
            self.loop.run_until_complete(self._world.stop())
        if not self.loop.is_closed():
            self.loop.close()

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
        """Run one command, printing to `self.out`; False if it failed."""
        try:
            words = _commands.split_words(line)
        except ValueError as e:
            self.out.print(Text(f"error: {e}", style="red"))
            return False
        if not words:
            return True
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
                self.show_context()      # a breakpoint hit while the command ran
            return True
        except HelpShown as h:
            self.out.print(Text(str(h).rstrip()))
            return True
        except UsageError as e:
            self.out.print(Text(str(e), style="red"))
        except (ValueError, LookupError, RuntimeError) as e:
            self.out.print(Text(f"{cmd.name}: {e}", style="red"))
        except Exception as e:                    # a console bug: say so, keep the console
            log.debug("command %r failed", line, exc_info=True)
            self.out.print(Text(f"{cmd.name}: internal error: {e!r}\n"
                                f"{traceback.format_exc(limit=-3)}", style="red"))
        finally:
            self._busy = False
        return False

    def run_script(self, lines: Iterable[str], echo: bool = True,
                   file: TextIO | None = None) -> int:
        """Batch mode: run each line, print its output; returns the number of failed commands."""
        out = file or sys.stdout
        failed = 0

        async def go() -> None:
            nonlocal failed
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
                        return
        self.loop.run_until_complete(go())
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
        """Where the activity log and the guest's report count stand now."""
        return self.activity.seq, self.world.report_count

    async def after_device_action(self, mark: tuple[int, int]) -> None:
        """A device did something: let the controller and the guest react, show what
        happened."""
        since, reports_before = mark
        w = self.world
        w.runner.notify()
        await w.settle(2.0)
        self.show_activity(since)
        self.show_new_reports(reports_before)
        if self.controller.gate.paused:
            self.out.print(Text("(paused: rings are not processed until `step` or `continue`)",
                                style="yellow"))

    def show_new_reports(self, reports_before: int) -> None:
        w = self.world
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
            elif pane == "hit":
                hit = self.breakpoints.last_hit
                if hit is not None and c.gate.paused:
                    bp, what = hit
                    self.out.print(Text(f"breakpoint {bp} hit: {what}", style="bold magenta"))
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

    def _on_breakpoint(self, bp: Breakpoint, what: str) -> None:
        if self.breakpoints.last_ring:
            self.stepped_ring = self.breakpoints.last_ring  # show the ring it stopped on
        if self.interactive and not self._busy:
            self.loop.call_soon(self._announce_stop)

    def _announce_stop(self) -> None:
        self.show_context()

    # ---- output -----------------------------------------------------------------------------
    def _text_console(self, file: TextIO) -> RichConsole:
        return RichConsole(file=file, width=self.width or 150, force_terminal=False,
                           no_color=True, highlight=False, emoji=False, soft_wrap=False)

    # ---- interactive ------------------------------------------------------------------------
    def interact(self) -> None:
        self.loop.run_until_complete(self._interact())

    async def _interact(self) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, History, InMemoryHistory
        from prompt_toolkit.patch_stdout import patch_stdout

        from .completion import CommandCompleter

        history: History
        try:
            history = FileHistory(HISTORY_FILE)
        except OSError:
            history = InMemoryHistory()
        session: PromptSession[str] = PromptSession(
            history=history, completer=CommandCompleter(self), complete_while_typing=False)
        self.interactive = True
        with patch_stdout(raw=True):
            self.out = RichConsole(file=sys.stdout, force_terminal=True, highlight=False,
                                   width=self.width)
            self.out.print(banner(self.world))
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
        if self._world is not None and self._world.controller.gate.paused:
            return HTML("<ansired>xhcidbg (paused)&gt;</ansired> ")
        return HTML("<ansigreen>xhcidbg&gt;</ansigreen> ")


_KIND_STYLE = {"event": "green", "doorbell": "yellow", "command": "cyan", "urb": "magenta",
               "port": "blue", "log": "red", "trb": ""}


def banner(world: World) -> Text:
    t = Text()
    t.append("xhcidbg", style="bold")
    t.append(f" -- xHCI controller with {len(world.controller.ports)} root ports, in-process "
             f"scripted guest\n")
    for port, dev in sorted(world.devices.items()):
        gd = world.guest_devices.get(port)
        state = f"slot {gd.device.slot}" if gd else "not enumerated"
        t.append(f"  port {port}: {render.describe_device(dev)} ({state})\n")
    for e in world.guest_errors:
        t.append(f"  guest error: {e}\n", style="red")
    t.append("`help` lists commands, `help CMD` shows examples; Tab completes.")
    return t


__all__ = ["Console", "WorldOptions", "banner"]
