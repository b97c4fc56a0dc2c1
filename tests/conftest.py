"""Shared fixtures: a controller on the in-process bus with the scripted guest driver started."""
import pytest

from xhcidbg.guest.driver import XhciDriver
from xhcidbg.transport.inproc import InProcessBus


@pytest.fixture
def bus():
    return InProcessBus(usb2_ports=2, usb3_ports=2, interrupters=4)


@pytest.fixture
def drv(bus):
    d = XhciDriver(bus).start()
    yield d
    # Whatever a test did, the controller must not have hit a bug of ours.
    assert bus.controller.internal_errors == 0
    assert bus.scheduler.errors == 0
