"""A small, verifying Debian archive client: signed indexes, package look-up, cached .deb files.

Trust runs the way apt's does: `InRelease` must carry a valid signature from Debian's archive
keyring (checked with gpgv), the Packages index must match the SHA256 that `InRelease` lists, and
every .deb must match the SHA256 its index lists.  Indexes are stored by hash and .debs by file
name under the cache folder, so a second run downloads nothing and an offline machine can still
use what it already has.
"""
from __future__ import annotations

import hashlib
import lzma
import gzip
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import debversion
from .report import KitError, OfflineError, say, transfer
from .sources import DebianMirror

TIMEOUT = 60


@dataclass
class Package:
    name: str
    version: str
    architecture: str
    filename: str             # path below the mirror URI
    size: int
    sha256: str
    suite: str
    depends: list[list[str]] = field(default_factory=list)   # groups of alternatives
    provides: list[str] = field(default_factory=list)

    @property
    def deb_name(self) -> str:
        return self.filename.rsplit("/", 1)[-1]


def parse_relations(text: str) -> list[list[str]]:
    """`a (>= 1) | b:any, c` -> [['a', 'b'], ['c']]; versions and architecture qualifiers dropped."""
    groups = []
    for group in text.split(","):
        names = [re.sub(r"\s*[(\[<].*$", "", alt.strip()).split(":")[0].strip()
                 for alt in group.split("|")]
        names = [n for n in names if n]
        if names:
            groups.append(names)
    return groups


def parse_packages(text: str, suite: str) -> list[Package]:
    """Parse a Packages index (deb822 stanzas), keeping only the fields the kit uses."""
    packages = []
    for stanza in text.split("\n\n"):
        fields = {}
        for line in stanza.split("\n"):
            if line and line[0] not in " \t":
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" not in fields or "Filename" not in fields or "SHA256" not in fields:
            continue
        depends = parse_relations(fields.get("Pre-Depends", "")) + parse_relations(fields.get("Depends", ""))
        provides = [group[0] for group in parse_relations(fields.get("Provides", ""))]
        packages.append(Package(fields["Package"], fields.get("Version", "0"),
                                fields.get("Architecture", ""), fields["Filename"],
                                int(fields.get("Size", "0")), fields["SHA256"].lower(), suite,
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

    def _verified_release(self, suite: str) -> str:
        """The text of the suite's InRelease after checking its signature (cached copy if offline)."""
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
        text = self._gpgv(source)
        found = set(re.findall(r"^(?:Codename|Suite): *(\S+)$", text, re.M))
        if suite not in found:
            raise KitError(f"the mirror's dists/{suite}/InRelease is for {sorted(found)}, not {suite}")
        if source is fresh:
            fresh.replace(cached)
        return text

    def _gpgv(self, path: Path) -> str:
        if not shutil.which("gpgv"):
            raise KitError("gpgv is needed to check the Debian archive signature: install gpgv")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "release"
            proc = subprocess.run(["gpgv", "--status-fd", "1", "--keyring", str(self.mirror.keyring),
                                   "--output", str(out), str(path)],
                                  capture_output=True, text=True)
            # Like apt: several keys sign; one VALIDSIG from the keyring is what counts.
            if "[GNUPG:] VALIDSIG" not in proc.stdout or not out.exists():
                raise KitError(f"the signature of {path} does not verify with {self.mirror.keyring}:\n"
                               + proc.stderr.strip())
            return out.read_text(errors="replace")

    def _index(self, suite: str) -> list[Package]:
        release = self._verified_release(suite)
        sums = {}
        section = re.search(r"^SHA256:\n((?: .*\n?)*)", release, re.M)
        for line in (section.group(1) if section else "").splitlines():
            digest, size, name = line.split()
            sums[name] = (digest.lower(), int(size))
        base = f"{self.component}/binary-{self.arch}/Packages"
        for suffix, opener in ((".xz", lzma.open), (".gz", gzip.open)):
            if base + suffix in sums:
                digest, size = sums[base + suffix]
                stored = self.cache / "indexes" / f"{digest}{suffix}"
                if not stored.exists() or _sha256(stored) != digest:
                    self._download(f"dists/{suite}/{base}{suffix}", stored,
                                   f"{suite} {base}{suffix}", size, digest)
                with opener(stored, "rt", encoding="utf-8", errors="replace") as f:
                    return parse_packages(f.read(), suite)
        raise KitError(f"{suite} has no {base} index on the mirror")

    def _load(self) -> dict[str, Package]:
        if self._packages is None:
            newest: dict[str, Package] = {}
            for suite in self.suites:
                for pkg in self._index(suite):
                    if pkg.architecture not in (self.arch, "all"):
                        continue
                    have = newest.get(pkg.name)
                    if have is None or debversion.compare(pkg.version, have.version) > 0:
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
        packages = self._load()
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
