"""Isochronous TDs gathered into batches, for devices behind a transport with a cost per
request (libusb, USB/IP): one request then carries several packets.

The controller hands an isochronous endpoint's TDs over one service interval apart, one packet
each.  A batch goes when it holds `packets` TDs, or `gather_s` after its first arrived, so a
stream's latency grows by at most that; several batches may be in flight at once.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from .base import UsbTransfer

PACKETS = 8                # TDs (packets) per request, at most
GATHER_S = 0.004           # how long a partly filled batch waits for more TDs


class IsoBatches:
    """Per endpoint, the isochronous TDs not yet sent; `send(endpoint, batch)` sends one."""

    def __init__(self, send: Callable[[int, list[UsbTransfer]], None],
                 loop: asyncio.AbstractEventLoop | None, packets: int = PACKETS,
                 gather_s: float = GATHER_S):
        self._send = send
        self.loop = loop                    # without one, every TD goes alone
        self.packets = max(1, packets)
        self.gather_s = gather_s
        self._gathering: dict[int, list[UsbTransfer]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}

    def add(self, xfer: UsbTransfer) -> None:
        batch = self._gathering.setdefault(xfer.endpoint, [])
        batch.append(xfer)
        if len(batch) >= self.packets or self.loop is None:
            self.flush(xfer.endpoint)
        elif xfer.endpoint not in self._timers:
            self._timers[xfer.endpoint] = self.loop.call_later(self.gather_s, self.flush,
                                                               xfer.endpoint)

    def flush(self, endpoint: int) -> None:
        timer = self._timers.pop(endpoint, None)
        if timer is not None:
            timer.cancel()
        batch = [x for x in self._gathering.pop(endpoint, []) if not x.done]
        if batch:
            self._send(endpoint, batch)

    def flush_all(self) -> None:
        for endpoint in list(self._gathering):
            self.flush(endpoint)

    def cancel(self, xfer: UsbTransfer) -> bool:
        """Take back a TD not sent yet; False if it has gone already (or never came)."""
        batch = self._gathering.get(xfer.endpoint)
        if batch is not None and xfer in batch:
            batch.remove(xfer)
            return True
        return False

    def clear(self) -> None:
        """Drop every TD not sent yet (the controller took them back)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._gathering.clear()
