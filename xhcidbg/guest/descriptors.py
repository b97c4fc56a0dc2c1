"""USB descriptors as the enumerating driver reads them (USB 2.0 chapter 9, USB 3.2 chapter 9).

The standard layouts come from `usb_protocol` (declared there once with construct); this module
walks a configuration's descriptor list, which a host must do itself, and keeps the raw bytes of
everything it does not interpret (class descriptors such as HID's) for whoever does.  A device
is not trusted: a malformed descriptor raises `DescriptorError`, never a construct exception.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import construct as c
from usb_protocol.types.descriptors.standard import (
    ConfigurationDescriptor,
    DeviceDescriptor,
    EndpointDescriptor,
    InterfaceDescriptor,
    SuperSpeedEndpointCompanionDescriptor,
)

from .errors import DescriptorError

# bDescriptorType values (USB 2.0 table 9-5, USB 3.2 table 9-6)
DEVICE = 1
CONFIGURATION = 2
STRING = 3
INTERFACE = 4
ENDPOINT = 5
DEVICE_QUALIFIER = 6
INTERFACE_ASSOCIATION = 0x0B
BOS = 0x0F
HID = 0x21
HID_REPORT = 0x22
SS_ENDPOINT_COMPANION = 0x30
SSP_ISOCH_ENDPOINT_COMPANION = 0x31


def _parse(fmt: c.Construct, data: bytes, what: str) -> c.Container:
    try:
        return fmt.parse(data)
    except Exception as e:   # construct raises many types; a device's garbage is not our bug
        raise DescriptorError(f"malformed {what} descriptor {data.hex()}: {e}") from None


@dataclass
class DeviceDesc:
    raw: bytes
    bcd_usb: int
    device_class: int
    device_subclass: int
    device_protocol: int
    max_packet0: int          # bMaxPacketSize0 as sent (an exponent for USB 3 devices)
    vendor: int
    product: int
    bcd_device: int
    manufacturer_index: int
    product_index: int
    serial_index: int
    num_configurations: int

    @classmethod
    def parse(cls, raw: bytes) -> DeviceDesc:
        if len(raw) < 18:
            raise DescriptorError(f"device descriptor is {len(raw)} bytes, needs 18: {raw.hex()}")
        _parse(DeviceDescriptor, raw[:18], "device")   # validates bLength and type
        (_, _, bcd_usb, cls_, sub, proto, mps0, vid, pid, bcd_dev, im, ip, isn,
         ncfg) = struct.unpack_from("<BBHBBBBHHHBBBB", raw)
        return cls(raw[:18], bcd_usb, cls_, sub, proto, mps0, vid, pid, bcd_dev, im, ip, isn,
                   ncfg)

    def ep0_max_packet(self, superspeed: bool) -> int:
        if superspeed or self.bcd_usb >= 0x0300:
            return 1 << self.max_packet0 if self.max_packet0 < 16 else 0
        return self.max_packet0


@dataclass
class EndpointDesc:
    address: int
    attributes: int
    max_packet_raw: int       # wMaxPacketSize as sent
    interval: int
    # SuperSpeed endpoint companion (zeros when absent)
    max_burst: int = 0
    ss_attributes: int = 0
    bytes_per_interval: int = 0
    extra: list[bytes] = field(default_factory=list)

    @property
    def number(self) -> int:
        return self.address & 0x0F

    @property
    def is_in(self) -> bool:
        return bool(self.address & 0x80)

    @property
    def transfer_type(self) -> int:
        """0 control, 1 isochronous, 2 bulk, 3 interrupt."""
        return self.attributes & 3

    @property
    def max_packet(self) -> int:
        return self.max_packet_raw & 0x7FF

    @property
    def hs_extra_transactions(self) -> int:
        """High-speed periodic endpoints: additional transactions per microframe (0-2)."""
        return (self.max_packet_raw >> 11) & 3

    @property
    def dci(self) -> int:
        """Device Context Index (4.5.1): 2 * number + direction (IN = 1)."""
        return 2 * self.number + (1 if self.is_in else 0)


@dataclass
class InterfaceDesc:
    number: int
    alternate: int
    interface_class: int
    interface_subclass: int
    interface_protocol: int
    string_index: int
    endpoints: list[EndpointDesc] = field(default_factory=list)
    extra: list[bytes] = field(default_factory=list)    # class-specific descriptors (HID, ...)

    def class_descriptor(self, dtype: int) -> bytes | None:
        for d in self.extra:
            if d[1] == dtype:
                return d
        return None


@dataclass
class ConfigDesc:
    raw: bytes
    value: int
    attributes: int
    max_power: int
    string_index: int
    interfaces: list[InterfaceDesc] = field(default_factory=list)
    extra: list[bytes] = field(default_factory=list)

    def interface(self, number: int, alternate: int = 0) -> InterfaceDesc | None:
        for i in self.interfaces:
            if i.number == number and i.alternate == alternate:
                return i
        return None

    def active_interfaces(self, alternates: dict[int, int] | None = None) -> list[InterfaceDesc]:
        """One setting per interface number (alternate 0 unless chosen)."""
        alternates = alternates or {}
        return [i for i in self.interfaces if i.alternate == alternates.get(i.number, 0)]

    @classmethod
    def parse(cls, raw: bytes) -> ConfigDesc:
        if len(raw) < 9:
            raise DescriptorError(f"configuration descriptor is {len(raw)} bytes: {raw.hex()}")
        c = _parse(ConfigurationDescriptor, raw[:9], "configuration")
        total = min(c.wTotalLength, len(raw))
        cfg = cls(raw[:total], c.bConfigurationValue, c.bmAttributes, c.bMaxPower,
                  c.iConfiguration)
        iface: InterfaceDesc | None = None
        ep: EndpointDesc | None = None
        for d in walk(raw[9:total]):
            t = d[1]
            if t == INTERFACE:
                i = _parse(InterfaceDescriptor, d[:9], "interface")
                iface = InterfaceDesc(i.bInterfaceNumber, i.bAlternateSetting, i.bInterfaceClass,
                                      i.bInterfaceSubclass, i.bInterfaceProtocol, i.iInterface)
                cfg.interfaces.append(iface)
                ep = None
            elif t == ENDPOINT:
                e = _parse(EndpointDescriptor, d[:9] if d[0] >= 9 else d[:7], "endpoint")
                ep = EndpointDesc(e.bEndpointAddress, e.bmAttributes, e.wMaxPacketSize,
                                  e.bInterval)
                if iface is None:
                    raise DescriptorError("endpoint descriptor before any interface")
                iface.endpoints.append(ep)
            elif t == SS_ENDPOINT_COMPANION and ep is not None:
                sc = _parse(SuperSpeedEndpointCompanionDescriptor, d[:6], "SS endpoint companion")
                ep.max_burst = sc.bMaxBurst
                ep.ss_attributes = sc.bmAttributes
                ep.bytes_per_interval = sc.wBytesPerInterval
            elif ep is not None:
                ep.extra.append(d)
            elif iface is not None:
                iface.extra.append(d)
            else:
                cfg.extra.append(d)
        return cfg


def walk(data: bytes) -> Iterator[bytes]:
    """Split a run of descriptors on their bLength bytes."""
    pos = 0
    while pos + 2 <= len(data):
        n = data[pos]
        if n < 2 or pos + n > len(data):
            raise DescriptorError(f"descriptor at offset {pos} has bLength {n} "
                                  f"({len(data) - pos} bytes left): {data.hex()}")
        yield data[pos:pos + n]
        pos += n


def parse_string(raw: bytes) -> str:
    if len(raw) < 2 or raw[1] != STRING:
        raise DescriptorError(f"not a string descriptor: {raw.hex()}")
    n = min(raw[0], len(raw))
    return raw[2:n - (n % 2)].decode("utf-16-le", errors="replace")


def parse_langids(raw: bytes) -> list[int]:
    if len(raw) < 2 or raw[1] != STRING:
        raise DescriptorError(f"not a string descriptor: {raw.hex()}")
    n = min(raw[0], len(raw))
    return [int.from_bytes(raw[i:i + 2], "little") for i in range(2, n - 1, 2)]
