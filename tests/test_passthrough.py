"""The port mapper on real USB devices: Linux gadgets (dummy_hcd + configfs) in a kit VM that
runs this machine's venv, where `tests/passthrough_guest.py` drives the scripted guest on an
in-process controller with the gadgets passed through by libusb.  This side makes, plugs and
pulls the gadgets and reads what the guest saw (its JSON results) and what the host side of the
VM says (sysfs, its kernel drivers).  One boot for the module."""
from __future__ import annotations

import asyncio
import json
import shlex
import sys
from pathlib import Path

import pytest

from xhcidbg.guestkit.gadgets import Gadget, Gadgets, Pattern, SourceSink
from xhcidbg.guestkit.launch import Vm
from xhcidbg.guestkit.testing import guest_kit

pytestmark = pytest.mark.e2e

GUEST_SCRIPT = Path(__file__).with_name("passthrough_guest.py")
UDCS = 4


def zero(n: int) -> Gadget:
    return Gadget(f"zero{n}", [SourceSink(pattern=Pattern.MOD63)], product="Gadget Zero",
                  serial=f"xhcidbg-zero-{n}")


class GadgetVm:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.vm: Vm | None = None
        self.usb: Gadgets | None = None

    def run(self, coro, timeout: float = 300.0):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def command(self, scenario: str, *args: str) -> str:
        return shlex.join([sys.executable, str(GUEST_SCRIPT), scenario, *args])

    def scenario(self, scenario: str, *args: str, timeout: float = 300.0) -> dict:
        assert self.vm is not None
        result = self.run(self.vm.host.run(self.command(scenario, *args), timeout=timeout),
                          timeout + 30)
        return parse(result.output, result.status)

    def start(self, scenario: str, *args: str):
        assert self.vm is not None
        return self.run(self.vm.host.start(self.command(scenario, *args)))


def parse(output: str, status: int) -> dict:
    for line in output.splitlines():
        if line.startswith("@@result "):
            assert status == 0, output
            return json.loads(line[len("@@result "):])
    raise AssertionError(f"the guest script ended ({status}) without a result:\n{output}")


@pytest.fixture(scope="module")
def gadget_vm():
    qemu, kernel, initrd = guest_kit()
    loop = asyncio.new_event_loop()
    g = GadgetVm(loop)
    try:
        g.vm = g.run(Vm.start(qemu=qemu, kernel=kernel, initrd=initrd, progress=False,
                              host_root=True), 360)
        g.usb = Gadgets(g.vm)
        g.run(g.usb.load(udcs=UDCS))
        yield g
    finally:
        if g.vm is not None:
            g.run(g.vm.stop(), 60)
        loop.close()


def test_a_gadget_enumerates_through_libusb_and_moves_bulk_data_both_ways(gadget_vm):
    g = gadget_vm
    plugged = g.run(g.usb.plug(zero(1)))
    try:
        r = g.scenario("enumerate-and-bulk", "65536")
    finally:
        g.run(g.usb.remove(zero(1)))
    dev = r["device"]
    assert (dev["vid"], dev["pid"], dev["product"], dev["serial"]) == (
        0x0525, 0xA4A0, "Gadget Zero", "xhcidbg-zero-1")
    assert plugged.speed_mbps == 480 and dev["speed"] == 3        # high speed on a USB 2 port
    assert dev["endpoints"] == [0x02, 0x81] and dev["config"] == 1       # f_sourcesink's
    assert r["host"]["bus"] == plugged.busnum and r["host"]["address"] == plugged.devnum
    assert r["out"] == [1, 65536] and r["in"] == [1, 65536] and r["in_ok"]
