"""The devices a session plugs in: the command-line options that choose them (declared once, for
`xhcidbg`, `xhcidbg serve` and `xhcidbg vm`) and the one place that builds devices from them.

    parser = argparse.ArgumentParser()
    add_device_options(parser, scratch_stick=False)      # serve / vm: tablet and keyboard
    devices = make_devices(device_choice(parser.parse_args(["--storage", "disk.img"])))
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..devices import Keyboard, LoopbackDevice, Speed, StorageDevice, Tablet, UsbDevice
from ..devices.base import SPEED_NAMES
from ..devices.standard import StandardDevice

_CLASSES: dict[str, type[StandardDevice]] = {
    "tablet": Tablet, "keyboard": Keyboard, "storage": StorageDevice, "loopback": LoopbackDevice}
DEVICE_NAMES = tuple(_CLASSES)
SPEEDS = SPEED_NAMES
SCRATCH_STICK_MIB = 64


@dataclass
class DeviceChoice:
    """Which virtual devices to plug in at start (the command-line options, as data)."""

    tablet: bool = True
    keyboard: bool = True
    storage: list[str] = field(default_factory=list)      # one stick per image
    storage_size_mib: int | None = None                   # create missing images this size
    scratch_stick: bool = False      # one more stick, on a fresh temporary image
    storage_readonly: bool = False
    loopback: bool = False
    speeds: dict[str, Speed] = field(default_factory=dict)    # absent: the device's default
    attach: list[str] = field(default_factory=list)     # host devices to pass through (SEL)


def make_devices(choice: DeviceChoice, say: Callable[[str], None] | None = None
                 ) -> list[UsbDevice]:
    """The devices `choice` asks for, in port order (tablet, keyboard, sticks, loopback).

    Creates each missing image as a sparse file when `choice.storage_size_mib` says so (and
    tells `say`).  Raises ValueError, with a message for the user, if a device cannot be made:
    a missing image, a speed the device does not run at."""
    if "storage" in choice.speeds and not (choice.storage or choice.scratch_stick):
        raise ValueError("--speed storage=... needs a --storage IMAGE")
    if "loopback" in choice.speeds and not choice.loopback:
        raise ValueError("--speed loopback=... needs --loopback")
    for image in choice.storage:
        if choice.storage_size_mib is not None and not os.path.exists(image):
            create_image(image, choice.storage_size_mib)
            if say is not None:
                say(f"created {image} ({choice.storage_size_mib} MiB, sparse)")
    images: list[str | None] = [*choice.storage, *([None] if choice.scratch_stick else [])]
    made: list[UsbDevice] = []
    try:
        for name, wanted in (("tablet", choice.tablet), ("keyboard", choice.keyboard)):
            if wanted:
                made.append(make_device(name, speed=choice.speeds.get(name)))
        for path in images:
            made.append(make_device("storage", image=path, speed=choice.speeds.get("storage"),
                                    readonly=choice.storage_readonly,
                                    scratch_mib=choice.storage_size_mib or SCRATCH_STICK_MIB))
        if choice.loopback:
            made.append(make_device("loopback", speed=choice.speeds.get("loopback")))
    except BaseException:
        close_devices(made)
        raise
    return made


def make_device(name: str, *, image: str | None = None, speed: Speed | None = None,
                readonly: bool = False, scratch_mib: int = SCRATCH_STICK_MIB) -> UsbDevice:
    """One virtual device by name; a stick without `image` gets a fresh temporary one of
    `scratch_mib` MiB."""
    cls = _CLASSES.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown device {name!r}: {', '.join(DEVICE_NAMES)}")
    if speed is not None and speed not in cls.speeds:
        names = [s.name.lower() for s in cls.speeds]
        runs_at = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise ValueError(f"the {cls.name} runs at {runs_at} speed, not {speed.name.lower()}")
    if cls is StorageDevice:
        if image is None:
            image = scratch_image(scratch_mib)
        elif not os.path.isfile(image):
            raise ValueError(f"storage image {image!r} does not exist (make one with "
                             f"`truncate -s 64M {image}`, or pass --storage-size)")
        return StorageDevice(image, readonly=readonly, speed=speed)
    return cls(speed=speed)


def close_devices(devices: Iterable[UsbDevice]) -> None:
    """Release what the devices hold (a stick's image file)."""
    for device in devices:
        close = getattr(device, "close", None)
        if close is not None:
            close()


# ---- images ---------------------------------------------------------------------------------
def create_image(path: str, size_mib: int) -> None:
    if size_mib < 1:
        raise ValueError("--storage-size must be at least 1 MiB")
    with open(path, "xb") as f:
        f.truncate(size_mib << 20)


def scratch_image(size_mib: int) -> str:
    """A fresh sparse image in the temporary folder, removed when the process exits."""
    if size_mib < 1:
        raise ValueError("--storage-size must be at least 1 MiB")
    fd, path = tempfile.mkstemp(prefix="xhcidbg-storage-", suffix=".img")
    try:
        os.ftruncate(fd, size_mib << 20)
    finally:
        os.close(fd)
    _scratch_images.append(path)
    return path


_scratch_images: list[str] = []


@atexit.register
def _remove_scratch_images() -> None:
    while _scratch_images:
        with contextlib.suppress(OSError):
            os.unlink(_scratch_images.pop())


# ---- the command-line options ---------------------------------------------------------------
def _speed_setting(text: str) -> tuple[str, Speed]:
    device, sep, speed = text.partition("=")
    if not sep or device not in DEVICE_NAMES or speed not in SPEEDS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected DEVICE=SPEED with DEVICE one of {', '.join(DEVICE_NAMES)} and "
            f"SPEED one of {', '.join(SPEEDS)}")
    return device, SPEEDS[speed]


def add_device_options(parser: argparse.ArgumentParser, *, scratch_stick: bool) -> None:
    """The device options.  With `scratch_stick` (the console) a stick on a temporary image is
    plugged in unless --storage names images or --no-storage says none."""
    if scratch_stick:
        title = (f"devices (a tablet, a keyboard and a temporary {SCRATCH_STICK_MIB} MiB "
                 f"storage stick unless told otherwise)")
    else:
        title = "devices (a tablet and a keyboard unless told otherwise)"
    g = parser.add_argument_group(title)
    g.add_argument("--no-tablet", action="store_true", help="do not plug the tablet in")
    g.add_argument("--no-keyboard", action="store_true", help="do not plug the keyboard in")
    g.add_argument("--storage", metavar="IMAGE", action="append", default=[],
                   help="plug a mass-storage stick serving IMAGE (repeat for more sticks)")
    if scratch_stick:
        g.add_argument("--no-storage", action="store_true",
                       help="do not plug any storage stick in")
        size_help = (f"size of the temporary stick's image (default {SCRATCH_STICK_MIB}); "
                     f"also creates each missing --storage IMAGE as a sparse file this size")
    else:
        size_help = "create each missing --storage IMAGE as a sparse file of MIB MiB"
    g.add_argument("--storage-size", metavar="MIB", type=int, help=size_help)
    g.add_argument("--storage-readonly", action="store_true",
                   help="the sticks are write protected")
    g.add_argument("--loopback", action="store_true",
                   help="plug a Gadget Zero source/sink + loopback device in (Linux: usbtest)")
    g.add_argument("--speed", metavar="DEVICE=SPEED", type=_speed_setting, action="append",
                   default=[], help="run a device at another speed: low, full, high or super "
                                    "(e.g. storage=high, keyboard=low)")
    g.add_argument("--attach", metavar="SEL", action="append", default=[],
                   help="pass a host USB device through (repeatable): bus=B,devaddr=D, "
                        "VID:PID[#N], a port path (1-2.3) or serial=S; add ,persist to attach "
                        "it again whenever it comes back, ,force to take it from its kernel "
                        "driver, ,depth=N for N transfers in flight per endpoint (`xhcidbg "
                        "devices` lists them)")


def device_choice(args: argparse.Namespace) -> DeviceChoice:
    """The DeviceChoice of options parsed by a parser `add_device_options` set up."""
    no_storage = getattr(args, "no_storage", None)
    return DeviceChoice(
        tablet=not args.no_tablet, keyboard=not args.no_keyboard,
        storage=[] if no_storage else list(args.storage),
        storage_size_mib=args.storage_size,
        scratch_stick=no_storage is False and not args.storage,
        storage_readonly=args.storage_readonly, loopback=args.loopback,
        speeds=dict(args.speed), attach=list(getattr(args, "attach", []) or []))
