"""The console's in-process world: a controller, the devices plugged into it, and the scripted
guest driving it, all running on one asyncio loop.

At start the guest brings the controller up (reset, rings, interrupters), enumerates every
connected device, and then keeps an interrupt IN transfer queued on each HID endpoint, as a
guest OS's HID driver does, so what the user does to the tablet or the keyboard turns into real
TDs, transfers and events.  Hotplug works the same way: the guest hears the Port Status Change
event and enumerates (or forgets) the device.
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..devices.base import UsbDevice
from ..emu.controller import XhciController
from ..emu.timing import Scheduler
from ..transport.inproc import InProcessBus
from .runtime import GuestRunner, Job, LoopBus, LoopClock

log = logging.getLogger("xhcidbg.ui")

DEFAULT_STORAGE_BYTES = 64 << 20
HID_CLASS, MSC_CLASS = 0x03, 0x08
SET_IDLE = 0x0A
MAX_REPORTS = 1024


@dataclass
class WorldOptions:
    tablet: bool = True
    keyboard: bool = True
    storage: bool = True
    storage_image: str | None = None          # None: a temporary 64 MiB image
    storage_bytes: int = DEFAULT_STORAGE_BYTES
    usb2_ports: int = 4
    usb3_ports: int = 4
    guest: bool = True                        # run the scripted guest
    trace: str | None = None                  # pcapng file to capture to from the start


@dataclass
class Report:
    """A HID report the guest received."""

    when_ns: int
    device: str
    slot: int
    endpoint: int
    data: bytes

    def __str__(self) -> str:
        return f"{self.device} (slot {self.slot} ep {self.endpoint:#04x}): {self.data.hex(' ')}"


@dataclass
class GuestDevice:
    """What the guest knows about one device it enumerated."""

    port: int
    device: Any                                # xhcidbg.guest.device.Device
    kind: str                                  # "hid", "storage" or "other"
    polling: list[int] = field(default_factory=list)    # interrupt IN endpoints being polled


def make_device(kind: str, options: WorldOptions | None = None, image: str | None = None
                ) -> UsbDevice:
    """A virtual device by name: tablet, keyboard or storage."""
    kind = kind.lower()
    if kind == "tablet":
        from ..devices.tablet import Tablet
        return Tablet()
    if kind == "keyboard":
        from ..devices.keyboard import Keyboard
        return Keyboard()
    if kind == "storage":
        from ..devices.storage import StorageDevice
        options = options or WorldOptions()
        return StorageDevice(image or storage_image(options))
    raise ValueError(f"unknown device {kind!r}: tablet, keyboard or storage")


def storage_image(options: WorldOptions) -> str:
    """The image behind the storage stick: the user's, or a fresh sparse temporary file
    (removed when the process exits)."""
    if options.storage_image:
        if not os.path.exists(options.storage_image):
            raise ValueError(f"storage image {options.storage_image!r} does not exist")
        return options.storage_image
    fd, path = tempfile.mkstemp(prefix="xhcidbg-storage-", suffix=".img")
    try:
        os.ftruncate(fd, options.storage_bytes)
    finally:
        os.close(fd)
    _temporary_files.append(path)
    return path


_temporary_files: list[str] = []


def _remove_temporary_files() -> None:
    while _temporary_files:
        try:
            os.unlink(_temporary_files.pop())
        except OSError:
            pass


import atexit  # noqa: E402  (registered once, next to what it cleans)
atexit.register(_remove_temporary_files)


class _Notifier:
    """Hooks observer that wakes the guest runner when the controller did something the guest
    may be waiting for."""

    def __init__(self, wake: Callable[[], None]):
        self.on_interrupt = lambda interrupter: wake()
        self.on_port = lambda port, old, new: wake()


class World:
    def __init__(self, options: WorldOptions | None = None):
        self.options = options or WorldOptions()
        o = self.options
        self.scheduler = Scheduler(virtual=False)
        self.controller = XhciController(usb2_ports=o.usb2_ports, usb3_ports=o.usb3_ports,
                                         scheduler=self.scheduler)
        self.inproc = InProcessBus(self.controller)
        self.runner = GuestRunner(self.controller.gate, self.inproc.interrupts)
        self.bus = LoopBus(self.inproc, self.runner)
        self.driver = None
        self.clock: LoopClock | None = None
        self.devices: dict[int, UsbDevice] = {}          # root port -> device
        self.guest_devices: dict[int, GuestDevice] = {}  # root port -> what the guest made of it
        self.reports: deque[Report] = deque(maxlen=MAX_REPORTS)
        self.report_count = 0                             # reports received in all
        self.guest_errors: deque[str] = deque(maxlen=64)
        self.storage_images: list[str] = []
        self.tracer = None
        self.started = False
        self.controller.hooks.attach(_Notifier(self.runner.notify))

    # ---- start / stop ---------------------------------------------------------------------
    async def start(self) -> None:
        """Plug the devices in, start the controller's clock and the guest."""
        loop = asyncio.get_running_loop()
        self.clock = LoopClock(self.scheduler, loop, self.runner.notify)
        o = self.options
        if o.trace:
            self.start_trace(o.trace)
        for kind, wanted in (("tablet", o.tablet), ("keyboard", o.keyboard),
                             ("storage", o.storage)):
            if wanted:
                self.plug(make_device(kind, o))
        if o.guest:
            from ..guest.driver import XhciDriver
            self.driver = XhciDriver(self.bus)
            self.driver.port_listeners.append(self._on_port_change)
            self.runner.service = self.driver.service
            self.runner.start(self._guest_setup)
        self.started = True

    async def stop(self) -> None:
        await self.runner.stop()
        if self.clock is not None:
            self.clock.close()
        try:                                 # a capture started here ends with the session
            from ..trace.cli import stop_trace, trace_status
            status = trace_status()
            if status is not None and status.running:
                stop_trace()
        except Exception as e:               # no tracer in this build, or the file is gone
            log.debug("stopping the trace: %s", e)
        self.tracer = None
        for dev in self.devices.values():
            close = getattr(dev, "close", None)
            if close:
                close()

    def start_trace(self, path: str, terms: list[str] | None = None):
        try:
            from ..trace.cli import start_trace
        except ImportError as e:
            raise RuntimeError(f"tracing is not available in this build ({e})") from None
        self.tracer = start_trace(self.controller, path, terms)
        return self.tracer

    def stop_trace(self):
        from ..trace.cli import stop_trace
        self.tracer = None
        return stop_trace()

    # ---- devices (the user's hands) ----------------------------------------------------------
    def plug(self, device: UsbDevice, port: int | None = None) -> int:
        number = self.controller.attach(device, port)
        self.devices[number] = device
        self.runner.notify()
        return number

    def unplug(self, port: int) -> UsbDevice:
        device = self.controller.detach(port)
        self.devices.pop(port, None)
        self.runner.notify()
        return device

    def find(self, kind: str) -> tuple[int, UsbDevice]:
        """The first plugged device of a kind ('tablet', 'keyboard', 'storage')."""
        try:
            return self.controller.find_device(kind)
        except LookupError:
            raise LookupError(f"no {kind} is plugged in (see `devices`; `plug {kind}` adds "
                              f"one)") from None

    # ---- the guest ---------------------------------------------------------------------------
    def _guest_setup(self) -> None:
        drv = self.driver
        drv.start()
        for port in drv.connected_ports():
            self._bring_up(port)

    def _bring_up(self, port: int) -> None:
        drv = self.driver
        if port in self.guest_devices or not drv.port_status(port).connected:
            return
        try:
            dev = drv.enumerate(port)
        except Exception as e:
            self.guest_errors.append(f"port {port}: enumeration failed: {e}")
            raise
        kind = "other"
        gd = GuestDevice(port, dev, kind)
        self.guest_devices[port] = gd
        for iface in dev.config.active_interfaces(dev.alternates) if dev.config else []:
            if iface.interface_class == MSC_CLASS:
                gd.kind = "storage"
            if iface.interface_class != HID_CLASS:
                continue
            gd.kind = "hid"
            # Like Linux's usbhid: reports only on change (SET_IDLE 0), then keep polling.
            dev.control(0x21, SET_IDLE, 0, iface.number, 0, check=False)
            for e in iface.endpoints:
                if e.is_in and e.transfer_type == 3:
                    gd.polling.append(e.address)
                    self._poll(gd, dev.endpoint(e.address))

    def _poll(self, gd: GuestDevice, ep) -> None:
        def done(t) -> None:
            dev = gd.device
            if t.ok:
                name = self.devices.get(gd.port).name if gd.port in self.devices else "?"
                self.reports.append(Report(time.monotonic_ns(), name, dev.slot, ep.address,
                                           bytes(t.data[:t.actual])))
                self.report_count += 1
            elif not t.cancelled:
                self.guest_errors.append(f"slot {dev.slot} {ep.name}: {t!r}; polling stopped")
                return
            if self.guest_devices.get(gd.port) is gd and dev.connected and not t.cancelled:
                ep.submit(length=ep.max_packet, on_complete=done)

        ep.submit(length=ep.max_packet, on_complete=done)

    def _on_port_change(self, port: int, portsc: int) -> None:
        """The guest's hub driver: a connect gets enumerated, a disconnect forgotten."""
        connected = bool(portsc & 1)
        gd = self.guest_devices.get(port)
        if connected and gd is None:
            self.runner.submit(f"enumerate port {port}", lambda: self._bring_up(port))
        elif not connected and gd is not None:
            self.runner.submit(f"forget port {port}", lambda: self._forget(port))

    def _forget(self, port: int) -> None:
        gd = self.guest_devices.pop(port, None)
        if gd is not None:
            gd.device.disable()

    def guest_job(self, what: str, fn: Callable[[], Any]) -> Job:
        return self.runner.submit(what, fn)

    def guest_device(self, kind: str) -> GuestDevice:
        port, _ = self.find(kind)
        gd = self.guest_devices.get(port)
        if gd is None:
            raise LookupError(f"the guest has not enumerated the {kind} on port {port} yet")
        return gd

    # ---- quiescence --------------------------------------------------------------------------
    def quiet(self) -> bool:
        """Nothing left to happen without outside input: the guest waits for news that has
        not come, the gate has no work (or is paused), no timer is about to fire."""
        gate = self.controller.gate
        if gate.work and not gate.paused:
            return False
        nxt = self.scheduler.next_deadline()
        if nxt is not None and nxt - self.scheduler.now_ns() < 20_000_000:
            return False
        return self.runner.stuck()

    async def settle(self, timeout: float = 5.0) -> bool:
        """Let the world run until it is quiet; False if it is still busy after `timeout`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        quiet_since = None
        while loop.time() < end:
            await asyncio.sleep(0.001)
            if self.quiet():
                # quiet twice in a row, a few ms apart: callbacks in flight have landed
                if quiet_since is not None and loop.time() - quiet_since > 0.003:
                    return True
                quiet_since = quiet_since or loop.time()
            else:
                quiet_since = None
        return False

    async def wait_job(self, job: Job, timeout: float = 10.0) -> bool:
        """Wait for a guest job; returns early (False) when it cannot progress because the
        controller is paused."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not job.done and loop.time() < end:
            await asyncio.sleep(0.001)
            if self.controller.gate.paused and self.quiet():
                return False
        return job.done


def read_capacity_and_inquiry(gd: GuestDevice) -> dict:
    """Guest side: INQUIRY and READ CAPACITY(10) over Bulk-Only Transport."""
    from ..devices import scsi
    inq = bot_command(gd, scsi.Inquiry.build(dict(opcode=scsi.Op.INQUIRY, flags=dict(evpd=False),
                                                  page_code=0, allocation_length=36,
                                                  control=0)), 36)
    cap = bot_command(gd, scsi.ReadCapacity10.build(dict(opcode=scsi.Op.READ_CAPACITY_10, lba=0,
                                                         flags=dict(pmi=False), control=0)), 8)
    info = scsi.StandardInquiryData.parse(inq["data"])
    capacity = scsi.ReadCapacity10Data.parse(cap["data"])
    return {"vendor": info.vendor, "product": info.product, "revision": info.revision,
            "blocks": capacity.last_lba + 1, "block_length": capacity.block_length,
            "status": cap["status"]}


def read_blocks(gd: GuestDevice, lba: int, count: int, block: int = 512) -> dict:
    from ..devices import scsi
    cdb = scsi.Rw10.build(dict(opcode=scsi.Op.READ_10, flags=0, lba=lba, group=0, blocks=count,
                               control=0))
    return bot_command(gd, cdb, count * block)


_tags = iter(range(1, 1 << 32))


def bot_command(gd: GuestDevice, cdb: bytes, length: int, data_in: bool = True) -> dict:
    """One Bulk-Only Transport command: CBW out, data in, CSW in (BOT 5)."""
    from ..devices.bot import CSW, CSW_LENGTH, cbw
    dev = gd.device
    eps = [e for i in dev.config.active_interfaces(dev.alternates) if i.interface_class == MSC_CLASS
           for e in i.endpoints if e.transfer_type == 2]
    ep_in = next(e.address for e in eps if e.is_in)
    ep_out = next(e.address for e in eps if not e.is_in)
    tag = next(_tags)
    dev.bulk_out(ep_out, cbw(tag, length, data_in, cdb))
    data = b""
    if length:
        t = dev.bulk_in(ep_in, length, check=False)
        data = bytes(t.data[:t.actual])
    status = CSW.parse(bytes(dev.bulk_in(ep_in, CSW_LENGTH).data))
    if status.dCSWTag != tag:
        raise RuntimeError(f"CSW tag {status.dCSWTag} does not match CBW tag {tag}")
    return {"data": data, "status": status.bCSWStatus, "residue": status.dCSWDataResidue}


__all__ = ["World", "WorldOptions", "Report", "GuestDevice", "make_device", "bot_command",
           "read_blocks", "read_capacity_and_inquiry"]
