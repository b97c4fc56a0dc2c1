"""The consumer side of a TRB ring: command and transfer rings (xHCI 1.2 section 4.9).

`Ring.fetch()` returns the next TRB owned by the controller (its cycle bit matches the consumer
cycle state), following Link TRBs and toggling the cycle state where they say so.  A guest can
build rings that never end (Link TRBs pointing at each other, CVE-2017-5973's class): a walk that
follows more than `MAX_LINKS` Link TRBs in a row without finding work is refused with `RingError`.
"""
from __future__ import annotations

from .memory import DmaError, GuestMemory
from .trb import TRB_SIZE, Trb, TrbType

MAX_LINKS = 32


class RingError(Exception):
    """The ring is malformed (link loop, misaligned pointer); `trb` is where it was noticed."""

    def __init__(self, message: str, addr: int):
        super().__init__(message)
        self.addr = addr


class Ring:
    __slots__ = ("mem", "dequeue", "ccs", "name", "announce")

    def __init__(self, mem: GuestMemory, dequeue: int = 0, ccs: int = 1, name: str = "",
                 announce: list | None = None):
        self.mem = mem
        self.dequeue = dequeue
        self.ccs = ccs
        self.name = name
        self.announce = announce if announce is not None else []   # hooks.on_trb

    def set_dequeue(self, pointer: int, ccs: int) -> None:
        self.dequeue = pointer & ~0xF
        self.ccs = ccs & 1

    def peek(self) -> Trb | None:
        """The next TRB software has given us, without consuming it (None if there is none).
        Link TRBs are followed (and consumed) on the way.  Raises DmaError / RingError."""
        links = 0
        mem = self.mem
        while True:
            addr = self.dequeue
            trb = Trb.unpack(addr, mem.read(addr, TRB_SIZE))
            if (trb.control & 1) != self.ccs:
                return None
            if (trb.control >> 10) & 0x3F != TrbType.LINK:
                return trb
            for fn in self.announce:
                fn(self.name, trb)
            links += 1
            if links > MAX_LINKS:
                raise RingError(f"{self.name}: more than {MAX_LINKS} Link TRBs in a row "
                                f"(link loop) at {addr:#x}", addr)
            target = trb.param & ~0xF
            if trb.control & 2:          # Toggle Cycle
                self.ccs ^= 1
            self.dequeue = target

    def advance(self) -> None:
        self.dequeue += TRB_SIZE

    def fetch(self) -> Trb | None:
        trb = self.peek()
        if trb is not None:
            self.dequeue += TRB_SIZE
            for fn in self.announce:
                fn(self.name, trb)
        return trb


__all__ = ["Ring", "RingError", "DmaError", "MAX_LINKS"]
