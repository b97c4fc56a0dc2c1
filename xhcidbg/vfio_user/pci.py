"""The PCI function the guest sees: configuration space of an xHCI host controller.

The whole configuration space is one table of `ConfigRegister`s (offset, size, reset value, which
bits software may write, which bits are write-1-to-clear).  `ConfigSpace` derives its byte image
and write masks from that table; reads and writes from the VMM go through it, so read-only and
RW1C bits behave as a real function's do whatever size or alignment the access has.

Identity
--------
xhcidbg owns no PCI-SIG vendor ID, and QEMU's Red Hat ids (1b36:000d is `qemu-xhci`) belong to
QEMU's own controller, so borrowing them would make the guest and lspci believe it talks to QEMU's
device.  The default pair is vendor 0x1ef3, device 0x0330: 0x1ef3 was unassigned in the public
pci.ids database when chosen, so tools show "unknown vendor" rather than someone else's product;
the device id echoes the xHCI class code.  Linux binds `xhci_hcd` by class code 0x0c0330, and none
of the vendor-keyed quirks in xhci-pci match it, so the guest runs the generic xHCI path - exactly
what an emulator under test wants.  Any other pair can be given through `PciIdentity`.

Layout
------
BAR0 (64-bit memory): the xHCI registers, `controller.bar_size` bytes.  BAR2 (32-bit memory): the
MSI-X table at 0 and its PBA on the next page; QEMU emulates the table itself and forwards only
PBA reads, so BAR0 stays exactly the controller's register file.  Capabilities: power management
(0x40), MSI 64-bit (0x50), MSI-X (0x70); the xHCI-specific SBRN (0x60), FLADJ (0x61) and DBESL
(0x62) sit between them where the xHCI specification puts them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

CONFIG_SIZE = 256
PAGE = 4096

# Command register bits (I/O space, bit 0, stays 0: the function has no I/O BAR)
CMD_MEMORY = 1 << 1
CMD_BUS_MASTER = 1 << 2
CMD_PARITY = 1 << 6
CMD_SERR = 1 << 8
CMD_INTX_DISABLE = 1 << 10
# Status register bits
STS_INTERRUPT = 1 << 3
STS_CAP_LIST = 1 << 4
STS_SIGNALED_SERR = 1 << 14
STS_ERRORS = 0xF900          # master parity, target aborts, master abort, SERR, parity: RW1C

CAP_PM = 0x01
CAP_MSI = 0x05
CAP_MSIX = 0x11

PM_OFFSET = 0x40
MSI_OFFSET = 0x50
MSIX_OFFSET = 0x70

MSI_ENABLE = 1 << 0
MSI_64BIT = 1 << 7
MSIX_FUNCTION_MASK = 1 << 14
MSIX_ENABLE = 1 << 15


@dataclass(frozen=True)
class PciIdentity:
    vendor: int = 0x1EF3
    device: int = 0x0330
    subsystem_vendor: int = 0x1EF3
    subsystem: int = 0x0330
    revision: int = 0x01


@dataclass(frozen=True)
class ConfigRegister:
    name: str
    offset: int
    size: int
    value: int = 0
    writable: int = 0            # bits software may change
    clear_on_write: int = 0      # RW1C bits: writing 1 clears them
    doc: str = ""


@dataclass(frozen=True)
class Bar:
    index: int
    size: int                    # power of two, or 0 when unused
    is_64bit: bool = False
    prefetchable: bool = False

    @property
    def flags(self) -> int:
        return (0b100 if self.is_64bit else 0) | (0b1000 if self.prefetchable else 0)


@dataclass(frozen=True)
class MsixPlacement:
    vectors: int
    bar: int
    table_offset: int
    pba_offset: int
    bar_size: int

    @property
    def table_size(self) -> int:
        return self.vectors * 16

    @property
    def pba_size(self) -> int:
        return (self.vectors + 63) // 64 * 8


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


def msix_placement(vectors: int, bar: int = 2) -> MsixPlacement:
    table = _round_up(vectors * 16, PAGE)
    pba = _round_up((vectors + 63) // 64 * 8, PAGE)
    return MsixPlacement(vectors, bar, 0, table, _pow2_at_least(table + pba))


@dataclass(frozen=True)
class FunctionLayout:
    """Everything the PCI function presents, derived from the controller's shape."""
    identity: PciIdentity
    bars: tuple[Bar, ...]
    msix: MsixPlacement | None   # None: no MSI-X capability
    msi_vectors: int             # power of two, 1..32; 0: no MSI capability
    registers: tuple[ConfigRegister, ...] = field(repr=False)


def _bar_registers(bar: Bar) -> list[ConfigRegister]:
    off = 0x10 + 4 * bar.index
    low_mask = ~(bar.size - 1) & 0xFFFFFFF0
    regs = [ConfigRegister(f"BAR{bar.index}", off, 4, bar.flags, low_mask,
                           doc=f"{bar.size:#x} bytes of memory"
                               f"{', 64-bit' if bar.is_64bit else ''}")]
    if bar.is_64bit:
        high_mask = 0xFFFFFFFF & ~((bar.size - 1) >> 32)
        regs.append(ConfigRegister(f"BAR{bar.index + 1}", off + 4, 4, 0, high_mask,
                                   doc=f"upper half of BAR{bar.index}"))
    return regs


def xhci_function(bar0_size: int, interrupters: int, identity: PciIdentity = PciIdentity(),
                  *, msix: bool = True, msi: bool = True) -> FunctionLayout:
    """The function's layout.  `msix`/`msi` False leave that capability out (to make a guest
    fall back to MSI or INTx, as on hardware without them)."""
    if bar0_size < PAGE or bar0_size & (bar0_size - 1):
        raise ValueError(f"BAR0 size {bar0_size:#x} must be a power of two of at least 4 KiB")
    if not 1 <= interrupters <= 1024:
        raise ValueError(f"{interrupters} interrupters: need 1..1024")
    placement = msix_placement(interrupters)
    msi_vectors = min(32, 1 << (interrupters.bit_length() - 1))
    bars = (Bar(0, bar0_size, is_64bit=True),) + ((Bar(placement.bar, placement.bar_size),)
                                                  if msix else ())
    msi_mmc = msi_vectors.bit_length() - 1
    caps = [PM_OFFSET] + ([MSI_OFFSET] if msi else []) + ([MSIX_OFFSET] if msix else [])
    next_cap = dict(zip(caps, [*caps[1:], 0], strict=True))

    regs = [
        ConfigRegister("VID", 0x00, 2, identity.vendor),
        ConfigRegister("DID", 0x02, 2, identity.device),
        ConfigRegister("CMD", 0x04, 2, 0,
                       CMD_MEMORY | CMD_BUS_MASTER | CMD_PARITY | CMD_SERR | CMD_INTX_DISABLE,
                       doc="memory space, bus master, parity, SERR#, INTx disable"),
        ConfigRegister("STS", 0x06, 2, STS_CAP_LIST, 0, STS_ERRORS,
                       doc="capability list; bit 3 follows the INTx line"),
        ConfigRegister("RID", 0x08, 1, identity.revision),
        ConfigRegister("CLASS", 0x09, 3, 0x0C0330, doc="serial bus / USB / xHCI"),
        ConfigRegister("CLS", 0x0C, 1, 0, 0xFF, doc="cache line size"),
        ConfigRegister("LT", 0x0D, 1, 0, 0xFF, doc="latency timer"),
        ConfigRegister("HTYPE", 0x0E, 1, 0x00, doc="type 0, single function"),
        ConfigRegister("SSVID", 0x2C, 2, identity.subsystem_vendor),
        ConfigRegister("SSID", 0x2E, 2, identity.subsystem),
        ConfigRegister("EROM", 0x30, 4, 0, doc="no expansion ROM: reads 0 whatever is written"),
        ConfigRegister("CAP", 0x34, 1, PM_OFFSET),
        ConfigRegister("ILINE", 0x3C, 1, 0, 0xFF),
        ConfigRegister("IPIN", 0x3D, 1, 1, doc="INTA#"),
        # Power management 1.2, D0 and D3hot only; No_Soft_Reset set: D3hot->D0 keeps state.
        ConfigRegister("PM.ID", PM_OFFSET, 2, CAP_PM | next_cap[PM_OFFSET] << 8),
        ConfigRegister("PM.PMC", PM_OFFSET + 2, 2, 0x0003),
        ConfigRegister("PM.PMCSR", PM_OFFSET + 4, 2, 0x0008, 0x0003, doc="power state"),
        # xHCI 1.2 section 5.2: serial bus release 3.0, frame length 60000 clocks.
        ConfigRegister("SBRN", 0x60, 1, 0x30, doc="USB 3.0"),
        ConfigRegister("FLADJ", 0x61, 1, 0x20, 0x3F, doc="frame length adjustment"),
        ConfigRegister("DBESL", 0x62, 1, 0x00, doc="no USB2 LPM best-effort latency"),
    ]
    if msi:     # 64-bit address, no per-vector masking
        regs += [
            ConfigRegister("MSI.ID", MSI_OFFSET, 2, CAP_MSI | next_cap[MSI_OFFSET] << 8),
            ConfigRegister("MSI.CTRL", MSI_OFFSET + 2, 2, MSI_64BIT | msi_mmc << 1,
                           MSI_ENABLE | 0x70, doc="enable, multiple message enable"),
            ConfigRegister("MSI.ADDR", MSI_OFFSET + 4, 4, 0, 0xFFFFFFFC),
            ConfigRegister("MSI.ADDR_HI", MSI_OFFSET + 8, 4, 0, 0xFFFFFFFF),
            ConfigRegister("MSI.DATA", MSI_OFFSET + 12, 2, 0, 0xFFFF),
        ]
    if msix:
        regs += [
            ConfigRegister("MSIX.ID", MSIX_OFFSET, 2, CAP_MSIX | next_cap[MSIX_OFFSET] << 8),
            ConfigRegister("MSIX.CTRL", MSIX_OFFSET + 2, 2, interrupters - 1,
                           MSIX_ENABLE | MSIX_FUNCTION_MASK, doc="enable, function mask"),
            ConfigRegister("MSIX.TABLE", MSIX_OFFSET + 4, 4,
                           placement.table_offset | placement.bar),
            ConfigRegister("MSIX.PBA", MSIX_OFFSET + 8, 4, placement.pba_offset | placement.bar),
        ]
    for bar in bars:
        regs += _bar_registers(bar)
    regs.sort(key=lambda r: r.offset)
    return FunctionLayout(identity, bars, placement if msix else None,
                          msi_vectors if msi else 0, tuple(regs))


class ConfigSpace:
    """Byte image of configuration space with the write semantics of `layout.registers`."""

    def __init__(self, layout: FunctionLayout, size: int = CONFIG_SIZE):
        self.layout = layout
        self.size = size
        self._reset = bytearray(size)
        self._wmask = bytearray(size)
        self._w1c = bytearray(size)
        end = 0
        for r in layout.registers:
            if r.offset < end:
                raise ValueError(f"config register {r.name} at {r.offset:#x} overlaps")
            end = r.offset + r.size
            self._reset[r.offset:end] = r.value.to_bytes(r.size, "little")
            self._wmask[r.offset:end] = r.writable.to_bytes(r.size, "little")
            self._w1c[r.offset:end] = r.clear_on_write.to_bytes(r.size, "little")
        self.data = bytearray(self._reset)
        # Called after every write with (offset, size) so owners can react to enables.
        self.on_write: Callable[[int, int], None] | None = None
        self._refresh()

    def reset(self) -> None:
        self.data[:] = self._reset
        self._refresh()

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes | memoryview) -> None:
        d, wm, w1c = self.data, self._wmask, self._w1c
        pmcsr = PM_OFFSET + 4
        power_state = d[pmcsr] & 3
        for i, b in enumerate(data):
            o = offset + i
            d[o] = ((d[o] & ~wm[o]) | (b & wm[o])) & ~(b & w1c[o]) & 0xFF
        if (d[pmcsr] & 3) in (1, 2):
            # D1/D2 are not supported: the power state write is ignored
            d[pmcsr] = (d[pmcsr] & ~3 & 0xFF) | power_state
        self._refresh()
        if self.on_write is not None:
            self.on_write(offset, len(data))

    # ---- decoded state (cached: read on every interrupt, changed only by writes) ------------
    def _u16(self, off: int) -> int:
        return self.data[off] | self.data[off + 1] << 8

    def _refresh(self) -> None:
        cmd = self._u16(0x04)
        msi = self._u16(MSI_OFFSET + 2)
        msix = self._u16(MSIX_OFFSET + 2)
        self.memory_enabled = bool(cmd & CMD_MEMORY)
        self.bus_master = bool(cmd & CMD_BUS_MASTER)
        self.intx_disabled = bool(cmd & CMD_INTX_DISABLE)
        self.msi_enabled = bool(msi & MSI_ENABLE)
        self.msi_vectors = max(1, min(1 << ((msi >> 4) & 7), self.layout.msi_vectors))
        self.msix_enabled = bool(msix & MSIX_ENABLE)
        self.msix_masked = bool(msix & MSIX_FUNCTION_MASK)

    def set_interrupt_status(self, asserted: bool) -> None:
        if asserted:
            self.data[0x06] |= STS_INTERRUPT
        else:
            self.data[0x06] &= ~STS_INTERRUPT & 0xFF

    def signal_system_error(self) -> None:
        self.data[0x07] |= STS_SIGNALED_SERR >> 8
