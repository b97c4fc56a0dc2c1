"""Reference figures: the guest on QEMU's own xHCI (qemu-xhci + usb-tablet + usb-storage).

The same measurements later run against xhcidbg's controller, so the two can be compared:
time from power-on to "all devices enumerated" (wall clock, and guest clock from /proc/uptime),
and the speed of a 256 MiB O_DIRECT read from the USB disk with dd.
"""
from __future__ import annotations

import asyncio
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .launch import SerialConsole, Vm

DISK_ID = "usbdisk"


def qemu_xhci_args(disk: Path) -> list[str]:
    """QEMU options for its own xHCI with a tablet and a raw disk image as USB mass storage."""
    return ["-device", "qemu-xhci,id=xhci",
            "-device", "usb-tablet,bus=xhci.0",
            "-drive", f"if=none,id={DISK_ID},file={disk},format=raw",
            "-device", f"usb-storage,bus=xhci.0,drive={DISK_ID}"]


def make_disk(path: Path, mib: int) -> Path:
    """A sparse raw image of `mib` MiB."""
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    return path


# Polls inside the guest (no round trip per try): a USB input device and the disk are present.
ENUMERATED = ("i=0; while [ $i -lt {tries} ]; do"
              " grep -q 'Bus=0003' /proc/bus/input/devices && [ -b {disk} ] && break;"
              " usleep 20000; i=$((i+1)); done;"
              " grep -q 'Bus=0003' /proc/bus/input/devices && [ -b {disk} ]"
              " && cut -d' ' -f1 /proc/uptime")


async def wait_enumerated(console: SerialConsole, disk: str = "/dev/sda",
                          timeout: float = 120.0) -> float:
    """Wait until a USB input device and `disk` exist; the guest's uptime (s) at that moment."""
    poll = ENUMERATED.format(tries=int(timeout / 0.02), disk=disk)
    result = await console.run(poll, timeout + 30)
    if not result.ok:
        raise TimeoutError(f"USB devices not enumerated within {timeout:g} s of guest time")
    return float(result.output.split()[0])


# Kernel log lines that mark the last step of enumerating each device.
ENUMERATED_LOG = re.compile(r"^\[\s*([\d.]+)\] "
                            r"(?:input: .* as /devices/\S*/usb\d|sd \S+ \[sd\w+\] Attached SCSI)",
                            re.M)


async def enumerated_at(console: SerialConsole) -> float | None:
    """Guest time (s) of the last USB input/disk attach in the kernel log: when enumeration
    really ended, independent of when anyone looked."""
    log = (await console.run("dmesg")).output
    times = [float(t) for t in ENUMERATED_LOG.findall(log)]
    return max(times) if times else None


@dataclass
class ReadSpeed:
    bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6


async def read_speed(console: SerialConsole, disk: str = "/dev/sda", mib: int = 256) -> ReadSpeed:
    """dd `mib` MiB from `disk` with O_DIRECT (no guest page cache), timed by the guest's clock."""
    # busybox dd here prints no timing line and date has no %N: /proc/uptime has 10 ms steps.
    result = await console.run(
        "s=$(cut -d' ' -f1 /proc/uptime);"
        f" dd if={disk} of=/dev/null bs=1M count={mib} iflag=direct || exit 1;"
        " e=$(cut -d' ' -f1 /proc/uptime); echo \"uptime $s $e\"", 600)
    records = re.search(r"^(\d+)\+\d+ records in", result.output, re.M)
    clock = re.search(r"^uptime ([\d.]+) ([\d.]+)", result.output, re.M)
    if not result.ok or not records or not clock:
        raise RuntimeError(f"dd failed (status {result.status}):\n{result.output}")
    seconds = max(float(clock.group(2)) - float(clock.group(1)), 0.01)
    return ReadSpeed(int(records.group(1)) << 20, seconds)


@dataclass
class Figures:
    shell_ready_s: float          # wall clock, QEMU start to guest shell
    enumerated_wall_s: float      # wall clock, QEMU start to all devices present
    enumerated_guest_s: float     # guest uptime when the guest saw all devices present
    enumerated_log_s: float | None  # guest time of the last attach message in the kernel log
    read: ReadSpeed
    total_wall_s: float           # QEMU start to QEMU exit after poweroff

    def lines(self) -> list[str]:
        return [f"shell ready:         {self.shell_ready_s:6.2f} s wall",
                f"devices enumerated:  {self.enumerated_wall_s:6.2f} s wall,"
                f" {self.enumerated_guest_s:.2f} s guest uptime"
                + (f" (kernel log: last device attached at {self.enumerated_log_s:.2f} s)"
                   if self.enumerated_log_s is not None else ""),
                f"dd {self.read.bytes >> 20} MiB O_DIRECT:  {self.read.seconds:6.2f} s,"
                f" {self.read.mb_per_s:.0f} MB/s",
                f"whole run:           {self.total_wall_s:6.2f} s wall"
                " (boot, enumerate, read, poweroff)"]


async def measure(read_mib: int = 256, progress: bool = True) -> Figures:
    """Boot the guest on QEMU's own xHCI and take the reference figures."""
    with tempfile.TemporaryDirectory(prefix="xhcidbg-ref-") as tmp:
        disk = make_disk(Path(tmp) / "disk.img", read_mib)
        started = time.monotonic()
        vm = await Vm.start(extra_args=qemu_xhci_args(disk), progress=progress)
        try:
            ready = time.monotonic() - started
            guest = await wait_enumerated(vm.console)
            enumerated = time.monotonic() - started
            logged = await enumerated_at(vm.console)
            read = await read_speed(vm.console, mib=read_mib)
            await vm.console.write("poweroff -f\n")
            await vm.wait_exit(60)
            total = time.monotonic() - started
        finally:
            await vm.stop()
    return Figures(ready, enumerated, guest, logged, read, total)


def main() -> None:
    figures = asyncio.run(measure())
    print("\n".join(figures.lines()))
