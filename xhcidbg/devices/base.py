"""The one interface every USB device backend implements, and the transfer it receives.

The controller turns TDs into `UsbTransfer`s and hands them to `UsbDevice.submit`.  A device
finishes a transfer by calling `xfer.complete(...)`, either at once (virtual devices mostly do)
or later from the event loop (an interrupt IN endpoint with nothing to report yet, a passthrough
device waiting on libusb).  The controller may take a transfer back with `cancel` (Stop Endpoint,
Disable Slot, detach).  Devices never see TRBs, rings or guest memory.
"""
from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..emu.timing import Scheduler


class Speed(IntEnum):
    """Protocol speed IDs as PORTSC and the slot context encode them (default PSI values)."""

    FULL = 1
    LOW = 2
    HIGH = 3
    SUPER = 4
    SUPER_PLUS = 5

    @property
    def is_superspeed(self) -> bool:
        return self >= Speed.SUPER

    @property
    def label(self) -> str:
        return {1: "full-speed", 2: "low-speed", 3: "high-speed", 4: "super-speed",
                5: "super-speed plus"}[int(self)]

    @property
    def mbps(self) -> str:
        return {1: "12", 2: "1.5", 3: "480", 4: "5000", 5: "10000"}[int(self)]


# the words the command line and fault rules use for speeds
SPEED_NAMES = {"low": Speed.LOW, "full": Speed.FULL, "high": Speed.HIGH, "super": Speed.SUPER}


class EpType(IntEnum):
    """USB transfer types, numbered as in endpoint descriptors (bmAttributes bits 1:0)."""

    CONTROL = 0
    ISOCHRONOUS = 1
    BULK = 2
    INTERRUPT = 3


class Status(IntEnum):
    """How a transfer ended on the bus.  The controller maps these to completion codes."""

    OK = 0            # all data moved, or fewer bytes (short packet) -- see `actual`
    STALL = 1         # the device answered STALL: the endpoint halts
    BABBLE = 2        # the device sent more than the host asked for
    XACT_ERROR = 3    # no handshake / CRC error / timeout on the bus
    NODEV = 4         # the device is gone
    CANCELLED = 5     # taken back by the host before it finished


_ids = itertools.count(1)


class UsbTransfer:
    """One USB transfer (what Linux calls an URB): a control request or a data TD."""

    __slots__ = ("_on_complete", "actual", "buffers_fn", "data", "done", "endpoint", "ep_type",
                 "id", "in_place", "interval", "length", "result", "setup", "status", "stream")

    def __init__(self, endpoint: int, ep_type: EpType, length: int, *, setup: bytes | None = None,
                 data: bytes | memoryview | None = None, stream: int = 0, interval: int = 0,
                 on_complete: Callable[[UsbTransfer], None] | None = None):
        self.id = next(_ids)              # unique: traces use it as the URB id
        self.endpoint = endpoint          # endpoint address: number | 0x80 for IN
        self.ep_type = ep_type
        self.setup = setup                # 8 bytes for control transfers
        self.data = data                  # OUT payload (None for IN)
        self.length = length              # bytes requested (IN) or offered (OUT)
        self.stream = stream
        self.interval = interval          # endpoint context Interval: period 2**interval x 125 us
        self.status: Status | None = None
        self.actual = 0
        self.result: bytes | memoryview = b""     # IN payload returned by the device
        self.done = False
        self._on_complete = on_complete
        # set by the host controller: the host's own IN buffers, see `in_buffers`
        self.buffers_fn: Callable[[], list[memoryview] | None] | None = None
        self.in_place = False             # IN data was written straight into those buffers

    @property
    def is_in(self) -> bool:
        if self.setup:
            return bool(self.setup[0] & 0x80)
        return bool(self.endpoint & 0x80)

    def in_buffers(self) -> list[memoryview] | None:
        """For IN transfers: writable views of the host's own buffers (guest memory), in order,
        `length` bytes in all -- or None when they cannot be reached directly.  A device that
        fills them finishes with `complete(filled=n)` and the data is never copied again."""
        return self.buffers_fn() if self.buffers_fn is not None else None

    def in_data(self, limit: int | None = None) -> bytes:
        """What an IN transfer delivered (the first `limit` bytes), wherever it was put."""
        n = self.actual if limit is None else min(self.actual, limit)
        if not self.in_place:
            return bytes(self.result[:n])
        out = bytearray()
        for view in self.in_buffers() or ():
            if len(out) >= n:
                break
            out += view[:n - len(out)]
        return bytes(out)

    def complete(self, status: Status = Status.OK, data: bytes | memoryview | None = None,
                 actual: int | None = None, filled: int | None = None) -> None:
        """Finish the transfer.  IN: `data` is what the device sent (at most `length` bytes are
        delivered; more is babble), or `filled` bytes were written into `in_buffers()`.
        OUT: `actual` is how much the device accepted."""
        if self.done:
            return
        self.done = True
        self.status = status
        if filled is not None and self.is_in:
            self.actual = max(0, min(filled, self.length))
            self.in_place = True
        elif self.is_in:
            data = data or b""
            if len(data) > self.length:
                self.status = Status.BABBLE if status == Status.OK else status
                data = data[:self.length]
            self.result = data
            self.actual = len(data)
        else:
            self.actual = self.length if actual is None else max(0, min(actual, self.length))
            if status != Status.OK and actual is None:
                self.actual = 0
        if self._on_complete is not None:
            self._on_complete(self)

    def __repr__(self) -> str:
        d = "in" if self.is_in else "out"
        return (f"UsbTransfer(#{self.id} ep{self.endpoint & 0x7f}{d} {self.ep_type.name.lower()} "
                f"len={self.length} status={None if self.status is None else self.status.name} "
                f"actual={self.actual})")


class UsbDevice(ABC):
    """What the controller needs from a device.  Virtual devices derive from
    `xhcidbg.devices.standard.StandardDevice`, which adds descriptors and standard requests."""

    speed: Speed = Speed.HIGH
    name: str = "usb-device"
    # TDs the controller hands over per endpoint before the first completes (None: its own
    # max_inflight); a passed-through device sets what its selection asks (depth=N)
    queue_depth: int | None = None

    def bus_reset(self) -> None:  # noqa: B027 - optional, a no-op by default
        """A port reset reached the device: back to the Default state, address 0."""

    @abstractmethod
    def submit(self, xfer: UsbTransfer) -> None:
        """Start a transfer; finish it with `xfer.complete` now or later (from the loop)."""

    def cancel(self, xfer: UsbTransfer) -> bool:
        """Take back a transfer that has not completed.  Returns True if it was pending; the
        device must then not complete it any more (the controller completes it as cancelled)."""
        return False

    def attached(self, port: PortLink) -> None:  # noqa: B027 - optional
        """Plugged into a port; `port` lets the device signal remote wakeup or unplug itself."""

    def detached(self) -> None:  # noqa: B027 - optional
        """Unplugged: drop all pending transfers without completing them."""


class PortLink(ABC):
    """What a device may ask of the port it is plugged into."""

    # The controller's clock and timers, for devices that act on time (HID idle reports);
    # None where the port has none.
    scheduler: Scheduler | None = None

    @abstractmethod
    def remote_wakeup(self) -> None:
        """Signal resume from U3/suspend."""

    @abstractmethod
    def unplug(self) -> None:
        """The device leaves the bus by itself (a passthrough device was pulled out)."""
