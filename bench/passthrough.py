"""The port mapper's cost: a real USB gadget through python-libusb1 directly, and through
xhcidbg's controller and port mapper, side by side, in the same VM.

    python bench/passthrough.py                       # 3 rounds of each side, alternating
    python bench/passthrough.py --rounds 5 --seconds 3 --save-reference     # store as reference
    python bench/passthrough.py --rounds 1 --profile  # and where the passthrough time goes

Boots the guest kit's VM (TCG, one CPU, ~15-30 s) with this machine's root, plugs Gadget Zero's
SourceSink (0525:a4a0, high speed on dummy_hcd, bulk 0x81 IN / 0x02 OUT, pattern ANY so the
sink takes any data), and runs bench/passthrough_guest.py there.  It alternates, round by round:
  direct       python-libusb1 on the gadget (libusb loaded as xhcidbg/passthrough/library.py
               loads it), async transfers for throughput, the synchronous calls for latency;
  passthrough  the scripted guest (an in-process controller, the session's port mapper), timed
               by the guest from submitting a TD to its completion event.
Figures: bulk IN and OUT MB/s (--size byte transfers, --depth in flight, for --seconds), and
the median and p90 of --samples round trips of one 512-byte bulk IN and of one GET_STATUS,
and how busy the process kept its CPU meanwhile (near 100%: CPU-bound, not waiting).
Medians over the rounds are printed side by side with the ratio passthrough/direct, then
against bench/reference/passthrough.json (--save-reference stores this run there).

Both sides share the VM's one TCG CPU with the gadget's kernel half (dummy_hcd moves the data
in software): the same device for both, not what real hardware would do, so read the ratios.
Run by hand (never by the tests), on an idle machine.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import report, side_by_side
from xhcidbg.guestkit.gadgets import Gadget, Gadgets, Pattern, SourceSink
from xhcidbg.guestkit.launch import Vm, VmExited
from xhcidbg.guestkit.testing import guest_kit

GUEST_SCRIPT = Path(__file__).with_name("passthrough_guest.py")
ZERO = Gadget("zero", [SourceSink(pattern=Pattern.ANY)], product="Gadget Zero",
              serial="xhcidbg-bench")
SIDES = ("direct", "passthrough")
# (key in the guest's figures, its label, its unit): what the table shows, in order
FIGURES = [
    (("bulk_in",), "bulk IN", "MB/s"),
    (("bulk_out",), "bulk OUT", "MB/s"),
    (("in512", "median"), "512-byte IN median", "us"),
    (("in512", "p90"), "512-byte IN p90", "us"),
    (("get_status", "median"), "GET_STATUS median", "us"),
    (("get_status", "p90"), "GET_STATUS p90", "us"),
    (("cpu_percent",), "process CPU busy", "%"),     # of the wall time, all figures together
]


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def pick(figures: dict[str, Any], key: tuple[str, ...]) -> float:
    value: Any = figures
    for part in key:
        value = value[part]
    return float(value)


async def echo_progress(vm: Vm, seen: int) -> None:
    """Print the guest script's `@@ ` lines as they reach the serial console (read here, so
    nothing extra runs in the VM while it measures)."""
    while True:
        await asyncio.sleep(0.5)
        text = vm.console.transcript
        if len(text) < seen:              # the console dropped what was consumed
            seen = 0
        lines = text[seen:].split("\n")
        complete, seen = lines[:-1], seen + sum(len(x) + 1 for x in lines[:-1])
        for x in complete:
            if x.startswith("@@ "):
                progress(f"  vm: {x[3:]}")


async def run_in_vm(args: argparse.Namespace) -> dict[str, Any]:
    progress("getting the guest kit (QEMU, kernel, initramfs; cached after the first time)")
    qemu, kernel, initrd = await asyncio.to_thread(guest_kit)
    for attempt in (1, 2):
        progress("booting the gadget VM (TCG, about 15-30 s)")
        t0 = time.monotonic()
        try:
            vm = await Vm.start(qemu=qemu, kernel=kernel, initrd=initrd, progress=True,
                                host_root=True, memory_mib=args.memory)
            break
        except VmExited as e:
            # a loaded host can make TCG too slow for the kernel's early timer check
            if attempt == 2:
                raise
            progress(f"the VM died while booting ({str(e).splitlines()[-1].strip()}); again")
    try:
        progress(f"VM up after {time.monotonic() - t0:.1f} s; loading dummy_hcd")
        usb = Gadgets(vm)
        await usb.load(udcs=1)
        plugged = await usb.plug(ZERO)
        progress(f"plugged SourceSink 0525:a4a0 on bus {plugged.busnum} address "
                 f"{plugged.devnum} at {plugged.speed_mbps} Mb/s")
        guest_args = ["--rounds", str(args.rounds), "--seconds", str(args.seconds),
                      "--size", str(args.size), "--depth", str(args.depth),
                      "--samples", str(args.samples), "--top", str(args.top)]
        if args.profile:
            guest_args.append("--profile")
        command = shlex.join([sys.executable, str(GUEST_SCRIPT), *guest_args])
        per_round = 2 * (2 * args.seconds + 2 * args.samples * 0.005 + 5)
        progress(f"running {args.rounds} rounds of direct then passthrough in the VM "
                 f"(roughly {per_round * args.rounds:.0f} s or more under TCG)")
        echo = asyncio.create_task(echo_progress(vm, len(vm.console.transcript)))
        try:
            result = await vm.host.run(command, timeout=args.timeout)
        finally:
            echo.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await echo
        for x in result.output.splitlines():
            if x.startswith("@@result "):
                if result.status != 0:
                    break
                return json.loads(x[len("@@result "):])
        raise RuntimeError(f"the guest script ended ({result.status}) without a result:\n"
                           f"{result.output}")
    finally:
        progress("stopping the VM")
        await vm.stop()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  .venv/bin/python bench/passthrough.py --rounds 3 --profile")
    ap.add_argument("--rounds", type=int, default=3,
                    help="direct/passthrough pairs, alternating (default 3)")
    ap.add_argument("--seconds", type=float, default=2.0,
                    help="per throughput figure and side (default 2)")
    ap.add_argument("--size", type=int, default=65536,
                    help="bytes per bulk throughput transfer (default 65536)")
    ap.add_argument("--depth", type=int, default=4,
                    help="bulk transfers in flight (default 4)")
    ap.add_argument("--samples", type=int, default=200,
                    help="round trips per latency figure (default 200)")
    ap.add_argument("--profile", action="store_true",
                    help="profile one more passthrough pass in the VM (cProfile, not counted)")
    ap.add_argument("--top", type=int, default=15, help="profile lines to print (default 15)")
    ap.add_argument("--memory", type=int, default=768,
                    help="MiB of VM memory (default 768: each world has 64 MiB of guest RAM)")
    ap.add_argument("--timeout", type=float, default=1800.0,
                    help="seconds the VM part may take (default 1800)")
    ap.add_argument("--save-reference", action="store_true",
                    help="store this run as bench/reference/passthrough.json")
    args = ap.parse_args()
    result = asyncio.run(run_in_vm(args))
    figures, units = side_by_side(result["rounds"], FIGURES, SIDES,
                                  ("passthrough", "direct"), pick)
    version = ".".join(map(str, result["libusb_version"][:3]))
    print(f"  (libusb {version} from {result['libusb']}, Python {result['python']}; "
          f"passthrough made {result['rounds'][-1]['passthrough']['libusb_transfers']} "
          f"libusb transfers in its last round)")
    report("passthrough", figures, units, sys.argv, args.save_reference)
    if result["profile"]:
        print(f"\nprofile of one passthrough pass in the VM (cProfile, top {args.top} by "
              f"cumulative time; the guest runs in a greenlet on the same thread, so its waits "
              f"include the loop's work):")
        print(result["profile"])


if __name__ == "__main__":
    main()
