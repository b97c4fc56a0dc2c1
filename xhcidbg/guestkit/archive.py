"""A small, verifying Debian archive client: signed indexes, package look-up, cached .deb files.

Trust runs the way apt's does: `InRelease` must carry a valid signature from Debian's archive
keyring (checked with gpgv), the Packages index must match the SHA256 that `InRelease` lists, and
every .deb must match the SHA256 its index lists.  Only what gpgv and those hashes vouched for is
handed to python-debian's parsers.  Indexes are stored by hash and .debs by file name under the
cache folder, so a second run downloads nothing and an offline machine can still use what it
already has.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import lzma
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from debian.deb822 import Packages, PkgRelation, Release
from debian.debian_support import Version

from .report import KitError, OfflineError, say, transfer
from .sources import DebianMirror

TIMEOUT = 60
# The only fields of a Packages stanza the kit reads; python-debian keeps no others.
INDEX_FIELDS = ["Package", "Version", "Architecture", "Filename", "Size", "SHA256",
                "Pre-Depends", "Depends", "Provides"]
# Packages index compressions, in the order they are preferred.
INDEX_SUFFIXES = (".xz", ".gz")


def _open_index(path: Path) -> lzma.LZMAFile | gzip.GzipFile:
    return lzma.open(path) if path.suffix == ".xz" else gzip.open(path)


def relation_names(field: str) -> list[list[str]]:
    """A Depends-style field as groups of alternative package names.

    `a (>= 1) | b:any, c` -> [['a', 'b'], ['c']]: picking a package needs only its name, so
    versions, architecture qualifiers and restrictions are dropped.
    """
    if not field.strip():
        return []
    groups = [[alt["name"] for alt in group if alt["name"]]
              for group in PkgRelation.parse_relations(field)]
    return [group for group in groups if group]


@dataclass
class Package:
    name: str
    version: str
    architecture: str
    filename: str             # path below the mirror URI
    size: int
    sha256: str
    suite: str
    depends_field: str = ""   # Pre-Depends then Depends, as the index writes them
    provides: list[str] = field(default_factory=list)

    @property
    def deb_name(self) -> str:
        return self.filename.rsplit("/", 1)[-1]

    @functools.cached_property
    def depends(self) -> list[list[str]]:
        """Pre-Depends and Depends as groups of alternatives (parsed on first use: an index
        holds tens of thousands of packages, the kit follows the Depends of a few dozen)."""
        return relation_names(self.depends_field)


def parse_packages(index: Iterable[str] | Iterable[bytes], suite: str) -> list[Package]:
    """The packages of a Packages index (its lines, or the open file); stanzas that name no
    file or hash are skipped."""
    packages = []
    for stanza in Packages.iter_paragraphs(index, fields=INDEX_FIELDS, use_apt_pkg=False):
        if not {"Package", "Filename", "SHA256"} <= stanza.keys():
            continue
        depends = ", ".join(stanza[key] for key in ("Pre-Depends", "Depends") if key in stanza)
        provides = [group[0] for group in relation_names(stanza.get("Provides", ""))]
        packages.append(Package(stanza["Package"], stanza.get("Version", "0"),
                                stanza.get("Architecture", ""), stanza["Filename"],
                                int(stanza.get("Size", "0")), stanza["SHA256"].lower(), suite,
                                depends, provides))
    return packages


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Archive:
    """One Debian mirror restricted to some suites, one component and one architecture."""

    def __init__(self, mirror: DebianMirror, suites: list[str], cache: Path,
                 component: str = "main", arch: str = "amd64"):
        self.mirror = mirror
        self.suites = suites
        self.cache = cache
        self.component = component
        self.arch = arch
        self._packages: dict[str, Package] | None = None
        self._providers: dict[str, list[Package]] = {}

    # -- transport ---------------------------------------------------------------------------

    def _download(self, path: str, dest: Path, label: str, size: int | None = None,
                  sha256: str | None = None) -> None:
        """Fetch mirror path into dest atomically, with progress, checking the hash if given."""
        url = f"{self.mirror.uri}/{path}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                total = size or int(response.headers.get("Content-Length") or 0) or None
                with transfer(label, total) as progress, open(part, "wb") as out:
                    while block := response.read(1 << 16):
                        out.write(block)
                        h.update(block)
                        progress.advance(len(block))
        except (urllib.error.URLError, OSError) as e:
            part.unlink(missing_ok=True)
            raise OfflineError(f"cannot download {label} from {url}: {getattr(e, 'reason', e)}"
                               " (is this machine offline?)") from e
        if sha256 and h.hexdigest() != sha256:
            part.unlink(missing_ok=True)
            raise KitError(f"{label}: SHA256 mismatch (got {h.hexdigest()}, index says {sha256})")
        part.replace(dest)

    # -- indexes -----------------------------------------------------------------------------

    def _verified_release(self, suite: str) -> Release:
        """The suite's InRelease once its signature checks out (the cached copy if offline)."""
        folder = self.cache / "dists" / suite
        cached = folder / "InRelease"
        fresh = folder / "InRelease.new"
        try:
            self._download(f"dists/{suite}/InRelease", fresh, f"{suite} InRelease")
            source = fresh
        except OfflineError:
            if not cached.exists():
                raise
            say(f"[yellow]mirror unreachable: using the cached index of {suite}[/]")
            source = cached
        release = Release(self._gpgv(source))
        found = {release[key] for key in ("Codename", "Suite") if key in release}
        if suite not in found:
            raise KitError(f"the mirror's dists/{suite}/InRelease is for {sorted(found)},"
                           f" not {suite}")
        if source is fresh:
            fresh.replace(cached)
        return release

    def _gpgv(self, path: Path) -> str:
        if not shutil.which("gpgv"):
            raise KitError("gpgv is needed to check the Debian archive signature: install gpgv")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "release"
            proc = subprocess.run(["gpgv", "--status-fd", "1",
                                   "--keyring", str(self.mirror.keyring),
                                   "--output", str(out), str(path)],
                                  capture_output=True, text=True)
            # Like apt: several keys sign; one VALIDSIG from the keyring is what counts.
            if "[GNUPG:] VALIDSIG" not in proc.stdout or not out.exists():
                raise KitError(f"the signature of {path} does not verify with"
                               f" {self.mirror.keyring}:\n{proc.stderr.strip()}")
            return out.read_text(errors="replace")

    def _index(self, suite: str) -> list[Package]:
        release = self._verified_release(suite)
        sums = {entry["name"]: (entry["sha256"].lower(), int(entry["size"]))
                for entry in release.get("SHA256", [])}
        base = f"{self.component}/binary-{self.arch}/Packages"
        for suffix in INDEX_SUFFIXES:
            if base + suffix in sums:
                digest, size = sums[base + suffix]
                stored = self.cache / "indexes" / f"{digest}{suffix}"
                if not stored.exists() or _sha256(stored) != digest:
                    self._download(f"dists/{suite}/{base}{suffix}", stored,
                                   f"{suite} {base}{suffix}", size, digest)
                with _open_index(stored) as index:
                    return parse_packages(index, suite)
        raise KitError(f"{suite} has no {base} index on the mirror")

    def packages(self) -> dict[str, Package]:
        """The newest package of each name across the suites (the indexes are read once)."""
        if self._packages is None:
            newest: dict[str, Package] = {}
            for suite in self.suites:
                for pkg in self._index(suite):
                    if pkg.architecture not in (self.arch, "all"):
                        continue
                    have = newest.get(pkg.name)
                    if have is None or Version(pkg.version) > Version(have.version):
                        newest[pkg.name] = pkg
            providers: dict[str, list[Package]] = {}
            for pkg in newest.values():
                for virtual in pkg.provides:
                    providers.setdefault(virtual, []).append(pkg)
            self._packages, self._providers = newest, providers
        return self._packages

    # -- look-up and download ----------------------------------------------------------------

    def get(self, name: str) -> Package:
        """The newest package called `name` (or, for a virtual name, the first real provider)."""
        packages = self.packages()
        if name in packages:
            return packages[name]
        if self._providers.get(name):
            return self._providers[name][0]
        raise KitError(f"package {name} is not in {', '.join(self.suites)} of {self.mirror.uri}")

    def resolve_group(self, alternatives: list[str]) -> Package | None:
        for name in alternatives:
            try:
                return self.get(name)
            except KitError:
                continue
        return None

    def fetch(self, pkg: Package) -> Path:
        """The verified .deb of `pkg` in the cache, downloading it first if needed."""
        dest = self.cache / "debs" / pkg.deb_name
        if dest.exists() and dest.stat().st_size == pkg.size and _sha256(dest) == pkg.sha256:
            return dest
        self._download(pkg.filename, dest, f"{pkg.name} {pkg.version}",
                       pkg.size, pkg.sha256)
        return dest
