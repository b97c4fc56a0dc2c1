"""The scripted guest on the console's one event loop (the controller's clock is the session's,
`xhcidbg.session.clock`).

`GuestRunner` runs the synchronous scripted guest (xhcidbg.guest) inside the same loop.  The
guest code runs in a greenlet; its bus's `wait(until, timeout_ns)` switches back to the loop,
which resumes the guest when `until()` holds or the time is up.  So the guest never blocks the
loop, the console stays responsive while the guest waits, and no thread ever touches controller
state.  Time spent with the controller's gate paused does not count against the guest's
timeouts: a stopped controller freezes the guest's clock as well.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import greenlet  # type: ignore[import-untyped]  # greenlet ships no type information

from ..emu.gate import Gate
from ..emu.memory import RamMemory
from ..emu.timing import Scheduler
from ..transport.inproc import InProcessBus

log = logging.getLogger("xhcidbg.ui")

FOREVER_NS = 1 << 62
RECHECK_S = 0.25          # a waiting guest re-checks its condition at least this often


class _Greenlet(Protocol):
    """What the runner uses of a greenlet."""

    parent: _Greenlet
    dead: bool

    def switch(self, *args: Any) -> Any: ...

    def throw(self, typ: type[BaseException]) -> Any: ...


class _Wait:
    __slots__ = ("timeout_ns", "until")

    def __init__(self, until: Callable[[], bool], timeout_ns: int):
        self.until = until
        self.timeout_ns = timeout_ns


class LoopBus:
    """The in-process bus as the guest sees it inside the console: the same MMIO, RAM and
    interrupt counts, but `wait` yields to the event loop instead of spinning."""

    def __init__(self, inner: InProcessBus, runner: GuestRunner):
        self.inner = inner
        self.runner = runner
        self.controller = inner.controller

    @property
    def mem(self) -> RamMemory:
        return self.inner.mem

    @property
    def interrupts(self) -> list[int]:
        return self.inner.interrupts

    @property
    def scheduler(self) -> Scheduler:
        return self.inner.scheduler

    def mmio_read(self, offset: int, size: int) -> int:
        return self.inner.mmio_read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.inner.mmio_write(offset, size, value)

    def wait(self, until: Callable[[], bool], timeout_ns: int = 1_000_000_000) -> bool:
        if until():
            return True
        if not self.runner.inside_guest():
            return self.inner.wait(until, timeout_ns)     # called from outside: plain waiting
        return self.runner.yield_to_loop(_Wait(until, timeout_ns))


class Job:
    """Something the guest does on the console's behalf (enumerate a port, read a block)."""

    def __init__(self, what: str, fn: Callable[[], Any]):
        self.what = what
        self.fn = fn
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        state = ("failed: " + str(self.error)) if self.error else "done" if self.done else "pending"
        return f"Job({self.what}: {state})"


class GuestRunner:
    """One guest 'CPU': a greenlet running `main(runner)` once, then the job loop.

    The guest's main loop alternates between running queued jobs and sleeping until an
    interrupt or a new job arrives; `service` is what it calls after each wake-up (the driver's
    interrupt handler)."""

    def __init__(self, gate: Gate, interrupts: list[int]):
        self.gate = gate
        self.interrupts = interrupts
        self.jobs: deque[Job] = deque()
        self.current: Job | None = None
        self.idle = False
        self.crashed: BaseException | None = None
        self.finished = False
        self.service: Callable[[], Any] = lambda: None
        self._guest: _Greenlet = greenlet.greenlet(self._body)     # runs from `start` on
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.waiting: _Wait | None = None     # what the guest waits for right now

    # ---- called from the guest greenlet ---------------------------------------------------
    def inside_guest(self) -> bool:
        return greenlet.getcurrent() is self._guest

    def yield_to_loop(self, request: _Wait) -> bool:
        return bool(self._guest.parent.switch(request))

    def _body(self, setup: Callable[[], None]) -> None:
        setup()
        while not self._stopping:
            if self.jobs:
                job = self.current = self.jobs.popleft()
                try:
                    job.result = job.fn()
                except Exception as e:        # the job failed; the guest goes on
                    job.error = e
                job.done = True
                self.current = None
            else:
                self.idle = True
                try:
                    self.yield_to_loop(_Wait(partial(self._has_news, list(self.interrupts)),
                                             FOREVER_NS))
                finally:
                    self.idle = False
            self.service()

    def _has_news(self, interrupts_seen: list[int]) -> bool:
        """A job came, the guest is told to stop, or an interrupt arrived since."""
        return bool(self.jobs) or self._stopping or self.interrupts != interrupts_seen

    # ---- called from the loop ---------------------------------------------------------------
    def start(self, setup: Callable[[], None]) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self._drive(setup))
        return self._task

    async def _drive(self, setup: Callable[[], None]) -> None:
        try:
            request = self._guest.switch(setup)
            while not self._guest.dead:
                result = await self._serve(request)
                request = self._guest.switch(result)
        except Exception as e:
            self.crashed = e
            log.error("the scripted guest stopped: %s", e)
        finally:
            self.finished = True
            self.idle = False
            for job in self.jobs:
                job.error = job.error or RuntimeError("the guest is not running")
                job.done = True

    async def _serve(self, w: _Wait) -> bool:
        self.waiting = w
        try:
            return await self._wait_for(w)
        finally:
            self.waiting = None

    async def _wait_for(self, w: _Wait) -> bool:
        loop = asyncio.get_running_loop()
        remaining = w.timeout_ns / 1e9
        while True:
            self._changed.clear()
            if w.until():
                return True
            if remaining <= 0:
                return False
            paused = self.gate.paused
            t0 = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(),
                                       RECHECK_S if paused else min(remaining, RECHECK_S))
            if not paused and not self.gate.paused:
                remaining -= loop.time() - t0

    def notify(self) -> None:
        """Something changed (timers ran, an interrupt came, the user did something)."""
        self._changed.set()

    def submit(self, what: str, fn: Callable[[], Any]) -> Job:
        job = Job(what, fn)
        if self.finished:
            job.error = RuntimeError(f"the scripted guest is not running ({self.crashed})")
            job.done = True
            return job
        self.jobs.append(job)
        self.notify()
        return job

    def stuck(self) -> bool:
        """The guest cannot move until something outside it happens."""
        if self.finished or self._task is None:       # ended, or never started
            return True
        w = self.waiting
        return w is not None and not w.until()

    async def stop(self) -> None:
        """Let the guest finish what it is doing (briefly), then end it."""
        self._stopping = True
        self.notify()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 1.0)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not self._guest.dead:
            self._guest.throw(greenlet.GreenletExit)
