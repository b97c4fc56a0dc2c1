"""Record a small, real capture: the scripted guest enumerates a tablet (USB 2 bus) and a
loopback device (USB 3 bus) through the controller, moves data, and meets one stall.

    python -m xhcidbg.trace.sample captures/enumeration.pcapng [FILTER...]

The tests use it too, so the sample in `captures/` is exactly what they check.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from xhcidbg.devices.loopback import LoopbackDevice
from xhcidbg.devices.tablet import Tablet
from xhcidbg.guest.driver import XhciDriver
from xhcidbg.transport.inproc import InProcessBus

from .tracer import Tracer, TraceStatus

BULK_OUT = bytes(1024)                     # 1 KiB of the sink pattern (zeros) to bulk OUT
BULK_IN = 512


@dataclass
class Sample:
    status: TraceStatus
    tablet_port: int
    loopback_port: int
    bulk_in: int                          # bytes the loopback returned


def record(path: str | Path, filters=None, context_size: int = 32, **tracer_options) -> Sample:
    bus = InProcessBus(context_size=context_size)
    tracer = Tracer(bus.controller, path, filters, **tracer_options).start()
    try:
        drv = XhciDriver(bus).start()
        tablet, loop = Tablet(), LoopbackDevice()
        t_port = bus.controller.attach(tablet)
        t_dev = drv.enumerate(drv.wait_for_connect(t_port))
        l_port = bus.controller.attach(loop)
        l_dev = drv.enumerate(drv.wait_for_connect(l_port))
        t_dev.control(0x80, 6, 0x9900, 0, 8, check=False)        # no such descriptor: stall
        tablet.move(1000, 2000)
        t_dev.interrupt_in(1, 8)
        l_dev.bulk_out(1, BULK_OUT)
        got = l_dev.bulk_in(1, BULK_IN)
        tracer.annotate("sample finished")
    finally:
        status = tracer.stop()
    return Sample(status, t_port, l_port, len(got.data))


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "captures/enumeration.pcapng")
    print(record(out, sys.argv[2:] or None).status)
