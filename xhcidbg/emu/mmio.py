"""BAR0 as one table of dwords: who reads each one, who writes it, what it is called.

Every register block (capability, operational, the ports, runtime with its interrupters,
doorbells, extended capabilities) places its registers here once, at construction, from the
declarations in regs.py.  An access then costs one list index and one call.  What all
registers share is done here once, from the declarations:

- accesses of 1, 2 or 4 bytes reach the bytes of one dword from the offset on (bytes past the
  dword are not part of the access); 8 bytes are two dword accesses, low dword first;
- a partial write merges with the dword's current value, except its RW1C and RW1S bits: the
  bytes not written must not clear or trigger anything.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol

from .layout import DWORD_MASK
from .regs import Register

Reader = Callable[[], int]
Writer = Callable[[int], None]
Binding = tuple[Register, Reader, Writer]           # a register with its owner's handlers
Label = str | Callable[[int], str]            # a name, or the name of an exact offset


class ErrorReporter(Protocol):
    """Where a register block reports guest input it did not accept, and DMA that failed."""

    def refuse(self, key: str, message: str, level: str = "warning") -> None: ...

    def host_system_error(self, why: str) -> None: ...


def read_zero() -> int:
    return 0


def ignore(value: int) -> None:
    """A write with no effect (read-only registers software may write without trouble)."""


def constant(value: int) -> Reader:
    return lambda: value


def with_lo32(value: int, dword: int) -> int:
    """`value` (64-bit) with its low dword replaced."""
    return (value & ~DWORD_MASK) | (dword & DWORD_MASK)


def with_hi32(value: int, dword: int) -> int:
    """`value` (64-bit) with its high dword replaced."""
    return (value & DWORD_MASK) | ((dword & DWORD_MASK) << 32)


class RegisterMap:
    """Per dword of the BAR: reader, writer, the strobe bits (RW1C | RW1S) a partial write masks
    out of the current value, and a label for observers.  Dwords nobody placed read as 0 and
    their writes go to `reserved_write(offset, value)`."""

    def __init__(self, size: int, errors: ErrorReporter,
                 reserved_write: Callable[[int, int], None]):
        n = size // 4
        self.size = size
        self.errors = errors
        self.reserved_write = reserved_write
        self.readers: list[Reader] = [read_zero] * n
        self.writers: list[Writer] = [partial(reserved_write, 4 * i) for i in range(n)]
        self.strobes = [0] * n
        self.labels: list[Label] = [_bar_offset] * n

    # ---- building -----------------------------------------------------------------------------
    def area(self, start: int, end: int, *, label: Label | None = None, read: Reader = read_zero,
             write: Writer | None = None,
             write_at: Callable[[int, int], None] | None = None) -> None:
        """Dwords [start, end) without declared registers: they read `read()`; their writes go
        to `write(value)` or `write_at(offset, value)`, else to the reserved handler.  Labels
        not given stay as they were."""
        for off in range(start, end, 4):
            i = off >> 2
            self.readers[i] = read
            if write is not None:
                self.writers[i] = write
            elif write_at is not None:
                self.writers[i] = partial(write_at, off)
            self.strobes[i] = 0
            if label is not None:
                self.labels[i] = label

    def place(self, base: int, binding: Binding, label: Label | None = None) -> None:
        """A register of the block at `base`, labelled with its declared name by default."""
        reg, read, write = binding
        i = (base + reg.offset) >> 2
        self.readers[i] = read
        self.writers[i] = write
        self.strobes[i] = reg.rw1c | reg.rw1s
        self.labels[i] = reg.name if label is None else label

    # ---- access -------------------------------------------------------------------------------
    def read32(self, offset: int) -> int:
        """The dword at the dword-aligned `offset` (0 outside the BAR)."""
        if 0 <= offset < self.size:
            return self.readers[offset >> 2]()
        return 0

    def write32(self, offset: int, value: int) -> None:
        if 0 <= offset < self.size:
            self.writers[offset >> 2](value & DWORD_MASK)
        else:
            self.reserved_write(offset, value & DWORD_MASK)

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8):
            self.errors.refuse(f"rsize{size}", f"MMIO read of size {size} at {offset:#x}; "
                               f"reads as 0")
            return 0
        if size == 8 and offset & 3:
            self._unaligned("read", offset)
            return 0
        return self.peek(offset, size)

    def peek(self, offset: int, size: int) -> int:
        """What a read of `size` bytes (1, 2, 4 or 8) at `offset` returns, refusing nothing."""
        base = offset & ~3
        if size == 8:
            return self.read32(base) | (self.read32(base + 4) << 32)
        return (self.read32(base) >> ((offset & 3) * 8)) & ((1 << (size * 8)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 4 and not offset & 3:
            self.write32(offset, value)
        elif size == 8:
            if offset & 3:
                self._unaligned("write", offset)
                return
            self.write32(offset, value)
            self.write32(offset + 4, value >> 32)
        elif size in (1, 2, 4):
            base = offset & ~3
            shift = (offset & 3) * 8
            mask = (((1 << (size * 8)) - 1) << shift) & DWORD_MASK
            strobes = self.strobes[base >> 2] if 0 <= base < self.size else 0
            cur = self.read32(base) & ~strobes
            self.write32(base, (cur & ~mask) | ((value << shift) & mask))
        else:
            self.errors.refuse(f"wsize{size}", f"MMIO write of size {size} at {offset:#x} "
                               f"ignored")

    def _unaligned(self, what: str, offset: int) -> None:
        self.errors.refuse(f"unaligned8{what}", f"8-byte MMIO {what} at {offset:#x}, which is "
                           f"not dword aligned, ignored")

    def name(self, offset: int) -> str:
        """The register at `offset` as traces and the console show it ("USBSTS", "PORTSC[3]",
        "IMAN[0]", "DOORBELL[2]", "XECP+0x10"...)."""
        label: Label = self.labels[offset >> 2] if 0 <= offset < self.size else _bar_offset
        return label if isinstance(label, str) else label(offset)


def _bar_offset(offset: int) -> str:
    return f"BAR0+{offset:#x}"


def offset_label(prefix: str, base: int) -> Callable[[int], str]:
    """Labels of an area without named registers: "<prefix>+<offset from base>"."""
    return lambda offset: f"{prefix}+{offset - base:#x}"
