"""xhcidbg's USB/IP client against Linux's own (vhci-hcd), importing the same remote gadgets into
the same guest VM, side by side.

    python bench/usbip_chain.py                        # 3 rounds of each side, alternating
    python bench/usbip_chain.py --rounds 5 --save-reference  # and store the reference
    python bench/usbip_chain.py --rounds 1 --disk-mib 8 --repeats 2     # a quick look
    python bench/usbip_chain.py --rounds 1 --profile   # and where xhcidbg's time goes

Two kit VMs (TCG, one CPU each, ~15-30 s to boot each), as tests/test_usbip_chain.py has them:
  exporter  Gadget Zero's SourceSink (0525:a4a0, pattern zeros, as usbtest wants) and a
            mass-storage gadget (0525:a4a5, read-only, backed by a --disk-mib file in the VM's
            RAM) on dummy_hcd, bound to usbip-host and offered by Debian's usbipd, on guest port
            3240 forwarded to a free port of 127.0.0.1 here;
  guest     its USB controller is xhcidbg (a vfio-user server in this process, the Backend's
            port mapper importing usbip://127.0.0.1:PORT/BUSID), and it also has Linux's
            vhci-hcd, importing from the same usbipd over connections made from here to the
            guest's forwarded port 3240 and relayed to usbipd (guestkit.vhci_import: the
            guest half imports and attaches as `usbip attach` does).
Each round imports both gadgets with one client, measures, and detaches them (a device is
imported by one client at a time; usbip-host must show it available again), then the same with
the other client: xhcidbg, vhci, xhcidbg, vhci...  Measured in the guest:
  dd read     `dd if=/dev/sdX of=/dev/null bs=64k iflag=direct` over the whole disk (without
              O_DIRECT support in dd: caches dropped before), MB/s as dd reports it;
  usbtest     cases 1 (bulk OUT), 2 (bulk IN), 9 (chapter 9 control), 10 (queued control) and
              14 (vendor control) by default: each ioctl timed in the guest's Python
              (bench/usbip_chain_guest.py), --repeats times, the median in ms;
  import      seconds from the attach request until both devices are configured in the guest
              (and usbtest bound, and the disk's block device there);
  CPU busy    this process's CPU time over the wall time of dd and usbtest together: xhcidbg's
              own work on its side (some 70% on an idle machine), next to nothing on vhci's.
Medians over the rounds are printed side by side with the ratio xhcidbg/vhci (MB/s: below 1 is
slower; ms and s: above 1 is slower), then against bench/reference/usbip_chain.json
(--save-reference stores this run there).

The paths differ past the client: xhcidbg's guest talks to its controller over vfio-user and
xhcidbg talks TCP to the exporter's forwarded port; vhci's traffic leaves the guest through
virtio-net and a host forward of QEMU's user network, then a relay process here (outside this
process's CPU figure) to that same port.  (Not `usbip attach` in the guest: its outbound
connection would hold every message longer than a segment some 44 ms; see vhci_import.py.)
Everything (two TCG VMs, xhcidbg, the relays) shares this machine's CPUs: run by hand, never by
the tests, on an idle machine, and read the ratios.  xhcidbg runs with --busy-poll 0 here: on 2
cores its spinning after each vfio-user message took CPU from the VMs (queued control 132 ms
with the default 1000 us, 77 ms without; nothing was faster with it).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import report, side_by_side
from xhcidbg.guestkit.gadgets import Gadget, Gadgets, MassStorage, Pattern, SourceSink
from xhcidbg.guestkit.hostroot import ROOT
from xhcidbg.guestkit.launch import SerialConsole, Vm, VmExited
from xhcidbg.guestkit.qemu import QemuInstall
from xhcidbg.guestkit.testing import guest_kit
from xhcidbg.guestkit.usbip import (
    AVAILABLE,
    USBIP_PORT,
    UsbipExporter,
    UsbipTools,
    busid_of,
    ensure_usbip_tools,
)
from xhcidbg.guestkit.vhci_import import VhciImporter
from xhcidbg.vfio_user.server import BUSY_POLL_US
from xhcidbg.vm.backend import Backend

GUEST_SCRIPT = Path(__file__).with_name("usbip_chain_guest.py")
ZERO = Gadget("zero", [SourceSink(pattern=Pattern.ZEROS)], product="Gadget Zero",
              serial="xhcidbg-bench-zero")
DISK_SERIAL = "xhcidbg-bench-disk"
DISK_FILE = "/tmp/xhcidbg-bench-disk.img"       # in the exporter's host tree (its RAM)
SIDES = ("xhcidbg", "vhci")
DEFAULT_CASES = [1, 2, 9, 10, 14]


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def poll(condition: str, timeout: float) -> str:
    """Kit-shell commands that wait until `condition` holds (status 1 if it never does)."""
    return (f"i=0; until {condition}; do i=$((i+1)); [ $i -lt {int(timeout / 0.05)} ] ||"
            " exit 1; usleep 50000; done")


def with_serial(serial: str) -> str:
    """Kit-shell commands printing the configured USB device(s) whose serial is `serial`."""
    return ("for d in /sys/bus/usb/devices/*; do"
            f" [ \"$(cat $d/serial 2>/dev/null)\" = {shlex.quote(serial)} ] &&"
            " [ -n \"$(cat $d/bConfigurationValue 2>/dev/null)\" ] && echo ${d##*/}; done; true")


async def boot(what: str, **kwargs: Any) -> Vm:
    """A kit VM, booted with the kit's progress lines; a second try if TCG was too slow for
    the kernel's early timer check."""
    for attempt in (1, 2):
        progress(f"booting the {what} VM (TCG, about 15-30 s)")
        t0 = time.monotonic()
        try:
            vm = await Vm.start(progress=True, host_root=True, **kwargs)
            progress(f"{what} VM up after {time.monotonic() - t0:.1f} s")
            return vm
        except VmExited as e:
            if attempt == 2:
                raise
            progress(f"the {what} VM died while booting ({str(e).splitlines()[-1].strip()});"
                     " again")
    raise AssertionError("unreachable")


class Bench:
    def __init__(self, args: argparse.Namespace, folder: Path):
        self.args = args
        self.folder = folder
        self.exporter_vm: Vm | None = None
        self.guest: Vm | None = None
        self.backend: Backend | None = None
        self.importer: VhciImporter | None = None
        self.profile = ""
        self.exporter: UsbipExporter | None = None
        self.tools: UsbipTools | None = None
        self.busids: dict[str, str] = {}        # "zero" / "disk" -> busid on the exporter
        self.direct: bool | None = None         # does the guest's dd take iflag=direct
        self.said: list[str] = []

    # ---- the two VMs ----------------------------------------------------------------------
    @property
    def xsh(self) -> SerialConsole:
        assert self.exporter_vm is not None
        return self.exporter_vm.console

    @property
    def gsh(self) -> SerialConsole:
        assert self.guest is not None
        return self.guest.console

    @property
    def url_host(self) -> tuple[str, int]:
        assert self.exporter is not None
        return self.exporter.address

    async def setup(self, qemu: QemuInstall, kernel: os.PathLike[str],
                    initrd: os.PathLike[str]) -> None:
        a = self.args
        self.exporter_vm = await boot("exporter", qemu=qemu, kernel=kernel, initrd=initrd,
                                      memory_mib=256 + a.disk_mib,
                                      forward_tcp={USBIP_PORT: 0},
                                      log=self.folder / "exporter.log")
        progress("exporter: dummy_hcd, the gadgets, usbip-host and usbipd")
        gadgets = Gadgets(self.exporter_vm)
        await gadgets.load(udcs=2)
        # The exporter's own usb-storage would take the disk's interface once usbip-host
        # configures it again; usbtest is never loaded there.
        await self.xsh.run("if [ -d /sys/module/usb_storage ]; then rmmod usb_storage; fi",
                           check=True)
        await self.xsh.run(f"dd if=/dev/zero of={ROOT}{DISK_FILE} bs=1M count={a.disk_mib}"
                           " 2>&1", 120, check=True)
        disk = Gadget("disk", [MassStorage(file=DISK_FILE, read_only=True)],
                      product="Bench Disk", serial=DISK_SERIAL)
        self.exporter = UsbipExporter(self.exporter_vm, self.tools)
        await self.exporter.start()
        for name, gadget in (("zero", ZERO), ("disk", disk)):
            plugged = await gadgets.plug(gadget)
            self.busids[name] = await self.exporter.bind(plugged)
            progress(f"exporter: {gadget.product} on {busid_of(plugged)} at "
                     f"{plugged.speed_mbps} Mb/s, bound to usbip-host")
        host, port = self.url_host
        progress(f"usbipd reachable here at {host}:{port}")
        self.backend = Backend(self.folder / "xhci.sock", [], busy_poll_us=a.busy_poll)
        await self.backend.start()
        self.backend.port_mapper().remote.say = self.said.append
        self.guest = await boot("guest", qemu=qemu, kernel=kernel, initrd=initrd,
                                memory_mib=a.memory, devices=[self.backend.device_arg],
                                forward_tcp={USBIP_PORT: 0},
                                log=self.folder / "guest.log")
        self.importer = VhciImporter(self.guest, self.guest.forwarded_tcp[USBIP_PORT])
        await self.gsh.run("modprobe -a usbtest vhci-hcd usb-storage sd_mod", check=True)

    async def close(self) -> None:
        if self.importer is not None:
            self.importer.close()
        if self.guest is not None:
            progress("stopping the guest VM")
            await self.guest.stop()
        if self.backend is not None:
            self.backend.close()
        if self.exporter_vm is not None:
            progress("stopping the exporter VM")
            await self.exporter_vm.stop()

    # ---- importing with either client -----------------------------------------------------
    def urls(self) -> list[str]:
        host, port = self.url_host
        return [f"usbip://{host}:{port}/{b}" for b in self.busids.values()]

    async def attach_xhcidbg(self) -> None:
        assert self.backend is not None
        remote = self.backend.port_mapper().remote
        start = len(self.said)
        for url in self.urls():
            self.backend.port_mapper().attach(url)
        deadline = time.monotonic() + 30
        while not all(remote.find(u) for u in self.urls()):
            if time.monotonic() > deadline or not remote.importing:
                raise RuntimeError(f"xhcidbg did not import {self.urls()}: "
                                   f"{self.said[start:]}")
            await asyncio.sleep(0.02)

    async def detach_xhcidbg(self) -> None:
        assert self.backend is not None
        remote = self.backend.port_mapper().remote
        for port in list(remote.attached):
            remote.detach(port)

    def usbip(self, *args: str) -> str:
        assert self.tools is not None
        return self.tools.command("usbip", *args)

    async def listen_vhci(self) -> None:
        assert self.importer is not None
        await self.importer.listen(self.url_host[1], list(self.busids.values()))

    async def attach_vhci(self) -> None:
        assert self.importer is not None
        await self.importer.connect()

    async def detach_vhci(self) -> None:
        assert self.guest is not None
        ports = (await self.guest.host.run(self.usbip("port"), 60, check=True)).output
        for port in re.findall(r"Port (\d+): <Port in Use>", ports):
            await self.guest.host.run(self.usbip("detach", "-p", port), 60, check=True)

    async def ready(self, timeout: float = 60.0) -> tuple[str, str]:
        """Both devices configured in the guest, usbtest on Gadget Zero, the disk's block
        device there: (Gadget Zero's usb name, the disk's block device name)."""
        names = {}
        for name, serial in (("zero", ZERO.serial), ("disk", DISK_SERIAL)):
            found = f"[ -n \"$({with_serial(serial)})\" ]"
            waited = await self.gsh.run(poll(found, timeout) + f"; {with_serial(serial)}",
                                        timeout + 30)
            if not waited.ok or len(waited.output.split()) != 1:
                raise RuntimeError(f"the guest has no {serial}: {waited.output}"
                                   f"{self.said[-5:]}")
            names[name] = waited.output.split()[0]
        zero, disk = names["zero"], names["disk"]
        await self.gsh.run(poll(f"[ -e /sys/bus/usb/drivers/usbtest/{zero}:1.0 ]", timeout),
                           timeout + 30, check=True)
        blocks = f"/sys/bus/usb/devices/{disk}/{disk}:1.0/host*/target*/*/block/*"
        block = await self.gsh.run(poll(f"[ -e \"$(echo {blocks})\" ]", timeout)
                                   + f" && basename {blocks}", timeout + 30)
        if not block.ok:
            raise RuntimeError(f"no block device for {disk}: {block.output}")
        return zero, block.output.strip()

    async def released(self, timeout: float = 60.0) -> None:
        """Both devices gone from the guest and available again on the exporter."""
        for serial in (ZERO.serial, DISK_SERIAL):
            gone = f"[ -z \"$({with_serial(serial)})\" ]"
            if not (await self.gsh.run(poll(gone, timeout), timeout + 30)).ok:
                raise RuntimeError(f"the guest still has {serial}")
        assert self.exporter is not None
        deadline = time.monotonic() + timeout
        for busid in self.busids.values():
            while (status := await self.exporter.status(busid)) != AVAILABLE:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{busid} is still in state {status} on the exporter")
                await asyncio.sleep(0.1)

    # ---- what is measured -----------------------------------------------------------------
    async def dd(self, sd: str) -> float:
        """MB/s (10^6 bytes a second, as dd says) reading the whole disk once."""
        count = self.args.disk_mib * 16
        assert self.guest is not None
        # this machine's dd (in the guest's chroot): busybox's prints no byte count or time
        if self.direct is None:
            probe = await self.guest.host.run(f"dd if=/dev/{sd} of=/dev/null bs=64k count=1"
                                              " iflag=direct 2>&1")
            self.direct = probe.ok
            progress(f"  guest dd: {'iflag=direct' if self.direct else 'no iflag=direct; '}"
                     f"{'' if self.direct else 'caches dropped before each run'}")
        flag = " iflag=direct" if self.direct else ""
        if not self.direct:
            await self.gsh.run("sync; echo 3 > /proc/sys/vm/drop_caches", check=True)
        ran = await self.guest.host.run(f"dd if=/dev/{sd} of=/dev/null bs=64k count={count}"
                                        f"{flag} 2>&1", 600, check=True)
        match = re.search(r"(\d+) bytes .*copied, ([\d.]+) s", ran.output)
        if not match or int(match.group(1)) != count << 16:
            raise RuntimeError(f"dd read short or said something else:\n{ran.output}")
        return int(match.group(1)) / float(match.group(2)) / 1e6

    async def usbtest(self) -> dict[str, float]:
        """Per case, the median ms of one ioctl."""
        a = self.args
        assert self.guest is not None
        command = shlex.join([
            self.guest.host.python_path, str(GUEST_SCRIPT), "--iterations", str(a.iterations),
            "--length", str(a.length), "--sglen", str(a.sglen), "--repeats", str(a.repeats),
            *map(str, a.cases)])
        ran = await self.guest.host.run(command, 900)
        for line in ran.output.splitlines():
            if line.startswith("@@ "):
                progress(f"    {line[3:]}")
        for line in ran.output.splitlines():
            if line.startswith("@@result "):
                result = json.loads(line[len("@@result "):])
                bad = {c: r["status"] for c, r in result.items() if r["status"]}
                if bad:
                    log = (await self.gsh.run("dmesg | tail -n 20")).output
                    raise RuntimeError(f"usbtest cases failed: {bad}\n{log}")
                return {c: statistics.median(r["seconds"]) * 1e3 for c, r in result.items()}
        raise RuntimeError(f"the guest script ended ({ran.status}) without a result:\n"
                           f"{ran.output}")

    async def side(self, name: str, attach: Callable[[], Awaitable[None]],
                   detach: Callable[[], Awaitable[None]],
                   prepare: Callable[[], Awaitable[None]] | None = None) -> dict[str, float]:
        if prepare is not None:         # untimed: what a client does once, before importing
            await prepare()
        progress(f"  {name}: importing both gadgets")
        t0 = time.monotonic()
        await attach()
        try:
            zero, sd = await self.ready()
            imported = time.monotonic() - t0
            progress(f"  {name}: ready after {imported:.1f} s (Gadget Zero {zero}, disk {sd});"
                     f" dd then usbtest")
            await self.gsh.run("dmesg -c > /dev/null")
            wall, cpu = time.monotonic(), time.process_time()
            mbps = await self.dd(sd)
            progress(f"    dd read {mbps:.2f} MB/s")
            cases = await self.usbtest()
            busy = 100 * (time.process_time() - cpu) / (time.monotonic() - wall)
        finally:
            await detach()
            await self.released()
        figures = {"dd read": mbps, **{f"usbtest {c}": ms for c, ms in cases.items()},
                   "import": imported, "CPU busy": busy}
        return figures

    async def rounds(self) -> list[dict[str, dict[str, float]]]:
        done = []
        for n in range(1, self.args.rounds + 1):
            progress(f"round {n} of {self.args.rounds}")
            one = {"xhcidbg": await self.side("xhcidbg", self.attach_xhcidbg,
                                              self.detach_xhcidbg),
                   "vhci": await self.side("vhci", self.attach_vhci, self.detach_vhci,
                                           self.listen_vhci)}
            done.append(one)
        if self.args.profile:
            self.profile = await self.profiled()
        return done

    async def profiled(self) -> str:
        """One more xhcidbg pass (not counted) with this process under cProfile."""
        progress("  xhcidbg under cProfile: importing, dd then usbtest (not counted)")
        await self.attach_xhcidbg()
        prof = cProfile.Profile()
        try:
            _, sd = await self.ready()
            prof.enable()
            await self.dd(sd)
            await self.usbtest()
        finally:
            prof.disable()
            await self.detach_xhcidbg()
            await self.released()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(self.args.top)
        return text.getvalue()


def labels(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(key in a side's figures, its label in the table, its unit), in order."""
    names = {1: "bulk OUT", 2: "bulk IN", 9: "ch9 control", 10: "queued control",
             14: "vendor control"}
    cases = [(f"usbtest {c}", f"usbtest {c} {names.get(c, '')}".rstrip(), "ms")
             for c in args.cases]
    return [("dd read", f"dd read {args.disk_mib} MiB", "MB/s"), *cases,
            ("import", "import until ready", "s"), ("CPU busy", "this process CPU busy", "%")]


async def run(args: argparse.Namespace) -> tuple[list[dict[str, dict[str, float]]], str]:
    progress("getting the guest kit (QEMU, kernel, initramfs) and the USB/IP tools "
             "(cached after the first time)")
    qemu, kernel, initrd = await asyncio.to_thread(guest_kit)
    tools = await asyncio.to_thread(ensure_usbip_tools)
    with tempfile.TemporaryDirectory(prefix="xhcidbg-bench-usbip-") as folder:
        bench = Bench(args, Path(folder))
        bench.tools = tools
        try:
            await bench.setup(qemu, kernel, initrd)
            return await bench.rounds(), bench.profile
        except BaseException:
            for name in ("exporter.log", "guest.log"):
                log = Path(folder) / name
                if log.exists():
                    tail = log.read_bytes()[-3000:].decode(errors="replace")
                    print(f"\n--- the end of {name} ---\n{tail}", file=sys.stderr)
            raise
        finally:
            with contextlib.suppress(Exception):
                await bench.close()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  .venv/bin/python bench/usbip_chain.py --rounds 3 --repeats 5")
    ap.add_argument("--rounds", type=int, default=3,
                    help="xhcidbg/vhci pairs, alternating (default 3)")
    ap.add_argument("--disk-mib", type=int, default=32,
                    help="size of the remote disk, read whole by dd (default 32)")
    ap.add_argument("--cases", type=int, nargs="+", default=DEFAULT_CASES,
                    help=f"usbtest cases (default {' '.join(map(str, DEFAULT_CASES))})")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed ioctls per usbtest case and side (default 5)")
    ap.add_argument("--iterations", type=int, default=16,
                    help="usbtest's iterations per ioctl (default 16)")
    ap.add_argument("--length", type=int, default=4096,
                    help="usbtest's length: bytes per bulk or vendor control transfer "
                         "(default 4096)")
    ap.add_argument("--sglen", type=int, default=4,
                    help="usbtest's sglen: control requests in flight for case 10 (default 4)")
    ap.add_argument("--memory", type=int, default=512,
                    help="MiB of guest VM memory (default 512)")
    ap.add_argument("--busy-poll", type=int, default=0, metavar="US",
                    help="xhcidbg vm's --busy-poll: how long the vfio-user server keeps reading"
                         f" after a message (default 0 here, not xhcidbg's {BUSY_POLL_US}: with"
                         " two VMs on a machine of few cores, spinning takes the CPU they need)")
    ap.add_argument("--profile", action="store_true",
                    help="one more xhcidbg pass under cProfile, not counted")
    ap.add_argument("--top", type=int, default=25, help="profile lines to print (default 25)")
    ap.add_argument("--save-reference", action="store_true",
                    help="store this run as bench/reference/usbip_chain.json")
    args = ap.parse_args()
    rounds, profile = asyncio.run(run(args))
    figures, units = side_by_side(rounds, labels(args), SIDES, SIDES)
    report("usbip_chain", figures, units, sys.argv, args.save_reference)
    if profile:
        print(f"\nxhcidbg's pass under cProfile (this process, top {args.top} by own time):")
        print(profile)


if __name__ == "__main__":
    main()
