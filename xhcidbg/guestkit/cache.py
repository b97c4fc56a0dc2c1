"""Where the kit keeps what it downloads and builds, and the archives it downloads from."""
from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from collections.abc import Iterator
from pathlib import Path

from .archive import Archive
from .sources import find_debian_mirror

# Debian releases the private QEMU comes from: stable plus its backports (QEMU >= 10.1).
QEMU_SUITES = ["trixie", "trixie-backports"]
KERNEL_SUITE_ENV = "XHCIDBG_KERNEL_SUITE"   # default: the machine's own Debian release


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "xhcidbg"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """Serialise downloads and builds between processes sharing the cache (parallel test runs)."""
    with open(cache_dir() / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.cache
def qemu_archive() -> Archive:
    return Archive(find_debian_mirror(), QEMU_SUITES, cache_dir())


@functools.cache
def guest_archive() -> Archive:
    """The machine's own release: the guest kernel and busybox come from there."""
    mirror = find_debian_mirror()
    suite = os.environ.get(KERNEL_SUITE_ENV) or mirror.codename or "bookworm"
    return Archive(mirror, [suite], cache_dir())
