"""libusb for python-libusb1: the system's library where there is one, else the copy the
`libusb-package` wheel ships, loaded once per process."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

import usb1


class LibusbMissing(RuntimeError):
    """No libusb could be loaded; the message says what to install."""


@functools.cache
def load() -> str:
    """Load libusb into usb1 (once); returns the path or name of the library used."""
    candidates: list[str] = []
    system = ctypes.util.find_library("usb-1.0")
    if system:
        candidates.append(system)
    try:
        import libusb_package
        wheel = libusb_package.get_library_path()
        if wheel is not None:
            candidates.append(str(wheel))
    except ImportError:
        pass                            # no wheel: the system's library or none
    errors = []
    for path in candidates:
        try:
            usb1.loadLibrary(ctypes.CDLL(path))
            return path
        except OSError as e:
            errors.append(f"{path}: {e}")
    raise LibusbMissing("no libusb-1.0 could be loaded (" + ("; ".join(errors) or "none found")
                        + "): `pip install libusb-package` or `apt-get install libusb-1.0-0`")


def context() -> usb1.USBContext:
    """A new, opened libusb context."""
    load()
    ctx = usb1.USBContext()
    ctx.open()
    return ctx
