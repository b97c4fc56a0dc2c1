"""Common behaviour of the HID devices (HID 1.11 chapter 7).

`HidDevice` answers the HID class requests (GET/SET_REPORT, GET/SET_IDLE, GET/SET_PROTOCOL) and
the HID/report GET_DESCRIPTOR on its interface, and runs the interrupt IN endpoint: a submitted
transfer waits (the endpoint NAKs) until a new report is queued, and is completed from whatever
code queued it -- the device's API, which runs on the controller's loop.  With a non-zero idle
rate and a scheduler from the port, the current report is repeated every idle period.
"""
from __future__ import annotations

import logging
from collections import deque
from enum import IntEnum

from .base import Speed, Status, UsbTransfer
from .declaration import Configuration, EndpointDecl, Interface, Request, Stall, control_request
from .descriptors import DescriptorType
from .hid import hid_descriptor
from .standard import Cancellable, StandardDevice

log = logging.getLogger(__name__)

HID_CLASS = 0x03


class HidRequest(IntEnum):
    GET_REPORT = 0x01
    GET_IDLE = 0x02
    GET_PROTOCOL = 0x03
    SET_REPORT = 0x09
    SET_IDLE = 0x0A
    SET_PROTOCOL = 0x0B


class ReportType(IntEnum):
    INPUT = 1
    OUTPUT = 2
    FEATURE = 3


class Protocol(IntEnum):
    BOOT = 0
    REPORT = 1


IDLE_UNIT_NS = 4_000_000          # SET_IDLE durations count 4 ms units


def hid_interface(number: int, report: bytes, endpoints: tuple[EndpointDecl, ...], *,
                  subclass: int = 0, protocol: int = 0, name: str | None = None) -> Interface:
    """An interface of the HID class: the HID descriptor sits in the configuration, and both
    it and the report descriptor answer GET_DESCRIPTOR on the interface."""
    hid = hid_descriptor(report)
    return Interface(number, endpoints, cls=HID_CLASS, subclass=subclass, protocol=protocol,
                     name=name, class_descriptors=(hid,),
                     requestable={DescriptorType.HID: hid, DescriptorType.REPORT: report})


class HidDevice(StandardDevice):
    """Base of HID devices with one interface and one interrupt IN endpoint."""

    hid_interface_number = 0
    interrupt_in = 0x81
    default_idle = 0              # 4 ms units; 0 = report only on change
    max_queued_reports = 4096

    def __init__(self, speed: Speed | None = None):
        self._reports: deque[bytes] = deque()
        self._idle_timer: Cancellable | None = None
        self.protocol = Protocol.REPORT
        self.idle = self.default_idle
        super().__init__(speed)

    # ---- what subclasses provide -----------------------------------------------------------

    def input_report(self) -> bytes:
        """The report describing the current state (GET_REPORT, idle repeats)."""
        raise NotImplementedError

    def set_output_report(self, data: bytes) -> None:
        """SET_REPORT(Output) or an interrupt OUT report; STALL by default."""
        raise Stall

    def get_output_report(self) -> bytes:
        raise Stall

    # ---- reports ---------------------------------------------------------------------------

    def queue_report(self, report: bytes, replace_last: bool = False) -> None:
        """Send a report: completes the waiting IN transfer, or queues it for the next poll.
        `replace_last` lets a pointer coalesce motion the host has not fetched yet."""
        if self.configuration is None:
            return          # nobody listens before the host configures the device
        xfer = self.unpark(self.interrupt_in)
        if xfer is not None:
            self._send(xfer, report)
            return
        if replace_last and self._reports:
            self._reports[-1] = report
        else:
            if len(self._reports) >= self.max_queued_reports:
                self._reports.popleft()
                log.warning("%s: report queue full, oldest report dropped", self.name)
            self._reports.append(report)
        self.wakeup()

    @property
    def queued_reports(self) -> int:
        return len(self._reports)

    def last_queued_report(self) -> bytes | None:
        return self._reports[-1] if self._reports else None

    def _send(self, xfer: UsbTransfer, report: bytes) -> None:
        self._restart_idle_timer()
        xfer.complete(Status.OK, report)

    def handle_transfer(self, xfer: UsbTransfer) -> None:
        if xfer.endpoint != self.interrupt_in:
            if not xfer.is_in:                  # interrupt OUT carries output reports
                try:
                    self.set_output_report(bytes(xfer.data or b""))
                except Stall:
                    xfer.complete(Status.STALL)
                    return
                xfer.complete(Status.OK)
                return
            xfer.complete(Status.STALL)
            return
        if self._reports:
            self._send(xfer, self._reports.popleft())
            return
        self.park(xfer)
        if self._idle_timer is None:
            self._restart_idle_timer()

    def _restart_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.idle and self.scheduler is not None and self.configuration is not None:
            self._idle_timer = self.scheduler.call_later(self.idle * IDLE_UNIT_NS, self._idle_due)

    def _idle_due(self) -> None:
        """Idle period over without a change: repeat the current state (HID 7.2.4)."""
        self._idle_timer = None
        if self.configuration is None:
            return
        xfer = self.unpark(self.interrupt_in)
        if xfer is not None:
            self._send(xfer, self.input_report())
        elif not self._reports:
            self._reports.append(self.input_report())

    def on_reset(self) -> None:
        self._reports.clear()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.protocol = Protocol.REPORT
        self.idle = self.default_idle

    def on_configured(self, config: Configuration | None) -> None:
        self._reports.clear()

    # ---- class requests --------------------------------------------------------------------

    def _own(self, r: Request) -> None:
        if r.interface != self.hid_interface_number:
            raise Stall

    @control_request(HidRequest.GET_REPORT)
    def _get_report(self, r: Request) -> bytes:
        self._own(r)
        kind = r.value >> 8
        if kind == ReportType.INPUT:
            return self.input_report()
        if kind == ReportType.OUTPUT:
            return self.get_output_report()
        raise Stall

    @control_request(HidRequest.SET_REPORT)
    def _set_report(self, r: Request) -> None:
        self._own(r)
        if r.value >> 8 != ReportType.OUTPUT:
            raise Stall
        self.set_output_report(r.data)

    @control_request(HidRequest.GET_IDLE)
    def _get_idle(self, r: Request) -> bytes:
        self._own(r)
        return bytes([self.idle])

    @control_request(HidRequest.SET_IDLE)
    def _set_idle(self, r: Request) -> None:
        self._own(r)
        self.idle = r.value >> 8
        self._restart_idle_timer()

    @control_request(HidRequest.GET_PROTOCOL)
    def _get_protocol(self, r: Request) -> bytes:
        self._own(r)
        return bytes([self.protocol])

    @control_request(HidRequest.SET_PROTOCOL)
    def _set_protocol(self, r: Request) -> None:
        self._own(r)
        if r.value not in (Protocol.BOOT, Protocol.REPORT):
            raise Stall
        self.protocol = Protocol(r.value)
