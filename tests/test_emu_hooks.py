"""The observer interface: announcements arrive, and observers can rewrite or veto outcomes
(how the fault engine will inject errors)."""
import pytest

from xhcidbg.devices.base import Speed, Status
from xhcidbg.devices.loopback import LoopbackDevice
from xhcidbg.emu.context import EpState
from xhcidbg.emu.hooks import ANNOUNCEMENTS
from xhcidbg.emu.trb import CC, TrbType as T
from xhcidbg.guest.device import Device


@pytest.fixture
def dev(bus, drv):
    bus.controller.attach(LoopbackDevice(speed=Speed.SUPER, pattern=None))
    return Device.enumerate(drv, 3)


def test_every_announcement_is_made_during_an_ordinary_session(bus, drv):
    seen = set()

    class All:
        pass

    for name in ANNOUNCEMENTS:
        setattr(All, f"on_{name}", lambda self, *a, _n=name: seen.add(_n))
    bus.controller.hooks.attach(All())
    bus.controller.attach(LoopbackDevice(speed=Speed.SUPER, pattern=None))
    d = Device.enumerate(drv, 3)
    d.endpoint(0x81).submit(length=64).wait()
    drv.disable_slot(99)                                   # a refusal: 'log'
    assert seen == set(ANNOUNCEMENTS)


def test_an_observer_turns_a_transfer_into_a_stall(bus, drv, dev):
    class Stall:
        def on_urb_complete(self, rec):
            if rec.xfer.endpoint == 0x81:
                rec.xfer.status = Status.STALL
                rec.note = "injected stall"

    bus.controller.hooks.attach(Stall(), first=True)
    t = dev.endpoint(0x81).submit(length=64)
    assert t.wait().cc == CC.STALL_ERROR
    assert dev.ep_context(dev.endpoint(0x81).dci)["ep_state"] == EpState.HALTED


def test_an_observer_rewrites_a_command_completion(bus, drv):
    class Refuse:
        def on_command(self, result):
            if result.trb.type == T.ENABLE_SLOT:
                result.cc = CC.NO_SLOTS_AVAILABLE
                result.slot = 0

    bus.controller.hooks.attach(Refuse())
    assert drv.enable_slot().cc == CC.NO_SLOTS_AVAILABLE
    assert drv.no_op().cc == CC.SUCCESS


def test_an_observer_drops_an_event(bus, drv):
    dropped = []

    class Drop:
        def on_event(self, ev):
            if (ev.dwords[3] >> 10) & 0x3F == T.COMMAND_COMPLETION and not dropped:
                ev.drop = True
                dropped.append(ev)

    bus.controller.hooks.attach(Drop())
    from xhcidbg.guest.errors import XhciTimeout
    with pytest.raises(XhciTimeout):
        drv.no_op(timeout_ns=5_000_000)                     # its completion never arrives
    assert len(dropped) == 1
    assert drv.no_op().cc == CC.SUCCESS


def test_detached_observers_hear_nothing(bus, drv):
    heard = []

    class Ear:
        def on_doorbell(self, *a):
            heard.append(a)

    ear = bus.controller.hooks.attach(Ear())
    drv.no_op()
    n = len(heard)
    bus.controller.hooks.detach(ear)
    drv.no_op()
    assert n >= 1 and len(heard) == n


def test_attach_refuses_objects_that_listen_to_nothing(bus):
    with pytest.raises(TypeError, match="no on_<announcement>"):
        bus.controller.hooks.attach(object())
