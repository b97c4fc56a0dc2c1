"""TRBs per second and MB/s through the scripted guest, the controller and the loopback device.

    python bench/throughput.py                 # 1 KiB and 64 KiB TRBs, bulk IN and OUT
    python bench/throughput.py --profile       # and where the time goes (cProfile, top 25)
    python bench/throughput.py --save-reference

Everything runs on one core in one process: the guest driver's own work (building TRBs, reading
events) is included, as a guest's CPU time would be on a real machine.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import report  # noqa: E402
from xhcidbg.devices.base import Speed  # noqa: E402
from xhcidbg.devices.loopback import LoopbackDevice  # noqa: E402
from xhcidbg.guest.driver import XhciDriver  # noqa: E402
from xhcidbg.transport.inproc import InProcessBus  # noqa: E402


def setup(ring_trbs: int):
    bus = InProcessBus(ram_size=256 << 20)
    dev = LoopbackDevice(speed=Speed.SUPER, pattern=None)
    port = bus.controller.attach(dev)
    drv = XhciDriver(bus, transfer_ring_trbs=ring_trbs, event_ring_trbs=4096).start()
    return bus, drv, drv.enumerate(port)


def run(direction: str, trb_size: int, seconds: float, batch: int) -> tuple[float, float]:
    bus, drv, dev = setup(ring_trbs=batch + 16)
    ep = dev.endpoint(0x81 if direction == "in" else 0x01)
    buf = drv.alloc.buffer(trb_size)
    payload = bytes(trb_size)
    trbs = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        with drv.batch():
            tds = [ep.submit(length=trb_size, buffer=buf) if direction == "in"
                   else ep.submit(payload, buffer=buf) for _ in range(batch)]
        drv.wait_all(tds)
        trbs += batch
    elapsed = time.perf_counter() - start
    assert bus.controller.internal_errors == 0
    return trbs / elapsed, trbs * trb_size / elapsed / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per figure (default 2)")
    ap.add_argument("--batch", type=int, default=128, help="TDs queued per doorbell")
    ap.add_argument("--profile", action="store_true", help="profile the 1 KiB bulk IN run")
    ap.add_argument("--save-reference", action="store_true")
    args = ap.parse_args()
    figures, units = {}, {}
    for direction in ("in", "out"):
        for size, label in ((1024, "1KiB"), (65536, "64KiB")):
            tps, mbs = run(direction, size, args.seconds, args.batch)
            figures[f"bulk {direction} {label} TRBs/s"] = tps
            figures[f"bulk {direction} {label} MB/s"] = mbs
            units[f"bulk {direction} {label} TRBs/s"] = "TRB/s"
            units[f"bulk {direction} {label} MB/s"] = "MB/s"
    report("throughput", figures, units, sys.argv, args.save_reference)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run("in", 1024, args.seconds, args.batch)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
