"""USB descriptor and control-request layouts, each declared once.

The standard descriptors come from `usb_protocol` (construct declarations that both parse and
build); this module adds what it lacks -- the SETUP packet, the other-speed configuration and HID
class descriptors -- in the same style, and the request/feature numbers.  Devices build their
descriptors with these tables; the console and the tracer decode captured traffic with the same
tables (`parse_descriptors`, `describe_setup`).
"""
from __future__ import annotations

from enum import IntEnum

import construct as c
from usb_protocol.types import (
    LanguageIDs,
    USBDirection,
    USBRequestRecipient,
    USBRequestType,
    USBStandardRequests,
)
from usb_protocol.types.descriptor import DescriptorField, DescriptorFormat, DescriptorNumber
from usb_protocol.types.descriptors.standard import (
    BinaryObjectStoreDescriptor,
    ConfigurationDescriptor,
    DeviceCapabilityTypes,
    DeviceDescriptor,
    DeviceQualifierDescriptor,
    EndpointDescriptor,
    InterfaceAssociationDescriptor,
    InterfaceDescriptor,
    StringDescriptor,
    StringLanguageDescriptor,
    SuperSpeedEndpointCompanionDescriptor,
    SuperSpeedUSBDeviceCapabilityDescriptor,
    USB2ExtensionDescriptor,
)

__all__ = [
    "BinaryObjectStoreDescriptor", "ConfigurationDescriptor", "ContainerIdDescriptor",
    "DescriptorType", "DeviceDescriptor", "DeviceFeature", "DeviceQualifierDescriptor",
    "EndpointDescriptor", "EndpointFeature", "HidDescriptor", "InterfaceAssociationDescriptor",
    "InterfaceDescriptor", "InterfaceFeature", "LanguageIDs", "OtherSpeedConfigurationDescriptor",
    "Recipient", "RequestType", "SetupPacket", "StandardRequest", "StringDescriptor",
    "StringLanguageDescriptor", "SuperSpeedEndpointCompanionDescriptor",
    "SuperSpeedUSBDeviceCapabilityDescriptor", "USB2ExtensionDescriptor", "USBDirection",
    "describe_setup", "parse_descriptors", "setup_packet",
]

StandardRequest = USBStandardRequests
RequestType = USBRequestType
Recipient = USBRequestRecipient


class DescriptorType(IntEnum):
    """bDescriptorType values: standard (USB 2.0 9.4, USB 3.2 9.4) and the HID class ones."""

    DEVICE = 1
    CONFIGURATION = 2
    STRING = 3
    INTERFACE = 4
    ENDPOINT = 5
    DEVICE_QUALIFIER = 6
    OTHER_SPEED_CONFIGURATION = 7
    INTERFACE_POWER = 8
    OTG = 9
    DEBUG = 10
    INTERFACE_ASSOCIATION = 11
    BOS = 15
    DEVICE_CAPABILITY = 16
    HID = 0x21
    REPORT = 0x22
    PHYSICAL = 0x23
    SUPERSPEED_ENDPOINT_COMPANION = 48
    SUPERSPEEDPLUS_ISOCHRONOUS_ENDPOINT_COMPANION = 49


class DeviceFeature(IntEnum):
    """Feature selectors with the device as recipient."""

    DEVICE_REMOTE_WAKEUP = 1
    TEST_MODE = 2
    U1_ENABLE = 48          # SuperSpeed only
    U2_ENABLE = 49
    LTM_ENABLE = 50


class InterfaceFeature(IntEnum):
    FUNCTION_SUSPEND = 0    # SuperSpeed only


class EndpointFeature(IntEnum):
    ENDPOINT_HALT = 0


# The 8-byte SETUP packet (USB 2.0 9.3).  bmRequestType is split into its three fields.
SetupPacket = c.Struct(
    "bmRequestType" / c.BitStruct(
        "direction" / c.BitsInteger(1),        # USBDirection: 1 = device-to-host
        "type" / c.BitsInteger(2),             # USBRequestType
        "recipient" / c.BitsInteger(5),        # USBRequestRecipient
    ),
    "bRequest" / c.Int8ul,
    "wValue" / c.Int16ul,
    "wIndex" / c.Int16ul,
    "wLength" / c.Int16ul,
)
SETUP_PACKET = SetupPacket.compile()            # the same declaration, compiled for speed


def setup_packet(request_type: int, request: int, value: int = 0, index: int = 0,
                 length: int = 0) -> bytes:
    """Build a SETUP packet from the raw bmRequestType byte and the request fields."""
    packet: bytes = SetupPacket.build({
        "bmRequestType": {"direction": request_type >> 7 & 1, "type": request_type >> 5 & 3,
                          "recipient": request_type & 0x1F},
        "bRequest": request, "wValue": value, "wIndex": index, "wLength": length})
    return packet


# Other-speed configuration (USB 2.0 9.6.4): a configuration descriptor with its own type number.
OtherSpeedConfigurationDescriptor = DescriptorFormat(
    "bLength" / c.Const(9, c.Int8ul),
    "bDescriptorType" / DescriptorNumber(DescriptorType.OTHER_SPEED_CONFIGURATION),
    "wTotalLength" / DescriptorField("Length including subordinates"),
    "bNumInterfaces" / DescriptorField("Interface count"),
    "bConfigurationValue" / DescriptorField("Configuration number", default=1),
    "iConfiguration" / DescriptorField("Description string", default=0),
    "bmAttributes" / DescriptorField("Attributes", default=0x80),
    "bMaxPower" / DescriptorField("Max power consumption", default=250),
)

# HID class descriptor (HID 1.11 6.2.1), with the one subordinate descriptor (the report
# descriptor) every device here has.
HidDescriptor = DescriptorFormat(
    "bLength" / c.Const(9, c.Int8ul),
    "bDescriptorType" / DescriptorNumber(DescriptorType.HID),
    "bcdHID" / DescriptorField("HID version", default=1.11),
    "bCountryCode" / DescriptorField("Country code", default=0),
    "bNumDescriptors" / DescriptorField("Class descriptors", default=1),
    "bClassDescriptorType" / DescriptorField("Class descriptor type",
                                             default=DescriptorType.REPORT),
    "wClassDescriptorLength" / DescriptorField("Class descriptor length"),
)

# Container ID capability (USB 3.2 9.6.2.3): which physical device a function belongs to.
ContainerIdDescriptor = DescriptorFormat(
    "bLength" / c.Const(20, c.Int8ul),
    "bDescriptorType" / DescriptorNumber(DescriptorType.DEVICE_CAPABILITY),
    "bDevCapabilityType" / c.Const(DeviceCapabilityTypes.CONTAINER_ID, c.Int8ul),
    "bReserved" / DescriptorField("Reserved", default=0),
    "ContainerID" / c.Bytes(16),
)

# Layouts are construct objects (untyped), hence `c.Construct`.
_BY_TYPE: dict[int, c.Construct] = {
    DescriptorType.DEVICE: DeviceDescriptor,
    DescriptorType.CONFIGURATION: ConfigurationDescriptor,
    DescriptorType.INTERFACE: InterfaceDescriptor,
    DescriptorType.ENDPOINT: EndpointDescriptor,
    DescriptorType.DEVICE_QUALIFIER: DeviceQualifierDescriptor,
    DescriptorType.OTHER_SPEED_CONFIGURATION: OtherSpeedConfigurationDescriptor,
    DescriptorType.INTERFACE_ASSOCIATION: InterfaceAssociationDescriptor,
    DescriptorType.BOS: BinaryObjectStoreDescriptor,
    DescriptorType.HID: HidDescriptor,
    DescriptorType.SUPERSPEED_ENDPOINT_COMPANION: SuperSpeedEndpointCompanionDescriptor,
}
_CAPABILITIES: dict[int, c.Construct] = {
    DeviceCapabilityTypes.USB_2_EXTENSION: USB2ExtensionDescriptor,
    DeviceCapabilityTypes.SUPERSPEED_USB: SuperSpeedUSBDeviceCapabilityDescriptor,
    DeviceCapabilityTypes.CONTAINER_ID: ContainerIdDescriptor,
}


def _format_for(chunk: bytes) -> c.Construct | None:
    kind = chunk[1]
    if kind == DescriptorType.STRING:
        return StringDescriptor
    if kind == DescriptorType.DEVICE_CAPABILITY:
        return _CAPABILITIES.get(chunk[2]) if len(chunk) > 2 else None
    return _BY_TYPE.get(kind)


def parse_descriptors(blob: bytes) -> list[tuple[str, object]]:
    """Split a descriptor blob (a configuration with its subordinates, a BOS, ...) on bLength and
    decode each piece.  Returns (type name, parsed container or raw bytes) pairs.  Never raises:
    unknown, malformed or truncated pieces come back as raw bytes."""
    out: list[tuple[str, object]] = []
    blob = bytes(blob)
    pos = 0
    while pos + 2 <= len(blob):
        length = blob[pos]
        if length < 2:
            out.append(("invalid", blob[pos:]))
            break
        chunk = blob[pos:pos + length]
        try:
            name = DescriptorType(chunk[1]).name
        except ValueError:
            name = f"type 0x{chunk[1]:02x}"
        fmt = _format_for(chunk)
        parsed: object = chunk
        if fmt is not None and len(chunk) == length:
            try:
                parsed = fmt.parse(chunk)
            except (c.ConstructError, ValueError):
                parsed = chunk
        out.append((name, parsed))
        pos += length
    if pos < len(blob):
        out.append(("trailing", blob[pos:]))
    return out


def descriptor_fields(blob: bytes | bytearray) -> list[tuple[str, str, int, int]]:
    """Where the fields of the descriptors in `blob` sit: (descriptor type name, field name,
    offset in `blob`, size) in order, from the same declarations `parse_descriptors` uses.
    A field past the end of its descriptor, or after one of variable size, is left out."""
    out: list[tuple[str, str, int, int]] = []
    blob = bytes(blob)
    pos = 0
    while pos + 2 <= len(blob) and blob[pos] >= 2:
        length = blob[pos]
        chunk = blob[pos:pos + length]
        fmt = _format_for(chunk)
        if fmt is not None:
            try:
                kind = DescriptorType(chunk[1]).name
            except ValueError:
                kind = f"type 0x{chunk[1]:02x}"
            off = 0
            for sub in fmt.subcons:
                try:
                    size = sub.sizeof()
                except c.SizeofError:
                    break
                if off + size > len(chunk):
                    break
                if sub.name:
                    out.append((kind, sub.name, pos + off, size))
                off += size
        pos += length
    return out


_REQUEST_NAMES = {r.value: r.name for r in StandardRequest}


def describe_setup(setup: bytes) -> str:
    """One line for a SETUP packet, e.g. 'GET_DESCRIPTOR DEVICE index 0 len 18'.  Never raises."""
    if setup is None or len(setup) != 8:
        return f"malformed setup {bytes(setup or b'').hex()}"
    s = SETUP_PACKET.parse(bytes(setup))
    rt = s.bmRequestType
    direction = "in" if rt.direction else "out"
    recipient = Recipient(rt.recipient).name.lower() if rt.recipient < 4 else "reserved"
    if rt.type != RequestType.STANDARD:
        kind = RequestType(rt.type).name.lower()
        return (f"{kind} request 0x{s.bRequest:02x} ({direction}, {recipient}) "
                f"wValue 0x{s.wValue:04x} wIndex 0x{s.wIndex:04x} len {s.wLength}")
    name = _REQUEST_NAMES.get(s.bRequest, f"request 0x{s.bRequest:02x}")
    if s.bRequest == StandardRequest.GET_DESCRIPTOR:
        try:
            dtype = DescriptorType(s.wValue >> 8).name
        except ValueError:
            dtype = f"type 0x{s.wValue >> 8:02x}"
        extra = f" lang 0x{s.wIndex:04x}" if s.wValue >> 8 == DescriptorType.STRING else ""
        if rt.recipient == Recipient.INTERFACE:
            extra = f" interface {s.wIndex}"
        return f"{name} {dtype} index {s.wValue & 0xFF}{extra} len {s.wLength}"
    if s.bRequest == StandardRequest.SET_ADDRESS:
        return f"{name} {s.wValue}"
    if s.bRequest in (StandardRequest.SET_CONFIGURATION, StandardRequest.GET_CONFIGURATION):
        return f"{name} {s.wValue}" if s.bRequest == StandardRequest.SET_CONFIGURATION else name
    if s.bRequest in (StandardRequest.SET_INTERFACE, StandardRequest.GET_INTERFACE):
        return f"{name} interface {s.wIndex} alt {s.wValue}"
    if s.bRequest in (StandardRequest.SET_FEATURE, StandardRequest.CLEAR_FEATURE,
                      StandardRequest.GET_STATUS):
        feature = ""
        if s.bRequest != StandardRequest.GET_STATUS:
            table = {Recipient.DEVICE: DeviceFeature, Recipient.INTERFACE: InterfaceFeature,
                     Recipient.ENDPOINT: EndpointFeature}.get(rt.recipient)
            try:
                feature = " " + table(s.wValue).name if table else f" feature {s.wValue}"
            except ValueError:
                feature = f" feature {s.wValue}"
        target = {Recipient.INTERFACE: f"interface {s.wIndex}",
                  Recipient.ENDPOINT: f"endpoint 0x{s.wIndex & 0xFF:02x}"}.get(rt.recipient,
                                                                             recipient)
        return f"{name}{feature} {target}"
    return (f"{name} ({direction}, {recipient}) wValue 0x{s.wValue:04x} "
            f"wIndex 0x{s.wIndex:04x} len {s.wLength}")
