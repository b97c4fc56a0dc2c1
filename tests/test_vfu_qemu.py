"""End to end: the xHCI controller served over vfio-user to a real QEMU running a real Linux guest.

Each test boots the guest kit's kernel and initramfs under QEMU (TCG) with our server as its
`vfio-user-pci` device and a virtual tablet on a root port, then checks from inside the guest that
xhci_hcd bound to the function, registered both root hubs and enumerated the tablet - which needs
interrupts - in each interrupt mode: MSI-X, MSI and INTx.
"""
from __future__ import annotations

import asyncio
import re
import statistics

import pytest

from xhcidbg.devices.tablet import Tablet
from xhcidbg.emu.controller import XhciController
from xhcidbg.emu.timing import Scheduler
from xhcidbg.guestkit import launch
from xhcidbg.guestkit.testing import guest_kit as fetch_guest_kit
from xhcidbg.session import LoopClock
from xhcidbg.vfio_user import VfioUserServer
from xhcidbg.vfio_user.protocol import Command

pytestmark = pytest.mark.e2e

# The function as the guest finds it by class code (the PCI address depends on the machine).
FIND_FUNCTION = "d=$(grep -l 0x0c0330 /sys/bus/pci/devices/*/class | head -1); d=${d%/class}"


@pytest.fixture(scope="module")
def guest_kit():
    return fetch_guest_kit()     # skips only when offline, and never under CI=true


def run_guest(tmp_path, guest_kit, script, *, append: str = "", extra_args=(), **server_options):
    """Serve a controller with a tablet attached, boot the guest, run `script(vm, server)`,
    stop the guest; returns (script result, server) after the session has ended."""
    qemu, kernel, initrd = guest_kit

    async def main():
        hc = XhciController(scheduler=Scheduler())
        hc.attach(Tablet())
        ended = asyncio.Event()
        server = VfioUserServer(hc, str(tmp_path / "xhci.sock"), on_disconnect=ended.set,
                                **server_options)
        await server.start()
        clock = LoopClock(hc.scheduler, asyncio.get_running_loop())    # the controller's timers
        try:
            vm = await launch.Vm.start(devices=[server.device_arg], append=append, qemu=qemu,
                                       extra_args=extra_args,
                                       kernel=kernel, initrd=initrd, progress=False,
                                       log=tmp_path / "serial.log")
            try:
                result = await script(vm, server)
            finally:
                await vm.stop()
            await asyncio.wait_for(ended.wait(), 15)
            return result, server
        finally:
            clock.close()
            server.close()

    return asyncio.run(main())


async def wait_for_tablet(vm, timeout=60.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        r = await vm.console.run("cat /proc/bus/input/devices")
        if "xhcidbg USB Tablet" in r.output:
            return
        if asyncio.get_running_loop().time() > deadline:
            dmesg = (await vm.console.run("dmesg | tail -40")).output
            raise AssertionError(f"the tablet was not enumerated:\n{dmesg}")
        await asyncio.sleep(0.5)


async def inspect(vm, server):
    await wait_for_tablet(vm)
    out = {}
    for name, cmd in {
        "dmesg": "dmesg",
        "usb": "ls /sys/bus/usb/devices",
        "ids": f"{FIND_FUNCTION}; cat $d/vendor $d/device $d/class",
        "driver": f"{FIND_FUNCTION}; basename $(readlink $d/driver)",
        "msi": f"{FIND_FUNCTION}; cat $d/msi_irqs/* 2>/dev/null | sort -u",
        "interrupts": "grep -E 'xhci' /proc/interrupts",
    }.items():
        out[name] = (await vm.console.run(cmd)).output
    return out


def interrupt_count(lines: str) -> int:
    return sum(int(n) for line in lines.splitlines()
               for n in re.findall(r"^\s*\d+:\s+(\d+)", line))


def check_bound(out):
    assert out["driver"].strip() == "xhci_hcd", out["dmesg"]
    assert out["ids"].split() == ["0x1ef3", "0x0330", "0x0c0330"]
    devices = out["usb"].split()
    assert "usb1" in devices and "usb2" in devices, out["usb"]
    assert "1-1" in devices, out["usb"]                       # the tablet, on the USB 2 hub
    assert out["dmesg"].count("USB hub found") >= 2
    assert "xhci_hcd" in out["dmesg"] and "Host supports USB 3.0 SuperSpeed" in out["dmesg"]
    assert interrupt_count(out["interrupts"]) > 0, out["interrupts"]


def check_session_released(server):
    assert server.dma.maps == {} and server.controller.mem.regions == []
    assert server.irq.open_fds == []
    assert not server.connected


def test_linux_binds_xhci_hcd_with_msix(tmp_path, guest_kit, capsys):
    async def script(vm, server):
        out = await inspect(vm, server)
        # Back-to-back register reads: the driver's debugfs register dump reads them in a row.
        await vm.console.run("mount -t debugfs none /sys/kernel/debug")
        before = len(server.stats.bar0_read_arrivals)
        r = await vm.console.run("for i in 1 2 3 4 5 6 7 8 9 10; do "
                                 "cat /sys/kernel/debug/usb/xhci/*/reg-op >/dev/null; done")
        out["gaps"] = server.stats.read_round_trips(before)
        out["debugfs"] = r
        return out

    out, server = run_guest(tmp_path, guest_kit, script)
    check_bound(out)
    assert out["msi"].split() == ["msix"]
    check_session_released(server)
    assert out["debugfs"].ok and len(out["gaps"]) > 50
    summary = server.stats.summary()
    with capsys.disabled():
        print(f"\nguest BAR0 read, back to back: median "
              f"{statistics.median(out['gaps']) / 1000:.1f} us over {len(out['gaps'])} reads; "
              f"Python handling: read median {summary['BAR0_READ']['median_us']:.1f} us, "
              f"write median {summary['BAR0_WRITE']['median_us']:.1f} us")


def test_linux_falls_back_to_msi_without_msix(tmp_path, guest_kit):
    out, server = run_guest(tmp_path, guest_kit, inspect, msix=False)
    check_bound(out)
    assert out["msi"].split() == ["msi"]
    check_session_released(server)


def test_linux_uses_intx_with_pci_nomsi(tmp_path, guest_kit):
    out, server = run_guest(tmp_path, guest_kit, inspect, append="pci=nomsi")
    check_bound(out)
    assert out["msi"].strip() == ""
    assert "IO-APIC" in out["interrupts"], out["interrupts"]
    check_session_released(server)


def test_guest_reset_rebinds_and_nothing_leaks(tmp_path, guest_kit):
    import os
    fds_before = set(os.listdir("/proc/self/fd"))

    async def script(vm, server):
        first = await inspect(vm, server)
        resets = server.stats.counts.get(Command.DEVICE_RESET, 0)
        await vm.qmp.system_reset()
        await vm.console.wait_ready()
        second = await inspect(vm, server)
        return first, second, server.stats.counts.get(Command.DEVICE_RESET, 0) - resets

    # the guest kit runs QEMU with -no-reboot; a reset must reset here, not end QEMU
    (first, second, resets), server = run_guest(tmp_path, guest_kit, script,
                                                extra_args=["-action", "reboot=reset"])
    check_bound(first)
    check_bound(second)
    assert resets >= 1                                     # QEMU reset the function with us
    check_session_released(server)
    leaked = set(os.listdir("/proc/self/fd")) - fds_before
    assert not leaked, f"descriptors left open: {sorted(leaked)}"
