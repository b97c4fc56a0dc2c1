"""The guest's initramfs: static busybox, the kernel modules the tests need, and an /init that
hands the serial console to the host.

/init mounts the kernel filesystems, loads the boot modules in dependency order, quiets kernel
messages on the console (they stay readable with `dmesg`), prints READY_MARKER and runs a shell
on ttyS0 with echo off.  The host then drives that shell line by line (see launch.SerialConsole).
A modules.dep for the modules shipped lets `modprobe` load the others (gadget drivers) later.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from pathlib import Path

from . import debfile
from .cache import cache_dir, cache_lock, guest_archive
from .cpio import CpioWriter
from .gadgets import GADGET_MODULES
from .kernel import Kernel, ensure_kernel_tree, format_modules_dep
from .report import KitError, OfflineError, human_size, say

BUSYBOX_PACKAGE = "busybox-static"
READY_MARKER = "@@xhcidbg-ready@@"
MODULES_LOADED = "xhcidbg-guest: modules loaded"
FORMAT = 1     # bump when the layout below changes, so cached images are rebuilt

# Loaded by /init at boot: xHCI, HID (tablet), storage (usb-storage + sd) and a filesystem.
BOOT_MODULES = [
    "usb-common", "usbcore", "xhci-hcd", "xhci-pci",
    "hid", "usbhid", "hid-generic", "evdev",
    "scsi_mod", "sd_mod", "usb-storage",
    "vfat", "nls_cp437", "nls_ascii", "nls_utf8",
    "configfs",
]
# The host's root filesystem over virtio-9p with a writable overlay on top (hostroot.py), in
# load order: 9p needs netfs and fscache; virtio and virtio_ring need nothing of each other here.
HOST_ROOT_MODULES = [
    "virtio_ring", "virtio", "virtio_pci", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p",
    "overlay",
]
# Linux's own USB test driver (binds Gadget Zero, 0525:a4a0; driven through usbfs ioctls), and
# loop devices (a MassStorage gadget's backing file mounted in the VM that serves it).
TEST_MODULES = ["usbtest", "loop"]
# USB/IP in the kernel: usbip-host exports a device, vhci-hcd imports one, usbip-vudc is a UDC
# whose gadget is reached over USB/IP.
USBIP_MODULES = ["usbip-core", "usbip-host", "vhci-hcd", "usbip-vudc"]
# A NIC for Vm.start(forward_tcp=...): virtio-net needs net_failover, which needs failover
# (the virtio ones it also needs are HOST_ROOT_MODULES); load order.
NET_MODULES = ["failover", "net_failover", "virtio_net"]
# Shipped but not loaded (dummy_hcd adds a USB bus of its own): `modprobe NAME` in the guest.
EXTRA_MODULES = GADGET_MODULES + HOST_ROOT_MODULES + TEST_MODULES + USBIP_MODULES + NET_MODULES

INIT_SCRIPT = r"""#!/bin/busybox sh
# xhcidbg guest init: kernel filesystems, modules, then a shell on the serial console.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
echo "xhcidbg-guest: init at $(cut -d' ' -f1 /proc/uptime)s"
release=$(uname -r)
# xhcidbg.load=a,b (modprobe those instead) or xhcidbg.load=none on the kernel command line.
load=$(sed -n 's/.*xhcidbg\.load=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -z "$load" ]; then
    while read -r ko; do
        insmod "/lib/modules/$release/$ko" || echo "xhcidbg-guest: insmod $ko failed"
    done < /etc/xhcidbg/boot-modules
elif [ "$load" != none ]; then
    modprobe -a $(echo "$load" | tr , ' ') || echo "xhcidbg-guest: modprobe $load failed"
fi
grep -q configfs /proc/filesystems && mount -t configfs configfs /sys/kernel/config
echo "@MODULES_LOADED@ at $(cut -d' ' -f1 /proc/uptime)s"
dmesg -n 1
stty -F /dev/ttyS0 -echo
export PS1='guest# ' PS2=''
echo "@READY_MARKER@"
while true; do
    setsid cttyhack sh
done
""".replace("@READY_MARKER@", READY_MARKER).replace("@MODULES_LOADED@", MODULES_LOADED)

DIRECTORIES = ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "etc/xhcidbg", "proc", "sys",
               "dev", "tmp", "mnt", "root", "run", "lib", "lib/modules"]


def _installed_busybox(stamp: Path) -> Path | None:
    try:
        binary = Path(json.loads(stamp.read_text())["binary"])
    except (OSError, ValueError, KeyError):
        return None
    return binary if binary.exists() else None


def ensure_busybox() -> Path:
    """The static busybox binary of the machine's own release, unpacked in the cache."""
    folder = cache_dir() / "busybox"
    stamp = folder / "installed.json"
    found = _installed_busybox(stamp)
    if found:
        return found
    with cache_lock():
        return _installed_busybox(stamp) or _fetch_busybox(folder, stamp)


def _fetch_busybox(folder: Path, stamp: Path) -> Path:
    try:
        archive = guest_archive()
        pkg = archive.get(BUSYBOX_PACKAGE)
        deb = archive.fetch(pkg)
    except OfflineError as e:
        raise OfflineError(f"missing: {BUSYBOX_PACKAGE} for the guest (not yet in {folder})"
                           f" could not be fetched: {e}") from e
    root = folder / pkg.version.replace(":", "_")
    debfile.extract(deb, root, lambda p: p == "bin/busybox")
    binary = root / "bin" / "busybox"
    if not binary.exists():
        raise KitError(f"{BUSYBOX_PACKAGE} {pkg.version} has no bin/busybox")
    stamp.write_text(json.dumps({"binary": str(binary), "version": pkg.version}))
    return binary


def build_initramfs(kernel: Kernel, busybox: Path, boot_modules: list[str],
                    extra_modules: list[str]) -> bytes:
    """The gzip-compressed newc image."""
    shipped = kernel.modules(boot_modules + extra_modules)     # unpacks them all in one pass
    boot = kernel.modules(boot_modules)
    raw = io.BytesIO()
    cpio = CpioWriter(raw)
    for d in DIRECTORIES:
        cpio.directory(d)
    # The kernel opens /dev/console for init before anything can mount devtmpfs.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    base = f"lib/modules/{kernel.release}"
    made = set()
    for _, path, _ in shipped:
        parts = f"{base}/{path}".split("/")[:-1]
        for i in range(3, len(parts) + 1):
            folder = "/".join(parts[:i])
            if folder not in made:
                made.add(folder)
                cpio.directory(folder)
    for _, path, local in shipped:
        cpio.file(f"{base}/{path}", local.read_bytes())
    modules, _ = kernel.index()
    names = {name for name, _, _ in shipped}
    subset = {name: (path, [d for d in modules[name][1] if d in names])   # builtins drop out
              for name, path, _ in shipped}
    cpio.file(f"{base}/modules.dep", format_modules_dep(subset).encode())
    cpio.file("etc/xhcidbg/boot-modules", "".join(f"{path}\n" for _, path, _ in boot).encode())
    cpio.close()
    return gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)


def ensure_initramfs(boot_modules: list[str] | None = None,
                     extra_modules: list[str] | None = None) -> Path:
    """The initramfs (gzip'd cpio) for the guest kernel, rebuilt only when an input changed."""
    boot_modules = list(BOOT_MODULES if boot_modules is None else boot_modules)
    extra_modules = list(EXTRA_MODULES if extra_modules is None else extra_modules)
    kernel = ensure_kernel_tree()
    busybox = ensure_busybox()
    key = hashlib.sha256(json.dumps([FORMAT, kernel.root.name, str(busybox), boot_modules,
                                     extra_modules, INIT_SCRIPT]).encode()).hexdigest()[:16]
    dest = cache_dir() / "initramfs" / f"initramfs-{kernel.release}-{key}.cpio.gz"
    if dest.exists():
        return dest
    image = build_initramfs(kernel, busybox, boot_modules, extra_modules)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: parallel builders each write whole files, the last rename wins.
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    part.write_bytes(image)
    part.replace(dest)
    say(f"built {dest.name} ({human_size(len(image))})")
    return dest
