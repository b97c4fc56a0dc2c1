"""SCSI command blocks and responses for a direct-access block device (SPC-4, SBC-3), declared
once with construct: the SCSI target (`scsi_target`) parses CDBs and builds responses with
them, and the host side (`xhcidbg.guest.storage`, the console) builds CDBs and parses responses
with the same tables.  All fields big-endian.
"""
from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import construct as c


class Op(IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_FORMAT_CAPACITIES = 0x23
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    MODE_SELECT_10 = 0x55
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    SYNCHRONIZE_CACHE_16 = 0x91
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0


READ_CAPACITY_16_ACTION = 0x10     # SERVICE ACTION IN(16) service action


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB


class Sense(NamedTuple):
    """A sense key with its additional sense code and qualifier."""

    key: SenseKey
    asc: int
    ascq: int


NO_SENSE = Sense(SenseKey.NO_SENSE, 0x00, 0x00)
UNRECOVERED_READ_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x11, 0x00)
WRITE_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x0C, 0x00)
INVALID_COMMAND_OPERATION_CODE = Sense(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
LBA_OUT_OF_RANGE = Sense(SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
INVALID_FIELD_IN_CDB = Sense(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x39, 0x00)
MEDIUM_REMOVAL_PREVENTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x53, 0x02)
WRITE_PROTECTED = Sense(SenseKey.DATA_PROTECT, 0x27, 0x00)
MEDIUM_NOT_PRESENT = Sense(SenseKey.NOT_READY, 0x3A, 0x00)


def SpacePadded(length: int) -> c.Construct:
    """ASCII text left-aligned and padded with spaces, as SCSI identification strings are."""
    def decode(obj: bytes, context: object) -> str:
        return obj.decode("ascii", "replace").rstrip(" ")

    def encode(obj: str, context: object) -> bytes:
        return obj.encode("ascii", "replace")[:length].ljust(length, b" ")
    return c.ExprAdapter(c.Bytes(length), decode, encode)


# ---- command descriptor blocks --------------------------------------------------------------

TestUnitReady = c.Struct("opcode" / c.Int8ub, c.Padding(4), "control" / c.Int8ub)

RequestSense = c.Struct(
    "opcode" / c.Int8ub,
    "flags" / c.BitStruct(c.Padding(7), "desc" / c.Flag),
    c.Padding(2),
    "allocation_length" / c.Int8ub,
    "control" / c.Int8ub,
)

Inquiry = c.Struct(
    "opcode" / c.Int8ub,
    "flags" / c.BitStruct(c.Padding(7), "evpd" / c.Flag),
    "page_code" / c.Int8ub,
    "allocation_length" / c.Int16ub,
    "control" / c.Int8ub,
)

ModeSense6 = c.Struct(
    "opcode" / c.Int8ub,
    "flags" / c.BitStruct(c.Padding(4), "dbd" / c.Flag, c.Padding(3)),
    "page" / c.BitStruct("pc" / c.BitsInteger(2), "code" / c.BitsInteger(6)),
    "subpage_code" / c.Int8ub,
    "allocation_length" / c.Int8ub,
    "control" / c.Int8ub,
)

ModeSense10 = c.Struct(
    "opcode" / c.Int8ub,
    "flags" / c.BitStruct(c.Padding(3), "llbaa" / c.Flag, "dbd" / c.Flag, c.Padding(3)),
    "page" / c.BitStruct("pc" / c.BitsInteger(2), "code" / c.BitsInteger(6)),
    "subpage_code" / c.Int8ub,
    c.Padding(3),
    "allocation_length" / c.Int16ub,
    "control" / c.Int8ub,
)

StartStopUnit = c.Struct(
    "opcode" / c.Int8ub,
    "flags" / c.BitStruct(c.Padding(7), "immed" / c.Flag),
    c.Padding(1),
    "power_condition_modifier" / c.Int8ub,
    "action" / c.BitStruct("power_condition" / c.BitsInteger(4), c.Padding(1),
                           "no_flush" / c.Flag, "loej" / c.Flag, "start" / c.Flag),
    "control" / c.Int8ub,
)

PreventAllowMediumRemoval = c.Struct(
    "opcode" / c.Int8ub,
    c.Padding(3),
    "prevent" / c.Int8ub,           # bits 1..0
    "control" / c.Int8ub,
)

ReadCapacity10 = c.Struct(
    "opcode" / c.Int8ub, c.Padding(1), "lba" / c.Int32ub, c.Padding(2),
    "flags" / c.BitStruct(c.Padding(7), "pmi" / c.Flag), "control" / c.Int8ub,
)

# READ(10) / WRITE(10) / VERIFY(10) and SYNCHRONIZE CACHE(10): LBA and a block count
Rw10 = c.Struct(
    "opcode" / c.Int8ub,
    "flags" / c.Int8ub,             # RDPROTECT/WRPROTECT, DPO, FUA, ...
    "lba" / c.Int32ub,
    "group" / c.Int8ub,
    "blocks" / c.Int16ub,
    "control" / c.Int8ub,
)

Rw16 = c.Struct(
    "opcode" / c.Int8ub,
    "flags" / c.Int8ub,
    "lba" / c.Int64ub,
    "blocks" / c.Int32ub,
    "group" / c.Int8ub,
    "control" / c.Int8ub,
)

ServiceActionIn16 = c.Struct(
    "opcode" / c.Int8ub,
    "service_action" / c.Int8ub,    # bits 4..0
    "lba" / c.Int64ub,
    "allocation_length" / c.Int32ub,
    "flags" / c.BitStruct(c.Padding(7), "pmi" / c.Flag),
    "control" / c.Int8ub,
)

ReportLuns = c.Struct(
    "opcode" / c.Int8ub, c.Padding(1), "select_report" / c.Int8ub, c.Padding(3),
    "allocation_length" / c.Int32ub, c.Padding(1), "control" / c.Int8ub,
)

# ---- responses -------------------------------------------------------------------------------

FixedSenseData = c.Struct(
    "response" / c.BitStruct("valid" / c.Flag, "code" / c.BitsInteger(7)),   # code 0x70
    c.Padding(1),
    "flags" / c.BitStruct("filemark" / c.Flag, "eom" / c.Flag, "ili" / c.Flag, c.Padding(1),
                          "sense_key" / c.BitsInteger(4)),
    "information" / c.Int32ub,
    "additional_length" / c.Const(10, c.Int8ub),
    "command_specific" / c.Int32ub,
    "asc" / c.Int8ub,
    "ascq" / c.Int8ub,
    "fru" / c.Int8ub,
    "sense_key_specific" / c.Bytes(3),
)

StandardInquiryData = c.Struct(
    "peripheral" / c.BitStruct("qualifier" / c.BitsInteger(3), "device_type" / c.BitsInteger(5)),
    "removable" / c.BitStruct("rmb" / c.Flag, c.Padding(7)),
    "version" / c.Int8ub,                     # 5 = SPC-3
    "format" / c.BitStruct(c.Padding(2), "normaca" / c.Flag, "hisup" / c.Flag,
                           "response_data_format" / c.BitsInteger(4)),
    "additional_length" / c.Int8ub,           # 31: bytes after this one
    "flags" / c.Bytes(3),
    "vendor" / SpacePadded(8),
    "product" / SpacePadded(16),
    "revision" / SpacePadded(4),
)

VpdPage = c.Struct(
    "peripheral" / c.BitStruct("qualifier" / c.BitsInteger(3), "device_type" / c.BitsInteger(5)),
    "page_code" / c.Int8ub,
    "payload" / c.Prefixed(c.Int16ub, c.GreedyBytes),
)

DesignationDescriptor = c.Struct(        # VPD page 0x83 entry (SPC-4 7.8.6)
    "codes" / c.BitStruct("protocol_identifier" / c.BitsInteger(4),
                          "code_set" / c.BitsInteger(4)),      # 2 = ASCII
    "kind" / c.BitStruct("piv" / c.Flag, c.Padding(1), "association" / c.BitsInteger(2),
                         "designator_type" / c.BitsInteger(4)),  # 1 = T10 vendor ID based
    c.Padding(1),
    "designator" / c.Prefixed(c.Int8ub, c.GreedyBytes),
)

VPD_SUPPORTED_PAGES, VPD_UNIT_SERIAL_NUMBER, VPD_DEVICE_IDENTIFICATION = 0x00, 0x80, 0x83

ReadCapacity10Data = c.Struct("last_lba" / c.Int32ub, "block_length" / c.Int32ub)

ReadCapacity16Data = c.Struct(
    "last_lba" / c.Int64ub,
    "block_length" / c.Int32ub,
    "protection" / c.Int8ub,
    "exponents" / c.Int8ub,                   # P_I_EXPONENT, LOGICAL BLOCKS PER PHYSICAL EXP.
    "alignment" / c.Int16ub,                  # LBPME, LBPRZ, LOWEST ALIGNED LBA
    c.Padding(16),
)

ModeParameterHeader6 = c.Struct(
    "mode_data_length" / c.Int8ub,            # bytes after this field
    "medium_type" / c.Int8ub,
    "device_specific" / c.Int8ub,             # bit 7: WP (write protected)
    "block_descriptor_length" / c.Int8ub,
)

ModeParameterHeader10 = c.Struct(
    "mode_data_length" / c.Int16ub,
    "medium_type" / c.Int8ub,
    "device_specific" / c.Int8ub,
    "flags" / c.BitStruct(c.Padding(7), "longlba" / c.Flag),
    c.Padding(1),
    "block_descriptor_length" / c.Int16ub,
)

ShortBlockDescriptor = c.Struct(
    "density_code" / c.Int8ub, "blocks" / c.Int24ub, c.Padding(1), "block_length" / c.Int24ub,
)

LongBlockDescriptor = c.Struct(
    "blocks" / c.Int64ub, c.Padding(4), "block_length" / c.Int32ub,
)

WRITE_PROTECT = 0x80                  # device-specific parameter bit (SBC-3 6.4.1)
CACHING_PAGE, CONTROL_PAGE, ALL_PAGES = 0x08, 0x0A, 0x3F

CachingModePage = c.Struct(           # SBC-3 6.4.5
    "page" / c.BitStruct("ps" / c.Flag, "spf" / c.Flag, "code" / c.BitsInteger(6)),
    "page_length" / c.Const(0x12, c.Int8ub),
    "flags" / c.BitStruct("ic" / c.Flag, "abpf" / c.Flag, "cap" / c.Flag, "disc" / c.Flag,
                          "size" / c.Flag, "wce" / c.Flag, "mf" / c.Flag, "rcd" / c.Flag),
    "retention_priority" / c.Int8ub,
    "disable_prefetch_length" / c.Int16ub,
    "minimum_prefetch" / c.Int16ub,
    "maximum_prefetch" / c.Int16ub,
    "maximum_prefetch_ceiling" / c.Int16ub,
    "flags2" / c.Int8ub,
    "cache_segments" / c.Int8ub,
    "cache_segment_size" / c.Int16ub,
    c.Padding(4),
)

ControlModePage = c.Struct(           # SPC-4 7.5.8 (all defaults)
    "page" / c.BitStruct("ps" / c.Flag, "spf" / c.Flag, "code" / c.BitsInteger(6)),
    "page_length" / c.Const(0x0A, c.Int8ub),
    "fields" / c.Bytes(10),
)

ReportLunsData = c.Struct(
    "lun_list_length" / c.Rebuild(c.Int32ub, c.len_(c.this.luns) * 8),
    c.Padding(4),
    "luns" / c.Array(c.this.lun_list_length // 8, c.Int64ub),
)


def lun_entry(lun: int) -> int:
    """LUN in the single-level peripheral device addressing form (SAM-5 4.7)."""
    return (lun & 0xFF) << 48
