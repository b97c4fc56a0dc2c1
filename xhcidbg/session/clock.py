"""The session's clock: the controller's timers run from the asyncio loop.

Whenever the scheduler learns of an earlier deadline, `LoopClock` re-arms one `loop.call_at`;
each firing runs what is due and arms the next deadline.  Every session (the console's
in-process one, `xhcidbg serve`, `xhcidbg vm`) drives its scheduler with this one class.

The vfio-user server's busy-poll also runs timers that fell due between two messages; it does
not arm timers of its own.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..emu.timing import Scheduler

log = logging.getLogger("xhcidbg.session")


class LoopClock:
    """Runs `scheduler`'s timers from `loop`.  The scheduler must be on the monotonic clock,
    which is also asyncio's clock; `on_progress` is called after each firing that ran
    something."""

    def __init__(self, scheduler: Scheduler, loop: asyncio.AbstractEventLoop,
                 on_progress: Callable[[], None] = lambda: None):
        if scheduler.virtual:
            raise ValueError("the session's clock drives a monotonic-clock "
                             "Scheduler(virtual=False)")
        self.scheduler = scheduler
        self.loop = loop
        self.on_progress = on_progress
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0
        scheduler.on_new_deadline = self._arm
        nxt = scheduler.next_deadline()
        if nxt is not None:
            self._arm(nxt)

    def _arm(self, when_ns: int) -> None:
        when = when_ns / 1e9
        if self._handle is not None:
            if self._when <= when:
                return
            self._handle.cancel()
        self._when = when
        self._handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        try:
            ran = self.scheduler.run_due()
        except Exception:          # a timer's bug must not stop the clock
            log.exception("controller timer raised")
            ran = 1
        nxt = self.scheduler.next_deadline()
        if nxt is not None:
            self._arm(nxt)
        if ran:
            self.on_progress()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.scheduler.on_new_deadline == self._arm:
            self.scheduler.on_new_deadline = None
