"""A USB device with descriptors no configfs function has: a FunctionFS function in a kit VM.

One boot for the module, dummy_hcd loaded for SuperSpeed.  `UasShapedDisk` is a mass-storage
interface shaped like a real UAS disk (alt 0 Bulk-Only, alt 1 UAS with four bulk pipes whose
SuperSpeed companions ask for 2**5 streams); its daemon (xhcidbg.guestkit.functionfs, the venv's
Python in the guest) writes the descriptors to ep0 before the gadget is bound.  python-libusb1
in the guest then reads them as the host side enumerated them, at 5 Gbit/s.  The host side's
usb-storage takes alt 0 (the kit ships no uas driver, and without Pipe Usage descriptors, which
Linux 6.1's FunctionFS refuses, uas would not take it either).  Unplugging takes it from libusb;
replugging needs no new daemon; removing ends the daemon and its functionfs mount.
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from xhcidbg.devices import Speed
from xhcidbg.guestkit.functionfs import (
    UAS_STREAMS_EXPONENT,
    DescriptorsV2,
    Flags,
    MassStorageCode,
    StringsBlob,
    UasShapedDisk,
    descriptors_blob,
    strings_blob,
    uas_disk_descriptors,
)
from xhcidbg.guestkit.gadgets import FILE_STORAGE, NETCHIP, Gadget, Gadgets, UdcSpeed
from xhcidbg.guestkit.launch import Vm
from xhcidbg.guestkit.testing import guest_kit

pytestmark = pytest.mark.e2e

DISK = Gadget("uasdisk", [UasShapedDisk()], product="UAS-shaped disk", serial="xhcidbg-uas-1")
SS_ENDPOINT_COMPANION = 0x30

# libusb as xhcidbg's port mapper loads it (the system's, else the libusb-package wheel's).
PRELUDE = r"""
import json, sys
import usb1
from xhcidbg.passthrough import library
library.load()
VENDOR, PRODUCT = 0x0525, 0xA4A5
"""

DESCRIBE = PRELUDE + r"""
with usb1.USBContext() as context:
    device = context.getByVendorIDAndProductID(VENDOR, PRODUCT)
    [configuration] = list(device)
    [interface] = list(configuration)
    handle = device.open()
    try:
        settings = [{
            "number": s.getNumber(), "alternate": s.getAlternateSetting(),
            "class": [s.getClass(), s.getSubClass(), s.getProtocol()],
            "name": handle.getStringDescriptor(s.getDescriptor(), 0x409)
            if s.getDescriptor() else None,
            "endpoints": [{"address": e.getAddress(), "type": e.getAttributes() & 3,
                           "max_packet": e.getMaxPacketSize(),
                           "extra": [bytes(x).hex() for x in e.getExtra()]} for e in s]}
            for s in interface]
        driver = handle.kernelDriverActive(0)
    finally:
        handle.close()
    print(json.dumps({"speed": device.getDeviceSpeed(), "super": usb1.SPEED_SUPER,
                      "bcd_usb": device.getbcdUSB(), "settings": settings, "driver": driver}))
"""

FIND = PRELUDE + r"""
with usb1.USBContext() as context:
    print(json.dumps([[d.getBusNumber(), d.getDeviceAddress()] for d in context.getDeviceList()
                      if (d.getVendorID(), d.getProductID()) == (VENDOR, PRODUCT)]))
"""


class Guest:
    def __init__(self, loop: asyncio.AbstractEventLoop, vm: Vm, usb: Gadgets):
        self.loop, self.vm, self.usb = loop, vm, usb
        self.timings: dict[str, float] = {}

    def run(self, coroutine, timeout: float = 180.0):
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    def timed(self, what: str, coroutine, timeout: float = 180.0):
        started = time.monotonic()
        result = self.run(coroutine, timeout)
        self.timings[what] = round(time.monotonic() - started, 1)
        return result

    def python(self, code: str):
        result = self.run(self.vm.host.python(code, timeout=100))
        assert result.ok, f"the guest script failed ({result.status}):\n{result.output}"
        return json.loads(result.output.strip().splitlines()[-1])

    def shell(self, command: str) -> str:
        result = self.run(self.vm.console.run(command, 60))
        assert result.ok, f"guest command {command!r} failed ({result.status}):\n{result.output}"
        return result.output


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    qemu, kernel, initrd = guest_kit()
    folder = tmp_path_factory.mktemp("functionfs")
    loop = asyncio.new_event_loop()
    vm = None
    try:
        vm = loop.run_until_complete(asyncio.wait_for(Vm.start(
            qemu=qemu, kernel=kernel, initrd=initrd, host_root=True,
            log=folder / "serial.log", progress=False), 360))
        g = Guest(loop, vm, Gadgets(vm))
        g.run(g.usb.load(udcs=1, speed=UdcSpeed.SUPER))
        yield g
        print(f"\nFunctionFS timings (s): {g.timings}")
    finally:
        if vm is not None:
            loop.run_until_complete(asyncio.wait_for(vm.stop(), 60))
        loop.close()


def test_this_kernels_functionfs_refuses_uas_pipe_usage_descriptors(guest):
    piped = Gadget("piped", [UasShapedDisk(name="piped",
                                           descriptors=uas_disk_descriptors(pipe_usage=True))])
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"refused the descriptors: \[Errno 22\]"):
        guest.run(guest.usb.create(piped))
    guest.timings["refused"] = round(time.monotonic() - started, 1)
    guest.run(guest.usb.remove(piped))
    assert guest.shell("ls /sys/kernel/config/usb_gadget") == ""
    assert "functionfs" not in guest.shell("cat /proc/mounts")


def test_the_uas_shaped_disk_enumerates_at_superspeed_with_both_settings(guest):
    guest.timed("create (daemon ready)", guest.usb.create(DISK))
    plugged = guest.timed("plug", guest.usb.plug(DISK))
    assert plugged.speed_mbps == 5000
    seen = guest.python(DESCRIBE)
    assert seen["speed"] == seen["super"] and seen["bcd_usb"] == 0x0320
    bot, uas = seen["settings"]
    assert (bot["number"], bot["alternate"], uas["number"], uas["alternate"]) == (0, 0, 0, 1)
    msc = MassStorageCode
    assert bot["class"] == [msc.CLASS, msc.SCSI, msc.BULK_ONLY] == [8, 6, 0x50]
    assert uas["class"] == [msc.CLASS, msc.SCSI, msc.UAS] == [8, 6, 0x62]
    assert (bot["name"], uas["name"]) == ("Bulk-Only Transport", "USB Attached SCSI")
    for setting, count in ((bot, 2), (uas, 4)):
        endpoints = setting["endpoints"]
        assert len(endpoints) == count
        assert all(e["type"] == 2 and e["max_packet"] == 1024 for e in endpoints)     # bulk
        ins = [e for e in endpoints if e["address"] & 0x80]
        assert len(ins) == count // 2
    # The endpoints have the UDC's addresses, one each: six for the six descriptors.
    addresses = [e["address"] for s in (bot, uas) for e in s["endpoints"]]
    assert len(set(addresses)) == 6
    # Each endpoint carries its SuperSpeed companion; the UAS status and data pipes (the
    # endpoints after the command pipe, OUT) ask for 2**5 streams, in bursts of 16.
    companions = [[bytes.fromhex(x) for x in e["extra"]] for e in uas["endpoints"]]
    assert all(len(c) == 1 and c[0][:2] == bytes([6, SS_ENDPOINT_COMPANION])
               for c in companions)
    command, *streamed = [c[0] for c in companions]
    assert command[3] & 0x1F == 0 and not uas["endpoints"][0]["address"] & 0x80
    assert [c[3] & 0x1F for c in streamed] == [UAS_STREAMS_EXPONENT] * 3 and streamed[0][2] == 15
    assert all(bytes.fromhex(x)[3] == 0 for e in bot["endpoints"] for x in e["extra"])
    # The host side's driver: usb-storage, on alt 0 (the kit has no uas driver).
    assert seen["driver"] is True
    interface = f"{plugged.sysfs}/{plugged.sysfs.rsplit('/', 1)[1]}:1.0"
    assert guest.shell(f"readlink {interface}/driver").strip().endswith("/usb-storage")
    assert guest.shell(f"cat {interface}/bAlternateSetting").strip() == "0"
    # The daemon saw the configuration set and answered usb-storage's GET_MAX_LUN itself.
    [job] = guest.usb.jobs[DISK.name]
    log = guest.run(job.output())
    assert "BIND" in log and "ENABLE" in log
    assert "SETUP a1fe000000000100: answered 1 bytes" in log


def test_unplug_leaves_no_device_and_replug_needs_no_new_daemon(guest):
    first = guest.python(FIND)
    assert len(first) == 1
    guest.timed("unplug", guest.usb.unplug(DISK))
    assert guest.python(FIND) == []
    assert guest.shell("ls /sys/bus/usb/devices | grep -c -- '-1$' || true").strip() == "0"
    [job] = guest.usb.jobs[DISK.name]
    assert "UNBIND" in guest.run(job.output())
    replugged = guest.timed("replug", guest.usb.plug(DISK))
    assert replugged.speed_mbps == 5000 and guest.python(FIND) == [[replugged.busnum,
                                                                     replugged.devnum]]
    guest.timed("remove", guest.usb.remove(DISK))
    assert guest.python(FIND) == []
    assert guest.shell("ls /sys/kernel/config/usb_gadget") == ""
    assert "functionfs" not in guest.shell("cat /proc/mounts")
    assert DISK.name not in guest.usb.jobs


def test_the_blobs_are_functionfs_v2_and_its_strings_format():
    descriptors = uas_disk_descriptors()
    blob = descriptors_blob(descriptors)
    parsed = DescriptorsV2.parse(blob)
    assert blob[:4] == (3).to_bytes(4, "little") and parsed.length == len(blob)
    assert parsed.flags == Flags.HAS_FS_DESC | Flags.HAS_HS_DESC | Flags.HAS_SS_DESC == 7
    # Per speed: 2 interface + 6 endpoint descriptors, and at SuperSpeed 6 companions more.
    assert list(parsed.counts) == [8, 8, 14]
    assert parsed.descriptors == descriptors[Speed.FULL] + descriptors[Speed.HIGH] + \
        descriptors[Speed.SUPER]
    # At high speed UAS asks for no streams: there are no companions below SuperSpeed.
    assert bytes([6, SS_ENDPOINT_COMPANION]) not in descriptors[Speed.HIGH]
    strings = strings_blob(["Bulk-Only Transport", "USB Attached SCSI"])
    assert strings[:16] == b"".join(n.to_bytes(4, "little") for n in (2, len(strings), 2, 1))
    assert strings[16:] == b"\x09\x04Bulk-Only Transport\0USB Attached SCSI\0"
    assert StringsBlob.parse(strings).languages[0].strings == ["Bulk-Only Transport",
                                                               "USB Attached SCSI"]
    assert strings_blob([]) == b"".join(n.to_bytes(4, "little") for n in (2, 16, 0, 0))
    assert (UasShapedDisk.vendor_id, UasShapedDisk.product_id) == (NETCHIP, FILE_STORAGE)
    assert DISK.function_folder(0).endswith("/functions/ffs.uas")
