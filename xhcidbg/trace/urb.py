"""Transfers -> usbmon records, following what Linux's mon_bin.c writes.

The controller retires a transfer with a completion code (`TransferRecord.cc`, the one it
posted, after any observer rewrote it); Linux turns that code into the URB's errno
(xhci-ring.c's choice, here).  A transfer that ends without the controller posting anything (a
submission error) is judged by how it ended on the bus (`Status`).
"""
from __future__ import annotations

import errno
import struct
from collections.abc import Sequence

from xhcidbg.decode.usbmon import (
    FLAG_PRESENT,
    HEADER,
    HEADER_LEN,
    ISO_DESC,
    URB_DIR_IN,
    XFER_BULK,
    XFER_CONTROL,
    XFER_INT,
    XFER_ISO,
)
from xhcidbg.devices.base import EpType, Status, UsbTransfer
from xhcidbg.emu.hooks import TransferRecord
from xhcidbg.emu.transfers import STATUS_CC
from xhcidbg.emu.trb import CC

from . import pcapng

XFER_TYPE = {EpType.CONTROL: XFER_CONTROL, EpType.ISOCHRONOUS: XFER_ISO, EpType.BULK: XFER_BULK,
             EpType.INTERRUPT: XFER_INT}

# Linux xhci-ring.c: completion code of a transfer event -> URB status
CC_ERRNO: dict[int, int] = {
    CC.SUCCESS: 0, CC.SHORT_PACKET: 0, CC.STALL_ERROR: -errno.EPIPE,
    CC.USB_TRANSACTION_ERROR: -errno.EPROTO, CC.SPLIT_TRANSACTION: -errno.EPROTO,
    CC.INCOMPATIBLE_DEVICE: -errno.EPROTO, CC.BABBLE_DETECTED: -errno.EOVERFLOW,
    CC.ISOCH_BUFFER_OVERRUN: -errno.EOVERFLOW, CC.TRB_ERROR: -errno.EILSEQ,
    CC.DATA_BUFFER_ERROR: -errno.ENOSR, CC.BANDWIDTH_OVERRUN: -errno.ECOMM,
    CC.MISSED_SERVICE: -errno.EXDEV, CC.NO_PING_RESPONSE: -errno.EXDEV,
    CC.STOPPED: -errno.ECONNRESET, CC.STOPPED_LENGTH_INVALID: -errno.ECONNRESET,
    CC.STOPPED_SHORT_PACKET: -errno.ECONNRESET,
}


def completion_code(rec: TransferRecord) -> int:
    """The code the controller posted; before it did, what the bus outcome implies."""
    if rec.cc is not None:
        return rec.cc
    xfer = rec.xfer
    cc = STATUS_CC.get(xfer.status, CC.USB_TRANSACTION_ERROR) if xfer.status is not None \
        else CC.USB_TRANSACTION_ERROR
    if cc == CC.SUCCESS and xfer.actual < xfer.length:
        return CC.SHORT_PACKET
    return cc


def urb_status(cc: int) -> int:
    """The URB status Linux gives back for a transfer completion code (vendor-defined info
    codes 224-255 count as success; codes it does not expect read as a protocol error)."""
    if cc >= 224:
        return 0
    return CC_ERRNO.get(cc, -errno.EPROTO)


# Status -> URB status in one step (a short OK is Short Packet: also 0)
_STATUS_ERRNO = {int(s): urb_status(cc) for s, cc in STATUS_CC.items()}


def endpoint_byte(xfer: UsbTransfer) -> int:
    # control: the direction of the request, as the kernel takes it from the URB
    return (xfer.endpoint & 0x7F) | (0x80 if xfer.is_in else 0)


_ISO_COUNTS = struct.Struct("<ii")     # error_count, numdesc (in place of the setup bytes)
_NO_SETUP = bytes(8)
_IN_SUBMIT, _OUT_COMPLETE, _ERROR = ord("<"), ord(">"), ord("E")   # mon_bin's data tags
_DASH = ord("-")                       # flag_setup: not a control submit
_EVENT = {"S": b"S", "C": b"C", "E": b"E"}
_EINPROGRESS, _EPROTO = -errno.EINPROGRESS, -errno.EPROTO
_NODEV = int(Status.NODEV)
_XFER_TYPE = tuple(XFER_TYPE[t] for t in sorted(EpType))     # indexed by EpType
# usbmon header with the EPB around it: the tracer packs both in one call (pcapng.framed_head)
EPB_USBMON_HEAD = pcapng.framed_head(HEADER["<"])
_CAPTURED, _CAPTURED_AT = struct.Struct("<II"), 20    # an EPB's captured and original length
_EPB_TAIL = pcapng.EPB_TAIL


def urb_interval(exponent: int, full_or_low_speed: bool) -> int:
    """urb->interval from the endpoint context's Interval (2**n microframes): Linux counts
    frames for full- and low-speed devices, microframes otherwise."""
    micro = 1 << min(exponent, 15)
    return max(1, micro // 8) if full_or_low_speed else micro


def _urb_errno(rec: TransferRecord) -> int:
    if rec.cc is not None:
        return urb_status(rec.cc)
    status = rec.xfer.status
    return _EPROTO if status is None else _STATUS_ERRNO.get(int(status), _EPROTO)


def _in_views(xfer: UsbTransfer, n: int) -> list[memoryview]:
    """The first `n` bytes an IN transfer delivered, as views (nothing copied)."""
    if not xfer.in_place:
        return [memoryview(xfer.result)[:n]]
    out = []
    for view in xfer.in_buffers() or ():
        if n <= 0:
            break
        out.append(view[:n])
        n -= len(out[-1])
    return out


def usbmon_block(rec: TransferRecord, event: str, ts_ns: int, max_data: int, interval: int,
                 interface: int, comment: bytes = b""
                 ) -> tuple[int, tuple[bytes | memoryview, ...]]:
    """One usbmon record for `event` ('S', 'C' or 'E') as a whole pcapng EPB on `interface`,
    in pieces: (block length, pieces) -- the packed block and usbmon headers, the ISO
    descriptors, views of the transfer's data (nothing copied yet) and the tail.  The caller
    copies them once, wherever the block goes.  `interval` is urb->interval (see
    `urb_interval`), written for interrupt and isoch only; at most `max_data` bytes of data
    are kept; `comment` is a ready option list (pcapng.comment_option)."""
    xfer = rec.xfer
    is_in = xfer.is_in
    xtype = _XFER_TYPE[xfer.ep_type]
    usec = ts_ns // 1000
    if xtype == XFER_ISO:
        start_frame = rec.iso_frame
    else:
        start_frame = 0
        if xtype != XFER_INT:
            interval = 0
    setup, flag_setup, iso, ndesc, cap = _NO_SETUP, _DASH, b"", 0, 0
    captured: Sequence[memoryview] = ()
    if event == "S":
        status, length = _EINPROGRESS, xfer.length
        if xtype == XFER_CONTROL and xfer.setup is not None:
            setup, flag_setup = bytes(xfer.setup[:8]).ljust(8, b"\0"), FLAG_PRESENT
        if is_in:
            n, flag_data = 0, _IN_SUBMIT
        else:
            data = xfer.data
            n = min(len(data), length) if data is not None else 0
            assert data is not None or n == 0
            flag_data = FLAG_PRESENT                  # mon_bin: OUT data goes with the submit
            cap = min(n, max_data)
            if cap > 0:
                captured = (memoryview(data or b"")[:cap],)
    elif event == "C":
        status, length = _urb_errno(rec), xfer.actual
        if is_in:
            n, flag_data = length, FLAG_PRESENT       # IN data comes with the completion
            cap = min(n, max_data)
            if cap > 0:
                captured = _in_views(xfer, cap)
                cap = sum(map(len, captured))
        else:
            n, flag_data = 0, _OUT_COMPLETE
    else:                                             # a submission error: header only
        status = -errno.ENODEV if xfer.status == _NODEV else _urb_errno(rec)
        length, n, flag_data = 0, 0, _ERROR
    if xtype == XFER_ISO and event != "E":
        # one isochronous TD is one packet: a single descriptor covering the whole buffer
        ndesc = 1
        iso = ISO_DESC["<"].pack(0 if event == "S" else status, 0, length)
        setup = _ISO_COUNTS.pack(0 if event == "S" or status == 0 else 1, ndesc)
    size = HEADER_LEN + len(iso) + cap                # what the block captures
    total = pcapng.EPB_OVERHEAD + (size + 3 & ~3) + len(comment)
    # libpcap's rule: the original length counts all the data the URB carried
    head = EPB_USBMON_HEAD.pack(
        pcapng.EPB, total, interface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, size,
        HEADER_LEN + len(iso) + n, xfer.id, _EVENT[event], xtype,
        (xfer.endpoint & 0x7F) | (0x80 if is_in else 0), rec.devnum & 0xFF, rec.bus & 0xFFFF,
        flag_setup, FLAG_PRESENT if n and event != "E" else flag_data, usec // 1_000_000,
        usec % 1_000_000, status, length, len(iso) + cap, setup, interval, start_frame,
        URB_DIR_IN if is_in else 0, ndesc)
    if comment:
        return total, (head, iso, *captured, bytes(-size & 3), comment, pcapng.U32.pack(total))
    return total, (head, iso, *captured, _EPB_TAIL[size & 3].pack(total))


def usbmon_record(rec: TransferRecord, event: str, ts_ns: int, max_data: int,
                  interval: int = 0) -> tuple[bytes, int]:
    """The usbmon record of `usbmon_block` alone; returns (bytes, original length)."""
    _, pieces = usbmon_block(rec, event, ts_ns, max_data, interval, 0)
    block = b"".join(pieces)
    size, orig = _CAPTURED.unpack_from(block, _CAPTURED_AT)
    return block[pcapng.EPB_HEADER:pcapng.EPB_HEADER + size], orig
