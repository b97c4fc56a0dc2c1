"""The controller's one observer interface.

The controller announces what it does here; the console, the tracer and the fault engine attach
here and nowhere else.  Each announcement is a list of callables; the controller tests the list
before building any argument, so an announcement nobody listens to costs one attribute load.

An observer is any object with some of the `on_<name>` methods below; `Hooks.attach` subscribes
each one it has.  Announcements marked *mutable* pass an object the observer may change: that is
how a fault rule rewrites a completion code, drops an event or vetoes a command.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# name -> (arguments, what it means)
ANNOUNCEMENTS = {
    "mmio": "(access: MmioAccess) a BAR access, after the controller answered it; "
            "a read's value may be rewritten (mutable)",
    "doorbell": "(slot: int, target: int, stream: int) a doorbell register was written",
    "trb": "(ring: str, trb: Trb) a TRB was fetched from a ring ('cmd' or 'slot/dci')",
    "command": "(cmd: CommandResult) a command finished; cc/slot may be rewritten (mutable)",
    "event": "(ev: EventRecord) an event is about to be written; may be rewritten or dropped "
             "(mutable)",
    "event_posted": "(ev: EventRecord) an event was written to the event ring",
    "urb_submit": "(xfer: UsbTransfer) a transfer was handed to a device",
    "urb_complete": "(xfer: UsbTransfer) a device finished a transfer; status/actual may be "
                    "rewritten (mutable)",
    "port": "(port: int, old: int, new: int) a root port's PORTSC changed",
    "state": "(kind: str, ident: str, old: str, new: str) a slot, endpoint, port or "
             "controller changed state",
    "interrupt": "(interrupter: int) an interrupt was signalled to the host",
    "log": "(level: str, message: str) the controller refused guest input or noticed trouble",
}


@dataclass
class MmioAccess:
    write: bool
    offset: int
    size: int
    value: int
    name: str


@dataclass
class EventRecord:
    interrupter: int
    dwords: list[int]
    addr: int = 0              # where it was written (0 until posted)
    drop: bool = False         # set by an observer to suppress it
    note: str = ""             # why an observer changed it (goes into traces)


@dataclass
class CommandResult:
    trb: Any                   # the command Trb
    cc: int
    slot: int = 0
    param: int = 0             # Command Completion Parameter
    note: str = ""


class Hooks:
    __slots__ = tuple(f"on_{n}" for n in ANNOUNCEMENTS) + ("_observers",)

    def __init__(self):
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
