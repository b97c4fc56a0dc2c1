"""Real USB devices without USB hardware: a kit VM that mounts this machine's root (virtio-9p
under a tmpfs overlay) runs the project's own venv Python next to Linux USB gadgets on dummy_hcd.

One boot for the module.  Gadget Zero's SourceSink function (0525:a4a0) is made through
configfs and plugged in; python-libusb1, with the libusb of the libusb-package wheel, finds it
at high speed through the guest's real usbfs, reads its descriptors, reads the mod63 pattern
from its bulk IN endpoint and writes it to its bulk OUT endpoint (where the gadget checks every
byte and halts the endpoint on the first wrong one).  Unbinding the gadget from its UDC takes
it away from libusb, both from a fresh scan and under a process that holds it open, and binding
it again brings it back.  Beside it, on a second UDC, a composite gadget of every other kind the
kit declares (Loopback, mass storage, ACM serial, HID keyboard) moves data through each.  What
dummy_hcd cannot give, isochronous transfers, QEMU's usb-audio on a qemu-xhci in the same VM
does.  Last, dummy_hcd reloaded for SuperSpeed gives the same gadget at 5 Gbit/s.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
from pathlib import Path

import pytest

from xhcidbg.guestkit.gadgets import (
    Gadget,
    Gadgets,
    HidKeyboard,
    Loopback,
    MassStorage,
    Pattern,
    Plugged,
    Serial,
    SourceSink,
    UdcSpeed,
    keyboard_report,
    qemu_audio_args,
    source_sink_data,
)
from xhcidbg.guestkit.launch import Vm
from xhcidbg.guestkit.testing import guest_kit

pytestmark = pytest.mark.e2e

ZERO = Gadget("zero", [SourceSink(pattern=Pattern.MOD63)], product="Gadget Zero",
              serial="xhcidbg-zero-1")
VENDOR, PRODUCT = 0x0525, 0xA4A0

# Every guest script starts so: python-libusb1 on the wheel's libusb (the guest's tree is this
# machine's, so the same venv and the same wheel), then prints one JSON line at the end.
PRELUDE = r"""
import ctypes, json, sys
import libusb_package, usb1
usb1.loadLibrary(ctypes.CDLL(str(libusb_package.get_library_path())))
VENDOR, PRODUCT = 0x0525, 0xA4A0
"""

ENVIRONMENT = PRELUDE + r"""
import os
version = usb1.getVersion()
print(json.dumps({"executable": sys.executable, "prefix": sys.prefix,
                  "libusb": libusb_package.get_library_path().as_posix(),
                  "libusb_version": [version.major, version.minor, version.micro],
                  "loaded": [line.split()[-1] for line in open("/proc/self/maps")
                             if "libusb" in line][:1],
                  "usbfs": os.path.isdir("/dev/bus/usb")}))
"""

DESCRIBE = PRELUDE + r"""
with usb1.USBContext() as context:
    device = context.getByVendorIDAndProductID(VENDOR, PRODUCT)
    configurations = []
    for configuration in device:
        interfaces = []
        for interface in configuration:
            interfaces.append([{
                "number": s.getNumber(), "alternate": s.getAlternateSetting(),
                "class": [s.getClass(), s.getSubClass(), s.getProtocol()],
                "endpoints": [{"address": e.getAddress(), "type": e.getAttributes() & 3,
                               "max_packet": e.getMaxPacketSize()} for e in s]}
                for s in interface])
        configurations.append({"value": configuration.getConfigurationValue(),
                               "max_power_ma": configuration.getMaxPower(),
                               "interfaces": interfaces})
    handle = device.open()
    try:
        strings = [handle.getManufacturer(), handle.getProduct(), handle.getSerialNumber()]
        active = handle.getConfiguration()
    finally:
        handle.close()
    print(json.dumps({
        "bus": device.getBusNumber(), "address": device.getDeviceAddress(),
        "speed": device.getDeviceSpeed(), "high": usb1.SPEED_HIGH,
        "bcd_usb": device.getbcdUSB(), "ids": [device.getVendorID(), device.getProductID()],
        "max_packet0": device.getMaxPacketSize0(), "strings": strings, "active": active,
        "configurations": configurations}))
"""

# Bulk both ways, and the control test requests; every IN byte is compared here with the
# pattern, every OUT byte by the gadget (a wrong one halts its OUT endpoint).
TRANSFER = PRELUDE + r"""
import os
from xhcidbg.guestkit.gadgets import Pattern, source_sink_data
size = int(sys.argv[1])
result = {}
with usb1.USBContext() as context:
    handle = context.openByVendorIDAndProductID(VENDOR, PRODUCT)
    [setting] = list(handle.getDevice()[0][0])
    endpoints = {e.getAddress() & 0x80: e for e in setting}
    bulk_in, bulk_out = endpoints[0x80].getAddress(), endpoints[0].getAddress()
    packet = endpoints[0x80].getMaxPacketSize()
    handle.claimInterface(0)
    data = handle.bulkRead(bulk_in, size, 10000)
    result["in"] = [len(data), bytes(data) == source_sink_data(Pattern.MOD63, size, packet)]
    # The gadget checks a request once it is full (4096 bytes) or ends in a short packet:
    # a long stream, then two writes that end short, each checked before the next is taken.
    result["out"] = [handle.bulkWrite(bulk_out, source_sink_data(Pattern.MOD63, n, packet),
                                      10000) for n in (size, 1000, 100)]
    # A wrong byte: the sink halts its endpoint, the next write stalls; clearing the halt
    # (CLEAR_FEATURE) opens it again.
    handle.bulkWrite(bulk_out, b"\xff" * (packet - 1), 10000)
    try:
        handle.bulkWrite(bulk_out, source_sink_data(Pattern.MOD63, 512, packet), 10000)
        result["after_wrong_byte"] = "accepted"
    except usb1.USBErrorPipe:
        result["after_wrong_byte"] = "stall"
    handle.clearHalt(bulk_out)
    result["after_clear_halt"] = handle.bulkWrite(
        bulk_out, source_sink_data(Pattern.MOD63, 4096, packet), 10000)
    # Vendor requests 0x5b (write ep0's buffer) and 0x5c (read it back).
    sent = os.urandom(64)
    handle.controlWrite(0x40, 0x5B, 0, 0, sent, 5000)
    result["control_echo"] = bytes(handle.controlRead(0xC0, 0x5C, 0, 0, len(sent), 5000)) == sent
    handle.releaseInterface(0)
    handle.close()
print(json.dumps(result))
"""

FIND = PRELUDE + r"""
with usb1.USBContext() as context:
    found = [[d.getBusNumber(), d.getDeviceAddress()] for d in context.getDeviceList()
             if (d.getVendorID(), d.getProductID()) == (VENDOR, PRODUCT)]
print(json.dumps(found))
"""

# Holds the gadget open and reads from it until it goes; then waits for libusb's hotplug
# events (left, then arrived again) and reads once more from the device that came back.
HOLDER = PRELUDE + r"""
import time
from xhcidbg.guestkit.gadgets import Pattern, source_sink_data
events = []
with usb1.USBContext() as context:
    def on_hotplug(context, device, event):
        events.append("arrived" if event == usb1.HOTPLUG_EVENT_DEVICE_ARRIVED else "left")
    context.hotplugRegisterCallback(on_hotplug, vendor_id=VENDOR, product_id=PRODUCT,
                                    flags=usb1.HOTPLUG_NO_FLAGS)
    handle = context.openByVendorIDAndProductID(VENDOR, PRODUCT)
    bulk_in = next(e.getAddress() for e in handle.getDevice()[0][0][0] if e.getAddress() & 0x80)
    handle.claimInterface(0)
    print("holding", flush=True)
    deadline = time.monotonic() + 60
    error = None
    while error is None and time.monotonic() < deadline:
        try:
            handle.bulkRead(bulk_in, 4096, 1000)
        except usb1.USBError as e:
            error = type(e).__name__
    handle.close()
    while events[-1:] != ["arrived"] and time.monotonic() < deadline:
        context.handleEventsTimeout(0.1)
    # "arrived" comes with the device node, before usbcore has set its configuration: until
    # then the interface is not there to claim
    while True:
        again = context.openByVendorIDAndProductID(VENDOR, PRODUCT)
        try:
            again.claimInterface(0)
            break
        except usb1.USBErrorNotFound:
            again.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    data = bytes(again.bulkRead(bulk_in, 4096, 10000))
    print(json.dumps({"error": error, "events": events,
                      "again": data == source_sink_data(Pattern.MOD63, 4096, 512)}))
"""


# Every interface of the composite gadget, then data through each function but the disk: the
# loopback echoes, the serial port passes bytes both ways with the gadget side (the test's shell
# on /dev/ttyGS0), and the keyboard's reports arrive on its interrupt endpoint.
COMPOSITE = PRELUDE + r"""
import os, time
def wait_for(signal):
    print(signal, flush=True)       # to the test, which then makes the file of that name
    while not os.path.exists(sys.argv[1] + "/" + signal):
        time.sleep(0.05)
result = {}
with usb1.USBContext() as context:
    handle = context.openByVendorIDAndProductID(0x1D6B, 0x0104)
    handle.setAutoDetachKernelDriver(True)      # usbhid has the keyboard: lend it to us
    interfaces = {}
    for interface in handle.getDevice()[0]:
        s = interface[0]
        interfaces[s.getClass()] = {
            "number": s.getNumber(), "class": [s.getClass(), s.getSubClass(), s.getProtocol()],
            "driver": handle.kernelDriverActive(s.getNumber()),
            "in": [e.getAddress() for e in s if e.getAddress() & 0x80],
            "out": [e.getAddress() for e in s if not e.getAddress() & 0x80]}
    result["interfaces"] = sorted(i["class"] + [i["driver"]] for i in interfaces.values())
    loop, data, keyboard = interfaces[0xFF], interfaces[0x0A], interfaces[0x03]
    handle.claimInterface(loop["number"])
    sent = os.urandom(16384)
    handle.bulkWrite(loop["out"][0], sent, 10000)
    result["loopback"] = bytes(handle.bulkRead(loop["in"][0], len(sent), 10000)) == sent
    handle.claimInterface(interfaces[0x02]["number"])
    handle.claimInterface(data["number"])
    wait_for("serial-ready")
    got = b""
    deadline = time.monotonic() + 20
    while b"\n" not in got and time.monotonic() < deadline:
        try:
            got += bytes(handle.bulkRead(data["in"][0], 512, 1000))
        except usb1.USBErrorTimeout:
            pass
    result["from_gadget"] = got.decode()
    handle.bulkWrite(data["out"][0], b"from the host\n", 5000)
    handle.claimInterface(keyboard["number"])
    print("keyboard-claimed", flush=True)      # the gadget side may type now
    reports = []
    while len(reports) < 2 and time.monotonic() < deadline + 20:
        try:
            report = bytes(handle.interruptRead(keyboard["in"][0], 64, 1000))
        except usb1.USBErrorTimeout:
            continue
        if report:          # f_hid follows each report with a zero-length packet
            reports.append(report.hex())
    result["keyboard"] = reports
    handle.close()
print(json.dumps(result))
"""


# Eight isochronous OUT packets to QEMU's usb-audio (alt 1 of its streaming interface).
ISOCHRONOUS = PRELUDE + r"""
import time
done = []
with usb1.USBContext() as context:
    handle = context.openByVendorIDAndProductID(0x46F4, 0x0002)
    handle.setAutoDetachKernelDriver(True)
    setting = handle.getDevice()[0][1][1]
    [endpoint] = list(setting)
    handle.claimInterface(1)
    handle.setInterfaceAltSetting(1, 1)
    size = endpoint.getMaxPacketSize()
    transfer = handle.getTransfer(iso_packets=8)
    transfer.setIsochronous(endpoint.getAddress(), bytes(size * 8), callback=done.append,
                            timeout=5000)
    transfer.submit()
    deadline = time.monotonic() + 10
    while not done and time.monotonic() < deadline:
        context.handleEventsTimeout(0.1)
    print(json.dumps({
        "speed": handle.getDevice().getDeviceSpeed(), "full": usb1.SPEED_FULL,
        "endpoint": [endpoint.getAddress(), endpoint.getAttributes() & 3, size],
        "status": [transfer.getStatus(), usb1.TRANSFER_COMPLETED] if done else None,
        "packets": [[status, len(data)] for status, data in transfer.iterISO()] if done else []}))
    handle.setInterfaceAltSetting(1, 0)
    handle.close()
"""


class GadgetGuest:
    """The booted VM, its gadgets, and the loop they run on (driven from the tests)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, vm: Vm, usb: Gadgets, folder: Path):
        self.loop = loop
        self.vm = vm
        self.usb = usb
        self.folder = folder
        self.plugged: Plugged | None = None      # where ZERO is now, as the host side sees it

    def run(self, coroutine, timeout: float = 120.0):
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    def python(self, code: str, *args: str):
        """Run `code` with the venv's Python in the guest; the JSON of its last line."""
        result = self.run(self.vm.host.python(code, *args, timeout=100))
        assert result.ok, f"the guest script failed ({result.status}):\n{result.output}"
        return json.loads(result.output.strip().splitlines()[-1])

    def shell(self, command: str) -> str:
        """A command in the kit's own shell (busybox, the initramfs tree)."""
        result = self.run(self.vm.console.run(command, 60))
        assert result.ok, f"guest command {command!r} failed ({result.status}):\n{result.output}"
        return result.output

    def host_shell(self, command: str) -> str:
        """A command chrooted into the host's tree, where the guest scripts see files."""
        return self.run(self.vm.host.run(command, 60, check=True)).output


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    qemu, kernel, initrd = guest_kit()     # skips only offline, and never under CI=true
    folder = tmp_path_factory.mktemp("gadgets")
    (folder / "from-host.txt").write_text("written on the host before boot\n")
    loop = asyncio.new_event_loop()
    vm = None
    try:
        vm = loop.run_until_complete(asyncio.wait_for(Vm.start(
            qemu=qemu, kernel=kernel, initrd=initrd, host_root=True,
            extra_args=qemu_audio_args(), log=folder / "serial.log", progress=False), 360))
        usb = Gadgets(vm)
        g = GadgetGuest(loop, vm, usb, folder)
        g.run(usb.load(udcs=2))
        g.plugged = g.run(usb.plug(ZERO))
        yield g
    finally:
        if vm is not None:
            loop.run_until_complete(asyncio.wait_for(vm.stop(), 60))
        loop.close()


def test_the_guest_runs_the_projects_venv_with_the_wheels_libusb(guest):
    seen = guest.python(ENVIRONMENT)
    venv = Path(__file__).resolve().parents[1] / ".venv"
    assert Path(seen["prefix"]) == venv                 # the same path as on this machine
    assert seen["loaded"] == [seen["libusb"]]           # the wheel's libusb, not a system one
    assert "libusb_package" in seen["libusb"] and seen["libusb_version"][:2] >= [1, 0]
    assert seen["usbfs"]


def test_the_host_tree_is_writable_in_the_guest_and_unchanged_on_the_host(guest):
    folder = shlex.quote(str(guest.folder))
    out = guest.run(guest.vm.host.run(
        f"cat {folder}/from-host.txt && echo guest > {folder}/from-guest.txt"
        f" && cat {folder}/from-guest.txt", check=True)).output
    assert out == "written on the host before boot\nguest\n"
    assert not (guest.folder / "from-guest.txt").exists()      # it went to the guest's tmpfs
    kernel = guest.run(guest.vm.host.run("uname -r; cat /proc/1/comm", check=True)).output
    assert kernel.split() == [guest.shell("uname -r").strip(), "init"]     # the guest's own


def test_sourcesink_is_found_at_high_speed_with_its_descriptors(guest):
    seen = guest.python(DESCRIBE)
    assert (seen["bus"], seen["address"]) == (guest.plugged.busnum, guest.plugged.devnum)
    assert seen["speed"] == seen["high"] and guest.plugged.speed_mbps == 480
    assert seen["ids"] == [VENDOR, PRODUCT] and seen["bcd_usb"] == 0x0200
    assert seen["max_packet0"] == 64
    assert seen["strings"] == ["xhcidbg", "Gadget Zero", "xhcidbg-zero-1"]
    [configuration] = seen["configurations"]
    assert configuration["value"] == seen["active"] == 1
    assert configuration["max_power_ma"] == ZERO.max_power_ma          # usb1 says mA
    [[setting]] = configuration["interfaces"]      # alt 0 only: dummy_hcd has no iso endpoints
    assert setting["number"] == 0 and setting["alternate"] == 0
    assert setting["class"][0] == 0xFF                                   # vendor specific
    endpoints = {e["address"] & 0x80: e for e in setting["endpoints"]}
    assert len(setting["endpoints"]) == 2 and set(endpoints) == {0x80, 0}
    assert all(e["type"] == 2 and e["max_packet"] == 512 for e in endpoints.values())   # bulk


def test_bulk_data_moves_both_ways_and_is_checked_at_both_ends(guest):
    guest.shell("dmesg -c > /dev/null")
    seen = guest.python(TRANSFER, str(64 << 10))
    assert seen["in"] == [64 << 10, True]
    assert seen["out"] == [64 << 10, 1000, 100]
    assert seen["after_wrong_byte"] == "stall" and seen["after_clear_halt"] == 4096
    assert seen["control_echo"]
    # The gadget's own verdict: exactly the one deliberately wrong byte was refused.
    refused = [line for line in guest.shell("dmesg").splitlines() if "bad OUT byte" in line]
    assert len(refused) == 1 and refused[0].endswith("buf[0] = 255"), refused


def test_unplug_takes_the_device_from_libusb_and_replug_brings_it_back(guest):
    assert guest.python(FIND) == [[guest.plugged.busnum, guest.plugged.devnum]]
    holder = guest.run(guest.vm.host.start(shlex.join([guest.vm.host.python_path, "-c",
                                                       HOLDER])))
    try:
        guest.run(holder.wait_output("holding", 60), 90)
        guest.run(guest.usb.unplug(ZERO))
        assert guest.shell(f"ls -d {guest.plugged.sysfs} 2>/dev/null; true") == ""
        assert guest.python(FIND) == []
        replugged = guest.run(guest.usb.plug(ZERO))
        assert replugged.udc == guest.plugged.udc and replugged.busnum == guest.plugged.busnum
        assert replugged.devnum != guest.plugged.devnum     # a new address, as on a real replug
        assert guest.python(FIND) == [[replugged.busnum, replugged.devnum]]
        ended = guest.run(holder.wait(60), 90)
    finally:
        guest.run(holder.stop())
    guest.plugged = replugged
    assert ended.ok, ended.output
    seen = json.loads(ended.output.strip().splitlines()[-1])
    # The open handle fails with "no device", libusb's hotplug reports the departure and the
    # return, and the device that came back sources the pattern again.
    assert seen == {"error": "USBErrorNoDevice", "events": ["left", "arrived"], "again": True}
    assert guest.python(TRANSFER, "4096")["in"] == [4096, True]


def test_a_composite_of_every_other_kind_works_beside_it(guest):
    image = guest.folder / "stick.img"
    content = os.urandom(1 << 20)
    image.write_bytes(content + bytes(3 << 20))
    multi = Gadget("multi", [Loopback(), MassStorage(file=str(image)), Serial(), HidKeyboard()],
                   serial="xhcidbg-multi-1")
    plugged = guest.run(guest.usb.plug(multi))
    assert plugged.udc == "dummy_udc.1" and plugged.busnum != guest.plugged.busnum
    # Two devices at once, each on its own bus.
    assert guest.python(FIND) == [[guest.plugged.busnum, guest.plugged.devnum]]
    # The disk, through the guest's own usb-storage: the image's first MiB.
    disk = guest.shell("i=0; until [ -b /dev/sda ]; do i=$((i+1)); [ $i -lt 400 ] || exit 1;"
                       " usleep 50000; done; dd if=/dev/sda bs=64k count=16 iflag=direct"
                       " 2>/dev/null | md5sum")
    assert disk.split()[0] == hashlib.md5(content).hexdigest()
    tty = guest.run(guest.usb.node(multi, 2))
    signals = guest.folder / "signals"
    # The gadget side of the serial port: raw, everything it receives into a file.
    guest.host_shell(f"mkdir -p {signals}; setsid sh -c 'stty raw -echo; exec cat' < {tty}"
                     f" > {guest.folder}/serial.out 2>&1 &")
    job = guest.run(guest.vm.host.start(shlex.join([guest.vm.host.python_path, "-c", COMPOSITE,
                                                    str(signals)])))
    try:
        guest.run(job.wait_output("serial-ready", 60), 90)
        guest.host_shell(f"printf 'from the gadget\\n' > {tty} && touch {signals}/serial-ready")
        guest.run(job.wait_output("keyboard-claimed", 60), 90)
        # Each report waits in f_hid until the host has read the one before.
        guest.run(guest.usb.write(multi, keyboard_report("left_shift", "a") + keyboard_report(),
                                  index=3))
        ended = guest.run(job.wait(60), 90)
    finally:
        guest.run(job.stop())
    assert ended.ok, ended.output
    seen = json.loads(ended.output.strip().splitlines()[-1])
    # Loopback, mass storage (usb-storage bound), ACM control and data, boot keyboard (usbhid).
    assert seen["interfaces"] == [[2, 2, 1, False], [3, 1, 1, True], [8, 6, 80, True],
                                  [10, 0, 0, False], [255, 0, 0, False]]
    assert seen["loopback"]
    assert seen["from_gadget"].replace("\r", "") == "from the gadget\n"
    assert guest.host_shell(f"cat {guest.folder}/serial.out") == "from the host\n"
    assert seen["keyboard"] == ["0200040000000000", "0000000000000000"]     # shift+a, all up
    guest.run(guest.usb.remove(multi))
    assert guest.shell("ls /sys/kernel/config/usb_gadget").split() == ["zero"]


def test_isochronous_transfers_reach_qemus_usb_audio_in_the_same_vm(guest):
    seen = guest.python(ISOCHRONOUS)
    assert seen["speed"] == seen["full"]
    address, kind, size = seen["endpoint"]
    assert address == 0x01 and kind == 1 and size > 0           # isochronous OUT
    assert seen["status"] == [seen["status"][1]] * 2             # completed
    assert seen["packets"] == [[0, size]] * 8


def test_the_same_gadget_comes_up_at_superspeed_on_a_superspeed_dummy_hcd(guest):
    guest.run(guest.usb.unplug(ZERO))          # dummy_hcd reloads only with nothing bound
    assert guest.run(guest.usb.load(udcs=1, speed=UdcSpeed.SUPER)) == ["dummy_udc.0"]
    guest.plugged = guest.run(guest.usb.plug(ZERO))
    assert guest.plugged.speed_mbps == 5000
    seen = guest.python(DESCRIBE)
    assert seen["speed"] == 4 and seen["bcd_usb"] == 0x0320        # usb1.SPEED_SUPER, USB 3.2
    assert seen["max_packet0"] == 9                                # ep0: 2**9 bytes
    [[setting]] = seen["configurations"][0]["interfaces"]
    assert [e["max_packet"] for e in setting["endpoints"]] == [1024, 1024]
    assert guest.python(TRANSFER, str(64 << 10))["in"] == [64 << 10, True]   # 1024-byte packets


def test_the_kits_pattern_is_gadget_zeros():
    # The count restarts in every packet (64 bytes here), not only every 63 bytes.
    assert source_sink_data(Pattern.MOD63, 70, 64)[60:70] == bytes([60, 61, 62, 0,
                                                                    0, 1, 2, 3, 4, 5])
    assert source_sink_data(Pattern.ZEROS, 5, 512) == bytes(5)
