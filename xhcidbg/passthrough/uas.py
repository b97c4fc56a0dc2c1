"""The streams policy of passthrough: UAS is hidden at SuperSpeed where Bulk-Only is offered.

This controller has no streams (HCCPARAMS1 MaxPSASize 0), and at SuperSpeed UAS moves its data
and status on stream IDs, so a UAS interface cannot work through it.  Every UAS disk also offers
Bulk-Only Transport on another alternate setting of the same interface; leaving the UAS setting
out of the configuration the guest reads makes every guest driver pick Bulk-Only (Linux would on
its own, seeing no streams; other drivers check less).  At high speed UAS uses no streams and
passes through as it is.  A UAS-only interface, or one whose UAS setting is alternate 0 (hiding
it would leave no default setting), is left alone and logged.
"""
from __future__ import annotations

import logging
import struct

from ..devices.descriptors import DescriptorType

log = logging.getLogger("xhcidbg.passthrough")

MASS_STORAGE, SCSI = 0x08, 0x06
BULK_ONLY, UAS = 0x50, 0x62
_INTERFACE_FIELDS = struct.Struct("<xxBBxBBB")   # bInterfaceNumber, bAlternateSetting, class...


def _split(blob: bytes) -> list[bytes] | None:
    """The descriptors of `blob` split on bLength; None if it does not split cleanly."""
    pieces, pos = [], 0
    while pos < len(blob):
        n = blob[pos]
        if n < 2 or pos + n > len(blob):
            return None
        pieces.append(blob[pos:pos + n])
        pos += n
    return pieces


def without_uas(config: bytes) -> tuple[bytes, set[tuple[int, int]]]:
    """`config` (a whole configuration descriptor set) without the UAS alternate settings that
    have a Bulk-Only sibling, wTotalLength adjusted; and the (interface, alternate) pairs left
    out.  A set that is malformed or has nothing to hide comes back unchanged."""
    pieces = _split(config)
    if not pieces or pieces[0][1] != DescriptorType.CONFIGURATION or len(pieces[0]) < 9:
        return config, set()
    # groups: what precedes the first interface, then one per interface descriptor (its
    # endpoints and class descriptors follow it until the next interface or association)
    groups: list[list[bytes]] = [[]]
    for piece in pieces:
        if piece[1] in (DescriptorType.INTERFACE, DescriptorType.INTERFACE_ASSOCIATION):
            groups.append([])
        groups[-1].append(piece)
    settings = {}
    for i, group in enumerate(groups):
        head = group[0]
        if head[1] == DescriptorType.INTERFACE and len(head) >= 9:
            number, alternate, cls, sub, protocol = _INTERFACE_FIELDS.unpack_from(head)
            settings[i] = (number, alternate, (cls, sub, protocol))
    bulk_only = {n for n, _, kind in settings.values() if kind == (MASS_STORAGE, SCSI, BULK_ONLY)}
    hidden: dict[int, tuple[int, int]] = {}
    for i, (number, alternate, kind) in settings.items():
        if kind != (MASS_STORAGE, SCSI, UAS):
            continue
        if number in bulk_only and alternate != 0:
            hidden[i] = (number, alternate)
        else:
            log.info("interface %d alternate %d is UAS without a Bulk-Only alternative the "
                     "guest could default to: left as it is (this controller has no streams)",
                     number, alternate)
    if not hidden:
        return config, set()
    out = bytearray(b"".join(p for i, g in enumerate(groups) if i not in hidden for p in g))
    struct.pack_into("<H", out, 2, len(out))
    return bytes(out), set(hidden.values())
