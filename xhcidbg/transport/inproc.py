"""The in-process bus: a guest (the scripted driver, tests, benchmarks) and the controller in one
Python process.  It gives the guest exactly what a VMM gives a guest OS -- BAR0 MMIO, RAM the
controller reaches by DMA, interrupts -- and nothing else.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..emu.controller import XhciController
from ..emu.interrupters import InterruptSink
from ..emu.memory import RamMemory
from ..emu.timing import Scheduler


class _Sink(InterruptSink):
    def __init__(self, bus: InProcessBus):
        self.bus = bus

    @property
    def message_signalled(self) -> bool:
        return self.bus.mode == "msix"

    @message_signalled.setter
    def message_signalled(self, value: bool) -> None:
        self.bus.mode = "msix" if value else "intx"

    def signal(self, interrupter: int) -> None:
        self.bus.interrupts[interrupter] += 1

    def set_level(self, asserted: bool) -> None:
        if asserted and not self.bus.intx:
            self.bus.intx_edges += 1
        self.bus.intx = asserted

    def system_error(self) -> None:
        self.bus.system_errors += 1


class InProcessBus:
    def __init__(self, controller: XhciController | None = None, ram_size: int = 64 << 20,
                 mode: str = "msix", **controller_options: Any):
        if controller is None:
            controller_options.setdefault("scheduler", Scheduler(virtual=True))
            controller = XhciController(**controller_options)
        self.controller = controller
        self.mem = RamMemory(ram_size)        # the guest's
        controller.mem = self.mem.twin()      # the controller's own, so only its DMA is announced
        self.mode = mode                         # "msix" or "intx"
        self.interrupts = [0] * len(controller.interrupters)
        self.intx = False
        self.intx_edges = 0
        self.system_errors = 0
        controller.irq = _Sink(self)

    @property
    def scheduler(self) -> Scheduler:
        return self.controller.scheduler

    def mmio_read(self, offset: int, size: int) -> int:
        return self.controller.mmio_read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.controller.mmio_write(offset, size, value)

    def wait(self, until: Callable[[], bool], timeout_ns: int = 1_000_000_000) -> bool:
        """Let time pass until `until()` holds.  On the virtual clock this jumps from one timer to
        the next, so a wait costs no real time; on the monotonic clock it runs due callbacks."""
        sched = self.controller.scheduler
        deadline = sched.now_ns() + timeout_ns
        sched.run_due()
        while not until():
            if sched.virtual:
                nxt = sched.next_deadline()
                if nxt is None or nxt > deadline:
                    sched.advance(max(0, deadline - sched.now_ns()))
                    return until()
                sched.advance_to_next()
            else:
                import time
                if sched.now_ns() >= deadline:
                    return until()
                if not sched.run_due():
                    time.sleep(0.0002)
        return True
