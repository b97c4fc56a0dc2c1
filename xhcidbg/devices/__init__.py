"""USB devices that plug into the controller's root ports.

`base` is the contract with the controller (UsbDevice, UsbTransfer); a virtual device declares
its tree in the terms of `declaration`, `descriptor_set` turns that tree into descriptors, and
`standard` runs it as a device that answers chapter 9 requests; the virtual devices are
`Tablet`, `Keyboard`, `StorageDevice` and `LoopbackDevice`.  `DirectHost` drives any of them
without a controller.
"""
from .base import EpType, PortLink, Speed, Status, UsbDevice, UsbTransfer
from .declaration import Configuration, EndpointDecl, Interface
from .host import DirectHost, TransferError
from .keyboard import Keyboard
from .loopback import LoopbackDevice
from .scsi_target import Disk
from .standard import StandardDevice
from .storage import StorageDevice
from .tablet import Tablet

__all__ = ["Configuration", "DirectHost", "Disk", "EndpointDecl", "EpType", "Interface", "Keyboard",
           "LoopbackDevice", "PortLink", "Speed", "StandardDevice", "Status", "StorageDevice",
           "Tablet", "TransferError", "UsbDevice", "UsbTransfer"]
