"""USB HID keyboard, boot protocol compatible (interface subclass 1, protocol 1).

Its report descriptor describes exactly the 8-byte boot report (modifier bits, a reserved byte,
six key slots), so BIOS/UEFI boot drivers and Linux usbhid read the same bytes in either
protocol.  The host sets the LEDs with SET_REPORT(Output) on the control pipe (there is no
interrupt OUT endpoint, as on most boot keyboards).

API: `type("Hello\\n")` (US layout; shift is pressed as needed), `key_down("ctrl")`,
`key_up("ctrl")`, `tap("f1")`, and `leds` (what the host last set).
"""
from __future__ import annotations

from enum import IntFlag

from .base import EpType, Speed
from .declaration import Configuration, EndpointDecl
from .hid import (
    ABSOLUTE,
    ARRAY,
    CONSTANT,
    DATA,
    VARIABLE,
    Collection,
    CollectionType,
    GenericDesktop,
    Input,
    LogicalMaximum,
    LogicalMinimum,
    Output,
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

MAX_KEYCODE = 0x65          # Keyboard Application: the last usage of the boot key range
ERROR_ROLLOVER = 0x01       # every key slot reports this when more than six keys are down
BOOT_SUBCLASS, KEYBOARD_PROTOCOL = 1, 1

REPORT_DESCRIPTOR = report_descriptor(
    UsagePage(Page.GENERIC_DESKTOP),
    Usage(GenericDesktop.KEYBOARD),
    Collection(CollectionType.APPLICATION,
        # byte 0: modifier keys, Left Control (0xE0) .. Right GUI (0xE7)
        UsagePage(Page.KEYBOARD), UsageMinimum(0xE0), UsageMaximum(0xE7),
        LogicalMinimum(0), LogicalMaximum(1), ReportSize(1), ReportCount(8),
        Input(DATA | VARIABLE | ABSOLUTE),
        # byte 1: reserved
        ReportCount(1), ReportSize(8), Input(CONSTANT),
        # output byte: five LEDs and padding
        ReportCount(5), ReportSize(1), UsagePage(Page.LED), UsageMinimum(1), UsageMaximum(5),
        Output(DATA | VARIABLE | ABSOLUTE),
        ReportCount(1), ReportSize(3), Output(CONSTANT),
        # bytes 2-7: up to six keys down, as an array of usages
        ReportCount(6), ReportSize(8), LogicalMinimum(0), LogicalMaximum(MAX_KEYCODE),
        UsagePage(Page.KEYBOARD), UsageMinimum(0), UsageMaximum(MAX_KEYCODE),
        Input(DATA | ARRAY | ABSOLUTE),
    ),
)
REPORT_LENGTH = 8


class Leds(IntFlag):
    NUM_LOCK = 0x01
    CAPS_LOCK = 0x02
    SCROLL_LOCK = 0x04
    COMPOSE = 0x08
    KANA = 0x10


MODIFIERS = {
    "left_ctrl": 0xE0, "left_shift": 0xE1, "left_alt": 0xE2, "left_gui": 0xE3,
    "right_ctrl": 0xE4, "right_shift": 0xE5, "right_alt": 0xE6, "right_gui": 0xE7,
}
_ALIASES = {"ctrl": "left_ctrl", "control": "left_ctrl", "shift": "left_shift",
            "alt": "left_alt", "gui": "left_gui", "meta": "left_gui", "super": "left_gui",
            "win": "left_gui", "altgr": "right_alt", "return": "enter", "escape": "esc",
            "del": "delete", "ins": "insert", "pgup": "page_up", "pgdn": "page_down",
            "menu": "application", "caps": "caps_lock", "bksp": "backspace"}

KEYS: dict[str, int] = {
    **{chr(ord("a") + i): 0x04 + i for i in range(26)},
    **{str(d): 0x1E + (d - 1) for d in range(1, 10)}, "0": 0x27,
    "enter": 0x28, "esc": 0x29, "backspace": 0x2A, "tab": 0x2B, "space": 0x2C,
    "minus": 0x2D, "equal": 0x2E, "left_bracket": 0x2F, "right_bracket": 0x30,
    "backslash": 0x31, "semicolon": 0x33, "apostrophe": 0x34, "grave": 0x35, "comma": 0x36,
    "period": 0x37, "slash": 0x38, "caps_lock": 0x39,
    **{f"f{n}": 0x3A + n - 1 for n in range(1, 13)},
    "print_screen": 0x46, "scroll_lock": 0x47, "pause": 0x48, "insert": 0x49, "home": 0x4A,
    "page_up": 0x4B, "delete": 0x4C, "end": 0x4D, "page_down": 0x4E, "right": 0x4F,
    "left": 0x50, "down": 0x51, "up": 0x52, "num_lock": 0x53, "kp_slash": 0x54,
    "kp_asterisk": 0x55, "kp_minus": 0x56, "kp_plus": 0x57, "kp_enter": 0x58,
    **{f"kp_{d}": 0x59 + d - 1 for d in range(1, 10)}, "kp_0": 0x62, "kp_period": 0x63,
    "non_us_backslash": 0x64, "application": 0x65,
    **MODIFIERS,
}

# US layout: character -> (usage, shift needed)
_UNSHIFTED = "`1234567890-=[]\\;',./"
_SHIFTED = "~!@#$%^&*()_+{}|:\"<>?"
_USAGE_OF = {"`": 0x35, "-": 0x2D, "=": 0x2E, "[": 0x2F, "]": 0x30, "\\": 0x31, ";": 0x33,
             "'": 0x34, ",": 0x36, ".": 0x37, "/": 0x38}
US_LAYOUT: dict[str, tuple[int, bool]] = {
    **{ch: (KEYS[ch], False) for ch in "abcdefghijklmnopqrstuvwxyz0123456789"},
    **{ch.upper(): (KEYS[ch], True) for ch in "abcdefghijklmnopqrstuvwxyz"},
    **{ch: (_USAGE_OF[ch], False) for ch in _USAGE_OF},
    **{s: (KEYS[u] if u.isalnum() else _USAGE_OF[u], True)
       for u, s in zip(_UNSHIFTED, _SHIFTED, strict=True)},
    " ": (0x2C, False), "\n": (0x28, False), "\t": (0x2B, False), "\b": (0x2A, False),
}
SHIFT = MODIFIERS["left_shift"]


def keycode(key: int | str) -> int:
    """A HID usage from a usage number, a key name ('enter', 'f5', 'left_ctrl', 'ctrl'...) or a
    single character (its unshifted key)."""
    if isinstance(key, int):
        code = key
    elif isinstance(key, str):
        name = key.lower().replace("-", "_").replace(" ", "_")
        name = _ALIASES.get(name, name)
        if name in KEYS:
            code = KEYS[name]
        elif len(key) == 1 and key in US_LAYOUT:
            code = US_LAYOUT[key][0]
        else:
            raise ValueError(f"unknown key {key!r}")
    else:
        raise TypeError(f"key must be a usage number or a name, not {type(key).__name__}")
    if not (0 < code <= MAX_KEYCODE or 0xE0 <= code <= 0xE7):
        raise ValueError(f"key usage 0x{code:02x} is outside what a boot keyboard reports")
    return code


class Keyboard(HidDevice):
    name = "keyboard"
    product = "xhcidbg USB Keyboard"
    serial_number = "keyboard-1"
    speeds = (Speed.LOW, Speed.FULL, Speed.HIGH)
    default_speed = Speed.FULL
    default_idle = 125          # 500 ms, the boot keyboard default (HID 1.11 7.2.4)
    configurations = (
        Configuration(1, interfaces=(
            hid_interface(0, REPORT_DESCRIPTOR, subclass=BOOT_SUBCLASS,
                          protocol=KEYBOARD_PROTOCOL, name="HID keyboard", endpoints=(
                              EndpointDecl(0x81, EpType.INTERRUPT, max_packet=8,
                                           interval_us=8000),)),),
            remote_wakeup=True, max_power_ma=100),
    )

    def __init__(self, speed: Speed | None = None):
        self._modifiers = 0
        self._down: list[int] = []        # non-modifier keys, in press order
        self._leds = Leds(0)
        super().__init__(speed)

    @property
    def leds(self) -> Leds:
        """The LED state the host last set with SET_REPORT(Output)."""
        return self._leds

    def _report(self, modifiers: int, keys: list[int]) -> bytes:
        slots = keys if len(keys) <= 6 else [ERROR_ROLLOVER] * 6
        return bytes([modifiers, 0, *slots, *([0] * (6 - len(slots)))])

    def input_report(self) -> bytes:
        return self._report(self._modifiers, self._down)

    def set_output_report(self, data: bytes) -> None:
        if data:
            self._leds = Leds(data[0] & 0x1F)

    def get_output_report(self) -> bytes:
        return bytes([self._leds])

    def on_reset(self) -> None:
        super().on_reset()
        self._leds = Leds(0)

    # ---- API -------------------------------------------------------------------------------

    def key_down(self, key: int | str) -> None:
        code = keycode(key)
        if code >= 0xE0:
            self._modifiers |= 1 << (code - 0xE0)
        elif code not in self._down:
            self._down.append(code)
        self.queue_report(self.input_report())

    def key_up(self, key: int | str) -> None:
        code = keycode(key)
        if code >= 0xE0:
            self._modifiers &= ~(1 << (code - 0xE0))
        elif code in self._down:
            self._down.remove(code)
        self.queue_report(self.input_report())

    def tap(self, *keys: int | str) -> None:
        """Press the keys in order (a chord such as tap('ctrl', 'alt', 'delete')), then
        release them in reverse."""
        for key in keys:
            self.key_down(key)
        for key in reversed(keys):
            self.key_up(key)

    def type(self, text: str) -> None:
        """Type text on a US layout: one press and one release report per character, with
        shift added for characters that need it.  Keys held with key_down stay held."""
        strokes = []
        for ch in text:
            if ch == "\r":
                continue
            if ch not in US_LAYOUT:
                raise ValueError(f"cannot type {ch!r} on a US keyboard layout")
            strokes.append(US_LAYOUT[ch])
        for code, shift in strokes:
            modifiers = self._modifiers | (1 << (SHIFT - 0xE0) if shift else 0)
            keys = [*self._down, code] if code not in self._down else self._down
            self.queue_report(self._report(modifiers, keys))
            self.queue_report(self.input_report())
