"""The guest kit: everything needed to boot a real Linux guest against xhcidbg.

- `ensure_qemu()`: a QEMU >= 10.1 with vfio-user-pci (the system's, or a private copy from Debian)
- `ensure_kernel()`: the guest kernel (Debian's linux-image-amd64 of this machine's release)
- `ensure_initramfs()`: busybox + USB/HID/storage/gadget modules + an /init driven over serial
- `xhcidbg.guestkit.launch.Vm`: run QEMU under asyncio with a console and QMP;
  `Vm.start(host_root=True)` also mounts this machine's root in the guest (`hostroot`)
- `xhcidbg.guestkit.gadgets`: Linux USB gadgets (dummy_hcd + configfs) in that guest
- `ensure_usbip_tools()`: Debian's usbip/usbipd for the guest; `xhcidbg.guestkit.usbip` exports
  the guest's devices over USB/IP to this machine (`Vm.start(forward_tcp=...)`)

All downloads are verified against Debian's signed indexes and cached in $XDG_CACHE_HOME/xhcidbg
(or ~/.cache/xhcidbg).  `python -m xhcidbg.guestkit fetch` fetches everything up front.

Names load on first use: inside a guest, Python scripts import `gadgets` from the host's tree
over 9p, and should not pay for the fetching machinery they never run.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_API = {
    "KitError": "xhcidbg.guestkit.report",
    "OfflineError": "xhcidbg.guestkit.report",
    "QemuInstall": "xhcidbg.guestkit.qemu",
    "cache_dir": "xhcidbg.guestkit.cache",
    "ensure_initramfs": "xhcidbg.guestkit.initramfs",
    "ensure_kernel": "xhcidbg.guestkit.kernel",
    "ensure_qemu": "xhcidbg.guestkit.qemu",
    "ensure_usbip_tools": "xhcidbg.guestkit.usbip",
}

__all__ = [
           "KitError",
           "OfflineError",
           "QemuInstall",
           "cache_dir",
           "ensure_initramfs",
           "ensure_kernel",
           "ensure_qemu",
           "ensure_usbip_tools",
]
assert sorted(__all__) == sorted(_API)

if TYPE_CHECKING:
    from .cache import cache_dir
    from .initramfs import ensure_initramfs
    from .kernel import ensure_kernel
    from .qemu import QemuInstall, ensure_qemu
    from .report import KitError, OfflineError
    from .usbip import ensure_usbip_tools


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'xhcidbg.guestkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
