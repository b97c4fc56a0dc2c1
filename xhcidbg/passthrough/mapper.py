"""The port mapper: host USB devices on the controller's root ports, attached and detached at
any time, several at once, beside the virtual devices.

    mapper = PortMapper(controller, asyncio.get_running_loop())
    port = mapper.attach("0525:a4a0")            # by the speed it runs at on the host
    mapper.attach("bus=1,devaddr=5,persist")     # and again whenever it comes back
    mapper.detach(port)
    mapper.close()                               # every device back to the host

It reaches the controller only through its public attach/detach; libusb's events run on the
loop (`LoopEvents`), hotplug included: a device pulled out on the host leaves the guest, and
one selected with `persist` is attached again when it returns.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import usb1

from ..devices.base import UsbDevice
from ..usbip.remote import RemoteImports
from . import library
from .device import PassthroughDevice
from .host import HostDevice, Selection, SelectionError, describe, host_devices
from .loop import LoopEvents

if TYPE_CHECKING:
    from ..emu.controller import XhciController

log = logging.getLogger("xhcidbg.passthrough")


@dataclass
class Attached:
    selection: Selection
    device: PassthroughDevice
    port: int


class PortMapper:
    def __init__(self, controller: XhciController, loop: asyncio.AbstractEventLoop,
                 say: Callable[[str], None] | None = None,
                 plug: Callable[[UsbDevice, int | None], int] | None = None,
                 unplug: Callable[[int], UsbDevice] | None = None):
        self.controller = controller
        # how a device goes on and off a root port: the session's plug/unplug, which keep its
        # own records, or the controller's own
        self._plug = plug or controller.attach
        self._unplug = unplug or controller.detach
        self.loop = loop
        self.say = say or (lambda text: log.info("%s", text))
        self.ctx = library.context()
        self.events = LoopEvents(self.ctx, loop)
        self.attached: dict[int, Attached] = {}          # root port -> what is there
        self.waiting: list[Selection] = []               # persist selections that are away
        # devices of other machines (usbip://HOST[:PORT]/BUSID selections)
        self.remote = RemoteImports(loop, self._plug, self._unplug, self.say)
        self._hotplug: int | None = None
        if self.ctx.hasCapability(usb1.CAP_HAS_HOTPLUG):
            self._hotplug = self.ctx.hotplugRegisterCallback(
                self._hotplug_event, events=usb1.HOTPLUG_EVENT_DEVICE_ARRIVED
                | usb1.HOTPLUG_EVENT_DEVICE_LEFT, flags=usb1.HOTPLUG_NO_FLAGS)

    # ---- attaching -----------------------------------------------------------------------------
    def devices(self) -> list[HostDevice]:
        return host_devices(self.ctx)

    def attach(self, text: str | Selection, port: int | None = None) -> int | None:
        """Attach the host device `text` selects; returns its root port (None: a `persist`
        selection whose device is not there yet, attached when it comes; a USB/IP device,
        imported in the background).  SelectionError or PermissionError (with what to do) when
        it cannot be."""
        if isinstance(text, str) and text.strip().startswith("usbip://"):
            self.remote.attach(text, port)
            return None
        sel = text if isinstance(text, Selection) else Selection.parse(text)
        devices = self.devices()
        if sel.persist and not any(sel.matches(d) and not d.root_hub for d in devices):
            self.waiting.append(sel)
            self.say(f"{sel.text}: not on the host yet; attached when it comes")
            return None
        info = sel.pick(devices)
        for a in self.attached.values():
            if (a.device.info.bus, a.device.info.address) == (info.bus, info.address):
                raise SelectionError(f"{info.label()} is attached already (port {a.port})")
        usb = next((d for d in self.ctx.getDeviceIterator(skip_on_error=True)
                    if (d.getBusNumber(), d.getDeviceAddress()) == (info.bus, info.address)),
                   None)
        if usb is None:
            raise SelectionError(f"{info.label()} went away")
        try:
            handle = usb.open()
        except usb1.USBErrorAccess:
            raise PermissionError(f"{info.label()}: {describe(usb).access}") from None
        except usb1.USBError as e:
            raise SelectionError(f"{info.label()} cannot be opened: {e}") from None
        try:
            dev = PassthroughDevice(handle, info, force=sel.force, on_gone=self._gone,
                                    loop=self.loop)
            dev.queue_depth = sel.depth
        except usb1.USBErrorBusy:
            handle.close()
            raise PermissionError(f"{info.label()}: another program has claimed it (close it, "
                                  "or detach it there)") from None
        except BaseException:
            handle.close()
            raise
        try:
            number = self._plug(dev, port)
        except ValueError:
            self._release(dev)
            raise
        self.attached[number] = Attached(sel.same_device_later(info), dev, number)
        self.say(f"attached {info.label()} ({dev.speed.label}) on port {number}")
        return number

    def detach(self, what: int | str) -> HostDevice:
        """Detach by root port or by selection; the device goes back to the host."""
        a = self.find(what)
        a.selection.persist = False
        del self.attached[a.port]
        self._unplug(a.port)
        self._release(a.device)
        self.say(f"detached {a.device.info.label()} from port {a.port}")
        return a.device.info

    def find(self, what: int | str) -> Attached:
        """What is attached on root port `what`, or matches the selection `what`."""
        if isinstance(what, int) or str(what).isdigit():
            a = self.attached.get(int(what))
            if a is None:
                raise SelectionError(f"no host device is attached on port {what}")
            return a
        sel = Selection.parse(str(what))
        found = [a for a in self.attached.values() if sel.matches(a.device.info)]
        if len(found) != 1:
            raise SelectionError(f"{what!r} matches {len(found)} attached devices")
        return found[0]

    # ---- leaving and coming back ---------------------------------------------------------------
    def _gone(self, dev: PassthroughDevice) -> None:
        """The device vanished from the host (the port was unplugged already)."""
        for number, a in list(self.attached.items()):
            if a.device is dev:
                del self.attached[number]
                port = self.controller.port(number)
                if port is not None and port.device is dev:
                    self._unplug(number)
                self.say(f"{dev.info.label()} left the host; port {number} is empty"
                         + (" (it is attached again when it comes back)"
                            if a.selection.persist else ""))
                if a.selection.persist:
                    self.waiting.append(a.selection)
        # not from inside libusb's callback: the close lets libusb run events
        self.loop.call_soon(self._release, dev)

    def _hotplug_event(self, _ctx: usb1.USBContext, usb: usb1.USBDevice, event: int) -> bool:
        try:
            key = (usb.getBusNumber(), usb.getDeviceAddress())
            if event == usb1.HOTPLUG_EVENT_DEVICE_LEFT:
                for a in list(self.attached.values()):
                    if (a.device.info.bus, a.device.info.address) == key:
                        a.device._gone()
            elif self.waiting:
                self.loop.call_soon(self._came_back)
        except Exception:
            log.exception("hotplug event failed")
        return False                               # stay registered

    def _came_back(self) -> None:
        devices = self.devices()
        for sel in list(self.waiting):
            if any(sel.matches(d) and not d.root_hub for d in devices):
                self.waiting.remove(sel)
                try:
                    self.attach(sel)
                except (SelectionError, PermissionError, ValueError) as e:
                    self.say(f"{sel.text}: came back but cannot be attached: {e}")

    # ---- the end -------------------------------------------------------------------------------
    def _pump(self) -> None:
        with contextlib.suppress(usb1.USBError):
            self.ctx.handleEventsTimeout(0.01)

    def _release(self, dev: PassthroughDevice) -> None:
        try:
            dev.close(self._pump)
        except Exception:
            log.exception("%s: giving it back to the host failed", dev.name)

    def close(self) -> None:
        """Every attached device back to the host and its kernel drivers, every import ended;
        safe to call twice."""
        self.remote.close()
        for number in list(self.attached):
            a = self.attached.pop(number)
            port = self.controller.port(number)
            if port is not None and port.device is a.device:
                self._unplug(number)
            self._release(a.device)
        self.waiting.clear()
        if self._hotplug is not None:
            with contextlib.suppress(usb1.USBError):
                self.ctx.hotplugDeregisterCallback(self._hotplug)
            self._hotplug = None
        self.events.close()
        self.ctx.close()
