"""Root port transitions as a driver sees them in PORTSC and Port Status Change events; one
root port on its own."""
import pytest

from xhcidbg.devices.base import Speed
from xhcidbg.devices.keyboard import Keyboard
from xhcidbg.devices.loopback import LoopbackDevice
from xhcidbg.devices.tablet import Tablet
from xhcidbg.emu import regs as ER
from xhcidbg.emu.context import SlotState
from xhcidbg.emu.hooks import Hooks
from xhcidbg.emu.ports import USB2_RESET_NS, RootPort
from xhcidbg.emu.timing import Scheduler
from xhcidbg.emu.trb import CC
from xhcidbg.guest import regs as R
from xhcidbg.guest.device import Device


def test_empty_ports_are_powered_and_in_rxdetect(drv):
    for st in drv.ports():
        assert st.powered and not st.connected and not st.enabled
        assert st.link_state == ER.PLS_RXDETECT


def test_usb2_connect_reset_enable(bus, drv):
    bus.controller.attach(Tablet(), port=2)
    drv.service()
    assert (2, drv.portsc(2) | R.PORT_CSC) in [(p, v | R.PORT_CSC) for p, v in drv.port_changes]
    st = drv.port_status(2)
    assert st.connected and not st.enabled and st.link_state == ER.PLS_POLLING
    st = drv.reset_port(2)
    assert st.enabled and st.link_state == ER.PLS_U0 and st.speed == Speed.FULL
    assert not st.raw & R.PORT_PR


def test_usb3_connect_enables_without_reset_and_warm_reset(bus, drv):
    port = bus.controller.attach(LoopbackDevice(speed=Speed.SUPER))
    assert port == 3
    drv.service()
    st = drv.port_status(3)
    assert st.connected and st.enabled and st.speed == Speed.SUPER
    st = drv.reset_port(3, warm=True)
    assert st.enabled and st.link_state == ER.PLS_U0
    st = drv.reset_port(3)
    assert st.enabled


def test_reset_of_an_empty_port_sets_prc_without_enabling(drv):
    st = drv.reset_port(1)
    assert not st.enabled and not st.connected


def test_ped_write_disables_usb2_port_and_aborts_transfers(bus, drv):
    bus.controller.attach(Tablet())
    dev = Device.enumerate(drv, 1)
    pending = dev.endpoint(0x81).submit(length=8)
    drv.disable_port(1)
    assert not drv.port_status(1).enabled
    assert pending.wait().cc == CC.USB_TRANSACTION_ERROR


def test_change_bits_are_rw1c_and_each_new_one_raises_an_event(bus):
    from xhcidbg.guest.driver import XhciDriver
    drv = XhciDriver(bus, auto_ack_port_changes=False).start()
    bus.controller.attach(Keyboard())
    drv.service()
    n = len(drv.port_changes)
    assert n == 1 and drv.portsc(1) & R.PORT_CSC
    drv.write_portsc(1)                       # writing 0 to CSC keeps it
    assert drv.portsc(1) & R.PORT_CSC
    drv.clear_port_changes(1, R.PORT_CSC)
    assert not drv.portsc(1) & R.PORT_CSC


def test_detach_while_running_and_reattach_enumerates_again(bus, drv):
    c = bus.controller
    t = Tablet()
    c.attach(t)
    dev = Device.enumerate(drv, 1)
    pending = dev.endpoint(0x81).submit(length=8)
    c.detach(1)
    drv.service()
    st = drv.port_status(1)
    assert not st.connected and not st.enabled
    assert any(p == 1 and not v & R.PORT_CCS for p, v in drv.port_changes)
    assert pending.wait().cc == CC.USB_TRANSACTION_ERROR
    dev.disable()
    for _ in range(20):                       # many cycles: nothing leaks, nothing hangs
        c.attach(t, port=1)
        d = Device.enumerate(drv, 1)
        assert d.slot_context()["slot_state"] == SlotState.CONFIGURED
        c.detach(1)
        d.disable()
    assert len(c.slots) == 0


def test_suspend_and_resume_link_states(bus, drv):
    bus.controller.attach(LoopbackDevice(speed=Speed.SUPER))
    drv.service()
    drv.set_link_state(3, ER.PLS_U3)
    assert drv.port_status(3).link_state == ER.PLS_U3
    drv.set_link_state(3, ER.PLS_U0)
    st = drv.port_status(3)
    assert st.link_state == ER.PLS_U0
    assert st.raw & R.PORT_PLC or any(v & R.PORT_PLC for p, v in drv.port_changes if p == 3)


def test_port_power_off_and_on(bus, drv):
    bus.controller.attach(Tablet())
    drv.power_port(1, on=False)
    st = drv.port_status(1)
    assert not st.powered and not st.connected
    drv.power_port(1, on=True)
    drv.service()
    st = drv.port_status(1)
    assert st.powered and st.connected


def test_attach_refuses_wrong_or_busy_ports(bus):
    c = bus.controller
    c.attach(Tablet(), port=1)
    with pytest.raises(ValueError, match="already has"):
        c.attach(Keyboard(), port=1)
    with pytest.raises(ValueError, match="USB3 port"):
        c.attach(Keyboard(), port=3)
    with pytest.raises(ValueError, match="does not exist"):
        c.attach(Keyboard(), port=9)
    with pytest.raises(ValueError, match="nothing is plugged"):
        c.detach(2)


def test_hcrst_keeps_devices_connected_with_csc(bus, drv):
    bus.controller.attach(Tablet())
    Device.enumerate(drv, 1)
    drv.reset()
    st = drv.port_status(1)
    assert st.connected and st.raw & R.PORT_CSC and not st.enabled
    assert len(bus.controller.slots) == 0


# ---- one RootPort alone: a real device, clock and hooks; fakes only for who it reports to -------
class Listener:
    def __init__(self):
        self.calls = []

    def port_changed(self, port):
        self.calls.append(("changed", port.number))

    def port_disabled(self, port):
        self.calls.append(("disabled", port.number))

    def device_gone(self, port, device):
        self.calls.append(("gone", port.number, device.name))


class Reporter:
    def __init__(self):
        self.refused = []

    def refuse(self, key, message, level="warning"):
        self.refused.append(key)

    def host_system_error(self, why):
        raise AssertionError(why)


def test_a_root_port_alone_connects_resets_and_enables_a_keyboard():
    sched, hooks, listener, reporter = Scheduler(virtual=True), Hooks(), Listener(), Reporter()
    seen = []
    hooks.on_port.append(lambda number, old, new: seen.append(new))
    port = RootPort(2, usb3=False, scheduler=sched, hooks=hooks, errors=reporter,
                    listener=listener)
    regs = {reg.name: (read, write) for reg, read, write in port.registers()}
    portsc = regs["PORTSC"][0]
    assert portsc() == ER.PORTSC.encode(pp=1, pls=ER.PLS_RXDETECT)
    port.plug(Keyboard())
    assert listener.calls == [("changed", 2)]
    assert portsc() == ER.PORTSC.encode(pp=1, ccs=1, csc=1, pls=ER.PLS_POLLING,
                                        speed=int(Speed.FULL))
    regs["PORTSC"][1](ER.PORTSC.mask("pp", "pr"))                    # reset, keep CSC
    assert portsc() & ER.PORTSC.mask("pr") and listener.calls[-1] == ("disabled", 2)
    sched.advance(USB2_RESET_NS)
    assert portsc() == ER.PORTSC.encode(pp=1, ccs=1, ped=1, csc=1, prc=1, pls=ER.PLS_U0,
                                        speed=int(Speed.FULL))
    assert listener.calls[-1] == ("changed", 2) and seen[-1] == portsc()
    regs["PORTSC"][1](ER.PORTSC.mask("pp", "csc", "prc"))            # RW1C: acknowledge both
    assert not portsc() & ER.PORTSC_CHANGE_BITS and port.enabled
    regs["PORTPMSC"][1](0xFFFF_FFFF)                                 # only the USB 2 fields stick
    assert regs["PORTPMSC"][0]() == ER.PORTPMSC_USB2.rw
    regs["PORTSC"][1](ER.PORTSC.mask("pp", "lws") | ER.PORTSC["pls"].put(ER.PLS_U1))
    assert reporter.refused == ["lws21"]                              # U1 is not for USB 2 ports
    port.unplug()
    assert ("gone", 2, "keyboard") in listener.calls and not portsc() & ER.PORTSC.mask("ccs")
