"""Linux's xHCI text decoders (drivers/usb/host/xhci.h), reproduced byte for byte.

Driver authors read these lines every day in `/sys/kernel/debug/tracing` and xhci debugfs, so the
viewer prints TRBs, contexts, PORTSC, USBSTS and doorbells exactly as the kernel does.  Field
positions come from the declarations in `xhcidbg.emu.trb` and `xhcidbg.emu.context`; only the
wording and the kernel's own quirks (e.g. the "ep" of an event is the DCI) live here.
"""
from __future__ import annotations

from xhcidbg.emu.context import (
    EP_CTX,
    EP_STATE_NAMES,
    EP_TYPE_NAMES,
    SLOT_CTX,
    SLOT_STATE_NAMES,
)
from xhcidbg.emu.layout import DWORD_MASK, Field
from xhcidbg.emu.regs import DOORBELL, PLS_NAMES, PORTSC, USBSTS
from xhcidbg.emu.trb import (
    BEI,
    BELT,
    BSR,
    CC_NAMES,
    CHAIN,
    COMPLETION_CODE,
    CYCLE,
    DC,
    DEV_SPEED,
    ENT,
    EP_ID,
    EVENT_DATA_FLAG,
    EVENT_LENGTH,
    IDT,
    INTERRUPTER,
    IOC,
    ISP,
    LAYOUTS,
    LENGTH,
    NS,
    SLOT_ID,
    STREAM_ID,
    SUSPEND,
    TD_SIZE,
    TOGGLE_CYCLE,
    TRB_NAMES,
    TRB_TYPE,
    TSP,
    VF_ID,
)
from xhcidbg.emu.trb import TrbType as T

# Input control context flags A0 (slot) and A1 (endpoint 0)
_A_SLOT, _A_EP0 = 1 << 0, 1 << 1

# Linux names the types it knows; 24/25 (xHCI 1.1 extended property commands) it does not, and
# it has two NEC vendor types.
LINUX_TRB_NAMES = {t: n for t, n in TRB_NAMES.items() if t not in (24, 25)}
LINUX_TRB_NAMES.update({48: "NEC Command Completion Event",
                        49: "NET Get Firmware Revision Command"})

RING_TYPES = ("CTRL", "ISOC", "BULK", "INTR", "STREAM", "CMD", "EVENT")

_EVENTS = frozenset((T.TRANSFER_EVENT, T.COMMAND_COMPLETION, T.PORT_STATUS_CHANGE,
                     T.BANDWIDTH_REQUEST, T.DOORBELL_EVENT, T.HOST_CONTROLLER_EVENT,
                     T.DEVICE_NOTIFICATION, T.MFINDEX_WRAP))
_BUFFERS = frozenset((T.NORMAL, T.ISOCH, T.EVENT_DATA, T.NOOP))


def trb_type_string(t: int) -> str:
    return LINUX_TRB_NAMES.get(t, "UNKNOWN")


def cc_string(cc: int) -> str:
    return CC_NAMES.get(cc, "Unknown!!")


def _flag(value: int, field: Field, on: str) -> str:
    return on if value & field.bits else on.lower()


_SETUP = LAYOUTS[T.SETUP_STAGE]
_FORCE_HEADER = LAYOUTS[T.FORCE_HEADER]


def decode_trb(f0: int, f1: int, f2: int, f3: int) -> str:
    """`xhci_decode_trb`: one TRB given its four dwords."""
    t = TRB_TYPE.of(f3)
    name = trb_type_string(t)
    ptr = f"{f1:08x}{f0:08x}"
    cyc = _flag(f3, CYCLE, "C")
    slot = SLOT_ID.of(f3)
    ep = EP_ID.of(f3)          # the kernel subtracts one and adds it back: this is the DCI
    length, td_size, intr = LENGTH.of(f2), TD_SIZE.of(f2), INTERRUPTER.of(f2)
    if t == T.LINK:
        return (f"LINK {ptr} intr {intr} type '{name}' flags "
                f"{_flag(f3, IOC, 'I')}:{_flag(f3, CHAIN, 'C')}:{_flag(f3, TOGGLE_CYCLE, 'T')}:"
                f"{cyc}")
    if t in _EVENTS:
        return (f"TRB {ptr} status '{cc_string(COMPLETION_CODE.of(f2))}' len "
                f"{EVENT_LENGTH.of(f2)} slot {slot} ep {ep} type '{name}' flags "
                f"{_flag(f3, EVENT_DATA_FLAG, 'E')}:{cyc}")
    if t == T.SETUP_STAGE:
        setup = _SETUP.decode((f0, f1, f2, f3))
        value, index = setup["wValue"], setup["wIndex"]
        return (f"bRequestType {setup['bmRequestType']:02x} bRequest {setup['bRequest']:02x} "
                f"wValue {value >> 8:02x}{value & 0xFF:02x} "
                f"wIndex {index >> 8:02x}{index & 0xFF:02x} wLength {setup['wLength']} "
                f"length {length} TD size {td_size} intr {intr} type '{name}' flags "
                f"{_flag(f3, IDT, 'I')}:{_flag(f3, IOC, 'I')}:{cyc}")
    head = f"Buffer {ptr} length {length} TD size {td_size} intr {intr} type '{name}' flags "
    if t == T.DATA_STAGE:
        return head + ":".join((_flag(f3, IDT, "I"), _flag(f3, IOC, "I"), _flag(f3, CHAIN, "C"),
                                _flag(f3, NS, "S"), _flag(f3, ISP, "I"), _flag(f3, ENT, "E"),
                                cyc))
    if t == T.STATUS_STAGE:
        return head + ":".join((_flag(f3, IOC, "I"), _flag(f3, CHAIN, "C"), _flag(f3, ENT, "E"),
                                cyc))
    if t in _BUFFERS:
        return head + ":".join((_flag(f3, BEI, "B"), _flag(f3, IDT, "I"), _flag(f3, IOC, "I"),
                                _flag(f3, CHAIN, "C"), _flag(f3, NS, "S"), _flag(f3, ISP, "I"),
                                _flag(f3, ENT, "E"), cyc))
    if t in (T.NOOP_COMMAND, T.ENABLE_SLOT):
        return f"{name}: flags {cyc}"
    if t in (T.DISABLE_SLOT, T.NEGOTIATE_BANDWIDTH, T.RESET_DEVICE):
        return f"{name}: slot {slot} flags {cyc}"
    if t == T.ADDRESS_DEVICE:
        return f"{name}: ctx {ptr} slot {slot} flags {_flag(f3, BSR, 'B')}:{cyc}"
    if t == T.CONFIGURE_ENDPOINT:
        return f"{name}: ctx {ptr} slot {slot} flags {_flag(f3, DC, 'D')}:{cyc}"
    if t == T.EVALUATE_CONTEXT:
        return f"{name}: ctx {ptr} slot {slot} flags {cyc}"
    if t == T.RESET_ENDPOINT:
        return f"{name}: ctx {ptr} slot {slot} ep {ep} flags {_flag(f3, TSP, 'T')}:{cyc}"
    if t == T.STOP_ENDPOINT:
        return f"{name}: slot {slot} sp {SUSPEND.of(f3)} ep {ep} flags {cyc}"
    if t == T.SET_TR_DEQUEUE:
        return f"{name}: deq {ptr} stream {STREAM_ID.of(f2)} slot {slot} ep {ep} flags {cyc}"
    if t == T.FORCE_EVENT:
        return f"{name}: event {ptr} vf intr {intr} vf id {VF_ID.of(f3)} flags {cyc}"
    if t == T.SET_LATENCY_TOLERANCE:
        return f"{name}: belt {BELT.of(f3)} flags {cyc}"
    if t == T.GET_PORT_BANDWIDTH:
        return f"{name}: ctx {ptr} slot {slot} speed {DEV_SPEED.of(f3)} flags {cyc}"
    if t == T.FORCE_HEADER:
        packet_type = _FORCE_HEADER["packet_type"]
        return (f"{name}: info {f2:08x}{f1:08x}{f0 & ~packet_type.bits & DWORD_MASK:08x} "
                f"pkt type {packet_type.of(f0)} roothub port {slot} flags {cyc}")
    return f"type '{name}' -> raw {f0:08x} {f1:08x} {f2:08x} {f3:08x}"


SPEEDS = {1: "full-speed", 2: "low-speed", 3: "high-speed", 4: "super-speed",
           5: "super-speed plus"}


def decode_slot_context(info: int, info2: int, tt_info: int, state: int) -> str:
    """`xhci_decode_slot_context` over slot context dwords 0-3."""
    f = SLOT_CTX.decode((info, info2, tt_info, state, 0, 0, 0, 0))
    return (f"RS {f['route_string']:05x} {SPEEDS.get(f['speed'], 'UNKNOWN speed')}"
            f"{' multi-TT' if f['mtt'] else ''}{' Hub' if f['hub'] else ''} "
            f"Ctx Entries {f['context_entries']} MEL {f['max_exit_latency']} us "
            f"Port# {f['root_hub_port']}/{f['num_ports']} "
            f"[TT Slot {f['tt_hub_slot']} Port# {f['tt_port']} TTT {f['ttt']} "
            f"Intr {f['interrupter']}] Addr {f['usb_address']} "
            f"State {SLOT_STATE_NAMES.get(f['slot_state'], 'reserved')}")


def _c_int(v: int) -> int:
    v &= DWORD_MASK
    return v - (1 << 32) if v >> 31 else v


def decode_ep_context(info: int, info2: int, deq: int, tx_info: int) -> str:
    """`xhci_decode_ep_context`; `deq` is the 64-bit dequeue word (dwords 2-3, with DCS)."""
    f = EP_CTX.decode((info, info2, 0, 0, tx_info, 0, 0, 0))
    esit = f["max_esit_hi"] << EP_CTX["max_esit_lo"].width | f["max_esit_lo"]
    # `(1 << interval) * 125` in C int arithmetic (x86 masks the shift count to 5 bits)
    period = _c_int((1 << (f["interval"] & 31)) * 125)
    return (f"State {EP_STATE_NAMES.get(f['ep_state'], 'INVALID')} mult {f['mult'] + 1} "
            f"max P. Streams {f['max_pstreams']} {'LSA ' if f['lsa'] else ''}"
            f"interval {period} us max ESIT payload {esit} CErr {f['cerr']} "
            f"Type {EP_TYPE_NAMES.get(f['ep_type'], 'INVALID')} "
            f"{'HID' if f['hid'] else ''}burst {f['max_burst']} maxp {f['max_packet']} "
            f"deq {deq & (1 << 64) - 1:016x} avg trb len {f['avg_trb_length']}")


def _eps(mask: int) -> str:
    return "".join(f" {bit // 2}{'in' if bit % 2 else 'out'}" for bit in range(32)
                   if mask >> bit & 1)


def decode_ctrl_ctx(drop: int, add: int) -> str:
    """`xhci_decode_ctrl_ctx`: the input control context's drop and add flags."""
    out = f"Drop:{_eps(drop)}, " if drop else ""
    if add:
        out += (f"Add:{' slot' if add & _A_SLOT else ''}{' ep0' if add & _A_EP0 else ''}"
                f"{_eps(add & ~(_A_SLOT | _A_EP0))}")
    return out


_PORTSC_CHANGES = (("csc", "CSC"), ("pec", "PEC"), ("wrc", "WRC"), ("occ", "OCC"),
                   ("prc", "PRC"), ("plc", "PLC"), ("cec", "CEC"), ("cas", "CAS"))
_PORTSC_WAKES = (("wce", "WCE"), ("wde", "WDE"), ("woe", "WOE"))
_USBSTS_FLAGS = (("hch", "HCHalted"), ("hse", "HSE"), ("eint", "EINT"), ("pcd", "PCD"),
                 ("sss", "SSS"), ("rss", "RSS"), ("sre", "SRE"), ("cnr", "CNR"), ("hce", "HCE"))


def decode_portsc(portsc: int) -> str:
    """`xhci_decode_portsc`."""
    f = PORTSC.layout.decode((portsc,))
    out = (f"{'Powered' if f['pp'] else 'Powered-off'} "
           f"{'Connected' if f['ccs'] else 'Not-connected'} "
           f"{'Enabled' if f['ped'] else 'Disabled'} "
           f"Link:{PLS_NAMES.get(f['pls'], 'Unknown')} PortSpeed:{f['speed']} ")
    if f["oca"]:
        out += "OverCurrent "
    if f["pr"]:
        out += "In-Reset "
    out += "Change: " + "".join(f"{n} " for key, n in _PORTSC_CHANGES if f[key])
    out += "Wake: " + "".join(f"{n} " for key, n in _PORTSC_WAKES if f[key])
    return out


def decode_usbsts(usbsts: int) -> str:
    """`xhci_decode_usbsts` (it starts with a space, as the kernel's does)."""
    out = f" 0x{usbsts:08x}"
    if usbsts == DWORD_MASK:          # a controller that is gone reads all ones
        return out
    f = USBSTS.layout.decode((usbsts,))
    return out + "".join(f" {n}" for key, n in _USBSTS_FLAGS if f[key])


def decode_doorbell(slot: int, doorbell: int) -> str:
    """`xhci_decode_doorbell` (the stream suffix as the kernel means it, not as its
    `ret =` slip overwrites it)."""
    if slot == 0:
        return f"Command Ring {doorbell}"
    ep, stream = DOORBELL.layout.get((doorbell,), "target"), DOORBELL.layout.get((doorbell,),
                                                                                 "stream")
    out = f"Slot {slot} "
    if 0 < ep < 32:
        out += f"ep{ep // 2}{'in' if ep % 2 else 'out'}"
    elif ep < 248:
        out += f"Reserved {ep}"
    else:
        out += f"Vendor Defined {ep}"
    if stream:
        out += f" Stream {stream}"
    return out


def trb_line(ring_type: str, f0: int, f1: int, f2: int, f3: int, dma: int | None = None) -> str:
    """The text of an `xhci_log_trb` tracepoint: `RING: [@dma ]decoded` (kernels since 6.13
    print the TRB's DMA address as `%pad`, i.e. 0x and 16 hex digits)."""
    at = "" if dma is None else f"@0x{dma:016x} "
    return f"{ring_type}: {at}{decode_trb(f0, f1, f2, f3)}"


# Endpoint context EP Type -> Linux's ring type string
_RING_OF_EP_TYPE = {4: "CTRL", 1: "ISOC", 5: "ISOC", 2: "BULK", 6: "BULK", 3: "INTR", 7: "INTR"}


def ring_type_of(trb_type: int, ep_type: int | None = None, stream: int = 0) -> str:
    """Linux's ring type string for a transfer ring: from the endpoint context's type when
    known, else from the TRB type (Setup/Data/Status only occur on control rings)."""
    if stream:
        return "STREAM"
    if ep_type is not None and ep_type:
        return _RING_OF_EP_TYPE[ep_type]
    if trb_type in (T.SETUP_STAGE, T.DATA_STAGE, T.STATUS_STAGE):
        return "CTRL"
    if trb_type == T.ISOCH:
        return "ISOC"
    return "BULK"
