"""Shared fixtures: a controller on the in-process bus with the scripted guest driver started,
and the console on its in-process world."""
import pytest

from xhcidbg.devices.base import Speed
from xhcidbg.devices.loopback import LoopbackDevice
from xhcidbg.emu.trb import TrbType as T
from xhcidbg.guest.device import Device
from xhcidbg.guest.driver import XhciDriver
from xhcidbg.transport.inproc import InProcessBus
from xhcidbg.ui import Console, WorldOptions


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


@pytest.fixture
def loop(bus, drv):
    bus.controller.attach(LoopbackDevice(speed=Speed.SUPER, pattern=None))
    return Device.enumerate(drv, 3)


def raw(ep, *trbs):
    """Put raw TRBs on an endpoint's ring (the ring supplies cycle bits), ring the doorbell,
    and return the transfer events nobody's transfer explains."""
    drv = ep.dev.drv
    before = len(drv.unmatched)
    for param, status, control in trbs:
        ep.ring.put(param, status, control)
    ep.ring_doorbell()
    drv.bus.wait(lambda: False, 5_000_000)
    drv.service()
    return [e for e in list(drv.unmatched)[before:] if e.type == T.TRANSFER_EVENT]


def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure: CI installs every tool and fetches every part the tests
    use, so a test that would skip there is a test that did not run."""
    import os
    if os.environ.get("CI", "").lower() != "true" or call.excinfo is None:
        return None
    if call.excinfo.errisinstance(pytest.skip.Exception):
        from _pytest.reports import TestReport
        report = TestReport.from_item_and_call(item, call)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true: {call.excinfo.value}"
        return report
    return None


@pytest.fixture
def con():
    """The console on its in-process world: the scripted guest has enumerated a tablet, a
    keyboard and a storage stick."""
    c = Console(WorldOptions(), width=200).start()
    yield c
    c.close()
