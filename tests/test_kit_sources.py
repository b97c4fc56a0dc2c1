"""The apt sources parser that finds the machine's Debian mirror (both file formats)."""
from pathlib import Path

import pytest

from xhcidbg.guestkit.report import KitError
from xhcidbg.guestkit.sources import (
    MIRROR_ENV,
    find_debian_mirror,
    host_codename,
    parse_deb822,
    parse_one_line,
    pick_debian_mirror,
    read_sources,
)

MIRROR = "http://mirror.example/debian"
SECURITY = "http://mirror.example/debian-security"

ONE_LINE = f"""
# a comment line
deb {MIRROR} bookworm main contrib   # trailing comment
deb-src {MIRROR} bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/other.gpg] \
https://vendor.example/apt cloud-sdk-bookworm main
deb {SECURITY} bookworm-security main
"""

DEB822 = f"""Types: deb
# a comment inside the stanza
URIs: {MIRROR}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: https://vendor.example/node
Suites: nodistro
Components: main
Enabled: no

Types: deb deb-src
URIs: {SECURITY}
Suites: bookworm-security
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 abc
 -----END PGP PUBLIC KEY BLOCK-----
"""


def test_one_line_entries_with_options_and_comments():
    sources = parse_one_line(ONE_LINE, "x.list")
    assert [(s.types, s.uris[0], s.suites, s.components) for s in sources] == [
        (["deb"], MIRROR, ["bookworm"], ["main", "contrib"]),
        (["deb-src"], MIRROR, ["bookworm"], ["main"]),
        (["deb"], "https://vendor.example/apt", ["cloud-sdk-bookworm"], ["main"]),
        (["deb"], SECURITY, ["bookworm-security"], ["main"]),
    ]
    assert sources[2].options == {"arch": "amd64", "signed-by": "/usr/share/keyrings/other.gpg"}


def test_deb822_stanzas_skip_disabled_and_keep_multiline_fields():
    sources = parse_deb822(DEB822, "x.sources")
    assert len(sources) == 2
    assert sources[0].uris == [MIRROR] and sources[0].suites == ["bookworm", "bookworm-updates"]
    assert sources[0].signed_by == "/usr/share/keyrings/debian-archive-keyring.gpg"
    assert sources[1].types == ["deb", "deb-src"]
    assert "BEGIN PGP PUBLIC KEY BLOCK" in sources[1].signed_by


def test_pick_takes_debian_main_for_the_host_release_not_a_vendor_main():
    sources = parse_one_line(ONE_LINE) + parse_deb822(DEB822)
    assert pick_debian_mirror(sources, "bookworm")[0] == MIRROR
    # Only the vendor's entry and security: nothing serves bookworm itself.
    vendor_only = parse_one_line(ONE_LINE)[2:]
    with pytest.raises(KitError, match="bookworm"):
        pick_debian_mirror(vendor_only, "bookworm")


def test_pick_without_codename_uses_the_debian_keyring_entry():
    sources = parse_deb822(DEB822)
    assert pick_debian_mirror(sources, None)[0] == MIRROR


def test_read_sources_reads_both_formats_and_ignores_other_files(tmp_path: Path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(f"deb {MIRROR}/ trixie main\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    disabled = tmp_path / "sources.list.d" / "vendor.list.disabled"
    disabled.write_text("deb http://nope/ bookworm main\n")
    sources = read_sources(tmp_path)
    assert [s.origin.rsplit("/", 1)[-1] for s in sources] == ["sources.list", "debian.sources",
                                                              "debian.sources"]
    assert pick_debian_mirror(sources, "trixie")[0] == MIRROR       # trailing slash dropped


def test_host_codename(tmp_path: Path):
    (tmp_path / "os-release").write_text('NAME="Debian GNU/Linux"\nVERSION_CODENAME=bookworm\n')
    assert host_codename(tmp_path / "os-release") == "bookworm"
    assert host_codename(tmp_path / "missing") is None


def test_find_debian_mirror_from_files_and_override(tmp_path: Path, monkeypatch):
    (tmp_path / "sources.list").write_text(f"deb {MIRROR} bookworm main\n")
    (tmp_path / "os-release").write_text("VERSION_CODENAME=bookworm\n")
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    if not Path("/usr/share/keyrings/debian-archive-keyring.gpg").exists():
        with pytest.raises(KitError, match="debian-archive-keyring"):
            find_debian_mirror(tmp_path, tmp_path / "os-release")
        return
    mirror = find_debian_mirror(tmp_path, tmp_path / "os-release")
    assert (mirror.uri, mirror.codename) == (MIRROR, "bookworm")
    monkeypatch.setenv(MIRROR_ENV, "file:///srv/mirror/")
    assert find_debian_mirror(tmp_path, tmp_path / "os-release").uri == "file:///srv/mirror"
