"""vfio-user message layouts, declared once.

Every message is a 16-byte header followed by a command-specific payload (QEMU's
docs/interop/vfio-user.rst).  Each payload is one `Message` below: a name, a `struct` format and
its field names.  Parsing and building both go through these precompiled structs; nothing else in
the package spells a byte offset.  All integers are little-endian (the host's order on x86).
"""
from __future__ import annotations

import struct
from collections import namedtuple
from enum import IntEnum, IntFlag


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


class Message:
    """One fixed-size layout: `unpack(buf, offset)` -> namedtuple, `pack(**fields)` -> bytes."""

    def __init__(self, name: str, fmt: str, fields: str):
        self.name = name
        self.struct = struct.Struct("<" + fmt)
        self.size = self.struct.size
        self.tuple = namedtuple(name, fields)
        # fast paths, bound once
        self.unpack_from = self.struct.unpack_from
        self.pack_values = self.struct.pack
        self.pack_into = self.struct.pack_into

    def unpack(self, buf, offset: int = 0):
        return self.tuple._make(self.struct.unpack_from(buf, offset))

    def pack(self, **fields) -> bytes:
        return self.struct.pack(*self.tuple(**fields))

    def __repr__(self) -> str:
        return f"<Message {self.name} {self.size} bytes: {', '.join(self.tuple._fields)}>"


HEADER = Message("Header", "HHIII", "id command size flags error")
VERSION = Message("Version", "HH", "major minor")                     # + NUL-terminated JSON
DMA_MAP = Message("DmaMap", "IIQQQ", "argsz flags offset iova size")
DMA_UNMAP = Message("DmaUnmap", "IIQQ", "argsz flags iova size")
DEVICE_INFO = Message("DeviceInfo", "IIII", "argsz flags num_regions num_irqs")
REGION_INFO = Message("RegionInfo", "IIIIQQ", "argsz flags index cap_offset size offset")
IRQ_INFO = Message("IrqInfo", "IIII", "argsz flags index count")
IRQ_SET = Message("IrqSet", "IIIII", "argsz flags index start count")  # + bool bytes (DATA_BOOL)
REGION_ACCESS = Message("RegionAccess", "QII", "offset region count")   # + data
WRITE_MULTI = Message("WriteMulti", "Q", "wr_cnt")                       # + WRITE_ONE entries
WRITE_ONE = Message("WriteOne", "QII8s", "offset region count data")
# Region info capability header (linux/vfio.h struct vfio_info_cap_header).
CAP_HEADER = Message("CapHeader", "HHI", "id version next")

MAJOR = 0
MINOR = 0


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
