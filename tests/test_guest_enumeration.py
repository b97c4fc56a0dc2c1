"""Enumeration by the scripted guest through the real controller (xHCI 1.2 section 4.3)."""
import pytest

from xhcidbg.devices.base import Speed
from xhcidbg.devices.keyboard import Keyboard
from xhcidbg.devices.tablet import Tablet
from xhcidbg.emu.context import EpState, SlotState, XhciEpType
from xhcidbg.emu.trb import TrbType
from xhcidbg.guest.device import Device
from xhcidbg.guest.driver import XhciDriver
from xhcidbg.transport.inproc import InProcessBus


def setup(device, context_size=32, **opts):
    bus = InProcessBus(context_size=context_size)
    drv = XhciDriver(bus, **opts).start()
    port = bus.controller.attach(device)
    return bus, drv, drv.wait_for_connect(port)


def command_names(drv):
    return [c.command.type for c in drv.completions if c.ok]


@pytest.mark.parametrize("context_size", [32, 64])
def test_tablet_full_speed(context_size):
    _bus, drv, port = setup(Tablet(), context_size)
    dev = drv.enumerate(port)
    assert dev.speed == Speed.FULL and dev.port == port
    assert (dev.manufacturer, dev.product, dev.serial) == ("xhcidbg", "xhcidbg USB Tablet",
                                                           "tablet-1")
    assert dev.slot_state == SlotState.CONFIGURED and dev.address_assigned != 0
    slot = dev.slot_context()
    assert slot["root_hub_port"] == port and slot["context_entries"] == 3
    # a full-speed device starts with an 8-byte ep0 and is corrected by Evaluate Context
    assert dev.ep0.max_packet == dev.device_desc.max_packet0 == 64
    assert command_names(drv) == [TrbType.ENABLE_SLOT, TrbType.ADDRESS_DEVICE,
                                  TrbType.EVALUATE_CONTEXT, TrbType.CONFIGURE_ENDPOINT]
    assert dev.ep_context(1)["max_packet"] == dev.ep0.max_packet
    ep = dev.endpoint(0x81)
    ctx = ep.context()
    assert ctx["ep_type"] == XhciEpType.INTERRUPT_IN and ctx["ep_state"] == EpState.RUNNING
    assert ctx["max_packet"] == 8 and ctx["cerr"] == 3
    assert ctx["interval"] == 6          # bInterval 8 frames = 64 microframes = 2**6
    hid = dev.config.interfaces[0]
    assert hid.interface_class == 3 and hid.class_descriptor(0x21) is not None


@pytest.mark.parametrize("speed,mps0,interval", [(Speed.LOW, 8, 6), (Speed.HIGH, 64, 6)])
def test_keyboard_speeds(speed, mps0, interval):
    _bus, drv, port = setup(Keyboard(speed=speed))
    dev = drv.enumerate(port)
    assert dev.speed == speed and dev.ep0.max_packet == mps0
    assert dev.endpoint(0x81).context()["interval"] == interval
    assert TrbType.EVALUATE_CONTEXT not in command_names(drv)    # ep0 guessed right


def test_bsr_first_addresses_twice():
    _bus, drv, port = setup(Tablet())
    dev = drv.enumerate(port, bsr_first=True)
    assert dev.slot_state == SlotState.CONFIGURED
    addressed = [c for c in drv.completions if c.command.type == TrbType.ADDRESS_DEVICE]
    assert [c.command.field("bsr") for c in addressed] == [1, 0]
    assert all(c.ok for c in addressed)


def test_bsr_leaves_slot_default_until_real_address():
    _bus, drv, port = setup(Keyboard(speed=Speed.HIGH))
    drv.reset_port(port)
    slot = drv.enable_slot().check().slot
    dev = Device(drv, slot, port, Speed.HIGH)
    dev._write_address_input()
    drv.address_device(slot, dev.input.addr, bsr=True).check()
    assert dev.slot_state == SlotState.DEFAULT and dev.address_assigned == 0
    head = dev.get_descriptor(1, 0, 8)
    assert head[1] == 1
    dev._write_address_input()
    drv.address_device(slot, dev.input.addr).check()
    assert dev.slot_state == SlotState.ADDRESSED and dev.address_assigned != 0


def test_deconfigure_reconfigure_and_disable():
    _bus, drv, port = setup(Keyboard())
    dev = drv.enumerate(port)
    dev.deconfigure()
    assert dev.slot_state == SlotState.ADDRESSED and list(dev.endpoints) == [1]
    dev.set_configuration(1)
    assert dev.slot_state == SlotState.CONFIGURED and dev.endpoint(0x81).ring
    slot = dev.slot
    dev.disable()
    assert slot not in drv.devices
    again = drv.enumerate(port)
    assert again.slot_state == SlotState.CONFIGURED


def test_two_devices_on_separate_interrupters():
    bus = InProcessBus()
    drv = XhciDriver(bus, interrupters=2).start()
    t, k = Tablet(), Keyboard()
    pt, pk = bus.controller.attach(t), bus.controller.attach(k)
    drv.wait_for_connect(pk)
    dt = drv.enumerate(pt)
    dk = drv.enumerate(pk, interrupter=1)
    before = bus.interrupts[1]
    k.tap("a")
    r = dk.interrupt_in(1, 8)
    assert r.data[2] == 4                       # HID usage of 'a'
    assert r.events[-1].interrupter == 1 and bus.interrupts[1] > before
    t.move(1000, 2000)
    assert dt.interrupt_in(1, 6).events[-1].interrupter == 0
