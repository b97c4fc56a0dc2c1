"""The port mapper on SuperSpeed gadgets (dummy_hcd loaded for 5 Gbit/s in its own kit VM):
a device goes on a USB 3 root port by the speed it runs at on the host, and the streams
policy holds -- a UAS-shaped disk (xhcidbg.guestkit.functionfs) shows the guest Bulk-Only
alone at SuperSpeed, and both settings at high speed, where UAS needs no streams."""
from __future__ import annotations

import asyncio

import pytest
from test_passthrough import GadgetVm, zero

from xhcidbg.guestkit.functionfs import UasShapedDisk
from xhcidbg.guestkit.gadgets import Gadget, Gadgets, MaxSpeed, UdcSpeed
from xhcidbg.guestkit.launch import Vm
from xhcidbg.guestkit.testing import guest_kit

pytestmark = pytest.mark.e2e

USB2_PORTS = 4                   # the scripted guest's controller: ports 1-4 USB 2, 5-8 USB 3
BULK_ONLY, UAS = 0x50, 0x62
CC_SUCCESS, CC_STALL = 1, 6          # completion codes


@pytest.fixture(scope="module")
def ss_vm():
    qemu, kernel, initrd = guest_kit()
    loop = asyncio.new_event_loop()
    g = GadgetVm(loop)
    try:
        g.vm = g.run(Vm.start(qemu=qemu, kernel=kernel, initrd=initrd, progress=False,
                              host_root=True), 360)
        g.usb = Gadgets(g.vm)
        g.run(g.usb.load(udcs=2, speed=UdcSpeed.SUPER))
        yield g
    finally:
        if g.vm is not None:
            g.run(g.vm.stop(), 60)
        loop.close()


def test_a_superspeed_gadget_goes_on_a_usb3_port_and_moves_bulk_data(ss_vm):
    g = ss_vm
    plugged = g.run(g.usb.plug(zero(1)))
    try:
        r = g.scenario("enumerate-and-bulk", "65536")
    finally:
        g.run(g.usb.remove(zero(1)))
    assert plugged.speed_mbps == 5000
    assert r["device"]["speed"] == 4 and r["device"]["port"] > USB2_PORTS, r["device"]
    assert r["out"] == [CC_SUCCESS, 65536] and r["in"] == [CC_SUCCESS, 65536] and r["in_ok"]


def test_at_superspeed_the_guest_sees_bulk_only_and_not_the_uas_setting(ss_vm):
    g = ss_vm
    disk = Gadget("uasdisk", [UasShapedDisk()], product="UAS disk", serial="xhcidbg-uas-ss")
    plugged = g.run(g.usb.plug(disk))
    try:
        r = g.scenario("uas", "0525:a4a5,force")
    finally:
        g.run(g.usb.remove(disk))
    assert plugged.speed_mbps == 5000 and r["speed"] == 4 and r["port"] > USB2_PORTS
    assert r["host"] == [[0, 0, BULK_ONLY], [0, 1, UAS]]          # the device has both
    assert r["guest"] == [[0, 0, BULK_ONLY]] and r["hidden"] == [[0, 1]]
    assert r["total"] == r["raw"]               # wTotalLength says what the guest gets
    assert r["set_alt_1"] == CC_STALL           # selecting it anyway: as a device refuses


def test_at_high_speed_uas_needs_no_streams_and_passes_through(ss_vm):
    g = ss_vm
    disk = Gadget("uasdisk", [UasShapedDisk()], product="UAS disk", serial="xhcidbg-uas-hs",
                  max_speed=MaxSpeed.HIGH)
    plugged = g.run(g.usb.plug(disk))
    try:
        r = g.scenario("uas", "0525:a4a5,force")
    finally:
        g.run(g.usb.remove(disk))
    assert plugged.speed_mbps == 480 and r["speed"] == 3 and r["port"] <= USB2_PORTS
    assert r["guest"] == r["host"] == [[0, 0, BULK_ONLY], [0, 1, UAS]] and r["hidden"] == []
    assert r["total"] == r["raw"]
