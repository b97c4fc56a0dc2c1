"""Isochronous IN on a real Linux host controller driver in a kit VM: vhci-hcd (USB/IP).

One boot for the module.  An `IsoSource` served over a socketpair by a Python process in the
guest is enumerated by usbcore on vhci-hcd; python-libusb1 in the guest (no xhcidbg controller)
queues isochronous IN transfers of 8 packets through usbfs and gets each packet's status, length
and bytes as the source made them: full-length, short, empty and failed packets, in order and
paced by the (micro)frame.  Detaching the port takes the device away.  Beside it, gadgets.py's
SourceSink bound to usbip-vudc moves bulk data over the same path, and shows why vudc is not the
isochronous source: its iso pair binds and enumerates, but every packet comes back in error with
no data (vudc answers iso URBs with -EXDEV).
"""
from __future__ import annotations

import asyncio
import errno
import json
import time

import pytest

from xhcidbg.guestkit.gadgets import Gadget, Pattern, SourceSink, source_sink_data
from xhcidbg.guestkit.launch import Vm
from xhcidbg.guestkit.testing import guest_kit
from xhcidbg.guestkit.vudc import (
    ISO_SOURCE_IDS,
    IsoSource,
    IsoSources,
    Speed,
    VudcGadgets,
)

pytestmark = pytest.mark.e2e

LIBUSB_COMPLETED, LIBUSB_ERROR, LIBUSB_CANCELLED, LIBUSB_OVERFLOW = 0, 1, 3, 6
PACKETS, TRANSFERS = 8, 4

# Queues `transfers` isochronous transfers of `packets` packets each on `endpoint` of the first
# device with these IDs, after selecting interface 0 alt 1; one JSON line: the device as libusb
# sees it, each transfer's status and (status, actual_length, bytes) of every packet, the time
# from the first submit to the last completion.
ISO_READ = r"""
import ctypes, json, sys, time
import libusb_package, usb1
usb1.loadLibrary(ctypes.CDLL(str(libusb_package.get_library_path())))
vendor, product, endpoint, packets, transfers = (int(a, 0) for a in sys.argv[1:6])
out = {}
with usb1.USBContext() as context:
    handle = context.openByVendorIDAndProductID(vendor, product)
    device = handle.getDevice()
    out["device"] = {"speed": device.getDeviceSpeed(), "bus": device.getBusNumber(),
                     "address": device.getDeviceAddress(),
                     "alts": [[[e.getAddress(), e.getAttributes() & 3, e.getMaxPacketSize(),
                                e.getInterval()] for e in s] for s in device[0][0]],
                     "product": handle.getProduct()}
    handle.claimInterface(0)
    handle.setInterfaceAltSetting(0, 1)
    size = [e for e in device[0][0][1] if e.getAddress() == endpoint][0].getMaxPacketSize()
    size = (size & 0x7FF) * (((size >> 11) & 3) + 1)
    done, queued = [], []
    def completed(transfer):
        done.append({"status": transfer.getStatus(),
                     "packets": [[s["status"], s["actual_length"], bytes(b).hex()]
                                 for s, (_, b) in zip(transfer.getISOSetupList(),
                                                      transfer.iterISO())]})
    for _ in range(transfers):
        transfer = handle.getTransfer(iso_packets=packets)
        transfer.setIsochronous(endpoint, packets * size, callback=completed, timeout=5000)
        queued.append(transfer)
    start = time.monotonic()
    for transfer in queued:
        transfer.submit()
    while len(done) < transfers and time.monotonic() - start < 10:
        context.handleEventsTimeout(0.5)
    out["elapsed"] = time.monotonic() - start
    out["asked"] = size
    out["transfers"] = done
    handle.setInterfaceAltSetting(0, 0)
    handle.releaseInterface(0)
print("@@result " + json.dumps(out))
"""

# Every device libusb finds with these IDs (none, once unplugged), and a bulk read for vudc.
FIND = r"""
import ctypes, json, sys
import libusb_package, usb1
usb1.loadLibrary(ctypes.CDLL(str(libusb_package.get_library_path())))
vendor, product, read = (int(a, 0) for a in sys.argv[1:4])
with usb1.USBContext() as context:
    found = [[d.getBusNumber(), d.getDeviceAddress()] for d in context.getDeviceIterator()
             if (d.getVendorID(), d.getProductID()) == (vendor, product)]
    data = b""
    if read and found:
        handle = context.openByVendorIDAndProductID(vendor, product)
        handle.claimInterface(0)
        data = handle.bulkRead(0x81, read, 5000)
print("@@result " + json.dumps({"found": found, "data": bytes(data).hex()}))
"""


class KitVm:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.vm: Vm | None = None

    def run(self, coro, timeout: float = 300.0):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def python(self, code: str, *args: object) -> dict:
        assert self.vm is not None
        result = self.run(self.vm.host.python(code, *(str(a) for a in args), timeout=120), 150)
        for line in result.output.splitlines():
            if line.startswith("@@result "):
                assert result.status == 0, result.output
                return json.loads(line[len("@@result "):])
        raise AssertionError(f"the guest script ended ({result.status}):\n{result.output}")

    def gone(self, sysfs: str) -> bool:
        assert self.vm is not None
        return self.run(self.vm.console.run(f"[ ! -e {sysfs} ]")).ok


@pytest.fixture(scope="module")
def kit():
    qemu, kernel, initrd = guest_kit()
    loop = asyncio.new_event_loop()
    k = KitVm(loop)
    try:
        k.vm = k.run(Vm.start(qemu=qemu, kernel=kernel, initrd=initrd, progress=False,
                              host_root=True), 360)
        yield k
    finally:
        if k.vm is not None:
            k.run(k.vm.stop(), 60)
        loop.close()


@pytest.mark.parametrize("speed, max_packet", [(Speed.HIGH, 1024), (Speed.FULL, 1023)])
def test_isochronous_in_packets_arrive_with_their_own_status_length_and_bytes(kit, speed,
                                                                             max_packet):
    source = IsoSource(f"iso-{speed.name.lower()}", max_packet=max_packet, speed=speed,
                       # short, empty and over-long packets; one failed packet in 13
                       lengths=(max_packet, 512, 1, 0, max_packet, 700, max_packet + 1),
                       statuses=(0,) * 12 + (-errno.EPROTO,))
    sources = IsoSources(kit.vm)
    served = kit.run(sources.plug(source))
    try:
        r = kit.python(ISO_READ, *ISO_SOURCE_IDS, 0x81, PACKETS, TRANSFERS)
    finally:
        summary = kit.run(sources.unplug(served))
    plugged = served.plugged
    assert plugged.speed_mbps == {Speed.HIGH: 480, Speed.FULL: 12}[speed]
    device = r["device"]
    assert device["speed"] == int(speed) and device["product"] == "xhcidbg iso source " \
        + source.name
    assert [device["bus"], device["address"]] == [plugged.busnum, plugged.devnum]
    # alt 0 has no endpoints; alt 1 the isochronous pair, every (micro)frame
    assert device["alts"] == [[], [[0x81, 1, max_packet, 1], [0x01, 1, max_packet, 1]]]
    assert r["asked"] == max_packet and len(r["transfers"]) == TRANSFERS
    expected_index = 0
    for transfer in r["transfers"]:
        assert transfer["status"] == LIBUSB_COMPLETED and len(transfer["packets"]) == PACKETS
        for status, actual, data in transfer["packets"]:
            want_status, want = source.packet(expected_index, max_packet)
            libusb_status = {0: LIBUSB_COMPLETED, -errno.EPROTO: LIBUSB_ERROR,
                             -errno.EOVERFLOW: LIBUSB_OVERFLOW}[want_status]
            assert (status, actual, bytes.fromhex(data)) == (libusb_status, len(want), want), \
                expected_index
            expected_index += 1
    seen = {tuple(p[:2]) for t in r["transfers"] for p in t["packets"]}
    assert (LIBUSB_ERROR, 0) in seen and (LIBUSB_OVERFLOW, max_packet) in seen
    assert (LIBUSB_COMPLETED, 0) in seen and (LIBUSB_COMPLETED, 1) in seen
    # paced: 32 packets take 32 (micro)frames at least
    assert r["elapsed"] >= PACKETS * TRANSFERS * source.period
    assert summary["transfers"] == TRANSFERS and summary["in_packets"] == PACKETS * TRANSFERS
    assert "0x01:11" in summary["control"]                  # SET_INTERFACE reached the source
    # unplugged: neither sysfs nor libusb has it any more
    assert kit.gone(plugged.sysfs)
    assert kit.python(FIND, *ISO_SOURCE_IDS, 0)["found"] == []


def test_vudc_gadgets_move_bulk_but_not_isochronous_data(kit):
    zero = Gadget("vzero", [SourceSink(pattern=Pattern.MOD63, isoc_interval=1,
                                       isoc_maxpacket=1024)], product="Gadget Zero")
    usb = VudcGadgets(kit.vm)
    assert kit.run(usb.load()) == ["usbip-vudc.0"]
    started = time.monotonic()
    plugged = kit.run(usb.plug(zero))
    enumerated = time.monotonic() - started
    try:
        r = kit.python(ISO_READ, 0x0525, 0xA4A0, 0x82, PACKETS, 1)
        bulk = kit.python(FIND, 0x0525, 0xA4A0, 4096)
    finally:
        kit.run(usb.unplug(zero))
    assert plugged.udc == "usbip-vudc.0" and plugged.speed_mbps == 480 and enumerated < 20
    assert bytes.fromhex(bulk["data"]) == source_sink_data(Pattern.MOD63, 4096, 512)
    # f_sourcesink's alt 1 has its isochronous pair (vudc offers iso endpoints) ...
    assert [0x82, 1, 1024, 1] in r["device"]["alts"][1]
    # ... but vudc moves no isochronous data: every packet fails, empty
    [transfer] = r["transfers"]
    assert [p[:2] for p in transfer["packets"]] == [[LIBUSB_ERROR, 0]] * PACKETS
    assert kit.gone(plugged.sysfs) and kit.python(FIND, 0x0525, 0xA4A0, 0)["found"] == []
    # the gadget stayed bound: a new link brings it back
    again = kit.run(usb.plug(zero))
    try:
        assert len(bytes.fromhex(kit.python(FIND, 0x0525, 0xA4A0, 512)["data"])) == 512
    finally:
        kit.run(usb.remove(zero))
    assert kit.gone(again.sysfs)


# One transfer that the source answers only after 2 packets of 2**15 frames (65 s); cancelled.
CANCEL = r"""
import ctypes, json, time
import libusb_package, usb1
usb1.loadLibrary(ctypes.CDLL(str(libusb_package.get_library_path())))
with usb1.USBContext() as context:
    handle = context.openByVendorIDAndProductID(0x1D6B, 0x0104)
    handle.claimInterface(0)
    handle.setInterfaceAltSetting(0, 1)
    done = []
    transfer = handle.getTransfer(iso_packets=2)
    transfer.setIsochronous(0x81, 128, callback=lambda t: done.append(t.getStatus()))
    start = time.monotonic()
    transfer.submit()
    time.sleep(0.3)
    transfer.cancel()
    while not done and time.monotonic() - start < 10:
        context.handleEventsTimeout(0.2)
print("@@result " + json.dumps({"done": done, "elapsed": time.monotonic() - start}))
"""


def test_a_cancelled_isochronous_transfer_is_unlinked_at_the_source(kit):
    sources = IsoSources(kit.vm)
    served = kit.run(sources.plug(IsoSource("slow", max_packet=64, speed=Speed.FULL,
                                            interval=16)))
    try:
        r = kit.python(CANCEL)
    finally:
        summary = kit.run(sources.unplug(served))
    assert r["done"] == [LIBUSB_CANCELLED] and r["elapsed"] < 10
    # the CMD_UNLINK found the transfer still waiting: no RET_SUBMIT, RET_UNLINK -ECONNRESET
    assert summary["unlinked"] == 1 and summary["transfers"] == 1
