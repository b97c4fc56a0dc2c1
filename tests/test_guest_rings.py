"""The scripted guest's own bookkeeping: allocator rules and ring arithmetic, on real guest RAM."""
import struct

import pytest

from xhcidbg.emu.memory import RamMemory
from xhcidbg.emu.trb import TrbType
from xhcidbg.guest.alloc import KIB64, GuestAllocator, OutOfGuestMemory
from xhcidbg.guest.rings import EventRing, ProducerRing


@pytest.fixture
def ram():
    mem = RamMemory(4 << 20)
    return mem, GuestAllocator(mem, 0x10000, 4 << 20)


def test_alloc_alignment_boundary_and_coalescing(ram):
    _mem, a = ram
    x = a.alloc(100, 64)
    assert x % 64 == 0
    # a 64 KiB-boundary block never straddles a multiple of 64 KiB
    for size in (0x1000, 0x8000, 0xFFF0, KIB64):
        y = a.alloc(size, 64, KIB64)
        assert y // KIB64 == (y + size - 1) // KIB64
    page = a.alloc(4096, 4096, 4096)
    assert page % 4096 == 0
    before = a.free_bytes
    z = a.alloc(0x3000)
    a.free(z)
    assert a.free_bytes == before
    with pytest.raises(ValueError):
        a.free(z)
    with pytest.raises(ValueError):
        a.alloc(0x20000, 64, KIB64)
    with pytest.raises(OutOfGuestMemory):
        a.alloc(8 << 20)


def test_alloc_zeroes_and_buffer_pool(ram):
    mem, a = ram
    x = a.alloc(256)
    mem.write(x, b"\xff" * 256)
    a.free(x)
    assert mem.read(a.alloc(256), 256) == bytes(256)
    b1 = a.buffer(1000)
    assert b1 % 1024 == 0
    a.release(b1)
    assert a.buffer(700) == b1          # same size class comes back from the pool
    big = a.buffer(200000)
    assert big % KIB64 == 0


def _trbs(mem, ring):
    out = []
    for blk in ring.blocks:
        for i in range(ring.n):
            out.append(struct.unpack("<QII", mem.read(blk.addr + 16 * i, 16)))
    return out


def test_producer_ring_links_cycle_and_positions(ram):
    mem, a = ram
    r = ProducerRing(mem, a, trbs_per_segment=4, segments=2)
    assert r.capacity == 6
    addrs = [r.put(i, 0, int(TrbType.NOOP) << 10) for i in range(6)]
    assert r.space == 0
    trbs = _trbs(mem, r)
    # segment 0: three TRBs with cycle 1, then a link (no toggle) to segment 1
    assert [t[2] & 1 for t in trbs[:3]] == [1, 1, 1]
    link0 = trbs[3]
    assert (link0[2] >> 10) & 0x3F == TrbType.LINK and link0[0] == r.blocks[1].addr
    assert not link0[2] & 2
    link1 = trbs[7]
    assert link1[0] == r.blocks[0].addr and link1[2] & 2      # toggle cycle closes the loop
    for seq, addr in enumerate(addrs):
        assert r.addr_of(seq) == addr and r.seq_of(addr) == seq
    assert r.seq_of(r.blocks[0].addr + 48) is None            # the link TRB is no slot
    r.consumed_through(4)
    assert r.space == 4
    nxt = r.put(99, 0, int(TrbType.NOOP) << 10)
    assert nxt == r.blocks[0].addr and r.cycle_of(6) == 0
    assert struct.unpack("<QII", mem.read(nxt, 16))[2] & 1 == 0


def test_toggle_every_link_needs_odd_segments(ram):
    mem, a = ram
    with pytest.raises(ValueError):
        ProducerRing(mem, a, 4, 2, toggle_every_link=True)
    r = ProducerRing(mem, a, 4, 3, toggle_every_link=True)
    # segment 1 is first written with cycle 0, so it starts out holding cycle-1 "old" TRBs
    assert r.cycle_of(3) == 0
    assert all(t[2] & 1 == 1 for t in _trbs(mem, r)[4:7])


def test_event_ring_consumer_crosses_segments_and_toggles(ram):
    mem, a = ram
    er = EventRing(mem, a, segments=2, trbs_per_segment=16)
    erst = [struct.unpack("<QII", mem.read(er.erst.addr + 16 * i, 16)) for i in range(2)]
    assert erst == [(er.blocks[0].addr, 16, 0), (er.blocks[1].addr, 16, 0)]
    assert er.pop() is None

    def produce(n, cycle, start=0):
        for i in range(n):
            seg, idx = divmod(start + i, 16)
            mem.write(er.blocks[seg].addr + 16 * idx,
                      struct.pack("<QII", i, 0, (int(TrbType.PORT_STATUS_CHANGE) << 10) | cycle))

    produce(32, 1)
    got = [er.pop() for _ in range(32)]
    assert all(g is not None for g in got) and er.pop() is None
    assert er.ccs == 0 and er.dequeue_pointer == er.blocks[0].addr
    produce(3, 0)
    assert er.has_event() and er.pop()[0] == er.blocks[0].addr
