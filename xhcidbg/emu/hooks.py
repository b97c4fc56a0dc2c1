"""The controller's one observer interface.

The controller announces what it does here; the console, the tracer and the fault engine attach
here and nowhere else.  Each announcement is a list of callables; the controller tests the list
before building any argument, so an announcement nobody listens to costs one attribute load.

An observer is any object with some of the `on_<name>` methods below; `Hooks.attach` subscribes
each one it has.  Announcements marked *mutable* pass an object the observer may change: that is
how a fault rule rewrites a completion code, drops an event or vetoes a command.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..devices.base import UsbTransfer
from .memory import DmaListener
from .trb import Trb

# name -> (arguments, what it means)
ANNOUNCEMENTS = {
    "mmio": "(access: MmioAccess) a BAR access: a read after the controller answered it, "
            "its value may be rewritten; a write before it lands, its value may be rewritten "
            "or the write dropped (mutable)",
    "doorbell": "(slot: int, target: int, stream: int) a doorbell register was written",
    "trb": "(ring: str, trb: Trb) a TRB was fetched from a ring ('cmd' or 'slot/dci')",
    "command_start": "(start: CommandStart) a command TRB is next and has not run yet; an "
                     "observer that pauses the gate and sets start.hold leaves it on the ring; "
                     "start.withhold takes it and never completes it (mutable)",
    "command": "(cmd: CommandResult) a command finished; cc/slot may be rewritten (mutable)",
    "event": "(ev: EventRecord) an event is about to be written; may be rewritten or dropped "
             "(mutable)",
    "event_posted": "(ev: EventRecord) an event was written to the event ring",
    "urb_submit": "(rec: TransferRecord) a transfer was handed to a device",
    "urb_complete": "(rec: TransferRecord) a device finished a transfer; rec.xfer.status, "
                    "rec.xfer.actual and the IN data may be rewritten, and rec.force_cc, "
                    "force_residue, force_state, delay_ns and withhold set (mutable)",
    "urb_retired": "(rec: TransferRecord) the controller retired the transfer: rec.cc is the "
                   "completion code it posted",
    "port": "(port: int, old: int, new: int) a root port's PORTSC changed",
    "state": "(kind: str, ident: str, old: str, new: str) a slot, endpoint, port or "
             "controller changed state",
    "interrupt": "(signal: InterruptSignal) an interrupter asserts its interrupt; set "
                 "signal.lost and its MSI/MSI-X message never reaches the host (mutable)",
    "log": "(level: str, message: str) the controller refused guest input or noticed trouble",
    "dma": "(write: bool, addr: int, length: int, data: bytes-like) the controller read guest "
           "memory, or is about to write it (`mem.peek` still shows the old bytes); only the "
           "controller's own accesses: a guest writing its RAM is seen when the controller "
           "next reads it",
}


@dataclass(eq=False, slots=True)
class TransferRecord:
    """One transfer as observers see it: what the device got (`xfer`, the device contract and
    nothing more) and where it went and what came of it on the controller's side."""

    xfer: UsbTransfer
    slot: int
    dci: int
    port: int
    bus: int                   # usbmon bus number: 1 the USB 2 root hub, 2 the USB 3 one
    devnum: int                # the device's USB address when it was submitted
    submitted_ns: int = 0      # 0: submitted before anyone was watching
    iso_frame: int = 0         # the frame an isochronous TD was scheduled in
    completed_ns: int = 0      # when the device finished it
    cc: int | None = None      # the completion code the controller posted (None until then)
    note: str = ""             # why an observer changed it (goes into traces)
    internal: bool = False     # the controller's own request (SET_ADDRESS in Address Device)
    trbs: tuple[int, ...] = ()  # guest addresses of the TD's TRBs in ring order (none: internal)
    # set at urb_complete by an observer that changes the outcome (the fault engine):
    force_cc: int | None = None      # post this completion code, whatever the bus said
    force_residue: int | None = None  # ... with this residual length in its event
    force_state: str | None = None   # the endpoint afterwards: "running", "halted" or "error"
    delay_ns: int = 0                # retire the TD this much later
    withhold: bool = False           # never retire it (the guest's timeout and abort paths)


@dataclass(slots=True)
class MmioAccess:
    """One BAR0 access.  Observers that show register names look them up by `offset`
    (`XhciController.register_name`): the MMIO path does not build names."""

    write: bool
    offset: int
    size: int
    value: int
    drop: bool = False         # set by an observer: the write does not reach the register


@dataclass
class EventRecord:
    interrupter: int
    dwords: list[int]
    addr: int = 0              # where it was written (0 until posted)
    drop: bool = False         # set by an observer to suppress it
    note: str = ""             # why an observer changed it (goes into traces)


@dataclass(slots=True)
class InterruptSignal:
    interrupter: int
    lost: bool = False         # set by an observer: the message is not sent (IP still clears)


@dataclass(slots=True)
class CommandStart:
    trb: Trb                   # the command TRB, not yet consumed from the ring
    hold: bool = False         # set: the command stays where it is until the gate runs again
    withhold: bool = False     # set: the command is taken and never completes (until aborted)


@dataclass
class CommandResult:
    trb: Trb                   # the command TRB
    cc: int
    slot: int = 0
    param: int = 0             # Command Completion Parameter
    note: str = ""


class Hooks:
    """One list of callables per announcement (see ANNOUNCEMENTS for the arguments)."""

    __slots__ = (*(f"on_{n}" for n in ANNOUNCEMENTS), "_observers")

    on_mmio: list[Callable[[MmioAccess], None]]
    on_doorbell: list[Callable[[int, int, int], None]]
    on_trb: list[Callable[[str, Trb], None]]
    on_command_start: list[Callable[[CommandStart], None]]
    on_command: list[Callable[[CommandResult], None]]
    on_event: list[Callable[[EventRecord], None]]
    on_event_posted: list[Callable[[EventRecord], None]]
    on_urb_submit: list[Callable[[TransferRecord], None]]
    on_urb_complete: list[Callable[[TransferRecord], None]]
    on_urb_retired: list[Callable[[TransferRecord], None]]
    on_port: list[Callable[[int, int, int], None]]
    on_state: list[Callable[[str, str, str, str], None]]
    on_interrupt: list[Callable[[InterruptSignal], None]]
    on_log: list[Callable[[str, str], None]]
    on_dma: list[DmaListener]

    def __init__(self) -> None:
        for n in ANNOUNCEMENTS:
            setattr(self, f"on_{n}", [])
        self._observers: list[Any] = []

    def attach(self, observer: Any, first: bool = False) -> Any:
        """Subscribe every `on_<name>` method `observer` defines; returns the observer.
        `first=True` puts it ahead of the others: observers that rewrite (the fault engine)
        go first so that observers that record (the tracer) see the final values."""
        found = False
        for n in ANNOUNCEMENTS:
            fn = getattr(observer, f"on_{n}", None)
            if callable(fn):
                lst = getattr(self, f"on_{n}")
                lst.insert(0, fn) if first else lst.append(fn)
                found = True
        if not found:
            raise TypeError(f"{observer!r} has no on_<announcement> method; "
                            f"known: {', '.join(ANNOUNCEMENTS)}")
        self._observers.append(observer)
        return observer

    def detach(self, observer: Any) -> None:
        for n in ANNOUNCEMENTS:
            fn = getattr(observer, f"on_{n}", None)
            lst = getattr(self, f"on_{n}")
            if fn is not None:
                # bound methods compare equal when they wrap the same function and object
                lst[:] = [f for f in lst if f != fn]
        if observer in self._observers:
            self._observers.remove(observer)

    @property
    def observers(self) -> list[Any]:
        return list(self._observers)
