"""Transfers by the scripted guest through the real controller: control TDs (4.11.2.2), normal
TDs on interrupt endpoints, short packets, stalls and recovery, Event Data TRBs, batches and
cancellation."""
import pytest

from xhcidbg.devices.base import Speed
from xhcidbg.devices.keyboard import Keyboard
from xhcidbg.devices.tablet import Tablet
from xhcidbg.emu.context import EpState
from xhcidbg.emu.trb import CC
from xhcidbg.guest.driver import XhciDriver
from xhcidbg.guest.errors import TransferFailed, XhciTimeout
from xhcidbg.transport.inproc import InProcessBus


def plug(device, **opts):
    bus = InProcessBus()
    drv = XhciDriver(bus, **opts).start()
    port = bus.controller.attach(device)
    return drv, drv.enumerate(drv.wait_for_connect(port))


@pytest.fixture
def tablet():
    t = Tablet()
    drv, dev = plug(t)
    return t, drv, dev


@pytest.fixture
def keyboard():
    k = Keyboard(speed=Speed.HIGH)
    drv, dev = plug(k)
    return k, drv, dev


def test_control_in_short_packet_reports_actual_length(tablet):
    _t, _drv, dev = tablet
    r = dev.control(0x80, 6, 0x0200, 0, 255)
    total = dev.config.raw
    assert r.ok and r.actual == len(total) and r.data == total and r.short
    # a Short Packet event on the Data Stage (ISP), then Success on the Status Stage
    assert [ev.cc for ev in r.events] == [CC.SHORT_PACKET, CC.SUCCESS]
    assert r.events[0].length == 255 - len(total)


@pytest.mark.parametrize("sizes", [[4, 5, 9], [1] * 18, [18]])
def test_control_data_stage_split_into_chained_trbs(tablet, sizes):
    _t, _drv, dev = tablet
    r = dev.control(0x80, 6, 0x0100, 0, 18, trb_sizes=sizes)
    assert r.data == dev.device_desc.raw and r.trb_count == len(sizes) + 2


def test_control_with_event_data_trb(tablet):
    _t, _drv, dev = tablet
    r = dev.control(0x80, 6, 0x0100, 0, 18, event_data=0x1234_5678_9ABC)
    ed = [ev for ev in r.events if ev.event_data]
    assert r.ok and r.data == dev.device_desc.raw
    assert ed and ed[0].param == 0x1234_5678_9ABC and ed[0].length == 18   # EDTLA


def test_control_out_sets_keyboard_leds(keyboard):
    k, _drv, dev = keyboard
    dev.control(0x21, 0x09, 0x0200, 0, b"\x05")          # HID SET_REPORT(Output)
    assert int(k.leds) == 5
    dev.control(0x21, 0x09, 0x0200, 0, b"\x02", immediate=True)   # data in the TRB (IDT)
    assert int(k.leds) == 2
    assert dev.control(0xA1, 0x01, 0x0200, 0, 1).data == b"\x02"    # GET_REPORT


def test_stall_then_recovery(tablet):
    _t, _drv, dev = tablet
    with pytest.raises(TransferFailed, match="Stall Error"):
        dev.control(0x80, 6, 0x9900, 0, 8)                 # no such descriptor
    assert dev.ep0.state == EpState.RUNNING or dev.ep0.state == EpState.STOPPED
    assert dev.control(0x80, 6, 0x0100, 0, 18).data == dev.device_desc.raw
    # without automatic recovery the endpoint stays halted until recover()
    r = dev.control(0x80, 6, 0x9900, 0, 8, check=False, recover=False)
    assert r.cc == CC.STALL_ERROR and dev.ep0.state == EpState.HALTED
    dev.ep0.recover()
    assert dev.ep0.state == EpState.STOPPED
    assert dev.control(0x80, 6, 0x0100, 0, 18).ok


def test_interrupt_in_reports_follow_the_tablet(tablet):
    t, _drv, dev = tablet
    for i in range(20):
        t.move(100 * i, 50 * i)
        r = dev.interrupt_in(1, 6)
        assert r.data == bytes([0]) + (100 * i).to_bytes(2, "little") + \
            (50 * i).to_bytes(2, "little") + b"\0"


def test_keyboard_typing(keyboard):
    k, _drv, dev = keyboard
    k.type("hi")
    keys = [dev.interrupt_in(1, 8).data[2] for _ in range(4)]
    assert keys == [0x0B, 0, 0x0C, 0]


def test_batch_rings_once_and_completes_in_order(tablet):
    t, drv, dev = tablet
    ep = dev.endpoint(0x81)
    with drv.batch():
        xfers = [ep.submit(length=6) for _ in range(16)]
    for i in range(16):
        t.move(i + 1, 0)
    drv.wait_all(xfers)
    assert [x.data[1] for x in xfers] == list(range(1, 17))


def test_block_event_interrupt_and_silent_tds(tablet):
    t, drv, dev = tablet
    ep = dev.endpoint(0x81)
    with drv.batch():
        xfers = [ep.submit(length=6, ioc=(i == 7)) for i in range(8)]
    for i in range(8):
        t.move(i, i)
    drv.wait_all(xfers)
    assert all(x.ok for x in xfers)
    assert [len(x.events) for x in xfers] == [0] * 7 + [1]


def test_cancel_pending_interrupt_in(tablet):
    t, _drv, dev = tablet
    ep = dev.endpoint(0x81)
    x = ep.submit(length=6)
    with pytest.raises(XhciTimeout):
        x.wait(timeout_ns=50_000_000)
    gone = ep.cancel_all()
    assert gone == [x] and x.cancelled and not x.ok
    assert ep.state == EpState.STOPPED
    t.move(7, 7)
    assert dev.interrupt_in(1, 6).data[1] == 7


def test_doorbell_makes_stopped_endpoint_running(tablet):
    t, _drv, dev = tablet
    ep = dev.endpoint(0x81)
    assert ep.stop().ok and ep.state == EpState.STOPPED
    t.move(7, 7)
    assert dev.interrupt_in(1, 6).ok
    assert ep.state == EpState.RUNNING


def test_stop_and_set_dequeue_commands(tablet):
    t, drv, dev = tablet
    ep = dev.endpoint(0x81)
    assert drv.stop_endpoint(dev.slot, ep.dci).cc == CC.SUCCESS
    assert ep.state == EpState.STOPPED
    assert drv.set_tr_dequeue(dev.slot, ep.dci, ep.ring.base, 1).cc == CC.SUCCESS
    assert ep.context()["dequeue"] << 4 == ep.ring.base
    # Set TR Dequeue on a running endpoint is a Context State Error (4.6.10)
    t.move(1, 1)
    ep.ring.reset()
    assert dev.interrupt_in(1, 6).ok
    assert drv.set_tr_dequeue(dev.slot, ep.dci, ep.ring.base, 1).cc == CC.CONTEXT_STATE_ERROR
    assert drv.reset_endpoint(dev.slot, ep.dci).cc == CC.CONTEXT_STATE_ERROR


def test_small_transfer_rings_wrap(tablet):
    t = Tablet()
    drv, dev = plug(t, transfer_ring_trbs=4, transfer_ring_segments=3)
    for i in range(40):
        assert dev.control(0x80, 6, 0x0100, 0, 18).ok
        t.move(i, 0)
        assert dev.interrupt_in(1, 6).data[1] == i
    assert not drv.unmatched
