"""USB Mass Storage Class, Bulk-Only Transport 1.0: the wrapper layouts and class requests.

A command goes out in a 31-byte Command Block Wrapper (CBW) on bulk OUT, data moves in the
direction the CBW announces, and a 13-byte Command Status Wrapper (CSW) comes back on bulk IN.
Both ends use these layouts: the device's transport (`storage`) and the host's driver
(`xhcidbg.guest.storage`).
"""
from __future__ import annotations

from enum import IntEnum

import construct as c

MSC_CLASS = 0x08
SCSI_TRANSPARENT_SUBCLASS = 0x06
BULK_ONLY_PROTOCOL = 0x50

CBW_LENGTH = 31
CSW_LENGTH = 13


class BotRequest(IntEnum):
    """Class requests to the interface (BOT 3.1, 3.2)."""

    GET_MAX_LUN = 0xFE           # IN, 1 byte: the highest LUN number
    MASS_STORAGE_RESET = 0xFF    # OUT, no data: ready for the next CBW


class CswStatus(IntEnum):
    PASSED = 0
    FAILED = 1
    PHASE_ERROR = 2


CommandBlockWrapper = c.Struct(
    "dCBWSignature" / c.Const(b"USBC"),
    "dCBWTag" / c.Int32ul,                  # echoed in the CSW
    "dCBWDataTransferLength" / c.Int32ul,   # bytes the host expects to move
    "bmCBWFlags" / c.Int8ul,                # bit 7: data-in; bits 5..0 reserved
    "bCBWLUN" / c.Int8ul,                   # bits 3..0
    "bCBWCBLength" / c.Int8ul,              # bits 4..0: 1..16 valid bytes of CBWCB
    "CBWCB" / c.Bytes(16),                  # the SCSI command block
)

CommandStatusWrapper = c.Struct(
    "dCSWSignature" / c.Const(b"USBS"),
    "dCSWTag" / c.Int32ul,
    "dCSWDataResidue" / c.Int32ul,          # expected minus moved (or processed) bytes
    "bCSWStatus" / c.Int8ul,                # CswStatus
)

CBW = CommandBlockWrapper.compile()
CSW = CommandStatusWrapper.compile()


def cbw(tag: int, length: int, data_in: bool, cdb: bytes, lun: int = 0) -> bytes:
    """Build a CBW (what a host sends)."""
    wrapper: bytes = CBW.build({"dCBWTag": tag, "dCBWDataTransferLength": length,
                                "bmCBWFlags": 0x80 if data_in else 0, "bCBWLUN": lun,
                                "bCBWCBLength": len(cdb), "CBWCB": bytes(cdb).ljust(16, b"\0")})
    return wrapper


def csw(tag: int, residue: int, status: int) -> bytes:
    """Build a CSW (what a device answers)."""
    wrapper: bytes = CSW.build({"dCSWTag": tag, "dCSWDataResidue": residue,
                                "bCSWStatus": status})
    return wrapper


def is_meaningful(parsed: c.Container) -> bool:
    """A valid CBW (as `CBW.parse` returns it) whose fields are also meaningful (BOT 6.2.2):
    reserved bits clear and a command block length of 1..16."""
    return bool(parsed.bmCBWFlags & 0x3F == 0 and parsed.bCBWLUN & 0xF0 == 0
                and 1 <= parsed.bCBWCBLength <= 16)
