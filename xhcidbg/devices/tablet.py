"""USB HID absolute pointer (a tablet, as QEMU's usb-tablet): the guest cursor goes exactly where
the host puts it, with no acceleration to fight.

Report (6 bytes, report protocol, no report ID): buttons 1-5 (left, right, middle, back,
forward) in bits 0-4, X and Y as 16-bit absolute values 0..32767, then the wheel as a signed
relative byte.  Linux binds hid-generic and maps them to BTN_LEFT.., ABS_X/ABS_Y and REL_WHEEL.

Full speed by default (like QEMU's tablet, a USB 2.0 device that runs at full or high speed);
`Tablet(speed=Speed.HIGH)` runs at high speed.  The interrupt IN endpoint is polled every 8 ms
(bInterval 8 at full speed, 2^(7-1) microframes at high speed).
"""
from __future__ import annotations

from enum import IntEnum

from .base import EpType, Speed
from .declaration import Configuration, EndpointDecl
from .hid import (
    ABSOLUTE,
    CONSTANT,
    DATA,
    RELATIVE,
    VARIABLE,
    Collection,
    CollectionType,
    GenericDesktop,
    Input,
    LogicalMaximum,
    LogicalMinimum,
    Page,
    ReportCount,
    ReportSize,
    Usage,
    UsageMaximum,
    UsageMinimum,
    UsagePage,
    report_descriptor,
)
from .hid_device import HidDevice, hid_interface

AXIS_MAX = 32767


class Button(IntEnum):
    """HID button numbers (Button page usages)."""

    LEFT = 1
    RIGHT = 2
    MIDDLE = 3
    BACK = 4
    FORWARD = 5


REPORT_DESCRIPTOR = report_descriptor(
    UsagePage(Page.GENERIC_DESKTOP),
    Usage(GenericDesktop.MOUSE),
    Collection(CollectionType.APPLICATION,
        Usage(GenericDesktop.POINTER),
        Collection(CollectionType.PHYSICAL,
            # five buttons, one bit each, then three bits of padding
            UsagePage(Page.BUTTON), UsageMinimum(Button.LEFT), UsageMaximum(Button.FORWARD),
            LogicalMinimum(0), LogicalMaximum(1), ReportCount(5), ReportSize(1),
            Input(DATA | VARIABLE | ABSOLUTE),
            ReportCount(1), ReportSize(3), Input(CONSTANT),
            # absolute X and Y
            UsagePage(Page.GENERIC_DESKTOP), Usage(GenericDesktop.X), Usage(GenericDesktop.Y),
            LogicalMinimum(0), LogicalMaximum(AXIS_MAX), ReportSize(16), ReportCount(2),
            Input(DATA | VARIABLE | ABSOLUTE),
            # wheel, relative
            Usage(GenericDesktop.WHEEL), LogicalMinimum(-127), LogicalMaximum(127),
            ReportSize(8), ReportCount(1), Input(DATA | VARIABLE | RELATIVE),
        ),
    ),
)
REPORT_LENGTH = 6


def _button(button: Button | int | str) -> Button:
    if isinstance(button, str):
        try:
            return Button[button.upper()]
        except KeyError:
            raise ValueError(f"unknown button {button!r}; buttons are "
                             + ", ".join(b.name.lower() for b in Button)) from None
    try:
        return Button(button)
    except ValueError:
        raise ValueError(f"button number must be 1..{len(Button)}, not {button!r}") from None


class Tablet(HidDevice):
    name = "tablet"
    product = "xhcidbg USB Tablet"
    serial_number = "tablet-1"
    speeds = (Speed.FULL, Speed.HIGH)
    default_speed = Speed.FULL
    configurations = (
        Configuration(1, interfaces=(
            hid_interface(0, REPORT_DESCRIPTOR, name="HID tablet", endpoints=(
                EndpointDecl(0x81, EpType.INTERRUPT, max_packet=8, interval_us=8000),)),),
            remote_wakeup=True, max_power_ma=100),
    )

    def __init__(self, speed: Speed | None = None):
        self.x = 0
        self.y = 0
        self.buttons = 0
        self._motion_report: bytes | None = None
        super().__init__(speed)

    def _report(self, wheel: int = 0) -> bytes:
        return (bytes([self.buttons]) + self.x.to_bytes(2, "little")
                + self.y.to_bytes(2, "little") + wheel.to_bytes(1, "little", signed=True))

    def input_report(self) -> bytes:
        return self._report()

    def _motion(self) -> None:
        # Motion the host has not fetched yet is replaced, not queued behind: only the latest
        # position matters.  Button and wheel reports are never merged away.
        report = self._report()
        pending_motion = self._motion_report is not None and \
            self.last_queued_report() is self._motion_report
        self.queue_report(report, replace_last=pending_motion)
        self._motion_report = report

    # ---- API -------------------------------------------------------------------------------

    def move(self, x: int, y: int) -> None:
        """Put the pointer at absolute (x, y), each 0..32767 across the whole screen."""
        self.x = max(0, min(AXIS_MAX, int(x)))
        self.y = max(0, min(AXIS_MAX, int(y)))
        self._motion()

    def press(self, button: Button | int | str = Button.LEFT) -> None:
        self.buttons |= 1 << (_button(button) - 1)
        self.queue_report(self._report())

    def release(self, button: Button | int | str = Button.LEFT) -> None:
        self.buttons &= ~(1 << (_button(button) - 1))
        self.queue_report(self._report())

    def click(self, button: Button | int | str = Button.LEFT) -> None:
        self.press(button)
        self.release(button)

    def scroll(self, clicks: int) -> None:
        """Turn the wheel: positive scrolls up (away from the user), in detents."""
        clicks = int(clicks)
        while clicks:
            step = max(-127, min(127, clicks))
            self.queue_report(self._report(step))
            clicks -= step
