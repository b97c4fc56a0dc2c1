"""Every command, driven through the command ring by the scripted guest, including the refusals
the spec requires (Context State Error, Slot Not Enabled, Parameter Error, TRB Error)."""
import pytest

from xhcidbg.devices.keyboard import Keyboard
from xhcidbg.devices.tablet import Tablet
from xhcidbg.emu.context import EP_CTX, INPUT_CTRL_CTX, SLOT_CTX, EpState, SlotState
from xhcidbg.emu.trb import CC
from xhcidbg.emu.trb import TrbType as T
from xhcidbg.guest.device import Device


@pytest.fixture
def tablet(bus):
    t = Tablet()
    bus.controller.attach(t)
    return t


@pytest.fixture
def dev(drv, tablet):
    return Device.enumerate(drv, 1)


def test_no_op_and_set_latency_tolerance(drv):
    assert drv.no_op().cc == CC.SUCCESS
    assert drv.set_latency_tolerance(100).cc == CC.SUCCESS


def test_unknown_command_types_complete_with_trb_error(drv):
    for t in (T.NORMAL, T.SETUP_STAGE, T.FORCE_EVENT,
              T.GET_EXTENDED_PROPERTY, 30, 63):
        assert drv.raw_command(0, 0, t << 10).cc == CC.TRB_ERROR


def test_enable_slots_until_none_are_left(bus):
    from xhcidbg.guest.driver import XhciDriver
    drv = XhciDriver(bus, max_slots=3).start()
    slots = [drv.enable_slot().check().slot for _ in range(3)]
    assert slots == [1, 2, 3]
    assert drv.enable_slot().cc == CC.NO_SLOTS_AVAILABLE
    assert drv.disable_slot(2).cc == CC.SUCCESS
    assert drv.enable_slot().check().slot == 2
    assert drv.enable_slot(slot_type=5).cc == CC.TRB_ERROR


def test_disable_slot_not_enabled(drv):
    assert drv.disable_slot(7).cc == CC.SLOT_NOT_ENABLED
    assert drv.disable_slot(0).cc == CC.SLOT_NOT_ENABLED


def test_address_device_bsr_then_address(drv, tablet):
    dev = Device.enumerate(drv, 1, bsr_first=True, configure=False)
    assert dev.slot_context()["slot_state"] == SlotState.ADDRESSED
    assert dev.slot_context()["usb_address"] == dev.slot
    # A second Address Device on an addressed slot is a state error.
    assert drv.address_device(dev.slot, dev.input.addr).cc == CC.CONTEXT_STATE_ERROR


def test_address_device_refusals(drv, tablet):
    slot = drv.enable_slot().check().slot
    blk = drv.alloc.alloc(33 * 64, 64)
    drv.mem.write(blk, bytes(33 * 64))
    # No DCBAA entry, bad input contexts, null pointer, nonexistent port.
    assert drv.address_device(slot, 0).cc == CC.TRB_ERROR
    drv.mem.write(blk, INPUT_CTRL_CTX.pack(INPUT_CTRL_CTX.encode(add=1)))
    assert drv.address_device(slot, blk).cc == CC.PARAMETER_ERROR
    drv.mem.write(blk, INPUT_CTRL_CTX.pack(INPUT_CTRL_CTX.encode(add=3)))
    drv.mem.write(blk + 32, SLOT_CTX.pack(SLOT_CTX.encode(root_hub_port=99)))
    assert drv.address_device(slot, blk).cc == CC.PARAMETER_ERROR
    drv.mem.write(blk + 32, SLOT_CTX.pack(SLOT_CTX.encode(root_hub_port=1)))
    drv.mem.write(blk + 64, EP_CTX.pack(EP_CTX.encode(ep_type=2, max_packet=64)))
    assert drv.address_device(slot, blk).cc == CC.PARAMETER_ERROR   # not a control endpoint
    assert drv.address_device(99, blk).cc == CC.SLOT_NOT_ENABLED


def test_address_device_on_port_without_device(drv, tablet):
    slot = drv.enable_slot().check().slot
    dev = Device(drv, slot, 2, tablet.speed)   # port 2 is empty
    dev._write_address_input()
    assert drv.address_device(slot, dev.input.addr).cc == CC.USB_TRANSACTION_ERROR


def test_configure_deconfigure_and_state_errors(dev, drv):
    assert dev.slot_context()["slot_state"] == SlotState.CONFIGURED
    in_ep = next(d for d in dev.endpoints if d != 1)
    assert dev.ep_context(in_ep)["ep_state"] == EpState.RUNNING
    dev.deconfigure()
    assert dev.slot_context()["slot_state"] == SlotState.ADDRESSED
    assert dev.ep_context(in_ep)["ep_state"] == EpState.DISABLED
    other = drv.enable_slot().check().slot
    assert drv.configure_endpoint(other, dev.input.addr).cc == CC.CONTEXT_STATE_ERROR


def test_configure_endpoint_parameter_errors(dev, drv):
    inp = dev.input
    csz = dev.csz
    inp.write(0, bytes(inp.size))
    inp.write_dwords(0, INPUT_CTRL_CTX.encode(add=1 << 3))
    inp.write_dwords(4 * csz, EP_CTX.encode(ep_type=0))                   # type not valid
    assert drv.configure_endpoint(dev.slot, inp.addr).cc == CC.PARAMETER_ERROR
    # OUT on IN DCI
    inp.write_dwords(4 * csz, EP_CTX.encode(ep_type=2, max_packet=64, dequeue=0x100))
    assert drv.configure_endpoint(dev.slot, inp.addr).cc == CC.PARAMETER_ERROR
    inp.write_dwords(4 * csz, EP_CTX.encode(ep_type=6, max_packet=512, max_pstreams=4,
                                            dequeue=0x100))
    assert drv.configure_endpoint(dev.slot, inp.addr).cc == CC.PARAMETER_ERROR   # no streams
    inp.write_dwords(0, INPUT_CTRL_CTX.encode(add=0b10))                 # A1 is not allowed
    assert drv.configure_endpoint(dev.slot, inp.addr).cc == CC.TRB_ERROR


def test_evaluate_context_updates_ep0_max_packet(dev, drv):
    dev.ep0.max_packet = 32
    dev.evaluate_ep0()
    assert dev.ep_context(1)["max_packet"] == 32
    slot = drv.enable_slot().check().slot
    assert drv.evaluate_context(slot, dev.input.addr).cc == CC.CONTEXT_STATE_ERROR


def test_stop_endpoint_rewinds_to_the_pending_td_which_then_restarts(dev, drv, tablet):
    ep = dev.endpoint(0x81)
    pending = ep.submit(length=8)                       # the tablet holds it: nothing to report
    assert drv.stop_endpoint(dev.slot, ep.dci).cc == CC.SUCCESS
    assert ep.stop_events[-1].cc == CC.STOPPED
    assert ep.stop_events[-1].param == pending.trb_addrs()[0]
    assert dev.ep_context(ep.dci)["ep_state"] == EpState.STOPPED
    assert dev.ep_context(ep.dci)["dequeue"] << 4 == pending.trb_addrs()[0]
    ep.ring_doorbell()                                   # Stopped -> Running, TD resubmitted
    tablet.move(300, 400)
    assert pending.wait().ok
    assert pending.data[1:5] == (300).to_bytes(2, "little") + (400).to_bytes(2, "little")


def test_stop_reset_and_set_dequeue(dev, drv):
    ep = dev.endpoint(0x81)
    ep.submit(length=8)
    assert drv.stop_endpoint(dev.slot, ep.dci).cc == CC.SUCCESS
    assert drv.stop_endpoint(dev.slot, ep.dci).cc == CC.CONTEXT_STATE_ERROR
    assert drv.reset_endpoint(dev.slot, ep.dci).cc == CC.CONTEXT_STATE_ERROR  # not halted
    deq = ep.ring.base if hasattr(ep.ring, "base") else dev.ep_context(ep.dci)["dequeue"] << 4
    assert drv.set_tr_dequeue(dev.slot, ep.dci, deq, 1).cc == CC.SUCCESS
    assert drv.set_tr_dequeue(dev.slot, ep.dci, deq, 1, stream=3).cc == CC.INVALID_STREAM_ID
    assert drv.set_tr_dequeue(dev.slot, 31, deq, 1).cc == CC.CONTEXT_STATE_ERROR
    assert drv.stop_endpoint(dev.slot, 0).cc == CC.TRB_ERROR


def test_reset_device_returns_slot_to_default(dev, drv):
    assert drv.reset_device(dev.slot).cc == CC.SUCCESS
    ctx = dev.slot_context()
    assert ctx["slot_state"] == SlotState.DEFAULT and ctx["usb_address"] == 0
    assert ctx["context_entries"] == 1
    assert drv.reset_device(dev.slot).cc == CC.CONTEXT_STATE_ERROR


def test_bandwidth_commands(dev, drv):
    assert drv.negotiate_bandwidth(dev.slot).cc == CC.SUCCESS
    assert drv.negotiate_bandwidth(200).cc == CC.SLOT_NOT_ENABLED
    c, ctx = drv.get_port_bandwidth(speed=3)
    assert c.cc == CC.SUCCESS and len(ctx) == 5
    assert ctx[1] > 0 and ctx[3] == 0                   # USB2 ports answer for high speed
    c, ctx = drv.get_port_bandwidth(speed=4)
    assert ctx[3] > 0 and ctx[1] == 0
    assert drv.get_port_bandwidth(speed=9)[0].cc == CC.PARAMETER_ERROR
    assert drv.get_port_bandwidth(speed=3, hub_slot=dev.slot)[0].cc == CC.PARAMETER_ERROR


def test_force_header(drv):
    assert drv.force_header(3, packet_type=4).cc == CC.SUCCESS     # a USB 3 port
    assert drv.force_header(1, packet_type=4).cc == CC.TRB_ERROR   # a USB 2 port


def test_command_abort_while_idle_stops_the_ring(drv):
    assert drv.no_op().cc == CC.SUCCESS                # CRR=1 from the first doorbell on
    ev = drv.abort_command_ring()
    assert ev is not None and ev.cc == CC.COMMAND_RING_STOPPED
    assert drv.no_op().cc == CC.SUCCESS                # the ring restarts where it stopped


def test_two_devices_get_distinct_slots_and_addresses(bus, drv):
    bus.controller.attach(Tablet())
    bus.controller.attach(Keyboard())
    a, b = Device.enumerate(drv, 1), Device.enumerate(drv, 2)
    assert a.slot != b.slot
    assert a.slot_context()["usb_address"] != b.slot_context()["usb_address"]


def test_slot_remembers_the_last_input_context_a_command_read(bus, dev, drv):
    slot = bus.controller.slots[dev.slot]
    assert (slot.input_ctx, slot.input_command) == (dev.input.addr, T.CONFIGURE_ENDPOINT)
    dev.ep0.max_packet = 32
    dev.evaluate_ep0()
    assert slot.input_command == T.EVALUATE_CONTEXT
    # a pointer the controller refuses before reading anything is not remembered
    assert drv.configure_endpoint(dev.slot, 0).cc == CC.TRB_ERROR
    assert (slot.input_ctx, slot.input_command) == (dev.input.addr, T.EVALUATE_CONTEXT)
