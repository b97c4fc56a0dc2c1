"""The scripted guest: a small, complete xHCI host driver that reaches the controller only
through a bus (MMIO, guest RAM, interrupts, `bus.wait`), used by tests, the console, fuzzing and
benchmarks.

    from xhcidbg.guest import XhciDriver
    drv = XhciDriver(bus).start()
    dev = drv.enumerate(drv.wait_for_connect())
"""
from .device import Device, Endpoint, Transfer
from .driver import CommandCompletion, Event, PortStatus, XhciDriver
from .errors import (CommandFailed, ControllerError, DescriptorError, NoDevice, TransferFailed,
                     XhciError, XhciTimeout)

__all__ = ["XhciDriver", "Device", "Endpoint", "Transfer", "Event", "CommandCompletion",
           "PortStatus", "XhciError", "ControllerError", "XhciTimeout", "CommandFailed",
           "TransferFailed", "DescriptorError", "NoDevice"]
