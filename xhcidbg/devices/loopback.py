"""A source/sink and loopback test device, modelled on Linux's Gadget Zero (g_zero).

It uses g_zero's IDs (0525:a4a0), so a Linux guest binds its `usbtest` driver and `testusb`
can exercise the controller.  Two configurations, chosen by the host with SET_CONFIGURATION:

  1 "source/sink": bulk IN (0x81) and interrupt IN (0x82) return a pattern, bulk OUT (0x01) and
    interrupt OUT (0x02) accept data and check the pattern (a mismatch halts the endpoint).
  2 "loopback": whatever goes OUT on an endpoint number comes back IN on the same number.

Interface 0 alternate setting 0 has the bulk and interrupt endpoints; alternate setting 1 adds
isochronous IN (0x83) and OUT (0x03), as real devices keep periodic bandwidth out of the
default setting.  Patterns as in g_zero/usbtest: 0 = zeros, 1 = (i % maxpacket) % 63 per
transfer, None = sink accepts anything.  Vendor requests 0x5B/0x5C write and read back a
4 KiB control buffer (usbtest's control tests).

Bulk IN in source mode returns a slice of a preallocated buffer (no copy, no per-packet work):
it is the benchmark target.
"""
from __future__ import annotations

from collections import deque

from .base import EpType, Speed, Status, UsbTransfer
from .declaration import (
    Configuration,
    EndpointDecl,
    Interface,
    Request,
    Stall,
    control_request,
    on_transfer,
)
from .descriptors import Recipient, RequestType
from .standard import StandardDevice

SOURCE_SINK, LOOPBACK = 1, 2
BULK_IN, BULK_OUT = 0x81, 0x01
INT_IN, INT_OUT = 0x82, 0x02
ISO_IN, ISO_OUT = 0x83, 0x03
CONTROL_WRITE, CONTROL_READ = 0x5B, 0x5C
CONTROL_BUFFER = 4096
MAX_LOOPED = 4 << 20            # bytes buffered per endpoint pair before OUT is NAKed
MAX_SOURCE_BUFFER = 64 << 20    # largest preallocated pattern buffer

_BULK = (EndpointDecl(BULK_IN, EpType.BULK, max_burst=15),
         EndpointDecl(BULK_OUT, EpType.BULK, max_burst=15))
_INTERRUPT = (EndpointDecl(INT_IN, EpType.INTERRUPT, max_packet=1024, interval_us=1000),
              EndpointDecl(INT_OUT, EpType.INTERRUPT, max_packet=1024, interval_us=1000))
_ISO = (EndpointDecl(ISO_IN, EpType.ISOCHRONOUS, max_packet=1024, interval_us=1000, sync=1),
        EndpointDecl(ISO_OUT, EpType.ISOCHRONOUS, max_packet=1024, interval_us=1000, sync=1))


def _interfaces(name: str) -> tuple[Interface, ...]:
    return (Interface(0, _BULK + _INTERRUPT, alternate=0, name=name),
            Interface(0, _BULK + _INTERRUPT + _ISO, alternate=1, name=name + " with isochronous"))


class _Fifo:
    """Looped-back data of one endpoint pair: chunks in arrival order."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: deque[memoryview] = deque()
        self.size = 0

    def put(self, data: bytes | memoryview) -> None:
        self.chunks.append(memoryview(bytes(data)))   # copy: the host's buffer will be reused
        self.size += len(data)

    def take(self, limit: int) -> bytes | memoryview:
        if self.chunks and len(self.chunks[0]) >= limit and limit:
            head = self.chunks[0]
            out = head[:limit]
            if len(head) == limit:
                self.chunks.popleft()
            else:
                self.chunks[0] = head[limit:]
            self.size -= limit
            return out
        parts = []
        want = limit
        while want and self.chunks:
            head = self.chunks[0]
            part = head[:want]
            parts.append(part)
            want -= len(part)
            if len(part) == len(head):
                self.chunks.popleft()
            else:
                self.chunks[0] = head[len(part):]
        taken = limit - want
        self.size -= taken
        return b"".join(parts)

    def clear(self) -> None:
        self.chunks.clear()
        self.size = 0


class LoopbackDevice(StandardDevice):
    name = "loopback"
    vendor_id = 0x0525            # NetChip, as used by Linux's gadget zero
    product_id = 0xA4A0
    manufacturer = "xhcidbg"
    product = "Gadget Zero"
    serial_number = "0123456789.0123456789.0123456789"
    speeds = (Speed.FULL, Speed.HIGH, Speed.SUPER)
    default_speed = Speed.SUPER
    configurations = (
        Configuration(SOURCE_SINK, _interfaces("source and sink data"), name="source/sink",
                      self_powered=True),
        Configuration(LOOPBACK, _interfaces("loop input to output"), name="loopback",
                      self_powered=True),
    )

    def __init__(self, speed: Speed | None = None, pattern: int | None = 0):
        if pattern not in (0, 1, None):
            raise ValueError("pattern is 0 (zeros), 1 (mod 63) or None (no check)")
        self.pattern = pattern
        self.control_buffer = bytearray(CONTROL_BUFFER)
        self._fifos = {n: _Fifo() for n in (1, 2, 3)}
        self._sources: dict[int, bytes] = {}
        self.reset_stats()
        super().__init__(speed)

    def reset_stats(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.transfers_in = 0
        self.transfers_out = 0
        self.pattern_errors = 0

    @property
    def mode(self) -> str:
        return {SOURCE_SINK: "source/sink", LOOPBACK: "loopback"}.get(self.configuration_value,
                                                                      "unconfigured")

    # ---- pattern buffers -------------------------------------------------------------------

    def _pattern(self, max_packet: int, length: int) -> bytes:
        """A buffer starting with at least `length` bytes of the pattern for an endpoint of
        this packet size, built once per packet size (and grown by doubling)."""
        buf = self._sources.get(max_packet)
        if buf is None or len(buf) < length:
            size = max(1 << 16, 1 << max(0, length - 1).bit_length())
            if size > MAX_SOURCE_BUFFER:
                size = length            # outsized request: build it just this once
            if self.pattern == 1:
                packet = bytes((i % max_packet) % 63 for i in range(max_packet))
                buf = (packet * (size // max_packet + 1))[:size]
            else:
                buf = bytes(size)
            if size <= MAX_SOURCE_BUFFER:
                self._sources[max_packet] = buf
        return buf

    def on_configured(self, config: Configuration | None) -> None:
        for fifo in self._fifos.values():
            fifo.clear()

    def on_interface(self, number: int, alternate: int) -> None:
        self._fifos[3].clear()

    def on_reset(self) -> None:
        self.on_configured(None)
        self.control_buffer = bytearray(CONTROL_BUFFER)

    # ---- data endpoints ----------------------------------------------------------------------

    def _declared(self, xfer: UsbTransfer) -> EndpointDecl:
        """The endpoint a transfer came to: handlers run only for active endpoints."""
        decl = self.endpoint(xfer.endpoint)
        assert decl is not None
        return decl

    @on_transfer(BULK_IN, INT_IN, ISO_IN)
    def _source(self, xfer: UsbTransfer) -> None:
        decl = self._declared(xfer)
        length = xfer.length
        if decl.type == EpType.ISOCHRONOUS:
            length = min(length, decl.bytes_per_interval(self.speed) or
                         decl.max_packet_for(self.speed))
        if self.configuration_value == LOOPBACK:
            fifo = self._fifos[xfer.endpoint & 0x0F]
            if not fifo.size and decl.type != EpType.ISOCHRONOUS:
                self.park(xfer)          # NAK until something is looped back
                return
            data = fifo.take(length)
            self._resume_out(xfer.endpoint & 0x0F)
        else:
            data = memoryview(self._pattern(decl.max_packet_for(self.speed), length))[:length]
        self.bytes_in += len(data)
        self.transfers_in += 1
        xfer.complete(Status.OK, data)      # a view, not a copy (the benchmark path)

    @on_transfer(BULK_OUT, INT_OUT, ISO_OUT)
    def _sink(self, xfer: UsbTransfer) -> None:
        data = xfer.data if xfer.data is not None else b""
        if self.configuration_value == LOOPBACK:
            number = xfer.endpoint & 0x0F
            fifo = self._fifos[number]
            if fifo.size >= MAX_LOOPED and self._declared(xfer).type != EpType.ISOCHRONOUS:
                self.park(xfer)          # NAK until the IN side drains
                return
            fifo.put(data)
            self._account_out(xfer, len(data))
            waiting = self.unpark(0x80 | number)
            if waiting is not None:
                self._source(waiting)
            return
        if self.pattern is not None and len(data):
            expected = self._pattern(self._declared(xfer).max_packet_for(self.speed), len(data))
            if not expected.startswith(data):           # memcmp, no copy
                self.pattern_errors += 1
                xfer.complete(Status.STALL)
                if self._declared(xfer).type != EpType.ISOCHRONOUS:
                    self.set_halt(xfer.endpoint)
                return
        self._account_out(xfer, len(data))

    def _account_out(self, xfer: UsbTransfer, n: int) -> None:
        self.bytes_out += n
        self.transfers_out += 1
        xfer.complete(Status.OK)

    def _resume_out(self, number: int) -> None:
        fifo = self._fifos[number]
        while fifo.size < MAX_LOOPED and (xfer := self.unpark(number)) is not None:
            data = xfer.data if xfer.data is not None else b""
            fifo.put(data)
            self._account_out(xfer, len(data))

    # ---- vendor requests (usbtest control tests) ---------------------------------------------

    @control_request(CONTROL_WRITE, type=RequestType.VENDOR, recipient=Recipient.DEVICE)
    def _control_write(self, r: Request) -> None:
        if r.is_in or r.value or r.index or r.length > CONTROL_BUFFER:
            raise Stall
        self.control_buffer[:len(r.data)] = r.data

    @control_request(CONTROL_READ, type=RequestType.VENDOR, recipient=Recipient.DEVICE)
    def _control_read(self, r: Request) -> bytes:
        if not r.is_in or r.value or r.index or r.length > CONTROL_BUFFER:
            raise Stall
        return bytes(self.control_buffer[:r.length])

    def describe(self) -> str:
        pattern = {0: "zeros", 1: "mod63", None: "unchecked"}[self.pattern]
        return f"{super().describe()}; {self.mode}, pattern {pattern}"
