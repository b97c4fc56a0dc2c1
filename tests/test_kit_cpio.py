"""The newc cpio writer: what it writes reads back, with Python and with a real cpio if present."""
import io
import shutil
import stat
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xhcidbg.guestkit.cpio import HEADER_SIZE, MAGIC, CpioWriter, Entry, read_newc


def build(populate) -> bytes:
    out = io.BytesIO()
    writer = CpioWriter(out)
    populate(writer)
    writer.close()
    return out.getvalue()


def sample(w: CpioWriter) -> None:
    w.directory("bin")
    w.file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, 0o755)
    w.symlink("bin/sh", "busybox")
    w.directory("dev")
    w.char_device("dev/console", 5, 1)
    w.file("init", b"#!/bin/sh\n", 0o755)
    w.file("empty", b"")


def test_round_trip_types_modes_and_devices():
    entries = {e.name: e for e in read_newc(build(sample))}
    assert list(entries) == ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "init", "empty"]
    assert entries["bin"].type == stat.S_IFDIR
    assert entries["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert entries["bin/busybox"].data == b"\x7fELF" + bytes(range(256)) * 3
    assert entries["bin/sh"].type == stat.S_IFLNK and entries["bin/sh"].data == b"busybox"
    assert entries["dev/console"].type == stat.S_IFCHR and entries["dev/console"].rdev == (5, 1)
    assert entries["empty"].data == b""
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == 0 for e in entries.values())


def test_every_header_starts_on_a_four_byte_boundary():
    data = build(sample)
    offsets = [i for i in range(0, len(data), 4) if data[i:i + 6] == MAGIC]
    # One header per member plus the trailer; nothing unaligned in between.
    assert len(offsets) == 8 and data.count(MAGIC) == 8
    assert data.endswith(b"TRAILER!!!\0" + b"\0" * (-(HEADER_SIZE + 11) % 4))
    assert len(data) % 4 == 0


def test_duplicate_member_is_refused():
    with pytest.raises(ValueError, match="twice"):
        build(lambda w: (w.file("a", b"1"), w.file("/a", b"2")))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1,
                                  max_size=40),
                          st.binary(max_size=300)), max_size=8, unique_by=lambda t: t[0]))
def test_any_files_round_trip(files):
    data = build(lambda w: [w.file(name, body) for name, body in files])
    assert [(e.name, e.data) for e in read_newc(data)] == files


@pytest.mark.skipif(not shutil.which("cpio"), reason="no cpio program on this machine")
def test_system_cpio_lists_and_extracts(tmp_path):
    data = build(sample)
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True)
    assert listing.stdout.decode().split() == ["bin", "bin/busybox", "bin/sh", "dev",
                                               "dev/console", "init", "empty"]
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames", "--nonmatching",
                    "dev/console"], input=data, cwd=tmp_path, check=True)
    assert (tmp_path / "bin/busybox").read_bytes()[:4] == b"\x7fELF"
    assert (tmp_path / "bin/sh").readlink().name == "busybox"


def test_reader_rejects_garbage():
    with pytest.raises(ValueError):
        read_newc(b"070707" + b"0" * 200)
    assert read_newc(build(lambda w: None)) == []
    assert isinstance(read_newc(build(sample))[0], Entry)
