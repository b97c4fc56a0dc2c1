"""One session: a controller, the devices on its root ports, the session's capture and its
clock, on one asyncio loop.  A transport gives a guest the controller: the console's world adds
the in-process bus and the scripted guest (`xhcidbg.ui.world.World`), `xhcidbg serve` and
`xhcidbg vm` add the vfio-user server (`xhcidbg.vm.Backend`).

    session = Session(make_devices(DeviceChoice()))
    await session.start()            # the controller's timers run from this loop
    port = session.plug(Keyboard())  # hotplug, on the loop
    session.unplug(port)
    session.close()
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from ..devices import UsbDevice
from ..emu.controller import XhciController
from ..emu.timing import Scheduler
from ..trace.cli import SessionTrace
from .clock import LoopClock
from .devices import close_devices

log = logging.getLogger("xhcidbg.session")


class Session:
    """The controller and its devices.  Everything runs on the loop that called `start`;
    `plug` and `unplug` must be called there too, never from another thread."""

    def __init__(self, devices: Iterable[UsbDevice] = (), *, usb2_ports: int = 4,
                 usb3_ports: int = 4, say: Callable[[str], None] | None = None):
        self.scheduler = Scheduler(virtual=False)
        self.controller = XhciController(usb2_ports=usb2_ports, usb3_ports=usb3_ports,
                                         scheduler=self.scheduler)
        self.trace = SessionTrace(self.controller)      # the session's capture, if any
        self.devices: dict[int, UsbDevice] = {}          # root port -> device
        self.clock: LoopClock | None = None
        self.say = say
        self.plug_all(devices)

    async def start(self) -> None:
        """Run the controller's timers from the running loop."""
        self.clock = LoopClock(self.scheduler, asyncio.get_running_loop(), self.changed)

    def changed(self) -> None:
        """Something happened that whoever drives the controller may be waiting for (timers
        ran, a device was plugged or pulled); a session with a guest to wake overrides this."""

    # ---- devices -----------------------------------------------------------------------------
    def plug(self, device: UsbDevice, port: int | None = None) -> int:
        """Attach `device` (to the first free root port of its speed unless `port` is given)."""
        number = self.controller.attach(device, port)
        self.devices[number] = device
        if self.say is not None:
            self.say(f"port {number}: {device.name} plugged in ({device.speed.label})")
        self.changed()
        return number

    def plug_all(self, devices: Iterable[UsbDevice]) -> None:
        """Plug each device in; if one does not fit, close them all and raise ValueError."""
        devices = list(devices)
        try:
            for device in devices:
                self.plug(device)
        except ValueError:
            close_devices(devices)
            raise

    def unplug(self, port: int) -> UsbDevice:
        """Detach whatever is on root port `port`; the device object stays usable for `plug`."""
        device = self.controller.detach(port)
        self.devices.pop(port, None)
        if self.say is not None:
            self.say(f"port {port}: {device.name} unplugged")
        self.changed()
        return device

    def find(self, name: str) -> tuple[int, UsbDevice]:
        """(port, device) of the first plugged device called `name` (tablet, keyboard, ...)."""
        return self.controller.find_device(name)

    # ---- the end -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the clock, end a capture still running, release the devices' files.  Safe to
        call twice."""
        if self.clock is not None:
            self.clock.close()
            self.clock = None
        if self.trace.running:           # a capture started here ends with the session
            try:
                self.trace.stop()
            except Exception as e:       # the file is gone, the disk is full: still close
                log.debug("stopping the trace: %s", e)
        close_devices(self.devices.values())
