"""A QEMU >= 10.1 with the `vfio-user-pci` device: the system's own, or a private copy.

The private copy is Debian's `qemu-system-x86` from trixie-backports unpacked, together with every
shared library it loads (libc and the loader included), into a prefix under the user's cache.
It runs through that prefix's own `ld-linux-x86-64.so.2 --library-path ...`, so it never mixes
with the host's older libc.  Which packages to unpack is found, not listed: starting from the QEMU
binary, each DT_NEEDED that no unpacked file provides sends us to the Depends of the package that
asked for it.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from debian.debian_support import Version

from . import debfile
from .archive import Archive, Package
from .cache import QEMU_SUITES, cache_dir, cache_lock, qemu_archive
from .elf import dynamic_info
from .report import KitError, OfflineError, human_size, say

QEMU_PACKAGE = "qemu-system-x86"
QEMU_BINARY = "usr/bin/qemu-system-x86_64"
MIN_VERSION = (10, 1)
LIB_DIRS = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib64", "lib64"]
MODULE_DIR = "usr/lib/x86_64-linux-gnu/qemu"
DATA_DIRS = ["usr/share/qemu", "usr/share/seabios"]
LOADER = "ld-linux-x86-64.so.2"
STAMP = ".xhcidbg-complete.json"
QEMU_ENV = "XHCIDBG_QEMU"   # a qemu-system-x86_64 to use instead of searching


@dataclass
class QemuInstall:
    """How to run qemu-system-x86_64: `argv_prefix + [options...]` with `env` added.

    For the private copy `env` sets QEMU_MODULE_DIR to the prefix's module folder (use `environ()`
    as the child's environment).  QEMU still falls back to the system module folder for modules
    the prefix lacks; with a distribution QEMU of another version installed, only commands that
    load every module (`-device help`) abort there, ordinary runs do not.
    """
    argv_prefix: list[str]
    version: str
    env: dict[str, str] = field(default_factory=dict)
    prefix: Path | None = None          # the private prefix, None for a system QEMU

    def command(self, *args: str) -> list[str]:
        return [*self.argv_prefix, *args]

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def _version_of(argv: list[str], env: dict[str, str]) -> tuple[str, tuple[int, int]] | None:
    try:
        out = subprocess.run([*argv, "-version"], capture_output=True, text=True, timeout=30,
                             env={**os.environ, **env}).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"version (\d+)\.(\d+)(\.\d+)?", out)
    if not match:
        return None
    return match.group(0).split()[1], (int(match.group(1)), int(match.group(2)))


def _has_vfio_user(argv: list[str], env: dict[str, str]) -> bool:
    try:
        proc = subprocess.run([*argv, "-nodefaults", "-device", "vfio-user-pci,help"],
                              capture_output=True, text=True, timeout=30, env={**os.environ, **env})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and "socket" in proc.stdout


def find_system_qemu() -> QemuInstall | None:
    """The qemu-system-x86_64 on PATH (or named by XHCIDBG_QEMU) if it is new enough."""
    binary = os.environ.get(QEMU_ENV) or shutil.which("qemu-system-x86_64")
    if not binary:
        return None
    found = _version_of([binary], {})
    if found is None or found[1] < MIN_VERSION or not _has_vfio_user([binary], {}):
        if os.environ.get(QEMU_ENV):
            raise KitError(f"{QEMU_ENV}={binary} is not a QEMU >= 10.1 with vfio-user-pci")
        return None
    return QemuInstall([binary], found[0])


def _private_install(prefix: Path, version: str) -> QemuInstall:
    libs = ":".join(str(prefix / d) for d in LIB_DIRS if (prefix / d).is_dir())
    loader = next((prefix / d / LOADER for d in LIB_DIRS if (prefix / d / LOADER).exists()), None)
    if loader is None:
        raise KitError(f"no {LOADER} in {prefix}: libc6 was not unpacked")
    argv = [str(loader), "--library-path", libs, str(prefix / QEMU_BINARY)]
    for data in DATA_DIRS:
        argv += ["-L", str(prefix / data)]
    # Without this QEMU looks for modules in the system folder, where a distribution QEMU of
    # another version may keep modules that abort when loaded.
    return QemuInstall(argv, version, {"QEMU_MODULE_DIR": str(prefix / MODULE_DIR)}, prefix)


def _find_library(prefix: Path, soname: str) -> Path | None:
    for d in LIB_DIRS:
        candidate = prefix / d / soname
        if candidate.exists():
            return candidate
    return None


class PrefixBuilder:
    """Unpacks packages into a fresh prefix and follows Depends until every NEEDED resolves."""

    def __init__(self, archive: Archive, prefix: Path, binary: str = QEMU_BINARY):
        self.archive = archive
        self.prefix = prefix
        self.binary = binary
        self.owner: dict[str, str] = {}          # unpacked path -> package name
        self.unpacked: dict[str, Package] = {}
        self.followed: set[str] = set()

    def unpack(self, pkg: Package) -> None:
        if pkg.name in self.unpacked:
            return
        deb = self.archive.fetch(pkg)
        for path in debfile.extract(deb, self.prefix,
                                    lambda p: not p.startswith("usr/share/doc")
                                    and not p.startswith("usr/share/man")):
            self.owner[path] = pkg.name
        self.unpacked[pkg.name] = pkg

    def follow(self, name: str) -> None:
        """Unpack the Depends of package `name` (each group's first alternative the mirror has)."""
        self.followed.add(name)
        for group in self.unpacked[name].depends:
            if any(alt in self.unpacked for alt in group):
                continue
            dep = self.archive.resolve_group(group)
            if dep is None:
                raise KitError(f"{name} depends on {' | '.join(group)}, which the mirror lacks")
            self.unpack(dep)

    def _owner_of(self, path: Path) -> str:
        real = Path(os.path.realpath(path)).relative_to(os.path.realpath(self.prefix))
        return self.owner.get(str(real)) or self.owner.get(str(path.relative_to(self.prefix)), "?")

    def unresolved(self) -> dict[str, set[str]]:
        """soname -> packages whose loaded files need it and nothing unpacked provides it."""
        missing: dict[str, set[str]] = {}
        seen: set[str] = set()
        queue = [self.prefix / self.binary]
        while queue:
            path = queue.pop()
            info = dynamic_info(path)
            if info is None:
                continue
            for soname in info.needed:
                if soname in seen:
                    continue
                found = _find_library(self.prefix, soname)
                if found is None:
                    missing.setdefault(soname, set()).add(self._owner_of(path))
                else:
                    seen.add(soname)
                    queue.append(found)
        return missing

    def build(self, root: Package) -> None:
        self.unpack(root)
        self.follow(root.name)      # the root's own Depends: QEMU's include its firmware and data
        while missing := self.unresolved():
            askers = {pkg for pkgs in missing.values() for pkg in pkgs} - self.followed
            if not askers:
                raise KitError(f"no package in the Depends provides {', '.join(sorted(missing))}")
            for name in sorted(askers):
                if name in self.unpacked:
                    self.follow(name)
                else:
                    raise KitError(f"{', '.join(sorted(missing))} needed by a file"
                                   " of unknown origin")


def _prefix_dir() -> Path:
    return cache_dir() / "qemu"


def installed_private_qemu() -> QemuInstall | None:
    """The private QEMU already in the cache, without touching the network."""
    prefix = _prefix_dir()
    try:
        stamp = json.loads((prefix / STAMP).read_text())
        return _private_install(prefix, stamp["version"])
    except (OSError, ValueError, KeyError, KitError):
        return None


def build_private_qemu(archive: Archive | None = None) -> QemuInstall:
    if platform.machine() != "x86_64":
        raise KitError(f"the private QEMU is Debian's amd64 build; this machine is"
                       f" {platform.machine()}: install a QEMU >= 10.1 with vfio-user-pci"
                       f" or set {QEMU_ENV}")
    archive = archive or qemu_archive()
    root = archive.get(QEMU_PACKAGE)
    upstream = re.match(r"(\d+)\.(\d+)", Version(root.version).upstream_version or "")
    if not upstream or (int(upstream.group(1)), int(upstream.group(2))) < MIN_VERSION:
        raise KitError(f"the mirror's newest {QEMU_PACKAGE} is {root.version};"
                       " vfio-user needs >= 10.1")
    prefix = _prefix_dir()
    building = prefix.with_name("qemu.building")
    shutil.rmtree(building, ignore_errors=True)
    say(f"building a private QEMU {root.version} in {prefix}")
    builder = PrefixBuilder(archive, building)
    builder.build(root)
    install = _private_install(building, "")
    found = _version_of(install.argv_prefix, install.env)
    if found is None:
        raise KitError(f"the private QEMU in {building} does not run: "
                       + subprocess.run([*install.argv_prefix, "-version"], capture_output=True,
                                        text=True, env=install.environ()).stderr.strip())
    if not _has_vfio_user(install.argv_prefix, install.env):
        raise KitError(f"QEMU {found[0]} from {QEMU_PACKAGE} {root.version} lacks vfio-user-pci")
    total = sum(p.size for p in builder.unpacked.values())
    stamp = {"version": found[0], "package_version": root.version,
             "packages": {p.name: p.version for p in builder.unpacked.values()}}
    (building / STAMP).write_text(json.dumps(stamp, indent=1))
    shutil.rmtree(prefix, ignore_errors=True)
    building.rename(prefix)
    say(f"QEMU {found[0]} ready: {len(builder.unpacked)} packages,"
        f" {human_size(total)} of .deb files")
    return _private_install(prefix, found[0])


def ensure_qemu() -> QemuInstall:
    """A QEMU >= 10.1 with vfio-user-pci: the system's, the cached private one, or a new
    private one."""
    found = find_system_qemu() or installed_private_qemu()
    if found:
        return found
    try:
        with cache_lock():
            return installed_private_qemu() or build_private_qemu()
    except OfflineError as e:
        raise OfflineError(f"missing: QEMU >= 10.1 with vfio-user-pci (none on PATH, none in "
                           f"{_prefix_dir()}), and {QEMU_PACKAGE} from {' + '.join(QEMU_SUITES)} "
                           f"could not be fetched: {e}") from e
