"""Imported USB/IP devices on root ports: attach, detach, and `persist` across a server that
goes away (the port mapper hands `usbip://` selections here).

An import is network I/O, so `attach` starts it and returns; the device goes on its port when
the server has answered, and `say` tells how it went.  A device whose connection ends leaves the
guest; with `persist` it is imported again, every few seconds, until the server is back.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..devices.base import UsbDevice
from .client import UsbipAddress, UsbipError, import_device
from .device import ProtocolError, UsbipDevice

log = logging.getLogger("xhcidbg.usbip")

RETRY_S = 2.0


def parse_remote(text: str) -> tuple[UsbipAddress, bool]:
    """usbip://HOST[:PORT]/BUSID[,persist]: the address and whether to persist."""
    address, *flags = [w.strip() for w in text.split(",")]
    unknown = [f for f in flags if f and f != "persist"]
    if unknown:
        raise ValueError(f"{text!r}: {', '.join(unknown)} is not an option of a USB/IP "
                         "device (persist is)")
    return UsbipAddress.parse(address), "persist" in flags


@dataclass
class Remote:
    address: UsbipAddress
    persist: bool
    device: UsbipDevice
    port: int


class RemoteImports:
    def __init__(self, loop: asyncio.AbstractEventLoop,
                 plug: Callable[[UsbDevice, int | None], int],
                 unplug: Callable[[int], UsbDevice], say: Callable[[str], None]):
        self.loop = loop
        self._plug, self._unplug, self.say = plug, unplug, say
        self.attached: dict[int, Remote] = {}
        self.importing: dict[UsbipAddress, asyncio.Task[None]] = {}
        self.failed: dict[UsbipAddress, str] = {}       # the last reason an import failed

    def attach(self, text: str, port: int | None = None) -> UsbipAddress:
        """Start importing `text`; its address (see `importing`, `attached`, `failed`)."""
        address, persist = parse_remote(text)
        if address in self.importing or any(r.address == address
                                            for r in self.attached.values()):
            raise ValueError(f"{address} is attached or being imported already")
        self.failed.pop(address, None)
        self._start(address, persist, port)
        self.say(f"{address}: importing")
        return address

    def _start(self, address: UsbipAddress, persist: bool, port: int | None) -> None:
        task = self.loop.create_task(self._import(address, persist, port),
                                     name=f"import {address}")
        self.importing[address] = task
        task.add_done_callback(lambda _t: self.importing.pop(address, None))

    async def _import(self, address: UsbipAddress, persist: bool, port: int | None) -> None:
        told = False
        while True:
            try:
                reader, writer, info = await import_device(address)
                try:
                    dev = UsbipDevice(reader, writer, info, on_gone=self._gone)
                    number = self._plug(dev, port)
                except (ProtocolError, ValueError):
                    writer.close()
                    raise
                self.attached[number] = Remote(address, persist, dev, number)
                dev.start()
                self.say(f"attached {address} ({info.idVendor:04x}:{info.idProduct:04x}, "
                         f"{dev.speed.label}) on port {number}")
                return
            except (UsbipError, ProtocolError, ValueError) as e:
                self.failed[address] = str(e)
                if not persist:
                    self.say(f"{address}: {e}")
                    return
                if not told:
                    self.say(f"{address}: {e}; trying again every {RETRY_S:g} s (persist)")
                    told = True
            await asyncio.sleep(RETRY_S)

    def _gone(self, dev: UsbipDevice, why: str) -> None:
        for number, r in list(self.attached.items()):
            if r.device is dev:
                del self.attached[number]
                self._unplug(number)
                self.say(f"{r.address} left port {number}: {why}"
                         + (" (imported again when the server is back)" if r.persist else ""))
                if r.persist:
                    self._start(r.address, True, None)

    def find(self, what: int | str) -> Remote | None:
        """The import on root port `what`, or of the address `what`; None if neither."""
        if isinstance(what, int) or str(what).isdigit():
            return self.attached.get(int(what))
        try:
            address, _ = parse_remote(str(what))
        except ValueError:
            return None
        return next((r for r in self.attached.values() if r.address == address), None)

    def detach(self, what: int | str) -> Remote:
        r = self.find(what)
        if r is None:
            raise ValueError(f"no USB/IP device is attached as {what}")
        r.persist = False
        del self.attached[r.port]
        self._unplug(r.port)
        r.device.close()
        self.say(f"detached {r.address} from port {r.port}")
        return r

    def close(self) -> None:
        for task in list(self.importing.values()):
            task.cancel()
        for r in list(self.attached.values()):
            r.persist = False
        for number in list(self.attached):
            r = self.attached.pop(number)
            self._unplug(number)
            r.device.close()
