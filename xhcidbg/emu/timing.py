"""Time and timers for the controller.

The controller never sleeps and never reads the wall clock directly: it asks its `Scheduler` for
the time and for callbacks later.  The same scheduler runs on a virtual clock (tests and the
scripted guest: time moves only when the guest waits, so runs are reproducible) or on the
monotonic clock (a real VM: the asyncio loop calls `run_due` when the next deadline comes).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("xhcidbg.emu")


class Timer:
    __slots__ = ("args", "cancelled", "fn", "when")

    def __init__(self, when: int, fn: Callable[..., object], args: tuple[object, ...]):
        self.when = when
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(self, virtual: bool = False, start_ns: int = 0):
        self.virtual = virtual
        self._now = start_ns
        self._heap: list[tuple[int, int, Timer]] = []
        self._seq = itertools.count()
        self._soon: deque[tuple[Callable[..., object], tuple[object, ...]]] = deque()
        # Called when a timer earlier than every other one is added (the asyncio driver re-arms).
        self.on_new_deadline: Callable[[int], None] | None = None
        self.errors = 0          # callbacks that raised (a bug of ours; tests assert 0)

    def now_ns(self) -> int:
        return self._now if self.virtual else time.monotonic_ns()

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        self._soon.append((fn, args))
        if self.on_new_deadline is not None:
            self.on_new_deadline(self.now_ns())

    def call_later(self, delay_ns: int, fn: Callable[..., object], *args: object) -> Timer:
        t = Timer(self.now_ns() + max(0, int(delay_ns)), fn, args)
        first = not self._heap or t.when < self._heap[0][0]
        heapq.heappush(self._heap, (t.when, next(self._seq), t))
        if first and self.on_new_deadline is not None:
            self.on_new_deadline(t.when)
        return t

    def next_deadline(self) -> int | None:
        if self._soon:
            return self.now_ns()
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def run_due(self, limit: int = 10000) -> int:
        """Run queued callbacks and timers that are due; returns how many ran."""
        ran = 0
        now = self.now_ns()
        while ran < limit:
            if self._soon:
                fn, args = self._soon.popleft()
            elif self._heap and self._heap[0][0] <= now:
                _, _, t = heapq.heappop(self._heap)
                if t.cancelled:
                    continue
                fn, args = t.fn, t.args
            else:
                break
            try:
                fn(*args)
            except Exception:
                self.errors += 1
                log.exception("internal error in a timer callback %r", fn)
            ran += 1
        return ran

    def advance(self, ns: int) -> int:
        """Virtual clock only: move time forward by `ns`, running every timer on the way."""
        assert self.virtual, "advance() is for the virtual clock"
        end = self._now + ns
        ran = self.run_due()
        while True:
            d = self.next_deadline()
            if d is None or d > end:
                break
            self._now = max(self._now, d)
            ran += self.run_due()
        self._now = end
        return ran + self.run_due()

    def advance_to_next(self) -> bool:
        """Virtual clock only: jump to the next deadline and run it.  False if nothing is due."""
        d = self.next_deadline()
        if d is None:
            return False
        self._now = max(self._now, d)
        self.run_due()
        return True
