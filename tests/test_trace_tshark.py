"""Captures read back by tshark (Debian bookworm: 4.0), with and without our Lua dissector.

Until the scripted guest can drive the controller end to end, these tests announce on a real
`Hooks` object what the controller announces for an enumeration, with a real virtual device
(the tablet) answering the requests and real guest RAM holding the contexts.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from xhcidbg.devices.base import EpType, UsbTransfer
from xhcidbg.devices.tablet import Tablet
from xhcidbg.emu.context import EP_CTX, INPUT_CTRL_CTX, SLOT_CTX
from xhcidbg.emu.controller import XhciController
from xhcidbg.emu.hooks import (
    CommandResult,
    EventRecord,
    Hooks,
    InterruptSignal,
    MmioAccess,
    TransferRecord,
)
from xhcidbg.emu.memory import RamMemory
from xhcidbg.emu.timing import Scheduler
from xhcidbg.emu.trb import CC, Trb
from xhcidbg.emu.trb import TrbType as T
from xhcidbg.trace import dissector
from xhcidbg.trace.pcapng import read_capture
from xhcidbg.trace.tracer import Tracer
from xhcidbg.trace.viewer import Reader

TSHARK = shutil.which("tshark")
LUA = dissector.REPO_COPY
DCBAA, OUT_CTX, IN_CTX = 0x10000, 0x11000, 0x12000


def tshark(*args: str, lua: bool = False, home: Path) -> str:
    assert TSHARK, "tshark is required for these tests: apt-get install -y tshark"
    cmd = [TSHARK, *(["-X", f"lua_script:{LUA}"] if lua else []), *args]
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    errors = [line for line in r.stderr.splitlines()
              if "Running as user" not in line and line.strip()]
    assert not errors, errors
    return r.stdout


def fields(path, filt, *names, lua=False, home) -> list[list[str]]:
    out = tshark("-r", str(path), "-Y", filt, "-T", "fields",
                 *[arg for n in names for arg in ("-e", n)], lua=lua, home=home)
    return [line.split("\t") for line in out.splitlines()]


class Replay:
    """Announce an enumeration on real hooks, the way the controller does."""

    def __init__(self):
        self.c = SimpleNamespace(hooks=Hooks(), mem=RamMemory(1 << 20), context_size=32,
                                 scheduler=Scheduler(virtual=True), dcbaap=0,
                                 register_name=XhciController().register_name)
        self.dev = Tablet()
        self.dev.bus_reset()
        self.ring_addr = 0x20000
        self.ev_addr = 0x30000

    def say(self, name, *args):
        for fn in getattr(self.c.hooks, "on_" + name):
            fn(*args)

    def tick(self, ns=1000):
        self.c.scheduler.advance(ns)

    def event(self, dw, note=""):
        ev = EventRecord(0, list(dw), addr=self.ev_addr, note=note)
        self.ev_addr += 16
        self.say("event_posted", ev)
        self.say("interrupt", InterruptSignal(0))

    def command(self, trb, cc=CC.SUCCESS, slot=0, during=None):
        self.say("doorbell", 0, 0, 0)
        self.say("trb", "cmd", trb)
        if during is not None:
            during()
        r = CommandResult(trb, cc, slot=slot)
        self.say("command", r)
        self.event([trb.addr, 0, cc << 24, r.slot << 24 | T.COMMAND_COMPLETION << 10 | 1])

    def control(self, slot, devnum, setup: bytes, length: int):
        self.say("doorbell", slot, 1, 0)
        trb = Trb.build(T.SETUP_STAGE, addr=self.ring_addr, bmRequestType=setup[0],
                        bRequest=setup[1], wValue=int.from_bytes(setup[2:4], "little"),
                        wIndex=int.from_bytes(setup[4:6], "little"), wLength=length, length=8,
                        idt=1, trt=3 if setup[0] & 0x80 and length else 0, cycle=1)
        self.say("trb", f"{slot}/1", trb)
        self.ring_addr += 16
        x = UsbTransfer(0, EpType.CONTROL, length, setup=setup,
                        on_complete=lambda x: self._done(rec))
        rec = TransferRecord(x, slot, 1, 1, 1, devnum, self.c.scheduler.now_ns())
        self.say("urb_submit", rec)
        self.tick(125_000)
        self.dev.submit(x)
        return x

    def set_address(self, slot, address):
        """The SET_ADDRESS the controller sends by itself inside Address Device: announced
        as a transfer, with no TD on a ring behind it and no transfer event."""
        x = UsbTransfer(0, EpType.CONTROL, 0, setup=bytes([0, 5, address, 0, 0, 0, 0, 0]))
        rec = TransferRecord(x, slot, 1, 1, 1, 0, self.c.scheduler.now_ns(), internal=True)
        self.say("urb_submit", rec)
        self.dev.submit(x)
        self.say("urb_complete", rec)
        rec.cc = CC.SUCCESS
        self.say("urb_retired", rec)

    def _done(self, rec):
        x = rec.xfer
        self.say("urb_complete", rec)
        cc = {0: CC.SUCCESS, 1: CC.STALL_ERROR}.get(int(x.status), CC.USB_TRANSACTION_ERROR)
        if cc == CC.SUCCESS and x.actual < x.length:
            cc = CC.SHORT_PACKET
        self.event([self.ring_addr - 16, 0, cc << 24 | (x.length - x.actual),
                    rec.slot << 24 | rec.dci << 16 | T.TRANSFER_EVENT << 10 | 1])
        rec.cc = cc
        self.say("urb_retired", rec)

    def enumerate(self):
        mem = self.c.mem
        self.say("mmio", MmioAccess(True, 0x50, 4, DCBAA))
        self.say("mmio", MmioAccess(False, 0x420, 4, 0x00220E03))
        self.say("port", 1, 0x2A0, 0x00220E03)
        self.command(Trb.build(T.ENABLE_SLOT, addr=0x40000, cycle=1), slot=1)
        # output device context the controller wrote for slot 1: addressed, port 1, ep0 running
        mem.write_u64(DCBAA + 8, OUT_CTX)
        mem.write(OUT_CTX, SLOT_CTX.pack(SLOT_CTX.encode(
            context_entries=1, speed=3, root_hub_port=1, usb_address=1, slot_state=2)))
        mem.write(OUT_CTX + 32, EP_CTX.pack(EP_CTX.encode(
            ep_state=1, cerr=3, ep_type=4, max_packet=64, dequeue=0x20000 >> 4, dcs=1,
            avg_trb_length=8)))
        mem.write(IN_CTX, INPUT_CTRL_CTX.pack(INPUT_CTRL_CTX.encode(add=0b11)))
        self.command(Trb.build(T.ADDRESS_DEVICE, addr=0x40010, pointer=IN_CTX, slot=1, cycle=1),
                     during=lambda: self.set_address(1, 1))
        self.control(1, 1, bytes.fromhex("8006000100001200"), 18)
        self.control(1, 1, bytes.fromhex("8006000200000900"), 9)
        self.control(1, 1, bytes.fromhex("8006000200002200"), 34)
        self.control(1, 1, bytes.fromhex("0009010000000000"), 0)
        # a request the tablet does not support: it stalls
        self.control(1, 1, bytes.fromhex("c0ff000000000400"), 4)


def tablet_vendor() -> str:
    """idVendor as tshark prints it, asked of the device itself."""
    dev = Tablet()
    dev.bus_reset()
    x = UsbTransfer(0, EpType.CONTROL, 18, setup=bytes.fromhex("8006000100001200"))
    dev.submit(x)
    return f"0x{int.from_bytes(x.result[8:10], 'little'):04x}"


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    h.mkdir()
    return h


def capture(path, filters=None, **kw) -> Replay:
    r = Replay()
    t = Tracer(r.c, path, filters, **kw).start()
    r.enumerate()
    t.stop()
    assert not t.status().error, t.status().error
    return r


def test_stock_tshark_decodes_descriptors_pairs_and_errors(tmp_path, home):
    path = tmp_path / "enum.pcapng"
    capture(path)
    rows = fields(path, "usb", "frame.number", "usb.urb_type", "usb.request_in",
                  "usb.urb_status", "usb.bDescriptorType", "usb.idVendor", home=home)
    submits = [r for r in rows if r[1] == "'S'"]
    completes = [r for r in rows if r[1] == "'C'"]
    # no SET_ADDRESS: the controller sends it inside Address Device, as real xHCs do, so
    # Linux's usbmon never sees it either
    assert len(submits) == len(completes) == 5
    assert [c[2] for c in completes] == [s[0] for s in submits]          # request/response
    assert all(s[3] == "-115" for s in submits)
    assert [c[3] for c in completes] == ["0", "0", "0", "0", "-32"]
    assert completes[0][5] == tablet_vendor()                                # device descriptor
    assert not fields(path, "usb.setup.bRequest == 5", "frame.number", home=home)
    cfg = fields(path, "usb.bInterfaceClass", "usb.bInterfaceClass", "usb.bNumInterfaces",
                 home=home)
    assert ["0x03", "1"] in cfg                 # one HID interface, in the configuration
    verbose = tshark("-r", str(path), "-V", "-Y", "usb.urb_status == -32", home=home)
    assert "Broken pipe (-EPIPE)" in verbose
    info = tshark("-r", str(path), home=home)
    assert "GET DESCRIPTOR Response DEVICE" in info
    assert "GET DESCRIPTOR Response CONFIGURATION" in info


def test_lua_display_filters_select_exactly_the_expected_records(tmp_path, home):
    path = tmp_path / "enum.pcapng"
    capture(path)
    entries = list(Reader(path).entries())

    def expect(pred):
        return [str(i + 1) for i, e in enumerate(entries) if pred(e)]

    def trb_type(e):
        return e.record.dwords[7] >> 10 & 0x3F if e.kind in ("trb", "event", "command") else None

    def got(filt):
        return [r[0] for r in fields(path, filt, "frame.number", lua=True, home=home)]

    setups = expect(lambda e: trb_type(e) == T.SETUP_STAGE)
    assert len(setups) == 5 and got("xhci.trb.type == 2") == setups
    stalls = expect(lambda e: e.kind == "event" and e.record.dwords[6] >> 24 == CC.STALL_ERROR)
    assert len(stalls) == 1 and got("xhci.cc == 6") == stalls
    assert got("xhci.slot == 1") == expect(lambda e: e.kind != "urb" and e.slot == 1)
    assert got("xhci.reg == \"DCBAAP_LO\"") == expect(
        lambda e: e.kind == "mmio" and e.record.text == "DCBAAP_LO")
    ctx = got("xhci.slot_ctx.slot_state == 2")
    assert ctx == expect(lambda e: e.kind == "context" and e.record.fields["dci"] == 0)
    assert got("xhci.ep_ctx.max_packet == 64") == expect(
        lambda e: e.kind == "context" and e.record.fields["dci"] == 1)
    # the Info column carries the decoded names
    info = tshark("-r", str(path), "-Y", "xhci.kind == 5", lua=True, home=home)
    assert "Command Address Device Command -> Success slot 1" in info


def test_xurb_records_chain_to_the_usb_dissector(tmp_path, home):
    path = tmp_path / "xurb.pcapng"
    capture(path, "kind=urb,xurb")
    rows = fields(path, "xhci.kind == 11", "xhci.slot", "xhci.dci", "usb.urb_type",
                  "usb.idVendor", lua=True, home=home)
    assert len(rows) == 12                     # SET_ADDRESS too: it did happen on the bus
    assert {r[0] for r in rows} == {"1"} and {r[1] for r in rows} == {"1"}
    assert tablet_vendor() in [r[3] for r in rows]
    # each copy pairs with the submit on its own interface
    pairs = fields(path, "usb.urb_type == 'C'", "frame.interface_id", "usb.request_in", lua=True,
                   home=home)
    iface = {r[0]: r[1] for r in fields(path, "usb", "frame.number", "frame.interface_id",
                                        lua=True, home=home)}
    assert len(pairs) == 6 + 5 and all(iface[req] == i for i, req in pairs)


def test_comments_carry_fault_notes(tmp_path, home):
    path = tmp_path / "notes.pcapng"
    r = Replay()
    with Tracer(r.c, path):
        r.event([0, 0, CC.STALL_ERROR << 24, 1 << 24 | 1 << 16 | T.TRANSFER_EVENT << 10 | 1],
                note="fault rule 1: stall injected")
    rows = fields(path, "frame.comment", "frame.comment", home=home)
    assert rows == [["fault rule 1: stall injected"]]


_KILL_CHILD = textwrap.dedent("""
    import sys, time
    from xhcidbg.emu.controller import XhciController
    from xhcidbg.emu.trb import Trb, TrbType
    from xhcidbg.trace.tracer import Tracer
    c = XhciController()
    t = Tracer(c, sys.argv[1], flush_interval=float(sys.argv[2])).start()
    trb = Trb.build(TrbType.NORMAL, addr=0x1000, length=512, cycle=1)
    for _ in range(1000):
        for fn in c.hooks.on_trb:
            fn("1/3", trb)
    t.flush()
    print("flushed", t.status().records, flush=True)
    while True:                      # keep producing until killed
        for fn in c.hooks.on_trb:
            fn("1/3", trb)
        time.sleep(0.0001)
""")


@pytest.mark.parametrize("flush_interval", [3600.0, 0.01])
def test_sigkill_leaves_a_valid_file_up_to_the_last_flush(tmp_path, home, flush_interval):
    path = tmp_path / "killed.pcapng"
    child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(path), str(flush_interval)],
                             stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    assert line.startswith("flushed"), line
    flushed = int(line.split()[1])
    time.sleep(0.3)                  # with a short interval the writer thread flushes more
    child.send_signal(signal.SIGKILL)
    child.wait()
    frames = tshark("-r", str(path), "-T", "fields", "-e", "frame.number", home=home).split()
    if flush_interval > 60:
        assert len(frames) == flushed
    else:
        assert len(frames) >= flushed
    with open(path, "rb") as f:
        cap, packets = read_capture(f)
        assert len(list(packets)) == len(frames) and not cap.truncated


def test_rotation_by_size_keeps_a_bounded_ring_of_valid_files(tmp_path, home):
    base = tmp_path / "ring.pcapng"
    r = Replay()
    t = Tracer(r.c, base, max_bytes=2000, max_files=3).start()
    for _ in range(10):
        r.enumerate()
    st = t.stop()
    files = sorted(tmp_path.glob("ring_*.pcapng"))
    assert len(files) == 3 and [str(f) for f in files] == st.files
    assert files[-1].name == f"ring_{len(files) + int(files[0].stem.split('_')[1]) - 1:05d}.pcapng"
    for f in files:
        assert f.stat().st_size < 2000 + 1000
        assert tshark("-r", str(f), "-T", "fields", "-e", "frame.number", home=home).split()


def test_streaming_to_a_fifo_for_live_viewing(tmp_path, home):
    fifo = tmp_path / "live"
    os.mkfifo(fifo)
    env = dict(os.environ, HOME=str(home))
    reader = subprocess.Popen([TSHARK, "-l", "-i", str(fifo), "-T", "fields", "-e",
                               "frame.interface_id", "-e", "usb.urb_type"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    r = Replay()
    t = Tracer(r.c, fifo, flush_interval=0.02).start()
    r.enumerate()
    deadline = time.monotonic() + 30
    while not t.status().bytes_written and time.monotonic() < deadline:
        time.sleep(0.05)
    st = t.stop()
    out, _err = reader.communicate(timeout=60)
    assert st.bytes_written and not st.error, st
    lines = out.splitlines()
    assert len(lines) == st.records
    assert sum(1 for line in lines if line.startswith("1\t")) == 10      # usbmon1: 5 S + 5 C


def test_submit_errors_and_cancellations_use_the_kernel_errnos(tmp_path, home):
    from xhcidbg.devices.base import Status
    path = tmp_path / "errors.pcapng"
    r = Replay()
    with Tracer(r.c, path):
        gone = UsbTransfer(0x81, EpType.INTERRUPT, 8, interval=6)
        gone_rec = TransferRecord(gone, 1, 3, 1, 1, 1, r.c.scheduler.now_ns())
        gone.complete(Status.NODEV)                  # never handed to a device
        r.say("urb_retired", gone_rec)
        taken = UsbTransfer(0x81, EpType.INTERRUPT, 8, interval=6)
        taken_rec = TransferRecord(taken, 1, 3, 1, 1, 1, r.c.scheduler.now_ns())
        r.say("urb_submit", taken_rec)
        taken.complete(Status.CANCELLED)             # Stop Endpoint took it back
        r.say("urb_retired", taken_rec)
    rows = fields(path, "usb", "usb.urb_type", "usb.urb_status", "usb.data_flag", home=home)
    assert rows == [["'E'", "-19", "'E'"], ["'S'", "-115", "'<'"], ["'C'", "-104", "'\\0'"]]
