"""Errors the scripted guest driver raises.  Each says what was being done and what the
controller answered, because a test failure should read like a diagnosis."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .device import Transfer
    from .driver import CommandCompletion


class XhciError(Exception):
    """Base of every error the scripted driver raises."""


class ControllerError(XhciError):
    """The controller is not in a state a driver can work with (HSE, HCE, halted, not ready)."""


class XhciTimeout(XhciError):
    """Something the driver waited for did not happen within the time limit."""


class CommandFailed(XhciError):
    def __init__(self, completion: CommandCompletion) -> None:
        super().__init__(f"{completion.name} failed: {completion}")
        self.completion = completion


class TransferFailed(XhciError):
    def __init__(self, transfer: Transfer) -> None:
        super().__init__(f"transfer failed: {transfer}")
        self.transfer = transfer


class DescriptorError(XhciError):
    """A device returned a descriptor the driver cannot make sense of."""


class NoDevice(XhciError):
    """Nothing is connected where the caller expected a device."""
