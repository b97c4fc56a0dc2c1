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

from bench._report import report
from xhcidbg.devices.base import Speed
from xhcidbg.devices.loopback import LoopbackDevice
from xhcidbg.guest.driver import XhciDriver
from xhcidbg.transport.inproc import InProcessBus


def setup(ring_trbs: int):
    bus = InProcessBus(ram_size=256 << 20)
    dev = LoopbackDevice(speed=Speed.SUPER, pattern=None)
    port = bus.controller.attach(dev)
    drv = XhciDriver(TimedBus(bus), transfer_ring_trbs=ring_trbs, event_ring_trbs=4096).start()
    return bus, drv, drv.enumerate(port)


class TimedBus:
    """Wraps the bus to add up the time spent inside the controller (every doorbell is
    processed synchronously inside the MMIO write, so this is the controller's whole share)."""

    def __init__(self, bus):
        self.bus = bus
        self.inside = 0.0
        for name in ("mem", "interrupts", "wait", "mode", "scheduler", "controller"):
            setattr(self, name, getattr(bus, name))

    def mmio_read(self, offset, size):
        t = time.perf_counter()
        v = self.bus.mmio_read(offset, size)
        self.inside += time.perf_counter() - t
        return v

    def mmio_write(self, offset, size, value):
        t = time.perf_counter()
        self.bus.mmio_write(offset, size, value)
        self.inside += time.perf_counter() - t


def run(direction: str, trb_size: int, seconds: float, batch: int) -> tuple[float, float, float]:
    """Returns TRBs/s, MB/s and the share of the time spent inside the controller."""
    bus, drv, dev = setup(ring_trbs=batch + 16)
    ep = dev.endpoint(0x81 if direction == "in" else 0x01)
    buf = drv.alloc.buffer(trb_size)
    payload = bytes(trb_size)
    trbs = 0
    drv.bus.inside = 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        with drv.batch():
            tds = [ep.submit(length=trb_size, buffer=buf, fetch_data=False) if direction == "in"
                   else ep.submit(payload, buffer=buf) for _ in range(batch)]
        drv.wait_all(tds)
        trbs += batch
    elapsed = time.perf_counter() - start
    assert bus.controller.internal_errors == 0
    return trbs / elapsed, trbs * trb_size / elapsed / 1e6, drv.bus.inside / elapsed


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
            tps, mbs, share = run(direction, size, args.seconds, args.batch)
            name = f"bulk {direction} {label}"
            figures[f"{name} TRBs/s"] = tps
            figures[f"{name} MB/s"] = mbs
            figures[f"{name} controller-only TRBs/s"] = tps / share
            units[f"{name} TRBs/s"] = "TRB/s"
            units[f"{name} MB/s"] = "MB/s"
            units[f"{name} controller-only TRBs/s"] = (f"TRB/s if the guest cost nothing "
                                                       f"(controller share {share:.0%})")
    report("throughput", figures, units, sys.argv, args.save_reference)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run("in", 1024, args.seconds, args.batch)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
