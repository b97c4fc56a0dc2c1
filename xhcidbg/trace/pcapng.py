"""pcapng blocks written as they happen, and a reader for pcapng and classic pcap files.

Only what the tracer needs is written: a little-endian Section Header Block, Interface
Description Blocks with nanosecond timestamps, and Enhanced Packet Blocks with an optional
comment.  The reader also accepts big-endian sections, other timestamp resolutions, Simple
Packet Blocks and classic pcap (microsecond and nanosecond magic, either byte order), so the
viewer can open what tcpdump, dumpcap, QEMU or VirtualBox wrote.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

SHB, IDB, SPB, EPB, OPB = 0x0A0D0D0A, 0x00000001, 0x00000003, 0x00000006, 0x00000002
BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_END, OPT_COMMENT = 0, 1
SHB_HARDWARE, SHB_OS, SHB_USERAPPL = 2, 3, 4
IF_NAME, IF_DESCRIPTION, IF_TSRESOL = 2, 3, 9

LINKTYPE_USB_LINUX = 189
LINKTYPE_USB_LINUX_MMAPPED = 220
LINKTYPE_USER0 = 147


def _pad(n: int) -> int:
    return -n & 3


def _options(options: list[tuple[int, bytes]]) -> bytes:
    if not options:
        return b""
    out = bytearray()
    for code, value in options:
        out += struct.pack("<HH", code, len(value)) + value + bytes(_pad(len(value)))
    return bytes(out + struct.pack("<HH", OPT_END, 0))


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def section_header(hardware: str = "", os_name: str = "", application: str = "",
                   comment: str = "") -> bytes:
    opts = [(c, v.encode()) for c, v in ((OPT_COMMENT, comment), (SHB_HARDWARE, hardware),
                                         (SHB_OS, os_name), (SHB_USERAPPL, application)) if v]
    # section length -1: unknown (we write as we go)
    return _block(SHB, struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + _options(opts))


def interface_description(linktype: int, snaplen: int, name: str = "",
                          description: str = "") -> bytes:
    opts = [(c, v.encode()) for c, v in ((IF_NAME, name), (IF_DESCRIPTION, description)) if v]
    opts.append((IF_TSRESOL, b"\x09"))          # 10^-9 s: nanoseconds
    return _block(IDB, struct.pack("<HHI", linktype, 0, snaplen) + _options(opts))


_EPB_HEAD = struct.Struct("<IIIIIII")
EPB_HEADER = 28                # EPB fields before the packet data
EPB_OVERHEAD = 32              # EPB header (28 bytes) and trailing length (4), without options
# the trailing block length after `pad` bytes of padding, indexed by the data length mod 4
EPB_TAIL = tuple(struct.Struct(f"<{-n & 3}xI") for n in range(4))


# Hot-path framing: the tracer packs a whole block in one call.  Arguments of both structs:
# EPB, total length, interface, timestamp high, timestamp low, captured length, original
# length, then the record's own fields (and, for `framed`, the total length again).
def framed(record: struct.Struct) -> struct.Struct:
    """One struct for a whole EPB around a fixed-size record (no comment)."""
    if record.size % 4 or record.format[0] != "<":
        raise ValueError("framed records are little-endian and a whole number of dwords")
    return struct.Struct("<IIIIIII" + record.format[1:] + "I")


def framed_head(record: struct.Struct) -> struct.Struct:
    """The EPB header and a record's fixed part, for records followed by variable data (the
    caller appends the data and `EPB_TAIL[len(data) & 3].pack(total)`)."""
    if record.format[0] != "<":
        raise ValueError("framed records are little-endian")
    return struct.Struct("<IIIIIII" + record.format[1:])


U32 = struct.Struct("<I")


def comment_option(text: str) -> bytes:
    """An EPB option list holding one comment (b"" for no comment)."""
    return _options([(OPT_COMMENT, text.encode())]) if text else b""


def enhanced_packet(interface: int, ts_ns: int, data: bytes, orig_len: int | None = None,
                    comment: str = "") -> bytes:
    """One EPB.  Hot path: built with a single pack of the fixed part."""
    n = len(data)
    opts = comment_option(comment)
    total = 32 + n + _pad(n) + len(opts)
    return b"".join((_EPB_HEAD.pack(EPB, total, interface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, n,
                                    n if orig_len is None else orig_len),
                     data, bytes(_pad(n)), opts, struct.pack("<I", total)))


# ---- reading ----------------------------------------------------------------------------------
class CaptureError(Exception):
    """The file is not a capture this reader understands (the message says why)."""


@dataclass
class Interface:
    linktype: int
    snaplen: int
    name: str = ""
    description: str = ""
    tsresol: int = 1_000_000          # ticks per second
    byteorder: str = "<"


@dataclass
class Packet:
    interface: int                    # index into Capture.interfaces
    ts_ns: int
    data: bytes
    orig_len: int
    comment: str = ""


@dataclass
class Capture:
    """What was read: the interfaces, and whether the file ended in the middle of a block."""

    format: str = ""
    interfaces: list[Interface] = field(default_factory=list)
    truncated: bool = False
    comments: list[str] = field(default_factory=list)


def _parse_options(body: bytes, off: int, bo: str) -> list[tuple[int, bytes]]:
    out = []
    while off + 4 <= len(body):
        code, length = struct.unpack_from(bo + "HH", body, off)
        off += 4
        if code == OPT_END:
            break
        out.append((code, body[off:off + length]))
        off += length + _pad(length)
    return out


def _tsresol(raw: bytes) -> int:
    v = raw[0]
    return 2 ** (v & 0x7F) if v & 0x80 else 10 ** v


def read_capture(f: BinaryIO) -> tuple[Capture, Iterator[Packet]]:
    """Open a pcap or pcapng stream.  Returns the capture description (filled in as the packets
    are read: pcapng may add interfaces and sections anywhere) and an iterator of packets."""
    head = f.read(4)
    if len(head) < 4:
        raise CaptureError("file is empty or shorter than any capture header")
    magic = struct.unpack("<I", head)[0]
    cap = Capture()
    if magic == SHB:
        cap.format = "pcapng"
        return cap, _read_pcapng(f, head, cap)
    for bo in "<>":
        m = struct.unpack(bo + "I", head)[0]
        if m in (0xA1B2C3D4, 0xA1B23C4D):
            cap.format = "pcap"
            return cap, _read_pcap(f, bo, 1_000_000_000 if m == 0xA1B23C4D else 1_000_000, cap)
    raise CaptureError(f"not a pcap or pcapng file (first bytes {head.hex()})")


def _read_pcap(f: BinaryIO, bo: str, tsresol: int, cap: Capture) -> Iterator[Packet]:
    rest = f.read(20)
    if len(rest) < 20:
        cap.truncated = True
        return
    _, _, _, _, snaplen, linktype = struct.unpack(bo + "HHiIII", rest)
    cap.interfaces.append(Interface(linktype & 0xFFFF, snaplen, tsresol=tsresol, byteorder=bo))
    rec = struct.Struct(bo + "IIII")
    while True:
        h = f.read(16)
        if not h:
            return
        if len(h) < 16:
            cap.truncated = True
            return
        sec, frac, incl, orig = rec.unpack(h)
        data = f.read(incl)
        if len(data) < incl:
            cap.truncated = True
            return
        yield Packet(0, sec * 1_000_000_000 + frac * (1_000_000_000 // tsresol), data, orig)


def _read_pcapng(f: BinaryIO, first: bytes, cap: Capture) -> Iterator[Packet]:
    bo = "<"
    base = 0                     # index of the current section's first interface
    pending = first
    while True:
        head = pending + f.read(8 - len(pending))
        pending = b""
        if not head:
            return
        if len(head) < 8:
            cap.truncated = True
            return
        btype = struct.unpack("<I", head[:4])[0]
        if btype == SHB:
            # the byte-order magic decides how this section (including its length) is read
            peek = f.read(4)
            if len(peek) < 4:
                cap.truncated = True
                return
            bo = "<" if struct.unpack("<I", peek)[0] == BYTE_ORDER_MAGIC else ">"
            total = struct.unpack(bo + "I", head[4:])[0]
            body = peek + f.read(max(0, total - 16))
            tail = f.read(4)
            if total < 28 or len(body) < total - 12 or len(tail) < 4:
                cap.truncated = True
                return
            base = len(cap.interfaces)
            for code, value in _parse_options(body, 16, bo):
                if code == OPT_COMMENT:
                    cap.comments.append(value.decode("utf-8", "replace"))
            continue
        btype, total = struct.unpack(bo + "II", head)
        if total < 12 or total % 4:
            raise CaptureError(f"corrupt pcapng block (type {btype:#x}, length {total})")
        body = f.read(total - 12)
        tail = f.read(4)
        if len(body) < total - 12 or len(tail) < 4:
            cap.truncated = True
            return
        if btype == IDB:
            linktype, _, snaplen = struct.unpack_from(bo + "HHI", body)
            iface = Interface(linktype, snaplen, byteorder=bo)
            for code, value in _parse_options(body, 8, bo):
                if code == IF_NAME:
                    iface.name = value.decode("utf-8", "replace")
                elif code == IF_DESCRIPTION:
                    iface.description = value.decode("utf-8", "replace")
                elif code == IF_TSRESOL and value:
                    iface.tsresol = _tsresol(value)
            cap.interfaces.append(iface)
        elif btype in (EPB, OPB):
            if btype == EPB:
                ifid, hi, lo, incl, orig = struct.unpack_from(bo + "IIIII", body)
            else:
                ifid, _drops, hi, lo, incl, orig = struct.unpack_from(bo + "HHIIII", body)
            off = 20                     # both blocks carry 20 bytes before the packet
            idx = base + ifid
            if idx >= len(cap.interfaces):
                raise CaptureError(f"packet on interface {ifid}, which was never described")
            iface = cap.interfaces[idx]
            data = body[off:off + incl]
            comment = "; ".join(v.decode("utf-8", "replace") for c, v in
                                _parse_options(body, off + incl + _pad(incl), bo)
                                if c == OPT_COMMENT)
            ticks = hi << 32 | lo
            yield Packet(idx, ticks * 1_000_000_000 // iface.tsresol, data, orig, comment)
        elif btype == SPB:
            if base >= len(cap.interfaces):
                raise CaptureError("simple packet block before any interface")
            orig = struct.unpack_from(bo + "I", body)[0]
            snap = cap.interfaces[base].snaplen or orig
            yield Packet(base, 0, body[4:4 + min(orig, snap)], orig)
        # other blocks (NRB, ISB, DSB, custom) carry nothing the viewer shows
