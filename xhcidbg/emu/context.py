"""Device, input and stream contexts (xHCI 1.2 section 6.2), declared once.

Contexts are 32 bytes (HCCPARAMS1.CSZ=0) or 64 bytes (CSZ=1); only the first 8 dwords carry
fields either way.  A device context is the slot context followed by 31 endpoint contexts (DCI
1-31); an input context has the input control context in front of those.
"""
from __future__ import annotations

from enum import IntEnum

from .layout import Field as F
from .layout import Layout


class SlotState(IntEnum):
    DISABLED = 0   # "enabled/disabled" in Linux's decoder: both read as 0
    DEFAULT = 1
    ADDRESSED = 2
    CONFIGURED = 3


class EpState(IntEnum):
    DISABLED = 0
    RUNNING = 1
    HALTED = 2
    STOPPED = 3
    ERROR = 4


class XhciEpType(IntEnum):
    """Endpoint Type field of the endpoint context."""

    NOT_VALID = 0
    ISOCH_OUT = 1
    BULK_OUT = 2
    INTERRUPT_OUT = 3
    CONTROL = 4
    ISOCH_IN = 5
    BULK_IN = 6
    INTERRUPT_IN = 7

    @property
    def is_in(self) -> bool:
        return self >= XhciEpType.ISOCH_IN

    @property
    def usb_type(self) -> int:
        """USB descriptor transfer type: 0 control, 1 isoch, 2 bulk, 3 interrupt."""
        return {0: 0, 1: 1, 2: 2, 3: 3, 4: 0, 5: 1, 6: 2, 7: 3}[int(self)]


SLOT_CTX = Layout("Slot Context", 8, (
    F("route_string", 0, 0, 20), F("speed", 0, 20, 4), F("mtt", 0, 25, 1), F("hub", 0, 26, 1),
    F("context_entries", 0, 27, 5), F("max_exit_latency", 1, 0, 16),
    F("root_hub_port", 1, 16, 8), F("num_ports", 1, 24, 8), F("tt_hub_slot", 2, 0, 8),
    F("tt_port", 2, 8, 8), F("ttt", 2, 16, 2), F("interrupter", 2, 22, 10),
    F("usb_address", 3, 0, 8), F("slot_state", 3, 27, 5),
))

EP_CTX = Layout("Endpoint Context", 8, (
    F("ep_state", 0, 0, 3), F("mult", 0, 8, 2), F("max_pstreams", 0, 10, 5), F("lsa", 0, 15, 1),
    F("interval", 0, 16, 8), F("max_esit_hi", 0, 24, 8), F("cerr", 1, 1, 2),
    F("ep_type", 1, 3, 3), F("hid", 1, 7, 1), F("max_burst", 1, 8, 8),
    F("max_packet", 1, 16, 16), F("dcs", 2, 0, 1),
    F("dequeue", 2, 4, 60, "TR Dequeue Pointer >> 4"),
    F("avg_trb_length", 4, 0, 16), F("max_esit_lo", 4, 16, 16),
))

INPUT_CTRL_CTX = Layout("Input Control Context", 8, (
    F("drop", 0, 0, 32), F("add", 1, 0, 32), F("config_value", 7, 0, 8),
    F("interface", 7, 8, 8), F("alternate", 7, 16, 8),
))

STREAM_CTX = Layout("Stream Context", 4, (
    F("dcs", 0, 0, 1), F("sct", 0, 1, 3), F("dequeue", 0, 4, 60), F("stopped_edtla", 2, 0, 24),
))

# Port Bandwidth Context: one byte per root port (index 0 reserved), written by Get Port Bandwidth.

SLOT_STATE_NAMES = {0: "enabled/disabled", 1: "default", 2: "addressed", 3: "configured"}
EP_STATE_NAMES = {0: "disabled", 1: "running", 2: "halted", 3: "stopped", 4: "error"}
EP_TYPE_NAMES = {1: "Isoc OUT", 2: "Bulk OUT", 3: "Int OUT", 4: "Ctrl", 5: "Isoc IN", 6: "Bulk IN",
                 7: "Int IN"}
