"""The xHCI-level trace records: what the pcapng interface with a USER link type carries.

Every record is a little-endian sequence of dwords declared below as a `Layout` (dword 0 is the
common header: record kind and format version), optionally followed by UTF-8 text (a register
name, a log message).  Records that hold a TRB keep its four dwords at dwords 4-7.  The packers
are written out by hand for speed, with field positions taken from these declarations at
import; `tests/test_trace_records.py` checks them against the declarations, and the Wireshark
dissector is generated from them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from xhcidbg.emu.layout import Field as F
from xhcidbg.emu.layout import Layout

from . import pcapng

LINKTYPE = 147                 # LINKTYPE_USER0
VERSION = 1
TRB_OFFSET = 16                # byte offset of the TRB in TRB, EVENT and COMMAND records


class Kind(IntEnum):
    MMIO = 1
    DOORBELL = 2
    TRB = 3
    EVENT = 4
    COMMAND = 5
    PORT = 6
    INTERRUPT = 7
    CONTEXT = 8
    STATE = 9
    LOG = 10
    URB = 11                   # a usbmon record with the slot/endpoint it ran on
    FAULT = 12                 # a fault rule fired (the fault engine's injection)


class Ring(IntEnum):
    """Which ring a fetched TRB came from."""

    COMMAND = 0
    TRANSFER = 1


CTX_SLOT, CTX_INPUT_CONTROL = 0, 32      # CONTEXT.dci: 0 slot, 1-31 endpoint, 32 input control
LOG_LEVELS = ("debug", "info", "warning", "error")

_HEAD = (F("kind", 0, 0, 8, "Record kind"), F("version", 0, 8, 8, "Record format version"))

LAYOUTS: dict[Kind, Layout] = {
    Kind.MMIO: Layout("MMIO", 5, (*_HEAD, F("offset", 1, 0, 32, "BAR0 offset"),
                                  F("size", 2, 0, 8, "Access size in bytes"),
                                  F("write", 2, 8, 1, "1 write, 0 read"),
                                  F("value", 3, 0, 64, "Value read or written"))),
    Kind.DOORBELL: Layout("Doorbell", 3, (*_HEAD, F("db", 1, 0, 8, "Doorbell (slot) number"),
                                          F("target", 2, 0, 8, "DB Target (DCI)"),
                                          F("stream", 2, 16, 16, "DB Stream ID"))),
    Kind.TRB: Layout("TRB fetched", 8, (*_HEAD, F("address", 1, 0, 64, "TRB address"),
                                        F("slot", 3, 0, 8, "Slot ID"),
                                        F("dci", 3, 8, 5, "Endpoint (DCI)"),
                                        F("ring", 3, 13, 3, "Ring: 0 command, 1 transfer"),
                                        F("stream", 3, 16, 16, "Stream ID"))),
    Kind.EVENT: Layout("Event posted", 8, (*_HEAD, F("address", 1, 0, 64, "Event ring address"),
                                           F("interrupter", 3, 0, 10, "Interrupter"),
                                           F("dropped", 3, 16, 1, "Suppressed by a fault rule"))),
    Kind.COMMAND: Layout("Command completed", 9, (
        *_HEAD, F("address", 1, 0, 64, "Command TRB address"), F("cc", 3, 0, 8, "Completion code"),
        F("slot", 3, 8, 8, "Slot ID"), F("param", 8, 0, 24, "Command completion parameter"))),
    Kind.PORT: Layout("Port change", 4, (*_HEAD, F("port", 1, 0, 8, "Root hub port"),
                                         F("old", 2, 0, 32, "PORTSC before"),
                                         F("new", 3, 0, 32, "PORTSC after"))),
    Kind.INTERRUPT: Layout("Interrupt", 2, (*_HEAD, F("interrupter", 1, 0, 16, "Interrupter"),)),
    Kind.CONTEXT: Layout("Context", 12, (
        *_HEAD, F("address", 1, 0, 64, "Context address"), F("slot", 3, 0, 8, "Slot ID"),
        F("dci", 3, 8, 6, "0 slot context, 1-31 endpoint context, 32 input control context"),
        F("reason", 3, 16, 6, "TRB type of the command after which it was read"))),
    Kind.STATE: Layout("State change", 1, _HEAD),
    Kind.LOG: Layout("Log", 2, (*_HEAD,
                                F("level", 1, 0, 8, "0 debug, 1 info, 2 warning, 3 error"))),
    Kind.URB: Layout("USB transfer", 2, (*_HEAD, F("slot", 1, 0, 8, "Slot ID"),
                                         F("dci", 1, 8, 5, "Endpoint (DCI)"),
                                         F("stream", 1, 16, 16, "Stream ID"))),
    Kind.FAULT: Layout("Fault injected", 3, (*_HEAD, F("rule", 1, 0, 16, "Fault rule number"),
                                             F("match", 2, 0, 32,
                                               "The match of the rule that fired"))),
}
# where the variable part starts, and what it holds
TEXT = {Kind.MMIO: "register name", Kind.STATE: "kind, ident, old, new (NUL separated)",
        Kind.LOG: "message", Kind.URB: "usbmon record (64-byte header and data)",
        Kind.FAULT: "what was injected, as the injection log says it"}
CONTEXT_OFFSET = 16            # the 8 context dwords follow dword 3 of a CONTEXT record

_MMIO = struct.Struct("<IIIQ")
_DB = struct.Struct("<III")
_TRB = struct.Struct("<IQIIIII")
_CMD = struct.Struct("<IQIIIIII")
_PORT = struct.Struct("<IIII")
_II = struct.Struct("<II")
_III = struct.Struct("<III")
_CTX = struct.Struct("<IQI8I")
_TRB_PARAM = struct.Struct("<IQIQII")   # _TRB with the TRB's dwords 0-1 as its 64-bit parameter
assert _TRB_PARAM.size == _TRB.size

# The tracer's hot path: each record kind packed together with its pcapng EPB in one call
# (arguments: pcapng.framed's block fields, then the record's, then the total length again).
# `tests/test_trace_records.py` checks them against `pcapng.enhanced_packet(<packer above>)`.
HEAD = {k: Layout("header", 1, _HEAD).encode(kind=k, version=VERSION)[0] for k in Kind}
EPB_MMIO_HEAD = pcapng.framed_head(_MMIO)          # then the register name, padding, length
EPB_DOORBELL = pcapng.framed(_DB)
EPB_TRB = pcapng.framed(_TRB_PARAM)                # a fetched Trb: address, info, param, ...
EPB_EVENT = pcapng.framed(_TRB)                    # an event's four dwords
EPB_COMMAND = pcapng.framed(_CMD)
EPB_PORT = pcapng.framed(_PORT)
EPB_INTERRUPT = pcapng.framed(_II)
EPB_URB_HEAD = pcapng.framed_head(_II)             # then the usbmon record


def _at(kind: Kind, name: str) -> tuple[int, int]:
    """(shift, mask) of a record field within its dword, for the packers below."""
    f = LAYOUTS[kind][name]
    return f.lo, f.mask


_M32, _M64 = (1 << 32) - 1, (1 << 64) - 1
_MMIO_SIZE, _MMIO_SIZE_M = _at(Kind.MMIO, "size")
_MMIO_WRITE, _ = _at(Kind.MMIO, "write")
_DB_DB, _DB_DB_M = _at(Kind.DOORBELL, "db")
_DB_TARGET, _DB_TARGET_M = _at(Kind.DOORBELL, "target")
_DB_STREAM, _DB_STREAM_M = _at(Kind.DOORBELL, "stream")
_TRB_SLOT, _TRB_SLOT_M = _at(Kind.TRB, "slot")
_TRB_DCI, _TRB_DCI_M = _at(Kind.TRB, "dci")
_TRB_RING, _ = _at(Kind.TRB, "ring")
_TRB_STREAM, _TRB_STREAM_M = _at(Kind.TRB, "stream")
_EV_INTR, _EV_INTR_M = _at(Kind.EVENT, "interrupter")
_EV_DROPPED, _ = _at(Kind.EVENT, "dropped")
_CMD_CC, _CMD_CC_M = _at(Kind.COMMAND, "cc")
_CMD_SLOT, _CMD_SLOT_M = _at(Kind.COMMAND, "slot")
_CMD_PARAM, _CMD_PARAM_M = _at(Kind.COMMAND, "param")
_PORT_PORT, _PORT_PORT_M = _at(Kind.PORT, "port")
_INTR, _INTR_M = _at(Kind.INTERRUPT, "interrupter")
_CTX_SLOT, _CTX_SLOT_M = _at(Kind.CONTEXT, "slot")
_CTX_DCI, _CTX_DCI_M = _at(Kind.CONTEXT, "dci")
_CTX_REASON, _CTX_REASON_M = _at(Kind.CONTEXT, "reason")
_URB_SLOT, _URB_SLOT_M = _at(Kind.URB, "slot")
_URB_DCI, _URB_DCI_M = _at(Kind.URB, "dci")
_URB_STREAM, _URB_STREAM_M = _at(Kind.URB, "stream")
_LOG_LEVEL, _ = _at(Kind.LOG, "level")


def mmio(offset: int, size: int, write: bool, value: int, name: str) -> bytes:
    return _MMIO.pack(HEAD[Kind.MMIO], offset & _M32,
                      (size & _MMIO_SIZE_M) << _MMIO_SIZE | write << _MMIO_WRITE,
                      value & _M64) + name.encode()


def doorbell(db: int, target: int, stream: int) -> bytes:
    return _DB.pack(HEAD[Kind.DOORBELL], (db & _DB_DB_M) << _DB_DB,
                    (target & _DB_TARGET_M) << _DB_TARGET | (stream & _DB_STREAM_M) << _DB_STREAM)


def trb(address: int, ring: int, slot: int, dci: int, stream: int, dw: list[int]) -> bytes:
    info = ((slot & _TRB_SLOT_M) << _TRB_SLOT | (dci & _TRB_DCI_M) << _TRB_DCI
            | ring << _TRB_RING | (stream & _TRB_STREAM_M) << _TRB_STREAM)
    return _TRB.pack(HEAD[Kind.TRB], address & _M64, info, *dw)


def event(address: int, interrupter: int, dropped: bool, dw: list[int]) -> bytes:
    return _TRB.pack(HEAD[Kind.EVENT], address & _M64,
                     (interrupter & _EV_INTR_M) << _EV_INTR | dropped << _EV_DROPPED, *dw)


def command(address: int, cc: int, slot: int, param: int, dw: list[int]) -> bytes:
    return _CMD.pack(HEAD[Kind.COMMAND], address & _M64,
                     (cc & _CMD_CC_M) << _CMD_CC | (slot & _CMD_SLOT_M) << _CMD_SLOT, *dw,
                     (param & _CMD_PARAM_M) << _CMD_PARAM)


def port(number: int, old: int, new: int) -> bytes:
    return _PORT.pack(HEAD[Kind.PORT], (number & _PORT_PORT_M) << _PORT_PORT, old & _M32,
                      new & _M32)


def interrupt(interrupter: int) -> bytes:
    return _II.pack(HEAD[Kind.INTERRUPT], (interrupter & _INTR_M) << _INTR)


def context(address: int, slot: int, dci: int, reason: int, dw: list[int]) -> bytes:
    info = ((slot & _CTX_SLOT_M) << _CTX_SLOT | (dci & _CTX_DCI_M) << _CTX_DCI
            | (reason & _CTX_REASON_M) << _CTX_REASON)
    return _CTX.pack(HEAD[Kind.CONTEXT], address & _M64, info, *dw[:8])


def urb(slot: int, dci: int, stream: int, usbmon: bytes) -> bytes:
    info = ((slot & _URB_SLOT_M) << _URB_SLOT | (dci & _URB_DCI_M) << _URB_DCI
            | (stream & _URB_STREAM_M) << _URB_STREAM)
    return _II.pack(HEAD[Kind.URB], info) + usbmon


def state(kind: str, ident: str, old: str, new: str) -> bytes:
    return struct.pack("<I", HEAD[Kind.STATE]) + "\0".join((kind, ident, old, new)).encode()


def fault(rule: int, match: int, text: str) -> bytes:
    return _III.pack(HEAD[Kind.FAULT], rule & 0xFFFF, match & _M32) + text.encode()


def log(level: str, message: str) -> bytes:
    lv = LOG_LEVELS.index(level) if level in LOG_LEVELS else 1
    return _II.pack(HEAD[Kind.LOG], lv << _LOG_LEVEL) + message.encode()


@dataclass
class Record:
    """A decoded xHCI record: its kind, its fields (per the layout) and its trailing bytes."""

    kind: int
    fields: dict[str, int]
    dwords: list[int]
    tail: bytes

    @property
    def trb(self) -> list[int] | None:
        return self.dwords[4:8] if self.kind in (Kind.TRB, Kind.EVENT, Kind.COMMAND) else None

    @property
    def text(self) -> str:
        return self.tail.decode("utf-8", "replace")


def parse(data: bytes) -> Record:
    """Decode one record; raises ValueError for something this version cannot read."""
    if len(data) < 4:
        raise ValueError("xHCI record shorter than its header")
    kind, version = data[0], data[1]
    if version != VERSION:
        raise ValueError(f"xHCI record format version {version} (this reader knows {VERSION})")
    try:
        layout = LAYOUTS[Kind(kind)]
    except ValueError:
        raise ValueError(f"unknown xHCI record kind {kind}") from None
    if len(data) < layout.size:
        raise ValueError(f"{layout.name} record of {len(data)} bytes, needs {layout.size}")
    dw = layout.unpack(data)
    return Record(kind, layout.decode(dw), dw, bytes(data[layout.size:]))
