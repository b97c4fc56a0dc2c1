"""The Debian side of the kit: version order, .deb unpacking, ELF needs, the verifying archive
client against a local mirror signed with a throw-away key, and python-debian reading the
indexes and .debs the kit really fetched."""
import hashlib
import io
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from debian.debian_support import Version
from hypothesis import given, settings
from hypothesis import strategies as st

from xhcidbg.guestkit import debfile
from xhcidbg.guestkit.archive import Archive, parse_packages, relation_names
from xhcidbg.guestkit.elf import dynamic_info
from xhcidbg.guestkit.report import KitError, OfflineError
from xhcidbg.guestkit.sources import DebianMirror

# -- version order (python-debian's, which picks the newest of several suites) ----------------


def compare(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version `a` sorts before, equal to or after `b`."""
    return (Version(a) > Version(b)) - (Version(a) < Version(b))


@pytest.mark.parametrize("a, b, expected", [
    ("1:11.1.3+ds-1~bpo13+1", "1:10.0.2+ds-2", 1),
    ("11.1.3+ds-1~bpo13+1", "11.1.3+ds-1", -1),      # a backport sorts before the release
    ("1.0~rc1", "1.0", -1),
    ("1.0", "1.0-0", 0),
    ("2.41-12", "2.41-12+deb13u1", -1),
    ("1.0a", "1.0+", -1),
    ("6.1.0-37", "6.1.0-9", 1),
    ("1:0.1", "9.9", 1),
])
def test_version_order(a, b, expected):
    assert compare(a, b) == expected
    assert compare(b, a) == -expected


VERSION_PART = st.text("0123456789abz.+~", min_size=1, max_size=6).map(lambda s: "1" + s)


@pytest.mark.skipif(not shutil.which("dpkg"), reason="no dpkg to compare with")
@settings(max_examples=60, deadline=None)
@given(VERSION_PART, VERSION_PART, st.sampled_from(["", "-1", "-1~bpo1", "-2+b1"]))
def test_version_order_agrees_with_dpkg(a, b, revision):
    a, b = a + revision, b
    ours = compare(a, b)
    for op, holds in (("lt", ours < 0), ("eq", ours == 0), ("gt", ours > 0)):
        dpkg = subprocess.run(["dpkg", "--compare-versions", a, op, b])
        assert (dpkg.returncode == 0) == holds, (a, op, b)


def test_versions_sort_as_keys():
    assert sorted(["1.0", "1.0~rc1", "1:0.5", "0.9"], key=Version) == [
        "0.9", "1.0~rc1", "1.0", "1:0.5"]


# -- relations and indexes -------------------------------------------------------------------

def test_relation_names_drop_versions_and_qualifiers():
    assert relation_names("libc6 (>= 2.38), libfoo1 | libbar2 [amd64], python3:any") == [
        ["libc6"], ["libfoo1", "libbar2"], ["python3"]]
    assert relation_names("") == []


def test_parse_packages_keeps_needed_fields():
    text = ("Package: a\nVersion: 1.0\nArchitecture: amd64\nPre-Depends: p\n"
            "Depends: b (>= 1), c | d\nProvides: v (= 1)\nDescription: x\n more\n"
            "Filename: pool/a.deb\nSize: 10\nSHA256: AB\n\n"
            "Package: incomplete\nVersion: 1\n")
    [pkg] = parse_packages(io.BytesIO(text.encode()), "s")
    assert (pkg.name, pkg.depends, pkg.provides, pkg.sha256, pkg.deb_name) == (
        "a", [["p"], ["b"], ["c", "d"]], ["v"], "ab", "a.deb")


# -- .deb unpacking --------------------------------------------------------------------------

def ar_archive(members: list[tuple[str, bytes]]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{0o100644:<8o}{len(data):<10}`\n".encode() + data
        out += b"\n" * (len(data) & 1)
    return out


def data_tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def member(name, kind=tarfile.REGTYPE, link="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info


def test_extract_keeps_everything_inside_the_prefix(tmp_path):
    deb = tmp_path / "t.deb"
    deb.write_bytes(ar_archive([
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", data_tar([])),
        ("data.tar.xz", data_tar([
            (member("./usr/", tarfile.DIRTYPE, mode=0o755), b""),
            (member("./usr/bin/tool", mode=0o4755), b"#!/bin/sh\n"),
            (member("./usr/share/qemu/bios.bin", tarfile.SYMTYPE,
                    "/usr/share/seabios/bios.bin"), b""),
            (member("./usr/share/seabios/bios.bin"), b"BIOS"),
            (member("./usr/bin/tool2", tarfile.LNKTYPE, "./usr/bin/tool"), b""),
            (member("../../escape"), b"x"),
            (member("/etc/absolute"), b"y"),
            (member("./usr/../../up"), b"z"),
            (member("./dev/null", tarfile.CHRTYPE), b""),
        ])),
    ]))
    prefix = tmp_path / "prefix"
    written = debfile.extract(deb, prefix)
    assert sorted(written) == ["etc/absolute", "usr/bin/tool", "usr/bin/tool2",
                               "usr/share/qemu/bios.bin", "usr/share/seabios/bios.bin"]
    link = prefix / "usr/share/qemu/bios.bin"
    assert os.readlink(link) == "../seabios/bios.bin" and link.read_bytes() == b"BIOS"
    assert (prefix / "usr/bin/tool2").read_bytes() == b"#!/bin/sh\n"
    assert (prefix / "usr/bin/tool").stat().st_mode & 0o7777 == 0o755     # no setuid
    assert not (tmp_path / "escape").exists() and not (tmp_path / "up").exists()
    assert not (prefix / "dev/null").exists()
    assert debfile.extract(deb, tmp_path / "p2", lambda p: p.startswith("usr/bin/tool")) == [
        "usr/bin/tool", "usr/bin/tool2"]


def test_extract_rejects_what_is_not_a_deb(tmp_path):
    (tmp_path / "x.deb").write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(KitError, match=r"not a \.deb"):
        debfile.extract(tmp_path / "x.deb", tmp_path / "p")
    (tmp_path / "y.deb").write_bytes(ar_archive([("debian-binary", b"2.0\n")]))
    with pytest.raises(KitError, match="no data archive"):
        debfile.extract(tmp_path / "y.deb", tmp_path / "p")


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="no dpkg-deb to build a .deb")
def test_extract_reads_a_zstd_data_archive_or_says_what_it_needs(tmp_path):
    # Debian's own archive uses xz, but dpkg-deb (and other distributions) can use zstd.
    tree = tmp_path / "tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text("Package: z\nVersion: 1\nArchitecture: all\n"
                                         "Maintainer: t <t@test.invalid>\nDescription: test\n")
    (tree / "usr/share/z").mkdir(parents=True)
    (tree / "usr/share/z/file").write_bytes(b"zstd inside")
    deb = tmp_path / "z.deb"
    subprocess.run(["dpkg-deb", "-Zzstd", "--root-owner-group", "--build", str(tree), str(deb)],
                   capture_output=True, check=True)
    assert b"data.tar.zst" in deb.read_bytes()
    if shutil.which("unzstd"):
        assert debfile.extract(deb, tmp_path / "p") == ["usr/share/z/file"]
        assert (tmp_path / "p/usr/share/z/file").read_bytes() == b"zstd inside"
    else:
        with pytest.raises(KitError, match="install zstd"):
            debfile.extract(deb, tmp_path / "p")


# -- ELF dynamic section ---------------------------------------------------------------------

@pytest.mark.skipif(not shutil.which("readelf"), reason="no readelf to compare with")
@pytest.mark.parametrize("path", [sys.executable, "/bin/ls", "/lib/x86_64-linux-gnu/libc.so.6"])
def test_dynamic_info_matches_readelf(path):
    if not Path(path).exists():
        pytest.skip(f"{path} not on this machine")
    out = subprocess.run(["readelf", "-dW", os.path.realpath(path)],
                         capture_output=True, text=True).stdout
    info = dynamic_info(Path(os.path.realpath(path)))
    if info is None:
        assert "NEEDED" not in out
        return
    assert info.needed == re.findall(r"\(NEEDED\).*\[(.*)\]", out)
    soname = re.findall(r"\(SONAME\).*\[(.*)\]", out)
    assert info.soname == (soname[0] if soname else None)


def test_dynamic_info_of_non_elf_and_truncated_files(tmp_path):
    (tmp_path / "text").write_text("hello")
    assert dynamic_info(tmp_path / "text") is None
    (tmp_path / "cut").write_bytes(Path("/bin/ls").read_bytes()[:200])
    assert dynamic_info(tmp_path / "cut") is None
    assert dynamic_info(tmp_path / "missing") is None


# -- the archive client against a local signed mirror ----------------------------------------

needs_gpg = pytest.mark.skipif(not all(map(shutil.which, ["gpg", "gpgv", "dpkg-deb"])),
                               reason="gpg, gpgv and dpkg-deb are needed to build a signed mirror")


class LocalMirror:
    """A Debian-shaped mirror in a folder, its InRelease signed by a key made for the test."""

    def __init__(self, root: Path):
        self.root = root / "mirror"
        self.home = root / "gnupg"
        self.home.mkdir(mode=0o700)
        self.keyring = root / "keyring.gpg"
        self.gpg("--quick-gen-key", "kit test <kit@test.invalid>", "ed25519", "sign", "never")
        self.keyring.write_bytes(self.gpg("--export"))
        self.work = root / "build"

    def gpg(self, *args: str, input: bytes | None = None) -> bytes:
        return subprocess.run(["gpg", "--homedir", str(self.home), "--batch", "--passphrase", "",
                               "--pinentry-mode", "loopback", *args], input=input,
                              capture_output=True, check=True).stdout

    def deb(self, name: str, version: str, files: dict[str, bytes]) -> tuple[str, bytes]:
        tree = self.work / f"{name}-{version}"
        (tree / "DEBIAN").mkdir(parents=True)
        (tree / "DEBIAN/control").write_text(
            f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n"
            "Maintainer: t <t@test.invalid>\n"
            f"Description: test\n")
        for path, data in files.items():
            (tree / path).parent.mkdir(parents=True, exist_ok=True)
            (tree / path).write_bytes(data)
            (tree / path).chmod(0o755 if data.startswith(b"\x7fELF") else 0o644)
        out = self.work / f"{name}_{version}_amd64.deb"
        subprocess.run(["dpkg-deb", "-Zxz", "--root-owner-group", "--build", str(tree), str(out)],
                       capture_output=True, check=True)
        filename = f"pool/main/{name[0]}/{name}/{out.name}"
        (self.root / filename).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, self.root / filename)
        return filename, out.read_bytes()

    def suite(self, suite: str, packages: list[tuple[str, str, dict, str]]) -> None:
        stanzas = []
        for name, version, files, extra in packages:
            filename, data = self.deb(name, version, files)
            stanzas.append(f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n{extra}"
                           f"Filename: {filename}\nSize: {len(data)}\n"
                           f"SHA256: {hashlib.sha256(data).hexdigest()}\n")
        index = lzma.compress("\n".join(stanzas).encode())
        folder = self.root / "dists" / suite
        (folder / "main/binary-amd64").mkdir(parents=True, exist_ok=True)
        (folder / "main/binary-amd64/Packages.xz").write_bytes(index)
        release = (f"Suite: {suite}\nCodename: {suite}\nSHA256:\n"
                   f" {hashlib.sha256(index).hexdigest()} {len(index)}"
                   " main/binary-amd64/Packages.xz\n")
        (folder / "InRelease").write_bytes(self.gpg("--clearsign", input=release.encode()))

    def archive(self, suites: list[str], cache: Path) -> Archive:
        return Archive(DebianMirror(self.root.as_uri(), self.keyring, "testsuite"), suites, cache)


@pytest.fixture
def mirror(tmp_path):
    m = LocalMirror(tmp_path)
    m.suite("testsuite", [
        ("hello", "1.0-1", {"usr/bin/hello": b"old"}, "Depends: libc6 (>= 2), virt-thing\n"),
        ("libc6", "2.36-9", {"usr/lib/x86_64-linux-gnu/libc.so.6": b"libc"},
         "Provides: virt-thing\n"),
    ])
    m.suite("testsuite-backports", [("hello", "1.1-1~bpo1", {"usr/bin/hello": b"new"}, "")])
    return m


@needs_gpg
def test_archive_picks_newest_verifies_and_caches(mirror, tmp_path):
    cache = tmp_path / "cache"
    archive = mirror.archive(["testsuite", "testsuite-backports"], cache)
    hello = archive.get("hello")
    assert (hello.version, hello.suite) == ("1.1-1~bpo1", "testsuite-backports")
    assert archive.get("virt-thing").name == "libc6"
    assert archive.resolve_group(["nope", "libc6"]).name == "libc6"
    with pytest.raises(KitError, match="nope"):
        archive.get("nope")
    deb = archive.fetch(hello)
    assert debfile.extract(deb, tmp_path / "p") == ["usr/bin/hello"]
    assert (tmp_path / "p/usr/bin/hello").read_bytes() == b"new"
    # Cached: a second fetch does not need the mirror's copy.
    (mirror.root / hello.filename).unlink()
    assert archive.fetch(hello) == deb


@needs_gpg
def test_archive_refuses_tampered_files(mirror, tmp_path):
    archive = mirror.archive(["testsuite"], tmp_path / "cache")
    libc = archive.get("libc6")
    (mirror.root / libc.filename).write_bytes(b"!<arch>\nnot the real one")
    with pytest.raises(KitError, match="SHA256 mismatch"):
        archive.fetch(libc)
    assert not (tmp_path / "cache/debs" / libc.deb_name).exists()
    release = mirror.root / "dists/testsuite/InRelease"
    signed = release.read_bytes()
    release.write_bytes(signed.replace(b"Codename: testsuite", b"Codename: testsuitf"))
    with pytest.raises(KitError, match="signature"):
        mirror.archive(["testsuite"], tmp_path / "cache2").get("libc6")


@needs_gpg
def test_archive_offline_uses_cache_or_names_what_is_missing(mirror, tmp_path):
    cache = tmp_path / "cache"
    mirror.archive(["testsuite"], cache).get("hello")
    shutil.rmtree(mirror.root)
    # Indexes cached: still usable offline.
    assert mirror.archive(["testsuite"], cache).get("hello").version == "1.0-1"
    with pytest.raises(OfflineError, match="testsuite InRelease"):
        mirror.archive(["testsuite"], tmp_path / "empty-cache").get("hello")


# -- the private prefix: packages chosen by what the binary loads ----------------------------

@needs_gpg
@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler to make the ELF files")
def test_prefix_builder_follows_needed_libraries_only(tmp_path):
    from xhcidbg.guestkit.qemu import LOADER, PrefixBuilder
    libdir = Path("/lib/x86_64-linux-gnu")
    if not (libdir / LOADER).exists():
        pytest.skip("no x86-64 glibc on this machine to package")
    src = tmp_path / "src"
    src.mkdir()
    (src / "bar.c").write_text("int bar(void) { return 40; }\n")
    (src / "foo.c").write_text("int bar(void); int foo(void) { return bar() + 2; }\n")
    (src / "main.c").write_text('#include <stdio.h>\nint foo(void);\n'
                                'int main(void) { printf("answer %d\\n", foo()); return 0; }\n')

    def cc(*args):
        subprocess.run(["cc", *args], cwd=src, check=True, capture_output=True)
    cc("-shared", "-fPIC", "-Wl,-soname,libbar.so.1", "bar.c", "-o", "libbar.so.1")
    cc("-shared", "-fPIC", "-Wl,-soname,libfoo.so.1", "foo.c", "-L.", "-l:libbar.so.1",
       "-o", "libfoo.so.1")
    cc("main.c", "-L.", "-l:libfoo.so.1", "-Wl,--allow-shlib-undefined", "-o", "tool")
    lib = "usr/lib/x86_64-linux-gnu"
    mirror = LocalMirror(tmp_path)
    mirror.suite("testsuite", [
        ("tool", "1", {"usr/bin/tool": (src / "tool").read_bytes()},
         "Depends: libfoo1, tooldata\n"),
        ("tooldata", "1", {"usr/share/tool/data": b"data"}, "Depends: unrelated\n"),
        ("unrelated", "1", {"usr/share/unrelated": b"x"}, ""),
        ("libfoo1", "1", {f"{lib}/libfoo.so.1": (src / "libfoo.so.1").read_bytes()},
         "Depends: libbar1, libc6\n"),
        ("libbar1", "1", {f"{lib}/libbar.so.1": (src / "libbar.so.1").read_bytes()},
         "Depends: libc6\n"),
        ("libc6", "1", {f"{lib}/libc.so.6": (libdir / "libc.so.6").read_bytes(),
                        f"{lib}/{LOADER}": (libdir / LOADER).read_bytes()},
         "Depends: libgcc-s1-not-in-this-mirror\n"),
    ])
    archive = mirror.archive(["testsuite"], tmp_path / "cache")
    prefix = tmp_path / "prefix"
    builder = PrefixBuilder(archive, prefix, binary="usr/bin/tool")
    builder.build(archive.get("tool"))
    # tooldata comes as the root's dependency; nothing asks for `unrelated`, nor for libc6's own.
    assert sorted(builder.unpacked) == ["libbar1", "libc6", "libfoo1", "tool", "tooldata"]
    assert builder.unresolved() == {}
    run = subprocess.run([str(prefix / lib / LOADER), "--library-path", str(prefix / lib),
                          str(prefix / "usr/bin/tool")], capture_output=True, text=True)
    assert run.stdout == "answer 42\n", run.stderr
