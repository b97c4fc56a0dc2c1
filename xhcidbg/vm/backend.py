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

import os
from collections.abc import Callable, Iterable

from ..devices.base import UsbDevice
from ..emu.controller import XhciController
from ..session import Session
from ..vfio_user import VfioUserServer
from ..vfio_user.server import BUSY_POLL_US


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


class Backend(Session):
    """A session whose transport is a vfio-user server on `socket_path`: a controller with
    devices on its root ports, for a VMM to connect to.

    Everything runs on the loop that called `start`; `plug` and `unplug` must be called there
    too (from a coroutine or a loop callback), never from another thread.
    """

    live_guest = True
    kind = "vfio-user"

    def __init__(self, socket_path: str | os.PathLike[str], devices: Iterable[UsbDevice] = (),
                 *, usb2_ports: int = 4, usb3_ports: int = 4, msix: bool = True,
                 busy_poll_us: int = BUSY_POLL_US,
                 on_disconnect: Callable[[], None] | None = None,
                 say: Callable[[str], None] | None = None):
        super().__init__(usb2_ports=usb2_ports, usb3_ports=usb3_ports, say=say)
        self.server = VfioUserServer(self.controller, os.fspath(socket_path),
                                     on_disconnect=on_disconnect, msix=msix,
                                     busy_poll_us=busy_poll_us)
        if say is not None:
            self.controller.hooks.attach(EventLog(self.controller, say))
        self.plug_all(devices)

    @property
    def device_arg(self) -> str:
        """QEMU's `-device` value for this server."""
        return self.server.device_arg

    @property
    def socket_path(self) -> str:
        return self.server.socket_path

    async def start(self) -> None:
        await self.server.start()
        await super().start()

    async def wait_disconnected(self) -> str:
        return await self.server.wait_disconnected()

    def close(self) -> None:
        """Stop serving, end the session.  Safe to call twice."""
        self.server.close()
        super().close()


def memory_options(memory_mib: int) -> list[str]:
    """The QEMU options that give a guest shared RAM, as vfio-user needs for DMA."""
    return ["-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
            "-machine", "q35,memory-backend=mem", "-m", f"{memory_mib}M"]

