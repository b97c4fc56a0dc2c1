"""The controller's timers, run from the asyncio loop on the scheduler's clock."""
from __future__ import annotations

import asyncio
import logging

from xhcidbg.emu.timing import Scheduler

log = logging.getLogger("xhcidbg.vfio_user")


class SchedulerDriver:
    """Arms one loop timer for the scheduler's next deadline and runs what is due when it fires.

    The scheduler announces earlier deadlines through `on_new_deadline`; the driver holds that
    hook between `start` and `stop`."""

    def __init__(self, scheduler: Scheduler, loop: asyncio.AbstractEventLoop):
        self.scheduler = scheduler
        self.loop = loop
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._armed_ns: int | None = None

    def start(self) -> None:
        self.scheduler.on_new_deadline = self._arm
        self._rearm()

    def stop(self) -> None:
        if self.scheduler.on_new_deadline == self._arm:
            self.scheduler.on_new_deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when_ns: int) -> None:
        if self._handle is not None and self._armed_ns is not None and self._armed_ns <= when_ns:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._armed_ns = when_ns
        delay = (when_ns - self.scheduler.now_ns()) / 1e9
        if delay <= 0:
            self._handle = self.loop.call_soon(self._run)
        else:
            self._handle = self.loop.call_later(delay, self._run)

    def _run(self) -> None:
        self._handle = None
        self._armed_ns = None
        try:
            self.scheduler.run_due()
        except Exception:
            log.exception("controller timer failed")
        self._rearm()

    def _rearm(self) -> None:
        d = self.scheduler.next_deadline()
        if d is not None:
            self._arm(d)
