"""The port mapper on real USB devices: Linux gadgets (dummy_hcd + configfs) in a kit VM that
runs this machine's venv, where `tests/passthrough_guest.py` drives the scripted guest on an
in-process controller with the gadgets passed through by libusb.  This side makes, plugs and
pulls the gadgets and reads what the guest saw (its JSON results) and what the host side of the
VM says (sysfs, its kernel drivers).  One boot for the module."""
from __future__ import annotations

import asyncio
import errno
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from xhcidbg.guestkit.gadgets import (
    Gadget,
    Gadgets,
    HidKeyboard,
    MassStorage,
    Pattern,
    SourceSink,
    keyboard_report,
    qemu_audio_args,
)
from xhcidbg.guestkit.launch import Vm
from xhcidbg.guestkit.testing import guest_kit
from xhcidbg.guestkit.vudc import IsoSource, IsoSources
from xhcidbg.guestkit.vudc import Speed as IsoSpeed

pytestmark = pytest.mark.e2e

GUEST_SCRIPT = Path(__file__).with_name("passthrough_guest.py")
CC_SUCCESS, CC_BABBLE, CC_TRANSACTION_ERROR, CC_SHORT = 1, 3, 4, 13
UDCS = 4


def zero(n: int) -> Gadget:
    return Gadget(f"zero{n}", [SourceSink(pattern=Pattern.MOD63)], product="Gadget Zero",
                  serial=f"xhcidbg-zero-{n}")


class GadgetVm:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.vm: Vm | None = None
        self.usb: Gadgets | None = None

    def run(self, coro, timeout: float = 300.0):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def command(self, scenario: str, *args: str) -> str:
        return shlex.join([sys.executable, str(GUEST_SCRIPT), scenario, *args])

    def scenario(self, scenario: str, *args: str, timeout: float = 300.0) -> dict:
        assert self.vm is not None
        result = self.run(self.vm.host.run(self.command(scenario, *args), timeout=timeout),
                          timeout + 30)
        return parse(result.output, result.status)

    def ended(self, job, timeout: float = 120.0) -> dict:
        result = self.run(job.wait(timeout), timeout + 30)
        return parse(result.output, result.status)

    def start(self, scenario: str, *args: str):
        assert self.vm is not None
        return self.run(self.vm.host.start(self.command(scenario, *args)))


def parse(output: str, status: int) -> dict:
    for line in output.splitlines():
        if line.startswith("@@result "):
            assert status == 0, output
            return json.loads(line[len("@@result "):])
    raise AssertionError(f"the guest script ended ({status}) without a result:\n{output}")


@pytest.fixture(scope="module")
def gadget_vm():
    qemu, kernel, initrd = guest_kit()
    loop = asyncio.new_event_loop()
    g = GadgetVm(loop)
    try:
        # QEMU's usb-audio in the same VM: the isochronous device dummy_hcd cannot give
        g.vm = g.run(Vm.start(qemu=qemu, kernel=kernel, initrd=initrd, progress=False,
                              host_root=True, extra_args=qemu_audio_args()), 360)
        g.usb = Gadgets(g.vm)
        g.run(g.usb.load(udcs=UDCS))
        yield g
    finally:
        if g.vm is not None:
            g.run(g.vm.stop(), 60)
        loop.close()


def test_a_gadget_enumerates_through_libusb_and_moves_bulk_data_both_ways(gadget_vm):
    g = gadget_vm
    plugged = g.run(g.usb.plug(zero(1)))
    try:
        r = g.scenario("enumerate-and-bulk", "65536")
    finally:
        g.run(g.usb.remove(zero(1)))
    dev = r["device"]
    assert (dev["vid"], dev["pid"], dev["product"], dev["serial"]) == (
        0x0525, 0xA4A0, "Gadget Zero", "xhcidbg-zero-1")
    assert plugged.speed_mbps == 480 and dev["speed"] == 3        # high speed on a USB 2 port
    assert dev["endpoints"] == [0x02, 0x81] and dev["config"] == 1       # f_sourcesink's
    assert r["host"]["bus"] == plugged.busnum and r["host"]["address"] == plugged.devnum
    assert r["out"] == [1, 65536] and r["in"] == [1, 65536] and r["in_ok"]


def test_a_stall_reaches_the_guest_and_clearing_the_halt_goes_through_libusb(gadget_vm):
    g = gadget_vm
    g.run(g.usb.plug(zero(1)))
    try:
        r = g.scenario("stall-and-clear")
    finally:
        g.run(g.usb.remove(zero(1)))
    # SourceSink halts its OUT endpoint on a wrong byte: Stall Error, endpoint Halted (2);
    # after Reset Endpoint, Set TR Dequeue and CLEAR_FEATURE(HALT) the next OUT succeeds
    assert (r["taken"], r["stalled"], r["state_after_stall"]) == (1, 6, 2)
    assert r["again"] == [1, 8192]


def test_a_guest_port_reset_reaches_the_device_only_once_it_is_addressed(gadget_vm):
    g = gadget_vm
    g.run(g.usb.plug(zero(1)))
    try:
        r = g.scenario("port-reset")
    finally:
        g.run(g.usb.remove(zero(1)))
    # the first enumeration's port resets stayed with the guest; the host's kernel logged none
    assert r["first"] == {"forwarded": 0, "kernel": 0}, r
    # the later one went through libusb: Linux on the host reset the gadget once, and the
    # guest's configuration and data path work afterwards
    assert (r["forwarded"], r["kernel"], r["still"]) == (1, 1, True), r
    assert r["after"] == [1, 8192, 1, 8192, 1]


def test_a_gadget_pulled_out_mid_transfer_leaves_the_guest_and_nothing_hangs(gadget_vm):
    g = gadget_vm
    g.run(g.usb.plug(zero(1)))
    job = g.start("unplug-mid-transfer")
    try:
        g.run(job.wait_output("@@ streaming", 120), 150)
        g.run(g.usb.unplug(zero(1)))
        r = g.ended(job)
    finally:
        g.run(g.usb.remove(zero(1)))
    assert r["completions"] >= 4 and r["last"] != 1     # the read in flight ended in error
    assert r["mapper_attached"] == [] and r["host_open"] == []


def test_persist_attaches_the_gadget_again_when_it_comes_back(gadget_vm):
    g = gadget_vm
    g.run(g.usb.plug(zero(1)))
    job = g.start("persist")
    try:
        g.run(job.wait_output("@@ attached", 120), 150)
        g.run(g.usb.unplug(zero(1)))
        g.run(job.wait_output("@@ gone", 120), 150)
        again = g.run(g.usb.plug(zero(1)))
        r = g.ended(job)
    finally:
        g.run(g.usb.remove(zero(1)))
    assert r["first"]["serial"] == r["second"]["serial"] == "xhcidbg-zero-1"
    assert r["second"]["slot"] != 0 and r["read"] == [1, 4096]
    assert again.devnum > 0


@pytest.mark.parametrize("count, beside", [(2, ""), (4, ""), (2, "virtual")])
def test_several_gadgets_at_once_have_their_own_ports_and_traffic(gadget_vm, count, beside):
    g = gadget_vm
    gadgets = [zero(n) for n in range(1, count + 1)]
    buses = [g.run(g.usb.plug(z)).busnum for z in gadgets]
    try:
        r = g.scenario("several", str(count), beside)
    finally:
        for z in gadgets:
            g.run(g.usb.remove(z))
    assert len(set(r["ports"])) == count and len(set(r["slots"])) == count
    assert sorted(r["buses"]) == sorted(buses)
    if beside:
        # the tablet, keyboard and loopback device have ports of their own, all enumerated,
        # and the loopback's bulk IN ran beside the gadgets' traffic
        virtual = set(r["virtual"].values())
        assert len(virtual) == 3 and not virtual & set(r["ports"])
        assert set(r["enumerated"]) == virtual | set(r["ports"])
        assert r["done"] == [[1, 1 << 15]] * (2 * count + 1)
    else:
        assert r["done"] == [[1, 1 << 15]] * (2 * count)


def test_200_attach_detach_cycles_leak_no_descriptor_transfer_or_memory(gadget_vm):
    g = gadget_vm
    g.run(g.usb.plug(zero(1)))
    try:
        r = g.scenario("cycles", "200", timeout=1200)
    finally:
        g.run(g.usb.remove(zero(1)))
    assert r["cycles"] == 200 and r["moved"] == 200 * 4096
    before, after = r["fds"]
    assert after == before, r                       # counted after 5 warm-up cycles
    assert r["pending_transfers"] == 0
    # nothing of a detached device stays alive: not the device, a transfer or a handle
    assert r["alive"] == {"PassthroughDevice": 0, "USBTransfer": 0, "USBDeviceHandle": 0}, r
    before, after = r["port_mapper_bytes"]         # what the mapper and usb1 code allocated
    assert after - before < 64 << 10, r             # (one 4 KiB buffer a cycle would be 780 KiB)


def test_a_device_the_host_kernel_drives_is_taken_only_with_force_and_given_back(
        gadget_vm, tmp_path):
    g = gadget_vm
    image = tmp_path / "stick.img"
    first = bytes(range(256)) * 2
    image.write_bytes(first + bytes((4 << 20) - len(first)))
    stick = Gadget("stick", [MassStorage(file=str(image))], product="Stick")
    g.run(g.usb.plug(stick))
    try:
        r = g.scenario("kernel-driver", "3")
    finally:
        g.run(g.usb.remove(stick))
    assert "bound to a kernel driver (usb-storage)" in r["refused"] and "force" in r["refused"]
    assert len(r["rounds"]) == 3
    for n in r["rounds"]:
        assert n["before"] == n["after"] == ["usb-storage"]     # given back each time
        assert n["while"] == ["usbfs"]                         # claimed through usbfs: ours
        assert n["capacity"] == [(4 << 20) // 512 - 1, 512]
        assert n["block0"] == first[:32].hex()


def _driver(g: GadgetVm, interface: str) -> str:
    """The kernel driver bound to `interface` (a sysfs folder in the VM), or "-" for none."""
    assert g.vm is not None
    r = g.run(g.vm.console.run(f"basename $(readlink {interface}/driver) 2>/dev/null || "
                               "echo -"), 30)
    return r.output.strip()


@pytest.mark.parametrize("ending", ["TERM", "INT", "HUP", "startup error"])
def test_however_xhcidbg_ends_the_kernel_driver_gets_its_device_back(gadget_vm, tmp_path,
                                                                      ending):
    g = gadget_vm
    assert g.vm is not None
    image = tmp_path / "stick.img"
    image.write_bytes(bytes(1 << 20))
    stick = Gadget("stick", [MassStorage(file=str(image))], product="Stick")
    plugged = g.run(g.usb.plug(stick))
    interface = f"{plugged.sysfs}/{plugged.sysfs.rsplit('/', 1)[1]}:1.0"
    command = [sys.executable, "-m", "xhcidbg", "serve", "--socket", f"/tmp/xs-{ending[:4]}",
               "--no-console", "--no-tablet", "--no-keyboard", "--attach", "0525:a4a5,force"]
    if ending == "startup error":           # the second device is not there: exit 2
        command += ["--attach", "1234:5678"]
    try:
        before = _driver(g, interface)
        job = g.run(g.vm.host.start(shlex.join(command)))
        if ending == "startup error":
            ended = g.run(job.wait(120), 150)
            taken = None
        else:
            g.run(job.wait_output("on port", 120), 150)
            taken = _driver(g, interface)
            # the Python process alone (the shells around it name xhcidbg too)
            g.run(g.vm.host.run(f"pkill -{ending} -f '^{sys.executable} -m xhcidbg [s]erve'",
                                check=True), 30)
            ended = g.run(job.wait(60), 90)
        g.run(g.vm.console.run(f"i=0; until [ -e {interface}/driver ]; do i=$((i+1)); "
                               "[ $i -lt 100 ] || break; usleep 50000; done"), 30)
        after = _driver(g, interface)
    finally:
        g.run(g.usb.remove(stick))
    assert before == after == "usb-storage", (before, after, ended.output)
    if taken is None:
        assert ended.status == 2 and "1234:5678" in ended.output, ended.output
    else:
        assert taken == "usbfs" and ended.status == 0, ended.output


def test_a_hid_keyboard_gadget_is_polled_and_its_reports_reach_the_guest(gadget_vm):
    g = gadget_vm
    keyboard = Gadget("kbd", [HidKeyboard()], product="Keys")
    g.run(g.usb.plug(keyboard))
    job = g.start("hid", "2")
    try:
        g.run(job.wait_output("@@ attached", 120), 150)
        g.run(g.usb.write(keyboard, keyboard_report("left_shift", "a") + keyboard_report()))
        r = g.ended(job)
    finally:
        g.run(g.usb.remove(keyboard))
    assert r["kind"] == "hid" and 0x81 in r["device"]["endpoints"], r["device"]
    assert r["drivers"] == [["usbhid"], ["usbhid"]]          # taken with force, given back
    assert r["reports"][:2] == [keyboard_report("left_shift", "a").hex(),
                                keyboard_report().hex()]


def test_isochronous_out_reaches_qemus_usb_audio_in_batches_with_each_packets_length(
        gadget_vm):
    r = gadget_vm.scenario("isochronous-out", "48")
    dev = r["device"]
    assert (dev["vid"], dev["pid"], dev["speed"]) == (0x46F4, 0x0002, 1)   # full speed
    # each TD is one packet of a shared libusb transfer and gets its own status and length
    assert [cc for cc, _ in r["done"]] == [1] * 48
    assert [n for _, n in r["done"]] == r["sizes"] and 0 in r["sizes"]
    assert 48 // r["per_transfer"] <= r["libusb_transfers"] <= 48 // 2, r


def test_isochronous_in_packets_reach_the_guest_each_with_its_own_status_and_length(gadget_vm):
    g = gadget_vm
    # short, empty, over-long (for a TD asking 600) and failed packets among full ones
    source = IsoSource("iso", max_packet=1024, speed=IsoSpeed.HIGH,
                       lengths=(1024, 512, 1, 0, 1024, 700, 1024),
                       statuses=(0,) * 10 + (-errno.EPROTO,))
    asks = (1024, 1024, 1024, 1024, 1024, 600)
    sources = IsoSources(g.vm)
    served = g.run(sources.plug(source))
    try:
        r = g.scenario("isochronous-in", "44", ",".join(map(str, asks)))
    finally:
        summary = g.run(sources.unplug(served))
    assert r["device"]["speed"] == 3 and r["device"]["vid"] == 0x1D6B      # high speed
    expected = []
    for k in range(44):
        status, data = source.packet(k, asks[k % len(asks)])
        if status == -errno.EPROTO:
            expected.append(CC_TRANSACTION_ERROR)
        elif status == -errno.EOVERFLOW:
            expected.append(CC_BABBLE)
        else:
            expected.append(CC_SUCCESS if len(data) == asks[k % len(asks)] else CC_SHORT)
    assert [cc for cc, _, _ in r["done"]] == expected
    assert CC_BABBLE in expected and CC_TRANSACTION_ERROR in expected and CC_SHORT in expected
    for k, (cc, actual, right) in enumerate(r["done"]):
        if cc in (CC_SUCCESS, CC_SHORT):          # each packet's own bytes, in order
            assert right and actual == len(source.packet(k, asks[k % len(asks)])[1]), k
    # several packets to a libusb transfer, and the source served exactly those
    assert 44 // r["per_transfer"] <= r["libusb_transfers"] <= 44 // 2, r
    assert summary["in_packets"] >= 44 and summary["transfers"] >= r["libusb_transfers"], summary


def test_the_console_lists_attaches_and_detaches_a_host_device(gadget_vm):
    g = gadget_vm
    g.run(g.usb.plug(zero(1)))
    try:
        assert g.vm is not None
        listed = g.run(g.vm.host.run(shlex.join([sys.executable, "-m", "xhcidbg", "devices",
                                                 "--json"]), timeout=120), 150)
        console = g.run(g.vm.host.run(shlex.join([
            sys.executable, "-m", "xhcidbg", "--no-tablet", "--no-keyboard", "--no-storage",
            "--width", "200", "-c", "attach", "-c", "attach 0525:a4a0", "-c", "devices",
            "-c", "detach 0525:a4a0", "-c", "devices"]), timeout=180), 210)
    finally:
        g.run(g.usb.remove(zero(1)))
    [dev] = [d for d in json.loads(listed.output) if d["id"] == "0525:a4a0"]
    assert dev["product"] == "Gadget Zero" and dev["speed"] == "high-speed"
    assert dev["access"] == "ok" and dev["drivers"] == []
    out = console.output
    assert console.ok, out
    assert re.search(rf"{dev['path']}\s+0525:a4a0 high-speed\s+addr {dev['address']}", out), out
    assert "free: can be attached" in out
    assert re.search(r"attached \S+ 0525:a4a0 .*Gadget Zero \(high-speed\) on port 1", out), out
    assert "Gadget Zero" in out.split("detached")[0].split("attach 0525:a4a0")[-1]
    assert re.search(r"detached \S+ 0525:a4a0 .* from port 1", out), out
