"""The scripted guest driver brings up the real controller: capabilities, HCRST, DCBAA and
scratchpads, command ring, interrupters with multi-segment event rings, ports and hotplug."""
import pytest

from xhcidbg.devices.base import Speed
from xhcidbg.devices.keyboard import Keyboard
from xhcidbg.devices.tablet import Tablet
from xhcidbg.emu.trb import CC, Trb, TrbType
from xhcidbg.guest import regs as R
from xhcidbg.guest.driver import XhciDriver
from xhcidbg.guest.errors import CommandFailed
from xhcidbg.transport.inproc import InProcessBus


def make(controller=None, bus_mode="msix", **opts):
    bus = InProcessBus(mode=bus_mode, **(controller or {}))
    return bus, XhciDriver(bus, **opts).start()


def test_capabilities_and_supported_protocols():
    _bus, drv = make(dict(usb2_ports=3, usb3_ports=5, interrupters=6, max_slots=20,
                         context_size=64))
    caps = drv.caps
    assert (caps.max_ports, caps.max_interrupters, caps.max_slots) == (8, 6, 20)
    assert caps.context_size == 64 and caps.ac64
    assert caps.hciversion >= 0x100 and caps.page_size == 4096
    usb2, usb3 = sorted(caps.protocols, key=lambda p: p.major)
    assert (usb2.major, list(usb2.ports)) == (2, [1, 2, 3])
    assert (usb3.major, list(usb3.ports)) == (3, [4, 5, 6, 7, 8])
    assert usb2.name == "USB " and drv.is_usb3(4) and not drv.is_usb3(3)


def test_start_programs_what_4_2_asks_for():
    _bus, drv = make(interrupters=3, event_ring_segments=4, event_ring_trbs=16, max_slots=10)
    assert not drv.usbsts & R.STS_HCH
    assert drv.usbcmd & (R.CMD_RS | R.CMD_INTE) == R.CMD_RS | R.CMD_INTE
    assert drv.op_read(R.CONFIG) & 0xFF == 10
    assert drv.r64(drv.op + R.DCBAAP) == drv.dcbaa.addr
    # scratchpad buffer array in DCBAA[0], one page-aligned page per buffer
    n = drv.caps.max_scratchpads
    assert n > 0 and len(drv.scratchpads) == n
    assert drv.mem.read_u64(drv.dcbaa.addr) == drv.scratchpad_array.addr
    assert all(drv.mem.read_u64(drv.scratchpad_array.addr + 8 * i) == a and a % 4096 == 0
               for i, a in enumerate(drv.scratchpads))
    # CRCR reads back zero but for CRR (5.4.5)
    assert drv.r64(drv.op + R.CRCR) & ~R.CRCR_CRR == 0
    for it in drv.interrupters:
        regs = drv.interrupter_regs(it.index)
        assert regs["IMAN"] & R.IMAN_IE
        assert regs["ERSTSZ"] == 4 and regs["ERSTBA"] == it.ring.erst.addr


def test_legacy_support_handover():
    _bus, drv = make()
    legacy = [off for cap, off in drv.caps.extended if cap == R.XCAP_LEGACY]
    assert legacy, "the controller should offer USB Legacy Support"
    v = drv.r32(legacy[0])
    assert v & R.LEGSUP_OS_OWNED and not v & R.LEGSUP_BIOS_OWNED


@pytest.mark.parametrize("opts", [
    dict(command_ring_trbs=4, command_ring_segments=3),
    dict(command_ring_trbs=2, command_ring_segments=1),
    dict(command_ring_trbs=3, command_ring_segments=3, toggle_every_link=True),
])
def test_command_ring_wraps_across_segments(opts):
    _bus, drv = make(event_ring_segments=3, event_ring_trbs=16, **opts)
    results = [drv.no_op() for _ in range(40)]
    assert all(r.cc == CC.SUCCESS for r in results)
    seen = {r.command.addr for r in results}
    assert seen == {a for a in (drv.cmd_ring.addr_of(s) for s in range(drv.cmd_ring.capacity))}


def test_event_ring_consumed_across_segments_with_interrupts():
    bus, drv = make(event_ring_segments=4, event_ring_trbs=16)
    before = bus.interrupts[0]
    for _ in range(100):
        drv.no_op()
    ring = drv.interrupters[0].ring
    addrs = {ev.addr for ev in drv.events}
    for blk in ring.blocks:
        assert any(blk.addr <= a < blk.addr + blk.size for a in addrs)
    assert bus.interrupts[0] - before >= 100 // 2
    # ERDP was handed back with EHB cleared and the right segment index
    erdp = drv.interrupter_regs(0)["ERDP"]
    assert erdp & ~0xF == ring.dequeue_pointer and erdp & R.ERDP_EHB == 0


@pytest.mark.parametrize("mode,opts", [
    ("msix", dict(poll=True)),
    ("msix", dict(split_qwords=False, imod_interval=4000)),
    ("intx", dict(interrupters=2)),
])
def test_delivery_modes(mode, opts):
    bus, drv = make(bus_mode=mode, **opts)
    assert all(drv.no_op().ok for _ in range(20))
    bus.controller.attach(Tablet())
    dev = drv.enumerate(drv.wait_for_connect())
    assert dev.product == "xhcidbg USB Tablet"


def test_restart_after_hcrst():
    bus, drv = make()
    bus.controller.attach(Keyboard())
    drv.enumerate(drv.wait_for_connect())
    drv.start()
    assert drv.devices == {} and drv.no_op().ok
    dev = drv.enumerate(drv.wait_for_connect())
    assert dev.slot == 1


def test_commands_refused_with_spec_completion_codes():
    _bus, drv = make(dict(max_slots=2))
    assert drv.raw_command(0, 0, 31 << 10).cc == CC.TRB_ERROR           # reserved TRB type
    assert drv.disable_slot(1).cc == CC.SLOT_NOT_ENABLED
    assert drv.address_device(2, 0x10000).cc == CC.SLOT_NOT_ENABLED
    slots = [drv.enable_slot().check().slot for _ in range(2)]
    assert sorted(slots) == [1, 2]
    assert drv.enable_slot().cc == CC.NO_SLOTS_AVAILABLE
    with pytest.raises(CommandFailed, match="No Slots Available"):
        drv.enable_slot().check()
    assert drv.disable_slot(slots[0]).ok
    assert drv.enable_slot().check().slot == slots[0]
    # the raw path sends exactly what it is given (apart from the cycle bit)
    c = drv.wait_command(drv.queue_command(Trb.build(TrbType.NOOP_COMMAND)))
    assert c.ok and c.command.type == TrbType.NOOP_COMMAND


def test_port_power_reset_and_hotplug_events():
    bus, drv = make()
    kb = Keyboard(speed=Speed.LOW)
    port = bus.controller.attach(kb)
    assert drv.wait_for_connect() == port
    drv.service()
    assert any(p == port and v & R.PORT_CSC for p, v in drv.port_changes)
    st = drv.port_status(port)
    assert st.connected and st.powered and not st.changes      # CSC acknowledged (RW1C)
    st = drv.reset_port(port)
    assert st.enabled and st.speed == Speed.LOW and not st.changes
    dev = drv.enumerate(port)
    assert dev.ep0.max_packet == 8
    drv.port_changes.clear()
    bus.controller.detach(port)
    drv.wait_for(lambda: drv.port_changes, "disconnect event")
    assert not dev.connected and not drv.port_status(port).connected
    assert dev.disable() is None
