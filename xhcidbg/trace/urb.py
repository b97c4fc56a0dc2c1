"""UsbTransfer -> usbmon records, following what Linux's mon_bin.c writes.

The controller tells devices' outcomes in `Status`; Linux tells the guest driver a completion
code and then the URB an errno.  Both mappings live here: Status -> completion code (the one the
controller posts, unless it told us its own in `xfer.cc`) -> errno (xhci-ring.c's choice).
"""
from __future__ import annotations

import errno
import struct

from xhcidbg.decode.usbmon import (FLAG_PRESENT, HEADER, HEADER_LEN, ISO_DESC, URB_DIR_IN,
                                   XFER_BULK, XFER_CONTROL, XFER_INT, XFER_ISO)
from xhcidbg.devices.base import EpType, Status, UsbTransfer
from xhcidbg.emu.trb import CC
from . import pcapng

XFER_TYPE = {EpType.CONTROL: XFER_CONTROL, EpType.ISOCHRONOUS: XFER_ISO, EpType.BULK: XFER_BULK,
             EpType.INTERRUPT: XFER_INT}

STATUS_CC = {Status.OK: CC.SUCCESS, Status.STALL: CC.STALL_ERROR,
             Status.BABBLE: CC.BABBLE_DETECTED, Status.XACT_ERROR: CC.USB_TRANSACTION_ERROR,
             Status.NODEV: CC.USB_TRANSACTION_ERROR, Status.CANCELLED: CC.STOPPED}

# Linux xhci-ring.c: completion code of a transfer event -> URB status
CC_ERRNO = {
    CC.SUCCESS: 0, CC.SHORT_PACKET: 0, CC.STALL_ERROR: -errno.EPIPE,
    CC.USB_TRANSACTION_ERROR: -errno.EPROTO, CC.SPLIT_TRANSACTION: -errno.EPROTO,
    CC.INCOMPATIBLE_DEVICE: -errno.EPROTO, CC.BABBLE_DETECTED: -errno.EOVERFLOW,
    CC.ISOCH_BUFFER_OVERRUN: -errno.EOVERFLOW, CC.TRB_ERROR: -errno.EILSEQ,
    CC.DATA_BUFFER_ERROR: -errno.ENOSR, CC.BANDWIDTH_OVERRUN: -errno.ECOMM,
    CC.MISSED_SERVICE: -errno.EXDEV, CC.NO_PING_RESPONSE: -errno.EXDEV,
    CC.STOPPED: -errno.ECONNRESET, CC.STOPPED_LENGTH_INVALID: -errno.ECONNRESET,
    CC.STOPPED_SHORT_PACKET: -errno.ECONNRESET,
}


# UsbTransfer may grow `cc` (what the controller posted) and `note` (why a fault rule changed
# it); asked once here rather than with a failing getattr per record
HAS_CC = "cc" in getattr(UsbTransfer, "__slots__", ())
HAS_NOTE = "note" in getattr(UsbTransfer, "__slots__", ())


def completion_code(xfer: UsbTransfer) -> int:
    if HAS_CC and xfer.cc is not None:       # the controller's own, when it records one
        return xfer.cc
    cc = STATUS_CC.get(xfer.status, CC.USB_TRANSACTION_ERROR)
    if cc == CC.SUCCESS and xfer.actual < xfer.length:
        return CC.SHORT_PACKET
    return cc


def urb_status(cc: int) -> int:
    """The URB status Linux gives back for a transfer completion code (vendor-defined info
    codes 224-255 count as success; codes it does not expect read as a protocol error)."""
    if cc >= 224:
        return 0
    return CC_ERRNO.get(cc, -errno.EPROTO)


def endpoint_byte(xfer: UsbTransfer) -> int:
    # control: the direction of the request, as the kernel takes it from the URB
    return (xfer.endpoint & 0x7F) | (0x80 if xfer.is_in else 0)


_ISO_COUNTS = struct.Struct("<ii")     # error_count, numdesc (in place of the setup bytes)
_NO_SETUP = bytes(8)
_IN_SUBMIT, _OUT_COMPLETE, _ERROR = ord("<"), ord(">"), ord("E")   # mon_bin's data tags
_DASH = ord("-")                       # flag_setup: not a control submit
_EVENT = {"S": b"S", "C": b"C", "E": b"E"}
_EINPROGRESS = -errno.EINPROGRESS
# usbmon header with the EPB around it: the tracer packs both in one call (pcapng.framed_head)
EPB_USBMON_HEAD = pcapng.framed_head(HEADER["<"])
_EPB_TAIL = pcapng.EPB_TAIL


def urb_interval(exponent: int, full_or_low_speed: bool) -> int:
    """urb->interval from the endpoint context's Interval (2**n microframes): Linux counts
    frames for full- and low-speed devices, microframes otherwise."""
    micro = 1 << min(exponent, 15)
    return max(1, micro // 8) if full_or_low_speed else micro


def _parts(xfer: UsbTransfer, event: str, ts_ns: int, max_data: int, interval: int):
    """The usbmon header fields (HEADER order), ISO descriptors, captured data and the
    original length of one record.  The data is a view: nothing is copied here."""
    is_in = xfer.is_in
    xtype = XFER_TYPE.get(xfer.ep_type, XFER_BULK)
    sec, nsec = divmod(ts_ns, 1_000_000_000)
    flags = URB_DIR_IN if is_in else 0
    ep = (xfer.endpoint & 0x7F) | (0x80 if is_in else 0)
    if xtype == XFER_ISO:
        start_frame = xfer.iso_frame
    else:
        start_frame = 0
        if xtype != XFER_INT:
            interval = 0
    if event == "E":
        status = -errno.ENODEV if xfer.status == Status.NODEV else \
            urb_status(completion_code(xfer))
        return ((xfer.id, b"E", xtype, ep, xfer.devnum & 0xFF, xfer.bus & 0xFFFF, _DASH,
                 _ERROR, sec, nsec // 1000, status, 0, 0, _NO_SETUP, interval, start_frame,
                 flags, 0), b"", b"", HEADER_LEN)
    setup, flag_setup = _NO_SETUP, _DASH
    if event == "S":
        status = _EINPROGRESS
        length = xfer.length
        if xtype == XFER_CONTROL and xfer.setup is not None:
            setup, flag_setup = bytes(xfer.setup[:8]).ljust(8, b"\0"), FLAG_PRESENT
        data = None if is_in else xfer.data
        data_tag = _IN_SUBMIT if is_in else FLAG_PRESENT
    else:
        status = urb_status(completion_code(xfer))
        length = xfer.actual
        data = xfer.result if is_in else None
        data_tag = FLAG_PRESENT if is_in else _OUT_COMPLETE
    n = min(len(data), length) if data is not None else 0
    iso = b""
    ndesc = 0
    if xtype == XFER_ISO:
        # one isochronous TD is one packet: a single descriptor covering the whole buffer
        ndesc = 1
        iso = ISO_DESC["<"].pack(0 if event == "S" else status, 0,
                                 xfer.length if event == "S" else xfer.actual)
        setup = _ISO_COUNTS.pack(0 if event == "S" or status == 0 else 1, ndesc)
    cap = max(0, min(n, max_data))
    captured = memoryview(data)[:cap] if cap else b""
    len_cap = len(iso) + cap
    header = (xfer.id, _EVENT[event], xtype, ep, xfer.devnum & 0xFF, xfer.bus & 0xFFFF,
              flag_setup, FLAG_PRESENT if n else data_tag, sec, nsec // 1000, status, length,
              len_cap, setup, interval, start_frame, flags, ndesc)
    # libpcap's rule: the original length counts all the data the URB carried
    return header, iso, captured, HEADER_LEN + len(iso) + n


def usbmon_record(xfer: UsbTransfer, event: str, ts_ns: int, max_data: int,
                  interval: int = 0) -> tuple[bytes, int]:
    """One usbmon record for `event` ('S', 'C' or 'E'); returns (bytes, original length).
    `interval` is urb->interval (see `urb_interval`), written for interrupt and isoch only."""
    header, iso, captured, orig = _parts(xfer, event, ts_ns, max_data, interval)
    return b"".join((HEADER["<"].pack(*header), iso, captured)), orig


def usbmon_block(xfer: UsbTransfer, event: str, ts_ns: int, max_data: int, interval: int,
                 interface: int, comment: bytes = b"") -> bytes:
    """The same record as a whole pcapng EPB on `interface`; the transfer's data is copied
    once, into the block.  `comment` is a ready option list (pcapng.comment_option)."""
    header, iso, captured, orig = _parts(xfer, event, ts_ns, max_data, interval)
    n = HEADER_LEN + len(iso) + len(captured)
    total = pcapng.EPB_OVERHEAD + (n + 3 & ~3) + len(comment)
    head = EPB_USBMON_HEAD.pack(pcapng.EPB, total, interface, ts_ns >> 32, ts_ns & 0xFFFFFFFF,
                                n, orig, *header)
    if comment:
        return b"".join((head, iso, captured, bytes(-n & 3), comment, pcapng.U32.pack(total)))
    return b"".join((head, iso, captured, _EPB_TAIL[n & 3].pack(total)))
