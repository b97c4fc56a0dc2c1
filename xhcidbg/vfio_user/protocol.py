"""vfio-user on the wire: message layouts, command numbers, flags and the limits we announce.

Every message is a 16-byte header followed by a command-specific payload (QEMU's
docs/interop/vfio-user.rst).  Each fixed-size layout is declared once below: a record of its
fields, named as in the specification, and beside it the `Message` whose `struct` format packs
them.  Parsing and building both go through these precompiled structs; nothing else in the
package spells a byte offset.  All integers are little-endian (the host's order on x86).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from enum import IntEnum, IntFlag
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
    from typing_extensions import Buffer


class Command(IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class HeaderFlags(IntFlag):
    TYPE_MASK = 0xF       # 0 command, 1 reply
    REPLY = 0x1
    NO_REPLY = 0x10
    ERROR = 0x20


R = TypeVar("R", bound="DataclassInstance")


class Message(Generic[R]):
    """One fixed-size layout: `unpack(buf, offset)` -> its record; `unpack_from`, `pack_values`
    and `pack_into` are the struct's own, for the paths that work with plain values."""

    def __init__(self, record: type[R], fmt: str):
        self.record = record
        self.struct = struct.Struct("<" + fmt)
        self.fields = tuple(f.name for f in fields(record))
        if len(self.struct.unpack(bytes(self.struct.size))) != len(self.fields):
            raise ValueError(f"{record.__name__}: format {fmt!r} does not match its fields")
        self.size = self.struct.size
        # fast paths, bound once
        self.unpack_from = self.struct.unpack_from
        self.pack_values = self.struct.pack
        self.pack_into = self.struct.pack_into

    def unpack(self, buf: Buffer, offset: int = 0) -> R:
        return self.record(*self.struct.unpack_from(buf, offset))

    def __repr__(self) -> str:
        return (f"<Message {self.record.__name__} {self.size} bytes: "
                f"{', '.join(self.fields)}>")


@dataclass(frozen=True, slots=True)
class Header:
    id: int
    command: int
    size: int             # of the whole message, this header included
    flags: int            # HeaderFlags
    error: int            # an errno, in replies flagged ERROR

HEADER = Message(Header, "HHIII")


@dataclass(frozen=True, slots=True)
class Version:           # + NUL-terminated JSON
    major: int
    minor: int

VERSION = Message(Version, "HH")


@dataclass(frozen=True, slots=True)
class DmaMap:            # + the file descriptor of the memory, if any
    argsz: int
    flags: int
    offset: int
    iova: int
    size: int

DMA_MAP = Message(DmaMap, "IIQQQ")


@dataclass(frozen=True, slots=True)
class DmaUnmap:
    argsz: int
    flags: int
    iova: int
    size: int

DMA_UNMAP = Message(DmaUnmap, "IIQQ")


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    argsz: int
    flags: int
    num_regions: int
    num_irqs: int

DEVICE_INFO = Message(DeviceInfo, "IIII")


@dataclass(frozen=True, slots=True)
class RegionInfo:
    argsz: int
    flags: int
    index: int
    cap_offset: int
    size: int
    offset: int

REGION_INFO = Message(RegionInfo, "IIIIQQ")


@dataclass(frozen=True, slots=True)
class IrqInfo:
    argsz: int
    flags: int
    index: int
    count: int

IRQ_INFO = Message(IrqInfo, "IIII")


@dataclass(frozen=True, slots=True)
class IrqSet:            # + one bool byte per vector (DATA_BOOL)
    argsz: int
    flags: int
    index: int
    start: int
    count: int

IRQ_SET = Message(IrqSet, "IIIII")


@dataclass(frozen=True, slots=True)
class RegionAccess:      # + data (writes, and read replies)
    offset: int
    region: int
    count: int

REGION_ACCESS = Message(RegionAccess, "QII")


@dataclass(frozen=True, slots=True)
class WriteMulti:        # + wr_cnt WriteOne entries
    wr_cnt: int

WRITE_MULTI = Message(WriteMulti, "Q")


@dataclass(frozen=True, slots=True)
class WriteOne:
    offset: int
    region: int
    count: int
    data: bytes           # 8 bytes, the first `count` of them written

WRITE_ONE = Message(WriteOne, "QII8s")


MAJOR = 0
MINOR = 0

# ---- the limits this server announces in its VERSION reply, and holds the client to ---------
MAX_DATA_XFER = 1 << 20
MAX_MSG_FDS = 16                       # the most QEMU accepts (VFIO_USER_MAX_MAX_FDS)
MAX_DMA_MAPS = 65535
PAGE_SIZES = 4096
MAX_MULTI_WRITES = 200                 # per REGION_WRITE_MULTI (QEMU's VFIO_USER_MULTI_MAX)


# ---- flag values, from linux/vfio.h (the protocol reuses them) ----------------------------------
class DeviceFlags(IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1


class RegionFlags(IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class IrqInfoFlags(IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlags(IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5

    DATA_TYPES = DATA_NONE | DATA_BOOL | DATA_EVENTFD
    ACTIONS = ACTION_MASK | ACTION_UNMASK | ACTION_TRIGGER


class DmaMapFlags(IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlags(IntFlag):
    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1


class PciRegion(IntEnum):
    """VFIO's fixed region indexes for a PCI device."""
    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


NUM_REGIONS = 9


class PciIrq(IntEnum):
    """VFIO's interrupt indexes for a PCI device."""
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


NUM_IRQS = 5
