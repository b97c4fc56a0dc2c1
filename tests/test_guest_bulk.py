"""Bulk, interrupt and isochronous data TDs from the scripted guest to the loopback device, and
the class helpers (mass storage over BOT, HID) on top of them."""
import pytest

from xhcidbg.devices.base import Speed
from xhcidbg.devices.loopback import LoopbackDevice
from xhcidbg.devices.storage import StorageDevice
from xhcidbg.devices.tablet import Tablet
from xhcidbg.emu.trb import CC
from xhcidbg.guest.driver import XhciDriver
from xhcidbg.guest.hid import HidInterface
from xhcidbg.guest.storage import MassStorage
from xhcidbg.transport.inproc import InProcessBus


def plug(device, **opts):
    bus = InProcessBus()
    drv = XhciDriver(bus, **opts).start()
    port = bus.controller.attach(device)
    return bus, drv, drv.enumerate(drv.wait_for_connect(port))


def pattern(mps, n):
    return bytes((i % mps) % 63 for i in range(n))


@pytest.mark.parametrize("speed", [Speed.SUPER, Speed.HIGH, Speed.FULL])
def test_source_sink_bulk(speed):
    _bus, drv, dev = plug(LoopbackDevice(speed=speed, pattern=1))
    assert dev.speed == speed and drv.is_usb3(dev.port) == (speed == Speed.SUPER)
    ep_in = dev.endpoint(0x81)
    assert ep_in.max_packet == {Speed.SUPER: 1024, Speed.HIGH: 512, Speed.FULL: 64}[speed]
    if speed == Speed.SUPER:
        assert ep_in.max_burst == 15 and ep_in.context()["max_burst"] == 15
    mps = ep_in.max_packet
    r = dev.bulk_in(1, 200_000)
    assert r.data == pattern(mps, 200_000) and r.trb_count >= 4   # split at 64 KiB
    assert dev.bulk_out(1, pattern(mps, 70_000)).actual == 70_000


def test_trb_splitting_options_and_flags():
    _bus, _drv, dev = plug(LoopbackDevice(pattern=1))
    mps = dev.endpoint(0x81).max_packet
    r = dev.bulk_in(1, 5000, trb_sizes=[1000, 24, 3976], ent=True)
    assert r.trb_count == 3 and r.data == pattern(mps, 5000)
    r = dev.bulk_in(1, 4096, max_trb_size=512, event_data=True)
    assert r.trb_count == 9 and r.events[-1].event_data and r.events[-1].length == 4096
    assert r.data == pattern(mps, 4096)
    assert dev.bulk_in(1, 0).actual == 0                          # zero-length TD
    assert dev.bulk_out(1, pattern(mps, 8), immediate=True).actual == 8


def test_loopback_short_packet_and_isoch():
    _bus, drv, dev = plug(LoopbackDevice())
    dev.set_configuration(2)
    dev.bulk_out(1, b"hello world")
    r = dev.bulk_in(1, 4096)
    assert r.cc == CC.SHORT_PACKET and r.data == b"hello world" and r.residual == 4085
    dev.set_interface(0, 1)
    assert dev.endpoint(0x83).context()["ep_type"] == 5          # Isoch IN
    assert dev.isoch_out(3, b"\x55" * 300).ok
    r = dev.isoch_in(3, 1024)
    assert r.ok and r.data == b"\x55" * 300
    # a batch keeps the ring full and rings the doorbell once
    ep_out, ep_in = dev.endpoint(0x01), dev.endpoint(0x81)
    with drv.batch():
        outs = [ep_out.submit(bytes([i]) * 100) for i in range(32)]
    drv.wait_all(outs)
    with drv.batch():
        ins = [ep_in.submit(length=100) for _ in range(32)]
    drv.wait_all(ins)
    assert b"".join(t.data for t in ins) == b"".join(bytes([i]) * 100 for i in range(32))


def test_ring_full_waits_for_room():
    _bus, drv, dev = plug(LoopbackDevice(pattern=0), transfer_ring_trbs=4,
                         transfer_ring_segments=1)
    ep = dev.endpoint(0x81)
    with drv.batch():
        xs = [ep.submit(length=512) for _ in range(20)]   # 3 usable TRBs: must wait midway
    drv.wait_all(xs)
    assert all(x.ok and x.data == bytes(512) for x in xs)


def test_mass_storage(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    _bus, _drv, dev = plug(StorageDevice(img))
    disk = MassStorage(dev)
    assert disk.get_max_lun() == 0 and disk.test_unit_ready()
    assert disk.inquiry().product == "Virtual Disk"
    assert disk.read_capacity() == ((1 << 20) // 512 - 1, 512)
    data = bytes(range(256)) * 2 * 130
    disk.write(7, data)
    assert disk.read(7, 130) == data
    assert img.read_bytes()[7 * 512:7 * 512 + len(data)] == data
    # an unknown command fails with sense data, and the transport stays usable
    r = disk.command(bytes([0xEE, 0, 0, 0, 0, 0]), data_in=64)
    assert not r.ok and disk.request_sense().asc == 0x20
    assert disk.read(7, 1) == data[:512]


def test_hid_helper():
    t = Tablet()
    _bus, _drv, dev = plug(t)
    hid = HidInterface(dev)
    assert hid.report_descriptor()[:2] == b"\x05\x01"            # Usage Page (Generic Desktop)
    hid.set_idle(0)
    assert hid.read_report(timeout_ns=20_000_000) is None
    t.move(300, 400)
    assert hid.read_report() == b"\x00" + (300).to_bytes(2, "little") + \
        (400).to_bytes(2, "little") + b"\x00"
