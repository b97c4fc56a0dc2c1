"""Every event TRB the controller posts, built in one place (xHCI 1.2 section 6.4.2).

Each builder returns the four dwords of one event, cycle bit clear (the interrupter sets it
when it writes the event).  The positions come from the event layouts declared in `trb.py`;
they are folded into constants here once, because a Transfer Event is built for most TDs.
"""
from __future__ import annotations

from .layout import DWORD_BITS, DWORD_MASK, hi32, lo32
from .trb import (
    CC,
    COMMAND_PARAM,
    COMPLETION_CODE,
    DOORBELL_REASON,
    EP_ID,
    EVENT_DATA_FLAG,
    EVENT_LENGTH,
    NOTIFICATION_DATA,
    NOTIFICATION_TYPE,
    PORT_ID,
    SLOT_ID,
    TRB_TYPE,
    VF_ID,
    TrbType,
)

EventDwords = list[int]

_CC_SHIFT = COMPLETION_CODE.lo
_LENGTH_MASK = EVENT_LENGTH.mask
_PARAM_MASK = COMMAND_PARAM.mask
_SLOT_SHIFT = SLOT_ID.lo
_EP_SHIFT = EP_ID.lo
_ED = EVENT_DATA_FLAG.bits
_TRANSFER = TRB_TYPE.put(TrbType.TRANSFER_EVENT)
_COMMAND = TRB_TYPE.put(TrbType.COMMAND_COMPLETION)


def transfer_event(pointer: int, cc: int, length: int, slot: int, dci: int,
                   event_data: bool = False) -> EventDwords:
    """A Transfer Event: `pointer` is the TRB's address, or an Event Data TRB's parameter
    (with `event_data`, and then `length` is the Event Data Transfer Length Accumulator)."""
    # the hottest builder (one per TD): the dword split inline rather than lo32/hi32 calls
    return [pointer & DWORD_MASK, (pointer >> DWORD_BITS) & DWORD_MASK,
            (cc << _CC_SHIFT) | (length & _LENGTH_MASK),
            (slot << _SLOT_SHIFT) | (dci << _EP_SHIFT) | _TRANSFER | (_ED if event_data else 0)]


def command_completion(command: int, cc: int, slot: int = 0, param: int = 0,
                       vf_id: int = 0) -> EventDwords:
    """A Command Completion Event for the command TRB at `command`."""
    return [lo32(command), hi32(command), (cc << _CC_SHIFT) | (param & _PARAM_MASK),
            SLOT_ID.put(slot) | VF_ID.put(vf_id) | _COMMAND]


def port_status_change(port: int) -> EventDwords:
    return [PORT_ID.put(port), 0, COMPLETION_CODE.put(CC.SUCCESS),
            TRB_TYPE.put(TrbType.PORT_STATUS_CHANGE)]


def mfindex_wrap() -> EventDwords:
    return [0, 0, COMPLETION_CODE.put(CC.SUCCESS), TRB_TYPE.put(TrbType.MFINDEX_WRAP)]


def host_controller_event(cc: int) -> EventDwords:
    """Event Ring Full Error, Event Lost, Host Controller Error... about the controller."""
    return [0, 0, COMPLETION_CODE.put(cc), TRB_TYPE.put(TrbType.HOST_CONTROLLER_EVENT)]


def bandwidth_request(slot: int) -> EventDwords:
    return [0, 0, COMPLETION_CODE.put(CC.SUCCESS),
            SLOT_ID.put(slot) | TRB_TYPE.put(TrbType.BANDWIDTH_REQUEST)]


def doorbell_event(reason: int, slot: int, vf_id: int = 0) -> EventDwords:
    """A Doorbell Event (virtualization: a VF's doorbell rung with DB Reason `reason`)."""
    return [DOORBELL_REASON.put(reason), 0, COMPLETION_CODE.put(CC.SUCCESS),
            SLOT_ID.put(slot) | VF_ID.put(vf_id) | TRB_TYPE.put(TrbType.DOORBELL_EVENT)]


def device_notification(slot: int, notification_type: int, data: int) -> EventDwords:
    """A Device Notification Event carrying a Device Notification TP's type and data."""
    value = NOTIFICATION_TYPE.put(notification_type) | NOTIFICATION_DATA.put(data)
    return [lo32(value), hi32(value), COMPLETION_CODE.put(CC.SUCCESS),
            SLOT_ID.put(slot) | TRB_TYPE.put(TrbType.DEVICE_NOTIFICATION)]
