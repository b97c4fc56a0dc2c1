"""USB devices that plug into the controller's root ports.

`base` is the contract with the controller (UsbDevice, UsbTransfer); a virtual device declares
its tree in the terms of `declaration`, `descriptor_set` turns that tree into descriptors, and
`standard` runs it as a device that answers chapter 9 requests; the virtual devices are
`Tablet`, `Keyboard`, `StorageDevice` and `LoopbackDevice`.  `DirectHost` drives any of them
without a controller.  Names load on first use: importing one module of the package (`base`,
`declaration`) does not import every device.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

# public name -> the module that defines it
_API = {
    **{name: "xhcidbg.devices.base"
       for name in ("EpType", "PortLink", "Speed", "Status", "UsbDevice", "UsbTransfer")},
    **{name: "xhcidbg.devices.declaration"
       for name in ("Configuration", "EndpointDecl", "Interface")},
    "DirectHost": "xhcidbg.devices.host",
    "TransferError": "xhcidbg.devices.host",
    "Keyboard": "xhcidbg.devices.keyboard",
    "LoopbackDevice": "xhcidbg.devices.loopback",
    "Disk": "xhcidbg.devices.scsi_target",
    "StandardDevice": "xhcidbg.devices.standard",
    "StorageDevice": "xhcidbg.devices.storage",
    "Tablet": "xhcidbg.devices.tablet",
}

__all__ = ["Configuration", "DirectHost", "Disk", "EndpointDecl", "EpType", "Interface", "Keyboard",
           "LoopbackDevice", "PortLink", "Speed", "StandardDevice", "Status", "StorageDevice",
           "Tablet", "TransferError", "UsbDevice", "UsbTransfer"]
assert sorted(__all__) == sorted(_API)

if TYPE_CHECKING:
    from .base import EpType, PortLink, Speed, Status, UsbDevice, UsbTransfer
    from .declaration import Configuration, EndpointDecl, Interface
    from .host import DirectHost, TransferError
    from .keyboard import Keyboard
    from .loopback import LoopbackDevice
    from .scsi_target import Disk
    from .standard import StandardDevice
    from .storage import StorageDevice
    from .tablet import Tablet

__getattr__, __dir__ = lazy_names(__name__, globals(), _API)
