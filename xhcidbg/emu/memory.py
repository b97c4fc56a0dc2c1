"""Guest memory as the controller sees it: DMA through one interface with bounds checks.

A `GuestMemory` is a set of mapped regions (guest-physical start, size, backing buffer).  The
in-process bus backs it with one bytearray; the vfio-user transport adds the mmapped file
descriptors QEMU sends with DMA_MAP, or message-based accessors for regions that come without one.
A DMA outside every region raises `DmaError`, which the controller turns into the completion code
or Host System Error a real controller reports.

`on_dma` is the controller's `dma` announcement (the controller puts its hooks' list here): when
someone listens, every read is announced after it and every write before its bytes land, and
`view` gives no zero-copy views, so nothing reaches guest memory unseen.  `peek` and `poke` are
for those who look (the console, the tracer): they are never announced.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

BytesLike = bytes | bytearray | memoryview
Reader = Callable[[int, int], bytes]      # (address, length) -> data, for fd-less regions
Writer = Callable[[int, bytes], None]
DmaListener = Callable[[bool, int, int, BytesLike], None]   # (write, addr, length, data)


class DmaError(Exception):
    def __init__(self, addr: int, length: int, why: str = "not mapped"):
        super().__init__(f"DMA to {addr:#x}+{length:#x} {why}")
        self.addr = addr
        self.length = length


class Region:
    __slots__ = ("end", "reader", "start", "view", "writable", "writer")

    def __init__(self, start: int, size: int, buffer: BytesLike | None = None,
                 reader: Reader | None = None, writer: Writer | None = None,
                 writable: bool = True):
        self.start = start
        self.end = start + size
        self.view = memoryview(buffer).cast("B") if buffer is not None else None
        self.reader = reader
        self.writer = writer
        self.writable = writable


class GuestMemory:
    """Guest-physical address space made of non-overlapping regions."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[Region] = []
        self._last: Region | None = None
        self.on_dma: list[DmaListener] = []

    def twin(self) -> GuestMemory:
        """Another view of the same regions with its own `on_dma`: the in-process bus gives the
        controller one and the guest the other, so only the controller's accesses are
        announced.  Regions mapped later into one are not seen by the other."""
        other = GuestMemory()
        other._starts = list(self._starts)
        other._regions = list(self._regions)
        return other

    # ---- mapping -------------------------------------------------------------------------
    def map(self, start: int, size: int, buffer: BytesLike | None = None, *,
            reader: Reader | None = None, writer: Writer | None = None,
            writable: bool = True) -> Region:
        if size <= 0 or start < 0 or start + size > 1 << 64:
            raise ValueError(f"bad region {start:#x}+{size:#x}")
        if buffer is not None and len(memoryview(buffer).cast("B")) < size:
            raise ValueError("buffer smaller than region")
        i = bisect.bisect_right(self._starts, start)
        if i > 0 and self._regions[i - 1].end > start:
            raise ValueError(f"region {start:#x}+{size:#x} overlaps an existing mapping")
        if i < len(self._regions) and self._regions[i].start < start + size:
            raise ValueError(f"region {start:#x}+{size:#x} overlaps an existing mapping")
        region = Region(start, size, buffer, reader, writer, writable)
        self._starts.insert(i, start)
        self._regions.insert(i, region)
        self._last = None
        return region

    def unmap(self, start: int, size: int) -> list[Region]:
        """Remove every region inside [start, start+size); return them so owners can close."""
        gone = [r for r in self._regions if r.start >= start and r.end <= start + size]
        for r in gone:
            i = self._regions.index(r)
            del self._regions[i]
            del self._starts[i]
            if r.view is not None:
                r.view.release()
        self._last = None
        return gone

    @property
    def regions(self) -> list[Region]:
        return list(self._regions)

    # ---- access --------------------------------------------------------------------------
    def _find(self, addr: int, length: int) -> Region:
        r = self._last
        if r is not None and r.start <= addr and addr + length <= r.end:
            return r
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self._regions[i]
            if addr + length <= r.end:
                self._last = r
                return r
        raise DmaError(addr, length)

    def read(self, addr: int, length: int) -> bytes:
        if length == 0:
            return b""
        if length < 0 or addr < 0:
            raise DmaError(addr, length, "has a negative address or length")
        try:
            r = self._find(addr, length)
        except DmaError:
            return self._read_split(addr, length)
        if r.view is not None:
            off = addr - r.start
            data = bytes(r.view[off:off + length])
        elif r.reader is None:
            raise DmaError(addr, length, "is in a region that cannot be read")
        else:
            data = bytes(r.reader(addr, length))
        if self.on_dma:
            for fn in self.on_dma:
                fn(False, addr, length, data)
        return data

    def view(self, addr: int, length: int) -> memoryview | None:
        """A zero-copy view when [addr, addr+length) lies in one directly mapped region (and
        nobody listens to `on_dma`: what is written through a view is not seen)."""
        if self.on_dma:
            return None
        try:
            r = self._find(addr, length)
        except DmaError:
            return None
        if r.view is None:
            return None
        off = addr - r.start
        return r.view[off:off + length]

    def write(self, addr: int, data: BytesLike) -> None:
        length = len(memoryview(data))
        if length == 0:
            return
        if addr < 0:
            raise DmaError(addr, length, "has a negative address")
        try:
            r = self._find(addr, length)
        except DmaError:
            return self._write_split(addr, data)
        if not r.writable:
            raise DmaError(addr, length, "is read-only")
        if self.on_dma:
            for fn in self.on_dma:
                fn(True, addr, length, data)
        if r.view is not None:
            off = addr - r.start
            r.view[off:off + length] = data
            return
        if r.writer is None:
            raise DmaError(addr, length, "is in a region that cannot be written")
        r.writer(addr, bytes(data))

    # Accesses that straddle two adjacent regions (rare: RAM split at a hole).
    def _pieces(self, addr: int, length: int) -> Iterator[tuple[int, int]]:
        end = addr + length
        pos = addr
        while pos < end:
            i = bisect.bisect_right(self._starts, pos) - 1
            if i < 0 or self._regions[i].end <= pos:
                raise DmaError(addr, length)
            r = self._regions[i]
            n = min(end, r.end) - pos
            yield pos, n
            pos += n

    def _read_split(self, addr: int, length: int) -> bytes:
        return b"".join(self.read(a, n) for a, n in list(self._pieces(addr, length)))

    def _write_split(self, addr: int, data: BytesLike) -> None:
        pieces = list(self._pieces(addr, len(memoryview(data))))
        mv = memoryview(bytes(data))
        for a, n in pieces:
            self.write(a, mv[a - addr:a - addr + n])

    def peek(self, addr: int, length: int) -> bytes:
        """`read` without the announcement (for observers: looking is not a DMA)."""
        listeners, self.on_dma = self.on_dma, []
        try:
            return self.read(addr, length)
        finally:
            self.on_dma = listeners

    def poke(self, addr: int, data: BytesLike) -> None:
        """`write` without the announcement (the console changing guest memory by hand)."""
        listeners, self.on_dma = self.on_dma, []
        try:
            self.write(addr, data)
        finally:
            self.on_dma = listeners

    def read_u32(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 4), "little")

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def write_u32(self, addr: int, value: int) -> None:
        self.write(addr, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, (value & (1 << 64) - 1).to_bytes(8, "little"))


class RamMemory(GuestMemory):
    """Plain RAM from address `base`, the in-process bus's guest memory."""

    def __init__(self, size: int, base: int = 0) -> None:
        super().__init__()
        self.ram = bytearray(size)
        self.map(base, size, self.ram)
