"""Find the Debian mirror this machine already uses, from its own apt configuration.

Both formats apt reads are understood: one-line `deb [options] URI suite components...` entries in
`*.list` files, and deb822 stanzas in `*.sources` files (read with python-debian).  The mirror we
want is the one serving Debian's `main` component for the machine's own release (its codename
from /etc/os-release), so a third-party repository that also calls its component "main" is not
taken by mistake.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from debian.deb822 import Deb822

from .report import KitError

DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
MIRROR_ENV = "XHCIDBG_DEBIAN_MIRROR"   # overrides the apt configuration (non-Debian hosts)


@dataclass
class AptSource:
    types: list[str]
    uris: list[str]
    suites: list[str]
    components: list[str]
    options: dict[str, str] = field(default_factory=dict)
    origin: str = ""          # the file it came from, for messages

    @property
    def signed_by(self) -> str | None:
        return self.options.get("signed-by")


def parse_one_line(text: str, origin: str = "") -> list[AptSource]:
    """Entries of a one-line style `.list` file."""
    sources = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        options: dict[str, str] = {}
        bracket = re.match(r"^(\S+)\s+\[([^\]]*)\]\s*(.*)$", line)
        if bracket:
            kind, opts, rest = bracket.groups()
            for opt in opts.split():
                key, _, value = opt.partition("=")
                options[key.lower()] = value
        else:
            kind, _, rest = line.partition(" ")
        words = rest.split()
        if kind not in ("deb", "deb-src") or len(words) < 2:
            continue
        sources.append(AptSource([kind], [words[0]], [words[1]], words[2:], options, origin))
    return sources


def parse_deb822(text: str, origin: str = "") -> list[AptSource]:
    """Stanzas of a deb822 style `.sources` file (continuation lines, comments, Enabled: no)."""
    sources = []
    for stanza in Deb822.iter_paragraphs(text.splitlines()):
        fields = {key.lower(): value.strip() for key, value in stanza.items()}
        if not fields.get("uris") or fields.get("enabled", "yes").lower() == "no":
            continue
        options = {k: v for k, v in fields.items()
                   if k not in ("types", "uris", "suites", "components")}
        sources.append(AptSource(fields.get("types", "deb").split(), fields["uris"].split(),
                                 fields.get("suites", "").split(),
                                 fields.get("components", "").split(), options, origin))
    return sources


def read_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """Every entry apt itself would read, in apt's order."""
    sources: list[AptSource] = []
    main_list = etc_apt / "sources.list"
    if main_list.is_file():
        sources += parse_one_line(main_list.read_text(errors="replace"), str(main_list))
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list":
                sources += parse_one_line(path.read_text(errors="replace"), str(path))
            elif path.suffix == ".sources":
                sources += parse_deb822(path.read_text(errors="replace"), str(path))
    return sources


def host_codename(os_release: Path = Path("/etc/os-release")) -> str | None:
    try:
        text = os_release.read_text()
    except OSError:
        return None
    match = re.search(r"^VERSION_CODENAME=\"?([A-Za-z0-9-]+)\"?$", text, re.M)
    return match.group(1) if match else None


@dataclass(frozen=True)
class DebianMirror:
    uri: str                  # ends without a slash
    keyring: Path             # signs its Release files
    codename: str | None      # the machine's own release, if known


def pick_debian_mirror(sources: list[AptSource], codename: str | None) -> tuple[str, str | None]:
    """(URI, signed-by) of the entry serving Debian `main` for the release `codename`.

    Without a codename, the first `main` entry whose keyring is Debian's archive keyring is taken.
    """
    usable = [s for s in sources if "deb" in s.types and "main" in s.components
              and any(u.startswith(("http://", "https://", "file:")) for u in s.uris)]
    if codename:
        chosen = [s for s in usable if codename in s.suites]
    else:
        chosen = [s for s in usable if "debian-archive-keyring" in (s.signed_by or "")]
    for source in chosen:
        for uri in source.uris:
            if uri.startswith(("http://", "https://", "file:")):
                return uri.rstrip("/"), source.signed_by
    raise KitError(
        "could not find the Debian mirror in this machine's apt configuration (no `main` entry"
        + (f" for release {codename}" if codename else "") + f"); set {MIRROR_ENV} to its URI")


def find_debian_mirror(etc_apt: Path = Path("/etc/apt"),
                       os_release: Path = Path("/etc/os-release")) -> DebianMirror:
    codename = host_codename(os_release)
    override = os.environ.get(MIRROR_ENV)
    if override:
        uri = override.rstrip("/")
    else:
        uri, _ = pick_debian_mirror(read_sources(etc_apt), codename)
    # The whole archive keyring, not the entry's own Signed-By: that may name only the host
    # release's key, and the private QEMU comes from a newer release.
    keyring = DEFAULT_KEYRING
    if not keyring.is_file():
        raise KitError(f"Debian's archive keyring {keyring} is missing:"
                       " install debian-archive-keyring")
    return DebianMirror(uri, keyring, codename)
