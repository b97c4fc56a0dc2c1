"""Bit fields the guest declares, and the small arithmetic the driver does with them.

The guest transcribes the spec's figures with `bits`, which takes a field's position the way
the figures print it (dword, bits hi:lo), and builds `Field`s of the generic layout machinery
(`xhcidbg.emu.layout`, which knows nothing of xHCI).  A register is a one-dword layout: its
fields sit in dword 0.  The helpers below turn a field into the bits of its own dword, for code
that builds or reads whole dwords (often on a hot path, with the results precomputed).
"""
from __future__ import annotations

from ..emu.layout import Field

__all__ = ["Field", "address_field", "bits", "field_mask", "flag", "placed", "read", "shift_mask"]


def bits(name: str, dword: int, hi: int, lo: int | None = None) -> Field:
    """Field `name` at bits hi:lo of `dword`, as the spec's figures write it (bit `hi` alone
    when `lo` is left out).  Ranges above 31 continue into the next dword."""
    lo = hi if lo is None else lo
    return Field(name, dword, lo, hi - lo + 1)


def flag(f: Field) -> int:
    """The bit a one-bit field sets in its own dword."""
    if f.width != 1:
        raise ValueError(f"{f.name} is {f.width} bits wide, not a flag")
    return 1 << f.lo


def placed(f: Field, value: int) -> int:
    """`value` in field `f`'s bits of its own dword."""
    if f.lo + f.width > 32:
        raise ValueError(f"{f.name} spans two dwords")
    return (value & f.mask) << f.lo


def field_mask(f: Field) -> int:
    """The bits field `f` occupies in its own dword."""
    return placed(f, -1)


def address_field(f: Field, addr: int) -> int:
    """The value pointer field `f` holds for `addr`: a pointer whose low bits are flags or
    reserved keeps address bits 63:lo, shifted down to the field's own bit 0."""
    return addr >> f.lo


def shift_mask(f: Field, dword: int) -> tuple[int, int]:
    """(shift, mask) reading field `f` out of dword `dword`, for code that holds that dword;
    raises if the field lives elsewhere, so a misplaced reader fails at import."""
    if f.dword != dword or f.lo + f.width > 32:
        raise ValueError(f"{f.name} is not within dword {dword}")
    return f.lo, f.mask


def read(f: Field, word: int) -> int:
    """Field `f`'s value in `word`, the value of the dword (or register) it lives in."""
    return (word >> f.lo) & f.mask
