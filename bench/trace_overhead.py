"""What tracing costs: bulk throughput through the controller with tracing off and on.

    python bench/trace_overhead.py [--transfers N] [--size BYTES]

The scripted guest moves N bulk OUT + N bulk IN transfers to a loopback device (USB 3 bus) on
the in-process bus; the same run is timed without a tracer, with everything traced (every TRB,
event, MMIO access, usbmon record), and with usbmon records only.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from xhcidbg.devices.loopback import LoopbackDevice          # noqa: E402
from xhcidbg.guest.driver import XhciDriver                  # noqa: E402
from xhcidbg.trace.tracer import Tracer                      # noqa: E402
from xhcidbg.transport.inproc import InProcessBus            # noqa: E402


def run(transfers: int, size: int, trace: str | None, folder: str) -> tuple[float, str]:
    bus = InProcessBus()
    drv = XhciDriver(bus).start()
    dev = drv.enumerate(drv.wait_for_connect(bus.controller.attach(LoopbackDevice())))
    tracer = None
    if trace is not None:
        tracer = Tracer(bus.controller, os.path.join(folder, "bench.pcapng"), trace or None)
        tracer.start()
    out = bytes(size)
    t0 = time.perf_counter()
    for _ in range(transfers):
        dev.bulk_out(1, out)
        dev.bulk_in(1, size)
    elapsed = time.perf_counter() - t0
    note = ""
    if tracer is not None:
        st = tracer.stop()
        note = f"{st.records} records, {st.bytes_written / 1e6:.1f} MB"
    return elapsed, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transfers", type=int, default=2000)
    ap.add_argument("--size", type=int, default=4096)
    a = ap.parse_args()
    total = 2 * a.transfers
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, trace in (("tracing off", None), ("usbmon only (kind=urb)", "kind=urb"),
                             ("everything", "")):
            elapsed, note = run(a.transfers, a.size, trace, folder)
            rows.append((label, total / elapsed, total * a.size / elapsed / 1e6, note))
    base = rows[0][1]
    print(f"{total} bulk transfers of {a.size} bytes through the controller, in process:")
    print(f"{'':26}{'transfers/s':>12}{'MB/s':>9}{'vs off':>9}  written")
    for label, tps, mbs, note in rows:
        print(f"{label:26}{tps:12.0f}{mbs:9.1f}{tps / base:9.2f}  {note}")


if __name__ == "__main__":
    main()
