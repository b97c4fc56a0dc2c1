"""Rings as the host driver sees them (xHCI 1.2 section 4.9): producer rings (command and
transfer rings) and the consumer side of event rings.

A producer ring is a loop of segments; the last TRB of each segment is a Link TRB to the next
one, and the link closing the loop carries Toggle Cycle.  Positions are tracked as ever-growing
sequence numbers over the usable (non-link) slots: slot = seq % capacity, and the cycle bit of a
slot follows from how many toggling links lie before it.  That makes "how full is the ring",
"which TRB did this event point at" and "what dequeue pointer/cycle skips this TD" plain
arithmetic.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

from ..emu.layout import Layout
from ..emu.trb import TrbType
from . import trb as T
from .alloc import KIB64, BytesLike, GuestAllocator, GuestRam
from .fields import address_field, bits, flag, placed, shift_mask
from .trb import TRB_SIZE

TRB = struct.Struct("<QII")        # parameter, status, control
_DW = struct.Struct("<I")
_CONTROL = 4 * T.CYCLE.dword       # byte offset of the control dword in a TRB
_LINK_TRB = T.LAYOUTS[TrbType.LINK]
_LINK = placed(T.TYPE, TrbType.LINK)
_TC = flag(_LINK_TRB["tc"])
_CH = flag(T.CHAIN)
_CYCLE = flag(T.CYCLE)
_CYCLE_SHIFT, _CYCLE_MASK = shift_mask(T.CYCLE, 3)
# The event ring consumer polls one byte: the one of the control dword holding the cycle bit.
_CYCLE_BYTE = _CONTROL + _CYCLE_SHIFT // 8
_CYCLE_BYTE_SHIFT = _CYCLE_SHIFT % 8
# Event Ring Segment Table entry (6.5, figure 6-40)
ERST_ENTRY = Layout("Event Ring Segment Table Entry", 4, (
    bits("segment_base", 0, 63, 6), bits("segment_size", 2, 15, 0)))
_SEGMENT_BASE = ERST_ENTRY["segment_base"]


class Block:
    """A block of guest RAM the driver owns, accessed through a zero-copy view when the memory
    allows one (plain RAM) and through GuestMemory.read/write otherwise."""

    __slots__ = ("addr", "mem", "size", "view")

    def __init__(self, mem: GuestRam, addr: int, size: int):
        self.mem = mem
        self.addr = addr
        self.size = size
        self.view = mem.view(addr, size) if hasattr(mem, "view") else None

    def read(self, off: int, n: int) -> bytes:
        if self.view is not None:
            return bytes(self.view[off:off + n])
        return self.mem.read(self.addr + off, n)

    def write(self, off: int, data: BytesLike) -> None:
        if self.view is not None:
            self.view[off:off + len(data)] = data
        else:
            self.mem.write(self.addr + off, data)

    def pack(self, st: struct.Struct, off: int, *values: int) -> None:
        if self.view is not None:
            st.pack_into(self.view, off, *values)
        else:
            self.mem.write(self.addr + off, st.pack(*values))

    def unpack(self, st: struct.Struct, off: int) -> tuple[int, ...]:
        if self.view is not None:
            return st.unpack_from(self.view, off)
        return st.unpack(self.mem.read(self.addr + off, st.size))

    def dwords(self, off: int, n: int) -> list[int]:
        return list(struct.unpack_from(f"<{n}I", self.read(off, 4 * n)))

    def write_dwords(self, off: int, dw: Sequence[int]) -> None:
        self.write(off, struct.pack(f"<{len(dw)}I", *dw))


class ProducerRing:
    """A command or transfer ring the driver fills (4.9.2, 4.11.5.1 Link TRBs).

    `toggle_every_link` puts Toggle Cycle on every Link TRB instead of only the one that closes
    the loop: unusual but legal, and a good test of a controller's cycle handling.
    """

    def __init__(self, mem: GuestRam, alloc: GuestAllocator, trbs_per_segment: int = 256,
                 segments: int = 1, name: str = "", toggle_every_link: bool = False):
        if trbs_per_segment < 2 or trbs_per_segment * TRB_SIZE > KIB64:
            raise ValueError("a ring segment holds 2 to 4096 TRBs")
        if segments < 1:
            raise ValueError("a ring needs at least one segment")
        if toggle_every_link and segments % 2 == 0:
            # Each lap must flip the cycle an odd number of times, or last lap's TRBs would
            # look valid again.
            raise ValueError("toggle_every_link needs an odd number of segments")
        self.name = name
        self.mem = mem
        self.alloc = alloc
        self.n = trbs_per_segment
        self.usable = trbs_per_segment - 1
        self.toggle_every_link = toggle_every_link
        # Ring segments: 64-byte aligned, must not cross 64 KiB (table 6-1).
        self.blocks = [Block(mem, alloc.alloc(TRB_SIZE * trbs_per_segment, 64, KIB64),
                             TRB_SIZE * trbs_per_segment) for _ in range(segments)]
        self.capacity = self.usable * segments
        self.reset()

    @property
    def base(self) -> int:
        return self.blocks[0].addr

    @property
    def segments(self) -> list[int]:
        return [b.addr for b in self.blocks]

    def reset(self) -> None:
        """Empty the ring and start over at the first segment with cycle 1."""
        for i, b in enumerate(self.blocks):
            b.write(0, bytes(b.size))
            if self.cycle_of(i * self.usable) == 0:
                # This segment's first lap is written with cycle 0, so "empty" must read 1.
                for off in range(_CONTROL, b.size, TRB_SIZE):
                    b.pack(_DW, off, _CYCLE)
        self.enq_seq = 0        # next slot to fill
        self.deq_seq = 0        # first slot the controller may not have consumed yet
        self._seg = 0
        self._idx = 0
        self.pcs = 1
        self._last_chain = 0

    def free_memory(self) -> None:
        for b in self.blocks:
            self.alloc.free(b.addr)
        self.blocks = []

    # ---- producer ----------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return self.enq_seq - self.deq_seq

    @property
    def space(self) -> int:
        return self.capacity - (self.enq_seq - self.deq_seq)

    @property
    def enqueue_pointer(self) -> int:
        return self.blocks[self._seg].addr + TRB_SIZE * self._idx

    def put(self, param: int, status: int, control: int, cycle_last: bool = False) -> int:
        """Write one TRB (control without the cycle bit) at the enqueue pointer; return its
        address.  The caller checks `space` first."""
        blk = self.blocks[self._seg]
        off = TRB_SIZE * self._idx
        cyc = self.pcs
        if cycle_last:        # leave it invalid; `validate` flips it once the whole TD is there
            cyc ^= 1
        blk.pack(TRB, off, param, status, control | (cyc << _CYCLE_SHIFT))
        self.enq_seq += 1
        self._last_chain = control & _CH
        self._idx += 1
        if self._idx == self.usable:
            self._cross_link()
        return blk.addr + off

    def validate(self, seq: int, control: int) -> None:
        """Give the TRB at `seq` (written with `cycle_last`) its valid cycle bit."""
        slot = seq % self.capacity
        blk = self.blocks[slot // self.usable]
        blk.pack(_DW, TRB_SIZE * (slot % self.usable) + _CONTROL,
                 control | (self.cycle_of(seq) << _CYCLE_SHIFT))

    def _cross_link(self) -> None:
        last = self._seg == len(self.blocks) - 1
        nxt = 0 if last else self._seg + 1
        toggle = last or self.toggle_every_link
        # A Link TRB inside a TD carries the chain bit of the TRB before it (4.11.7).
        ctrl = _LINK | (_TC if toggle else 0) | self._last_chain | (self.pcs << _CYCLE_SHIFT)
        self.blocks[self._seg].pack(TRB, TRB_SIZE * self.usable, self.blocks[nxt].addr, 0, ctrl)
        if toggle:
            self.pcs ^= 1
        self._seg = nxt
        self._idx = 0

    # ---- positions ---------------------------------------------------------------------------
    def addr_of(self, seq: int) -> int:
        slot = seq % self.capacity
        return self.blocks[slot // self.usable].addr + TRB_SIZE * (slot % self.usable)

    def cycle_of(self, seq: int) -> int:
        laps, slot = divmod(seq, self.capacity)
        toggles = (laps * len(self.blocks) + slot // self.usable if self.toggle_every_link
                   else laps)
        return 1 ^ (toggles & 1)

    def seq_of(self, addr: int, allow_consumed: bool = False) -> int | None:
        """The sequence number of the in-flight TRB at `addr`, or None if `addr` is no usable
        slot of this ring or holds nothing the controller still owes an answer for."""
        for s, blk in enumerate(self.blocks):
            off = addr - blk.addr
            if 0 <= off < TRB_SIZE * self.usable and not off % TRB_SIZE:
                slot = s * self.usable + off // TRB_SIZE
                break
        else:
            return None
        lo = self.deq_seq
        if allow_consumed:
            lo = max(0, self.enq_seq - self.capacity)
        seq = lo + (slot - lo) % self.capacity
        return seq if seq < self.enq_seq else None

    def contains(self, addr: int) -> bool:
        return any(0 <= addr - b.addr < b.size for b in self.blocks)

    def consumed_through(self, seq: int) -> None:
        """The controller is done with every slot before `seq`."""
        if seq > self.deq_seq:
            self.deq_seq = min(seq, self.enq_seq)


class EventRing:
    """One interrupter's event ring as its consumer (4.9.4): segments listed in an ERST."""

    def __init__(self, mem: GuestRam, alloc: GuestAllocator, segments: int = 1,
                 trbs_per_segment: int = 256):
        if not 16 <= trbs_per_segment <= 4096:
            raise ValueError("an event ring segment holds 16 to 4096 TRBs (6.5)")
        self.mem = mem
        self.alloc = alloc
        self.sizes = [trbs_per_segment] * segments
        self.blocks = [Block(mem, alloc.alloc(TRB_SIZE * trbs_per_segment, 64, KIB64),
                             TRB_SIZE * trbs_per_segment) for _ in range(segments)]
        # ERST: 64-byte aligned, entries of 16 bytes (6.5).
        self.erst = Block(mem, alloc.alloc(ERST_ENTRY.size * segments, 64),
                          ERST_ENTRY.size * segments)
        for i, b in enumerate(self.blocks):
            entry = ERST_ENTRY.encode(segment_base=address_field(_SEGMENT_BASE, b.addr),
                                      segment_size=trbs_per_segment)
            self.erst.write_dwords(ERST_ENTRY.size * i, entry)
        self.reset()

    def reset(self) -> None:
        for b in self.blocks:
            b.write(0, bytes(b.size))
        self.seg = 0
        self.idx = 0
        self.ccs = 1

    def free_memory(self) -> None:
        for b in self.blocks:
            self.alloc.free(b.addr)
        self.alloc.free(self.erst.addr)
        self.blocks = []

    @property
    def dequeue_pointer(self) -> int:
        return self.blocks[self.seg].addr + TRB_SIZE * self.idx

    def has_event(self) -> bool:
        blk = self.blocks[self.seg]
        off = TRB_SIZE * self.idx
        if blk.view is not None:
            byte = blk.view[off + _CYCLE_BYTE]
        else:
            byte = blk.read(off + _CYCLE_BYTE, 1)[0]
        return (byte >> _CYCLE_BYTE_SHIFT) & 1 == self.ccs

    def pop(self) -> tuple[int, int, int, int] | None:
        """(address, parameter, status, control) of the next event, or None when empty."""
        blk = self.blocks[self.seg]
        off = TRB_SIZE * self.idx
        param, status, control = blk.unpack(TRB, off)
        if (control >> _CYCLE_SHIFT) & _CYCLE_MASK != self.ccs:
            return None
        self.idx += 1
        if self.idx == self.sizes[self.seg]:
            self.idx = 0
            self.seg += 1
            if self.seg == len(self.blocks):
                self.seg = 0
                self.ccs ^= 1
        return blk.addr + off, param, status, control
