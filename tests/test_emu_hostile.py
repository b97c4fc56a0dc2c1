"""Refusal paths: what a malicious or broken guest gets back.  Each case checks the completion
code or controller error a real xHC reports, that the controller stays responsive, and that no
internal error escaped (the `drv` fixture asserts that at teardown)."""
import struct

import pytest
from conftest import raw

from xhcidbg.devices.base import Speed
from xhcidbg.devices.loopback import LoopbackDevice
from xhcidbg.emu import regs as R
from xhcidbg.emu.context import EpState
from xhcidbg.emu.trb import CC, Trb
from xhcidbg.emu.trb import TrbType as T
from xhcidbg.guest.device import Device
from xhcidbg.guest.driver import XhciDriver
from xhcidbg.guest.errors import ControllerError, XhciTimeout

LINK = T.LINK << 10
NORMAL = T.NORMAL << 10
IOC = 1 << 5
CH = 1 << 4


def test_link_trb_loop_on_a_transfer_ring_is_a_trb_error(bus, drv, loop):
    ep = loop.endpoint(0x81)
    here = ep.ring.enqueue_pointer
    # A Link TRB that points at itself: following it would never end (CVE-2017-5973's class).
    events = raw(ep, (here, 0, LINK))
    assert [e.cc for e in events] == [CC.TRB_ERROR]
    assert loop.ep_context(ep.dci)["ep_state"] == EpState.ERROR
    assert drv.no_op().cc == CC.SUCCESS                       # the controller still answers


def test_link_trb_loop_on_the_command_ring_is_a_controller_error(bus, drv):
    cr = drv.cmd_ring
    here = cr.enqueue_pointer
    cr.put(here, 0, LINK)
    drv.ring_doorbell(0, 0)
    bus.wait(lambda: False, 1_000_000)
    assert drv.usbsts & (1 << 12)                            # HCE
    assert drv.usbsts & 1                                    # halted
    drv.reset()                                                # HCRST recovers it
    drv.start()
    assert drv.no_op().cc == CC.SUCCESS


def test_command_ring_in_unmapped_memory_is_a_host_system_error(bus):
    drv = XhciDriver(bus).start()                              # CRR is 0 until the first doorbell
    bus.mmio_write(R.OP_BASE + 0x18, 8, (1 << 40) | 1)         # far past the guest's RAM
    with pytest.raises((ControllerError, XhciTimeout)):
        drv.no_op(timeout_ns=10_000_000)
    assert drv.usbsts & 0x5 == 0x5                             # HSE and HCHalted
    assert bus.system_errors == 1                             # HSEE: out-of-band signal


def test_data_buffer_outside_memory_is_a_data_buffer_error(bus, drv, loop):
    ep = loop.endpoint(0x81)
    events = raw(ep, (1 << 45, 512, NORMAL | IOC))
    assert [e.cc for e in events] == [CC.DATA_BUFFER_ERROR]
    assert loop.ep_context(ep.dci)["ep_state"] == EpState.RUNNING
    assert ep.submit(length=512).wait().ok                     # the endpoint carries on


@pytest.mark.parametrize("trb_type", [T.SETUP_STAGE, T.STATUS_STAGE, T.ISOCH, T.ENABLE_SLOT,
                                      T.TRANSFER_EVENT, 0, 63])
def test_wrong_trb_types_on_a_bulk_ring_are_trb_errors(bus, drv, loop, trb_type):
    ep = loop.endpoint(0x81)
    events = raw(ep, (0x1000, 8, (trb_type << 10) | IOC))
    assert [e.cc for e in events] == [CC.TRB_ERROR]
    loop.endpoint(0x81).set_dequeue(ep.ring.enq_seq)            # Set TR Dequeue clears Error
    assert loop.ep_context(ep.dci)["ep_state"] == EpState.STOPPED
    assert ep.submit(length=64).wait().ok


def test_immediate_data_on_an_in_endpoint_is_a_trb_error(bus, drv, loop):
    ep = loop.endpoint(0x81)
    assert [e.cc for e in raw(ep, (0, 8, NORMAL | IOC | (1 << 6)))] == [CC.TRB_ERROR]


def test_a_td_longer_than_the_cap_is_a_trb_error(bus):
    drv = XhciDriver(bus, transfer_ring_trbs=2048).start()
    bus.controller.attach(LoopbackDevice(speed=Speed.SUPER, pattern=None))
    dev = Device.enumerate(drv, 3)
    ep = dev.endpoint(0x81)
    buf = drv.alloc.buffer(64)
    trbs = [(buf, 1, NORMAL | CH)] * 1100 + [(buf, 1, NORMAL | IOC)]
    events = raw(ep, *trbs)
    assert [e.cc for e in events] == [CC.TRB_ERROR]
    assert bus.controller.internal_errors == 0


def test_control_td_refusals(bus, drv, loop):
    ep0 = loop.ep0
    setup_no_idt = (0x0012_0000_0100_0680, 8, (T.SETUP_STAGE << 10) | (3 << 16))
    status = (0, 0, (T.STATUS_STAGE << 10) | IOC)
    assert [e.cc for e in raw(ep0, setup_no_idt, status)] == [CC.TRB_ERROR]
    loop.endpoint(0).set_dequeue(ep0.ring.enq_seq)
    # Data Stage says OUT while bmRequestType says IN.
    setup = (0x0012_0000_0100_0680, 8, (T.SETUP_STAGE << 10) | (1 << 6) | (3 << 16))
    data_out = (drv.alloc.buffer(18), 18, T.DATA_STAGE << 10)
    assert [e.cc for e in raw(ep0, setup, data_out, status)] == [CC.TRB_ERROR]


def test_doorbells_for_things_that_do_not_exist_are_ignored(bus, drv, loop):
    c = bus.controller
    before = c.refusals
    for slot, value in ((200, 1), (loop.slot, 31), (loop.slot, 0), (loop.slot, 3 | (5 << 16)),
                        (0, 7)):
        bus.mmio_write(R.DB_BASE + 4 * slot, 4, value)
    assert c.refusals == before + 5
    assert drv.no_op().cc == CC.SUCCESS


def test_erst_sizes_are_checked(bus):
    c = bus.controller
    mem = bus.mem
    mem.write(0x3000, struct.pack("<QII", 0x4000, 8, 0) + struct.pack("<QII", 0x5000, 5000, 0))
    bus.mmio_write(R.RT_BASE + 0x28, 4, 2)
    bus.mmio_write(R.RT_BASE + 0x30, 8, 0x3000)
    assert c.interrupters[0].segments == []                    # both segments refused
    bus.mmio_write(R.RT_BASE + 0x28, 4, 0xFFFF)                 # beyond ERST Max
    mem.write(0x3000, struct.pack("<QII", 0x4000, 16, 0) * 32)
    bus.mmio_write(R.RT_BASE + 0x30, 8, 0x3000)
    assert len(c.interrupters[0].segments) == 1 << c.erst_max


def test_event_ring_full_posts_the_error_and_loses_nothing(bus):
    drv = XhciDriver(bus, event_ring_trbs=16, poll=True).start()
    mem = bus.mem
    c = bus.controller
    ring = drv.interrupters[0].ring
    # Fill the 16-TRB event ring with No-Op completions without consuming any.
    cmds = [drv.queue_command(Trb.build(T.NOOP_COMMAND)) for _ in range(20)]
    assert c.interrupters[0].full
    seen = []
    for i in range(16):
        t = Trb.unpack(0, mem.read(ring.blocks[0].addr + 16 * i, 16))
        seen.append((t.type, t.field("cc")))
    assert (T.HOST_CONTROLLER_EVENT, CC.EVENT_RING_FULL) in seen
    assert drv.wait_command(cmds[-1]).cc == CC.SUCCESS         # consuming releases the backlog
    assert all(drv.wait_command(p).cc == CC.SUCCESS for p in cmds)


def test_interrupter_target_out_of_range_goes_to_interrupter_0(bus, drv, loop):
    ep = loop.endpoint(0x81)
    t = ep.submit(length=64, interrupter=60)
    assert t.wait().ok
    assert bus.controller.refusals > 0


def test_max_slots_enabled_is_clamped(bus):
    bus.mmio_write(R.OP_BASE + 0x38, 4, 255)
    assert bus.mmio_read(R.OP_BASE + 0x38, 4) & 0xFF == bus.controller.max_slots

