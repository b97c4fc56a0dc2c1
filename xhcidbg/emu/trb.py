"""Transfer Request Blocks (xHCI 1.2 section 6.4): types, completion codes and field layouts.

Each TRB type is declared once below as a `Layout`; names follow the spec, the display names
follow Linux's xhci tracepoints, which driver authors read every day.
"""
from __future__ import annotations

import struct
from enum import IntEnum

from .layout import Field as F
from .layout import Layout, hi32, lo32

TRB_SIZE = 16
_TRB = struct.Struct("<QII")


class TrbType(IntEnum):
    NORMAL = 1
    SETUP_STAGE = 2
    DATA_STAGE = 3
    STATUS_STAGE = 4
    ISOCH = 5
    LINK = 6
    EVENT_DATA = 7
    NOOP = 8
    ENABLE_SLOT = 9
    DISABLE_SLOT = 10
    ADDRESS_DEVICE = 11
    CONFIGURE_ENDPOINT = 12
    EVALUATE_CONTEXT = 13
    RESET_ENDPOINT = 14
    STOP_ENDPOINT = 15
    SET_TR_DEQUEUE = 16
    RESET_DEVICE = 17
    FORCE_EVENT = 18
    NEGOTIATE_BANDWIDTH = 19
    SET_LATENCY_TOLERANCE = 20
    GET_PORT_BANDWIDTH = 21
    FORCE_HEADER = 22
    NOOP_COMMAND = 23
    GET_EXTENDED_PROPERTY = 24
    SET_EXTENDED_PROPERTY = 25
    TRANSFER_EVENT = 32
    COMMAND_COMPLETION = 33
    PORT_STATUS_CHANGE = 34
    BANDWIDTH_REQUEST = 35
    DOORBELL_EVENT = 36
    HOST_CONTROLLER_EVENT = 37
    DEVICE_NOTIFICATION = 38
    MFINDEX_WRAP = 39


# The names Linux prints (xhci_trb_type_string).
TRB_NAMES = {
    1: "Normal", 2: "Setup Stage", 3: "Data Stage", 4: "Status Stage", 5: "Isoch", 6: "Link",
    7: "Event Data", 8: "No-Op", 9: "Enable Slot Command", 10: "Disable Slot Command",
    11: "Address Device Command", 12: "Configure Endpoint Command", 13: "Evaluate Context Command",
    14: "Reset Endpoint Command", 15: "Stop Ring Command", 16: "Set TR Dequeue Pointer Command",
    17: "Reset Device Command", 18: "Force Event Command", 19: "Negotiate Bandwidth Command",
    20: "Set Latency Tolerance Value Command", 21: "Get Port Bandwidth Command",
    22: "Force Header Command", 23: "No-Op Command", 24: "Get Extended Property Command",
    25: "Set Extended Property Command", 32: "Transfer Event", 33: "Command Completion Event",
    34: "Port Status Change Event", 35: "Bandwidth Request Event", 36: "Doorbell Event",
    37: "Host Controller Event", 38: "Device Notification Event", 39: "MFINDEX Wrap Event",
}


def trb_name(t: int) -> str:
    return TRB_NAMES.get(t, "UNKNOWN")


class CC(IntEnum):
    """Completion codes (xHCI 1.2 table 6-90)."""

    INVALID = 0
    SUCCESS = 1
    DATA_BUFFER_ERROR = 2
    BABBLE_DETECTED = 3
    USB_TRANSACTION_ERROR = 4
    TRB_ERROR = 5
    STALL_ERROR = 6
    RESOURCE_ERROR = 7
    BANDWIDTH_ERROR = 8
    NO_SLOTS_AVAILABLE = 9
    INVALID_STREAM_TYPE = 10
    SLOT_NOT_ENABLED = 11
    ENDPOINT_NOT_ENABLED = 12
    SHORT_PACKET = 13
    RING_UNDERRUN = 14
    RING_OVERRUN = 15
    VF_EVENT_RING_FULL = 16
    PARAMETER_ERROR = 17
    BANDWIDTH_OVERRUN = 18
    CONTEXT_STATE_ERROR = 19
    NO_PING_RESPONSE = 20
    EVENT_RING_FULL = 21
    INCOMPATIBLE_DEVICE = 22
    MISSED_SERVICE = 23
    COMMAND_RING_STOPPED = 24
    COMMAND_ABORTED = 25
    STOPPED = 26
    STOPPED_LENGTH_INVALID = 27
    STOPPED_SHORT_PACKET = 28
    MAX_EXIT_LATENCY_TOO_LARGE = 29
    ISOCH_BUFFER_OVERRUN = 31
    EVENT_LOST = 32
    UNDEFINED = 33
    INVALID_STREAM_ID = 34
    SECONDARY_BANDWIDTH = 35
    SPLIT_TRANSACTION = 36


# The strings Linux prints (xhci_trb_comp_code_string).
CC_NAMES = {
    0: "Invalid", 1: "Success", 2: "Data Buffer Error", 3: "Babble Detected",
    4: "USB Transaction Error", 5: "TRB Error", 6: "Stall Error", 7: "Resource Error",
    8: "Bandwidth Error", 9: "No Slots Available Error", 10: "Invalid Stream Type Error",
    11: "Slot Not Enabled Error", 12: "Endpoint Not Enabled Error", 13: "Short Packet",
    14: "Ring Underrun", 15: "Ring Overrun", 16: "VF Event Ring Full Error", 17: "Parameter Error",
    18: "Bandwidth Overrun Error", 19: "Context State Error", 20: "No Ping Response Error",
    21: "Event Ring Full Error", 22: "Incompatible Device Error", 23: "Missed Service Error",
    24: "Command Ring Stopped", 25: "Command Aborted", 26: "Stopped",
    27: "Stopped - Length Invalid", 28: "Stopped - Short Packet",
    29: "Max Exit Latency Too Large Error", 31: "Isoch Buffer Overrun", 32: "Event Lost Error",
    33: "Undefined Error", 34: "Invalid Stream ID Error", 35: "Secondary Bandwidth Error",
    36: "Split Transaction Error",
}


def cc_name(cc: int) -> str:
    return CC_NAMES.get(cc, "Unknown!!")


# ---- field tables ---------------------------------------------------------------------------
# dword 0-1 parameter, dword 2 status, dword 3 control.  Every field is named once here; code
# reads and builds TRBs through these names (`F.of(dword)`, `F.put(value)`, `dword & F.bits`).
CYCLE = F("cycle", 3, 0, 1, "Cycle bit")
TRB_TYPE = F("type", 3, 10, 6, "TRB Type")
IOC = F("ioc", 3, 5, 1, "Interrupt On Completion")
CHAIN = F("chain", 3, 4, 1, "Chain bit")
ENT = F("ent", 3, 1, 1, "Evaluate Next TRB")
ISP = F("isp", 3, 2, 1, "Interrupt on Short Packet")
NS = F("ns", 3, 3, 1, "No Snoop")
IDT = F("idt", 3, 6, 1, "Immediate Data")
BEI = F("bei", 3, 9, 1, "Block Event Interrupt")
POINTER = F("pointer", 0, 0, 64, "Data Buffer / pointer")
LENGTH = F("length", 2, 0, 17, "TRB Transfer Length")
TD_SIZE = F("td_size", 2, 17, 5, "TD Size")
INTERRUPTER = F("interrupter", 2, 22, 10, "Interrupter Target")
SLOT_ID = F("slot", 3, 24, 8, "Slot ID")
EP_ID = F("ep", 3, 16, 5, "Endpoint ID (DCI)")
COMPLETION_CODE = F("cc", 2, 24, 8, "Completion Code")
_XFER = (POINTER, LENGTH, TD_SIZE, INTERRUPTER)

# Fields of one TRB type (or a few)
BM_REQUEST_TYPE = F("bmRequestType", 0, 0, 8)
TRT = F("trt", 3, 16, 2, "Transfer Type: 0 no data, 2 OUT, 3 IN")
DIR = F("dir", 3, 16, 1, "Direction: 1 IN")
TBC = F("tbc", 3, 7, 2, "Transfer Burst Count")
TLBPC = F("tlbpc", 3, 16, 4, "Transfer Last Burst Packet Count")
FRAME_ID = F("frame_id", 3, 20, 11, "Frame ID")
SIA = F("sia", 3, 31, 1, "Start Isoch ASAP")
TOGGLE_CYCLE = F("tc", 3, 1, 1, "Toggle Cycle")
SLOT_TYPE = F("slot_type", 3, 16, 5)
BSR = F("bsr", 3, 9, 1, "Block Set Address")
DC = F("dc", 3, 9, 1, "Deconfigure")
TSP = F("tsp", 3, 9, 1, "Transfer State Preserve")
SUSPEND = F("sp", 3, 23, 1, "Suspend")
DCS = F("dcs", 0, 0, 1, "Dequeue Cycle State")
SCT = F("sct", 0, 1, 3, "Stream Context Type")
TR_DEQUEUE = F("pointer", 0, 4, 60, "New TR Dequeue Pointer >> 4")
STREAM_ID = F("stream", 2, 16, 16)
DEV_SPEED = F("speed", 3, 16, 4, "Dev Speed")
HUB_SLOT = F("hub_slot", 3, 24, 8, "Hub Slot ID")
HEADER_PORT = F("port", 3, 24, 8, "Root Hub Port Number")
BELT = F("belt", 3, 16, 12, "Best Effort Latency Tolerance")
VF_ID = F("vf_id", 3, 16, 8)
# events
EVENT_POINTER = F("pointer", 0, 0, 64, "TRB Pointer or Event Data")
EVENT_LENGTH = F("length", 2, 0, 24, "TRB Transfer Length (residue)")
EVENT_DATA_FLAG = F("ed", 3, 2, 1, "Event Data")
COMMAND_POINTER = F("pointer", 0, 0, 64, "Command TRB Pointer")
COMMAND_PARAM = F("param", 2, 0, 24)
PORT_ID = F("port", 0, 24, 8, "Port ID")
DOORBELL_REASON = F("reason", 0, 0, 5)
NOTIFICATION_TYPE = F("notification_type", 0, 4, 4)
NOTIFICATION_DATA = F("data", 0, 8, 56)
_INPUT_CTX = F("pointer", 0, 0, 64, "Input Context Pointer")

LAYOUTS: dict[int, Layout] = {
    TrbType.NORMAL: Layout("Normal", 4, (*_XFER, CYCLE, ENT, ISP, NS, CHAIN, IOC, IDT, BEI,
                                         TRB_TYPE)),
    TrbType.SETUP_STAGE: Layout("Setup Stage", 4, (
        BM_REQUEST_TYPE, F("bRequest", 0, 8, 8), F("wValue", 0, 16, 16),
        F("wIndex", 1, 0, 16), F("wLength", 1, 16, 16), LENGTH, INTERRUPTER, CYCLE, IOC, IDT,
        TRB_TYPE, TRT)),
    TrbType.DATA_STAGE: Layout("Data Stage", 4, (*_XFER, CYCLE, ENT, ISP, NS, CHAIN, IOC, IDT,
                                                  TRB_TYPE, DIR)),
    TrbType.STATUS_STAGE: Layout("Status Stage", 4, (INTERRUPTER, CYCLE, ENT, CHAIN, IOC,
                                                      TRB_TYPE, DIR)),
    TrbType.ISOCH: Layout("Isoch", 4, (*_XFER, CYCLE, ENT, ISP, NS, CHAIN, IOC, IDT, BEI, TRB_TYPE,
                                        TBC, TLBPC, FRAME_ID, SIA)),
    TrbType.LINK: Layout("Link", 4, (F("pointer", 0, 0, 64, "Ring Segment Pointer"), INTERRUPTER,
                                      CYCLE, TOGGLE_CYCLE, CHAIN, IOC, TRB_TYPE)),
    TrbType.EVENT_DATA: Layout("Event Data", 4, (F("pointer", 0, 0, 64, "Event Data"),
                                                  INTERRUPTER, CYCLE, ENT, CHAIN, IOC, BEI,
                                                  TRB_TYPE)),
    TrbType.NOOP: Layout("No-Op", 4, (INTERRUPTER, CYCLE, ENT, CHAIN, IOC, TRB_TYPE)),
    TrbType.ENABLE_SLOT: Layout("Enable Slot", 4, (CYCLE, TRB_TYPE, SLOT_TYPE)),
    TrbType.DISABLE_SLOT: Layout("Disable Slot", 4, (CYCLE, TRB_TYPE, SLOT_ID)),
    TrbType.ADDRESS_DEVICE: Layout("Address Device", 4, (_INPUT_CTX, CYCLE, BSR, TRB_TYPE,
                                                          SLOT_ID)),
    TrbType.CONFIGURE_ENDPOINT: Layout("Configure Endpoint", 4, (_INPUT_CTX, CYCLE, DC,
                                                                  TRB_TYPE, SLOT_ID)),
    TrbType.EVALUATE_CONTEXT: Layout("Evaluate Context", 4, (_INPUT_CTX, CYCLE, TRB_TYPE,
                                                              SLOT_ID)),
    TrbType.RESET_ENDPOINT: Layout("Reset Endpoint", 4, (CYCLE, TSP, TRB_TYPE, EP_ID, SLOT_ID)),
    TrbType.STOP_ENDPOINT: Layout("Stop Endpoint", 4, (CYCLE, TRB_TYPE, EP_ID, SUSPEND, SLOT_ID)),
    TrbType.SET_TR_DEQUEUE: Layout("Set TR Dequeue Pointer", 4, (
        DCS, SCT, TR_DEQUEUE, STREAM_ID, CYCLE, TRB_TYPE, EP_ID, SLOT_ID)),
    TrbType.RESET_DEVICE: Layout("Reset Device", 4, (CYCLE, TRB_TYPE, SLOT_ID)),
    TrbType.FORCE_EVENT: Layout("Force Event", 4, (
        F("pointer", 0, 0, 64, "Event TRB Pointer"), F("vf_interrupter", 2, 22, 10), CYCLE,
        TRB_TYPE, VF_ID)),
    TrbType.NEGOTIATE_BANDWIDTH: Layout("Negotiate Bandwidth", 4, (CYCLE, TRB_TYPE, SLOT_ID)),
    TrbType.SET_LATENCY_TOLERANCE: Layout("Set Latency Tolerance Value", 4, (
        CYCLE, TRB_TYPE, BELT)),
    TrbType.GET_PORT_BANDWIDTH: Layout("Get Port Bandwidth", 4, (
        F("pointer", 0, 0, 64, "Port Bandwidth Context Pointer"), CYCLE, TRB_TYPE, DEV_SPEED,
        HUB_SLOT)),
    TrbType.FORCE_HEADER: Layout("Force Header", 4, (
        F("packet_type", 0, 0, 5), F("header_lo", 0, 5, 27), F("header_mid", 1, 0, 32),
        F("header_hi", 2, 0, 32), CYCLE, TRB_TYPE, HEADER_PORT)),
    TrbType.NOOP_COMMAND: Layout("No-Op Command", 4, (CYCLE, TRB_TYPE)),
    TrbType.TRANSFER_EVENT: Layout("Transfer Event", 4, (
        EVENT_POINTER, EVENT_LENGTH, COMPLETION_CODE, CYCLE, EVENT_DATA_FLAG, TRB_TYPE, EP_ID,
        SLOT_ID)),
    TrbType.COMMAND_COMPLETION: Layout("Command Completion Event", 4, (
        COMMAND_POINTER, COMMAND_PARAM, COMPLETION_CODE, CYCLE, TRB_TYPE, VF_ID, SLOT_ID)),
    TrbType.PORT_STATUS_CHANGE: Layout("Port Status Change Event", 4, (
        PORT_ID, COMPLETION_CODE, CYCLE, TRB_TYPE)),
    TrbType.BANDWIDTH_REQUEST: Layout("Bandwidth Request Event", 4, (
        COMPLETION_CODE, CYCLE, TRB_TYPE, SLOT_ID)),
    TrbType.DOORBELL_EVENT: Layout("Doorbell Event", 4, (
        DOORBELL_REASON, COMPLETION_CODE, CYCLE, TRB_TYPE, VF_ID, SLOT_ID)),
    TrbType.HOST_CONTROLLER_EVENT: Layout("Host Controller Event", 4, (
        COMPLETION_CODE, CYCLE, TRB_TYPE)),
    TrbType.DEVICE_NOTIFICATION: Layout("Device Notification Event", 4, (
        NOTIFICATION_TYPE, NOTIFICATION_DATA, COMPLETION_CODE, CYCLE, TRB_TYPE, SLOT_ID)),
    TrbType.MFINDEX_WRAP: Layout("MFINDEX Wrap Event", 4, (COMPLETION_CODE, CYCLE, TRB_TYPE)),
}

GENERIC = Layout("TRB", 4, (F("parameter", 0, 0, 64), F("status", 2, 0, 32), CYCLE, TRB_TYPE))


def layout_of(trb_type: int) -> Layout:
    return LAYOUTS.get(trb_type, GENERIC)


_TYPE_SHIFT, _TYPE_MASK = TRB_TYPE.lo, TRB_TYPE.mask


class Trb:
    """One TRB as fetched from or written to guest memory: four dwords plus where it lives.
    Treat it as a value: `type` is computed once from `control`."""

    __slots__ = ("addr", "control", "param", "status", "type")

    def __init__(self, addr: int, param: int, status: int, control: int):
        self.addr = addr
        self.param = param
        self.status = status
        self.control = control
        self.type = (control >> _TYPE_SHIFT) & _TYPE_MASK

    @classmethod
    def unpack(cls, addr: int, data: bytes) -> Trb:
        p, s, c = _TRB.unpack(data)
        return cls(addr, p, s, c)

    def pack(self) -> bytes:
        return _TRB.pack(self.param, self.status, self.control)

    @property
    def dwords(self) -> list[int]:
        return [lo32(self.param), hi32(self.param), self.status, self.control]

    @property
    def cycle(self) -> int:
        return self.control & CYCLE.bits

    def field(self, name: str) -> int:
        return layout_of(self.type).get(self.dwords, name)

    def decode(self) -> dict[str, int]:
        return layout_of(self.type).decode(self.dwords)

    @classmethod
    def build(cls, trb_type: int, addr: int = 0, **values: int) -> Trb:
        dw = layout_of(trb_type).encode(None, type=int(trb_type), **values)
        return cls(addr, dw[0] | (dw[1] << 32), dw[2], dw[3])

    def __repr__(self) -> str:
        return (f"Trb(@{self.addr:#x} {trb_name(self.type)} p={self.param:#018x} "
                f"s={self.status:#010x} c={self.control:#010x})")
