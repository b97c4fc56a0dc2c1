"""HID report descriptors, declared so they read like the HID 1.11 specification (6.2.2).

Every short item kind is declared once in `ITEM_KINDS`; the builders below (`UsagePage`,
`Usage`, `LogicalMaximum`, `Input`, `Collection`, ...) encode from it and `parse_report_descriptor`
/ `format_report_descriptor` decode with it, so the console and tracer show a device's report
descriptor with the same table the devices use to build theirs:

    UsagePage(Page.GENERIC_DESKTOP), Usage(GenericDesktop.MOUSE),
    Collection(CollectionType.APPLICATION,
        Usage(GenericDesktop.POINTER),
        Collection(CollectionType.PHYSICAL,
            UsagePage(Page.BUTTON), UsageMinimum(1), UsageMaximum(3),
            LogicalMinimum(0), LogicalMaximum(1), ReportSize(1), ReportCount(3),
            Input(DATA | VARIABLE | ABSOLUTE), ...))
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Protocol, TypeAlias

import construct as c

from .descriptors import HidDescriptor


class ItemType(IntEnum):
    MAIN = 0
    GLOBAL = 1
    LOCAL = 2
    RESERVED = 3


@dataclass(frozen=True)
class ItemKind:
    name: str
    type: ItemType
    tag: int
    signed: bool = False     # data is two's complement (minimum/maximum, exponent)
    has_data: bool = True    # End Collection, Push and Pop carry none


ITEM_KINDS: tuple[ItemKind, ...] = (
    # Main items (6.2.2.4)
    ItemKind("Input", ItemType.MAIN, 0x8),
    ItemKind("Output", ItemType.MAIN, 0x9),
    ItemKind("Feature", ItemType.MAIN, 0xB),
    ItemKind("Collection", ItemType.MAIN, 0xA),
    ItemKind("End Collection", ItemType.MAIN, 0xC, has_data=False),
    # Global items (6.2.2.7)
    ItemKind("Usage Page", ItemType.GLOBAL, 0x0),
    ItemKind("Logical Minimum", ItemType.GLOBAL, 0x1, signed=True),
    ItemKind("Logical Maximum", ItemType.GLOBAL, 0x2, signed=True),
    ItemKind("Physical Minimum", ItemType.GLOBAL, 0x3, signed=True),
    ItemKind("Physical Maximum", ItemType.GLOBAL, 0x4, signed=True),
    ItemKind("Unit Exponent", ItemType.GLOBAL, 0x5, signed=True),
    ItemKind("Unit", ItemType.GLOBAL, 0x6),
    ItemKind("Report Size", ItemType.GLOBAL, 0x7),
    ItemKind("Report ID", ItemType.GLOBAL, 0x8),
    ItemKind("Report Count", ItemType.GLOBAL, 0x9),
    ItemKind("Push", ItemType.GLOBAL, 0xA, has_data=False),
    ItemKind("Pop", ItemType.GLOBAL, 0xB, has_data=False),
    # Local items (6.2.2.8)
    ItemKind("Usage", ItemType.LOCAL, 0x0),
    ItemKind("Usage Minimum", ItemType.LOCAL, 0x1),
    ItemKind("Usage Maximum", ItemType.LOCAL, 0x2),
    ItemKind("Designator Index", ItemType.LOCAL, 0x3),
    ItemKind("Designator Minimum", ItemType.LOCAL, 0x4),
    ItemKind("Designator Maximum", ItemType.LOCAL, 0x5),
    ItemKind("String Index", ItemType.LOCAL, 0x7),
    ItemKind("String Minimum", ItemType.LOCAL, 0x8),
    ItemKind("String Maximum", ItemType.LOCAL, 0x9),
    ItemKind("Delimiter", ItemType.LOCAL, 0xA),
)
_BY_NAME = {k.name: k for k in ITEM_KINDS}
_BY_PREFIX = {(k.type, k.tag): k for k in ITEM_KINDS}

# Short item prefix byte (6.2.2.2): bTag, bType, bSize (0, 1, 2 or 4 data bytes).
ItemPrefix = c.BitStruct("bTag" / c.BitsInteger(4), "bType" / c.BitsInteger(2),
                         "bSize" / c.BitsInteger(2))
_SIZE_CODE = {0: 0, 1: 1, 2: 2, 4: 3}
_DATA_BYTES = (0, 1, 2, 4)
LONG_ITEM_PREFIX = 0xFE


class Page(IntEnum):
    """Usage pages (HID Usage Tables)."""

    GENERIC_DESKTOP = 0x01
    KEYBOARD = 0x07
    LED = 0x08
    BUTTON = 0x09
    CONSUMER = 0x0C


class GenericDesktop(IntEnum):
    POINTER = 0x01
    MOUSE = 0x02
    JOYSTICK = 0x04
    GAMEPAD = 0x05
    KEYBOARD = 0x06
    KEYPAD = 0x07
    X = 0x30
    Y = 0x31
    Z = 0x32
    WHEEL = 0x38


class Consumer(IntEnum):
    AC_PAN = 0x238


class Led(IntEnum):
    NUM_LOCK = 1
    CAPS_LOCK = 2
    SCROLL_LOCK = 3
    COMPOSE = 4
    KANA = 5


class CollectionType(IntEnum):
    PHYSICAL = 0x00
    APPLICATION = 0x01
    LOGICAL = 0x02
    REPORT = 0x03
    NAMED_ARRAY = 0x04
    USAGE_SWITCH = 0x05
    USAGE_MODIFIER = 0x06


class MainFlag(IntFlag):
    """Input/Output/Feature data bits (6.2.2.5).  The zero-valued names read like the spec."""

    CONSTANT = 0x001
    VARIABLE = 0x002
    RELATIVE = 0x004
    WRAP = 0x008
    NONLINEAR = 0x010
    NO_PREFERRED = 0x020
    NULL_STATE = 0x040
    VOLATILE = 0x080
    BUFFERED_BYTES = 0x100


DATA = ARRAY = ABSOLUTE = MainFlag(0)
CONSTANT, VARIABLE, RELATIVE = MainFlag.CONSTANT, MainFlag.VARIABLE, MainFlag.RELATIVE


@dataclass(frozen=True)
class Item:
    kind: ItemKind
    value: int = 0

    def encode(self) -> bytes:
        if not self.kind.has_data:
            size, data = 0, b""
        else:
            value = int(self.value)
            for size in (1, 2, 4):
                lo, hi = ((-(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1) if self.kind.signed
                          else (0, (1 << (8 * size)) - 1))
                if lo <= value <= hi:
                    break
            else:
                raise ValueError(f"{self.kind.name} value {value} does not fit 4 bytes")
            data = value.to_bytes(size, "little", signed=self.kind.signed)
        prefix: bytes = ItemPrefix.build({"bTag": self.kind.tag, "bType": self.kind.type,
                                   "bSize": _SIZE_CODE[size]})
        return prefix + data


ItemTree: TypeAlias = Item | Iterable["ItemTree"]


class ItemBuilder(Protocol):
    def __call__(self, value: int = 0) -> Item: ...


def _builder(name: str) -> ItemBuilder:
    kind = _BY_NAME[name]

    def build(value: int = 0) -> Item:
        return Item(kind, int(value))
    build.__name__ = build.__qualname__ = name.replace(" ", "")
    build.__doc__ = f"HID short item '{name}' ({kind.type.name.lower()}, tag 0x{kind.tag:x})."
    return build


Input = _builder("Input")
Output = _builder("Output")
Feature = _builder("Feature")
EndCollection = _builder("End Collection")
UsagePage = _builder("Usage Page")
LogicalMinimum = _builder("Logical Minimum")
LogicalMaximum = _builder("Logical Maximum")
PhysicalMinimum = _builder("Physical Minimum")
PhysicalMaximum = _builder("Physical Maximum")
UnitExponent = _builder("Unit Exponent")
Unit = _builder("Unit")
ReportSize = _builder("Report Size")
ReportID = _builder("Report ID")
ReportCount = _builder("Report Count")
Push = _builder("Push")
Pop = _builder("Pop")
Usage = _builder("Usage")
UsageMinimum = _builder("Usage Minimum")
UsageMaximum = _builder("Usage Maximum")


def Collection(kind: CollectionType, *children: ItemTree) -> list[ItemTree]:
    """A Collection item, its children, and the matching End Collection."""
    return [Item(_BY_NAME["Collection"], int(kind)), *children, EndCollection()]


def _flatten(items: Iterable[ItemTree]) -> Iterator[Item]:
    for item in items:
        if isinstance(item, Item):
            yield item
        else:
            yield from _flatten(item)


def report_descriptor(*items: ItemTree) -> bytes:
    """Encode items (nested lists allowed) into a report descriptor."""
    return b"".join(item.encode() for item in _flatten(items))


# ---- decoding -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ParsedItem:
    offset: int
    kind: ItemKind | None     # None: reserved/unknown tag or long item
    value: int
    raw: bytes

    @property
    def name(self) -> str:
        return self.kind.name if self.kind else f"unknown item 0x{self.raw[0]:02x}"


def parse_report_descriptor(data: bytes) -> list[ParsedItem]:
    """Split a report descriptor into items.  Never raises; a truncated tail becomes an item
    with kind None."""
    data = bytes(data)
    out: list[ParsedItem] = []
    pos = 0
    while pos < len(data):
        first = data[pos]
        if first == LONG_ITEM_PREFIX:          # long item: size byte, tag byte, data
            size = data[pos + 1] if pos + 1 < len(data) else 0
            raw = data[pos:pos + 3 + size]
            out.append(ParsedItem(pos, None, 0, raw))
            pos += len(raw)
            continue
        prefix = ItemPrefix.parse(bytes([first]))
        size = _DATA_BYTES[prefix.bSize]
        raw = data[pos:pos + 1 + size]
        kind = _BY_PREFIX.get((prefix.bType, prefix.bTag))
        if len(raw) < 1 + size:
            out.append(ParsedItem(pos, None, 0, raw))
            break
        signed = bool(kind and kind.signed)
        value = int.from_bytes(raw[1:], "little", signed=signed) if size else 0
        out.append(ParsedItem(pos, kind, value, raw))
        pos += len(raw)
    return out


_USAGE_NAMES: dict[int, type[IntEnum]] = {
    Page.GENERIC_DESKTOP: GenericDesktop, Page.LED: Led, Page.CONSUMER: Consumer}


def _value_text(item: ParsedItem, page: int) -> str:
    name = item.kind.name if item.kind else ""
    if name == "Usage Page":
        try:
            return Page(item.value).name.replace("_", " ").title()
        except ValueError:
            return f"0x{item.value:04x}"
    if name == "Usage" and page in _USAGE_NAMES:
        try:
            return _USAGE_NAMES[page](item.value).name.replace("_", " ").title()
        except ValueError:
            pass
    if name == "Collection":
        try:
            return CollectionType(item.value).name.replace("_", " ").title()
        except ValueError:
            return f"0x{item.value:02x}"
    if name in ("Input", "Output", "Feature"):
        v = item.value
        words = ["Constant" if v & 1 else "Data", "Variable" if v & 2 else "Array",
                 "Relative" if v & 4 else "Absolute"]
        words += [w for bit, w in ((8, "Wrap"), (0x10, "Nonlinear"), (0x20, "No Preferred"),
                                   (0x40, "Null State"), (0x80, "Volatile"),
                                   (0x100, "Buffered Bytes")) if v & bit]
        return ", ".join(words)
    return str(item.value)


def format_report_descriptor(data: bytes) -> str:
    """A readable listing, one item per line, indented by collection."""
    lines = []
    depth = 0
    page = 0
    for item in parse_report_descriptor(data):
        if item.kind and item.kind.name == "End Collection":
            depth = max(0, depth - 1)
        if item.kind and item.kind.name == "Usage Page":
            page = item.value
        text = item.name if item.kind is None or not item.kind.has_data else \
            f"{item.name} ({_value_text(item, page)})"
        lines.append(f"{item.raw.hex(' '):<15} {'  ' * depth}{text}")
        if item.kind and item.kind.name == "Collection":
            depth += 1
    return "\n".join(lines)


def report_sizes(data: bytes) -> dict[tuple[str, int], int]:
    """Bits per report: {(main item name, report ID): bits}, from the global Report Size /
    Report Count / Report ID state (with Push/Pop), as a host parser computes them."""
    sizes: dict[tuple[str, int], int] = {}
    state = {"size": 0, "count": 0, "id": 0}
    stack: list[dict[str, int]] = []
    for item in parse_report_descriptor(data):
        name = item.kind.name if item.kind else ""
        if name == "Report Size":
            state["size"] = item.value
        elif name == "Report Count":
            state["count"] = item.value
        elif name == "Report ID":
            state["id"] = item.value
        elif name == "Push":
            stack.append(dict(state))
        elif name == "Pop" and stack:
            state = stack.pop()
        elif name in ("Input", "Output", "Feature"):
            key = (name, state["id"])
            sizes[key] = sizes.get(key, 0) + state["size"] * state["count"]
    return sizes


def hid_descriptor(report: bytes, country: int = 0) -> bytes:
    """The HID class descriptor announcing one report descriptor of this length."""
    blob: bytes = HidDescriptor.build({"bCountryCode": country,
                                       "wClassDescriptorLength": len(report)})
    return blob
