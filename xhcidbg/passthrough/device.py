"""A real USB device behind libusb, as the controller's device interface (`UsbDevice`).

The guest's requests go to the device through libusb's asynchronous API, with these kept on
the host's side because the host's kernel owns them:

- SET_ADDRESS stays virtual (the host addressed the device long ago);
- SET_CONFIGURATION releases the interfaces, sets the configuration only when it changes, and
  claims every interface of the new one; SET_INTERFACE and CLEAR_FEATURE(ENDPOINT_HALT) go
  through libusb's calls for them, so the host's endpoint state follows;
- a guest port reset reaches the device only once the guest has addressed it: a reset during
  the first enumeration throws some devices into another mode;
- at SuperSpeed, UAS settings that have a Bulk-Only sibling are left out of the configuration
  the guest reads (this controller has no streams; see `uas`).

Isochronous TDs, one packet each, go to libusb in batches (`IsoBatches`): the TDs of an
endpoint that arrive within a few milliseconds share one transfer, several such transfers are
in flight, and each TD completes with its own packet's status and length.

libusb's results become the bus outcomes a real controller reports: a stall halts, an overflow
is babble, a vanished device is a disconnect, errors and timeouts are transaction errors, and a
short IN is short (the controller then posts Short Packet).  Transfers stay referenced until
libusb has called back, whatever happens to the guest's side of them.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable
from typing import Any

import usb1
from usb1 import libusb1

from ..devices.base import EpType, PortLink, Speed, Status, UsbDevice, UsbTransfer
from ..devices.descriptors import DescriptorType
from ..devices.isobatch import PACKETS, IsoBatches
from .host import HostDevice
from .uas import without_uas

log = logging.getLogger("xhcidbg.passthrough")

_SETUP = struct.Struct("<BBHHH")
CONTROL_TIMEOUT_MS = 5000          # as Linux's usb_control_msg callers mostly wait
_STATUS = {usb1.TRANSFER_COMPLETED: Status.OK, usb1.TRANSFER_STALL: Status.STALL,
           usb1.TRANSFER_OVERFLOW: Status.BABBLE, usb1.TRANSFER_NO_DEVICE: Status.NODEV,
           usb1.TRANSFER_ERROR: Status.XACT_ERROR, usb1.TRANSFER_TIMED_OUT: Status.XACT_ERROR,
           usb1.TRANSFER_CANCELLED: Status.CANCELLED}
SET_ADDRESS, SET_CONFIGURATION, SET_INTERFACE, CLEAR_FEATURE, GET_DESCRIPTOR = 5, 9, 11, 1, 6


def _zero_length(transfer: usb1.USBTransfer, lengths: list[int]) -> None:
    """Give the packets of a filled isochronous transfer their real lengths, zeros included.

    libusb and usbfs send and receive zero-length isochronous packets (an audio stream's empty
    frame); python-libusb1's setIsochronous refuses them, so they go in as one byte each, their
    bytes at the buffer's end where no packet reads them, and are set to zero here."""
    packets = libusb1.get_iso_packet_list(transfer._USBTransfer__transfer)  # type: ignore[attr-defined]
    for packet, length in zip(packets, lengths, strict=True):
        packet.length = length


class PassthroughDevice(UsbDevice):
    """One opened host device; `close` gives it back to the host (its kernel drivers too)."""

    def __init__(self, handle: usb1.USBDeviceHandle, info: HostDevice, *, force: bool = False,
                 on_gone: Callable[[PassthroughDevice], None] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, iso_packets: int = PACKETS):
        self.handle = handle
        self.info = info
        self.name = info.product or info.id
        self.speed = info.speed if info.speed is not None else Speed.HIGH
        self.force = force
        self.on_gone = on_gone
        self.port: PortLink | None = None
        self.addressed = False
        self.claimed: set[int] = set()
        self.detached_drivers: set[int] = set()     # interfaces whose kernel driver we took
        self.hidden: set[tuple[int, int]] = set()   # (interface, alternate) kept from the guest
        # every submitted libusb transfer and the TDs it carries (one, or an isochronous batch
        # in packet order; None where the controller took one back) until libusb calls back
        self._live: dict[usb1.USBTransfer, list[UsbTransfer | None]] = {}
        self._config_reads: dict[usb1.USBTransfer, int] = {}     # -> the length the guest asked
        self._config_lengths: dict[int, int] = {}                # configuration -> wTotalLength
        self._iso = IsoBatches(self._send_batch, loop, iso_packets)
        self._closed = False
        self.transfers = 0
        self.resets = 0                     # guest port resets that reached the device
        self._claim_all()

    # ---- interfaces -----------------------------------------------------------------------------
    def _current_interfaces(self) -> list[int]:
        config = self.handle.getConfiguration()
        for cfg in self.handle.getDevice().iterConfigurations():
            if cfg.getConfigurationValue() == config:
                return sorted({s.getNumber() for i in cfg for s in i})
        return []

    def _claim_all(self) -> None:
        for number in self._current_interfaces():
            if number in self.claimed:
                continue
            try:
                if self.handle.kernelDriverActive(number):
                    if not self.force:
                        raise PermissionError(
                            f"{self.info.label()}: interface {number} is bound to a kernel "
                            f"driver ({', '.join(self.info.drivers) or 'unknown'}); add "
                            "`force` to take it from the host")
                    self.handle.detachKernelDriver(number)
                    self.detached_drivers.add(number)
            except usb1.USBErrorNotSupported:
                pass                    # no kernel-driver API here (not Linux): claim it
            self.handle.claimInterface(number)
            self.claimed.add(number)

    def _release_all(self) -> None:
        for number in sorted(self.claimed):
            try:
                self.handle.releaseInterface(number)
            except usb1.USBError as e:
                log.info("%s: releasing interface %d: %s", self.name, number, e)
        self.claimed.clear()

    # ---- the device interface -----------------------------------------------------------------
    def attached(self, port: PortLink) -> None:
        self.port = port

    def detached(self) -> None:
        self.port = None
        self._iso.clear()                           # the controller took those TDs back
        for transfer, xfers in self._live.items():
            xfers.clear()
            with contextlib.suppress(usb1.USBError):
                transfer.cancel()

    def bus_reset(self) -> None:
        if not self.addressed:
            return
        self.addressed = False
        try:
            self.handle.resetDevice()
            self.resets += 1
        except usb1.USBErrorNotFound:
            log.warning("%s: the device re-enumerated on the host after a reset", self.name)
            self._gone()
        except usb1.USBError as e:
            log.warning("%s: port reset: %s", self.name, e)

    def submit(self, xfer: UsbTransfer) -> None:
        if self._closed:
            xfer.complete(Status.NODEV)
            return
        try:
            if xfer.setup:
                self._control(xfer)
            else:
                self._data(xfer)
        except usb1.USBErrorNoDevice:
            xfer.complete(Status.NODEV)
            self._gone()
        except usb1.USBError as e:
            log.info("%s: transfer on ep %#x refused by libusb: %s", self.name, xfer.endpoint, e)
            xfer.complete(Status.XACT_ERROR)

    def cancel(self, xfer: UsbTransfer) -> bool:
        if self._iso.cancel(xfer):
            return True
        for transfer, xfers in self._live.items():
            if xfer in xfers:
                xfers[xfers.index(xfer)] = None
                if not any(xfers):          # the others of a batch still want their packets
                    with contextlib.suppress(usb1.USBError):
                        transfer.cancel()
                return True
        return False

    # ---- control ------------------------------------------------------------------------------
    def _control(self, xfer: UsbTransfer) -> None:
        rt, req, value, index, length = _SETUP.unpack(bytes(xfer.setup or b"")[:8])
        standard = rt & 0x60 == 0
        if standard and rt == 0x00 and req == SET_ADDRESS:
            self.addressed = True                  # the host's address stays
            xfer.complete(Status.OK)
            return
        if standard and rt == 0x00 and req == SET_CONFIGURATION:
            self._sync(xfer, lambda: self._set_configuration(value & 0xFF))
            return
        if standard and rt == 0x01 and req == SET_INTERFACE:
            if (index, value) in self.hidden:
                log.info("%s: the guest selected the hidden UAS setting %d of interface %d: "
                         "STALL", self.name, value, index)
                xfer.complete(Status.STALL)
                return
            self._sync(xfer, lambda: self.handle.setInterfaceAltSetting(index, value))
            return
        if standard and rt == 0x02 and req == CLEAR_FEATURE and value == 0:   # ENDPOINT_HALT
            self._sync(xfer, lambda: self.handle.clearHalt(index & 0xFF))
            return
        transfer = self.handle.getTransfer()
        data: Any = length if rt & 0x80 else bytes(xfer.data or b"")[:length]
        rewrite = (standard and rt == 0x80 and req == GET_DESCRIPTOR and self.speed >= Speed.SUPER
                   and value >> 8 == DescriptorType.CONFIGURATION)
        if rewrite:             # all of it, so that wTotalLength is right in any first piece
            data = max(length, self._config_length(value & 0xFF))
        transfer.setControl(rt, req, value, index, data, callback=self._done,
                            timeout=CONTROL_TIMEOUT_MS)
        self._start(transfer, [xfer])
        if rewrite:
            self._config_reads[transfer] = length

    def _config_length(self, index: int) -> int:
        """wTotalLength of the device's configuration `index` (read once, synchronously: a
        9-byte header).  Asking for more than that is what some devices and UDCs refuse."""
        if index not in self._config_lengths:
            head = self.handle.controlRead(0x80, GET_DESCRIPTOR,
                                           DescriptorType.CONFIGURATION << 8 | index, 0, 9,
                                           timeout=CONTROL_TIMEOUT_MS)
            self._config_lengths[index] = struct.unpack_from("<H", head, 2)[0] \
                if len(head) >= 4 else 0
        return self._config_lengths[index]

    def _sync(self, xfer: UsbTransfer, call: Callable[[], object]) -> None:
        try:
            call()
        except usb1.USBErrorNoDevice:
            xfer.complete(Status.NODEV)
            self._gone()
            return
        except usb1.USBError as e:
            log.info("%s: %s", self.name, e)
            xfer.complete(Status.STALL)         # what the device would have said
            return
        xfer.complete(Status.OK)

    def _set_configuration(self, value: int) -> None:
        if value == self.handle.getConfiguration() and self.claimed:
            return                              # unchanged: a reset of the config would do harm
        self._release_all()
        self.handle.setConfiguration(value)
        self._claim_all()

    # ---- data ---------------------------------------------------------------------------------
    def _data(self, xfer: UsbTransfer) -> None:
        if xfer.ep_type == EpType.ISOCHRONOUS:
            self._iso.add(xfer)
            return
        transfer = self.handle.getTransfer()
        data: Any = xfer.length if xfer.is_in else bytes(xfer.data or b"")[:xfer.length]
        if xfer.ep_type == EpType.BULK:
            transfer.setBulk(xfer.endpoint, data, callback=self._done)
        else:
            transfer.setInterrupt(xfer.endpoint, data, callback=self._done)
        self._start(transfer, [xfer])

    @property
    def iso_packets(self) -> int:
        return self._iso.packets

    def _send_batch(self, endpoint: int, batch: list[UsbTransfer]) -> None:
        if self._closed:
            for xfer in batch:
                xfer.complete(Status.NODEV)
            return
        if endpoint & 0x80:
            lengths = [x.length for x in batch]
            data: Any = sum(lengths)
        else:
            payloads = [bytes(x.data or b"")[:x.length] for x in batch]
            lengths, data = [len(p) for p in payloads], b"".join(payloads)
        zero = lengths.count(0)
        if zero:            # python-libusb1 refuses zero-length packets, see _zero_length
            data = data + zero if isinstance(data, int) else data + bytes(zero)
        try:
            transfer = self.handle.getTransfer(iso_packets=len(batch))
            transfer.setIsochronous(endpoint, data, callback=self._done,
                                    iso_transfer_length_list=[n or 1 for n in lengths])
            if zero:
                _zero_length(transfer, lengths)
            self._start(transfer, list(batch))
        except usb1.USBErrorNoDevice:
            for xfer in batch:
                xfer.complete(Status.NODEV)
            self._gone()
        except (usb1.USBError, ValueError, TypeError, AttributeError) as e:
            log.warning("%s: isochronous transfer on ep %#x refused by libusb: %s; USB "
                        "Transaction Error for its %d TD(s)", self.name, endpoint, e, len(batch))
            for xfer in batch:
                xfer.complete(Status.XACT_ERROR)

    def _start(self, transfer: usb1.USBTransfer, xfers: list[UsbTransfer | None]) -> None:
        self._live[transfer] = xfers
        try:
            transfer.submit()
        except BaseException:
            del self._live[transfer]
            raise
        self.transfers += 1

    def _done(self, transfer: usb1.USBTransfer) -> None:
        """libusb's callback, on the loop: never raise into libusb."""
        try:
            xfers = self._live.pop(transfer, [])
            wanted = self._config_reads.pop(transfer, None)
            status = transfer.getStatus()
            if status == usb1.TRANSFER_NO_DEVICE:
                self._gone()
            outcome = _STATUS.get(status, Status.XACT_ERROR)
            if transfer.getType() == usb1.TRANSFER_TYPE_ISOCHRONOUS:
                for xfer, (pstatus, buf) in zip(xfers, transfer.iterISO(), strict=False):
                    if xfer is None or xfer.done:
                        continue
                    packet = outcome if outcome != Status.OK else \
                        _STATUS.get(pstatus, Status.XACT_ERROR)
                    # an isochronous OUT packet has no handshake: once sent, it all went (what
                    # the host's controller says the device kept is not the guest's business)
                    self._finish(xfer, packet, bytes(buf),
                                 None if xfer.is_in or packet != Status.OK else xfer.length)
                return
            xfer = xfers[0] if xfers else None
            if xfer is None or xfer.done:
                return                          # cancelled by the controller, or detached
            n = transfer.getActualLength()
            buf = transfer.getBuffer()          # (past the setup packet, for control)
            if wanted is not None and outcome == Status.OK:
                config, hidden = without_uas(bytes(buf[:n]))
                if hidden - self.hidden:
                    log.info("%s: UAS settings %s hidden from the guest (no streams here): it "
                             "uses Bulk-Only", self.name, sorted(hidden))
                self.hidden |= hidden
                self._finish(xfer, outcome, config[:wanted])
                return
            self._finish(xfer, outcome, bytes(buf[:n]) if xfer.is_in else b"", n)
        except Exception:
            log.exception("%s: a libusb completion failed", self.name)

    @staticmethod
    def _finish(xfer: UsbTransfer, status: Status, data: bytes, n: int | None = None) -> None:
        if xfer.is_in:
            xfer.complete(status, data=data)
        else:
            xfer.complete(status, actual=len(data) if n is None else n)

    # ---- leaving ------------------------------------------------------------------------------
    def _gone(self) -> None:
        """The device left the host: leave the guest too."""
        if self._closed:
            return
        if self.on_gone is not None:
            self.on_gone(self)              # the port mapper unplugs it and closes it
        elif self.port is not None:
            self.port.unplug()

    @property
    def pending(self) -> int:
        """Transfers libusb has not called back yet (cancelled ones included)."""
        return len(self._live)

    def close(self, events: Callable[[], None] | None = None) -> None:
        """Cancel what is in flight, let libusb call back (`events` pumps its events, bounded),
        release the interfaces, give the kernel drivers back, close the handle."""
        if self._closed:
            return
        self._closed = True
        self.detached()
        for _ in range(100):
            if not self._live or events is None:
                break
            events()
        for transfer in list(self._live):
            if not transfer.isSubmitted():
                del self._live[transfer]
        self._release_all()
        for number in sorted(self.detached_drivers):
            try:
                self.handle.attachKernelDriver(number)
            except usb1.USBError as e:
                log.warning("%s: giving interface %d back to its kernel driver: %s",
                            self.name, number, e)
        self.detached_drivers.clear()
        if self._live:
            log.warning("%s: %d transfer(s) still with libusb; the handle stays open",
                        self.name, len(self._live))
            return
        self.handle.close()
