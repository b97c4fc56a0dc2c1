"""What the kit reads from ELF files, through pyelftools.

- `dynamic_info`: the DT_NEEDED and DT_SONAME of a program or shared library, to find which
  shared libraries the private QEMU really loads instead of trusting a list.  They are read from
  the PT_DYNAMIC segment, what the loader itself uses, so stripped section tables do not matter.
- `modinfo`: the `.modinfo` strings of a kernel module (a relocatable object).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile


@dataclass
class DynamicInfo:
    needed: list[str]
    soname: str | None


def dynamic_info(path: Path) -> DynamicInfo | None:
    """NEEDED and SONAME of an ELF file; None if it is not one or is statically linked."""
    try:
        with open(path, "rb") as f:
            for segment in ELFFile(f).iter_segments():
                if not isinstance(segment, DynamicSegment):
                    continue
                # pyelftools puts the string of a DT_NEEDED or DT_SONAME tag in an attribute
                # named after the tag.
                info = DynamicInfo([], None)
                for tag in segment.iter_tags():
                    if tag.entry.d_tag == "DT_NEEDED":
                        info.needed.append(vars(tag)["needed"])
                    elif tag.entry.d_tag == "DT_SONAME" and info.soname is None:
                        info.soname = vars(tag)["soname"]
                return info
    except (OSError, ELFError):
        return None
    return None


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The `key=value` strings of a kernel module's .modinfo section (keys may repeat)."""
    try:
        section = ELFFile(io.BytesIO(data)).get_section_by_name(".modinfo")
        raw = section.data() if section is not None else b""
    except ELFError:
        return {}
    info: dict[str, list[str]] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info
