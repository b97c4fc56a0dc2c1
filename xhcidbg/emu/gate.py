"""The execution gate: every piece of ring processing passes through here.

Rings that have work (a doorbell was rung, a device completed) are queued as workers.  While
running, the gate drains them at once, a bounded number of units per turn, then yields to the
event loop so MMIO and the console stay responsive.  While paused, nothing moves until `step`
runs exactly one unit: one TRB, one TD, or one command.  MMIO is answered either way.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable

from .timing import Scheduler

UNITS_PER_TURN = 256
Worker = Callable[[str], bool]   # worker(unit) -> did it make progress


class Gate:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.paused = False
        self.work: dict[Hashable, Worker] = {}
        self._pumping = False
        self._scheduled = False
        self._held = False                   # a worker stopped before its unit (see hold)
        self.units = 0                       # units run since creation (for the console)
        self.on_change: list[Callable[[bool], None]] = []   # pause/resume listeners

    def kick(self, key: Hashable, worker: Worker) -> None:
        self.work[key] = worker
        if not self.paused:
            self.pump()

    def forget(self, key: Hashable) -> None:
        self.work.pop(key, None)

    def pump(self) -> None:
        self._scheduled = False
        if self.paused or self._pumping:
            return
        self._pumping = True
        budget = UNITS_PER_TURN
        try:
            while self.work and not self.paused and budget > 0:
                key = next(iter(self.work))
                worker = self.work[key]
                progressed = worker("td")
                if self._held:               # paused at it: the ring keeps its place
                    self._held = False
                    continue
                if progressed:
                    budget -= 1
                    self.units += 1
                    # round robin: the ring goes to the back of the queue
                    if key in self.work:
                        del self.work[key]
                        self.work[key] = worker
                else:
                    self.work.pop(key, None)
        finally:
            self._pumping = False
        if self.work and not self.paused and not self._scheduled:
            self._scheduled = True
            self.scheduler.call_soon(self.pump)

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            for fn in self.on_change:
                fn(True)

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            for fn in self.on_change:
                fn(False)
            self.pump()

    def step(self, unit: str = "trb") -> Hashable | None:
        """Run one unit ('trb', 'td' or 'command') of the first ring with work; returns which
        ring moved, or None if no ring had anything to do."""
        if unit not in ("trb", "td", "command"):
            raise ValueError(f"unknown step unit {unit!r}: use trb, td or command")
        for key in list(self.work):
            worker = self.work.get(key)
            if worker is None:
                continue
            if unit == "command" and key != "cmd":
                continue
            progressed = worker(unit)
            if self._take_hold():
                return None                  # stopped again before the unit: nothing ran
            if progressed:
                self.units += 1
                return key
            self.work.pop(key, None)
        return None

    def hold(self) -> None:
        """Called by a worker that did not run its unit because an observer paused the gate
        just before it (a breakpoint on what comes next): its ring stays queued, nothing is
        counted, and the next `step` or `resume` runs that unit."""
        self._held = True

    def _take_hold(self) -> bool:
        held, self._held = self._held, False
        return held

    @property
    def pending(self) -> list[Hashable]:
        return list(self.work)
