"""What xhcidbg's USB/IP client costs per transfer, without VMs: the same virtual device plugged
into the controller directly, and exported over TCP on 127.0.0.1 by tests/usbip_server.py and
imported (usbip://), driven by the scripted guest on the in-process controller.

    python bench/usbip_client.py                   # 3 rounds, alternating direct and usbip
    python bench/usbip_client.py --rounds 5 --save-reference

Per side, in one process on one core (the guest driver's and the server's work included):
  GET_STATUS    one control IN transfer, median and p90 in us;
  512-byte IN   one bulk IN TD of 512 bytes from Gadget Zero's source, median in us;
  64 KiB IN     MB/s over --transfers bulk IN TDs of 64 KiB, one at a time.
The usbip side is what the client adds (a URB out, a reply parsed, both on the loop) plus what
the small server spends; bench/usbip_chain.py has the figures with Linux guests and a real
usbip-host.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from usbip_server import VirtualExport  # tests/: the server the client tests use

from bench._report import report, side_by_side
from xhcidbg.devices.base import Speed
from xhcidbg.devices.loopback import LoopbackDevice
from xhcidbg.session import DeviceChoice
from xhcidbg.ui.world import World, WorldOptions

SIDES = ("direct", "usbip")


def device() -> LoopbackDevice:
    return LoopbackDevice(speed=Speed.HIGH, pattern=1)


async def until(check: Any, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise TimeoutError(what)
        await asyncio.sleep(0.005)


def measure(dev: Any, samples: int, transfers: int) -> dict[str, float]:
    """Runs on the scripted guest's side: the figures of one side."""
    status = []
    for _ in range(samples):
        t = time.perf_counter()
        dev.control(0x80, 0, 0, 0, 2)
        status.append(time.perf_counter() - t)
    small = []
    ep = dev.endpoint(0x81)
    for _ in range(samples):
        t = time.perf_counter()
        ep.submit(length=512).wait()
        small.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(transfers):
        ep.submit(length=65536).wait()
    big = time.perf_counter() - t
    status.sort()
    return {"GET_STATUS median": statistics.median(status) * 1e6,
            "GET_STATUS p90": status[int(len(status) * 0.9)] * 1e6,
            "512-byte IN median": statistics.median(small) * 1e6,
            "64 KiB IN": transfers * 65536 / big / 1e6}


async def side(name: str, args: argparse.Namespace) -> dict[str, float]:
    world = World(WorldOptions(devices=DeviceChoice(tablet=False, keyboard=False)))
    export = VirtualExport(device()) if name == "usbip" else None
    await world.start()
    try:
        await world.settle(5)
        if export is None:
            port = world.plug(device())
        else:
            url = f"usbip://127.0.0.1:{await export.start()}/{export.busid}"
            remote = world.port_mapper().remote
            world.port_mapper().attach(url)
            await until(lambda: bool(remote.attached), f"the import of {url}")
            port = next(iter(remote.attached))
        await until(lambda: port in world.guest_devices, f"enumeration on port {port}")
        dev = world.guest_devices[port].device
        job = world.guest_job(f"{name} figures",
                              lambda: measure(dev, args.samples, args.transfers))
        if not await world.wait_job(job, 300) or job.error is not None:
            raise RuntimeError(f"{name}: the guest's job failed: {job.error}")
        figures: dict[str, float] = job.result
        return figures
    finally:
        await world.stop()
        if export is not None:
            await export.stop()


async def rounds(args: argparse.Namespace) -> list[dict[str, dict[str, float]]]:
    done = []
    for n in range(1, args.rounds + 1):
        one = {name: await side(name, args) for name in SIDES}
        print(f"round {n}: " + ", ".join(f"{name} GET_STATUS {one[name]['GET_STATUS median']:.0f}"
                                         " us" for name in SIDES), flush=True)
        done.append(one)
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example:\n  .venv/bin/python bench/usbip_client.py")
    ap.add_argument("--rounds", type=int, default=3, help="direct/usbip pairs (default 3)")
    ap.add_argument("--samples", type=int, default=300,
                    help="timed transfers per latency figure (default 300)")
    ap.add_argument("--transfers", type=int, default=200,
                    help="64 KiB transfers for the MB/s figure (default 200)")
    ap.add_argument("--save-reference", action="store_true",
                    help="store this run as bench/reference/usbip_client.json")
    args = ap.parse_args()
    done = asyncio.run(rounds(args))
    rows = [(key, key, unit) for key, unit in (
        ("GET_STATUS median", "us"), ("GET_STATUS p90", "us"), ("512-byte IN median", "us"),
        ("64 KiB IN", "MB/s"))]
    figures, units = side_by_side(done, rows, SIDES, ("usbip", "direct"))
    report("usbip_client", figures, units, sys.argv, args.save_reference)


if __name__ == "__main__":
    main()
