"""Transfer TRB types through the controller, queued raw on a loopback device's ring."""
from conftest import raw

from xhcidbg.devices.base import Speed
from xhcidbg.devices.loopback import LoopbackDevice
from xhcidbg.emu.trb import CC
from xhcidbg.emu.trb import TrbType as T
from xhcidbg.guest.device import Device

NORMAL = T.NORMAL << 10
IOC = 1 << 5
CH = 1 << 4


def test_no_op_transfer_trbs_complete_with_success(bus, drv, loop):
    ep = loop.endpoint(0x81)
    events = raw(ep, (0, 0, (T.NOOP << 10) | IOC), (0, 0, T.NOOP << 10))   # only one asks IOC
    assert [e.cc for e in events] == [CC.SUCCESS]
    assert ep.submit(length=64).wait().ok                       # the ring moved past both


def test_event_data_trb_reports_the_bytes_of_its_td(bus, drv, loop):
    ep = loop.endpoint(0x81)
    buf = drv.alloc.buffer(1024)
    events = raw(ep, (buf, 512, NORMAL | CH), (buf + 512, 300, NORMAL | CH),
                 (0xE0E0_D0D0, 0, (T.EVENT_DATA << 10) | IOC))
    assert len(events) == 1
    ev = events[0]
    assert ev.event_data and ev.param == 0xE0E0_D0D0
    assert ev.cc == CC.SUCCESS and ev.length == 812               # EDTLA: bytes of the TD


def _held_in_tds(bus, drv, queue_depth):
    """Six bulk IN TDs queued on a loopback device with nothing to loop back yet: how many
    the controller has handed over, and the six once data comes."""
    dev = LoopbackDevice(speed=Speed.SUPER, pattern=None)
    dev.queue_depth = queue_depth
    bus.controller.attach(dev)
    d = Device.enumerate(drv, 3, config_index=1)          # configuration 2: loopback
    reads = [d.endpoint(0x81).submit(length=512) for _ in range(6)]
    bus.wait(lambda: False, 2_000_000)
    handed = len(bus.controller.slots[d.slot].endpoints[3].inflight)
    for n in range(6):
        assert d.endpoint(0x01).submit(bytes([n]) * 512).wait().ok
    return handed, [bytes(r.wait().data[:1]) for r in reads]


def test_a_device_s_queue_depth_bounds_the_tds_it_is_handed_at_once(bus, drv):
    handed, got = _held_in_tds(bus, drv, queue_depth=2)
    assert handed == 2
    assert got == [bytes([n]) for n in range(6)]            # all six, in order


def test_without_a_queue_depth_the_controller_s_own_bound_holds(bus, drv):
    handed, _ = _held_in_tds(bus, drv, queue_depth=None)
    assert handed == 6 <= bus.controller.max_inflight
