"""Interrupters and their event rings (xHCI 1.2 sections 4.9.4, 4.17, 5.5.2).

An interrupter owns an Event Ring Segment Table, the producer side of the event ring (enqueue
pointer and cycle state), and the interrupt moderation state (IMAN.IP, ERDP.EHB, IMOD).
"""
from __future__ import annotations

import struct
from collections import deque
from typing import TYPE_CHECKING

from . import events
from .hooks import EventRecord
from .memory import DmaError
from .trb import CC, TRB_SIZE

if TYPE_CHECKING:
    from .controller import XhciController

ERST_ENTRY = struct.Struct("<QII")     # segment base, size (TRBs), reserved
_EVENT = struct.Struct("<4I")
MIN_SEGMENT_TRBS = 16
MAX_SEGMENT_TRBS = 4096
BACKLOG_LIMIT = 1024                   # events held while the ring is full, then lost


class InterruptSink:
    """Where interrupts go.  Transports implement it; the default drops them."""

    message_signalled = True

    def signal(self, interrupter: int) -> None:
        """Send the MSI/MSI-X message of `interrupter`."""

    def set_level(self, asserted: bool) -> None:
        """Drive the INTx line (used when not message_signalled)."""

    def system_error(self) -> None:
        """Out-of-band Host System Error signalling (USBCMD.HSEE)."""


class Interrupter:
    def __init__(self, hc: XhciController, index: int):
        self.hc = hc
        self.index = index
        self.reset()

    def reset(self) -> None:
        self.ip = 0
        self.ie = 0
        self.imodi = 4000          # 1 ms in 250 ns units: the spec's reset value
        self.imodc = 0
        self.erstsz = 0
        self.erstba = 0
        self.erdp = 0              # dequeue pointer as software wrote it (bits 63:4)
        self.desi = 0
        self.ehb = 0
        self.segments: list[tuple[int, int]] = []    # (base, trbs)
        self.seg = 0
        self.enq_index = 0
        self.pcs = 1
        self.pending = False       # events posted since the last interrupt
        if getattr(self, "_full", False):
            self.full = False
        self._full = False
        self.backlog: deque[EventRecord] = deque()
        self.lost = 0
        self._imod_timer = None
        self.posted = 0

    @property
    def full(self) -> bool:
        return self._full

    @full.setter
    def full(self, value: bool) -> None:
        # The controller keeps a count so its per-TD check is one comparison.
        if value != self._full:
            self.hc.full_event_rings += 1 if value else -1
            self._full = value

    # ---- register side ----------------------------------------------------------------------
    def setup_ring(self) -> None:
        """ERSTBA written: read the segment table and restart the producer at segment 0."""
        self.segments = []
        self.seg = self.enq_index = 0
        self.pcs = 1
        self.full = False
        self.backlog.clear()
        n = self.erstsz
        if n == 0:
            return
        limit = 1 << self.hc.erst_max
        if n > limit:
            self.hc.refuse(f"erstsz{self.index}", f"interrupter {self.index}: ERSTSZ {n} exceeds "
                           f"ERST Max ({limit} entries); using the first {limit}")
            n = limit
        try:
            raw = self.hc.mem.read(self.erstba, n * ERST_ENTRY.size)
        except DmaError as e:
            self.hc.host_system_error(f"interrupter {self.index}: ERST at {self.erstba:#x} "
                                      f"unreadable ({e})")
            return
        for i in range(n):
            base, size, _ = ERST_ENTRY.unpack_from(raw, i * ERST_ENTRY.size)
            base &= ~0x3F
            if not MIN_SEGMENT_TRBS <= size <= MAX_SEGMENT_TRBS:
                self.hc.refuse(f"erstseg{self.index}", f"interrupter {self.index}: event ring "
                               f"segment {i} has {size} TRBs (valid: 16..4096); segment ignored")
                continue
            self.segments.append((base, size))

    def write_erdp(self, lo: int | None = None, hi: int | None = None) -> None:
        if lo is not None:
            if lo & 0x8:
                self.ehb = 0
            self.desi = lo & 7
            self.erdp = (self.erdp & ~0xFFFFFFFF) | (lo & 0xFFFFFFF0)
        if hi is not None:
            self.erdp = (self.erdp & 0xFFFFFFFF) | (hi << 32)
        if self.full and not self._ring_full():
            self.full = False
            while self.backlog and not self.full:
                self._write(self.backlog.popleft())
            if not self.full:
                self.hc.event_ring_has_room()
        # Events still unread after software moved ERDP: interrupt again (4.17.2); none: no
        # interrupt is owed for the ones it has just consumed.
        self.pending = bool(self.segments) and self.erdp != self.enqueue_pointer
        self.try_fire()

    @property
    def enqueue_pointer(self) -> int:
        if not self.segments:
            return 0
        base, _ = self.segments[self.seg]
        return base + self.enq_index * TRB_SIZE

    # ---- producing events -----------------------------------------------------------------------
    def _next_slot(self) -> tuple[int, int]:
        base, size = self.segments[self.seg]
        if self.enq_index + 1 < size:
            return self.seg, self.enq_index + 1
        return (self.seg + 1) % len(self.segments), 0

    def _ring_full(self) -> bool:
        """Full when advancing the enqueue pointer would reach the dequeue pointer."""
        seg, idx = self._next_slot()
        nxt = self.segments[seg][0] + idx * TRB_SIZE
        return nxt == self.erdp

    def post(self, ev: EventRecord, block_interrupt: bool = False) -> None:
        hc = self.hc
        for fn in hc.hooks.on_event:
            fn(ev)
        if ev.drop:
            for fn in hc.hooks.on_event_posted:     # traced as dropped (addr 0)
                fn(ev)
            return
        if not self.segments:
            hc.refuse(f"noring{self.index}", f"interrupter {self.index} has no event ring "
                      f"(ERSTSZ/ERSTBA not set); event lost")
            self.lost += 1
            return
        if self.full:
            if len(self.backlog) >= BACKLOG_LIMIT:
                self.lost += 1
                hc.refuse(f"lost{self.index}", f"interrupter {self.index}: event ring full and "
                          f"backlog at {BACKLOG_LIMIT}; events are being lost")
            else:
                self.backlog.append(ev)
            return
        self._write(ev, block_interrupt)

    def _write(self, ev: EventRecord, block_interrupt: bool = False) -> None:
        seg, idx = self._next_slot()
        if self.segments[seg][0] + idx * TRB_SIZE == self.erdp:
            # The last free TRB gets an Event Ring Full Error; further events wait (4.9.4).
            self.full = True
            full = EventRecord(self.index, events.host_controller_event(CC.EVENT_RING_FULL))
            self.backlog.appendleft(ev)
            ev = full
        addr = self._store(ev.dwords, seg, idx)
        if addr is None:
            return
        ev.addr = addr
        for fn in self.hc.hooks.on_event_posted:
            fn(ev)
        if not block_interrupt:
            self.pending = True
            self.try_fire()

    def write_unobserved(self, dwords: list[int], block_interrupt: bool) -> bool:
        """The common case without observers and with room: no EventRecord is made.  False:
        the ring is about to fill, take the general path (`post`)."""
        seg, idx = self._next_slot()
        if self.segments[seg][0] + idx * TRB_SIZE == self.erdp:
            return False
        if self._store(dwords, seg, idx) is not None and not block_interrupt:
            self.pending = True
            self.try_fire()
        return True

    def _store(self, dw: list[int], seg: int, idx: int) -> int | None:
        """Write one event at the enqueue pointer with our cycle bit and advance to (seg, idx)."""
        dw[3] = (dw[3] & ~1) | self.pcs
        addr = self.enqueue_pointer
        try:
            self.hc.mem.write(addr, _EVENT.pack(*dw))
        except DmaError as e:
            self.hc.host_system_error(f"interrupter {self.index}: event ring write at {addr:#x} "
                                      f"failed ({e})")
            return None
        self.posted += 1
        if seg == 0 and idx == 0:
            self.pcs ^= 1
        self.seg, self.enq_index = seg, idx
        return addr

    # ---- interrupt moderation ---------------------------------------------------------------------
    def try_fire(self) -> None:
        if not self.pending or self.ehb or self._imod_timer is not None:
            return
        hc = self.hc
        if not hc.running:
            return
        self.pending = False
        self.ip = 1
        self.ehb = 1
        hc.usbsts_eint()
        if self.imodi:
            self.imodc = self.imodi
            self._imod_timer = hc.scheduler.call_later(self.imodi * 250, self._imod_expired)
        hc.deliver_interrupt(self)

    def _imod_expired(self) -> None:
        self._imod_timer = None
        self.imodc = 0
        self.try_fire()

    def cancel_timers(self) -> None:
        if self._imod_timer is not None:
            self._imod_timer.cancel()
            self._imod_timer = None
