"""A real Linux guest enumerates through a traced controller; the capture is read back.

One boot for the module: the guest kit's kernel under QEMU drives our controller over
vfio-user, with a tablet (full speed), a keyboard (low speed) and a storage stick (SuperSpeed)
plugged in and a `Tracer` attached before the guest's first MMIO access (so the capture
holds SeaBIOS's enumeration first, then, after Linux resets the controller, Linux's).  Once
Linux has
enumerated everything, the keyboard is pulled out from under an open interrupt URB (so the
capture holds real errors), and the guest stops.  Then stock tshark must decode the device and
configuration descriptors of exactly the devices Linux reports in sysfs, pair every completion
with its submission and name the error statuses; with our Lua dissector, display filters must
select exactly the records the Python reader finds; and `xhcidbg trace show` / `trace stats`
must print the enumeration and list the devices.

SET_ADDRESS: on xHCI the controller sends SET_ADDRESS itself, inside the Address Device
command; Linux never submits an URB for it, so Linux's own usbmon on real hardware shows none.
Our usbmon interfaces follow that (see `tracer._sets_address`); the request is still visible as
the Address Device command on the xHCI interface, which these tests count instead.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from xhcidbg.decode import usbmon as um
from xhcidbg.devices import Keyboard, Speed, StorageDevice, Tablet
from xhcidbg.emu.controller import XhciController
from xhcidbg.emu.timing import Scheduler
from xhcidbg.emu.trb import TrbType as T
from xhcidbg.guestkit import launch
from xhcidbg.guestkit.testing import guest_kit
from xhcidbg.session import LoopClock
from xhcidbg.trace import dissector
from xhcidbg.trace.tracer import Tracer
from xhcidbg.trace.viewer import Reader, collect_stats
from xhcidbg.vfio_user import VfioUserServer

pytestmark = pytest.mark.e2e

TSHARK = shutil.which("tshark")
PRODUCTS = {"tablet": "xhcidbg USB Tablet", "keyboard": "xhcidbg USB Keyboard",
            "storage": "xhcidbg Mass Storage"}
# every USB device (not interface, not root hub) the guest knows, one line each
LIST_DEVICES = ("for d in /sys/bus/usb/devices/[0-9]-[0-9]; do [ -e $d/idVendor ] && "
                "echo \"$(basename $d)|$(cat $d/busnum)|$(cat $d/idVendor)|$(cat $d/idProduct)|"
                "$(cat $d/speed)|$(cat $d/product)\"; done")
ENUMERATED = " && ".join(
    [f"[ -n \"$(cat /sys/bus/usb/devices/{n}/bConfigurationValue 2>/dev/null)\" ]"
     for n in ("1-1", "1-2", "2-1")]
    + ["[ -b /dev/sda ]", "[ $(grep -c 'N: Name=\"xhcidbg' /proc/bus/input/devices) -eq 2 ]"])


async def guest_until(vm, condition: str, timeout: float = 90.0) -> None:
    """Poll inside the guest (one console round trip) until `condition` holds."""
    tries = int(timeout / 0.1)
    r = await vm.console.run(f"i=0; until {condition}; do i=$((i+1)); [ $i -ge {tries} ] && "
                             f"exit 1; usleep 100000; done", timeout * 2 + 30)
    if not r.ok:
        dmesg = (await vm.console.run("dmesg | tail -40")).output
        raise AssertionError(f"the guest never saw: {condition}\n{dmesg}")


@pytest.fixture(scope="module")
def linux_capture(tmp_path_factory):
    qemu, kernel, initrd = guest_kit()     # skips only offline, and never under CI=true
    tmp = tmp_path_factory.mktemp("trace_linux")
    path = tmp / "linux.pcapng"
    image = tmp / "stick.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)

    async def main():
        hc = XhciController(scheduler=Scheduler())
        keyboard = Keyboard(speed=Speed.LOW)
        ports = {hc.attach(Tablet()): "tablet", hc.attach(keyboard): "keyboard",
                 hc.attach(StorageDevice(image)): "storage"}
        tracer = Tracer(hc, path).start()      # before any guest exists: from the first access
        ended = asyncio.Event()
        server = VfioUserServer(hc, str(tmp / "xhci.sock"), on_disconnect=ended.set)
        await server.start()
        clock = LoopClock(hc.scheduler, asyncio.get_running_loop())    # the controller's timers
        try:
            vm = await launch.Vm.start(devices=[server.device_arg], qemu=qemu, kernel=kernel,
                                       initrd=initrd, progress=False, log=tmp / "serial.log")
            try:
                await guest_until(vm, ENUMERATED)
                devices = (await vm.console.run(LIST_DEVICES)).output
                # an interrupt URB in flight on the keyboard (usbhid polls while it is open),
                # then the keyboard goes: Linux sees errors and a disconnect
                event = (await vm.console.run(
                    "grep -A5 'xhcidbg USB Keyboard' /proc/bus/input/devices | "
                    "grep -o 'event[0-9]*'")).output.strip()
                await vm.console.run(f"cat /dev/input/{event} > /dev/null &")
                await asyncio.sleep(1.0)
                kbd_port = next(p for p, name in ports.items() if name == "keyboard")
                hc.detach(kbd_port)
                await guest_until(vm, "[ ! -e /sys/bus/usb/devices/1-2 ]")
                dmesg = (await vm.console.run("dmesg")).output
            finally:
                await vm.stop()
            await asyncio.wait_for(ended.wait(), 15)
        finally:
            clock.close()
            server.close()
            status = tracer.stop()
        return SimpleNamespace(devices=devices, dmesg=dmesg, status=status, ports=ports,
                               internal_errors=hc.internal_errors)

    out = asyncio.run(main())
    assert not out.status.error and not out.status.dropped, out.status
    assert out.internal_errors == 0
    out.path = path
    out.guest = {}                       # sysfs name -> (bus, vendor, product id, speed, product)
    for line in out.devices.splitlines():
        name, bus, vid, pid, speed, product = line.strip().split("|")
        out.guest[name] = (int(bus), int(vid, 16), int(pid, 16), speed, product)
    assert set(out.guest) == {"1-1", "1-2", "2-1"}, out.devices
    out.entries = list(Reader(path).entries())
    # Linux's part: everything after its controller reset (SeaBIOS enumerated before it)
    out.linux_from = 1 + max(i for i, e in enumerate(out.entries) if e.kind == "state"
                             and e.record.tail.startswith(b"controller\0")
                             and e.record.tail.endswith(b"\0HCRST"))
    assert out.linux_from > 1                   # the firmware's reset came first
    out.home = tmp / "home"
    out.home.mkdir()
    return out


def tshark(cap, *args: str, lua: bool = False) -> str:
    assert TSHARK, "tshark is required for these tests: apt-get install -y tshark"
    cmd = [TSHARK, *(["-X", f"lua_script:{dissector.REPO_COPY}"] if lua else []),
           "-r", str(cap.path), *args]
    env = dict(os.environ, HOME=str(cap.home), XDG_CONFIG_HOME=str(cap.home / ".config"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return r.stdout


def fields(cap, filt: str, *names: str, lua: bool = False) -> list[list[str]]:
    out = tshark(cap, "-Y", filt, "-T", "fields", "-E", "occurrence=f",
                 *(arg for n in names for arg in ("-e", n)), lua=lua)
    return [line.split("\t") for line in out.splitlines()]


def test_the_devices_linux_enumerated_are_the_ones_whose_descriptors_tshark_decodes(
        linux_capture):
    cap = linux_capture
    rows = fields(cap, "usb.urb_type == 'C' && usb.bDescriptorType == 1 && usb.idVendor",
                  "usb.bus_id", "usb.idVendor", "usb.idProduct")
    decoded = {(int(b), int(v, 16), int(p, 16)) for b, v, p in rows}
    assert decoded == {(bus, vid, pid) for bus, vid, pid, _, _ in cap.guest.values()}
    # the configurations: HID for the tablet and the keyboard, mass storage for the stick
    rows = fields(cap, "usb.urb_type == 'C' && usb.bDescriptorType == 2 && usb.bInterfaceClass",
                  "usb.bus_id", "usb.device_address", "usb.bInterfaceClass")
    classes = Counter((int(bus), int(cls, 16)) for bus, _addr, cls in rows)
    assert {k for k in classes} == {(1, 0x03), (2, 0x08)}
    assert len({(b, a) for b, a, c in rows if c == "0x03"}) == 2     # two HID devices
    info = tshark(cap, "-Y", "usb.bDescriptorType")
    assert "GET DESCRIPTOR Response DEVICE" in info
    assert "GET DESCRIPTOR Response CONFIGURATION" in info


def test_every_completion_is_paired_with_its_submission(linux_capture):
    rows = fields(linux_capture, "usb.urb_type", "frame.number", "usb.urb_type", "usb.urb_id",
                  "usb.request_in")
    submits = {r[0]: r[2] for r in rows if r[1] == "'S'"}
    completes = [r for r in rows if r[1] == "'C'"]
    assert len(completes) > 50
    for number, _t, urb_id, request_in in completes:
        assert submits.get(request_in) == urb_id, (number, urb_id, request_in)
    # each submission completes at most once; what is left was in flight when the guest stopped
    assert max(Counter(r[3] for r in completes).values()) == 1
    assert len(submits) - len(completes) <= 4


def test_error_statuses_have_their_names(linux_capture):
    cap = linux_capture
    rows = fields(cap, "usb.urb_type == 'C' && usb.urb_status != 0", "frame.number",
                  "usb.urb_status", "usb.bus_id", "usb.endpoint_address")
    assert rows, "pulling the keyboard out left no failed transfer"
    assert any(bus == "1" and int(ep, 16) & 0x80 and int(ep, 16) & 0x7F for _, _, bus, ep in rows)
    for number, status, _bus, _ep in rows[:5]:
        verbose = tshark(cap, "-V", "-Y", f"frame.number == {number}")
        assert f"({um.errno_name(int(status))})" in verbose, verbose


def test_no_set_address_on_the_usbmon_interfaces(linux_capture):
    """Linux's usbmon shows no SET_ADDRESS on xHCI hardware; ours does not either."""
    cap = linux_capture
    assert fields(cap, "usb.setup.bRequest == 5", "frame.number") == []
    addressed = [e for e in cap.entries if e.kind == "command"
                 and e.record.dwords[7] >> 10 & 0x3F == T.ADDRESS_DEVICE]
    assert addressed and all(e.record.fields["cc"] == 1 for e in addressed)


def test_lua_filters_select_exactly_the_expected_records(linux_capture):
    cap = linux_capture
    entries = cap.entries

    def expect(pred, since: int = 0) -> list[str]:
        return [str(i + 1) for i, e in enumerate(entries) if i >= since and pred(e)]

    def got(filt: str) -> list[str]:
        return [r[0] for r in fields(cap, filt, "frame.number", lua=True)]

    def linux(filt: str) -> list[str]:
        """Frames of Linux's part (after its controller reset) that `filt` selects."""
        return got(f"frame.number > {cap.linux_from} && {filt}")

    def command_type(e) -> int | None:
        return e.record.dwords[7] >> 10 & 0x3F if e.kind == "command" else None

    # Address Device: one with BSR=0 per device Linux enumerated; before that, one with BSR=1
    # per USB 2 device (Linux's "new scheme" reads 64 bytes of the device descriptor at
    # address 0 first; SuperSpeed devices skip it)
    assert got("xhci.kind == 5 && xhci.trb.type == 11") == expect(
        lambda e: command_type(e) == T.ADDRESS_DEVICE)                  # SeaBIOS's and Linux's
    address_devices = linux("xhci.kind == 5 && xhci.trb.type == 11")
    assert address_devices == expect(lambda e: command_type(e) == T.ADDRESS_DEVICE,
                                     since=cap.linux_from)
    bsr0 = linux("xhci.kind == 5 && xhci.trb.type == 11 && xhci.trb.bsr == 0")
    bsr1 = linux("xhci.kind == 5 && xhci.trb.type == 11 && xhci.trb.bsr == 1")
    assert len(bsr0) == len(cap.guest)
    assert len(bsr1) == sum(1 for bus, *_ in cap.guest.values() if bus == 1)
    assert sorted(bsr0 + bsr1, key=int) == address_devices
    # Enable Slot commands that succeeded, one per device; and the keyboard's Disable Slot
    assert len(linux("xhci.kind == 5 && xhci.trb.type == 9 && xhci.cc == 1")) == len(cap.guest)
    assert len(linux("xhci.kind == 5 && xhci.trb.type == 10")) == 1
    # port changes on the keyboard's root port, as records and as events
    kbd_port = next(p for p, name in cap.ports.items() if name == "keyboard")
    assert got(f"xhci.port == {kbd_port}") == expect(
        lambda e: e.port == kbd_port and (e.kind == "port" or (
            e.kind == "event" and e.record.dwords[7] >> 10 & 0x3F == T.PORT_STATUS_CHANGE)))
    # transfer events with an error completion code, and the register writes ringing slot 2
    assert got("xhci.kind == 4 && xhci.cc != 1 && xhci.cc != 13") == expect(
        lambda e: e.kind == "event" and e.record.dwords[6] >> 24 not in (1, 13))
    assert got("xhci.reg == \"DOORBELL[2]\"") == expect(
        lambda e: e.kind == "mmio" and e.record.text == "DOORBELL[2]")


def run_cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "xhcidbg", *args], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, COLUMNS="220"),
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_trace_show_prints_the_enumeration(linux_capture):
    out = run_cli("trace", "show", str(linux_capture.path), "kind=command,context,urb")
    assert re.search(r"xhci_handle_command: CMD: @0x[0-9a-f]{16} Address Device Command: ctx "
                     r"[0-9a-f]{16} slot \d+ flags B:C", out)               # BSR=1, Linux's
    assert re.search(r"xhci_handle_cmd_addr_dev: RS 00000 low-speed .* State addressed", out)
    assert re.search(r"xhci_handle_cmd_addr_dev: RS 00000 super-speed .* State addressed", out)
    # the device descriptor coming back, as the kernel's usbmon text prints it
    assert re.search(r"usbmon: [0-9a-f]+ \d+ C Ci:2:\d{3}:0 0 18 = 12012003", out)   # USB 3.2


def test_trace_stats_lists_the_devices_linux_enumerated(linux_capture):
    cap = linux_capture
    st = collect_stats(cap.path)
    # SeaBIOS's enumeration, then Linux's (the last host): the same three devices
    assert {d.session for d in st.devices} == {1, 2}
    linux = {d.string("product"): d for d in st.devices if d.session == 2}
    speeds = {"1.5": "low-speed", "12": "full-speed", "5000": "super-speed"}
    assert set(linux) == {product for *_, product in cap.guest.values()}
    for name, (bus, vid, pid, speed, product) in cap.guest.items():
        d = linux[product]
        assert (d.bus, d.vendor, d.product_id) == (bus, vid, pid), name
        assert d.speed == speeds[speed] and d.configuration == 1, name
        assert PRODUCTS[cap.ports[d.port]] == product, name          # on its own root port
        assert d.slot, name
    out = run_cli("trace", "stats", str(cap.path))
    for _bus, vid, pid, _speed, product in cap.guest.values():
        assert f"{vid:04x}:{pid:04x}" in out and product in out
    assert "USB devices" in out and "Transfer events by slot" in out
