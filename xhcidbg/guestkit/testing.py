"""For tests that boot the guest: get the kit, or skip only where skipping is honest.

A machine without network and without a cached kit skips (with the reason naming what is
missing); under CI=true the same situation fails, so a CI run never passes by skipping the VM.
"""
from __future__ import annotations

import os

from . import ensure_initramfs, ensure_kernel, ensure_qemu
from .qemu import QemuInstall
from .report import OfflineError


def guest_kit() -> tuple[QemuInstall, os.PathLike[str], os.PathLike[str]]:
    """(QEMU, kernel, initramfs), fetching what is not cached; pytest.skip if offline (not in
    CI)."""
    try:
        return ensure_qemu(), ensure_kernel(), ensure_initramfs()
    except OfflineError as e:
        if os.environ.get("CI", "").lower() == "true":
            raise
        import pytest
        pytest.skip(f"guest kit unavailable offline: {e}")
