"""Tracing: capture what the controller does to pcapng (usbmon records for stock Wireshark,
xHCI records for the shipped Lua dissector), and read captures back.

    from xhcidbg.trace import Tracer
    with Tracer(controller, "run.pcapng", "slot=1 kind=trb,event,urb"):
        ...
"""
from .filters import CaptureFilter, FilterError
from .tracer import TraceError, Tracer, TraceStatus

__all__ = ["CaptureFilter", "FilterError", "TraceError", "TraceStatus", "Tracer"]
