"""Guest memory QEMU shares with DMA_MAP, mapped into the controller's GuestMemory.

A mapping that comes with a file descriptor is mmapped (the controller then reads and writes guest
RAM directly); the descriptor is closed at once because the mmap holds its own reference, and the
mmap is closed on DMA_UNMAP or disconnect.  A mapping without one (QEMU sends two: the BIOS ROM
and the VGA window) would need VFIO_USER_DMA_READ/WRITE round trips, which QEMU's client does not
answer; xhcidbg maps such ranges as refusing regions, so a controller DMA there fails with a clear
DmaError (the controller reports it as a real one would) instead of hanging the session.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from xhcidbg.emu.memory import DmaError, GuestMemory

from .protocol import DmaMapFlags, DmaUnmapFlags

log = logging.getLogger("xhcidbg.vfio_user")

MAX_ADDRESS = 1 << 64


@dataclass
class Mapping:
    iova: int
    size: int
    writable: bool
    mm: mmap.mmap | None         # None: no fd was shared for this range


class DmaMaps:
    def __init__(self, mem: GuestMemory, max_maps: int = 65535):
        self.mem = mem
        self.max_maps = max_maps
        self.maps: dict[tuple[int, int], Mapping] = {}
        self._unclosed: list[mmap.mmap] = []     # still viewed by someone when unmapped

    def map(self, iova: int, size: int, offset: int, flags: int, fd: int | None) -> int:
        """Returns 0 or an errno.  Always takes ownership of `fd`."""
        try:
            return self._map(iova, size, offset, flags, fd)
        finally:
            if fd is not None:
                os.close(fd)

    def _map(self, iova: int, size: int, offset: int, flags: int, fd: int | None) -> int:
        if (size <= 0 or iova + size > MAX_ADDRESS
                or flags & ~(DmaMapFlags.READ | DmaMapFlags.WRITE)):
            log.warning("DMA_MAP %#x+%#x flags %#x refused: bad range or flags", iova, size, flags)
            return errno.EINVAL
        if len(self.maps) >= self.max_maps:
            log.warning("DMA_MAP refused: already %d mappings", len(self.maps))
            return errno.ENOSPC
        writable = bool(flags & DmaMapFlags.WRITE)
        mm = None
        if fd is not None:
            mm, err = self._mmap(fd, offset, size, writable)
            if mm is None:
                return err
        try:
            if mm is not None:
                with memoryview(mm) as whole:
                    start = offset % mmap.ALLOCATIONGRANULARITY
                    with whole[start:start + size] as view:
                        self.mem.map(iova, size, view, writable=writable)
            else:
                self.mem.map(iova, size, reader=_refuse(iova, size), writer=_refuse(iova, size),
                             writable=writable)
        except ValueError as e:
            log.warning("DMA_MAP %#x+%#x refused: %s", iova, size, e)
            if mm is not None:
                mm.close()
            return errno.EEXIST
        self.maps[(iova, size)] = Mapping(iova, size, writable, mm)
        log.debug("DMA_MAP %#x+%#x%s%s", iova, size, " rw" if writable else " ro",
                  "" if mm is not None else " (no fd: DMA refused there)")
        return 0

    @staticmethod
    def _mmap(fd: int, offset: int, size: int, writable: bool) -> tuple[mmap.mmap | None, int]:
        """(the mapping, 0), or (None, an errno)."""
        try:
            st = os.fstat(fd)
        except OSError as e:
            return None, e.errno or errno.EBADF
        # Touching a shared mapping past the end of its file raises SIGBUS, which would kill the
        # server: a range the file does not cover is refused here instead.
        if stat.S_ISREG(st.st_mode) and offset + size > st.st_size:
            log.warning("DMA_MAP refused: range %#x+%#x runs past the shared file's %#x bytes",
                        offset, size, st.st_size)
            return None, errno.EINVAL
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            return mmap.mmap(fd, size + offset - base, mmap.MAP_SHARED, prot, offset=base), 0
        except (OSError, ValueError, OverflowError) as e:
            log.warning("DMA_MAP refused: mmap of %#x+%#x failed: %s", offset, size, e)
            return None, getattr(e, "errno", None) or errno.EINVAL

    def unmap(self, iova: int, size: int, flags: int) -> int:
        if flags & DmaUnmapFlags.GET_DIRTY_BITMAP:
            log.warning("DMA_UNMAP with a dirty bitmap request refused (no dirty tracking)")
            return errno.ENOTSUP
        if flags & DmaUnmapFlags.ALL:
            self.close()
            return 0
        if flags:
            return errno.EINVAL
        gone = [m for (a, s), m in self.maps.items() if a >= iova and a + s <= iova + size]
        if not gone:
            log.warning("DMA_UNMAP %#x+%#x matches no mapping", iova, size)
            return errno.ENOENT
        for m in gone:
            self._drop(m)
        return 0

    def _drop(self, m: Mapping) -> None:
        del self.maps[(m.iova, m.size)]
        self.mem.unmap(m.iova, m.size)
        if m.mm is not None:
            self._close_mmap(m.mm)
        log.debug("DMA_UNMAP %#x+%#x", m.iova, m.size)

    def _close_mmap(self, mm: mmap.mmap) -> None:
        # A view the controller still holds keeps an mmap open; such ones are retried later.
        self._unclosed.append(mm)
        still = []
        for m in self._unclosed:
            try:
                m.close()
            except BufferError:
                still.append(m)
        self._unclosed = still

    def close(self) -> None:
        for m in list(self.maps.values()):
            self._drop(m)

    @property
    def open_mmaps(self) -> int:
        return sum(1 for m in self.maps.values() if m.mm is not None) + len(self._unclosed)


def _refuse(iova: int, size: int) -> Callable[[int, int | bytes], NoReturn]:
    """The reader and writer of a range shared without a file descriptor: every DMA fails."""
    def refuse(addr: int, data_or_length: int | bytes) -> NoReturn:
        length = data_or_length if isinstance(data_or_length, int) else len(data_or_length)
        raise DmaError(addr, length, f"is in guest memory {iova:#x}+{size:#x} that QEMU shared "
                                     f"without a file descriptor (xhcidbg only DMAs to mapped RAM)")
    return refuse
