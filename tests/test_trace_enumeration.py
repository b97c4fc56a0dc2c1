"""Real enumerations through the scripted guest and the controller, captured and read back by
tshark (with and without the Lua dissector) and by `trace show` / `trace stats`."""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess

import pytest
from rich.console import Console

from xhcidbg.emu.trb import TrbType as T
from xhcidbg.trace import dissector, sample
from xhcidbg.trace.viewer import Reader, show, stats

TSHARK = shutil.which("tshark")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = tmp_path_factory.mktemp("enum") / "enum.pcapng"
    s = sample.record(path)
    assert not s.status.error, s.status.error
    return path, s


def tshark_fields(path, home, filt, *names, lua=False):
    assert TSHARK, "tshark is required for these tests: apt-get install -y tshark"
    cmd = [TSHARK, *(["-X", f"lua_script:{dissector.REPO_COPY}"] if lua else []), "-r",
           str(path), "-Y", filt, "-T", "fields", *(arg for n in names for arg in ("-e", n))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HOME=str(home)))
    assert r.returncode == 0, r.stderr
    return [line.split("\t") for line in r.stdout.splitlines()]


def test_tshark_decodes_a_real_enumeration(recorded, tmp_path):
    path, s = recorded
    rows = tshark_fields(path, tmp_path, "usb.urb_type == 'C'", "frame.interface_name",
                         "usb.request_in", "usb.urb_status", "usb.idVendor", "usb.urb_len")
    assert rows and all(r[1] for r in rows)                     # every completion is paired
    assert {r[0] for r in rows} == {"usbmon1", "usbmon2"}        # tablet on USB 2, loopback on 3
    vendors = {r[3] for r in rows if r[3]}
    assert "0x0525" in vendors                                   # the loopback's descriptor
    assert [r[2] for r in rows if r[2] not in ("0",)] == ["-32"]     # the one stall
    bulk_in = tshark_fields(path, tmp_path, "usb.transfer_type == 3 && "
                            "usb.endpoint_address.direction == 1 && usb.urb_type == 'C'",
                            "usb.urb_len")
    assert bulk_in == [[str(s.bulk_in)]]


def test_lua_filters_on_a_real_enumeration(recorded, tmp_path):
    path, _ = recorded
    entries = list(Reader(path).entries())

    def expect(pred):
        return [str(i + 1) for i, e in enumerate(entries) if pred(e)]

    def got(filt):
        return [r[0] for r in tshark_fields(path, tmp_path, filt, "frame.number", lua=True)]

    def ttype(e):
        return e.record.dwords[7] >> 10 & 0x3F if e.kind in ("trb", "event", "command") else -1

    assert got("xhci.trb.type == 2") == expect(lambda e: ttype(e) == T.SETUP_STAGE)
    assert got("xhci.cc == 6") == expect(
        lambda e: e.kind in ("event", "command") and (
            e.record.dwords[6] >> 24 if e.kind == "event" else e.record.fields["cc"]) == 6)
    assert len(got("xhci.cc == 6")) == 1
    assert got("xhci.slot == 2") == expect(lambda e: e.kind not in ("urb",) and e.slot == 2)
    assert got("xhci.trb.type == 12") == expect(lambda e: ttype(e) == T.CONFIGURE_ENDPOINT)
    port_records = expect(lambda e: (e.kind == "port" or ttype(e) == T.PORT_STATUS_CHANGE)
                          and e.port == 1)
    assert port_records and got("xhci.port == 1") == port_records


def test_show_prints_linux_tracepoint_text(recorded):
    path, s = recorded
    out = io.StringIO()
    show(path, out=out)
    text = out.getvalue()
    lines = text.splitlines()
    assert any(re.fullmatch(
        r" +[\d.]+: xhci_fetch_trb: CTRL: @0x[0-9a-f]{16} bRequestType 80 bRequest 06 wValue 0100 "
        r"wIndex 0000 wLength 18 length 8 TD size 0 intr 0 type 'Setup Stage' flags I:i:C", line)
        for line in lines)
    assert any(line.endswith(
        f"xhci_handle_cmd_addr_dev: RS 00000 full-speed Ctx Entries 1 MEL 0 us "
        f"Port# {s.tablet_port}/0 [TT Slot 0 Port# 0 TTT 0 Intr 0] Addr 1 State addressed")
        for line in lines)
    assert any(re.search(r"xhci_handle_event: EVENT: @0x[0-9a-f]{16} TRB [0-9a-f]{16} status "
                         r"'Stall Error' len \d+ slot 1 ep 1 type 'Transfer Event' flags e:C", line)
               for line in lines)
    assert any(re.search(r"usbmon: [0-9a-f]+ \d+ C Bi:2:002:1 0 512 = 00000000", line)
               for line in lines)
    assert any("xhci_handle_port_status: port-" in line for line in lines)
    # interrupt URBs carry urb->interval in frames for the full-speed tablet (bInterval 8)
    assert any(re.search(r"usbmon: [0-9a-f]+ \d+ S Ii:1:001:1 -115:8 8 <$", line) for line in lines)
    assert "# sample finished" in text
    # filters: only slot 2's records, no usbmon (it has no slot)
    out = io.StringIO()
    show(path, sample_filter("slot=2 kind=trb,event"), out=out)
    assert " slot 2 " in out.getvalue() and " slot 1 " not in out.getvalue()


def sample_filter(text):
    from xhcidbg.trace.filters import CaptureFilter
    return CaptureFilter.parse(text)


def test_stats_tables(recorded):
    path, s = recorded
    con = Console(record=True, width=200)
    stats(path, console=con)
    text = con.export_text()
    assert "-EPIPE x1" in text and "Stall Error x1" in text
    assert re.search(r"│\s+2 │\s+2 │ 1 out\s+│\s+1 │\s+0 │\s+1024 │", text)
    assert re.search(rf"│\s+2 │\s+2 │ 1 in\s+│\s+1 │\s+{s.bulk_in} │", text)


@pytest.mark.parametrize("context_size", [32, 64])
def test_capture_filters_keep_only_what_was_asked(tmp_path, context_size):
    path = tmp_path / "slot1.pcapng"
    sample.record(path, "slot=1 kind=trb,event,urb,context", context_size=context_size)
    entries = list(Reader(path).entries())
    assert entries
    # the contexts were found at the right stride: the interrupt IN endpoint (DCI 3) of the tablet
    ep3 = [e.record.dwords[4:12] for e in entries if e.kind == "context" and e.dci == 3]
    assert ep3 and ep3[-1][1] >> 3 & 7 == 7 and ep3[-1][1] >> 16 == 8      # Int IN, maxp 8
    assert {e.kind for e in entries} <= {"trb", "event", "urb", "context"}
    assert all(e.slot in (0, 1) for e in entries if e.kind != "urb")
    # the USB 3 device (slot 2) left no transfers; the tablet's did reach the usbmon interface
    assert {e.bus for e in entries if e.kind == "urb"} == {1}


def test_committed_sample_capture_is_readable():
    path = dissector.REPO_COPY.parent / "enumeration.pcapng"
    r = Reader(path)
    kinds = {e.kind for e in r.entries()}
    assert {"trb", "event", "command", "context", "urb", "mmio"} <= kinds
    assert not r.problems.lines(r.capture)
    assert path.stat().st_size < 300 * 1024
