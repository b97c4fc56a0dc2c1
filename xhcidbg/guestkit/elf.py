"""Read the dynamic-linking needs (DT_NEEDED, DT_SONAME) of a 64-bit little-endian ELF file.

Used to find which shared libraries the private QEMU really loads, instead of trusting a list.
The dynamic section is found through the program headers (what the loader itself uses), so
stripped section tables do not matter.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")   # Elf64_Ehdr
PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")       # Elf64_Phdr
DYNAMIC_ENTRY = struct.Struct("<qQ")              # Elf64_Dyn

PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB, DT_SONAME = 0, 1, 5, 14


@dataclass
class DynamicInfo:
    needed: list[str]
    soname: str | None


def dynamic_info(path: Path) -> DynamicInfo | None:
    """NEEDED and SONAME of an ELF64 LE file; None if it is not one or is statically linked."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < ELF_HEADER.size or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (_, _, _, _, _, phoff, _, _, _, phentsize, phnum, _, _, _) = ELF_HEADER.unpack_from(data)
    loads, dynamic = [], None
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + PROGRAM_HEADER.size > len(data):
            return None
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = PROGRAM_HEADER.unpack_from(data, at)
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_filesz, p_offset))
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return None

    def file_offset(vaddr: int) -> int | None:
        for start, size, offset in loads:
            if start <= vaddr < start + size:
                return vaddr - start + offset
        return None

    entries = []
    offset, size = dynamic
    for at in range(offset, min(offset + size, len(data)) - DYNAMIC_ENTRY.size + 1, DYNAMIC_ENTRY.size):
        tag, value = DYNAMIC_ENTRY.unpack_from(data, at)
        if tag == DT_NULL:
            break
        entries.append((tag, value))
    strtab = next((file_offset(v) for t, v in entries if t == DT_STRTAB), None)
    if strtab is None:
        return None

    def string(index: int) -> str:
        start = strtab + index
        end = data.find(b"\0", start)
        return data[start:end if end >= 0 else len(data)].decode("utf-8", "replace")

    return DynamicInfo([string(v) for t, v in entries if t == DT_NEEDED],
                       next((string(v) for t, v in entries if t == DT_SONAME), None))


SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")     # Elf64_Shdr


def sections(data: bytes) -> dict[str, bytes]:
    """Section name -> contents of an ELF64 LE file (a kernel module is a relocatable object)."""
    if len(data) < ELF_HEADER.size or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    (_, _, _, _, _, _, shoff, _, _, _, _, shentsize, shnum, shstrndx) = ELF_HEADER.unpack_from(data)
    headers = []
    for i in range(shnum):
        at = shoff + i * shentsize
        if at + SECTION_HEADER.size > len(data):
            return {}
        name, _, _, _, offset, size, _, _, _, _ = SECTION_HEADER.unpack_from(data, at)
        headers.append((name, offset, size))
    if not 0 <= shstrndx < len(headers):
        return {}
    names_at = headers[shstrndx][1]
    result = {}
    for name, offset, size in headers:
        end = data.find(b"\0", names_at + name)
        result[data[names_at + name:end].decode("ascii", "replace")] = data[offset:offset + size]
    return result


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The `key=value` strings of a kernel module's .modinfo section (keys may repeat)."""
    info: dict[str, list[str]] = {}
    for entry in sections(data).get(".modinfo", b"").split(b"\0"):
        key, sep, value = entry.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info
