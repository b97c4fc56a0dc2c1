"""The console's in-process world: a session whose transport is the in-process bus and whose
guest is the scripted one, all running on one asyncio loop.

At start the guest brings the controller up (reset, rings, interrupters), enumerates every
connected device, and then keeps an interrupt IN transfer queued on each HID endpoint, as a
guest OS's HID driver does, so what the user does to the tablet or the keyboard turns into real
TDs, transfers and events.  Hotplug works the same way: the guest hears the Port Status Change
event and enumerates (or forgets) the device.  The stick's commands go through the scripted
guest's mass-storage client (`xhcidbg.guest.storage`).
"""
from __future__ import annotations

import asyncio
import sys
import time
from argparse import Namespace
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..devices.bot import MSC_CLASS
from ..emu.hooks import InterruptSignal
from ..faults.cli import apply_fault_options
from ..guest.device import Device, GuestEndpoint, Transfer
from ..guest.driver import XhciDriver
from ..guest.storage import MassStorage, StorageError
from ..session import DeviceChoice, Session, make_devices
from ..trace.cli import start_option_trace
from ..transport.inproc import InProcessBus
from .runtime import GuestRunner, Job, LoopBus

HID_CLASS = 0x03
SET_IDLE = 0x0A
INTERRUPT = 3                  # endpoint transfer type
MAX_REPORTS = 1024


def console_devices() -> DeviceChoice:
    """The console's devices unless told otherwise: a tablet, a keyboard and a temporary
    64 MiB stick."""
    return DeviceChoice(scratch_stick=True)


@dataclass
class WorldOptions:
    """How the console's world is built (the console's command-line options, as data)."""

    devices: DeviceChoice = field(default_factory=console_devices)
    usb2_ports: int = 4
    usb3_ports: int = 4
    guest: bool = True                        # run the scripted guest
    trace: str | None = None                  # pcapng file to capture to from the start
    trace_filter: list[str] = field(default_factory=list)
    faults: Namespace | None = None           # --faults, --fault-seed, --fault-log


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
    device: Device
    kind: str                                  # "hid", "storage" or "other"
    polling: list[int] = field(default_factory=list)    # interrupt IN endpoints being polled
    storage: MassStorage | None = None         # the guest's client of a stick, once used


def _tell(text: str) -> None:
    """What the user should know before the console opens (an image was created)."""
    print(f"xhcidbg: {text}", file=sys.stderr, flush=True)


class _Notifier:
    """Hooks observer that wakes the guest runner when the controller did something the guest
    may be waiting for."""

    def __init__(self, wake: Callable[[], None]):
        self.wake = wake

    def on_interrupt(self, sig: InterruptSignal) -> None:
        self.wake()

    def on_port(self, port: int, old: int, new: int) -> None:
        self.wake()


class World(Session):
    kind = "in-process scripted guest"

    def __init__(self, options: WorldOptions | None = None):
        self.options = options or WorldOptions()
        o = self.options
        super().__init__(usb2_ports=o.usb2_ports, usb3_ports=o.usb3_ports)
        self.inproc = InProcessBus(self.controller)
        self.runner = GuestRunner(self.controller.gate, self.inproc.interrupts)
        self.bus = LoopBus(self.inproc, self.runner)
        self.driver: XhciDriver | None = None
        self.guest_devices: dict[int, GuestDevice] = {}  # root port -> what the guest made of it
        self.reports: deque[Report] = deque(maxlen=MAX_REPORTS)
        self.report_count = 0                             # reports received in all
        self.guest_errors: deque[str] = deque(maxlen=64)
        self.controller.hooks.attach(_Notifier(self.runner.notify))

    def changed(self) -> None:
        self.runner.notify()

    # ---- start / stop ---------------------------------------------------------------------
    async def start(self) -> None:
        """Start the controller's clock (and the capture), plug the devices in, start the
        guest."""
        await super().start()
        o = self.options
        if o.trace:
            start_option_trace(self.trace, o.trace, o.trace_filter)
        if o.faults is not None:
            apply_fault_options(self.faults, o.faults, say=_tell)
        self.plug_all(make_devices(o.devices, say=_tell))
        self.attach_all(o.devices.attach)
        if o.guest:
            self.driver = XhciDriver(self.bus)
            self.driver.port_listeners.append(self._on_port_change)
            self.runner.service = self.driver.service
            self.runner.start(self._guest_setup)

    async def stop(self) -> None:
        await self.runner.stop()
        self.close()

    # ---- the guest ---------------------------------------------------------------------------
    def _driver(self) -> XhciDriver:
        if self.driver is None:
            raise RuntimeError("no guest runs in this session (--no-guest)")
        return self.driver

    def _guest_setup(self) -> None:
        drv = self._driver()
        drv.start()
        for port in drv.connected_ports():
            self._bring_up(port)

    def _bring_up(self, port: int) -> None:
        drv = self._driver()
        if port in self.guest_devices or not drv.port_status(port).connected:
            return
        try:
            dev = drv.enumerate(port)
        except Exception as e:
            self.guest_errors.append(f"port {port}: enumeration failed: {e}")
            raise
        gd = GuestDevice(port, dev, "other")
        self.guest_devices[port] = gd
        for iface in dev.config.active_interfaces(dev.alternates) if dev.config else []:
            if iface.interface_class == MSC_CLASS:
                gd.kind = "storage"
            if iface.interface_class != HID_CLASS:
                continue
            gd.kind = "hid"
            # Like Linux's usbhid: reports only on change (SET_IDLE 0), then keep polling.
            dev.control(0x21, SET_IDLE, 0, iface.number, 0, check=False)
            for desc in iface.endpoints:
                if desc.is_in and desc.transfer_type == INTERRUPT:
                    gd.polling.append(desc.address)
                    self._poll(gd, dev.endpoint(desc.address))

    def _poll(self, gd: GuestDevice, ep: GuestEndpoint) -> None:
        def done(t: Transfer) -> None:
            dev = gd.device
            if t.ok:
                plugged = self.devices.get(gd.port)
                name = plugged.name if plugged is not None else "?"
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

    def guest_storage(self) -> MassStorage:
        """The guest's mass-storage client of the first stick."""
        gd = self.guest_device("storage")
        if gd.storage is None:
            try:
                gd.storage = MassStorage(gd.device)
            except StorageError as e:
                raise LookupError(str(e)) from None
        return gd.storage

    # ---- quiescence --------------------------------------------------------------------------
    def quiet(self) -> bool:
        """Nothing left to happen without outside input: the controller is quiet (see
        Session.quiet) and the guest waits for news that has not come."""
        return super().quiet() and self.runner.stuck()

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


__all__ = ["GuestDevice", "Report", "World", "WorldOptions", "console_devices"]
