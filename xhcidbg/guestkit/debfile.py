"""Unpack Debian .deb files without dpkg or root.

python-debian's `DebFile` reads the .deb (an `ar` archive of `debian-binary`, `control.tar.*`
and `data.tar.*`) and opens its data archive whatever the compression; we walk that archive once
and write the members we want under a private prefix.  Absolute symlink targets are rewritten
relative to the prefix so links such as /usr/share/qemu/bios-256k.bin -> /usr/share/seabios/...
resolve inside it, and no member may land outside the prefix.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from debian.arfile import ArError
from debian.debfile import DebError, DebFile

from .report import KitError


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
    """The members of the .deb's data archive, in archive order, with the archive to read them."""
    try:
        package = DebFile(deb)
    except DebError as e:           # an ar archive, but not laid out as a .deb
        raise KitError(f"{deb.name} has no data archive or no control archive: {e}") from e
    except (ArError, OSError) as e:
        raise KitError(f"{deb.name} is not a .deb (ar) archive: {e}") from e
    with package:
        try:
            tar = package.data.tgz()
        except DebError as e:
            # python-debian hands a data.tar.zst to the unzstd program.
            hint = "; install zstd" if any(n.endswith(".zst") for n in package.getnames()) else ""
            raise KitError(f"{deb.name}: cannot open its data archive: {e}{hint}") from e
        yield from ((member, tar) for member in tar)


def open_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    """The contents of a regular-file member of `tar`."""
    src = tar.extractfile(member)
    if src is None:
        raise KitError(f"{member.name} is not a regular file")
    return src


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    with open_member(tar, member) as src:
        return src.read()


def extract(deb: Path, prefix: Path, want: Callable[[str], bool] = lambda path: True) -> list[str]:
    """Unpack the members whose relative path satisfies `want` into `prefix`; their paths."""
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
            with open_member(tar, member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.chmod(dest, member.mode & 0o755 | stat.S_IRUSR | stat.S_IWUSR)
        else:
            continue            # device nodes, fifos: never needed in a private prefix
        written.append(rel)
    return written
