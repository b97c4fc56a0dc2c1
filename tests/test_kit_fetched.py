"""python-debian on what the kit really fetched: the signed InRelease and Packages index of every
suite it uses (bookworm's, trixie's, trixie-backports') and every .deb, whatever compression
Debian chose for them (today .xz throughout), read offline from the kit's cache."""
import json
from pathlib import Path

import pytest
from debian.debfile import DebFile
from debian.debian_support import Version

from xhcidbg.guestkit import cache_dir, debfile
from xhcidbg.guestkit.archive import Archive
from xhcidbg.guestkit.qemu import QEMU_BINARY, STAMP
from xhcidbg.guestkit.sources import DEFAULT_KEYRING, DebianMirror
from xhcidbg.guestkit.testing import guest_kit

# Nothing listens on port 9: the archive falls back to its cached InRelease, which gpgv still
# checks.
UNREACHABLE = "http://127.0.0.1:9/debian"


@pytest.fixture(scope="module")
def cache():
    guest_kit()                 # fetched and cached (or a skip, offline outside CI)
    return cache_dir()


def deb_of(cache, name: str, version: str):
    """The cached .deb of package `name` at `version` (file names carry no epoch)."""
    v = Version(version)
    plain = v.upstream_version + (f"-{v.debian_revision}" if v.debian_revision else "")
    [deb] = (cache / "debs").glob(f"{name}_{plain}_*.deb")
    return deb


def test_cached_indexes_verify_and_parse(cache):
    suites = sorted(p.name for p in (cache / "dists").iterdir() if (p / "InRelease").exists())
    assert suites
    for suite in suites:
        archive = Archive(DebianMirror(UNREACHABLE, DEFAULT_KEYRING, None), [suite], cache)
        packages = archive.packages()
        assert len(packages) > 500, suite
        assert all(p.sha256 and p.filename.endswith(".deb") for p in packages.values())
        if "libc6" in packages:
            assert packages["libc6"].depends and packages["libc6"].suite == suite
    stored = {p.suffix for p in (cache / "indexes").iterdir()} - {".part"}
    assert stored <= {".xz", ".gz"}


def test_every_cached_deb_opens_with_debfile(cache):
    compressions = set()
    debs = sorted((cache / "debs").glob("*.deb"))
    assert debs
    for deb in debs:
        with DebFile(deb) as package:
            [data] = [n for n in package.getnames() if n.startswith("data.tar")]
            compressions.add(data)
            assert package.debcontrol()["Package"] == deb.name.split("_")[0]
            assert package.data.tgz().next() is not None
    print(f"{len(debs)} .debs, data archives: {sorted(compressions)}")


def test_kit_unpacks_busybox_and_qemu_as_it_installed_them(cache, tmp_path):
    stamp = json.loads((cache / "busybox" / "installed.json").read_text())
    deb = deb_of(cache, "busybox-static", stamp["version"])
    written = debfile.extract(deb, tmp_path / "busybox", lambda p: p == "bin/busybox")
    assert written == ["bin/busybox"]
    assert (tmp_path / "busybox/bin/busybox").read_bytes() == Path(stamp["binary"]).read_bytes()
    prefix = cache / "qemu"
    if (prefix / STAMP).exists():           # the private QEMU (not a system one)
        version = json.loads((prefix / STAMP).read_text())["packages"]["qemu-system-x86"]
        deb = deb_of(cache, "qemu-system-x86", version)
        assert debfile.extract(deb, tmp_path / "qemu", lambda p: p == QEMU_BINARY) == [QEMU_BINARY]
        assert (tmp_path / "qemu" / QEMU_BINARY).read_bytes() == (prefix / QEMU_BINARY).read_bytes()
