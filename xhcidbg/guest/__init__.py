"""The scripted guest: a small, complete xHCI host driver that reaches the controller only
through a bus (MMIO, guest RAM, interrupts, `bus.wait`), used by tests, the console, fuzzing and
benchmarks.

    from xhcidbg.guest import XhciDriver
    drv = XhciDriver(bus).start()
    dev = drv.enumerate(drv.wait_for_connect())

It is a second, independent reading of the spec, so it shares with the controller only the
numbering enums checked against Linux's own names (TrbType and CC with their names from
`xhcidbg.emu.trb`, the slot/endpoint state and endpoint type enums from `xhcidbg.emu.context`)
and the generic `Field`/`Layout` machinery.  Every bit position it declares itself: registers in
`regs`, TRBs in `trb`, contexts in `context`.  Where the two readings disagree, a test fails.
"""
from .device import Device, GuestEndpoint, Transfer
from .driver import CommandCompletion, Event, PortStatus, XhciDriver
from .errors import (
    CommandFailed,
    ControllerError,
    DescriptorError,
    NoDevice,
    TransferFailed,
    XhciError,
    XhciTimeout,
)

__all__ = ["CommandCompletion", "CommandFailed", "ControllerError", "DescriptorError", "Device",
           "Event", "GuestEndpoint", "NoDevice", "PortStatus", "Transfer", "TransferFailed",
           "XhciDriver", "XhciError", "XhciTimeout"]
