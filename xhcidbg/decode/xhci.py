"""Linux's xHCI text decoders (drivers/usb/host/xhci.h), reproduced byte for byte.

Driver authors read these lines every day in `/sys/kernel/debug/tracing` and xhci debugfs, so the
viewer prints TRBs, contexts, PORTSC, USBSTS and doorbells exactly as the kernel does.  Field
positions come from the declarations in `xhcidbg.emu.trb` and `xhcidbg.emu.context`; only the
wording and the kernel's own quirks (e.g. the "ep" of an event is the DCI) live here.
"""
from __future__ import annotations

from xhcidbg.emu.context import EP_STATE_NAMES, EP_TYPE_NAMES, SLOT_STATE_NAMES
from xhcidbg.emu.regs import PLS_NAMES
from xhcidbg.emu.trb import CC_NAMES, TRB_NAMES, TrbType as T

# Linux names the types it knows; 24/25 (xHCI 1.1 extended property commands) it does not, and
# it has two NEC vendor types.
LINUX_TRB_NAMES = {t: n for t, n in TRB_NAMES.items() if t not in (24, 25)}
LINUX_TRB_NAMES.update({48: "NEC Command Completion Event", 49: "NET Get Firmware Revision Command"})

RING_TYPES = ("CTRL", "ISOC", "BULK", "INTR", "STREAM", "CMD", "EVENT")

_EVENTS = frozenset((T.TRANSFER_EVENT, T.COMMAND_COMPLETION, T.PORT_STATUS_CHANGE,
                     T.BANDWIDTH_REQUEST, T.DOORBELL_EVENT, T.HOST_CONTROLLER_EVENT,
                     T.DEVICE_NOTIFICATION, T.MFINDEX_WRAP))
_BUFFERS = frozenset((T.NORMAL, T.ISOCH, T.EVENT_DATA, T.NOOP))


def trb_type_string(t: int) -> str:
    return LINUX_TRB_NAMES.get(t, "UNKNOWN")


def cc_string(cc: int) -> str:
    return CC_NAMES.get(cc, "Unknown!!")


def _flag(value: int, bit: int, on: str) -> str:
    return on if value >> bit & 1 else on.lower()


def decode_trb(f0: int, f1: int, f2: int, f3: int) -> str:
    """`xhci_decode_trb`: one TRB given its four dwords."""
    t = f3 >> 10 & 0x3F
    name = trb_type_string(t)
    ptr = f"{f1:08x}{f0:08x}"
    cyc = _flag(f3, 0, "C")
    slot = f3 >> 24 & 0xFF
    ep = f3 >> 16 & 0x1F          # the kernel subtracts one and adds it back: this is the DCI
    length, td_size, intr = f2 & 0x1FFFF, f2 >> 17 & 0x1F, f2 >> 22 & 0x3FF
    if t == T.LINK:
        return (f"LINK {ptr} intr {intr} type '{name}' flags "
                f"{_flag(f3, 5, 'I')}:{_flag(f3, 4, 'C')}:{_flag(f3, 1, 'T')}:{cyc}")
    if t in _EVENTS:
        return (f"TRB {ptr} status '{cc_string(f2 >> 24)}' len {f2 & 0xFFFFFF} slot {slot} "
                f"ep {ep} type '{name}' flags {_flag(f3, 2, 'E')}:{cyc}")
    if t == T.SETUP_STAGE:
        return (f"bRequestType {f0 & 0xFF:02x} bRequest {f0 >> 8 & 0xFF:02x} "
                f"wValue {f0 >> 24:02x}{f0 >> 16 & 0xFF:02x} "
                f"wIndex {f1 >> 8 & 0xFF:02x}{f1 & 0xFF:02x} wLength {f1 >> 16} "
                f"length {length} TD size {td_size} intr {intr} type '{name}' flags "
                f"{_flag(f3, 6, 'I')}:{_flag(f3, 5, 'I')}:{cyc}")
    head = f"Buffer {ptr} length {length} TD size {td_size} intr {intr} type '{name}' flags "
    if t == T.DATA_STAGE:
        return head + ":".join((_flag(f3, 6, "I"), _flag(f3, 5, "I"), _flag(f3, 4, "C"),
                                _flag(f3, 3, "S"), _flag(f3, 2, "I"), _flag(f3, 1, "E"), cyc))
    if t == T.STATUS_STAGE:
        return head + ":".join((_flag(f3, 5, "I"), _flag(f3, 4, "C"), _flag(f3, 1, "E"), cyc))
    if t in _BUFFERS:
        return head + ":".join((_flag(f3, 9, "B"), _flag(f3, 6, "I"), _flag(f3, 5, "I"),
                                _flag(f3, 4, "C"), _flag(f3, 3, "S"), _flag(f3, 2, "I"),
                                _flag(f3, 1, "E"), cyc))
    if t in (T.NOOP_COMMAND, T.ENABLE_SLOT):
        return f"{name}: flags {cyc}"
    if t in (T.DISABLE_SLOT, T.NEGOTIATE_BANDWIDTH, T.RESET_DEVICE):
        return f"{name}: slot {slot} flags {cyc}"
    if t == T.ADDRESS_DEVICE:
        return f"{name}: ctx {ptr} slot {slot} flags {_flag(f3, 9, 'B')}:{cyc}"
    if t == T.CONFIGURE_ENDPOINT:
        return f"{name}: ctx {ptr} slot {slot} flags {_flag(f3, 9, 'D')}:{cyc}"
    if t == T.EVALUATE_CONTEXT:
        return f"{name}: ctx {ptr} slot {slot} flags {cyc}"
    if t == T.RESET_ENDPOINT:
        return f"{name}: ctx {ptr} slot {slot} ep {ep} flags {_flag(f3, 9, 'T')}:{cyc}"
    if t == T.STOP_ENDPOINT:
        return f"{name}: slot {slot} sp {f3 >> 23 & 1} ep {ep} flags {cyc}"
    if t == T.SET_TR_DEQUEUE:
        return f"{name}: deq {ptr} stream {f2 >> 16} slot {slot} ep {ep} flags {cyc}"
    if t == T.FORCE_EVENT:
        return f"{name}: event {ptr} vf intr {intr} vf id {f3 >> 16 & 0xFF} flags {cyc}"
    if t == T.SET_LATENCY_TOLERANCE:
        return f"{name}: belt {f3 >> 16 & 0xFFF} flags {cyc}"
    if t == T.GET_PORT_BANDWIDTH:
        return f"{name}: ctx {ptr} slot {slot} speed {f3 >> 16 & 0xF} flags {cyc}"
    if t == T.FORCE_HEADER:
        return (f"{name}: info {f2:08x}{f1:08x}{f0 & 0xFFFFFFE0:08x} pkt type {f0 & 0x1F} "
                f"roothub port {slot} flags {cyc}")
    return f"type '{name}' -> raw {f0:08x} {f1:08x} {f2:08x} {f3:08x}"


SPEEDS = {1: "full-speed", 2: "low-speed", 3: "high-speed", 4: "super-speed",
           5: "super-speed plus"}


def decode_slot_context(info: int, info2: int, tt_info: int, state: int) -> str:
    """`xhci_decode_slot_context` over slot context dwords 0-3."""
    return (f"RS {info & 0xFFFFF:05x} {SPEEDS.get(info >> 20 & 0xF, 'UNKNOWN speed')}"
            f"{' multi-TT' if info >> 25 & 1 else ''}{' Hub' if info >> 26 & 1 else ''} "
            f"Ctx Entries {info >> 27} MEL {info2 & 0xFFFF} us "
            f"Port# {info2 >> 16 & 0xFF}/{info2 >> 24} "
            f"[TT Slot {tt_info & 0xFF} Port# {tt_info >> 8 & 0xFF} TTT {tt_info >> 16 & 3} "
            f"Intr {tt_info >> 22}] Addr {state & 0xFF} "
            f"State {SLOT_STATE_NAMES.get(state >> 27, 'reserved')}")


def _c_int(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


def decode_ep_context(info: int, info2: int, deq: int, tx_info: int) -> str:
    """`xhci_decode_ep_context`; `deq` is the 64-bit dequeue word (dwords 2-3, with DCS)."""
    esit = (info >> 24) << 16 | tx_info >> 16
    interval = info >> 16 & 0xFF
    # `(1 << interval) * 125` in C int arithmetic (x86 masks the shift count to 5 bits)
    period = _c_int((1 << (interval & 31)) * 125)
    return (f"State {EP_STATE_NAMES.get(info & 7, 'INVALID')} mult {(info >> 8 & 3) + 1} "
            f"max P. Streams {info >> 10 & 0x1F} {'LSA ' if info >> 15 & 1 else ''}"
            f"interval {period} us max ESIT payload {esit} CErr {info2 >> 1 & 3} "
            f"Type {EP_TYPE_NAMES.get(info2 >> 3 & 7, 'INVALID')} "
            f"{'HID' if info2 >> 7 & 1 else ''}burst {info2 >> 8 & 0xFF} maxp {info2 >> 16} "
            f"deq {deq & 0xFFFFFFFFFFFFFFFF:016x} avg trb len {tx_info & 0xFFFF}")


def _eps(mask: int) -> str:
    return "".join(f" {bit // 2}{'in' if bit % 2 else 'out'}" for bit in range(32)
                   if mask >> bit & 1)


def decode_ctrl_ctx(drop: int, add: int) -> str:
    """`xhci_decode_ctrl_ctx`: the input control context's drop and add flags."""
    out = f"Drop:{_eps(drop)}, " if drop else ""
    if add:
        out += (f"Add:{' slot' if add & 1 else ''}{' ep0' if add & 2 else ''}"
                f"{_eps(add & ~3)}")
    return out


def decode_portsc(portsc: int) -> str:
    """`xhci_decode_portsc`."""
    out = (f"{'Powered' if portsc >> 9 & 1 else 'Powered-off'} "
           f"{'Connected' if portsc & 1 else 'Not-connected'} "
           f"{'Enabled' if portsc >> 1 & 1 else 'Disabled'} "
           f"Link:{PLS_NAMES.get(portsc >> 5 & 0xF, 'Unknown')} PortSpeed:{portsc >> 10 & 0xF} ")
    if portsc >> 3 & 1:
        out += "OverCurrent "
    if portsc >> 4 & 1:
        out += "In-Reset "
    out += "Change: " + "".join(f"{n} " for bit, n in ((17, "CSC"), (18, "PEC"), (19, "WRC"),
                                                       (20, "OCC"), (21, "PRC"), (22, "PLC"),
                                                       (23, "CEC"), (24, "CAS"))
                                if portsc >> bit & 1)
    out += "Wake: " + "".join(f"{n} " for bit, n in ((25, "WCE"), (26, "WDE"), (27, "WOE"))
                              if portsc >> bit & 1)
    return out


def decode_usbsts(usbsts: int) -> str:
    """`xhci_decode_usbsts` (it starts with a space, as the kernel's does)."""
    out = f" 0x{usbsts:08x}"
    if usbsts == 0xFFFFFFFF:
        return out
    return out + "".join(f" {n}" for bit, n in ((0, "HCHalted"), (2, "HSE"), (3, "EINT"),
                                                (4, "PCD"), (8, "SSS"), (9, "RSS"), (10, "SRE"),
                                                (11, "CNR"), (12, "HCE"))
                         if usbsts >> bit & 1)


def decode_doorbell(slot: int, doorbell: int) -> str:
    """`xhci_decode_doorbell` (the stream suffix as the kernel means it, not as its
    `ret =` slip overwrites it)."""
    if slot == 0:
        return f"Command Ring {doorbell}"
    ep, stream = doorbell & 0xFF, doorbell >> 16
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


def ring_type_of(trb_type: int, ep_type: int | None = None, stream: int = 0) -> str:
    """Linux's ring type string for a transfer ring: from the endpoint context's type when
    known, else from the TRB type (Setup/Data/Status only occur on control rings)."""
    if stream:
        return "STREAM"
    if ep_type is not None and ep_type:
        return {4: "CTRL", 1: "ISOC", 5: "ISOC", 2: "BULK", 6: "BULK", 3: "INTR", 7: "INTR"}[ep_type]
    if trb_type in (T.SETUP_STAGE, T.DATA_STAGE, T.STATUS_STAGE):
        return "CTRL"
    if trb_type == T.ISOCH:
        return "ISOC"
    return "BULK"
