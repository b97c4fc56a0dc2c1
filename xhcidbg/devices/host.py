"""Drive a device the way a host controller would, without one.

`DirectHost` builds real `UsbTransfer`s and hands them to `UsbDevice.submit`: control requests
with a SETUP packet (and OUT data stage), data transfers on endpoints.  Tests use it, and the
console can use it to poke a device that is not plugged into the controller.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import EpType, Status, UsbDevice, UsbTransfer
from .descriptors import (
    ConfigurationDescriptor,
    DescriptorType,
    DeviceDescriptor,
    StandardRequest,
    StringDescriptor,
    StringLanguageDescriptor,
    setup_packet,
)


class TransferError(Exception):
    def __init__(self, xfer: UsbTransfer):
        status = xfer.status.name if xfer.status is not None else "pending"
        super().__init__(f"{xfer!r} ended {status}")
        self.xfer = xfer
        self.status = xfer.status


@dataclass
class Enumeration:
    """What the standard enumeration sequence learned."""

    device: object                       # parsed device descriptor
    configuration: bytes                 # full configuration descriptor blob
    strings: dict[int, str] = field(default_factory=dict)
    languages: list[int] = field(default_factory=list)


class DirectHost:
    def __init__(self, device: UsbDevice):
        self.device = device

    # ---- control ----------------------------------------------------------------------

    def control(self, request_type: int, request: int, value: int = 0, index: int = 0,
                length: int = 0, data: bytes | None = None) -> UsbTransfer:
        """Submit one control transfer; returns it (completed or still pending)."""
        if data is not None and not request_type & 0x80:
            length = len(data)
        xfer = UsbTransfer(0, EpType.CONTROL, length,
                           setup=setup_packet(request_type, request, value, index, length),
                           data=data)
        self.device.submit(xfer)
        return xfer

    def control_in(self, request_type: int, request: int, value: int = 0, index: int = 0,
                   length: int = 0) -> bytes:
        xfer = self.control(request_type | 0x80, request, value, index, length)
        if xfer.status != Status.OK:
            raise TransferError(xfer)
        return bytes(xfer.result)

    def control_out(self, request_type: int, request: int, value: int = 0, index: int = 0,
                    data: bytes = b"") -> None:
        xfer = self.control(request_type & 0x7F, request, value, index, data=data)
        if xfer.status != Status.OK:
            raise TransferError(xfer)

    def get_descriptor(self, kind: int, index: int = 0, length: int = 255, lang: int = 0,
                       recipient: int = 0) -> bytes:
        return self.control_in(0x80 | recipient, StandardRequest.GET_DESCRIPTOR,
                               kind << 8 | index, lang, length)

    def set_configuration(self, value: int) -> None:
        self.control_out(0x00, StandardRequest.SET_CONFIGURATION, value)

    def set_interface(self, interface: int, alternate: int) -> None:
        self.control_out(0x01, StandardRequest.SET_INTERFACE, alternate, interface)

    def clear_halt(self, endpoint: int) -> None:
        self.control_out(0x02, StandardRequest.CLEAR_FEATURE, 0, endpoint)

    def enumerate(self, address: int = 1, configuration: int | None = 1) -> Enumeration:
        """Bus reset, then the sequence a host runs: device descriptor (8 then 18 bytes),
        SET_ADDRESS, configuration (9 bytes then all), strings, SET_CONFIGURATION."""
        self.device.bus_reset()
        head = DeviceDescriptor.Partial.parse(self.get_descriptor(DescriptorType.DEVICE,
                                                                  length=8))
        if head.bMaxPacketSize0 not in (8, 9, 16, 32, 64):
            raise ValueError(f"bad bMaxPacketSize0 {head.bMaxPacketSize0}")
        self.control_out(0x00, StandardRequest.SET_ADDRESS, address)
        device = DeviceDescriptor.parse(self.get_descriptor(DescriptorType.DEVICE, length=18))
        config9 = ConfigurationDescriptor.parse(
            self.get_descriptor(DescriptorType.CONFIGURATION, 0, 9))
        config = self.get_descriptor(DescriptorType.CONFIGURATION, 0, config9.wTotalLength)
        languages = list(StringLanguageDescriptor.parse(
            self.get_descriptor(DescriptorType.STRING, 0)).wLANGID)
        strings = {}
        for i in (device.iManufacturer, device.iProduct, device.iSerialNumber):
            if i:
                strings[i] = StringDescriptor.parse(
                    self.get_descriptor(DescriptorType.STRING, i, lang=languages[0])).bString
        if configuration is not None:
            self.set_configuration(configuration)
        return Enumeration(device, config, strings, languages)

    # ---- data endpoints -----------------------------------------------------------------

    def _ep_type(self, endpoint: int) -> EpType:
        decl = getattr(self.device, "endpoint", lambda a: None)(endpoint)
        return decl.type if decl is not None else EpType.BULK

    def submit_in(self, endpoint: int, length: int) -> UsbTransfer:
        xfer = UsbTransfer(endpoint | 0x80, self._ep_type(endpoint | 0x80), length)
        self.device.submit(xfer)
        return xfer

    def submit_out(self, endpoint: int, data: bytes) -> UsbTransfer:
        xfer = UsbTransfer(endpoint & 0x7F, self._ep_type(endpoint & 0x7F), len(data), data=data)
        self.device.submit(xfer)
        return xfer

    def read(self, endpoint: int, length: int) -> bytes:
        """An IN transfer that must complete at once with OK."""
        xfer = self.submit_in(endpoint, length)
        if not xfer.done or xfer.status != Status.OK:
            raise TransferError(xfer)
        return bytes(xfer.result)

    def write(self, endpoint: int, data: bytes) -> int:
        xfer = self.submit_out(endpoint, data)
        if not xfer.done or xfer.status != Status.OK:
            raise TransferError(xfer)
        return xfer.actual
