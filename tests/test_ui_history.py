"""`log` and `history` against the in-process guest (a tablet, a keyboard and a stick): the
records they show must be what the controller announced and what the event ring holds."""
from __future__ import annotations

import json
import struct

import pytest

from xhcidbg.emu.hooks import InterruptSignal
from xhcidbg.emu.trb import TrbType
from xhcidbg.ui import Console
from xhcidbg.ui.history import KINDS, History, endpoint_dci
from xhcidbg.ui.render import recent_events

TABLET_DCI = 3                     # ep1in, the tablet's interrupt IN endpoint


def as_json(con: Console, line: str):
    return json.loads(con.execute(f"{line} --json"))


def slot_of(con: Console, device: str) -> int:
    port, _ = con.world.find(device)
    return con.world.guest_devices[port].device.slot


def queued_trb(con: Console, slot: int, dci: int) -> int:
    """The TRB of the TD the guest keeps queued on an interrupt IN ring: the last one fetched
    there (the controller has it and waits for the device)."""
    ring = f"{slot}/{dci}"
    fetches = [e for e in con.activity.records if e.kind == "trb" and e.what[0] == ring]
    return fetches[-1].addr


def ring_event(con: Console, pointer: int):
    """The event in interrupter 0's event ring whose TRB Pointer is `pointer` (the latest)."""
    found = [(addr, t) for addr, t in recent_events(con.controller.interrupters[0], 256)
             if t.param == pointer]
    assert found, f"no event in the event ring points at {pointer:#x}"
    return found[-1]


def test_history_of_the_tablets_interrupt_trb_shows_doorbell_fetch_urb_and_event(con):
    slot = slot_of(con, "tablet")
    addr = queued_trb(con, slot, TABLET_DCI)
    waiting = as_json(con, f"history {addr:#x}")["stories"][0]
    assert [s["role"] for s in waiting["steps"]] == ["doorbell", "fetch", "submit"]
    assert waiting["outcome"] == "submitted; the device has not completed it"

    con.execute("tablet move 100 200")
    [story] = as_json(con, f"history {addr:#x}")["stories"]
    roles = [s["role"] for s in story["steps"]]
    assert roles[:5] == ["doorbell", "fetch", "submit", "done", "event"], roles
    assert roles[-1] == "retired" and "interrupt" in roles
    steps = {s["role"]: s for s in story["steps"]}
    assert steps["doorbell"]["slot"] == slot and steps["doorbell"]["dci"] == TABLET_DCI
    assert steps["fetch"]["addr"] == addr and steps["fetch"]["ring"] == f"{slot}/{TABLET_DCI}"
    assert steps["submit"]["urb"] == steps["done"]["urb"] == story["urb"]
    assert steps["submit"]["trbs"] == story["td"] == [addr]
    assert steps["done"]["actual"] == 6            # the tablet's report
    event = steps["event"]
    assert event["pointer"] == addr and event["type"] == TrbType.TRANSFER_EVENT
    assert (event["slot"], event["dci"]) == (slot, TABLET_DCI)
    # the event is the one in the guest's event ring, where the record says it was written
    ring_addr, trb = ring_event(con, addr)
    assert event["addr"] == ring_addr and event["dwords"] == trb.dwords
    assert story["cc"] == event["cc"] == trb.status >> 24
    seqs = [s["seq"] for s in story["steps"]]
    times = [s["time_ns"] for s in story["steps"]]
    assert seqs == sorted(seqs) and times == sorted(times)
    assert story["device"] == "tablet"

    text = con.execute(f"why {addr:#x}")
    lines = text.splitlines()
    assert lines[0].startswith(f"Normal @{addr:#x} on ring {slot}/{TABLET_DCI} (slot {slot} "
                               f"tablet, ep1in)")
    order = [next(i for i, ln in enumerate(lines) if f"ms  {role} " in ln)
             for role in ("doorbell", "fetch", "submit", "done", "event", "retired")]
    assert order == sorted(order) and order[0] == 1
    assert f"TRB {addr:016x}" in lines[order[4]] and "Transfer Event" in lines[order[4]]


def test_history_of_a_command_trb_ends_with_its_command_completion_event(con):
    cmd = [e for e in con.activity.records if e.kind == "command"][-1]
    [story] = as_json(con, f"history {cmd.addr:#x}")["stories"]
    assert [s["role"] for s in story["steps"]][:4] == ["doorbell", "fetch", "command", "event"]
    doorbell, fetch, done, event = story["steps"][:4]
    assert doorbell["slot"] is None and doorbell["target"] == 0      # the command ring's
    assert fetch["ring"] == "cmd" and fetch["type"] == done["type"] == cmd.what[0].type
    assert event["type"] == TrbType.COMMAND_COMPLETION and event["pointer"] == cmd.addr
    assert story["outcome"] == f"completed '{done['cc_name']}'"
    ring_addr, _ = ring_event(con, cmd.addr)
    assert event["addr"] == ring_addr


def test_history_of_an_unknown_address_says_so(con):
    out = con.execute("history 0xdead0")
    assert "nothing recorded about a TRB at 0xdead0" in out


def test_log_by_slot_and_kind_shows_only_that_slots_events(con):
    tablet, keyboard = slot_of(con, "tablet"), slot_of(con, "keyboard")
    con.execute("tablet move 10 20")
    con.execute("keyboard type a")
    events = as_json(con, f"log --slot {tablet} --kind event -n 10000")
    assert events and all(e["kind"] == "event" and e["slot"] == tablet for e in events)
    # every event the controller wrote for the tablet is there, at the address it was written
    ring = [(addr, t.dwords) for addr, t in recent_events(con.controller.interrupters[0], 256)
            if t.type in (TrbType.TRANSFER_EVENT, TrbType.COMMAND_COMPLETION)
            and t.control >> 24 == tablet]
    logged = {(e["addr"], tuple(e["dwords"])) for e in events}
    assert ring and all((addr, tuple(dw)) in logged for addr, dw in ring)
    assert not any(e["slot"] == keyboard for e in events)

    by_dci = as_json(con, f"log --slot {tablet} --dci {TABLET_DCI} -n 10000")
    by_ep = as_json(con, f"log --slot {tablet} --ep 0x81 -n 10000")
    assert by_dci == by_ep and {e["kind"] for e in by_dci} >= {"doorbell", "trb", "urb", "event"}
    assert all((e["slot"], e["dci"]) == (tablet, TABLET_DCI) for e in by_dci)

    shorts = as_json(con, "log --kind event -g 'short packet' -n 10000")
    assert shorts and all("Short Packet" in e["text"] for e in shorts)
    text = con.execute(f"log --slot {tablet} --kind event -n 3")
    assert len(text.splitlines()) == 3 and all("event intr 0" in ln for ln in text.splitlines())


def test_log_by_trb_and_its_errors(con):
    slot = slot_of(con, "tablet")
    addr = queued_trb(con, slot, TABLET_DCI)
    con.execute("tablet move 1 2")
    about = as_json(con, f"log --trb {addr:#x}")
    kinds = [e["kind"] for e in about]
    assert kinds.count("trb") >= 1 and kinds.count("event") == 1 and "urb" in kinds
    assert "record kind" in con.execute("log --kind bogus")
    assert "no record matches" in con.execute("log --slot 99")
    assert "disagree" in con.execute("log --dci 4 --ep 0x81")
    assert "-g '('" in con.execute("log -g '('")


def test_records_are_put_into_words_only_when_shown(con):
    port, _ = con.world.find("tablet")
    seq = con.activity.seq
    # drive the tablet without a console command that shows the activity
    con.execute(f"py devices[{port}].move(5, 6); await session.settle(1)")
    new = con.activity.since(seq)
    assert new and all(e._text is None for e in new)
    shown = con.execute(f"log -n {len(new)}")
    assert all(e._text is not None for e in new) and new[-1].text in shown


def test_history_is_bounded_and_keeps_sequence_numbers():
    h = History(maxlen=5)
    for i in range(12):
        h.on_interrupt(InterruptSignal(i))
    assert [e.seq for e in h.records] == [8, 9, 10, 11, 12] and h.seq == 13
    assert [e.seq for e in h.since(10)] == [10, 11, 12] and h.since(13) == []
    assert h.since(1)[0].seq == 8 and h.records[-1].text == "interrupt: interrupter 11"


def test_endpoint_addresses_map_to_dcis():
    assert [endpoint_dci(a) for a in (0, 0x80, 0x81, 0x01, 0x02, 0x82, 0x8F)] == \
        [1, 1, 3, 2, 4, 5, 31]
    with pytest.raises(ValueError):
        endpoint_dci(0x40)
    assert "event" in KINDS and "urb" in KINDS


def test_tablet_report_matches_the_urb_data(con):
    """The URB's data in the log is the report the device sent (copied when announced)."""
    con.execute("tablet move 300 400")
    done = [e for e in as_json(con, "log --kind urb -n 50") if e["phase"] == "done"][-1]
    report = struct.pack("<BHHb", 0, 300, 400, 0)
    assert report.hex(" ") in done["text"] and done["actual"] == len(report)


def test_history_of_a_data_stage_shows_the_whole_control_td(con):
    """Asked about the middle TRB of a control TD, history tells the TD's story: its three
    fetches, the Short Packet event of the Data Stage (a string descriptor is shorter than
    the 255 bytes asked for) and the event that retired it, the Status Stage's."""
    slot = slot_of(con, "tablet")
    # a control IN transfer of the enumeration that came back shorter than asked for
    short = [e for e in con.activity.records if e.kind == "urb" and e.phase == "done"
             and (e.slot, e.dci) == (slot, 1) and len(e.transfer.trbs) == 3
             and e.transfer.xfer.is_in and e.what[3] < e.transfer.xfer.length]
    setup, data, status = short[-1].transfer.trbs
    [story] = as_json(con, f"history {data:#x}")["stories"]
    assert story["td"] == [setup, data, status]
    fetches = [s for s in story["steps"] if s["role"] == "fetch"]
    assert [f["addr"] for f in fetches] == [setup, data, status]
    assert [f["type"] for f in fetches] == [TrbType.SETUP_STAGE, TrbType.DATA_STAGE,
                                           TrbType.STATUS_STAGE]
    events = [s for s in story["steps"] if s["role"] == "event"]
    assert [e["pointer"] for e in events] == [data, status]
    assert [e["cc_name"] for e in events] == ["Short Packet", "Success"]
    done = next(s for s in story["steps"] if s["role"] == "done")
    assert events[0]["dwords"][2] & 0xFFFFFF == done["length"] - done["actual"]   # residue
    assert story["outcome"] == "retired 'Success'" and story["steps"][0]["role"] == "doorbell"
    assert con.execute(f"history {data:#x}").startswith(f"Data Stage @{data:#x} on ring")
