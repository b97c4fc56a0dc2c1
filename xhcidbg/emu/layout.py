"""Bit-field layouts over little-endian dwords, declared once.

Every binary structure the controller shares with the guest (TRBs, contexts, registers) is a
`Layout`: a name, a size in dwords and a table of `Field`s.  Decoding, encoding, single-field
access and the precomputed masks used on hot paths are all derived from that one table.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field


@dataclass(frozen=True)
class Field:
    """`width` bits starting at bit `lo` of dword `dword` (widths above 32 continue into the next
    dword, as the 64-bit pointers in TRBs and contexts do).

    `mask` is the field's value mask, `bits` the field's bits in place in its dword: hot paths
    test flags with `dword & F.bits` and read fields with `F.of(dword)`, all derived from here."""

    name: str
    dword: int
    lo: int
    width: int = 1
    doc: str = ""
    mask: int = dc_field(init=False, repr=False, compare=False)
    bits: int = dc_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask", (1 << self.width) - 1)
        object.__setattr__(self, "bits", ((1 << self.width) - 1) << self.lo)

    def of(self, dword: int) -> int:
        """This field's value in `dword` (or in a 64-bit pair for fields that span two)."""
        return (dword >> self.lo) & self.mask

    def put(self, value: int) -> int:
        """`value` in this field's place, to OR into a dword."""
        return (value & self.mask) << self.lo

    def get(self, dw: Sequence[int]) -> int:
        if self.lo + self.width <= 32:
            return (dw[self.dword] >> self.lo) & self.mask
        value = dw[self.dword] | (dw[self.dword + 1] << 32)
        return (value >> self.lo) & self.mask

    def set(self, dw: list[int], value: int) -> None:
        value &= self.mask
        if self.lo + self.width <= 32:
            m = self.mask << self.lo
            dw[self.dword] = (dw[self.dword] & ~m & 0xFFFFFFFF) | (value << self.lo)
            return
        whole = dw[self.dword] | (dw[self.dword + 1] << 32)
        m = self.mask << self.lo
        whole = (whole & ~m) | (value << self.lo)
        dw[self.dword] = whole & 0xFFFFFFFF
        dw[self.dword + 1] = (whole >> 32) & 0xFFFFFFFF


@dataclass(frozen=True)
class Layout:
    name: str
    ndwords: int
    fields: tuple[Field, ...]
    by_name: dict[str, Field] = dc_field(init=False, repr=False, compare=False)

    def __init__(self, name: str, ndwords: int, fields: Iterable[Field]):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "ndwords", ndwords)
        fields = tuple(fields)
        object.__setattr__(self, "fields", fields)
        object.__setattr__(self, "by_name", {f.name: f for f in fields})
        for f in fields:
            end = f.dword * 32 + f.lo + f.width
            if end > ndwords * 32:
                raise ValueError(f"{name}.{f.name} runs past the end of the layout")

    @property
    def size(self) -> int:
        return self.ndwords * 4

    def __getitem__(self, name: str) -> Field:
        return self.by_name[name]

    def get(self, dw: Sequence[int], name: str) -> int:
        return self.by_name[name].get(dw)

    def decode(self, dw: Sequence[int]) -> dict[str, int]:
        return {f.name: f.get(dw) for f in self.fields}

    def encode(self, base: Sequence[int] | None = None, **values: int) -> list[int]:
        dw = list(base) if base is not None else [0] * self.ndwords
        for name, value in values.items():
            self.by_name[name].set(dw, value)
        return dw

    def unpack(self, data: bytes | memoryview) -> list[int]:
        return list(struct.unpack_from(f"<{self.ndwords}I", data))

    def pack(self, dw: Sequence[int]) -> bytes:
        return struct.pack(f"<{self.ndwords}I", *dw)


DWORD_MASK = 0xFFFFFFFF
DWORD_BITS = 32


def lo32(value: int) -> int:
    """The low dword of a 64-bit value (pointers are split over two dwords)."""
    return value & DWORD_MASK


def hi32(value: int) -> int:
    return (value >> DWORD_BITS) & DWORD_MASK


def dwords(data: bytes | memoryview, n: int | None = None) -> list[int]:
    n = len(data) // 4 if n is None else n
    return list(struct.unpack_from(f"<{n}I", data))
