"""Hostile-guest property test: random MMIO and random guest memory never break the controller.

Nothing may escape as an exception (the controller counts internal errors it caught at its
boundary; they must stay 0), nothing may hang, and every MMIO write does bounded work.
"""
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xhcidbg.emu import regs as R
from xhcidbg.emu.gate import UNITS_PER_TURN
from xhcidbg.emu.rings import MAX_LINKS
from xhcidbg.emu.transfers import TRBS_PER_STEP
from xhcidbg.transport.inproc import InProcessBus

RAM = 1 << 20
OP, RT, DB = R.OP_BASE, R.RT_BASE, R.DB_BASE
INTERESTING = [OP, OP + 4, OP + 0x18, OP + 0x1C, OP + 0x30, OP + 0x34, OP + 0x38,
               RT + 0x20, RT + 0x24, RT + 0x28, RT + 0x30, RT + 0x34, RT + 0x38, RT + 0x3C,
               DB, DB + 4, DB + 8, R.PORT_BASE, R.PORT_BASE + 0x10, R.PORT_BASE + 0x20,
               R.PORT_BASE + 0x30, R.XECP_BASE, R.XECP_BASE + 4]
# Bound per MMIO write: gate turns x TRBs per step x link hops, plus the command path.
MAX_TRBS_PER_WRITE = UNITS_PER_TURN * TRBS_PER_STEP * (MAX_LINKS + 1) * 2

pointers = st.one_of(st.integers(0, RAM - 16).map(lambda a: a & ~0xF),
                     st.integers(0, 2 ** 64 - 1), st.sampled_from([0, 0x1000, 0x2000, 0x3000]))
values = st.one_of(st.integers(0, 2 ** 32 - 1), st.sampled_from([0, 1, 2, 5, 0x1000, 0x1001]))
trb = st.builds(lambda p, s, t, c, x: struct.pack("<QII", p, s, (t << 10) | c | (x & 0xFFFF03FE)),
                pointers, st.integers(0, 2 ** 32 - 1), st.integers(0, 63), st.integers(0, 1),
                st.integers(0, 2 ** 32 - 1))
chunks = st.lists(st.tuples(st.integers(0, RAM // 16 - 64), st.lists(trb, max_size=48)),
                  max_size=8)
ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.sampled_from(INTERESTING), st.sampled_from([4, 4, 4, 8, 1, 2]),
              values),
    st.tuples(st.just("w"), st.integers(0, R.BAR_SIZE - 1), st.sampled_from([1, 2, 4, 8]),
              values),
    st.tuples(st.just("r"), st.integers(0, R.BAR_SIZE - 1), st.sampled_from([1, 2, 4, 8]),
              st.just(0)),
    st.tuples(st.just("t"), st.integers(0, 50_000_000), st.just(0), st.just(0)),
), max_size=80)


def ready_controller(bus):
    """A controller a guest has set up plausibly, so random input reaches deep paths."""
    w = bus.mmio_write
    w(OP + 0x38, 4, 8)
    w(OP + 0x30, 8, 0x1000)
    w(OP + 0x18, 8, 0x2000 | 1)
    bus.mem.write(0x3000, struct.pack("<QII", 0x4000, 64, 0))
    w(RT + 0x28, 4, 1)
    w(RT + 0x38, 8, 0x4000)
    w(RT + 0x30, 8, 0x3000)
    w(RT + 0x20, 4, 2)
    w(OP, 4, 5)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(setup=st.booleans(), memory=chunks, program=ops, csz=st.sampled_from([32, 64]))
def test_random_mmio_and_memory_never_break_the_controller(setup, memory, program, csz):
    bus = InProcessBus(ram_size=RAM, context_size=csz, usb2_ports=2, usb3_ports=2)
    c = bus.controller
    fetched = [0]
    c.hooks.attach(type("Count", (), {"on_trb": lambda self, ring, t: fetched.__setitem__(
        0, fetched[0] + 1)})())
    if setup:
        ready_controller(bus)
    for index, trbs in memory:
        bus.mem.write(index * 16, b"".join(trbs))
    for kind, off, size, value in program:
        fetched[0] = 0
        if kind == "w":
            bus.mmio_write(off, size, value)
            assert fetched[0] <= MAX_TRBS_PER_WRITE
        elif kind == "r":
            assert 0 <= bus.mmio_read(off, size) < 1 << (8 * size)
        else:
            bus.scheduler.advance(off)
        assert c.internal_errors == 0
        assert bus.scheduler.errors == 0


# ---- the same, with enumerated devices: random TRBs on live transfer and command rings ------
from xhcidbg.devices.base import Speed  # noqa: E402
from xhcidbg.devices.loopback import LoopbackDevice  # noqa: E402
from xhcidbg.devices.tablet import Tablet  # noqa: E402
from xhcidbg.guest.driver import XhciDriver  # noqa: E402

live_trb = st.tuples(pointers, st.integers(0, 2 ** 32 - 1),
                     st.integers(0, 63).map(lambda t: t << 10),
                     st.integers(0, 2 ** 32 - 1).map(lambda x: x & 0xFFFF03FE))
live_ops = st.lists(st.one_of(
    st.tuples(st.just("ep"), st.sampled_from([1, 2, 3, 4, 5]), st.lists(live_trb, max_size=6)),
    st.tuples(st.just("cmd"), st.just(0), st.lists(live_trb, max_size=3)),
    st.tuples(st.just("mmio"), st.sampled_from(INTERESTING), st.lists(st.just((0, 0, 0, 0)),
                                                                       max_size=1)),
    st.tuples(st.just("time"), st.integers(0, 20_000_000), st.just([])),
), max_size=30)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(program=live_ops, seed=st.integers(0, 2 ** 32 - 1))
def test_random_trbs_on_live_rings_never_break_the_controller(program, seed):
    bus = InProcessBus(ram_size=8 << 20, usb2_ports=2, usb3_ports=2)
    c = bus.controller
    c.attach(LoopbackDevice(speed=Speed.SUPER, pattern=None))
    c.attach(Tablet())
    drv = XhciDriver(bus, ram_end=6 << 20).start()
    devs = [drv.enumerate(3), drv.enumerate(1)]
    rings = [(d, ep) for d in devs for ep in d.endpoints.values()]
    fetched = [0]
    c.hooks.attach(type("Count", (), {"on_trb": lambda self, ring, t: fetched.__setitem__(
        0, fetched[0] + 1)})())
    for kind, which, trbs in program:
        fetched[0] = 0
        if kind == "ep":
            dev, ep = rings[which % len(rings)]
            for p, s, t, x in trbs:
                if ep.ring.space > 1:
                    ep.ring.put(p, s, t | x)
            bus.mmio_write(R.DB_BASE + 4 * dev.slot, 4, ep.dci)
        elif kind == "cmd":
            for p, s, t, x in trbs:
                if drv.cmd_ring.space > 1:
                    drv.cmd_ring.put(p, s, t | x)
            bus.mmio_write(R.DB_BASE, 4, 0)
        elif kind == "mmio":
            bus.mmio_write(which, 4, seed & 0xFFFFFFFF)
        else:
            bus.scheduler.advance(which)
        assert fetched[0] <= MAX_TRBS_PER_WRITE
        assert c.internal_errors == 0 and bus.scheduler.errors == 0
