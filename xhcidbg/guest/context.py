"""Contexts as the host driver fills and reads them (xHCI 1.2 section 6.2), written from the spec.

The guest's own transcription of the context figures, with the controller's names for the
fields (see `trb.py` for why the guest keeps its own tables).  Only the first 8 dwords of a
context carry fields, whether contexts are 32 or 64 bytes (HCCPARAMS1.CSZ).
"""
from __future__ import annotations

from ..emu.layout import Layout
from .fields import bits

# 6.2.2, figure 6-2
SLOT_CTX = Layout("Slot Context", 8, (
    bits("route_string", 0, 19, 0), bits("speed", 0, 23, 20), bits("mtt", 0, 25),
    bits("hub", 0, 26), bits("context_entries", 0, 31, 27),
    bits("max_exit_latency", 1, 15, 0), bits("root_hub_port", 1, 23, 16),
    bits("num_ports", 1, 31, 24),
    bits("tt_hub_slot", 2, 7, 0), bits("tt_port", 2, 15, 8), bits("ttt", 2, 17, 16),
    bits("interrupter", 2, 31, 22),
    bits("usb_address", 3, 7, 0), bits("slot_state", 3, 31, 27),
))

# 6.2.3, figure 6-3
EP_CTX = Layout("Endpoint Context", 8, (
    bits("ep_state", 0, 2, 0), bits("mult", 0, 9, 8), bits("max_pstreams", 0, 14, 10),
    bits("lsa", 0, 15), bits("interval", 0, 23, 16), bits("max_esit_hi", 0, 31, 24),
    bits("cerr", 1, 2, 1), bits("ep_type", 1, 5, 3), bits("hid", 1, 7),
    bits("max_burst", 1, 15, 8), bits("max_packet", 1, 31, 16),
    bits("dcs", 2, 0), bits("dequeue", 2, 63, 4),           # TR Dequeue Pointer 63:4
    bits("avg_trb_length", 4, 15, 0), bits("max_esit_lo", 4, 31, 16),
))

# 6.2.5.1, figure 6-6: bit n of drop/add is DCI n
INPUT_CTRL_CTX = Layout("Input Control Context", 8, (
    bits("drop", 0, 31, 0), bits("add", 1, 31, 0),
    bits("config_value", 7, 7, 0), bits("interface", 7, 15, 8), bits("alternate", 7, 23, 16),
))
