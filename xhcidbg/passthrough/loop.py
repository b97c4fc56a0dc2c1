"""libusb's events served by the session's asyncio loop.

libusb says which file descriptors it waits on (and when they change) and when its next
timeout is due; the loop watches those descriptors and calls libusb back without blocking, so
transfer callbacks run on the loop, beside the controller, and no thread touches controller
state.  A callback that raises is logged; it never reaches libusb (python-libusb1 would swallow
it into the C stack).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import select
from typing import Any

import usb1

log = logging.getLogger("xhcidbg.passthrough")


class LoopEvents:
    """Serve one USBContext's events on `loop` until `close`."""

    def __init__(self, ctx: usb1.USBContext, loop: asyncio.AbstractEventLoop):
        self.ctx = ctx
        self.loop = loop
        self._readers: set[int] = set()
        self._writers: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        ctx.setPollFDNotifiers(self._added, self._removed)
        for fd, events in ctx.getPollFDList():
            self._added(fd, events)
        self._arm_timeout()

    def _added(self, fd: int, events: int, _user: Any = None) -> None:
        if self._closed:
            return
        if events & select.POLLIN and fd not in self._readers:
            self.loop.add_reader(fd, self.handle)
            self._readers.add(fd)
        if events & select.POLLOUT and fd not in self._writers:
            self.loop.add_writer(fd, self.handle)
            self._writers.add(fd)

    def _removed(self, fd: int, _user: Any = None) -> None:
        if fd in self._readers:
            self.loop.remove_reader(fd)
            self._readers.discard(fd)
        if fd in self._writers:
            self.loop.remove_writer(fd)
            self._writers.discard(fd)

    def handle(self) -> None:
        """Let libusb run what is ready (callbacks included), without waiting."""
        if self._closed:
            return
        try:
            self.ctx.handleEventsTimeout(0)
        except usb1.USBErrorInterrupted:
            pass                        # a signal: the loop calls again
        except usb1.USBError as e:
            log.warning("libusb event handling failed: %s", e)
        self._arm_timeout()

    def _arm_timeout(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closed:
            return
        try:
            due = self.ctx.getNextTimeout()
        except usb1.USBError:
            due = None
        if due is not None:           # libusb has a transfer timeout to enforce
            self._timer = self.loop.call_later(max(0.0, float(due)), self.handle)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fd in list(self._readers | self._writers):
            self._removed(fd)
        with contextlib.suppress(Exception):      # the context may be closing already
            self.ctx.setPollFDNotifiers(None, None)
