"""A real Linux guest on xhcidbg versus the same guest on QEMU's own xHCI, side by side.

    python bench/linux_figures.py               # both setups, one run each
    python bench/linux_figures.py --runs 3      # medians of 3
    python bench/linux_figures.py --profile     # and where the Python time goes during dd

Same QEMU, same kernel, same initramfs, same sparse 256 MiB disk image, same guest commands:
- reference: `-device qemu-xhci` with `usb-tablet` and `usb-storage` (QEMU's own controller);
- xhcidbg:   `-device vfio-user-pci` served by xhcidbg with its Tablet and StorageDevice.
Figures: boot to "all devices enumerated" (a USB input device and /dev/sda present; guest
uptime and wall clock), and `dd` of 256 MiB with O_DIRECT from the stick (guest clock).  For
xhcidbg also: the cost of one guest MMIO read round trip (back-to-back register reads from the
xhci debugfs dump) and the CPU each side spent during dd.  Run by hand on an idle machine: the
figures depend on the host.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench._report as _report
from xhcidbg.devices import StorageDevice, Tablet
from xhcidbg.guestkit import ensure_initramfs, ensure_kernel, ensure_qemu
from xhcidbg.guestkit.launch import Vm
from xhcidbg.guestkit.reference import make_disk, qemu_xhci_args, read_speed, wait_enumerated
from xhcidbg.vm import Backend

READ_MIB = 256
HZ = os.sysconf("SC_CLK_TCK")
DD = f"dd {READ_MIB} MiB O_DIRECT"
UNITS = {"enumerated, guest clock": "s", "enumerated, wall clock": "s",
         "shell ready, wall clock": "s", f"{DD}, cold host cache": "MB/s",
         f"{DD}, warm host cache": "MB/s"}


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def common(vm, started: float) -> dict:
    """The figures both setups share: boot to enumerated, then dd twice (the first read of
    the sparse image fills the host's page cache; QEMU and xhcidbg both read through it)."""
    out = {"shell ready, wall clock": time.monotonic() - started}
    out["enumerated, guest clock"] = await wait_enumerated(vm.console)
    out["enumerated, wall clock"] = time.monotonic() - started
    out[f"{DD}, cold host cache"] = (await read_speed(vm.console, mib=READ_MIB)).mb_per_s
    return out


async def measure_qemu_xhci(kit) -> dict:
    qemu, kernel, initrd = kit
    with tempfile.TemporaryDirectory(prefix="xhcidbg-bench-") as tmp:
        disk = make_disk(Path(tmp) / "disk.img", READ_MIB)
        started = time.monotonic()
        vm = await Vm.start(extra_args=qemu_xhci_args(disk), qemu=qemu, kernel=kernel,
                            initrd=initrd, progress=False)
        try:
            out = await common(vm, started)
            out[f"{DD}, warm host cache"] = (await read_speed(vm.console, mib=READ_MIB)).mb_per_s
        finally:
            await vm.stop()
    return out


async def measure_xhcidbg(kit, profile: bool) -> dict:
    qemu, kernel, initrd = kit
    with tempfile.TemporaryDirectory(prefix="xhcidbg-bench-") as tmp:
        disk = make_disk(Path(tmp) / "disk.img", READ_MIB)
        backend = Backend(Path(tmp) / "xhci.sock", [Tablet(), StorageDevice(disk)])
        await backend.start()
        started = time.monotonic()
        vm = await Vm.start(devices=[backend.device_arg], qemu=qemu, kernel=kernel,
                            initrd=initrd, progress=False)
        try:
            out = await common(vm, started)
            server = backend.server
            hot_before = [len(d) for d in server.stats.bar0_ns]
            cpu_py, cpu_qemu, wall = own_cpu_seconds(), cpu_seconds_of(vm.process.pid), \
                time.monotonic()
            speed = await read_speed(vm.console, mib=READ_MIB)
            wall = time.monotonic() - wall
            out[f"{DD}, warm host cache"] = speed.mb_per_s
            out["dd wall s"] = wall
            out["python cpu during dd"] = (own_cpu_seconds() - cpu_py) / wall
            out["qemu cpu during dd"] = (cpu_seconds_of(vm.process.pid) - cpu_qemu) / wall
            out["bar0 reads/writes during dd"] = [
                len(d) - b for d, b in zip(server.stats.bar0_ns, hot_before, strict=True)]

            # One guest MMIO read round trip: the debugfs register dump reads back to back.
            await vm.console.run("mount -t debugfs none /sys/kernel/debug")
            since = len(server.stats.bar0_read_arrivals)
            await vm.console.run("for i in $(seq 20); do"
                                 " cat /sys/kernel/debug/usb/xhci/*/reg-op >/dev/null; done")
            gaps = server.stats.read_round_trips(since)
            out["mmio read round trip us"] = statistics.median(gaps) / 1000 if gaps else 0.0
            out["mmio reads measured"] = len(gaps)
            summary = server.stats.summary()
            out["python per BAR0 read us"] = summary.get("BAR0_READ", {}).get("median_us", 0.0)
            out["python per BAR0 write us"] = summary.get("BAR0_WRITE", {}).get("median_us", 0.0)

            if profile:
                prof = cProfile.Profile()
                prof.enable()
                await read_speed(vm.console, mib=READ_MIB)
                prof.disable()
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
                out["profile"] = text.getvalue()
        finally:
            await vm.stop()
            backend.close()
    return out


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


async def main_async(args) -> None:
    kit = await asyncio.to_thread(lambda: (ensure_qemu(), ensure_kernel(), ensure_initramfs()))
    qemu_runs, ours = [], []
    for i in range(args.runs):
        qemu_runs.append(await measure_qemu_xhci(kit))
        ours.append(await measure_xhcidbg(kit, args.profile and i == args.runs - 1))
        print(f"run {i + 1}/{args.runs} done", file=sys.stderr, flush=True)

    reference = {k: median_of(qemu_runs, k) for k in UNITS}
    figures = {k: median_of(ours, k) for k in UNITS}
    # The reference of this comparison is QEMU's own xHCI measured in this same run.
    with tempfile.TemporaryDirectory() as tmp:
        _report.REFERENCE_DIR = Path(tmp)
        (Path(tmp) / "linux_vs_qemu_xhci.json").write_text(json.dumps({"figures": reference}))
        print(f"\nQEMU {kit[0].version}, TCG; reference = qemu-xhci + usb-tablet + usb-storage, "
              f"this run = xhcidbg over vfio-user (tablet + storage); medians of {args.runs}")
        _report.report("linux_vs_qemu_xhci", figures, UNITS, sys.argv, save=False)

    last = ours[-1]
    boot_ratio = figures["enumerated, guest clock"] / reference["enumerated, guest clock"]
    print(f"\nboot to enumerated: {boot_ratio:.2f}x QEMU's time (aim <= 1.0x, floor 1.5x)")
    for cache in ("cold", "warm"):
        key = f"{DD}, {cache} host cache"
        print(f"dd throughput, {cache}: {figures[key] / reference[key]:.2f}x QEMU's"
              " (aim >= 1.0x, floor 0.5x)")
    print(f"\nxhcidbg during the warm dd (last run): {last['dd wall s']:.2f} s wall; CPU busy: "
          f"xhcidbg {last['python cpu during dd'] * 100:.0f}%, "
          f"QEMU {last['qemu cpu during dd'] * 100:.0f}% (of one core)")
    reads, writes = last["bar0 reads/writes during dd"]
    print(f"  guest BAR0 accesses: {reads} reads, {writes} writes "
          f"({(reads + writes) / READ_MIB:.1f} per MiB)")
    print(f"one guest MMIO read round trip: median {last['mmio read round trip us']:.1f} us "
          f"over {last['mmio reads measured']} reads;\n  xhcidbg's handling of one (median, "
          f"including the reply's send(), which wakes QEMU): {last['python per BAR0 read us']:.1f}"
          f" us per read, {last['python per BAR0 write us']:.1f} us per posted write")
    if "profile" in last:
        print("\nwhere xhcidbg's time goes during dd (cProfile, by own time):")
        print(last["profile"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="runs of each setup (medians)")
    ap.add_argument("--profile", action="store_true",
                    help="profile xhcidbg (cProfile) during a second dd in the last run")
    args = ap.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
