"""The narrow interfaces the controller's components receive at construction.

Components (commands, transfers, slots, ports, interrupters) are given what they use -- guest
memory, the scheduler, the hooks, and these -- rather than the whole controller, so each can be
built and tested alone and no component imports the controller.
"""
from __future__ import annotations

from typing import Protocol


class ErrorReporter(Protocol):
    """Where components report guest input they refused and the controller errors it causes."""

    def refuse(self, key: str, message: str, level: str = "warning") -> None:
        """Guest input not accepted: logged once per `key`, always counted."""

    def host_system_error(self, why: str) -> None:
        """A DMA the controller needed failed: USBSTS.HSE, halt."""

    def host_controller_error(self, why: str) -> None:
        """The controller's own state is inconsistent (a malformed command ring): USBSTS.HCE."""


class EventPoster(Protocol):
    def __call__(self, interrupter: int, dwords: list[int], block: bool = False,
                 note: str = "") -> list[int] | None:
        """Post an event TRB to `interrupter`; returns the dwords as written (after observers
        rewrote them), or None when it was dropped or lost."""
