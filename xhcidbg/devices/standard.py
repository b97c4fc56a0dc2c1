"""A virtual device that runs its declaration and answers the standard requests (USB 2.0 and
USB 3.2 chapter 9) the way real devices do.

A device class names itself and declares its configurations (see `declaration`):

    class Gadget(StandardDevice):
        vendor_id, product_id = 0x1209, 0x0001
        manufacturer, product = "xhcidbg", "Gadget"
        speeds = (Speed.FULL, Speed.HIGH, Speed.SUPER)
        configurations = (
            Configuration(1, interfaces=(
                Interface(0, cls=0xFF, endpoints=(
                    EndpointDecl(0x81, EpType.BULK), EndpointDecl(0x01, EpType.BULK))),)),)

        @on_transfer(0x81)
        def source(self, xfer): xfer.complete(data=b"...")

        @control_request(0x5C, type=RequestType.VENDOR, recipient=Recipient.DEVICE)
        def read_buffer(self, request): return self.buffer

`StandardDevice` keeps the chapter 9 state (address, configuration, alternate settings, halts,
features), answers GET_DESCRIPTOR from the device's `DescriptorSet` at the speed it runs at,
and dispatches class and vendor requests and data transfers to the decorated methods.
Anything unsupported STALLs.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from enum import IntEnum
from typing import ClassVar, ParamSpec, Protocol, runtime_checkable

from .base import EpType, PortLink, Speed, Status, UsbDevice, UsbTransfer
from .declaration import (
    DEFER,
    Configuration,
    EndpointDecl,
    Interface,
    Request,
    RequestKey,
    RequestResult,
    Stall,
    declared_handlers,
)
from .descriptor_set import DescriptorSet
from .descriptors import (
    DescriptorType,
    DeviceFeature,
    EndpointFeature,
    InterfaceFeature,
    Recipient,
    RequestType,
    StandardRequest,
)

log = logging.getLogger(__name__)

__all__ = ["Cancellable", "Clock", "DeviceState", "StandardDevice"]

_P = ParamSpec("_P")


class DeviceState(IntEnum):
    """USB 2.0 9.1.1 visible device states, from the port's point of view."""

    DEFAULT = 1       # after a bus reset: address 0
    ADDRESS = 2
    CONFIGURED = 3


class Cancellable(Protocol):
    def cancel(self) -> None: ...


@runtime_checkable
class Clock(Protocol):
    """What a device asks of the controller's scheduler (`xhcidbg.emu.timing.Scheduler`): a
    callback after a delay, which it may cancel."""

    def call_later(self, delay_ns: int, fn: Callable[[], None]) -> Cancellable: ...


class _EndpointState:
    """An endpoint of the active settings: its declaration, halt, and the transfers it holds."""

    __slots__ = ("decl", "halted", "interface", "parked")

    def __init__(self, decl: EndpointDecl, interface: int):
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

    # method names of the @on_transfer / @control_request handlers, collected per class
    _transfer_handlers: ClassVar[dict[int, str]] = {}
    _request_handlers: ClassVar[dict[RequestKey, str]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._transfer_handlers, cls._request_handlers = declared_handlers(cls)

    def __init__(self, speed: Speed | None = None):
        speed = Speed(self.default_speed if speed is None else speed)
        if speed not in self.speeds:
            raise ValueError(f"{type(self).__name__} does not run at {speed.label}; it supports "
                             + ", ".join(s.label for s in self.speeds))
        self.speed = speed
        self.port: PortLink | None = None
        self.scheduler: Clock | None = None     # the controller's clock, when the port offers it
        self.descriptors = DescriptorSet(self)
        self._reset_state()

    def supports(self, speed: Speed) -> bool:
        return speed in self.speeds

    def set_speed(self, speed: Speed) -> None:
        """Run at another speed (a SuperSpeed device on a USB 2 port runs at high speed).
        Takes effect for the next enumeration; call it while unplugged or before a bus reset."""
        if speed not in self.speeds:
            raise ValueError(f"{self.name} cannot run at {Speed(speed).label}")
        self.speed = Speed(speed)

    # ---- descriptors at the speed the device runs at ----------------------------------------

    def device_descriptor(self, speed: Speed | None = None) -> bytes:
        return self.descriptors.device(self.speed if speed is None else speed)

    def configuration_descriptor(self, index: int, speed: Speed | None = None,
                                 other_speed: bool = False) -> bytes:
        """The configuration with all its interfaces, class descriptors and endpoints."""
        return self.descriptors.configuration(index, self.speed if speed is None else speed,
                                              other_speed)

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

    def endpoint(self, address: int) -> EndpointDecl | None:
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

    def handle_request(self, request: Request) -> RequestResult:
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
        # PortLink does not declare a clock; the controller's root ports offer theirs
        clock = getattr(port, "scheduler", None)
        if isinstance(clock, Clock):
            self.scheduler = clock

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

    def _safe_hook(self, fn: Callable[_P, None], *args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            fn(*args, **kwargs)
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
        result: RequestResult
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
            self._interface_owner(request)
        elif request.recipient == Recipient.ENDPOINT and not self._endpoint_valid(request.endpoint):
            raise Stall

    def _interface_owner(self, request: Request) -> Configuration:
        """The configuration holding the interface a request addresses; STALL if none does."""
        config = self.configuration
        if (self.state != DeviceState.CONFIGURED or config is None
                or request.interface not in self.alternates):
            raise Stall
        return config

    def _endpoint_valid(self, address: int) -> bool:
        if address & 0x7F == 0:
            return True
        return self.state == DeviceState.CONFIGURED and address in self._endpoints

    # ---- chapter 9 -------------------------------------------------------------------------

    # the standard requests with an IN data stage
    _STANDARD_IN: ClassVar[frozenset[StandardRequest]] = frozenset({
        StandardRequest.GET_STATUS, StandardRequest.GET_DESCRIPTOR,
        StandardRequest.GET_CONFIGURATION, StandardRequest.GET_INTERFACE,
        StandardRequest.SYNCH_FRAME})

    def _standard(self, r: Request) -> bytes | None:
        try:
            req = StandardRequest(r.request)
        except ValueError:
            raise Stall from None
        if r.is_in != (req in self._STANDARD_IN):
            raise Stall
        handlers: dict[StandardRequest, Callable[[Request], bytes | None]] = {
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
        }
        handler = handlers.get(req)
        if handler is None:
            raise Stall
        return handler(r)

    def _get_descriptor(self, r: Request) -> bytes:
        kind, index = r.value >> 8, r.value & 0xFF
        if r.recipient == Recipient.INTERFACE:
            iface = self._interface_owner(r).setting(r.interface, self.alternates[r.interface])
            blob = iface.requestable.get(kind) if iface else None
            if blob is None:
                raise Stall
            return blob
        if r.recipient != Recipient.DEVICE:
            raise Stall
        descriptors = self.descriptors
        blob = None
        if kind == DescriptorType.DEVICE:
            blob = self.device_descriptor()
        elif kind == DescriptorType.CONFIGURATION:
            if index < len(self.configurations):
                blob = self.configuration_descriptor(index)
        elif kind == DescriptorType.STRING:
            blob = descriptors.string(index)
        elif kind == DescriptorType.BOS:
            if self.speed >= Speed.SUPER:
                blob = descriptors.bos()
        elif kind == DescriptorType.DEVICE_QUALIFIER:
            blob = descriptors.qualifier(self.speed)
        elif kind == DescriptorType.OTHER_SPEED_CONFIGURATION:
            other = descriptors.other_speed(self.speed)
            if other is not None and index < len(self.configurations):
                blob = descriptors.configuration(index, other, other_speed=True)
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
        iface = self._interface_owner(r).setting(r.interface, r.value)
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
            config = self._interface_owner(r)
            bits = 0
            if self.speed >= Speed.SUPER and config.remote_wakeup:
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
            elif self.speed < Speed.SUPER or self.state != DeviceState.CONFIGURED:
                raise Stall     # link power management: SuperSpeed, configured devices only
            elif feature == DeviceFeature.U1_ENABLE:
                self.u1_enabled = on
            elif feature == DeviceFeature.U2_ENABLE:
                self.u2_enabled = on
            elif feature == DeviceFeature.LTM_ENABLE:
                self.ltm_enabled = on
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
