"""What the built initramfs holds: busybox, /init, /dev/console, modules with a consistent
modules.dep, and a boot list in dependency order."""
import gzip
import stat

import pytest

from xhcidbg.guestkit.cpio import read_newc
from xhcidbg.guestkit.initramfs import BOOT_MODULES, EXTRA_MODULES, READY_MARKER
from xhcidbg.guestkit.kernel import module_name, parse_modules_dep
from xhcidbg.guestkit.testing import guest_kit


@pytest.fixture(scope="module")
def image():
    _, _, initrd = guest_kit()
    return {e.name: e for e in read_newc(gzip.decompress(initrd.read_bytes()))}


def test_init_busybox_and_console(image):
    assert image["init"].mode == stat.S_IFREG | 0o755
    init = image["init"].data.decode()
    assert init.startswith("#!/bin/busybox sh") and READY_MARKER in init
    assert image["bin/busybox"].data[:4] == b"\x7fELF"
    assert image["dev/console"].type == stat.S_IFCHR and image["dev/console"].rdev == (5, 1)


def test_modules_dep_is_consistent_and_boot_list_ordered(image):
    [dep_name] = [n for n in image if n.endswith("/modules.dep")]
    base = dep_name.rsplit("/", 1)[0]
    modules = parse_modules_dep(image[dep_name].data.decode())
    for path, deps in modules.values():
        assert f"{base}/{path}" in image, path
        assert image[f"{base}/{path}"].data[:4] == b"\x7fELF"       # stored decompressed
        assert all(d in modules for d in deps)
    names = set(modules)
    wanted = {m.replace("-", "_") for m in BOOT_MODULES + EXTRA_MODULES}
    assert wanted <= names
    assert {"scsi_common", "udc_core", "fat"} <= names                # pulled in as dependencies
    boot = [module_name(p) for p in image["etc/xhcidbg/boot-modules"].data.decode().split()]
    assert set(boot) >= {m.replace("-", "_") for m in BOOT_MODULES}
    assert "dummy_hcd" not in boot                                   # it would add a USB bus
    for i, name in enumerate(boot):
        assert set(modules[name][1]) <= set(boot[:i]), name
