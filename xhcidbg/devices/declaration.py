"""What a virtual device declares: its tree of configurations, interfaces and endpoints, and the
decorators that name its handlers.

A device class lists its configurations as small immutable objects (`Configuration` >
`Interface` > `EndpointDecl`) and marks methods as handlers of data transfers (`on_transfer`) or
of class and vendor control requests (`control_request`).  One declaration serves every speed
the device runs at: `EndpointDecl` knows what it means at each speed (packet size, bInterval),
`DescriptorSet` turns the tree into descriptor bytes and `StandardDevice` runs it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, Literal, Protocol, TypeVar

from .base import EpType, Speed, UsbTransfer
from .descriptors import SETUP_PACKET, Recipient, RequestType

__all__ = ["DEFER", "Configuration", "DeviceDeclaration", "EndpointDecl", "Interface", "Request",
           "RequestHandler", "RequestKey", "RequestResult", "Stall", "TransferHandler",
           "control_request", "declared_handlers", "on_transfer"]


# Largest wMaxPacketSize each speed allows, per transfer type (USB 2.0 5.5-5.8, USB 3.2 8.6).
_MAX_PACKET: dict[Speed, dict[EpType, int]] = {
    Speed.LOW: {EpType.CONTROL: 8, EpType.INTERRUPT: 8},
    Speed.FULL: {EpType.CONTROL: 64, EpType.BULK: 64, EpType.INTERRUPT: 64,
                 EpType.ISOCHRONOUS: 1023},
    Speed.HIGH: {EpType.CONTROL: 64, EpType.BULK: 512, EpType.INTERRUPT: 1024,
                 EpType.ISOCHRONOUS: 1024},
    Speed.SUPER: {EpType.CONTROL: 512, EpType.BULK: 1024, EpType.INTERRUPT: 1024,
                  EpType.ISOCHRONOUS: 1024},
}
_MAX_PACKET[Speed.SUPER_PLUS] = _MAX_PACKET[Speed.SUPER]


def operating_speed(speed: Speed) -> Speed:
    """The speed whose descriptor rules apply: SuperSpeedPlus uses the SuperSpeed ones."""
    return Speed.SUPER if speed >= Speed.SUPER else speed


@dataclass(frozen=True, eq=False)
class EndpointDecl:
    """The declaration of one endpoint of an interface alternate setting.

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
    hs_mult: int = 0             # high speed, periodic: extra transactions per microframe (0-2),
                                 # carried in wMaxPacketSize bits 12:11 (USB 2.0 9.6.6)

    @property
    def is_in(self) -> bool:
        return bool(self.address & 0x80)

    @property
    def number(self) -> int:
        return self.address & 0x0F

    def max_packet_for(self, speed: Speed) -> int:
        """wMaxPacketSize at this speed."""
        top = _MAX_PACKET[speed].get(self.type, 0)
        if self.type == EpType.BULK and speed >= Speed.HIGH:
            return top
        declared = self.max_packet
        if isinstance(declared, Mapping):
            declared = declared.get(speed, declared.get(operating_speed(speed)))
        return top if declared is None else max(0, min(int(declared), top))

    def interval_for(self, speed: Speed) -> int:
        """bInterval at this speed."""
        if self.type in (EpType.BULK, EpType.CONTROL):
            return 0
        period = max(1, int(self.interval_us))
        if self.type == EpType.INTERRUPT and speed in (Speed.FULL, Speed.LOW):
            return max(1, min(255, period // 1000))
        unit = 1000 if speed in (Speed.FULL, Speed.LOW) else 125
        exponent = max(1, period // unit).bit_length()      # floor(log2(periods)) + 1
        return max(1, min(16, exponent))

    def bytes_per_interval(self, speed: Speed) -> int:
        """What a periodic endpoint moves per service interval (0 for bulk and control)."""
        if self.type not in (EpType.INTERRUPT, EpType.ISOCHRONOUS):
            return 0
        if speed == Speed.HIGH:
            return self.max_packet_for(speed) * (self.hs_mult + 1)
        mult = (self.ss_attributes & 3) + 1 if self.type == EpType.ISOCHRONOUS else 1
        return self.max_packet_for(speed) * (self.max_burst + 1) * mult


@dataclass(frozen=True, eq=False)
class Interface:
    """One alternate setting of an interface.

    `class_descriptors` follow the interface descriptor inside the configuration (a HID
    descriptor, for instance); `requestable` answers GET_DESCRIPTOR addressed to the interface,
    by descriptor type (the HID and report descriptors)."""

    number: int
    endpoints: tuple[EndpointDecl, ...] = ()
    alternate: int = 0
    cls: int = 0xFF
    subclass: int = 0
    protocol: int = 0
    name: str | None = None
    class_descriptors: tuple[bytes, ...] = ()
    requestable: Mapping[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # any iterable is accepted; stored as tuples so the declaration stays immutable
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

    def __post_init__(self) -> None:
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
        """bmAttributes: bit 7 always set, self-powered, remote wakeup."""
        return 0x80 | (0x40 if self.self_powered else 0) | (0x20 if self.remote_wakeup else 0)


class DeviceDeclaration(Protocol):
    """The device level of the tree, which a `StandardDevice` subclass declares as class
    attributes (the serial number may be set per instance before `StandardDevice.__init__`)."""

    vendor_id: int
    product_id: int
    device_version: int           # bcdDevice
    device_class: int
    device_subclass: int
    device_protocol: int
    manufacturer: str | None
    product: str | None
    serial_number: str | None
    speeds: tuple[Speed, ...]
    configurations: tuple[Configuration, ...]


# ---- handlers ------------------------------------------------------------------------------

class Stall(Exception):
    """Raised by a request handler to answer with STALL (a request error)."""


class _Deferred(Enum):
    DEFER = "DEFER"


DEFER: Final = _Deferred.DEFER   # returned by a handler that keeps the transfer, completes it later

# What a control request handler returns: the IN data, None (an OUT request accepted), or DEFER.
RequestResult = bytes | None | Literal[_Deferred.DEFER]


class Request:
    """A decoded control request as handlers see it."""

    __slots__ = ("data", "index", "length", "request", "request_type", "value", "xfer")

    def __init__(self, setup: bytes, xfer: UsbTransfer | None = None, data: bytes = b""):
        s = SETUP_PACKET.parse(bytes(setup))
        rt = s.bmRequestType
        self.request_type: int = rt.direction << 7 | rt.type << 5 | rt.recipient
        self.request: int = s.bRequest
        self.value: int = s.wValue
        self.index: int = s.wIndex
        self.length: int = s.wLength
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


# Handlers are methods of any device class, hence the unconstrained `self` (Any).
TransferHandler = Callable[[Any, UsbTransfer], None]
RequestHandler = Callable[[Any, Request], RequestResult]
_T = TypeVar("_T", bound=TransferHandler)
_R = TypeVar("_R", bound=RequestHandler)

# (request type, recipient, bRequest): what a control request handler answers
RequestKey = tuple[int, int, int]

_TRANSFER_MARK = "_usb_endpoints"
_REQUEST_MARK = "_usb_requests"


def on_transfer(*addresses: int) -> Callable[[_T], _T]:
    """Mark a method as the handler of data transfers on these endpoint addresses."""
    def mark(fn: _T) -> _T:
        setattr(fn, _TRANSFER_MARK, addresses)
        return fn
    return mark


def control_request(*requests: int, type: int = RequestType.CLASS,
                    recipient: int = Recipient.INTERFACE) -> Callable[[_R], _R]:
    """Mark a method as the handler of class/vendor control requests.  It is called with a
    `Request` and returns the IN data (bytes), None (OUT: accepted), or DEFER; it raises
    `Stall` to refuse."""
    def mark(fn: _R) -> _R:
        setattr(fn, _REQUEST_MARK, [(int(type), int(recipient), int(r)) for r in requests])
        return fn
    return mark


def declared_handlers(cls: type) -> tuple[dict[int, str], dict[RequestKey, str]]:
    """The method names a class (with its bases) marked as handlers: by endpoint address, and
    by request.  A subclass's mark overrides its base's."""
    transfers: dict[int, str] = {}
    requests: dict[RequestKey, str] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            for address in getattr(value, _TRANSFER_MARK, ()):
                transfers[address] = name
            for key in getattr(value, _REQUEST_MARK, ()):
                requests[key] = name
    return transfers, requests
