"""Guest-side memory bookkeeping: which parts of guest RAM the scripted driver has handed out.

The controller never sees this; it only sees addresses the driver writes into registers, TRBs
and contexts.  The rules the driver must honour come from xHCI 1.2 table 6-1 (alignment and
boundary of every data structure) and section 4.11.7.1 (a TRB buffer must not cross 64 KiB).
"""
from __future__ import annotations

import bisect
from typing import Protocol

KIB64 = 0x10000

BytesLike = bytes | bytearray | memoryview


class GuestRam(Protocol):
    """What the guest needs of its RAM: reads, writes and a zero-copy view of a range where the
    memory allows one (None where it does not, e.g. RAM reached by messages)."""

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: BytesLike) -> None: ...

    def view(self, addr: int, length: int) -> memoryview | None: ...


class OutOfGuestMemory(MemoryError):
    pass


class GuestAllocator:
    """First-fit allocator over [start, end) of guest-physical memory.

    `alloc(size, align, boundary)` returns an address with `addr % align == 0` such that
    [addr, addr+size) does not cross a multiple of `boundary` (0 = no boundary rule).  Freed
    ranges coalesce with their neighbours.  Small data buffers go through `buffer()`, which keeps
    power-of-two free lists so the per-transfer cost stays O(1).
    """

    def __init__(self, mem: GuestRam, start: int, end: int):
        if end <= start:
            raise ValueError("empty allocator window")
        self.mem = mem
        self.start = start
        self.end = end
        self._free_starts: list[int] = [start]
        self._free_ends: list[int] = [end]
        self._sizes: dict[int, int] = {}          # allocated address -> size
        self._pool: dict[int, list[int]] = {}     # size class -> free buffer addresses
        self._view = mem.view(start, end - start) if hasattr(mem, "view") else None

    # ---- general allocation ------------------------------------------------------------------
    def alloc(self, size: int, align: int = 64, boundary: int = 0, zero: bool = True) -> int:
        if size <= 0:
            raise ValueError(f"allocation of {size} bytes")
        if align & (align - 1) or align <= 0:
            raise ValueError(f"alignment {align} is not a power of two")
        if boundary and size > boundary:
            raise ValueError(f"{size} bytes cannot fit inside a {boundary:#x} boundary")
        for i, (fs, fe) in enumerate(zip(self._free_starts, self._free_ends, strict=True)):
            addr = (fs + align - 1) & -align
            if boundary and addr // boundary != (addr + size - 1) // boundary:
                addr = (addr + boundary - 1) // boundary * boundary
            if addr + size > fe:
                continue
            self._take(i, addr, addr + size)
            self._sizes[addr] = size
            if zero:
                self.zero(addr, size)
            return addr
        raise OutOfGuestMemory(f"no {size:#x} bytes (align {align:#x}) left in guest RAM "
                               f"window {self.start:#x}-{self.end:#x}")

    def _take(self, i: int, lo: int, hi: int) -> None:
        fs, fe = self._free_starts[i], self._free_ends[i]
        del self._free_starts[i], self._free_ends[i]
        if hi < fe:
            self._free_starts.insert(i, hi)
            self._free_ends.insert(i, fe)
        if fs < lo:
            self._free_starts.insert(i, fs)
            self._free_ends.insert(i, lo)

    def free(self, addr: int) -> None:
        size = self._sizes.pop(addr, None)
        if size is None:
            raise ValueError(f"{addr:#x} was not allocated here")
        lo, hi = addr, addr + size
        i = bisect.bisect_left(self._free_starts, lo)
        if i > 0 and self._free_ends[i - 1] == lo:          # merge with the range before
            i -= 1
            lo = self._free_starts[i]
            del self._free_starts[i], self._free_ends[i]
        if i < len(self._free_starts) and self._free_starts[i] == hi:   # and the one after
            hi = self._free_ends[i]
            del self._free_starts[i], self._free_ends[i]
        self._free_starts.insert(i, lo)
        self._free_ends.insert(i, hi)

    def size_of(self, addr: int) -> int:
        return self._sizes[addr]

    @property
    def free_bytes(self) -> int:
        return sum(e - s for s, e in zip(self._free_starts, self._free_ends, strict=True))

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    def zero(self, addr: int, size: int) -> None:
        if self._view is not None and self.start <= addr and addr + size <= self.end:
            off = addr - self.start
            self._view[off:off + size] = bytes(size)
        else:
            self.mem.write(addr, bytes(size))

    # ---- data buffers ------------------------------------------------------------------------
    def buffer(self, size: int) -> int:
        """A data buffer of at least `size` bytes, aligned to its power-of-two size class (up to
        64 KiB), so a buffer of up to 64 KiB never crosses a 64 KiB boundary.  Not zeroed."""
        cls = 64
        while cls < size:
            cls <<= 1
        free = self._pool.get(cls)
        if free:
            return free.pop()
        return self.alloc(cls, align=min(cls, KIB64), zero=False)

    def release(self, addr: int) -> None:
        """Give back a buffer from `buffer()`."""
        self._pool.setdefault(self._sizes[addr], []).append(addr)
