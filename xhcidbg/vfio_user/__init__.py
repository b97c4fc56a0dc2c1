"""vfio-user transport: serve the xHCI controller to QEMU (`-device vfio-user-pci`)."""
from .pci import PciIdentity, xhci_function
from .server import VfioUserServer, qemu_device_arg, serve

__all__ = ["PciIdentity", "VfioUserServer", "qemu_device_arg", "serve", "xhci_function"]
