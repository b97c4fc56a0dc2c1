"""Unpack Debian .deb files without dpkg or root.

A .deb is an `ar` archive holding `debian-binary`, `control.tar.*` and `data.tar.*`.  We stream
`data.tar.*` once and write the members we want under a private prefix.  Absolute symlink targets
are rewritten relative to the prefix so links such as /usr/share/qemu/bios-256k.bin ->
/usr/share/seabios/... resolve inside it, and no member may land outside the prefix.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from .report import KitError

AR_MAGIC = b"!<arch>\n"
AR_HEADER_SIZE = 60


class _Slice:
    """A read-only window on part of a file (one ar member), for streaming decompressors."""

    def __init__(self, f: BinaryIO, size: int):
        self._f = f
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        data = self._f.read(n)
        self._left -= len(data)
        return data


def ar_members(f: BinaryIO) -> Iterator[tuple[str, int]]:
    """Yield (name, size) for each member; the file is positioned at the member's data."""
    if f.read(8) != AR_MAGIC:
        raise KitError(f"{getattr(f, 'name', 'file')} is not a .deb (ar) archive")
    while True:
        header = f.read(AR_HEADER_SIZE)
        if len(header) < AR_HEADER_SIZE:
            return
        if header[58:60] != b"`\n":
            raise KitError(f"{getattr(f, 'name', 'file')}: corrupt ar header")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        start = f.tell()
        yield name, size
        f.seek(start + size + (size & 1))


def _safe_relpath(name: str) -> str | None:
    """The member's path relative to the prefix, or None if it is the root or escapes it."""
    path = posixpath.normpath(name.lstrip("/").removeprefix("./").lstrip("/"))
    if path in (".", "") or path == ".." or path.startswith("../"):
        return None
    return path


def _link_target(rel: str, target: str) -> str:
    """Make an absolute symlink target relative to the link's own folder inside the prefix."""
    if not target.startswith("/"):
        return target
    return posixpath.relpath(target.lstrip("/") or ".", posixpath.dirname(rel) or ".")


def iter_data(deb: Path) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Stream the members of the .deb's data archive."""
    with open(deb, "rb") as f:
        for name, size in ar_members(f):
            if not name.startswith("data.tar"):
                continue
            if name.endswith((".tar", ".gz", ".xz", ".bz2")):
                with tarfile.open(fileobj=_Slice(f, size), mode="r|*") as tar:
                    for member in tar:
                        yield member, tar
                return
            # Other compressions (zstd): let dpkg-deb decompress, if this machine has it.
            if not shutil.which("dpkg-deb"):
                raise KitError(f"{deb.name}: {name} needs dpkg-deb to unpack")
            proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    yield member, tar
            proc.wait()
            return
    raise KitError(f"{deb.name} has no data archive")


def extract(deb: Path, prefix: Path, want: Callable[[str], bool] = lambda path: True) -> list[str]:
    """Unpack the members whose relative path satisfies `want` into `prefix`; returns their paths."""
    written = []
    for member, tar in iter_data(deb):
        rel = _safe_relpath(member.name)
        if rel is None or not want(rel):
            continue
        dest = prefix / rel
        if member.isdir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        if member.issym():
            os.symlink(_link_target(rel, member.linkname), dest)
        elif member.islnk():
            source = _safe_relpath(member.linkname)
            if source is None or not (prefix / source).exists():
                continue
            shutil.copy2(prefix / source, dest)
        elif member.isfile():
            with tar.extractfile(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.chmod(dest, member.mode & 0o755 | stat.S_IRUSR | stat.S_IWUSR)
        else:
            continue            # device nodes, fifos: never needed in a private prefix
        written.append(rel)
    return written
