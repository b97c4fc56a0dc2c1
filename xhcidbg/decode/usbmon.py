"""Linux usbmon records: the 64-byte binary header (`struct mon_bin_hdr`, link type 220; link
type 189 carries its first 48 bytes) declared once, and the kernel's text format ("1u" files).

Byte order follows the capture file (pcap magic / pcapng section), never the machine.
"""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

# (name, struct code): the header in field order.  Offsets: id 0, type 8, xfer_type 9, epnum 10,
# devnum 11, busnum 12, flag_setup 14, flag_data 15, ts_sec 16, ts_usec 24, status 28, length 32,
# len_cap 36, setup 40, interval 48, start_frame 52, xfer_flags 56, ndesc 60.
HEADER_FIELDS = (
    ("id", "Q"), ("type", "c"), ("xfer_type", "B"), ("epnum", "B"), ("devnum", "B"),
    ("busnum", "H"), ("flag_setup", "B"), ("flag_data", "B"), ("ts_sec", "q"), ("ts_usec", "i"),
    ("status", "i"), ("length", "I"), ("len_cap", "I"), ("setup", "8s"), ("interval", "i"),
    ("start_frame", "i"), ("xfer_flags", "I"), ("ndesc", "I"),
)
_FMT = "".join(code for _, code in HEADER_FIELDS)
HEADER = {bo: struct.Struct(bo + _FMT) for bo in "<>"}
HEADER_LEN = 64
SHORT_HEADER_LEN = 48          # LINKTYPE_USB_LINUX (189)
ISO_DESC = {bo: struct.Struct(bo + "iII4x") for bo in "<>"}   # status, offset, length, pad
assert HEADER["<"].size == HEADER_LEN

# usbmon transfer type numbers (not the descriptor's: 0 iso, 1 int, 2 control, 3 bulk)
XFER_ISO, XFER_INT, XFER_CONTROL, XFER_BULK = 0, 1, 2, 3
XFER_LETTER = {XFER_ISO: "Z", XFER_INT: "I", XFER_CONTROL: "C", XFER_BULK: "B"}
XFER_NAME = {XFER_ISO: "isoc", XFER_INT: "intr", XFER_CONTROL: "ctrl", XFER_BULK: "bulk"}
URB_DIR_IN = 0x200             # urb->transfer_flags bit the kernel sets for IN URBs
FLAG_PRESENT = 0               # flag_setup / flag_data: the bytes are there
TEXT_DATA_MAX = 32             # the text API shows at most this many data bytes

ERRNO_NAMES = {0: "OK", -errno.EINPROGRESS: "-EINPROGRESS"}
ERRNO_NAMES.update({-getattr(errno, n): f"-{n}" for n in (
    "EPIPE", "EPROTO", "EILSEQ", "EOVERFLOW", "ENOSR", "ECOMM", "EREMOTEIO", "EXDEV", "ENODEV",
    "ESHUTDOWN", "ENOENT", "ECONNRESET", "ETIME", "ETIMEDOUT", "EINVAL", "ENOMEM", "EBUSY",
    "ENXIO", "EFBIG", "EMSGSIZE", "ENOSPC", "EPERM", "EHOSTUNREACH", "ENOEXEC")})


def errno_name(status: int) -> str:
    return ERRNO_NAMES.get(status, str(status))


@dataclass
class UsbmonRecord:
    """One decoded usbmon record (header + ISO descriptors + captured data)."""

    id: int
    type: str                  # 'S', 'C' or 'E'
    xfer_type: int
    epnum: int
    devnum: int
    busnum: int
    flag_setup: int
    flag_data: int
    ts_sec: int
    ts_usec: int
    status: int
    length: int
    len_cap: int
    setup: bytes
    interval: int = 0
    start_frame: int = 0
    xfer_flags: int = 0
    ndesc: int = 0
    iso: list[tuple[int, int, int]] = field(default_factory=list)
    data: bytes = b""

    @property
    def is_in(self) -> bool:
        return bool(self.epnum & 0x80)

    @property
    def endpoint(self) -> int:
        return self.epnum & 0x7F

    @classmethod
    def parse(cls, buf: bytes, byteorder: str = "<") -> UsbmonRecord:
        """Decode a 64-byte (or 48-byte, link type 189) header and what follows it."""
        short = len(buf) < HEADER_LEN
        if len(buf) < SHORT_HEADER_LEN:
            raise ValueError(f"usbmon record of {len(buf)} bytes is shorter than a header")
        head = bytes(buf[:HEADER_LEN]) if not short else bytes(buf[:SHORT_HEADER_LEN]) + bytes(16)
        values = list(HEADER[byteorder].unpack(head))
        values[1] = values[1].decode("latin-1")
        rec = cls(*values)
        if short:
            return rec
        off = HEADER_LEN
        ndesc = min(rec.ndesc, 128) if rec.xfer_type == XFER_ISO else 0
        desc = ISO_DESC[byteorder]
        for _ in range(ndesc):
            if off + desc.size > len(buf):
                break
            rec.iso.append(desc.unpack_from(buf, off))
            off += desc.size
        rec.data = bytes(buf[off:off + max(0, rec.len_cap - 16 * ndesc)])
        return rec


def pack_record(rec: UsbmonRecord, byteorder: str = "<") -> bytes:
    head = HEADER[byteorder].pack(
        rec.id, rec.type.encode("latin-1"), rec.xfer_type, rec.epnum, rec.devnum, rec.busnum,
        rec.flag_setup, rec.flag_data, rec.ts_sec, rec.ts_usec, rec.status, rec.length,
        rec.len_cap, rec.setup, rec.interval, rec.start_frame, rec.xfer_flags, rec.ndesc)
    desc = ISO_DESC[byteorder]
    return head + b"".join(desc.pack(*d) for d in rec.iso) + rec.data


def text_line(rec: UsbmonRecord) -> str:
    """The record as the kernel's text API ("Nu" files, mon_text.c) prints it."""
    stamp = (rec.ts_sec & 0xFFF) * 1000000 + rec.ts_usec
    head = (f"{rec.id:x} {stamp & 0xFFFFFFFF} {rec.type} "
            f"{XFER_LETTER.get(rec.xfer_type, 'B')}{'i' if rec.is_in else 'o'}:"
            f"{rec.busnum}:{rec.devnum:03d}:{rec.endpoint}")
    if rec.type != "E" and rec.xfer_type == XFER_ISO:
        s, e = struct.unpack("<ii", rec.setup)
        head += (f" {rec.status}:{rec.interval}:{rec.start_frame}" if rec.type == "S" else
                 f" {rec.status}:{rec.interval}:{rec.start_frame}:{s}")
        head += f" {e}" + "".join(f" {st}:{o}:{ln}" for st, o, ln in rec.iso)
    elif rec.type != "E" and rec.xfer_type == XFER_INT:
        head += f" {rec.status}:{rec.interval}"
    elif rec.type == "S" and rec.flag_setup == FLAG_PRESENT:   # QEMU leaves 0 on 'C' too
        b = rec.setup
        head += (f" s {b[0]:02x} {b[1]:02x} {b[3] << 8 | b[2]:04x} {b[5] << 8 | b[4]:04x} "
                 f"{b[7] << 8 | b[6]:04x}")
    elif rec.type == "S" and rec.flag_setup != ord("-"):
        head += f" {chr(rec.flag_setup)} __ __ ____ ____ ____"
    else:
        head += f" {rec.status}"
    head += f" {rec.length}"
    if rec.length > 0:
        # QEMU's writer flags captured data '=' (the kernel: 0); either way, show the bytes
        if rec.flag_data == FLAG_PRESENT or (rec.flag_data == ord("=") and rec.data):
            data = rec.data[:TEXT_DATA_MAX]
            head += " =" + "".join(f" {data[i:i + 4].hex()}" for i in range(0, len(data), 4))
        else:
            head += f" {chr(rec.flag_data)}"
    return head
