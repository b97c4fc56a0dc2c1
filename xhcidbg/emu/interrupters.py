"""Interrupters and their event rings (xHCI 1.2 sections 4.9.4, 4.17, 5.5.2).

An interrupter owns an Event Ring Segment Table, the producer side of the event ring (enqueue
pointer and cycle state), and the interrupt moderation state (IMAN.IP, ERDP.EHB, IMOD).
"""
from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Protocol

from . import events
from . import regs as R
from .hooks import EventRecord, Hooks
from .layout import hi32, lo32
from .memory import DmaError, GuestMemory
from .mmio import Binding, ErrorReporter, with_hi32, with_lo32
from .timing import Scheduler, Timer
from .trb import CC, TRB_SIZE

ERST_ENTRY = struct.Struct("<QII")     # segment base, size (TRBs), reserved
_EVENT = struct.Struct("<4I")
MIN_SEGMENT_TRBS = 16
MAX_SEGMENT_TRBS = 4096
BACKLOG_LIMIT = 1024                   # events held while the ring is full, then lost
SEGMENT_ALIGN = 64                     # event ring segments are 64-byte aligned (6.5)
IMOD_RESET = 4000                      # IMODI after reset: 1 ms in 250 ns units (5.5.2.2)

# Register fields, from the declarations in regs.py
_IP, _IE = R.IMAN["ip"], R.IMAN["ie"]
_IMODI, _IMODC = R.IMOD["imodi"], R.IMOD["imodc"]
_ERSTSZ = R.ERSTSZ["size"]
_EHB, _DESI = R.ERDP_LO["ehb"], R.ERDP_LO["desi"]
_ERDP_PTR = R.ERDP_LO["pointer_lo"].bits
# IMAN and ERDP are read on every interrupt: shifts, not Field.put calls
_IP_AT, _IE_AT, _EHB_AT, _DESI_AT = _IP.lo, _IE.lo, _EHB.lo, _DESI.lo


class InterruptSink:
    """Where interrupts go.  Transports implement it; the default drops them."""

    @property
    def message_signalled(self) -> bool:
        """MSI or MSI-X is on (the default sink: always); else the INTx line is used."""
        return True

    def signal(self, interrupter: int) -> None:
        """Send the MSI/MSI-X message of `interrupter`."""

    def set_level(self, asserted: bool) -> None:
        """Drive the INTx line (used when not message_signalled)."""

    def system_error(self) -> None:
        """Out-of-band Host System Error signalling (USBCMD.HSEE)."""


class InterruptRouter(Protocol):
    """The controller as an interrupter sees it: whether it runs, USBSTS.EINT, and the path of
    an interrupt through USBCMD.INTE to the transport's sink."""

    @property
    def running(self) -> bool: ...

    def usbsts_eint(self) -> None: ...

    def deliver_interrupt(self, ir: Interrupter) -> None: ...

    def update_intx(self) -> None: ...


class Interrupter:
    """One interrupter: its register set, its event ring and its moderation state.

    `on_full(full)` hears when the event ring fills up and when it has room again (the
    controller stops processing rings meanwhile); `on_room()` is called once the events held
    back while it was full are written."""

    def __init__(self, index: int, *, mem: GuestMemory, scheduler: Scheduler, hooks: Hooks,
                 errors: ErrorReporter, router: InterruptRouter, erst_max: int,
                 on_full: Callable[[bool], None], on_room: Callable[[], None]):
        self.index = index
        self.mem = mem
        self.scheduler = scheduler
        self.hooks = hooks
        self.errors = errors
        self.router = router
        self.erst_max = erst_max
        self.on_full = on_full
        self.on_room = on_room
        self._full = False
        self._imod_timer: Timer | None = None
        self.reset()

    def reset(self) -> None:
        self.cancel_timers()
        self.ip = 0
        self.ie = 0
        self.imodi = IMOD_RESET
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
        self.full = False
        self.backlog: deque[EventRecord] = deque()
        self.lost = 0
        self.posted = 0

    @property
    def full(self) -> bool:
        return self._full

    @full.setter
    def full(self, value: bool) -> None:
        if value != self._full:
            self._full = value
            self.on_full(value)

    # ---- registers ----------------------------------------------------------------------------
    def registers(self) -> tuple[Binding, ...]:
        """This interrupter's register set (5.5.2), with the handlers that answer it."""
        return ((R.IMAN, self.read_iman, self.write_iman),
                (R.IMOD, self.read_imod, self.write_imod),
                (R.ERSTSZ, self.read_erstsz, self.write_erstsz),
                (R.ERSTBA_LO, lambda: lo32(self.erstba), self.write_erstba_lo),
                (R.ERSTBA_HI, lambda: hi32(self.erstba), self.write_erstba_hi),
                (R.ERDP_LO, self.read_erdp_lo, self.write_erdp_lo),
                (R.ERDP_HI, lambda: hi32(self.erdp), self.write_erdp_hi))

    def read_iman(self) -> int:
        return self.ip << _IP_AT | self.ie << _IE_AT

    def write_iman(self, value: int) -> None:
        was_ie = self.ie
        if value & _IP.bits:
            self.ip = 0
        self.ie = _IE.of(value)
        if self.ie and not was_ie and self.ip:
            self.router.deliver_interrupt(self)
        self.router.update_intx()

    def read_imod(self) -> int:
        return _IMODI.put(self.imodi) | _IMODC.put(self.imodc)

    def write_imod(self, value: int) -> None:
        self.imodi = _IMODI.of(value)
        self.imodc = _IMODC.of(value)

    def read_erstsz(self) -> int:
        return self.erstsz

    def write_erstsz(self, value: int) -> None:
        self.erstsz = _ERSTSZ.of(value)

    def write_erstba_lo(self, value: int) -> None:
        self.erstba = with_lo32(self.erstba, value & R.ERSTBA_LO.rw)

    def write_erstba_hi(self, value: int) -> None:
        self.erstba = with_hi32(self.erstba, value)
        self.setup_ring()

    def read_erdp_lo(self) -> int:
        return self.erdp & _ERDP_PTR | self.ehb << _EHB_AT | self.desi << _DESI_AT

    def write_erdp_lo(self, value: int) -> None:
        if value & _EHB.bits:
            self.ehb = 0
        self.desi = _DESI.of(value)
        self.erdp = with_lo32(self.erdp, value & _ERDP_PTR)
        self._erdp_moved()

    def write_erdp_hi(self, value: int) -> None:
        self.erdp = with_hi32(self.erdp, value)
        self._erdp_moved()

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
        limit = 1 << self.erst_max
        if n > limit:
            self.errors.refuse(f"erstsz{self.index}", f"interrupter {self.index}: ERSTSZ {n} "
                               f"exceeds ERST Max ({limit} entries); using the first {limit}")
            n = limit
        try:
            raw = self.mem.read(self.erstba, n * ERST_ENTRY.size)
        except DmaError as e:
            self.errors.host_system_error(f"interrupter {self.index}: ERST at {self.erstba:#x} "
                                          f"unreadable ({e})")
            return
        for i in range(n):
            base, size, _ = ERST_ENTRY.unpack_from(raw, i * ERST_ENTRY.size)
            base &= ~(SEGMENT_ALIGN - 1)
            if not MIN_SEGMENT_TRBS <= size <= MAX_SEGMENT_TRBS:
                self.errors.refuse(f"erstseg{self.index}", f"interrupter {self.index}: event "
                                   f"ring segment {i} has {size} TRBs (valid: 16..4096); "
                                   f"segment ignored")
                continue
            self.segments.append((base, size))

    def _erdp_moved(self) -> None:
        if self.full and not self._ring_full():
            self.full = False
            while self.backlog and not self.full:
                self._write(self.backlog.popleft())
            if not self.full:
                self.on_room()
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

    # ---- producing events ---------------------------------------------------------------------
    def _next_slot(self) -> tuple[int, int]:
        size = self.segments[self.seg][1]
        if self.enq_index + 1 < size:
            return self.seg, self.enq_index + 1
        return (self.seg + 1) % len(self.segments), 0

    def _ring_full(self) -> bool:
        """Full when advancing the enqueue pointer would reach the dequeue pointer."""
        seg, idx = self._next_slot()
        nxt = self.segments[seg][0] + idx * TRB_SIZE
        return nxt == self.erdp

    def post(self, ev: EventRecord, block_interrupt: bool = False) -> None:
        hooks = self.hooks
        for fn in hooks.on_event:
            fn(ev)
        if ev.drop:
            for fn in hooks.on_event_posted:     # traced as dropped (addr 0)
                fn(ev)
            return
        if not self.segments:
            self.errors.refuse(f"noring{self.index}", f"interrupter {self.index} has no event ring "
                      f"(ERSTSZ/ERSTBA not set); event lost")
            self.lost += 1
            return
        if self.full:
            if len(self.backlog) >= BACKLOG_LIMIT:
                self.lost += 1
                self.errors.refuse(f"lost{self.index}", f"interrupter {self.index}: event ring "
                                   f"full and backlog at {BACKLOG_LIMIT}; events are being lost")
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
        for fn in self.hooks.on_event_posted:
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
            self.mem.write(addr, _EVENT.pack(*dw))
        except DmaError as e:
            self.errors.host_system_error(f"interrupter {self.index}: event ring write at "
                                          f"{addr:#x} failed ({e})")
            return None
        self.posted += 1
        if seg == 0 and idx == 0:
            self.pcs ^= 1
        self.seg, self.enq_index = seg, idx
        return addr

    # ---- interrupt moderation -----------------------------------------------------------------
    def try_fire(self) -> None:
        if not self.pending or self.ehb or self._imod_timer is not None:
            return
        router = self.router
        if not router.running:
            return
        self.pending = False
        self.ip = 1
        self.ehb = 1
        router.usbsts_eint()
        if self.imodi:
            self.imodc = self.imodi
            self._imod_timer = self.scheduler.call_later(self.imodi * R.IMOD_UNIT_NS,
                                                         self._imod_expired)
        router.deliver_interrupt(self)

    def _imod_expired(self) -> None:
        self._imod_timer = None
        self.imodc = 0
        self.try_fire()

    def cancel_timers(self) -> None:
        if self._imod_timer is not None:
            self._imod_timer.cancel()
            self._imod_timer = None
