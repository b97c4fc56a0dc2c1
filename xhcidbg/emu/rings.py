"""The consumer side of a TRB ring: command and transfer rings (xHCI 1.2 section 4.9).

`Ring.fetch()` returns the next TRB owned by the controller (its cycle bit matches the consumer
cycle state), following Link TRBs and toggling the cycle state where they say so.  A guest can
build rings that never end (Link TRBs pointing at each other, CVE-2017-5973's class): a walk that
follows more than `MAX_LINKS` Link TRBs in a row without finding work is refused with `RingError`.

TRBs are read a run at a time (to the end of the 4 KiB page), as a real xHC prefetches.  A cached
TRB is only trusted while its cycle bit says the controller owns it; any other is read again.
The cache is dropped whenever software may legally have rewritten the ring: a doorbell, a new
dequeue pointer (Set TR Dequeue, Stop Endpoint, a restart).
"""
from __future__ import annotations

import struct
from collections.abc import Callable

from .memory import DmaError, GuestMemory
from .trb import CYCLE, TOGGLE_CYCLE, TRB_SIZE, TRB_TYPE, Trb, TrbType

MAX_LINKS = 32
PAGE = 0x1000
_TRB = struct.Struct("<QII")


class RingError(Exception):
    """The ring is malformed (link loop, misaligned pointer); `trb` is where it was noticed."""

    def __init__(self, message: str, addr: int):
        super().__init__(message)
        self.addr = addr


_CYCLE, _TOGGLE = CYCLE.bits, TOGGLE_CYCLE.bits
_TYPE_AT, _TYPE_MASK = TRB_TYPE.lo, TRB_TYPE.mask       # read inline: once per TRB fetched
_TRB_ALIGN = ~(TRB_SIZE - 1)       # ring pointers address whole TRBs


class Ring:
    __slots__ = ("_run", "_run_end", "_run_start", "announce", "ccs", "dequeue", "mem", "name")

    def __init__(self, mem: GuestMemory, dequeue: int = 0, ccs: int = 1, name: str = "",
                 announce: list[Callable[[str, Trb], None]] | None = None):
        self.mem = mem
        self.dequeue = dequeue
        self.ccs = ccs
        self.name = name
        self.announce = announce if announce is not None else []   # hooks.on_trb
        self.invalidate()

    def set_dequeue(self, pointer: int, ccs: int) -> None:
        self.dequeue = pointer & _TRB_ALIGN
        self.ccs = ccs & 1
        self.invalidate()

    def invalidate(self) -> None:
        """Forget prefetched TRBs (software may have rewritten them)."""
        self._run = b""
        self._run_start = self._run_end = 0

    def _load(self, addr: int) -> None:
        n = (PAGE - (addr & (PAGE - 1))) // TRB_SIZE
        try:
            self._run = self.mem.read(addr, n * TRB_SIZE)
        except DmaError:
            self._run = self.mem.read(addr, TRB_SIZE)    # the rest of the page may be unmapped
        self._run_start, self._run_end = addr, addr + len(self._run)

    def _read(self, addr: int) -> Trb:
        if not self._run_start <= addr < self._run_end:
            self._load(addr)
        p, s, c = _TRB.unpack_from(self._run, addr - self._run_start)
        if (c & _CYCLE) != self.ccs and self._run_start != addr:
            # Prefetched before software handed it over?  Look again.
            self._load(addr)
            p, s, c = _TRB.unpack_from(self._run, 0)
        return Trb(addr, p, s, c)

    def peek(self) -> Trb | None:
        """The next TRB software has given us, without consuming it (None if there is none).
        Link TRBs are followed (and consumed) on the way.  Raises DmaError / RingError."""
        links = 0
        while True:
            addr = self.dequeue
            trb = self._read(addr)
            if (trb.control & _CYCLE) != self.ccs:
                return None
            if (trb.control >> _TYPE_AT) & _TYPE_MASK != TrbType.LINK:
                return trb
            for fn in self.announce:
                fn(self.name, trb)
            links += 1
            if links > MAX_LINKS:
                raise RingError(f"{self.name}: more than {MAX_LINKS} Link TRBs in a row "
                                f"(link loop) at {addr:#x}", addr)
            target = trb.param & _TRB_ALIGN
            if trb.control & _TOGGLE:
                self.ccs ^= 1
            self.dequeue = target

    def fetch(self) -> Trb | None:
        trb = self.peek()
        if trb is not None:
            self.dequeue += TRB_SIZE
            for fn in self.announce:
                fn(self.name, trb)
        return trb


__all__ = ["MAX_LINKS", "DmaError", "Ring", "RingError"]
