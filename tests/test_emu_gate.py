"""The execution gate: pause, step one TRB / TD / command, resume; MMIO answered throughout."""
from xhcidbg.devices.base import Speed
from xhcidbg.devices.loopback import LoopbackDevice
from xhcidbg.emu.trb import CC, Trb
from xhcidbg.emu.trb import TrbType as T
from xhcidbg.guest.device import Device


class Seen:
    def __init__(self):
        self.trbs = []
        self.commands = []

    def on_trb(self, ring, trb):
        self.trbs.append((ring, trb.type))

    def on_command(self, result):
        self.commands.append(result.cc)


def test_paused_controller_runs_nothing_but_answers_mmio(bus, drv):
    c = bus.controller
    seen = c.hooks.attach(Seen())
    c.gate.pause()
    pending = [drv.queue_command(Trb.build(T.NOOP_COMMAND)) for _ in range(3)]
    bus.wait(lambda: False, 50_000_000)
    assert seen.trbs == [] and not any(p.done for p in pending)
    assert bus.mmio_read(0, 1) == 0x20                         # registers still answer
    assert c.gate.step("command") == "cmd"
    assert seen.commands == [CC.SUCCESS]
    assert c.gate.step("command") == "cmd"
    assert len(seen.commands) == 2
    c.gate.resume()
    assert all(drv.wait_command(p).cc == CC.SUCCESS for p in pending)
    assert len(seen.commands) == 3


def test_step_one_trb_then_one_td(bus, drv):
    c = bus.controller
    c.attach(LoopbackDevice(speed=Speed.SUPER, pattern=None))
    dev = Device.enumerate(drv, 3)
    seen = c.hooks.attach(Seen())
    ep = dev.endpoint(0x81)
    c.gate.pause()
    t1 = ep.submit(length=3 * 1024, trb_sizes=[1024, 1024, 1024])
    t2 = ep.submit(length=512)
    key = (dev.slot, ep.dci)
    assert c.gate.step("trb") == key and len(seen.trbs) == 1   # first TRB of the chain
    assert not t1.done
    assert c.gate.step("trb") == key and len(seen.trbs) == 2
    assert c.gate.step("td") == key and len(seen.trbs) == 3    # the rest of TD 1, submitted
    drv.service()
    assert not t1.done              # the device answered, but retiring it is the next unit
    assert c.gate.step("td") == key
    drv.service()
    assert t1.done and t1.ok and not t2.done
    assert c.gate.step("td") == key and len(seen.trbs) == 4    # TD 2 fetched and submitted
    assert c.gate.step("td") == key                            # ... and retired
    drv.service()
    assert t2.done
    assert c.gate.step("td") is None                           # nothing left to do
    c.gate.resume()


def test_breakpoint_from_a_hook_stops_after_the_current_unit(bus, drv):
    c = bus.controller

    class BreakOnSecondCommand:
        n = 0

        def on_command(self, result):
            self.n += 1
            if self.n == 2:
                c.gate.pause()

    c.hooks.attach(BreakOnSecondCommand())
    drv.no_op()                                                 # ring running (CRR=1)
    c.gate.resume()
    pending = [drv.queue_command(Trb.build(T.NOOP_COMMAND)) for _ in range(4)]
    bus.wait(lambda: False, 10_000_000)
    drv.service()
    assert c.gate.paused and sum(p.done for p in pending) == 1
    c.gate.resume()
    assert all(drv.wait_command(p).cc == CC.SUCCESS for p in pending)


def test_step_rejects_unknown_units(bus):
    import pytest
    with pytest.raises(ValueError, match="trb, td or command"):
        bus.controller.gate.step("frame")
