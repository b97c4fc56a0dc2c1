"""Real USB devices passed through to the guest by libusb (python-libusb1): the host's devices
and how to select one (`host`), the device interface over libusb (`device`), its events on the
session's loop (`loop`) and the port mapper that attaches and detaches them (`mapper`)."""
from .host import HostDevice, Selection, SelectionError, host_devices
from .library import LibusbMissing

__all__ = ["HostDevice", "LibusbMissing", "Selection", "SelectionError", "host_devices"]
