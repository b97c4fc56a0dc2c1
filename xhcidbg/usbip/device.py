"""A device imported over USB/IP, as the controller's device interface (`UsbDevice`).

Every TD becomes one URB (CMD_SUBMIT, several in flight) but isochronous ones, which go in
batches of several packets per URB (`IsoBatches`); the server's RET_SUBMIT completes them and
its Linux errno becomes the bus outcome a controller reports.  A TD the controller takes
back is unlinked (CMD_UNLINK), which ends one of two ways: RET_UNLINK -ECONNRESET in place of
the URB's RET_SUBMIT, or, when the URB had finished already, its RET_SUBMIT and then RET_UNLINK
with status 0.  SET_ADDRESS stays virtual; a guest port reset reaches the device (as the
SET_FEATURE(PORT_RESET) request the server turns into a reset) only once it has been addressed.

The server is untrusted: a reply for a URB that was never sent, a length longer than asked,
isochronous descriptors that do not describe the packets sent, or an unknown command ends the
import with a log line saying which; the device then leaves the guest with every transfer in
flight completed, as does a connection that breaks.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import construct as c

from ..devices.base import EpType, PortLink, Speed, Status, UsbDevice, UsbTransfer
from ..devices.isobatch import IsoBatches
from .protocol import (
    CMD_SUBMIT,
    ISO_PACKET,
    ISO_PACKET_SIZE,
    RET_SUBMIT,
    RET_UNLINK,
    URB_DIR_IN,
    URB_HEADER,
    URB_HEADER_SIZE,
    URB_ISO_ASAP,
    CmdUnlink,
    Command,
    Direction,
    Errno,
    UsbSpeed,
    devid,
    errno_name,
)

log = logging.getLogger("xhcidbg.usbip")

_SETUP = struct.Struct("<BBHHH")
SET_ADDRESS = 5
PORT_RESET_REQUEST = bytes([0x23, 3, 4, 0, 0, 0, 0, 0])   # SET_FEATURE(PORT_RESET), USB_RT_PORT
_SPEED = {UsbSpeed.LOW: Speed.LOW, UsbSpeed.FULL: Speed.FULL, UsbSpeed.HIGH: Speed.HIGH,
          UsbSpeed.SUPER: Speed.SUPER, UsbSpeed.SUPER_PLUS: Speed.SUPER}
_STATUS = {0: Status.OK, -Errno.EREMOTEIO: Status.OK, -Errno.EXDEV: Status.OK,
           -Errno.EPIPE: Status.STALL, -Errno.EOVERFLOW: Status.BABBLE,
           -Errno.ENODEV: Status.NODEV, -Errno.ESHUTDOWN: Status.NODEV,
           -Errno.ECONNRESET: Status.CANCELLED, -Errno.ENOENT: Status.CANCELLED}


def status_of(errno_status: int) -> Status:
    """A URB's status (0 or a negative Linux errno) as the outcome on the bus."""
    return _STATUS.get(errno_status, Status.XACT_ERROR)   # -EPROTO, -EILSEQ, -ETIME, ...


class ProtocolError(Exception):
    """The server sent something USB/IP does not allow here."""


@dataclass
class _Urb:
    xfers: list[UsbTransfer | None]   # its TD, or an isochronous batch's (None: taken back)
    is_in: bool
    length: int
    packets: list[int] | None         # isochronous: each packet's length


class UsbipDevice(UsbDevice):
    """One imported device on its connection; `close` ends the import."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: Any,
                 *, name: str = "", on_gone: Callable[[UsbipDevice, str], None] | None = None):
        self.reader, self.writer = reader, writer
        self.info = info
        self.devid = devid(info.busnum, info.devnum)
        try:
            self.speed = _SPEED[UsbSpeed(info.speed)]
        except (ValueError, KeyError):
            raise ProtocolError(f"the server says the device runs at speed {info.speed}, "
                                "which is none USB has") from None
        self.name = name or f"usbip {info.busid} {info.idVendor:04x}:{info.idProduct:04x}"
        self.on_gone = on_gone
        self.port: PortLink | None = None
        self.addressed = False
        self._seqnums = itertools.count(1)
        self._urbs: dict[int, _Urb] = {}            # seqnum -> URB, until the server is done
        self._unlinks: dict[int, int] = {}          # unlink seqnum -> the URB's seqnum
        self._task: asyncio.Task[None] | None = None
        self._iso = IsoBatches(self._send_iso, None)    # on the loop once started
        self.ended: str | None = None                # why the import ended
        self.submitted = 0

    def start(self) -> UsbipDevice:
        """Start reading the server's replies (on the running loop)."""
        loop = asyncio.get_running_loop()
        self._iso.loop = loop
        self._task = loop.create_task(self._receive(), name=f"usbip {self.info.busid}")
        return self

    # ---- the device interface -----------------------------------------------------------------
    def attached(self, port: PortLink) -> None:
        self.port = port

    def detached(self) -> None:
        self.port = None
        self._iso.clear()
        for seqnum, urb in list(self._urbs.items()):
            if any(urb.xfers):
                urb.xfers = [None] * len(urb.xfers)
                self._unlink(seqnum)

    def bus_reset(self) -> None:
        if not self.addressed or self.ended:
            return
        self.addressed = False
        self._send(Direction.OUT, 0, 0, PORT_RESET_REQUEST, b"", _Urb([None], False, 0, None))

    def submit(self, xfer: UsbTransfer) -> None:
        if self.ended:
            xfer.complete(Status.NODEV)
            return
        setup = bytes(xfer.setup or b"")
        if setup:
            rt, req, _value, _index, length = _SETUP.unpack(setup[:8])
            if rt == 0x00 and req == SET_ADDRESS:
                self.addressed = True              # the server's host addressed it long ago
                xfer.complete(Status.OK)
                return
            is_in = bool(rt & 0x80)
        elif xfer.ep_type == EpType.ISOCHRONOUS:
            self._iso.add(xfer)
            return
        else:
            length = xfer.length
            is_in = xfer.is_in
        data = b"" if is_in else bytes(xfer.data or b"")[:length]
        urb = _Urb([xfer], is_in, length if is_in else len(data), None)
        self._send(Direction.IN if is_in else Direction.OUT, xfer.endpoint & 0x0F,
                   self._interval(xfer), setup[:8].ljust(8, b"\0"), data, urb)

    def _send_iso(self, endpoint: int, batch: list[UsbTransfer]) -> None:
        """One URB for a batch of isochronous TDs, a packet each."""
        if self.ended:
            for xfer in batch:
                xfer.complete(Status.NODEV)
            return
        is_in = bool(endpoint & 0x80)
        payloads = [b"" if is_in else bytes(x.data or b"")[:x.length] for x in batch]
        packets = [x.length if is_in else len(p) for x, p in zip(batch, payloads, strict=True)]
        urb = _Urb(list(batch), is_in, sum(packets), packets)
        self._send(Direction.IN if is_in else Direction.OUT, endpoint & 0x0F,
                   self._interval(batch[0]), bytes(8), b"".join(payloads), urb)

    def cancel(self, xfer: UsbTransfer) -> bool:
        if self._iso.cancel(xfer):
            return True
        for seqnum, urb in self._urbs.items():
            if xfer in urb.xfers:
                urb.xfers[urb.xfers.index(xfer)] = None
                if not any(urb.xfers):      # the rest of a batch still wants its packets
                    self._unlink(seqnum)
                return True
        return False

    # ---- to the server ------------------------------------------------------------------------
    def _interval(self, xfer: UsbTransfer) -> int:
        """urb->interval: (micro)frames between services of a periodic endpoint."""
        if xfer.ep_type not in (EpType.INTERRUPT, EpType.ISOCHRONOUS):
            return 0
        microframes = 1 << min(xfer.interval, 15)
        return microframes if self.speed >= Speed.HIGH else max(1, microframes // 8)

    def _send(self, direction: Direction, ep: int, interval: int, setup: bytes, data: bytes,
              urb: _Urb) -> None:
        seqnum = next(self._seqnums)
        packets = urb.packets
        flags = (URB_DIR_IN if direction == Direction.IN else 0) | \
            (URB_ISO_ASAP if packets is not None else 0)
        body = CMD_SUBMIT.build({
            "transfer_flags": flags, "transfer_buffer_length": urb.length, "start_frame": 0,
            "number_of_packets": len(packets) if packets is not None else 0,
            "interval": interval, "setup": setup})
        iso = b""
        if packets is not None:
            offsets = itertools.accumulate([0, *packets[:-1]])
            iso = b"".join(ISO_PACKET.build({"offset": o, "length": n, "actual_length": 0,
                                             "status": 0})
                           for o, n in zip(offsets, packets, strict=True))
        self._urbs[seqnum] = urb
        self.submitted += 1
        self.writer.write(URB_HEADER.build({
            "command": Command.CMD_SUBMIT, "seqnum": seqnum, "devid": self.devid,
            "direction": direction, "ep": ep, "body": body}) + data + iso)

    def _unlink(self, target: int) -> None:
        if self.ended:
            return
        seqnum = next(self._seqnums)
        self._unlinks[seqnum] = target
        self.writer.write(URB_HEADER.build({
            "command": Command.CMD_UNLINK, "seqnum": seqnum, "devid": self.devid,
            "direction": Direction.OUT, "ep": 0,
            "body": CmdUnlink.build({"unlink_seqnum": target})}))

    # ---- from the server ----------------------------------------------------------------------
    async def _receive(self) -> None:
        why = "the server closed the connection"
        try:
            while True:
                header = URB_HEADER.parse(await self.reader.readexactly(URB_HEADER_SIZE))
                if header.command == Command.RET_SUBMIT:
                    await self._ret_submit(header.seqnum, RET_SUBMIT.parse(header.body))
                elif header.command == Command.RET_UNLINK:
                    self._ret_unlink(header.seqnum, RET_UNLINK.parse(header.body).status)
                else:
                    raise ProtocolError(f"command {header.command} is not a reply")
        except asyncio.IncompleteReadError:
            pass
        except (ConnectionError, OSError) as e:
            why = f"the connection broke ({e})"
        except (ProtocolError, c.ConstructError) as e:
            why = f"the server broke the protocol: {e}"
            log.error("%s: %s; the device leaves the guest", self.name, why)
        except asyncio.CancelledError:
            why = "the import was ended here"
        self._end(why)

    async def _ret_submit(self, seqnum: int, ret: Any) -> None:
        urb = self._urbs.get(seqnum)     # kept until all is read: a bad reply still ends it
        if urb is None:
            raise ProtocolError(f"RET_SUBMIT for seqnum {seqnum}, which is not in flight")
        actual = ret.actual_length
        if not 0 <= actual <= urb.length:
            raise ProtocolError(f"RET_SUBMIT {seqnum}: actual_length {actual} of a "
                                f"{urb.length}-byte URB")
        count = len(urb.packets) if urb.packets is not None else 0
        if ret.number_of_packets != count and not (count == 0 and ret.number_of_packets == -1):
            raise ProtocolError(f"RET_SUBMIT {seqnum}: {ret.number_of_packets} isochronous "
                                f"packets for a URB of {count}")
        data = await self.reader.readexactly(actual) if urb.is_in else b""
        iso = await self.reader.readexactly(count * ISO_PACKET_SIZE) if count else b""
        packets = self._iso_packets(seqnum, urb, iso, data, actual) if count else []
        del self._urbs[seqnum]
        status = status_of(ret.status)
        if urb.packets is None:
            xfer = urb.xfers[0]
            if xfer is None or xfer.done:
                return                      # unlinked meanwhile: its answer goes nowhere
            if urb.is_in:
                xfer.complete(status, data=data)
            else:
                xfer.complete(status, actual=actual)
            return
        for xfer, (packet_status, packet_data, packet_actual) in zip(urb.xfers, packets,
                                                                     strict=True):
            if xfer is None or xfer.done:
                continue
            # each TD gets its own packet's status and bytes (the URB's -EXDEV says only that
            # some packet failed)
            outcome = status if status != Status.OK else status_of(packet_status)
            if urb.is_in:
                xfer.complete(outcome, data=packet_data)
            else:
                xfer.complete(outcome, actual=packet_actual if outcome == Status.OK else 0)

    @staticmethod
    def _iso_packets(seqnum: int, urb: _Urb, iso: bytes, data: bytes, actual: int
                     ) -> list[tuple[int, bytes, int]]:
        """(status, bytes, actual length) of each packet, IN data spread back from the server's
        compacted stream; every descriptor checked against what was sent."""
        assert urb.packets is not None
        out, offset, taken, total = [], 0, 0, 0
        for i, length in enumerate(urb.packets):
            p = ISO_PACKET.parse(iso[i * ISO_PACKET_SIZE:(i + 1) * ISO_PACKET_SIZE])
            if p.offset != offset or p.length != length or p.actual_length > length:
                raise ProtocolError(f"RET_SUBMIT {seqnum}: packet {i} says offset {p.offset} "
                                    f"length {p.length} actual {p.actual_length}; it was sent "
                                    f"as offset {offset} length {length}")
            chunk = b""
            if urb.is_in:
                chunk = data[taken:taken + p.actual_length]
                if len(chunk) != p.actual_length:
                    raise ProtocolError(f"RET_SUBMIT {seqnum}: packet {i}'s "
                                        f"{p.actual_length} bytes are past the data sent")
                taken += p.actual_length
            total += p.actual_length
            out.append((p.status, chunk, p.actual_length))
            offset += length
        if total != actual or (urb.is_in and taken != len(data)):
            raise ProtocolError(f"RET_SUBMIT {seqnum}: packets hold {total} bytes, "
                                f"actual_length says {actual}")
        return out

    def _ret_unlink(self, seqnum: int, status: int) -> None:
        target = self._unlinks.pop(seqnum, None)
        if target is None:
            raise ProtocolError(f"RET_UNLINK for seqnum {seqnum}, which was never sent")
        if status == -Errno.ECONNRESET:
            self._urbs.pop(target, None)     # unlinked in time: no RET_SUBMIT comes for it
        elif status != 0:
            log.info("%s: unlink of %d ended %s", self.name, target, errno_name(status))
        # status 0: the URB had finished, its RET_SUBMIT came first and was dropped

    # ---- ending -------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._urbs)

    def _end(self, why: str) -> None:
        if self.ended:
            return
        self.ended = why
        log.info("%s: import ended: %s", self.name, why)
        urbs, self._urbs = self._urbs, {}
        self._iso.flush_all()               # the TDs still gathering end as NODEV too
        for urb in urbs.values():
            for xfer in urb.xfers:
                if xfer is not None and not xfer.done:
                    xfer.complete(Status.NODEV)
        self._unlinks.clear()
        self.writer.close()
        if self.on_gone is not None:
            self.on_gone(self, why)
        elif self.port is not None:
            self.port.unplug()

    def close(self) -> None:
        """End the import (the server's host gets its device back)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        else:
            self._end("the import was ended here")
