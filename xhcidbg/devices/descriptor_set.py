"""The descriptors a declared device presents, built from its declaration for each speed.

`DescriptorSet` fills the `usb_protocol` layouts (see `descriptors`) from the tree a device
declares: bcdUSB and the EP0 packet size per operating speed, endpoint descriptors with their
SuperSpeed companions, bMaxPower in the units of the speed, the BOS of a SuperSpeed device,
and, for a device that runs at both full and high speed, the device qualifier and the
other-speed configuration (USB 2.0 9.6.2, 9.6.4; USB 3.2 9.6).  Each blob is built once.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable

from .base import EpType, Speed
from .declaration import DeviceDeclaration, EndpointDecl
from .descriptors import (
    BinaryObjectStoreDescriptor,
    ConfigurationDescriptor,
    DeviceDescriptor,
    DeviceQualifierDescriptor,
    EndpointDescriptor,
    InterfaceDescriptor,
    LanguageIDs,
    OtherSpeedConfigurationDescriptor,
    StringDescriptor,
    StringLanguageDescriptor,
    SuperSpeedEndpointCompanionDescriptor,
    SuperSpeedUSBDeviceCapabilityDescriptor,
    USB2ExtensionDescriptor,
)

__all__ = ["DescriptorSet"]

# Speed codes of the SuperSpeed device capability (wSpeedsSupported bits, bFunctionalitySupport)
_SPEED_CODE = {Speed.LOW: 0, Speed.FULL: 1, Speed.HIGH: 2}
_SUPERSPEED_CODE = 3


def _bcd(value: int) -> float:
    """usb_protocol wants BCD fields as 'XX.YY' numbers: 0x0320 -> 3.2."""
    return float(f"{value >> 8:x}.{value & 0xFF:02x}")


def endpoint_descriptors(ep: EndpointDecl, speed: Speed) -> bytes:
    """The endpoint descriptor, and at SuperSpeed its companion."""
    attributes = int(ep.type)
    if ep.type == EpType.ISOCHRONOUS:
        attributes |= (ep.sync & 3) << 2 | (ep.usage & 3) << 4
    out: bytes = EndpointDescriptor.build({
        "bEndpointAddress": ep.address, "bmAttributes": attributes,
        "wMaxPacketSize": ep.max_packet_for(speed) | (ep.hs_mult << 11 if speed == Speed.HIGH
                                                      else 0),
        "bInterval": ep.interval_for(speed)})
    if speed >= Speed.SUPER:
        out += SuperSpeedEndpointCompanionDescriptor.build({
            "bMaxBurst": 0 if ep.type == EpType.CONTROL else ep.max_burst,
            "bmAttributes": ep.ss_attributes,
            "wBytesPerInterval": ep.bytes_per_interval(speed)})
    return out


class DescriptorSet:
    """Every descriptor of one device, per operating speed, with its string table."""

    def __init__(self, declaration: DeviceDeclaration):
        self.declaration = declaration
        self.strings = self._string_table()
        self._cache: dict[Hashable, bytes] = {}

    def _string_table(self) -> dict[str, int]:
        """String descriptor indexes, 1.., in the order device, configurations, interfaces."""
        d = self.declaration
        texts = [d.manufacturer, d.product, d.serial_number]
        for config in d.configurations:
            texts.append(config.name)
            texts.extend(i.name for i in config.interfaces)
        table: dict[str, int] = {}
        for text in texts:
            if text and text not in table:
                table[text] = len(table) + 1
        return table

    def string_index(self, text: str | None) -> int:
        return self.strings.get(text, 0) if text else 0

    def _cached(self, key: Hashable, build: Callable[[], bytes]) -> bytes:
        blob = self._cache.get(key)
        if blob is None:
            blob = self._cache[key] = build()
        return blob

    def device(self, speed: Speed) -> bytes:
        d = self.declaration
        return self._cached(("device", speed), lambda: DeviceDescriptor.build({
            "bcdUSB": 3.2 if speed >= Speed.SUPER else 2.0,
            "bDeviceClass": d.device_class, "bDeviceSubclass": d.device_subclass,
            "bDeviceProtocol": d.device_protocol,
            "bMaxPacketSize0": 9 if speed >= Speed.SUPER else (8 if speed == Speed.LOW else 64),
            "idVendor": d.vendor_id, "idProduct": d.product_id,
            "bcdDevice": _bcd(d.device_version),
            "iManufacturer": self.string_index(d.manufacturer),
            "iProduct": self.string_index(d.product),
            "iSerialNumber": self.string_index(d.serial_number),
            "bNumConfigurations": len(d.configurations)}))

    def configuration(self, index: int, speed: Speed, other_speed: bool = False) -> bytes:
        """The configuration with all its interfaces, class descriptors and endpoints;
        `other_speed` makes it an other-speed configuration descriptor."""
        return self._cached(("config", index, speed, other_speed),
                            lambda: self._build_configuration(index, speed, other_speed))

    def _build_configuration(self, index: int, speed: Speed, other_speed: bool) -> bytes:
        config = self.declaration.configurations[index]
        body = b""
        for iface in sorted(config.interfaces, key=lambda i: (i.number, i.alternate)):
            body += InterfaceDescriptor.build({
                "bInterfaceNumber": iface.number, "bAlternateSetting": iface.alternate,
                "bNumEndpoints": len(iface.endpoints), "bInterfaceClass": iface.cls,
                "bInterfaceSubclass": iface.subclass, "bInterfaceProtocol": iface.protocol,
                "iInterface": self.string_index(iface.name)})
            body += b"".join(iface.class_descriptors)
            body += b"".join(endpoint_descriptors(ep, speed) for ep in iface.endpoints)
        unit = 8 if speed >= Speed.SUPER else 2     # bMaxPower units: 8 mA SuperSpeed, else 2 mA
        fmt = OtherSpeedConfigurationDescriptor if other_speed else ConfigurationDescriptor
        head: bytes = fmt.build({
            "wTotalLength": 9 + len(body), "bNumInterfaces": len(config.interface_numbers),
            "bConfigurationValue": config.value,
            "iConfiguration": self.string_index(config.name),
            "bmAttributes": config.attributes,
            "bMaxPower": min(255, -(-config.max_power_ma // unit))})
        return head + body

    def bos(self) -> bytes:
        """Binary Object Store (USB 3.2 9.6.2): USB 2.0 extension + SuperSpeed capability."""
        def build() -> bytes:
            caps: bytes = USB2ExtensionDescriptor.build({"bmAttributes": 0x2})   # LPM supported
            codes = [_SPEED_CODE.get(s, _SUPERSPEED_CODE) for s in self.declaration.speeds]
            speeds = 0
            for code in codes:
                speeds |= 1 << code
            caps += SuperSpeedUSBDeviceCapabilityDescriptor.build({
                "bmAttributes": 0, "wSpeedsSupported": speeds,
                "bFunctionalitySupport": min(codes),
                "bU1DevExitLat": 0x0A, "wU2DevExitLat": 0x07FF})
            head: bytes = BinaryObjectStoreDescriptor.build(
                {"wTotalLength": 5 + len(caps), "bNumDeviceCaps": 2})
            return head + caps
        return self._cached(("bos",), build)

    def other_speed(self, speed: Speed) -> Speed | None:
        """The other USB 2.0 speed for device_qualifier / other_speed_configuration: only for
        high-speed capable devices operating at full or high speed (USB 2.0 9.6.2)."""
        if Speed.HIGH not in self.declaration.speeds or Speed.FULL not in self.declaration.speeds:
            return None
        return {Speed.FULL: Speed.HIGH, Speed.HIGH: Speed.FULL}.get(speed)

    def qualifier(self, speed: Speed) -> bytes | None:
        """The device qualifier when running at `speed`, or None if there is no other speed."""
        if self.other_speed(speed) is None:
            return None
        d = self.declaration
        blob: bytes = DeviceQualifierDescriptor.build({
            "bcdUSB": 2.0, "bDeviceClass": d.device_class,
            "bDeviceSubclass": d.device_subclass, "bDeviceProtocol": d.device_protocol,
            "bMaxPacketSize0": 64, "bNumConfigurations": len(d.configurations)})
        return blob

    def string(self, index: int) -> bytes | None:
        """String descriptor `index` (0: the language list), or None if there is none."""
        blob: bytes
        if index == 0:
            blob = StringLanguageDescriptor.build({"wLANGID": [LanguageIDs.ENGLISH_US]})
            return blob
        for text, i in self.strings.items():
            if i == index:
                blob = StringDescriptor.build({"bString": text[:126]})
                return blob
        return None
