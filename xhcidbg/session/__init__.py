"""The session every command that runs a controller builds (`xhcidbg`, `xhcidbg serve`,
`xhcidbg vm`): a controller, its devices, the session's capture and clock, on one asyncio loop.

`devices` declares the device options once and builds devices from them; `clock` is the one
driver of the controller's scheduler from asyncio; `Session` holds it all together, and a
transport (the in-process bus, the vfio-user server) is what each command adds to it.
"""
from .clock import LoopClock
from .devices import (
    DEVICE_NAMES,
    SCRATCH_STICK_MIB,
    SPEEDS,
    DeviceChoice,
    add_device_options,
    close_devices,
    device_choice,
    make_device,
    make_devices,
)
from .session import Session

__all__ = ["DEVICE_NAMES", "SCRATCH_STICK_MIB", "SPEEDS", "DeviceChoice", "LoopClock", "Session",
           "add_device_options", "close_devices", "device_choice", "make_device", "make_devices"]
