"""The host's USB devices as xhcidbg sees them, and how a user picks one.

    devices = host_devices()                         # every device libusb sees, root hubs too
    dev = Selection.parse("1d6b:0104#2,persist").pick(devices)

A selection is bhyve's `bus=1,devaddr=2`, `VID:PID` (`#N` picks the Nth of several), a port
path as sysfs names it (`1-2.3`) or `serial=S`; `persist` attaches the device again whenever it
comes back, `force` takes it from the kernel drivers bound to its interfaces.  The kernel
driver of each interface comes from sysfs (libusb only says whether there is one).
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import usb1

from ..devices.base import Speed
from . import library

SYSFS = Path("/sys/bus/usb/devices")
_SPEEDS = {usb1.SPEED_LOW: Speed.LOW, usb1.SPEED_FULL: Speed.FULL, usb1.SPEED_HIGH: Speed.HIGH,
           usb1.SPEED_SUPER: Speed.SUPER, usb1.SPEED_SUPER_PLUS: Speed.SUPER_PLUS}
ROOT_HUB_VENDOR = 0x1D6B          # the Linux Foundation: the kernel's root hubs


@dataclass
class HostInterface:
    number: int
    alternate: int
    class_code: int
    driver: str | None            # the kernel driver bound to it, if any


@dataclass
class HostDevice:
    bus: int
    ports: tuple[int, ...]        # the port path from the root hub (empty: a root hub)
    address: int
    vid: int
    pid: int
    speed: Speed | None
    manufacturer: str | None = None
    product: str | None = None
    serial: str | None = None
    configuration: int | None = None
    interfaces: list[HostInterface] = field(default_factory=list)
    access: str = "ok"            # ok, or why it cannot be opened

    @property
    def path(self) -> str:
        """The sysfs name: `1-2.3` (bus 1, port 2, then port 3 of the hub there); `usb1`."""
        return f"{self.bus}-{'.'.join(map(str, self.ports))}" if self.ports else f"usb{self.bus}"

    @property
    def id(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}"

    @property
    def root_hub(self) -> bool:
        return not self.ports

    @property
    def drivers(self) -> list[str]:
        return sorted({i.driver for i in self.interfaces if i.driver})

    def label(self) -> str:
        name = " ".join(p for p in (self.manufacturer, self.product) if p) or "(no name)"
        return f"{self.path} {self.id} {name}"

    def data(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(path=self.path, id=self.id, speed=self.speed.label if self.speed else None,
                 ports=list(self.ports), drivers=self.drivers)
        return d


def _sysfs(name: str, attr: str) -> str | None:
    try:
        return (SYSFS / name / attr).read_text().strip() or None
    except OSError:
        return None


def _interfaces(name: str, dev: usb1.USBDevice, config: int | None) -> list[HostInterface]:
    out = []
    for cfg in dev.iterConfigurations():
        if config is not None and cfg.getConfigurationValue() != config:
            continue
        for interface in cfg:
            for setting in interface:
                if setting.getAlternateSetting() != 0:
                    continue
                number = setting.getNumber()
                link = SYSFS / f"{name}:{cfg.getConfigurationValue()}.{number}" / "driver"
                driver = os.path.basename(os.readlink(link)) if link.is_symlink() else None
                out.append(HostInterface(number, 0, setting.getClass(), driver))
        break
    return out


def describe(dev: usb1.USBDevice) -> HostDevice:
    """What the host knows of one libusb device, without claiming anything."""
    ports = tuple(dev.getPortNumberList() or ())
    info = HostDevice(dev.getBusNumber(), ports, dev.getDeviceAddress(), dev.getVendorID(),
                      dev.getProductID(), _SPEEDS.get(dev.getDeviceSpeed()))
    name = info.path
    info.manufacturer = _sysfs(name, "manufacturer")
    info.product = _sysfs(name, "product")
    info.serial = _sysfs(name, "serial")
    config = _sysfs(name, "bConfigurationValue")
    info.configuration = int(config) if config and config.isdigit() else None
    with contextlib.suppress(usb1.USBError):
        info.interfaces = _interfaces(name, dev, info.configuration)
    try:
        handle = dev.open()
    except usb1.USBErrorAccess:
        info.access = f"permission denied on /dev/bus/usb/{info.bus:03d}/{info.address:03d} " \
                      "(run as root, or give your user that node with a udev rule)"
    except usb1.USBError as e:
        info.access = f"cannot be opened: {e}"
    else:
        try:
            if info.product is None:             # no sysfs (another OS, a container)
                info.manufacturer = handle.getManufacturer()
                info.product = handle.getProduct()
                info.serial = handle.getSerialNumber()
        except usb1.USBError:
            pass                        # no strings: the IDs still name it
        finally:
            handle.close()
    return info


def host_devices(ctx: usb1.USBContext | None = None) -> list[HostDevice]:
    """Every USB device of the host, root hubs included, in bus and port order."""
    own = ctx is None
    ctx = ctx or library.context()
    try:
        found = [describe(d) for d in ctx.getDeviceIterator(skip_on_error=True)]
    finally:
        if own:
            ctx.close()
    return sorted(found, key=lambda d: (d.bus, d.ports))


# ---- choosing one -------------------------------------------------------------------------------
class SelectionError(ValueError):
    """A selection that does not parse or matches no device (or several); says what to do."""


_ID = re.compile(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{4})(?:#(\d+))?")
_PATH = re.compile(r"(\d+)-(\d+(?:\.\d+)*)")
FLAGS = ("persist", "force")
MAX_DEPTH = 64


@dataclass
class Selection:
    """Which host device: by address, by VID:PID (#N), by port path or by serial."""

    text: str
    bus: int | None = None
    address: int | None = None
    vid: int | None = None
    pid: int | None = None
    nth: int | None = None
    ports: tuple[int, ...] | None = None
    serial: str | None = None
    persist: bool = False
    force: bool = False
    depth: int | None = None        # TDs in flight per endpoint (the controller's default)

    @classmethod
    def parse(cls, text: str) -> Selection:
        sel = cls(text)
        keys: dict[str, str] = {}
        for word in (w.strip() for w in text.split(",")):
            if not word:
                continue
            if word in FLAGS:
                setattr(sel, word, True)
            elif "=" in word:
                k, _, v = word.partition("=")
                keys[k.strip().lower()] = v.strip()
            elif m := _ID.fullmatch(word):
                sel.vid, sel.pid = int(m.group(1), 16), int(m.group(2), 16)
                sel.nth = int(m.group(3)) if m.group(3) else None
            elif m := _PATH.fullmatch(word):
                sel.bus = int(m.group(1))
                sel.ports = tuple(int(p) for p in m.group(2).split("."))
            else:
                raise SelectionError(f"{text!r}: {word!r} is not a device selection; use "
                                     "bus=B,devaddr=D, VID:PID[#N], a port path (1-2.3) or "
                                     "serial=S, and optionally persist, force, depth=N")
        try:
            if "bus" in keys:
                sel.bus = int(keys.pop("bus"), 0)
            for k in ("devaddr", "addr", "address"):
                if k in keys:
                    sel.address = int(keys.pop(k), 0)
        except ValueError:
            raise SelectionError(f"{text!r}: bus and devaddr are numbers") from None
        if "serial" in keys:
            sel.serial = keys.pop("serial")
        if "depth" in keys:
            depth = keys.pop("depth")
            if not depth.isdigit() or not 1 <= int(depth) <= MAX_DEPTH:
                raise SelectionError(f"{text!r}: depth is the number of transfers in flight "
                                     f"per endpoint, 1 to {MAX_DEPTH}")
            sel.depth = int(depth)
        if keys:
            raise SelectionError(f"{text!r}: unknown key {', '.join(keys)} (bus, devaddr, "
                                 "serial, depth)")
        if sel.address is not None and sel.bus is None:
            raise SelectionError(f"{text!r}: devaddr needs bus= too (bus=1,devaddr=2)")
        if not any(v is not None for v in (sel.bus, sel.vid, sel.serial)):
            raise SelectionError(f"{text!r} selects nothing; use bus=B,devaddr=D, VID:PID, "
                                 "a port path (1-2.3) or serial=S")
        return sel

    def matches(self, dev: HostDevice) -> bool:
        return ((self.bus is None or dev.bus == self.bus)
                and (self.address is None or dev.address == self.address)
                and (self.ports is None or dev.ports == self.ports)
                and (self.vid is None or (dev.vid, dev.pid) == (self.vid, self.pid))
                and (self.serial is None or dev.serial == self.serial))

    def pick(self, devices: list[HostDevice]) -> HostDevice:
        """The one device this selection means; SelectionError with advice otherwise."""
        found = [d for d in devices if self.matches(d) and not d.root_hub]
        if not found:
            raise SelectionError(f"no host USB device matches {self.text!r} (`xhcidbg devices` "
                                 "lists them)")
        if self.nth is not None:
            if not 1 <= self.nth <= len(found):
                raise SelectionError(f"{self.text!r}: there are {len(found)} such devices; "
                                     f"#1..#{len(found)}")
            return found[self.nth - 1]
        if len(found) > 1:
            listed = "; ".join(d.label() for d in found)
            raise SelectionError(f"{self.text!r} matches {len(found)} devices ({listed}); "
                                 f"add #1..#{len(found)} or select by port path")
        return found[0]

    def same_device_later(self, dev: HostDevice) -> Selection:
        """What finds `dev` again after it was unplugged and plugged back (persist): its
        address changes, its port path and IDs do not."""
        again = Selection(self.text, bus=dev.bus, ports=dev.ports, persist=self.persist,
                          force=self.force, depth=self.depth)
        if self.ports is None and self.address is None and self.vid is not None:
            # chosen by what it is, not where: it may come back on another port
            again = Selection(self.text, vid=dev.vid, pid=dev.pid, serial=dev.serial,
                              persist=self.persist, force=self.force, depth=self.depth)
        return again
