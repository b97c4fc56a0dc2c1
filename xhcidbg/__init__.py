"""xhcidbg: a USB 3 host controller (xHCI) emulator that serves real VMs, and a debugger,
tracer and fault injector of that controller.

The public Python API, importable from here:

    from xhcidbg import InProcessBus, XhciDriver, Tablet, Tracer

    bus = InProcessBus()                     # a controller with guest RAM, MMIO, interrupts
    bus.controller.attach(Tablet())
    drv = XhciDriver(bus).start()            # the scripted guest driver
    with Tracer(bus.controller, "run.pcapng"):
        dev = drv.enumerate(1)

Names load on first use, so `import xhcidbg` stays cheap for the command line.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names

# public name -> the module that defines it
_API = {
    "XhciController": "xhcidbg.emu.controller",
    "Hooks": "xhcidbg.emu.hooks",
    "TransferRecord": "xhcidbg.emu.hooks",
    "InProcessBus": "xhcidbg.transport.inproc",
    "XhciDriver": "xhcidbg.guest.driver",
    "Device": "xhcidbg.guest.device",
    "UsbDevice": "xhcidbg.devices.base",
    "UsbTransfer": "xhcidbg.devices.base",
    "Speed": "xhcidbg.devices.base",
    "Status": "xhcidbg.devices.base",
    "StandardDevice": "xhcidbg.devices.standard",
    "Tablet": "xhcidbg.devices.tablet",
    "Keyboard": "xhcidbg.devices.keyboard",
    "StorageDevice": "xhcidbg.devices.storage",
    "LoopbackDevice": "xhcidbg.devices.loopback",
    "Tracer": "xhcidbg.trace.tracer",
    "CaptureFilter": "xhcidbg.trace.filters",
}

__all__ = ["CaptureFilter", "Device", "Hooks", "InProcessBus", "Keyboard", "LoopbackDevice",
           "Speed", "StandardDevice", "Status", "StorageDevice", "Tablet", "Tracer",
           "TransferRecord", "UsbDevice", "UsbTransfer", "XhciController", "XhciDriver"]
assert sorted(__all__) == sorted(_API)

if TYPE_CHECKING:
    from .devices.base import Speed, Status, UsbDevice, UsbTransfer
    from .devices.keyboard import Keyboard
    from .devices.loopback import LoopbackDevice
    from .devices.standard import StandardDevice
    from .devices.storage import StorageDevice
    from .devices.tablet import Tablet
    from .emu.controller import XhciController
    from .emu.hooks import Hooks, TransferRecord
    from .guest.device import Device
    from .guest.driver import XhciDriver
    from .trace.filters import CaptureFilter
    from .trace.tracer import Tracer
    from .transport.inproc import InProcessBus


__getattr__, __dir__ = lazy_names(__name__, globals(), _API)
