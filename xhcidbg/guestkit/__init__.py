"""The guest kit: everything needed to boot a real Linux guest against xhcidbg.

- `ensure_qemu()`: a QEMU >= 10.1 with vfio-user-pci (the system's, or a private copy from Debian)
- `ensure_kernel()`: the guest kernel (Debian's linux-image-amd64 of this machine's release)
- `ensure_initramfs()`: busybox + USB/HID/storage/gadget modules + an /init driven over serial
- `xhcidbg.guestkit.launch.Vm`: run QEMU under asyncio with a console and QMP

All downloads are verified against Debian's signed indexes and cached in $XDG_CACHE_HOME/xhcidbg
(or ~/.cache/xhcidbg).  `python -m xhcidbg.guestkit fetch` fetches everything up front.
"""
from .cache import cache_dir
from .initramfs import ensure_initramfs
from .kernel import ensure_kernel
from .qemu import QemuInstall, ensure_qemu
from .report import KitError, OfflineError

__all__ = [
           "KitError",
           "OfflineError",
           "QemuInstall",
           "cache_dir",
           "ensure_initramfs",
           "ensure_kernel",
           "ensure_qemu",
]
