"""The port mapper on the gadget functions that move data through a Linux gadget's own code:
Loopback (f_loopback, 0525:a4a0), the generic serial pair (usb_f_serial, 0525:a4a6) and CDC ACM
(usb_f_acm, 0525:a4a7), each plugged alone into a kit VM and passed by libusb to the scripted
guest of `tests/passthrough_functions_guest.py`.  The loopback's data comes back to the guest
byte for byte; the serial functions' data is read and written at the gadget's /dev/ttyGS<N> by
this side, in raw mode.  One boot for the module (see tests/test_passthrough.py for the
machinery)."""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

import pytest
from test_passthrough import UDCS, GadgetVm

from xhcidbg.guestkit.gadgets import Gadget, Gadgets, GenericSerial, Loopback, Serial
from xhcidbg.guestkit.launch import Vm
from xhcidbg.guestkit.testing import guest_kit

pytestmark = pytest.mark.e2e

GUEST_SCRIPT = Path(__file__).with_name("passthrough_functions_guest.py")
SUCCESS, STALL, SHORT_PACKET = 1, 6, 13
HIGH_SPEED_BULK = 512


class FunctionsVm(GadgetVm):
    """GadgetVm, running this module's guest script."""

    def command(self, scenario: str, *args: str) -> str:
        return shlex.join([sys.executable, str(GUEST_SCRIPT), scenario, *args])

    def shell(self, command: str, timeout: float = 60.0) -> str:
        """A command in the host's tree in the VM (where the gadget-side files are)."""
        assert self.vm is not None
        return self.run(self.vm.host.run(command, timeout, check=True), timeout + 30).output


@pytest.fixture(scope="module")
def function_vm():
    qemu, kernel, initrd = guest_kit()
    loop = asyncio.new_event_loop()
    g = FunctionsVm(loop)
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


# ---- loopback --------------------------------------------------------------------------------

@pytest.mark.parametrize(("qlen", "buflen"), [(None, None), (2, 1024)],
                         ids=["defaults", "qlen2-buflen1024"])
def test_loopback_gives_back_every_byte_and_its_framing(function_vm, qlen, buflen):
    g = function_vm
    gadget = Gadget("loop", [Loopback(qlen=qlen, bulk_buflen=buflen)], product="Loopback",
                    serial="xhcidbg-loop-1")
    plugged = g.run(g.usb.plug(gadget))
    try:
        folder = gadget.function_folder(0)
        configured = g.shell(f"cat {folder}/qlen {folder}/bulk_buflen").split()
        queue, size = int(configured[0]), int(configured[1])
        r = g.scenario("loopback", str(size), str(queue))
    finally:
        g.run(g.usb.remove(gadget))
    assert (queue, size) == (qlen or 32, buflen or 4096)      # what f_loopback was given
    dev = r["device"]
    assert (dev["vid"], dev["pid"], dev["product"], dev["serial"]) == (
        0x0525, 0xA4A0, "Loopback", "xhcidbg-loop-1")
    assert plugged.speed_mbps == 480 and dev["speed"] == 3
    assert r["drivers"] == [None]       # no host driver (usbtest is not loaded): no force
    assert r["interfaces"] == [[0, 0xFF, 0, 0]]
    assert sorted((a & 0x80, t, m) for a, t, m in r["endpoints"]) == [
        (0, 2, HIGH_SPEED_BULK), (0x80, 2, HIGH_SPEED_BULK)]
    mps = r["max_packet"]
    cases = r["cases"]
    # [OUT TDs], IN TD: [completion code, bytes]
    expected = {
        "one byte": ([[SUCCESS, 1]], [SHORT_PACKET, 1]),
        "short final packet": ([[SUCCESS, 2 * mps + 100]], [SHORT_PACKET, 2 * mps + 100]),
        "one packet and a zero-length packet": ([[SUCCESS, mps], [SUCCESS, 0]],
                                                [SHORT_PACKET, mps]),
        "three packets and a zero-length packet": ([[SUCCESS, 3 * mps], [SUCCESS, 0]],
                                                   [SHORT_PACKET, 3 * mps]),
        "exactly buflen": ([[SUCCESS, size]], [SUCCESS, size]),
        "three requests and a short one": ([[SUCCESS, 3 * size + 100]],
                                           [SHORT_PACKET, 3 * size + 100]),
    }
    for name, (out, back) in expected.items():
        assert (cases[name]["out"], cases[name]["in"]) == (out, back), (name, cases[name])
        assert cases[name]["same"], (name, cases[name])
    held = cases["a packet short of buflen held until more data"]
    assert held["waiting"], held                    # nothing came back: the request waits
    assert held["out"] == [[SUCCESS, size - mps], [SUCCESS, 100]]
    assert held["in"] == [SHORT_PACKET, size + 100 - mps] and held["same"], held
    stream = cases["more than the queue holds"]
    assert stream["total"] > queue * size
    assert stream["out"] == [[SUCCESS, stream["total"]]], stream
    assert stream["in"] == [SHORT_PACKET, stream["total"]] and stream["same"], stream
    assert r["libusb_transfers"] >= 20


# ---- serial ----------------------------------------------------------------------------------

def serial_gadget(kind: str) -> Gadget:
    function = Serial() if kind == "acm" else GenericSerial()
    return Gadget(f"tty-{kind}", [function], product=f"Serial {kind}",
                  serial=f"xhcidbg-{kind}-1")


def gadget_hex(g: FunctionsVm, path: str) -> str:
    return "".join(g.shell(f"od -An -v -tx1 {shlex.quote(path)}").split())


@pytest.mark.parametrize("kind", ["gser", "acm"])
def test_serial_bytes_cross_between_the_guest_and_the_gadgets_tty(function_vm, kind,
                                                                   tmp_path):
    g = function_vm
    assert g.vm is not None
    gadget = serial_gadget(kind)
    to_gadget = os.urandom(3000)            # OUT: 5 full packets in one TD, 440 bytes in one
    to_guest = os.urandom(2000) + bytes(range(256))   # IN: every byte value, raw
    out_file, in_file = tmp_path / "to-gadget.bin", tmp_path / "to-guest.bin"
    out_file.write_bytes(to_gadget)
    in_file.write_bytes(to_guest)
    capture = f"/tmp/xhcidbg-{kind}-capture.bin"
    plugged = g.run(g.usb.plug(gadget))
    reader = guest = None
    try:
        tty = g.run(g.usb.node(gadget))
        # The gadget side: the tty raw (no echo, no CR/LF or control-character handling), and
        # everything it receives into a file, until this side ends the job.
        reader = g.run(g.vm.host.start(
            f"exec < {tty}; stty raw -echo -iexten && echo '@@ raw' && exec cat > {capture}"))
        g.run(reader.wait_output("@@ raw", 60), 90)
        guest = g.start("serial", kind, str(out_file), str(len(to_guest)))
        g.run(guest.wait_output("@@ wrote", 120), 150)
        g.shell(f"i=0; until [ $(wc -c < {capture}) -ge {len(to_gadget)} ]; do i=$((i+1));"
                " [ $i -lt 200 ] || exit 1; sleep 0.05; done", 60)
        g.shell(f"cat {in_file} > {tty}")
        g.run(guest.wait_output("@@ read", 120), 150)
        g.run(reader.stop())                # the tty closes (ACM: DCD and DSR drop)
        g.run(reader.wait(30), 60)
        r = g.ended(guest)
        received = gadget_hex(g, capture)
    finally:
        if guest is not None:
            g.run(guest.stop())
        if reader is not None:
            g.run(reader.stop())
        g.run(g.usb.remove(gadget))
    dev = r["device"]
    assert (dev["vid"], dev["pid"], dev["serial"]) == (
        0x0525, 0xA4A7 if kind == "acm" else 0xA4A6, f"xhcidbg-{kind}-1")
    assert plugged.speed_mbps == 480 and dev["speed"] == 3
    # No host driver has it in this kit (no cdc_acm, no usbserial): attached without force
    # (an attach that needed it would have been refused and is recorded), and nothing else
    # binds while the guest has it or after it is given back.
    nones = [None, None] if kind == "acm" else [None]
    assert r["refused"] is None and r["drivers"] == r["drivers_after"] == nones
    assert r["drivers_while"] == ["usbfs"] * len(nones)
    if kind == "acm":
        # communications (ACM, AT commands) with its notification endpoint, then data
        assert r["interfaces"] == [[0, 0x02, 0x02, 0x01], [1, 0x0A, 0, 0]]
    else:
        assert r["interfaces"] == [[0, 0xFF, 0, 0]]
    types = sorted((a & 0x80, t) for a, t, _ in r["endpoints"])
    assert types == ([(0, 2), (0x80, 2), (0x80, 3)] if kind == "acm" else [(0, 2), (0x80, 2)])
    # OUT: both TDs complete, and the tty got exactly those bytes
    assert r["out"] == [[SUCCESS, 2560], [SUCCESS, 440]]
    assert received == to_gadget.hex()
    # IN: what was written to the tty, in packets of at most 512 bytes
    assert r["in"]["bytes"] == to_guest.hex(), r["in"]
    assert "failed" not in r["in"] and max(r["in"]["sizes"]) <= HIGH_SPEED_BULK
    if kind != "acm":
        return
    acm = r["acm"]
    assert r["notify_max_packet"] == 10
    # SERIAL_STATE notifications (0xA1 0x20, wIndex: the interface, 2 bytes of state).  The
    # host's configuration made f_acm queue one saying the tty is closed (gserial_connect calls
    # disconnect when no one has it open); opening the tty found that one still unread, so
    # f_acm sent the new state, DCD|DSR, once the guest had read the first.
    assert acm["opened"] == [[SUCCESS, "a1200000000002000000"],
                             [SUCCESS, "a1200000000002000300"]]
    assert acm["initial"] == "00" * 7           # f_acm starts with a line coding of zeros
    assert acm["set_115200_8n1"] == SUCCESS
    assert acm["after_115200_8n1"] == "00c20100000008"
    assert acm["set_2400_7e2"] == SUCCESS
    assert acm["after_2400_7e2"] == "60090000020207"
    assert acm["dtr_rts"] == SUCCESS
    assert acm["to_the_data_interface"] == STALL
    assert acm["six_byte_coding"] == STALL
    assert acm["after_stalls"] == acm["after_2400_7e2"]
    # the tty closed: DCD and DSR dropped
    assert r["closed"] == [[SUCCESS, "a1200000000002000000"]]
