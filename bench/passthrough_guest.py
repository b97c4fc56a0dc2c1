"""The in-VM half of bench/passthrough.py: the same SourceSink gadget, timed two ways.

    python bench/passthrough_guest.py [--rounds 3] [--seconds 2] [--size 65536] [--depth 4]
                                      [--samples 200] [--profile]

Runs in the gadget VM (bench/passthrough.py boots it, plugs Gadget Zero's SourceSink and starts
this with this machine's venv Python in the chroot).  Each round times, in turn:
  direct       python-libusb1 on the gadget itself (libusb loaded as the port mapper loads it);
  passthrough  the scripted guest on an in-process controller, the gadget attached by the
               session's port mapper; times are the guest's own, submit to completion event.
Both sides: bulk IN and OUT throughput (`--size` byte transfers, `--depth` in flight, for
`--seconds`), then `--samples` round trips of one 512-byte bulk IN and of one GET_STATUS.

Prints `@@ ...` progress lines, then one `@@result {json}` line with every round's figures
(and, with --profile, a cProfile of one more passthrough pass that is not counted).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import pstats
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import usb1  # noqa: E402

from xhcidbg.passthrough import library  # noqa: E402
from xhcidbg.session import DeviceChoice  # noqa: E402
from xhcidbg.ui.world import World, WorldOptions  # noqa: E402

VID, PID = 0x0525, 0xA4A0
ZERO = f"{VID:04x}:{PID:04x}"
BULK_IN, BULK_OUT = 0x81, 0x02
GET_STATUS = (0x80, 0x00, 0, 0, 2)        # bmRequestType, bRequest, wValue, wIndex, wLength
SMALL = 512                               # the latency transfer: one high-speed packet
WARMUP = 10                               # round trips before the counted ones
TIMEOUT_MS = 10_000


def say(text: str) -> None:
    print(f"@@ {text}", flush=True)


def latency(fn: Callable[[], object], samples: int) -> dict[str, float]:
    """Median and p90 of `samples` calls of `fn` (after WARMUP), in microseconds."""
    for _ in range(WARMUP):
        fn()
    took = []
    for _ in range(samples):
        t = time.perf_counter_ns()
        fn()
        took.append((time.perf_counter_ns() - t) / 1000)
    return {"median": statistics.median(took), "p90": statistics.quantiles(took, n=10)[8]}


class CpuShare:
    """The share of the wall time this process spent on a CPU (user and system) while in
    the block: near 1 means the side is CPU-bound (in the VM's one TCG CPU), not waiting."""

    share = 0.0

    def __enter__(self) -> CpuShare:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.wall
        self.share = (time.process_time() - self.cpu) / wall if wall > 0 else 0.0


# ---- (a) python-libusb1 on the gadget ----------------------------------------------------------
def direct_stream(ctx: usb1.USBContext, handle: usb1.USBDeviceHandle, ep: int, size: int,
                  depth: int, seconds: float) -> float:
    """MB/s of `depth` async bulk transfers of `size` bytes kept in flight for `seconds`."""
    state = {"moved": 0, "live": depth, "last": 0.0, "error": ""}
    end = 0.0

    def done(t: usb1.USBTransfer) -> None:
        status = t.getStatus()
        if status != usb1.TRANSFER_COMPLETED:
            state["error"] = state["error"] or f"ep {ep:#04x}: libusb transfer status {status}"
            state["live"] -= 1
            return
        state["moved"] += t.getActualLength()
        state["last"] = now = time.perf_counter()
        if now < end:
            t.submit()
        else:
            state["live"] -= 1

    transfers = []
    for _ in range(depth):
        t = handle.getTransfer()
        t.setBulk(ep, size if ep & 0x80 else bytearray(size), callback=done, timeout=TIMEOUT_MS)
        transfers.append(t)
    start = time.perf_counter()
    end = start + seconds
    for t in transfers:
        t.submit()
    while state["live"]:
        ctx.handleEvents()
    if state["error"]:
        raise RuntimeError(state["error"])
    return state["moved"] / (state["last"] - start) / 1e6


def direct_round(args: argparse.Namespace) -> dict[str, Any]:
    ctx = library.context()
    try:
        handle = ctx.openByVendorIDAndProductID(VID, PID, skip_on_error=True)
        if handle is None:
            raise RuntimeError(f"{ZERO} is not on this host")
        handle.claimInterface(0)
        try:
            with CpuShare() as cpu:
                figures = {
                "bulk_in": direct_stream(ctx, handle, BULK_IN, args.size, args.depth,
                                         args.seconds),
                "bulk_out": direct_stream(ctx, handle, BULK_OUT, args.size, args.depth,
                                          args.seconds),
                "in512": latency(lambda: handle.bulkRead(BULK_IN, SMALL, TIMEOUT_MS),
                                 args.samples),
                "get_status": latency(lambda: handle.controlRead(*GET_STATUS, TIMEOUT_MS),
                                      args.samples),
                }
            return {**figures, "cpu_percent": 100 * cpu.share}
        finally:
            handle.releaseInterface(0)
            handle.close()
    finally:
        ctx.close()


# ---- (b) the scripted guest, through the controller and the port mapper -----------------------
def guest_stream(drv: Any, ep: Any, size: int, depth: int, seconds: float) -> float:
    """MB/s of `depth` TDs of `size` bytes kept queued on `ep` for `seconds` (guest time: from
    the first submit to the last completion event)."""
    bufs = [drv.alloc.buffer(size) for _ in range(depth)]
    payload = None if ep.is_in else bytes(size)

    def submit(i: int) -> Any:
        if ep.is_in:             # the data stays in guest memory, as a DMA driver leaves it
            return ep.submit(length=size, buffer=bufs[i], fetch_data=False)
        return ep.submit(payload, buffer=bufs[i])

    start = last = time.perf_counter()
    end = start + seconds
    pending = deque((i, submit(i)) for i in range(depth))
    moved = 0
    while pending:
        i, td = pending.popleft()
        td.wait(timeout_ns=TIMEOUT_MS * 1_000_000)
        if not td.ok:
            raise RuntimeError(f"bulk {ep.name}: {td!r}")
        moved += td.actual
        last = time.perf_counter()
        if last < end:
            pending.append((i, submit(i)))
    return moved / (last - start) / 1e6


class Guest:
    """A world with no virtual devices, the gadget attached by its port mapper."""

    def __init__(self) -> None:
        self.world = World(WorldOptions(devices=DeviceChoice(tablet=False, keyboard=False)))

    async def __aenter__(self) -> Guest:
        await self.world.start()
        await self.world.settle(10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.world.stop()

    async def until(self, check: Callable[[], bool], what: str, timeout: float = 60.0,
                    poll: float = 0.01) -> None:
        end = time.monotonic() + timeout
        while not check():
            if self.world.runner.finished:
                raise RuntimeError(f"the scripted guest stopped: {self.world.runner.crashed!r}")
            if time.monotonic() > end:
                raise TimeoutError(f"{what} did not happen in {timeout} s; guest errors "
                                   f"{list(self.world.guest_errors)}")
            await asyncio.sleep(poll)

    async def job(self, what: str, fn: Callable[[], Any], timeout: float) -> Any:
        job = self.world.guest_job(what, fn)
        # a slow poll: the figures are timed inside the guest, and a 1 ms poll would take CPU
        # from what is measured
        await self.until(lambda: job.done, f"guest job {what!r}", timeout, poll=0.05)
        if job.error is not None:
            raise job.error
        return job.result


async def passthrough_round(args: argparse.Namespace,
                            profile: cProfile.Profile | None = None) -> dict[str, Any]:
    async with Guest() as g:
        mapper = g.world.port_mapper()
        port = mapper.attach(ZERO)
        await g.until(lambda: port in g.world.guest_devices, f"enumeration on port {port}")
        dev = g.world.guest_devices[port].device
        drv = g.world.driver
        in_ep, out_ep = dev.endpoint(BULK_IN), dev.endpoint(BULK_OUT)
        small = drv.alloc.buffer(SMALL)

        def in512() -> None:
            td = in_ep.submit(length=SMALL, buffer=small, fetch_data=False)
            if not td.wait(timeout_ns=TIMEOUT_MS * 1_000_000).ok:
                raise RuntimeError(f"bulk IN: {td!r}")

        def measure() -> dict[str, Any]:
            with CpuShare() as cpu:
                figures = {
                    "bulk_in": guest_stream(drv, in_ep, args.size, args.depth, args.seconds),
                    "bulk_out": guest_stream(drv, out_ep, args.size, args.depth, args.seconds),
                    "in512": latency(in512, args.samples),
                    "get_status": latency(lambda: dev.control(*GET_STATUS), args.samples),
                }
            return {**figures, "cpu_percent": 100 * cpu.share}

        if profile is not None:
            profile.enable()
        try:
            figures = await g.job("measure", measure, 4 * args.seconds + args.samples + 120)
        finally:
            if profile is not None:
                profile.disable()
        figures["libusb_transfers"] = mapper.attached[port].device.transfers
        mapper.detach(port)
        return figures


def line(side: str, f: dict[str, Any]) -> str:
    return (f"{side}: in {f['bulk_in']:.1f} MB/s, out {f['bulk_out']:.1f} MB/s, 512-byte IN "
            f"{f['in512']['median']:.0f} us, GET_STATUS {f['get_status']['median']:.0f} us, "
            f"CPU {f['cpu_percent']:.0f}%")


def profile_text(profile: cProfile.Profile, top: int) -> str:
    """The top `top` by cumulative time, then the top 10 by own time (the greenlet guest makes
    cumulative times of guest code include what the loop ran meanwhile; own time does not)."""
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(10)
    text = out.getvalue()
    for prefix in sorted({str(ROOT) + "/", sys.prefix + "/", sys.base_prefix + "/"},
                         key=len, reverse=True):
        text = text.replace(prefix, "")
    return text


async def main(args: argparse.Namespace) -> dict[str, Any]:
    say(f"libusb {library.load()} ({'.'.join(map(str, usb1.getVersion()[:3]))})")
    rounds = []
    for n in range(1, args.rounds + 1):
        direct = direct_round(args)
        say(f"round {n}/{args.rounds} " + line("direct", direct))
        passthrough = await passthrough_round(args)
        gc.collect()              # each world holds 64 MiB of guest RAM: free it before the next
        say(f"round {n}/{args.rounds} " + line("passthrough", passthrough))
        rounds.append({"direct": direct, "passthrough": passthrough})
    profile = None
    if args.profile:
        say("profiling one more passthrough pass (not counted)")
        prof = cProfile.Profile()
        await passthrough_round(args, prof)
        profile = profile_text(prof, args.top)
    return {"rounds": rounds, "profile": profile, "libusb": library.load(),
            "libusb_version": list(usb1.getVersion()[:4]), "python": sys.version.split()[0]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="direct/passthrough pairs (default 3)")
    ap.add_argument("--seconds", type=float, default=2.0,
                    help="per throughput figure and side (default 2)")
    ap.add_argument("--size", type=int, default=65536, help="bytes per bulk transfer")
    ap.add_argument("--depth", type=int, default=4, help="bulk transfers in flight")
    ap.add_argument("--samples", type=int, default=200, help="round trips per latency figure")
    ap.add_argument("--profile", action="store_true",
                    help="profile one more passthrough pass (cProfile, by cumulative time)")
    ap.add_argument("--top", type=int, default=15, help="profile lines (default 15)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    result = asyncio.run(main(parse_args()))
    print("@@result " + json.dumps(result), flush=True)
