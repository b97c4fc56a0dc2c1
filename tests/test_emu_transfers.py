"""Transfer TRB types through the controller, queued raw on a loopback device's ring."""
from conftest import raw

from xhcidbg.emu.trb import CC
from xhcidbg.emu.trb import TrbType as T

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
