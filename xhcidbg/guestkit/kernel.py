"""The guest kernel: Debian's `linux-image-amd64` of the machine's own release, and its modules.

Debian's package carries no modules.dep (depmod makes it at install time), so the dependencies
come from each module's own `.modinfo` `depends=` list, which is what depmod would have written.
A shipped modules.dep is used when present.  The package's data archive is streamed twice at
most: once to take vmlinuz and index every module, and again only when modules not yet unpacked
are asked for.  Compressed modules (.ko.xz) are stored decompressed, ready for busybox insmod.
"""
from __future__ import annotations

import json
import lzma
import posixpath
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import debfile
from .archive import Archive
from .cache import cache_dir, cache_lock, guest_archive
from .elf import modinfo
from .report import KitError, OfflineError, say

KERNEL_PACKAGE = "linux-image-amd64"
INSTALLED = "installed.json"
INDEX = "modules.json"
MODULE_SUFFIXES = (".ko", ".ko.xz")


def module_name(path: str) -> str:
    """Kernel module name of a file path: basename without suffix, dashes as underscores."""
    base = posixpath.basename(path)
    for suffix in (*MODULE_SUFFIXES, ".ko.zst", ".ko.gz"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def plain_path(path: str) -> str:
    """The path a module has once decompressed (kernel/x/y.ko.xz -> kernel/x/y.ko)."""
    return re.sub(r"\.ko\.\w+$", ".ko", path)


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep -> {name: (path, [names it depends on])}."""
    modules = {}
    for line in text.splitlines():
        path, sep, deps = line.partition(":")
        if sep:
            modules[module_name(path)] = (path.strip(), [module_name(d) for d in deps.split()])
    return modules


def format_modules_dep(modules: dict[str, tuple[str, list[str]]]) -> str:
    """The inverse of parse_modules_dep: one `path: dep-path ...` line per module, listing all
    its dependencies as depmod does."""
    lines = []
    for name in sorted(modules):
        path, _ = modules[name]
        deps = [modules[d][0] for d in load_order([name], modules, set()) if d != name]
        lines.append(f"{path}: {' '.join(reversed(deps))}".rstrip())
    return "\n".join(lines) + "\n"


def load_order(wanted: list[str], modules: dict[str, tuple[str, list[str]]],
               builtin: set[str]) -> list[str]:
    """Names of `wanted` and everything they depend on, each after its dependencies.

    Built-in modules are skipped; an unknown name is an error naming it.
    """
    order: list[str] = []
    state: dict[str, str] = {}          # name -> "visiting" | "done"

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if state.get(name) == "done" or name in builtin:
            return
        if state.get(name) == "visiting":
            raise KitError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in modules:
            raise KitError(f"kernel module {name} is neither a module nor built in"
                           + (f" (needed by {chain[-1]})" if chain else ""))
        state[name] = "visiting"
        for dep in modules[name][1]:
            visit(dep, (*chain, name))
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


@dataclass
class Kernel:
    """An unpacked guest kernel: vmlinuz, the module index and the modules unpacked so far."""
    root: Path                # cache/kernel/<package>_<version>
    release: str              # uname -r, e.g. 6.1.0-50-amd64
    deb: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    def index(self) -> tuple[dict[str, tuple[str, list[str]]], set[str]]:
        data = json.loads((self.root / INDEX).read_text())
        return ({k: (v[0], v[1]) for k, v in data["modules"].items()}, set(data["builtin"]))

    def module_file(self, path: str) -> Path:
        return self.root / "modules" / plain_path(path)

    def modules(self, wanted: list[str]) -> list[tuple[str, str, Path]]:
        """(name, path in the module tree, local file) of `wanted` and their dependencies, in
        load order, unpacking any not yet on disk."""
        modules, builtin = self.index()
        names = load_order(wanted, modules, builtin)
        missing = {modules[n][0] for n in names if not self.module_file(modules[n][0]).exists()}
        if missing:
            with cache_lock():
                self._unpack_modules({p for p in missing if not self.module_file(p).exists()})
        return [(n, plain_path(modules[n][0]), self.module_file(modules[n][0])) for n in names]

    def _unpack_modules(self, paths: set[str]) -> None:
        if not paths:
            return
        prefix = f"lib/modules/{self.release}/"
        say(f"unpacking {len(paths)} kernel modules from {self.deb.name}")
        for member, tar in debfile.iter_data(self.deb):
            rel = member.name.removeprefix("./")
            if not rel.startswith(prefix) or rel[len(prefix):] not in paths:
                continue
            data = debfile.read_member(tar, member)
            if rel.endswith(".xz"):
                data = lzma.decompress(data)
            dest = self.module_file(rel[len(prefix):])
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)


def _index_package(deb: Path, root: Path) -> str:
    """Stream the kernel package once: write vmlinuz and the module index; return the release."""
    modules: dict[str, tuple[str, list[str]]] = {}
    builtin: set[str] = set()
    shipped_dep = None
    release = None
    for member, tar in debfile.iter_data(deb):
        rel = member.name.removeprefix("./")
        if not member.isfile():
            continue
        if re.fullmatch(r"boot/vmlinuz-.*", rel):
            release = rel.removeprefix("boot/vmlinuz-")
            with debfile.open_member(tar, member) as src, open(root / "vmlinuz", "wb") as out:
                shutil.copyfileobj(src, out)
            continue
        match = re.fullmatch(r"lib/modules/([^/]+)/(.*)", rel)
        if not match:
            continue
        path = match.group(2)
        if path == "modules.builtin":
            names = debfile.read_member(tar, member).decode().split()
            builtin = {module_name(name) for name in names}
        elif path == "modules.dep":
            shipped_dep = debfile.read_member(tar, member).decode()
        elif path.endswith(MODULE_SUFFIXES):
            data = debfile.read_member(tar, member)
            if path.endswith(".xz"):
                data = lzma.decompress(data)
            depends = ",".join(modinfo(data).get("depends", []))
            modules[module_name(path)] = (path, [module_name(d) for d in depends.split(",") if d])
    if release is None:
        raise KitError(f"{deb.name} holds no boot/vmlinuz-*")
    if shipped_dep is not None:
        modules = parse_modules_dep(shipped_dep)
    (root / INDEX).write_text(json.dumps({"release": release, "builtin": sorted(builtin),
                                          "modules": modules}))
    return release


def _kernel_dir() -> Path:
    return cache_dir() / "kernel"


def installed_kernel() -> Kernel | None:
    """The kernel already unpacked in the cache, without touching the network."""
    try:
        stamp = json.loads((_kernel_dir() / INSTALLED).read_text())
        kernel = Kernel(Path(stamp["root"]), stamp["release"], Path(stamp["deb"]))
    except (OSError, ValueError, KeyError):
        return None
    if kernel.vmlinuz.exists() and (kernel.root / INDEX).exists() and kernel.deb.exists():
        return kernel
    return None


def fetch_kernel(archive: Archive | None = None) -> Kernel:
    archive = archive or guest_archive()
    meta = archive.get(KERNEL_PACKAGE)
    image = next((archive.get(g[0]) for g in meta.depends if g[0].startswith("linux-image-")), None)
    if image is None:
        raise KitError(f"{KERNEL_PACKAGE} {meta.version} depends on no linux-image-* package")
    deb = archive.fetch(image)
    root = _kernel_dir() / f"{image.name}_{image.version}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    say(f"indexing {image.name} {image.version}")
    release = _index_package(deb, root)
    (_kernel_dir() / INSTALLED).write_text(json.dumps(
        {"root": str(root), "release": release, "deb": str(deb), "version": image.version}))
    return Kernel(root, release, deb)


def ensure_kernel_tree() -> Kernel:
    found = installed_kernel()
    if found:
        return found
    try:
        with cache_lock():
            return installed_kernel() or fetch_kernel()
    except OfflineError as e:
        raise OfflineError(f"missing: the guest kernel ({KERNEL_PACKAGE}, not yet in "
                           f"{_kernel_dir()}) could not be fetched: {e}") from e


def ensure_kernel() -> Path:
    """The guest kernel image (vmlinuz), fetched and unpacked on first use."""
    return ensure_kernel_tree().vmlinuz
