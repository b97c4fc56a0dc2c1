"""The function's VFIO regions: what REGION_READ and REGION_WRITE reach, by region index.

BAR0 is the controller's register file, configuration space is `pci.ConfigSpace`, and the MSI-X
BAR (when the function has MSI-X) holds the vector table and the pending bits; every other index
is an empty region.  Each `VfioRegion` has a size and the functions that read and write it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from xhcidbg.emu.controller import XhciController

from .irq import EventfdInterrupts
from .pci import ConfigSpace, FunctionLayout, MsixPlacement
from .protocol import NUM_REGIONS, PciRegion, RegionFlags

# read(offset, count) -> count bytes; write(offset, data).  Offsets are region-relative and
# checked against the region's size before the call.
Reader = Callable[[int, int], bytes]
Writer = Callable[[int, bytes | memoryview], None]


@dataclass(frozen=True)
class VfioRegion:
    """One VFIO region: its size and access functions (None: that direction is refused)."""
    size: int
    read: Reader | None = None
    write: Writer | None = None

    @property
    def flags(self) -> RegionFlags:
        flags = RegionFlags(0)
        if self.read is not None:
            flags |= RegionFlags.READ
        if self.write is not None:
            flags |= RegionFlags.WRITE
        return flags


def aligned_pieces(offset: int, count: int) -> Iterator[tuple[int, int]]:
    """Split an access into naturally aligned 1/2/4/8-byte pieces (registers are accessed so)."""
    end = offset + count
    while offset < end:
        size = 8
        while size > 1 and (offset % size or offset + size > end):
            size >>= 1
        yield offset, size
        offset += size


class ControllerRegisters:
    """BAR0: the controller's register file, accessed in naturally aligned pieces."""

    def __init__(self, controller: XhciController):
        self.hc = controller

    def read(self, offset: int, count: int) -> bytes:
        if count in (1, 2, 4, 8) and offset % count == 0:
            return self.hc.mmio_read(offset, count).to_bytes(count, "little")
        return b"".join(self.hc.mmio_read(o, n).to_bytes(n, "little")
                        for o, n in aligned_pieces(offset, count))

    def write(self, offset: int, data: bytes | memoryview) -> None:
        count = len(data)
        if count in (1, 2, 4, 8) and offset % count == 0:
            self.hc.mmio_write(offset, count, int.from_bytes(data, "little"))
            return
        for o, n in aligned_pieces(offset, count):
            self.hc.mmio_write(o, n, int.from_bytes(data[o - offset:o - offset + n], "little"))


class MsixBar:
    """The BAR holding the MSI-X table and PBA.  QEMU emulates the table and forwards only PBA
    reads; the table is kept here as plain storage in case a VMM forwards it too."""

    def __init__(self, msix: MsixPlacement, irq: EventfdInterrupts):
        self.msix = msix
        self.irq = irq
        self.table = bytearray(msix.table_size)
        self.reset()

    def reset(self) -> None:
        masked = bytes(12) + (1).to_bytes(4, "little")     # vector control: masked
        for v in range(self.msix.vectors):
            self.table[v * 16:v * 16 + 16] = masked

    def read(self, offset: int, count: int) -> bytes:
        m = self.msix
        out = bytearray(count)
        for i in range(count):
            o = offset + i
            if m.table_offset <= o < m.table_offset + m.table_size:
                out[i] = self.table[o - m.table_offset]
            elif m.pba_offset <= o < m.pba_offset + m.pba_size:
                out[i] = self.irq.pba(o - m.pba_offset, 1)[0]
        return bytes(out)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        m = self.msix
        for i, b in enumerate(bytes(data)):
            o = offset + i
            if m.table_offset <= o < m.table_offset + m.table_size:
                self.table[o - m.table_offset] = b


class FunctionRegions:
    """The region table DEVICE_GET_REGION_INFO describes, from the function's layout."""

    def __init__(self, controller: XhciController, layout: FunctionLayout, config: ConfigSpace,
                 irq: EventfdInterrupts):
        self._regions = {i: VfioRegion(0) for i in range(NUM_REGIONS)}
        bar0 = ControllerRegisters(controller)
        self._regions[PciRegion.BAR0] = VfioRegion(controller.bar_size, bar0.read, bar0.write)
        self.msix_bar: MsixBar | None = None
        if layout.msix is not None:
            self.msix_bar = MsixBar(layout.msix, irq)
            self._regions[layout.msix.bar] = VfioRegion(layout.msix.bar_size, self.msix_bar.read,
                                                        self.msix_bar.write)
        self._regions[PciRegion.CONFIG] = VfioRegion(config.size, config.read, config.write)

    def get(self, index: int) -> VfioRegion | None:
        return self._regions.get(index)

    def reset(self) -> None:
        """DEVICE_RESET: the MSI-X table returns to all vectors masked."""
        if self.msix_bar is not None:
            self.msix_bar.reset()
