"""vfio-user transport: serve the xHCI controller to QEMU (`-device vfio-user-pci`).

    protocol      the wire: message layouts, commands, flags, our limits
    framing       one client's socket as messages with their file descriptors
    dispatch      commands to their handlers, replies back (and the BAR0 fast path)
    regions       what region accesses reach: BAR0, the MSI-X BAR, configuration space
    pci           the PCI function: its layout and configuration space
    irq           interrupts out through the client's eventfds
    dma           guest memory the client shares, mapped for the controller
    measurements  handling times, for tests and benchmarks
    server        the server: listening, one client at a time, disconnects
    client        a minimal client, for tests and measurements
"""
from .pci import PciIdentity, xhci_function
from .server import VfioUserServer, qemu_device_arg

__all__ = ["PciIdentity", "VfioUserServer", "qemu_device_arg", "xhci_function"]
