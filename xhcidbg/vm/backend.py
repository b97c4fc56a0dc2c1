"""The controller, its virtual devices and the vfio-user server, on one asyncio loop.

`xhcidbg serve` is a `Backend` alone; `xhcidbg vm` is a `Backend` plus QEMU started by the guest
kit.  Tests and benchmarks use the same class, so what they check is what the commands run.

    backend = Backend("/tmp/xhci.sock", make_devices(DeviceChoice(storage=["disk.img"])))
    await backend.start()
    print(backend.device_arg)       # QEMU: -device '<this>'
    port = backend.plug(Keyboard()) # hotplug, on the loop
    backend.unplug(port)
    backend.close()
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..devices.base import Speed, UsbDevice
from ..emu.controller import XhciController
from ..emu.timing import Scheduler
from ..vfio_user import VfioUserServer
from ..vfio_user.server import BUSY_POLL_US

log = logging.getLogger("xhcidbg.vm")

SPEEDS = {"low": Speed.LOW, "full": Speed.FULL, "high": Speed.HIGH, "super": Speed.SUPER}


@dataclass
class DeviceChoice:
    """Which virtual devices to plug in at start (the command-line options, as data)."""

    tablet: bool = True
    keyboard: bool = True
    storage: list[str] = field(default_factory=list)      # one stick per image
    storage_readonly: bool = False
    storage_speed: Speed | None = None                    # None: each device's default
    loopback: bool = False
    loopback_speed: Speed | None = None
    keyboard_speed: Speed | None = None
    tablet_speed: Speed | None = None


def make_devices(choice: DeviceChoice) -> list[UsbDevice]:
    """The devices `choice` asks for; ValueError (with a message for the user) if one cannot be
    made, e.g. a missing image or a speed the device does not run at."""
    from ..devices import Keyboard, LoopbackDevice, StorageDevice, Tablet

    made: list[UsbDevice] = []
    try:
        if choice.tablet:
            made.append(_with_speed(Tablet, choice.tablet_speed))
        if choice.keyboard:
            made.append(_with_speed(Keyboard, choice.keyboard_speed))
        for image in choice.storage:
            if not os.path.isfile(image):
                raise ValueError(f"storage image {image!r} does not exist (make one with "
                                 f"`truncate -s 64M {image}`, or pass --storage-size)")
            made.append(_with_speed(StorageDevice, choice.storage_speed, image,
                                    readonly=choice.storage_readonly))
        if choice.loopback:
            made.append(_with_speed(LoopbackDevice, choice.loopback_speed))
    except BaseException:
        close_devices(made)
        raise
    return made


def _with_speed(cls, speed: Speed | None, *args, **kwargs) -> UsbDevice:
    if speed is not None and speed not in cls.speeds:
        names = [s.name.lower() for s in cls.speeds]
        runs_at = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise ValueError(f"the {cls.name} runs at {runs_at} speed, not {speed.name.lower()}")
    return cls(*args, speed=speed, **kwargs)


def close_devices(devices: Iterable[UsbDevice]) -> None:
    for device in devices:
        close = getattr(device, "close", None)
        if close is not None:
            close()


class EventLog:
    """Hooks observer: one plain log line per thing a user watching the VM cares about
    (controller started/stopped, a device got an address or went away)."""

    def __init__(self, controller: XhciController, say: Callable[[str], None]):
        self.hc = controller
        self.say = say

    def on_state(self, kind: str, ident: str, old: str, new: str) -> None:
        if kind == "controller":
            if new in ("running", "halted"):
                self.say(f"controller {new}")
        elif kind == "slot" and new in ("addressed", "configured", "disabled"):
            slot = self.hc.slots.get(int(ident)) if ident.isdigit() else None
            port = getattr(slot, "port", None)
            where = ""
            if port is not None:
                device = port.device
                where = f" (port {port.number}{': ' + device.name if device else ''})"
            self.say(f"slot {ident} {new}{where}")


class Backend:
    """A controller with devices on its root ports, served over vfio-user on `socket_path`.

    Everything runs on the loop that called `start`; `plug` and `unplug` must be called there
    too (from a coroutine or a loop callback), never from another thread.
    """

    def __init__(self, socket_path: str | os.PathLike, devices: Iterable[UsbDevice] = (), *,
                 usb2_ports: int = 4, usb3_ports: int = 4, msix: bool = True,
                 busy_poll_us: int = BUSY_POLL_US,
                 on_disconnect: Callable[[], None] | None = None,
                 say: Callable[[str], None] | None = None):
        self.scheduler = Scheduler(virtual=False)
        self.controller = XhciController(usb2_ports=usb2_ports, usb3_ports=usb3_ports,
                                         scheduler=self.scheduler)
        self.server = VfioUserServer(self.controller, os.fspath(socket_path),
                                     on_disconnect=on_disconnect, msix=msix,
                                     busy_poll_us=busy_poll_us)
        self.say = say
        if say is not None:
            self.controller.hooks.attach(EventLog(self.controller, say))
        self.ports: dict[int, UsbDevice] = {}
        try:
            for device in devices:
                self.plug(device)
        except ValueError:
            close_devices(devices)
            raise

    @property
    def device_arg(self) -> str:
        """QEMU's `-device` value for this server."""
        return self.server.device_arg

    @property
    def socket_path(self) -> str:
        return self.server.socket_path

    async def start(self) -> None:
        await self.server.start()

    async def wait_disconnected(self) -> str:
        return await self.server.wait_disconnected()

    def plug(self, device: UsbDevice, port: int | None = None) -> int:
        """Attach `device` (to the first free root port of its speed unless `port` is given)."""
        number = self.controller.attach(device, port)
        self.ports[number] = device
        if self.say is not None:
            self.say(f"port {number}: {device.name} plugged in ({device.speed.label})")
        return number

    def unplug(self, port: int) -> UsbDevice:
        """Detach whatever is on root port `port`; the device object stays usable for `plug`."""
        device = self.controller.detach(port)
        self.ports.pop(port, None)
        if self.say is not None:
            self.say(f"port {port}: {device.name} unplugged")
        return device

    def find(self, name: str) -> tuple[int, UsbDevice]:
        """(port, device) of the first plugged device called `name` (tablet, keyboard, ...)."""
        return self.controller.find_device(name)

    def close(self) -> None:
        """Stop serving and release the devices' files.  Safe to call twice."""
        self.server.close()
        close_devices(self.ports.values())


def memory_options(memory_mib: int) -> list[str]:
    """The QEMU options that give a guest shared RAM, as vfio-user needs for DMA."""
    return ["-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
            "-machine", "q35,memory-backend=mem", "-m", f"{memory_mib}M"]

