"""TRBs as the host driver writes and reads them (xHCI 1.2 section 6.4), written from the spec.

Each entry below transcribes one TRB figure of section 6.4: a field is named by the controller's
name for it and placed by the bit range the figure prints ("dword 2, bits 21:17").  The tables
are the guest's own reading; the controller keeps its own in `xhcidbg.emu.trb`, and the tests
running one against the other are what checks both.

`GuestTrb` is one TRB in hand: its three words and where it sits on a ring.
"""
from __future__ import annotations

from typing import Protocol

from ..emu.layout import Layout
from ..emu.trb import TrbType, trb_name
from .fields import bits, shift_mask

TRB_SIZE = 16


# ---- fields many TRBs share (6.4.1.1 and the figures after it) ------------------------------
# Dwords 0-1 are the parameter, dword 2 the status, dword 3 the control word.
POINTER = bits("pointer", 0, 63, 0)
LENGTH = bits("length", 2, 16, 0)              # TRB Transfer Length
TD_SIZE = bits("td_size", 2, 21, 17)
INTERRUPTER = bits("interrupter", 2, 31, 22)   # Interrupter Target
CYCLE = bits("cycle", 3, 0)
ENT = bits("ent", 3, 1)                        # Evaluate Next TRB
ISP = bits("isp", 3, 2)                        # Interrupt on Short Packet
NS = bits("ns", 3, 3)                          # No Snoop
CHAIN = bits("chain", 3, 4)
IOC = bits("ioc", 3, 5)                        # Interrupt On Completion
IDT = bits("idt", 3, 6)                        # Immediate Data
BEI = bits("bei", 3, 9)                        # Block Event Interrupt
TYPE = bits("type", 3, 15, 10)
DIR = bits("dir", 3, 16)                       # Data/Status Stage direction: 1 IN
ENDPOINT = bits("ep", 3, 20, 16)               # Endpoint ID (DCI)
SLOT = bits("slot", 3, 31, 24)
CC = bits("cc", 2, 31, 24)                     # Completion Code, in every event
VF_ID = bits("vf_id", 3, 23, 16)

_DATA = (POINTER, LENGTH, TD_SIZE, INTERRUPTER)
_EVENT = (CC, CYCLE, TYPE)

LAYOUTS: dict[int, Layout] = {
    # Transfer TRBs (6.4.1)
    TrbType.NORMAL: Layout("Normal", 4, (
        *_DATA, CYCLE, ENT, ISP, NS, CHAIN, IOC, IDT, BEI, TYPE)),
    TrbType.SETUP_STAGE: Layout("Setup Stage", 4, (
        bits("bmRequestType", 0, 7, 0), bits("bRequest", 0, 15, 8), bits("wValue", 0, 31, 16),
        bits("wIndex", 1, 15, 0), bits("wLength", 1, 31, 16), LENGTH, INTERRUPTER,
        CYCLE, IOC, IDT, TYPE, bits("trt", 3, 17, 16))),
    TrbType.DATA_STAGE: Layout("Data Stage", 4, (
        *_DATA, CYCLE, ENT, ISP, NS, CHAIN, IOC, IDT, TYPE, DIR)),
    TrbType.STATUS_STAGE: Layout("Status Stage", 4, (
        INTERRUPTER, CYCLE, ENT, CHAIN, IOC, TYPE, DIR)),
    TrbType.ISOCH: Layout("Isoch", 4, (
        *_DATA, CYCLE, ENT, ISP, NS, CHAIN, IOC, IDT, bits("tbc", 3, 8, 7), BEI, TYPE,
        bits("tlbpc", 3, 19, 16), bits("frame_id", 3, 30, 20), bits("sia", 3, 31))),
    # Other TRBs (6.4.4)
    TrbType.LINK: Layout("Link", 4, (
        POINTER, INTERRUPTER, CYCLE, bits("tc", 3, 1), CHAIN, IOC, TYPE)),
    TrbType.EVENT_DATA: Layout("Event Data", 4, (
        POINTER, INTERRUPTER, CYCLE, ENT, CHAIN, IOC, BEI, TYPE)),
    TrbType.NOOP: Layout("No-Op", 4, (INTERRUPTER, CYCLE, ENT, CHAIN, IOC, TYPE)),
    # Commands (6.4.3)
    TrbType.NOOP_COMMAND: Layout("No-Op Command", 4, (CYCLE, TYPE)),
    TrbType.ENABLE_SLOT: Layout("Enable Slot", 4, (CYCLE, TYPE, bits("slot_type", 3, 20, 16))),
    TrbType.DISABLE_SLOT: Layout("Disable Slot", 4, (CYCLE, TYPE, SLOT)),
    TrbType.ADDRESS_DEVICE: Layout("Address Device", 4, (
        POINTER, CYCLE, bits("bsr", 3, 9), TYPE, SLOT)),
    TrbType.CONFIGURE_ENDPOINT: Layout("Configure Endpoint", 4, (
        POINTER, CYCLE, bits("dc", 3, 9), TYPE, SLOT)),
    TrbType.EVALUATE_CONTEXT: Layout("Evaluate Context", 4, (POINTER, CYCLE, TYPE, SLOT)),
    TrbType.RESET_ENDPOINT: Layout("Reset Endpoint", 4, (
        CYCLE, bits("tsp", 3, 9), TYPE, ENDPOINT, SLOT)),
    TrbType.STOP_ENDPOINT: Layout("Stop Endpoint", 4, (
        CYCLE, TYPE, ENDPOINT, bits("sp", 3, 23), SLOT)),
    TrbType.SET_TR_DEQUEUE: Layout("Set TR Dequeue Pointer", 4, (
        bits("dcs", 0, 0), bits("sct", 0, 3, 1), bits("pointer", 0, 63, 4),
        bits("stream", 2, 31, 16), CYCLE, TYPE, ENDPOINT, SLOT)),
    TrbType.RESET_DEVICE: Layout("Reset Device", 4, (CYCLE, TYPE, SLOT)),
    TrbType.FORCE_EVENT: Layout("Force Event", 4, (
        POINTER, bits("vf_interrupter", 2, 31, 22), CYCLE, TYPE, VF_ID)),
    TrbType.NEGOTIATE_BANDWIDTH: Layout("Negotiate Bandwidth", 4, (CYCLE, TYPE, SLOT)),
    TrbType.SET_LATENCY_TOLERANCE: Layout("Set Latency Tolerance Value", 4, (
        CYCLE, TYPE, bits("belt", 3, 27, 16))),
    TrbType.GET_PORT_BANDWIDTH: Layout("Get Port Bandwidth", 4, (
        POINTER, CYCLE, TYPE, bits("speed", 3, 19, 16), bits("hub_slot", 3, 31, 24))),
    TrbType.FORCE_HEADER: Layout("Force Header", 4, (
        bits("packet_type", 0, 4, 0), bits("header_lo", 0, 31, 5), bits("header_mid", 1, 31, 0),
        bits("header_hi", 2, 31, 0), CYCLE, TYPE, bits("port", 3, 31, 24))),
    # Events (6.4.2)
    TrbType.TRANSFER_EVENT: Layout("Transfer Event", 4, (
        POINTER, bits("length", 2, 23, 0), *_EVENT, bits("ed", 3, 2), ENDPOINT, SLOT)),
    TrbType.COMMAND_COMPLETION: Layout("Command Completion Event", 4, (
        POINTER, bits("param", 2, 23, 0), *_EVENT, VF_ID, SLOT)),
    TrbType.PORT_STATUS_CHANGE: Layout("Port Status Change Event", 4, (
        bits("port", 0, 31, 24), *_EVENT)),
    TrbType.BANDWIDTH_REQUEST: Layout("Bandwidth Request Event", 4, (*_EVENT, SLOT)),
    TrbType.DOORBELL_EVENT: Layout("Doorbell Event", 4, (
        bits("reason", 0, 4, 0), *_EVENT, VF_ID, SLOT)),
    TrbType.HOST_CONTROLLER_EVENT: Layout("Host Controller Event", 4, _EVENT),
    TrbType.DEVICE_NOTIFICATION: Layout("Device Notification Event", 4, (
        bits("notification_type", 0, 7, 4), bits("data", 0, 63, 8), *_EVENT, SLOT)),
    TrbType.MFINDEX_WRAP: Layout("MFINDEX Wrap Event", 4, _EVENT),
}

# Any TRB the guest has no figure for: what every TRB has (6.4, figure 6-8).
GENERIC = Layout("TRB", 4, (bits("parameter", 0, 63, 0), bits("status", 2, 31, 0), CYCLE, TYPE))


def layout_of(trb_type: int) -> Layout:
    return LAYOUTS.get(trb_type, GENERIC)


_TYPE_SHIFT, _TYPE_MASK = shift_mask(TYPE, 3)
_CYCLE_SHIFT, _CYCLE_MASK = shift_mask(CYCLE, 3)


def type_of(control: int) -> int:
    """The TRB Type in a control dword."""
    return (control >> _TYPE_SHIFT) & _TYPE_MASK


class TrbWords(Protocol):
    """Anything that carries a TRB's three words (the guest's `GuestTrb`, the controller's
    `Trb` a test built): all `XhciDriver.queue_command` needs."""

    @property
    def param(self) -> int: ...

    @property
    def status(self) -> int: ...

    @property
    def control(self) -> int: ...


class GuestTrb:
    """One TRB as the guest wrote it to a ring or read it from one: parameter (dwords 0-1),
    status (dword 2), control (dword 3) and its address."""

    __slots__ = ("addr", "control", "param", "status", "type")

    def __init__(self, addr: int, param: int, status: int, control: int):
        self.addr = addr
        self.param = param
        self.status = status
        self.control = control
        self.type = type_of(control)

    @classmethod
    def build(cls, trb_type: int, addr: int = 0, **values: int) -> GuestTrb:
        """A TRB of `trb_type` with the named fields of its figure set."""
        dw = layout_of(trb_type).encode(None, type=int(trb_type), **values)
        return cls(addr, dw[0] | (dw[1] << 32), dw[2], dw[3])

    @property
    def dwords(self) -> list[int]:
        return [self.param & 0xFFFFFFFF, self.param >> 32, self.status, self.control]

    @property
    def cycle(self) -> int:
        return (self.control >> _CYCLE_SHIFT) & _CYCLE_MASK

    def field(self, name: str) -> int:
        return layout_of(self.type).get(self.dwords, name)

    def decode(self) -> dict[str, int]:
        return layout_of(self.type).decode(self.dwords)

    def __repr__(self) -> str:
        return (f"GuestTrb(@{self.addr:#x} {trb_name(self.type)} p={self.param:#018x} "
                f"s={self.status:#010x} c={self.control:#010x})")
