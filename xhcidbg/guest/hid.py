"""HID class requests and input reports over the scripted driver (HID 1.11 section 7)."""
from __future__ import annotations

from ..devices.hid_device import HID_CLASS, HidRequest, Protocol, ReportType
from .descriptors import HID_REPORT
from .device import Device, OnComplete, Transfer
from .errors import XhciError, XhciTimeout


class HidInterface:
    """One HID interface of a configured device and its interrupt IN endpoint."""

    def __init__(self, dev: Device, interface: int | None = None):
        self.dev = dev
        for i in dev.chosen_config().active_interfaces(dev.alternates):
            if (interface is None and i.interface_class == HID_CLASS) or i.number == interface:
                self.interface = i.number
                ins = [e for e in i.endpoints if e.transfer_type == 3 and e.is_in]
                if not ins:
                    raise XhciError(f"HID interface {i.number} has no interrupt IN endpoint")
                self.ep_in = ins[0].address
                self.report_size = ins[0].max_packet
                break
        else:
            raise XhciError(f"{dev} has no HID interface")

    def report_descriptor(self, length: int = 4096) -> bytes:
        return self.dev.control(0x81, 6, HID_REPORT << 8, self.interface, length).data

    def set_idle(self, duration_4ms: int = 0, report_id: int = 0) -> None:
        self.dev.control(0x21, HidRequest.SET_IDLE, (duration_4ms << 8) | report_id,
                         self.interface, 0)

    def set_protocol(self, protocol: Protocol = Protocol.REPORT) -> None:
        self.dev.control(0x21, HidRequest.SET_PROTOCOL, int(protocol), self.interface, 0)

    def get_report(self, report_type: ReportType = ReportType.INPUT, report_id: int = 0,
                   length: int | None = None) -> bytes:
        return self.dev.control(0xA1, HidRequest.GET_REPORT, (report_type << 8) | report_id,
                                self.interface, length or self.report_size).data

    def set_report(self, data: bytes, report_type: ReportType = ReportType.OUTPUT,
                   report_id: int = 0) -> None:
        self.dev.control(0x21, HidRequest.SET_REPORT, (report_type << 8) | report_id,
                         self.interface, data)

    def submit_read(self, on_complete: OnComplete | None = None) -> Transfer:
        return self.dev.endpoint(self.ep_in).submit(length=self.report_size,
                                                    on_complete=on_complete)

    def read_report(self, timeout_ns: int | None = None) -> bytes | None:
        """The next input report, or None if the device has none within the timeout (the
        pending read is then taken back)."""
        t = self.submit_read()
        try:
            t.wait(timeout_ns)
        except XhciTimeout:
            self.dev.endpoint(self.ep_in).cancel_all()
            return None if not t.ok else t.data
        return t.check().data
