"""A USB device declared as a tree, answering the standard requests the way real devices do.

A device class names itself and declares its configurations as small immutable objects:

    class Gadget(StandardDevice):
        vendor_id, product_id = 0x1209, 0x0001
        manufacturer, product = "xhcidbg", "Gadget"
        speeds = (Speed.FULL, Speed.HIGH, Speed.SUPER)
        configurations = (
            Configuration(1, interfaces=(
                Interface(0, cls=0xFF, endpoints=(
                    Endpoint(0x81, EpType.BULK), Endpoint(0x01, EpType.BULK))),)),)

        @on_transfer(0x81)
        def source(self, xfer): xfer.complete(data=b"...")

        @control_request(0x5C, type=RequestType.VENDOR, recipient=Recipient.DEVICE)
        def read_buffer(self, request): return self.buffer

The one declaration serves every speed the class lists: descriptors are built per operating
speed (bcdUSB, EP0 packet size, bulk/interrupt/isochronous packet sizes and interval encodings,
SuperSpeed endpoint companions, BOS, device qualifier and other-speed configuration).  Standard
requests (USB 2.0 / USB 3.2 chapter 9) are handled here; class and vendor requests and data
endpoints dispatch to decorated methods.  Anything unsupported STALLs.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Mapping

from .base import EpType, PortLink, Speed, Status, UsbDevice, UsbTransfer
from .descriptors import (
    SETUP_PACKET, BinaryObjectStoreDescriptor, ConfigurationDescriptor, DescriptorType,
    DeviceDescriptor, DeviceFeature, DeviceQualifierDescriptor, EndpointDescriptor,
    EndpointFeature, InterfaceDescriptor, InterfaceFeature, LanguageIDs,
    OtherSpeedConfigurationDescriptor, Recipient, RequestType, StandardRequest, StringDescriptor,
    StringLanguageDescriptor, SuperSpeedEndpointCompanionDescriptor,
    SuperSpeedUSBDeviceCapabilityDescriptor, USB2ExtensionDescriptor)

log = logging.getLogger(__name__)

__all__ = ["Configuration", "DEFER", "DeviceState", "Endpoint", "Interface", "Request", "Stall",
           "StandardDevice", "control_request", "on_transfer"]


class Stall(Exception):
    """Raised by a request handler to answer with STALL (a request error)."""


DEFER = object()   # returned by a handler that keeps the transfer and completes it later


class DeviceState(IntEnum):
    """USB 2.0 9.1.1 visible device states, from the port's point of view."""

    DEFAULT = 1       # after a bus reset: address 0
    ADDRESS = 2
    CONFIGURED = 3


# Largest wMaxPacketSize each speed allows, per transfer type (USB 2.0 5.5-5.8, USB 3.2 8.6).
_MAX_PACKET = {
    Speed.LOW: {EpType.CONTROL: 8, EpType.INTERRUPT: 8},
    Speed.FULL: {EpType.CONTROL: 64, EpType.BULK: 64, EpType.INTERRUPT: 64,
                 EpType.ISOCHRONOUS: 1023},
    Speed.HIGH: {EpType.CONTROL: 64, EpType.BULK: 512, EpType.INTERRUPT: 1024,
                 EpType.ISOCHRONOUS: 1024},
    Speed.SUPER: {EpType.CONTROL: 512, EpType.BULK: 1024, EpType.INTERRUPT: 1024,
                  EpType.ISOCHRONOUS: 1024},
}
_MAX_PACKET[Speed.SUPER_PLUS] = _MAX_PACKET[Speed.SUPER]


def _operating(speed: Speed) -> Speed:
    """SuperSpeedPlus uses the SuperSpeed descriptor rules."""
    return Speed.SUPER if speed >= Speed.SUPER else speed


def _bcd(value: int) -> float:
    """usb_protocol wants BCD fields as 'XX.YY' numbers: 0x0320 -> 3.2."""
    return float(f"{value >> 8:x}.{value & 0xFF:02x}")


@dataclass(frozen=True, eq=False)
class Endpoint:
    """One endpoint of an interface alternate setting.

    `max_packet` is an int (clamped to what each speed allows), a per-speed mapping, or None for
    the largest allowed.  Bulk endpoints always use the one size each speed mandates above full
    speed (512 high, 1024 super).  `interval_us` is the service period of interrupt and
    isochronous endpoints; it is encoded per speed (frames at full/low speed, 2^(n-1)
    microframes at high and super speed), rounded down to a period the encoding can express.
    """

    address: int
    type: EpType
    max_packet: int | Mapping[Speed, int] | None = None
    interval_us: int = 1000
    max_burst: int = 0           # SuperSpeed: packets per burst minus one (0-15)
    ss_attributes: int = 0       # SuperSpeed companion bmAttributes (bulk MaxStreams, iso Mult)
    sync: int = 0                # isochronous synchronisation type (bmAttributes 3:2)
    usage: int = 0               # isochronous usage type (bmAttributes 5:4)

    @property
    def is_in(self) -> bool:
        return bool(self.address & 0x80)

    @property
    def number(self) -> int:
        return self.address & 0x0F

    def max_packet_for(self, speed: Speed) -> int:
        limits = _MAX_PACKET[speed]
        top = limits.get(self.type, 0)
        if self.type == EpType.BULK and speed >= Speed.HIGH:
            return top
        declared = self.max_packet
        if isinstance(declared, Mapping):
            declared = declared.get(speed, declared.get(_operating(speed)))
        return top if declared is None else max(0, min(int(declared), top))

    def interval_for(self, speed: Speed) -> int:
        """bInterval for this speed."""
        if self.type in (EpType.BULK, EpType.CONTROL):
            return 0
        period = max(1, int(self.interval_us))
        if self.type == EpType.INTERRUPT and speed in (Speed.FULL, Speed.LOW):
            return max(1, min(255, period // 1000))
        unit = 1000 if speed in (Speed.FULL, Speed.LOW) else 125
        exponent = max(1, period // unit).bit_length()      # floor(log2(periods)) + 1
        return max(1, min(16, exponent))

    def bytes_per_interval(self, speed: Speed) -> int:
        if self.type not in (EpType.INTERRUPT, EpType.ISOCHRONOUS):
            return 0
        mult = (self.ss_attributes & 3) + 1 if self.type == EpType.ISOCHRONOUS else 1
        return self.max_packet_for(speed) * (self.max_burst + 1) * mult

    def descriptor(self, speed: Speed) -> bytes:
        attributes = int(self.type)
        if self.type == EpType.ISOCHRONOUS:
            attributes |= (self.sync & 3) << 2 | (self.usage & 3) << 4
        out = EndpointDescriptor.build({
            "bEndpointAddress": self.address, "bmAttributes": attributes,
            "wMaxPacketSize": self.max_packet_for(speed), "bInterval": self.interval_for(speed)})
        if speed >= Speed.SUPER:
            out += SuperSpeedEndpointCompanionDescriptor.build({
                "bMaxBurst": 0 if self.type == EpType.CONTROL else self.max_burst,
                "bmAttributes": self.ss_attributes,
                "wBytesPerInterval": self.bytes_per_interval(speed)})
        return out


@dataclass(frozen=True, eq=False)
class Interface:
    """One alternate setting of an interface.

    `class_descriptors` follow the interface descriptor inside the configuration (a HID
    descriptor, for instance); `requestable` answers GET_DESCRIPTOR addressed to the interface,
    by descriptor type (the HID and report descriptors)."""

    number: int
    endpoints: tuple[Endpoint, ...] = ()
    alternate: int = 0
    cls: int = 0xFF
    subclass: int = 0
    protocol: int = 0
    name: str | None = None
    class_descriptors: tuple[bytes, ...] = ()
    requestable: Mapping[int, bytes] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        object.__setattr__(self, "class_descriptors", tuple(self.class_descriptors))


@dataclass(frozen=True, eq=False)
class Configuration:
    """A configuration: its interfaces (all alternate settings) and power attributes."""

    value: int = 1
    interfaces: tuple[Interface, ...] = ()
    name: str | None = None
    self_powered: bool = False
    remote_wakeup: bool = False
    max_power_ma: int = 100

    def __post_init__(self):
        object.__setattr__(self, "interfaces", tuple(self.interfaces))

    @property
    def interface_numbers(self) -> list[int]:
        return sorted({i.number for i in self.interfaces})

    def setting(self, number: int, alternate: int) -> Interface | None:
        for i in self.interfaces:
            if i.number == number and i.alternate == alternate:
                return i
        return None

    @property
    def attributes(self) -> int:
        return 0x80 | (0x40 if self.self_powered else 0) | (0x20 if self.remote_wakeup else 0)


class Request:
    """A decoded control request as handlers see it."""

    __slots__ = ("request_type", "request", "value", "index", "length", "data", "xfer")

    def __init__(self, setup: bytes, xfer: UsbTransfer | None = None, data: bytes = b""):
        s = SETUP_PACKET.parse(bytes(setup))
        rt = s.bmRequestType
        self.request_type = rt.direction << 7 | rt.type << 5 | rt.recipient
        self.request = s.bRequest
        self.value = s.wValue
        self.index = s.wIndex
        self.length = s.wLength
        self.data = data            # OUT data stage (at most wLength bytes)
        self.xfer = xfer

    @property
    def is_in(self) -> bool:
        return bool(self.request_type & 0x80)

    @property
    def type(self) -> int:
        return self.request_type >> 5 & 3

    @property
    def recipient(self) -> int:
        return self.request_type & 0x1F

    @property
    def interface(self) -> int:
        return self.index & 0xFF

    @property
    def endpoint(self) -> int:
        return self.index & 0xFF

    def __repr__(self) -> str:
        return (f"Request(type=0x{self.request_type:02x} req=0x{self.request:02x} "
                f"value=0x{self.value:04x} index=0x{self.index:04x} len={self.length})")


def on_transfer(*addresses: int) -> Callable:
    """Mark a method as the handler of data transfers on these endpoint addresses."""
    def mark(fn):
        fn._usb_endpoints = addresses
        return fn
    return mark


def control_request(*requests: int, type: int = RequestType.CLASS,
                    recipient: int = Recipient.INTERFACE) -> Callable:
    """Mark a method as the handler of class/vendor control requests.  It is called with a
    `Request` and returns the IN data (bytes), None (OUT: accepted), or DEFER; it raises
    `Stall` to refuse."""
    def mark(fn):
        fn._usb_requests = [(int(type), int(recipient), int(r)) for r in requests]
        return fn
    return mark


class _EndpointState:
    __slots__ = ("decl", "interface", "halted", "parked")

    def __init__(self, decl: Endpoint, interface: int):
        self.decl = decl
        self.interface = interface
        self.halted = False
        self.parked: deque[UsbTransfer] = deque()


class StandardDevice(UsbDevice):
    """Base of every virtual device: descriptors from the declaration, chapter 9 behaviour."""

    name = "device"
    vendor_id = 0x1209            # pid.codes
    product_id = 0x0001           # pid.codes test PID
    device_version = 0x0100       # bcdDevice
    device_class = 0
    device_subclass = 0
    device_protocol = 0
    manufacturer: str | None = "xhcidbg"
    product: str | None = "virtual USB device"
    serial_number: str | None = None
    speeds: tuple[Speed, ...] = (Speed.FULL, Speed.HIGH, Speed.SUPER)
    default_speed = Speed.HIGH
    configurations: tuple[Configuration, ...] = ()

    _transfer_handlers: dict[int, str] = {}
    _request_handlers: dict[tuple[int, int, int], str] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        transfers: dict[int, str] = {}
        requests: dict[tuple[int, int, int], str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                for address in getattr(value, "_usb_endpoints", ()):
                    transfers[address] = attr
                for key in getattr(value, "_usb_requests", ()):
                    requests[key] = attr
        cls._transfer_handlers = transfers
        cls._request_handlers = requests

    def __init__(self, speed: Speed | None = None):
        speed = Speed(self.default_speed if speed is None else speed)
        if speed not in self.speeds:
            raise ValueError(f"{type(self).__name__} does not run at {speed.label}; it supports "
                             + ", ".join(s.label for s in self.speeds))
        self.speed = speed
        self.port: PortLink | None = None
        self.scheduler = None           # xhcidbg.emu.timing.Scheduler when the port offers one
        self._strings = self._collect_strings()
        self._descriptor_cache: dict[tuple, bytes] = {}
        self._reset_state()

    def supports(self, speed: Speed) -> bool:
        return speed in self.speeds

    def set_speed(self, speed: Speed) -> None:
        """Run at another speed (a SuperSpeed device on a USB 2 port runs at high speed).
        Takes effect for the next enumeration; call it while unplugged or before a bus reset."""
        if speed not in self.speeds:
            raise ValueError(f"{self.name} cannot run at {Speed(speed).label}")
        self.speed = Speed(speed)

    # ---- the declaration, per speed -------------------------------------------------------

    def _collect_strings(self) -> dict[str, int]:
        texts = [self.manufacturer, self.product, self.serial_number]
        for config in self.configurations:
            texts.append(config.name)
            texts.extend(i.name for i in config.interfaces)
        table: dict[str, int] = {}
        for text in texts:
            if text and text not in table:
                table[text] = len(table) + 1
        return table

    def string_index(self, text: str | None) -> int:
        return self._strings.get(text, 0) if text else 0

    def _cached(self, key: tuple, build: Callable[[], bytes]) -> bytes:
        blob = self._descriptor_cache.get(key)
        if blob is None:
            blob = self._descriptor_cache[key] = build()
        return blob

    def device_descriptor(self, speed: Speed | None = None) -> bytes:
        speed = self.speed if speed is None else speed
        return self._cached(("device", speed), lambda: DeviceDescriptor.build({
            "bcdUSB": 3.2 if speed >= Speed.SUPER else 2.0,
            "bDeviceClass": self.device_class, "bDeviceSubclass": self.device_subclass,
            "bDeviceProtocol": self.device_protocol,
            "bMaxPacketSize0": 9 if speed >= Speed.SUPER else (8 if speed == Speed.LOW else 64),
            "idVendor": self.vendor_id, "idProduct": self.product_id,
            "bcdDevice": _bcd(self.device_version),
            "iManufacturer": self.string_index(self.manufacturer),
            "iProduct": self.string_index(self.product),
            "iSerialNumber": self.string_index(self.serial_number),
            "bNumConfigurations": len(self.configurations)}))

    def configuration_descriptor(self, index: int, speed: Speed | None = None,
                                 other_speed: bool = False) -> bytes:
        """The configuration with all its interfaces, class descriptors and endpoints."""
        speed = self.speed if speed is None else speed
        return self._cached(("config", index, speed, other_speed),
                            lambda: self._build_configuration(index, speed, other_speed))

    def _build_configuration(self, index: int, speed: Speed, other_speed: bool) -> bytes:
        config = self.configurations[index]
        body = b""
        for iface in sorted(config.interfaces, key=lambda i: (i.number, i.alternate)):
            body += InterfaceDescriptor.build({
                "bInterfaceNumber": iface.number, "bAlternateSetting": iface.alternate,
                "bNumEndpoints": len(iface.endpoints), "bInterfaceClass": iface.cls,
                "bInterfaceSubclass": iface.subclass, "bInterfaceProtocol": iface.protocol,
                "iInterface": self.string_index(iface.name)})
            body += b"".join(iface.class_descriptors)
            body += b"".join(ep.descriptor(speed) for ep in iface.endpoints)
        unit = 8 if speed >= Speed.SUPER else 2     # bMaxPower units: 8 mA SuperSpeed, else 2 mA
        fmt = OtherSpeedConfigurationDescriptor if other_speed else ConfigurationDescriptor
        return fmt.build({
            "wTotalLength": 9 + len(body), "bNumInterfaces": len(config.interface_numbers),
            "bConfigurationValue": config.value,
            "iConfiguration": self.string_index(config.name),
            "bmAttributes": config.attributes,
            "bMaxPower": min(255, -(-config.max_power_ma // unit))}) + body

    def bos_descriptor(self) -> bytes:
        """Binary Object Store (USB 3.2 9.6.2): USB 2.0 extension + SuperSpeed capability."""
        def build():
            caps = USB2ExtensionDescriptor.build({"bmAttributes": 0x2})   # LPM supported
            # speed bits / codes: 0 low, 1 full, 2 high, 3 SuperSpeed
            code = {Speed.LOW: 0, Speed.FULL: 1, Speed.HIGH: 2}
            speeds = 0
            for s in self.speeds:
                speeds |= 1 << code.get(s, 3)
            caps += SuperSpeedUSBDeviceCapabilityDescriptor.build({
                "bmAttributes": 0, "wSpeedsSupported": speeds,
                "bFunctionalitySupport": min(code.get(s, 3) for s in self.speeds),
                "bU1DevExitLat": 0x0A, "wU2DevExitLat": 0x07FF})
            return BinaryObjectStoreDescriptor.build(
                {"wTotalLength": 5 + len(caps), "bNumDeviceCaps": 2}) + caps
        return self._cached(("bos",), build)

    def _other_speed(self) -> Speed | None:
        """The other USB 2.0 speed for device_qualifier / other_speed_configuration: only for
        high-speed capable devices operating at full or high speed (USB 2.0 9.6.2)."""
        if Speed.HIGH not in self.speeds or Speed.FULL not in self.speeds:
            return None
        return {Speed.FULL: Speed.HIGH, Speed.HIGH: Speed.FULL}.get(self.speed)

    def qualifier_descriptor(self) -> bytes | None:
        other = self._other_speed()
        if other is None:
            return None
        return DeviceQualifierDescriptor.build({
            "bcdUSB": 2.0, "bDeviceClass": self.device_class,
            "bDeviceSubclass": self.device_subclass, "bDeviceProtocol": self.device_protocol,
            "bMaxPacketSize0": 64, "bNumConfigurations": len(self.configurations)})

    def string_descriptor(self, index: int) -> bytes | None:
        if index == 0:
            return StringLanguageDescriptor.build({"wLANGID": [LanguageIDs.ENGLISH_US]})
        for text, i in self._strings.items():
            if i == index:
                return StringDescriptor.build({"bString": text[:126]})
        return None

    # ---- state -----------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self.state = DeviceState.DEFAULT
        self.address = 0
        self.configuration: Configuration | None = None
        self.alternates: dict[int, int] = {}
        self._endpoints: dict[int, _EndpointState] = {}
        self.remote_wakeup_enabled = False
        self.u1_enabled = False
        self.u2_enabled = False
        self.ltm_enabled = False
        self.function_suspend: dict[int, int] = {}
        self.sel = b""                  # SET_SEL data: U1SEL, U1PEL, U2SEL, U2PEL
        self.isoch_delay_ns = 0

    @property
    def configuration_value(self) -> int:
        return self.configuration.value if self.configuration else 0

    def endpoint(self, address: int) -> Endpoint | None:
        """The declaration of an endpoint active in the current configuration and settings."""
        ep = self._endpoints.get(address)
        return ep.decl if ep else None

    def is_halted(self, address: int) -> bool:
        ep = self._endpoints.get(address)
        return bool(ep and ep.halted)

    def _select(self, config: Configuration | None) -> None:
        self._drop_all_parked()
        self.configuration = config
        self._endpoints = {}
        self.alternates = {}
        self.function_suspend = {}
        if config is None:
            self.state = DeviceState.ADDRESS
        else:
            self.state = DeviceState.CONFIGURED
            for number in config.interface_numbers:
                self._activate_setting(config.setting(number, 0) or
                                       min((i for i in config.interfaces if i.number == number),
                                           key=lambda i: i.alternate))

    def _activate_setting(self, iface: Interface) -> None:
        for address, ep in list(self._endpoints.items()):
            if ep.interface == iface.number:
                del self._endpoints[address]
        self.alternates[iface.number] = iface.alternate
        for decl in iface.endpoints:
            self._endpoints[decl.address] = _EndpointState(decl, iface.number)

    # ---- hooks for subclasses ---------------------------------------------------------------

    def on_reset(self) -> None:
        """Bus reset or detach: forget function state (the standard state is already reset)."""

    def on_configured(self, config: Configuration | None) -> None:
        """SET_CONFIGURATION selected `config` (None: deconfigured)."""

    def on_interface(self, number: int, alternate: int) -> None:
        """SET_INTERFACE selected an alternate setting."""

    def on_endpoint_reset(self, address: int) -> None:
        """The endpoint's halt was cleared: its data toggle / sequence number starts over."""

    def handle_transfer(self, xfer: UsbTransfer) -> None:
        """Data transfer on an endpoint that has no @on_transfer handler."""
        xfer.complete(Status.STALL)

    def handle_request(self, request: Request):
        """Class/vendor request with no @control_request handler."""
        raise Stall

    # ---- parking: transfers the device answers later ----------------------------------------

    def park(self, xfer: UsbTransfer) -> None:
        """Keep a transfer until the device has something to answer (a NAKing endpoint)."""
        ep = self._endpoints.get(xfer.endpoint)
        if ep is None:      # endpoint went away meanwhile
            xfer.complete(Status.XACT_ERROR)
            return
        ep.parked.append(xfer)

    def unpark(self, address: int) -> UsbTransfer | None:
        """The oldest transfer waiting on an endpoint, removed from the wait list."""
        ep = self._endpoints.get(address)
        return ep.parked.popleft() if ep and ep.parked else None

    def parked(self, address: int) -> int:
        ep = self._endpoints.get(address)
        return len(ep.parked) if ep else 0

    def _drop_all_parked(self) -> None:
        for ep in self._endpoints.values():
            ep.parked.clear()

    def set_halt(self, address: int) -> None:
        """The function halts an endpoint: it STALLs until the host clears the halt."""
        ep = self._endpoints.get(address)
        if ep is None:
            return
        ep.halted = True
        if ep.parked:
            ep.parked.popleft().complete(Status.STALL)

    def wakeup(self) -> None:
        """Signal remote wakeup if the host enabled it (the port ignores it unless suspended)."""
        enabled = self.remote_wakeup_enabled or any(v & 2 for v in self.function_suspend.values())
        if enabled and self.port is not None:
            self.port.remote_wakeup()

    # ---- UsbDevice --------------------------------------------------------------------------

    def bus_reset(self) -> None:
        self._drop_all_parked()
        self._reset_state()
        self._safe_hook(self.on_reset)

    def attached(self, port: PortLink) -> None:
        self.port = port
        self.scheduler = getattr(port, "scheduler", None) or self.scheduler

    def detached(self) -> None:
        self._drop_all_parked()
        self._reset_state()
        self.port = None
        self._safe_hook(self.on_reset)

    def cancel(self, xfer: UsbTransfer) -> bool:
        ep = self._endpoints.get(xfer.endpoint)
        if ep is not None and xfer in ep.parked:
            ep.parked.remove(xfer)
            return True
        return False

    def submit(self, xfer: UsbTransfer) -> None:
        try:
            if xfer.setup is not None or xfer.endpoint & 0x7F == 0:
                self._control(xfer)
            else:
                self._data(xfer)
        except Exception:   # a device bug must not take the controller down
            log.exception("%s: failed on %r", self.name, xfer)
            self.cancel(xfer)
            xfer.complete(Status.STALL)

    def _safe_hook(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s: %s failed", self.name, fn.__name__)

    def _data(self, xfer: UsbTransfer) -> None:
        ep = self._endpoints.get(xfer.endpoint)
        if self.state != DeviceState.CONFIGURED or ep is None:
            xfer.complete(Status.XACT_ERROR)       # nobody answers on that endpoint
            return
        if ep.halted:
            xfer.complete(Status.STALL)
            return
        name = self._transfer_handlers.get(xfer.endpoint)
        if name is None:
            self.handle_transfer(xfer)
        else:
            getattr(self, name)(xfer)

    def _control(self, xfer: UsbTransfer) -> None:
        setup = xfer.setup
        if setup is None or len(setup) != 8:
            xfer.complete(Status.STALL)
            return
        data = b""
        if not setup[0] & 0x80:
            data = bytes(xfer.data or b"")[:int.from_bytes(setup[6:8], "little")]
        request = Request(setup, xfer, data)
        try:
            if request.type == RequestType.STANDARD:
                result = self._standard(request)
            else:
                name = self._request_handlers.get((request.type, request.recipient,
                                                   request.request))
                self._check_recipient(request)
                result = (getattr(self, name)(request) if name is not None
                          else self.handle_request(request))
        except Stall:
            xfer.complete(Status.STALL)
            return
        if result is DEFER:
            return
        if request.is_in:
            xfer.complete(Status.OK, bytes(result or b"")[:request.length])
        else:
            xfer.complete(Status.OK)

    def _check_recipient(self, request: Request) -> None:
        """Interface and endpoint requests need that interface/endpoint in the configuration."""
        if request.recipient == Recipient.INTERFACE:
            if self.state != DeviceState.CONFIGURED or request.interface not in self.alternates:
                raise Stall
        elif request.recipient == Recipient.ENDPOINT:
            if not self._endpoint_valid(request.endpoint):
                raise Stall

    def _endpoint_valid(self, address: int) -> bool:
        if address & 0x7F == 0:
            return True
        return self.state == DeviceState.CONFIGURED and address in self._endpoints

    # ---- chapter 9 -------------------------------------------------------------------------

    _STANDARD_IN = {StandardRequest.GET_STATUS, StandardRequest.GET_DESCRIPTOR,
                    StandardRequest.GET_CONFIGURATION, StandardRequest.GET_INTERFACE,
                    StandardRequest.SYNCH_FRAME}

    def _standard(self, r: Request):
        try:
            req = StandardRequest(r.request)
        except ValueError:
            raise Stall from None
        if r.is_in != (req in self._STANDARD_IN):
            raise Stall
        handler = {
            StandardRequest.GET_DESCRIPTOR: self._get_descriptor,
            StandardRequest.SET_ADDRESS: self._set_address,
            StandardRequest.SET_CONFIGURATION: self._set_configuration,
            StandardRequest.GET_CONFIGURATION: self._get_configuration,
            StandardRequest.SET_INTERFACE: self._set_interface,
            StandardRequest.GET_INTERFACE: self._get_interface,
            StandardRequest.GET_STATUS: self._get_status,
            StandardRequest.SET_FEATURE: self._set_feature,
            StandardRequest.CLEAR_FEATURE: self._clear_feature,
            StandardRequest.SET_SEL: self._set_sel,
            StandardRequest.SET_ISOCH_DELAY: self._set_isoch_delay,
            StandardRequest.SYNCH_FRAME: self._synch_frame,
        }.get(req)
        if handler is None:
            raise Stall
        return handler(r)

    def _get_descriptor(self, r: Request) -> bytes:
        kind, index = r.value >> 8, r.value & 0xFF
        if r.recipient == Recipient.INTERFACE:
            self._check_recipient(r)
            iface = self.configuration.setting(r.interface, self.alternates[r.interface])
            blob = iface.requestable.get(kind) if iface else None
            if blob is None:
                raise Stall
            return blob
        if r.recipient != Recipient.DEVICE:
            raise Stall
        blob = None
        if kind == DescriptorType.DEVICE:
            blob = self.device_descriptor()
        elif kind == DescriptorType.CONFIGURATION:
            if index < len(self.configurations):
                blob = self.configuration_descriptor(index)
        elif kind == DescriptorType.STRING:
            blob = self.string_descriptor(index)
        elif kind == DescriptorType.BOS:
            if self.speed >= Speed.SUPER:
                blob = self.bos_descriptor()
        elif kind == DescriptorType.DEVICE_QUALIFIER:
            blob = self.qualifier_descriptor()
        elif kind == DescriptorType.OTHER_SPEED_CONFIGURATION:
            other = self._other_speed()
            if other is not None and index < len(self.configurations):
                blob = self.configuration_descriptor(index, other, other_speed=True)
        if blob is None:
            raise Stall
        return blob

    def _set_address(self, r: Request) -> None:
        if (r.recipient != Recipient.DEVICE or r.value > 127 or r.index or r.length
                or self.state == DeviceState.CONFIGURED):
            raise Stall
        self.address = r.value
        self.state = DeviceState.ADDRESS if r.value else DeviceState.DEFAULT

    def _set_configuration(self, r: Request) -> None:
        if r.recipient != Recipient.DEVICE or self.state == DeviceState.DEFAULT or r.value > 0xFF:
            raise Stall
        if r.value == 0:
            config = None
        else:
            config = next((c for c in self.configurations if c.value == r.value), None)
            if config is None:
                raise Stall
        self._select(config)
        self._safe_hook(self.on_configured, config)

    def _get_configuration(self, r: Request) -> bytes:
        if r.recipient != Recipient.DEVICE or self.state == DeviceState.DEFAULT:
            raise Stall
        return bytes([self.configuration_value])

    def _set_interface(self, r: Request) -> None:
        if r.recipient != Recipient.INTERFACE:
            raise Stall
        self._check_recipient(r)
        iface = self.configuration.setting(r.interface, r.value)
        if iface is None:
            raise Stall
        for ep in self._endpoints.values():
            if ep.interface == r.interface:
                ep.parked.clear()
        self._activate_setting(iface)
        self._safe_hook(self.on_interface, r.interface, r.value)

    def _get_interface(self, r: Request) -> bytes:
        if r.recipient != Recipient.INTERFACE:
            raise Stall
        self._check_recipient(r)
        return bytes([self.alternates[r.interface]])

    def _get_status(self, r: Request) -> bytes:
        if r.length < 2:
            raise Stall
        if r.recipient == Recipient.DEVICE:
            config = self.configuration or (self.configurations[0] if self.configurations else None)
            bits = (1 if config and config.self_powered else 0) | \
                   (2 if self.remote_wakeup_enabled else 0)
            if self.speed >= Speed.SUPER:
                bits |= (4 if self.u1_enabled else 0) | (8 if self.u2_enabled else 0) | \
                        (16 if self.ltm_enabled else 0)
            return bits.to_bytes(2, "little")
        if r.recipient == Recipient.INTERFACE:
            self._check_recipient(r)
            bits = 0
            if self.speed >= Speed.SUPER and self.configuration.remote_wakeup:
                bits = 1 | (2 if self.function_suspend.get(r.interface, 0) & 2 else 0)
            return bits.to_bytes(2, "little")
        if r.recipient == Recipient.ENDPOINT:
            if not self._endpoint_valid(r.endpoint):
                raise Stall
            return (1 if self.is_halted(r.endpoint) else 0).to_bytes(2, "little")
        raise Stall

    def _feature(self, r: Request, on: bool) -> None:
        if r.length:
            raise Stall
        if r.recipient == Recipient.DEVICE:
            feature = r.value
            if feature == DeviceFeature.DEVICE_REMOTE_WAKEUP:
                # SuperSpeed hosts use FUNCTION_SUSPEND instead, but some still send this
                self.remote_wakeup_enabled = on
            elif feature == DeviceFeature.TEST_MODE and on and self.speed == Speed.HIGH:
                log.info("%s: host selected USB 2.0 test mode %d (ignored)", self.name,
                         r.index >> 8)
            elif (feature in (DeviceFeature.U1_ENABLE, DeviceFeature.U2_ENABLE,
                              DeviceFeature.LTM_ENABLE)
                  and self.speed >= Speed.SUPER and self.state == DeviceState.CONFIGURED):
                attr = {DeviceFeature.U1_ENABLE: "u1_enabled", DeviceFeature.U2_ENABLE:
                        "u2_enabled", DeviceFeature.LTM_ENABLE: "ltm_enabled"}[feature]
                setattr(self, attr, on)
            else:
                raise Stall
        elif r.recipient == Recipient.INTERFACE:
            if r.value != InterfaceFeature.FUNCTION_SUSPEND or self.speed < Speed.SUPER:
                raise Stall
            self._check_recipient(r)
            self.function_suspend[r.interface] = (r.index >> 8) & 3 if on else 0
        elif r.recipient == Recipient.ENDPOINT:
            if r.value != EndpointFeature.ENDPOINT_HALT or not self._endpoint_valid(r.endpoint):
                raise Stall
            if r.endpoint & 0x7F == 0:
                return          # EP0 halt: nothing to keep, the next SETUP clears it anyway
            ep = self._endpoints[r.endpoint]
            if on:
                self.set_halt(r.endpoint)
            else:
                ep.halted = False
                self._safe_hook(self.on_endpoint_reset, r.endpoint)
        else:
            raise Stall

    def _set_feature(self, r: Request) -> None:
        self._feature(r, True)

    def _clear_feature(self, r: Request) -> None:
        self._feature(r, False)

    def _set_sel(self, r: Request) -> None:
        if (r.recipient != Recipient.DEVICE or self.speed < Speed.SUPER or r.length != 6
                or self.state == DeviceState.DEFAULT or len(r.data) != 6):
            raise Stall
        self.sel = r.data

    def _set_isoch_delay(self, r: Request) -> None:
        if r.recipient != Recipient.DEVICE or self.speed < Speed.SUPER or r.length or r.index:
            raise Stall
        self.isoch_delay_ns = r.value

    def _synch_frame(self, r: Request) -> bytes:
        if r.recipient != Recipient.ENDPOINT or r.length != 2:
            raise Stall
        decl = self.endpoint(r.endpoint)
        if decl is None or decl.type != EpType.ISOCHRONOUS:
            raise Stall
        return b"\0\0"

    # ---- presentation ---------------------------------------------------------------------

    def describe(self) -> str:
        who = f"{self.product or self.name} [{self.vendor_id:04x}:{self.product_id:04x}]"
        if self.manufacturer:
            who += f" by {self.manufacturer}"
        state = {DeviceState.DEFAULT: "default", DeviceState.ADDRESS: f"address {self.address}",
                 DeviceState.CONFIGURED: f"address {self.address}, configuration "
                                         f"{self.configuration_value}"}[self.state]
        return f"{who}, {self.speed.label}, {state}"

    def __str__(self) -> str:
        return self.describe()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
