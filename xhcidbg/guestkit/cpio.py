"""The cpio 'newc' format the kernel unpacks an initramfs from, written without root.

Because we write the headers ourselves, device nodes (/dev/console) and root ownership need no
privileges.  Each member is a 110-byte ASCII header (magic and 13 hex fields), the NUL-terminated
name padded to 4 bytes, then the data padded to 4 bytes; a member named TRAILER!!! ends it.
"""
from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = b"070701"
# The header after the magic: each field 8 uppercase hex digits, in this order.
FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
          "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")
HEADER_SIZE = len(MAGIC) + 8 * len(FIELDS)
TRAILER = "TRAILER!!!"


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


@dataclass
class Entry:
    name: str
    mode: int                  # file type and permission bits, as st_mode
    data: bytes = b""          # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)
    uid: int = 0
    gid: int = 0
    mtime: int = 0

    @property
    def type(self) -> int:
        return stat.S_IFMT(self.mode)


class CpioWriter:
    """Writes newc members to a binary stream; `close` adds the trailer."""

    def __init__(self, out: BinaryIO):
        self._out = out
        self._ino = 0
        self._names: set[str] = set()

    def add(self, entry: Entry) -> None:
        name = entry.name.strip("/")
        if name in self._names:
            raise ValueError(f"cpio member {name} added twice")
        self._names.add(name)
        self._ino += 1
        self._write(name, entry, self._ino)

    def _write(self, name: str, entry: Entry, ino: int) -> None:
        encoded = name.encode() + b"\0"
        values = {"ino": ino, "mode": entry.mode, "uid": entry.uid, "gid": entry.gid,
                  "nlink": 2 if entry.type == stat.S_IFDIR else 1, "mtime": entry.mtime,
                  "filesize": len(entry.data), "devmajor": 0, "devminor": 0,
                  "rdevmajor": entry.rdev[0], "rdevminor": entry.rdev[1],
                  "namesize": len(encoded), "check": 0}
        header = MAGIC + b"".join(b"%08X" % values[f] for f in FIELDS)
        self._out.write(header + encoded + _pad(HEADER_SIZE + len(encoded)))
        self._out.write(entry.data + _pad(len(entry.data)))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self.add(Entry(name, stat.S_IFDIR | mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.add(Entry(name, stat.S_IFREG | mode, data))

    def symlink(self, name: str, target: str) -> None:
        self.add(Entry(name, stat.S_IFLNK | 0o777, target.encode()))

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.add(Entry(name, stat.S_IFCHR | mode, rdev=(major, minor)))

    def close(self) -> None:
        self._write(TRAILER, Entry(TRAILER, 0), 0)


def read_newc(data: bytes) -> list[Entry]:
    """Parse a newc archive (uncompressed) up to its trailer."""
    entries: list[Entry] = []
    at = 0
    while True:
        if data[at:at + len(MAGIC)] != MAGIC or at + HEADER_SIZE > len(data):
            raise ValueError(f"no newc header at offset {at}")
        fields = {f: int(data[at + 6 + 8 * i: at + 14 + 8 * i], 16) for i, f in enumerate(FIELDS)}
        name_at = at + HEADER_SIZE
        name = data[name_at:name_at + fields["namesize"] - 1].decode()
        body_at = name_at + fields["namesize"] + len(_pad(HEADER_SIZE + fields["namesize"]))
        body = data[body_at:body_at + fields["filesize"]]
        at = body_at + fields["filesize"] + len(_pad(fields["filesize"]))
        if name == TRAILER:
            return entries
        entries.append(Entry(name, fields["mode"], body, (fields["rdevmajor"], fields["rdevminor"]),
                             fields["uid"], fields["gid"], fields["mtime"]))
