"""The controller as a real VM's USB controller: `xhcidbg serve` (a bare vfio-user server) and
`xhcidbg vm` (that server plus QEMU booting the guest kit's Linux)."""
from ..session import DeviceChoice, make_devices
from .backend import Backend
from .cli import add_vm_commands

__all__ = ["Backend", "DeviceChoice", "add_vm_commands", "make_devices"]
