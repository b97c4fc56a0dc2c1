"""Kernel module dependency resolution (modules.dep) and .modinfo reading."""
import shutil
import subprocess

import pytest

from xhcidbg.guestkit.elf import modinfo
from xhcidbg.guestkit.kernel import (
    format_modules_dep,
    load_order,
    module_name,
    parse_modules_dep,
    plain_path,
)
from xhcidbg.guestkit.report import KitError

# The shape depmod writes: each module lists all it needs, nearest first (a trailing backslash
# only wraps the line here).
MODULES_DEP = """\
kernel/drivers/usb/common/usb-common.ko:
kernel/drivers/usb/core/usbcore.ko: kernel/drivers/usb/common/usb-common.ko
kernel/drivers/usb/host/xhci-hcd.ko: kernel/drivers/usb/core/usbcore.ko \
kernel/drivers/usb/common/usb-common.ko
kernel/drivers/usb/host/xhci-pci.ko: kernel/drivers/usb/host/xhci-hcd.ko \
kernel/drivers/usb/core/usbcore.ko kernel/drivers/usb/common/usb-common.ko
kernel/drivers/scsi/scsi_common.ko:
kernel/drivers/scsi/scsi_mod.ko: kernel/drivers/scsi/scsi_common.ko
kernel/lib/crc-t10dif.ko.xz: kernel/crypto/crct10dif_common.ko.xz
kernel/crypto/crct10dif_common.ko.xz:
kernel/drivers/scsi/sd_mod.ko: kernel/lib/crc-t10dif.ko.xz kernel/crypto/crct10dif_common.ko.xz \
kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko
kernel/drivers/usb/storage/usb-storage.ko: kernel/drivers/scsi/scsi_mod.ko \
kernel/drivers/usb/core/usbcore.ko
"""


def test_names_are_normalised_like_the_kernel_does():
    assert module_name("kernel/drivers/usb/host/xhci-pci.ko") == "xhci_pci"
    assert module_name("kernel/lib/crc-t10dif.ko.xz") == "crc_t10dif"
    assert plain_path("kernel/lib/crc-t10dif.ko.xz") == "kernel/lib/crc-t10dif.ko"


def test_parse_modules_dep():
    modules = parse_modules_dep(MODULES_DEP)
    assert modules["xhci_pci"] == ("kernel/drivers/usb/host/xhci-pci.ko",
                                   ["xhci_hcd", "usbcore", "usb_common"])
    assert modules["usb_common"] == ("kernel/drivers/usb/common/usb-common.ko", [])


def test_load_order_puts_every_dependency_first_once():
    modules = parse_modules_dep(MODULES_DEP)
    order = load_order(["xhci-pci", "usb-storage", "sd_mod", "usbcore"], modules, set())
    assert sorted(order) == sorted(set(order))
    for name in order:
        for dep in modules[name][1]:
            assert order.index(dep) < order.index(name), (dep, name)
    assert set(order) == {"usb_common", "usbcore", "xhci_hcd", "xhci_pci", "scsi_common",
                          "scsi_mod", "usb_storage", "crct10dif_common", "crc_t10dif", "sd_mod"}


def test_builtin_modules_are_skipped_and_unknown_ones_named():
    modules = parse_modules_dep(MODULES_DEP)
    assert load_order(["usbcore"], modules, {"usb_common"}) == ["usbcore"]
    with pytest.raises(KitError, match="nosuch"):
        load_order(["nosuch"], modules, set())
    modules["usbcore"] = (modules["usbcore"][0], ["usb_common", "missing_dep"])
    with pytest.raises(KitError, match=r"missing_dep.*needed by usbcore"):
        load_order(["xhci_pci"], modules, set())


def test_dependency_cycle_is_reported():
    modules = {"a": ("a.ko", ["b"]), "b": ("b.ko", ["a"])}
    with pytest.raises(KitError, match="cycle"):
        load_order(["a"], modules, set())


def test_format_modules_dep_round_trips_with_full_dependency_lists():
    direct = {"usb_common": ("u/usb-common.ko", []), "usbcore": ("u/usbcore.ko", ["usb_common"]),
              "xhci_hcd": ("u/xhci-hcd.ko", ["usbcore"]),
              "xhci_pci": ("u/xhci-pci.ko", ["xhci_hcd"])}
    text = format_modules_dep(direct)
    assert "u/xhci-pci.ko: u/xhci-hcd.ko u/usbcore.ko u/usb-common.ko\n" in text
    parsed = parse_modules_dep(text)
    assert load_order(["xhci_pci"], parsed, set()) == load_order(["xhci_pci"], direct, set())


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler to make an object file")
def test_modinfo_is_read_from_a_real_relocatable_object(tmp_path):
    # A .modinfo section as modpost emits it: NUL-separated key=value strings.
    (tmp_path / "m.c").write_text(
        '__attribute__((section(".modinfo"), used)) static const char info[] ='
        ' "license=GPL\\0depends=usbcore,usb-common\\0alias=usb:v1234*\\0alias=usb:v5678*";\n'
        "int f(void) { return 1; }\n")
    subprocess.run(["cc", "-c", "-o", tmp_path / "m.o", tmp_path / "m.c"], check=True)
    info = modinfo((tmp_path / "m.o").read_bytes())
    assert info["depends"] == ["usbcore,usb-common"]
    assert info["alias"] == ["usb:v1234*", "usb:v5678*"]
    assert modinfo(b"not an elf") == {}
    assert modinfo((tmp_path / "m.o").read_bytes()[:100]) == {}
