"""`top` against the in-process guest: its counts must move exactly as the traffic did."""
from __future__ import annotations

import asyncio
import json

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from xhcidbg.emu.trb import CC
from xhcidbg.ui import Console
from xhcidbg.ui.top import event_ring_fill, live_top

TABLET_REPORT = 6                  # bytes: buttons, x, y, wheel


def snapshot(con: Console) -> dict:
    return json.loads(con.execute("top --once --json"))


def row(snap: dict, ring: str) -> dict:
    return next(e for e in snap["endpoints"] if e["ring"] == ring)


def slot_of(con: Console, device: str) -> int:
    port, _ = con.world.find(device)
    return con.world.guest_devices[port].device.slot


def test_top_counts_grow_by_exactly_the_reports_moved(con):
    tablet, keyboard = slot_of(con, "tablet"), slot_of(con, "keyboard")
    before = snapshot(con)
    reports = con.world.report_count
    moves = 3
    for i in range(moves):
        con.execute(f"tablet move {100 + i} 200")
    assert con.world.report_count == reports + moves
    after = snapshot(con)
    b, a = row(before, f"{tablet}/3"), row(after, f"{tablet}/3")
    assert a["device"] == "tablet" and a["endpoint"] == "ep1in"
    assert a["transfers"] - b["transfers"] == moves
    assert a["bytes_in"] - b["bytes_in"] == moves * TABLET_REPORT
    assert a["trbs"] - b["trbs"] == moves        # each report: the guest queues one more TD
    assert a["bytes_out"] == b["bytes_out"] == 0 and a["errors"] == {}
    kb_b, kb_a = row(before, f"{keyboard}/3"), row(after, f"{keyboard}/3")
    assert all(kb_a[k] == kb_b[k] for k in ("trbs", "transfers", "bytes_in", "errors"))
    [ir_b] = [i for i in before["interrupters"] if i["index"] == 0]
    [ir_a] = [i for i in after["interrupters"] if i["index"] == 0]
    assert ir_a["events"] - ir_b["events"] == moves     # one Transfer Event per report
    assert ir_a["interrupts"] > ir_b["interrupts"]
    ir = con.controller.interrupters[0]
    assert ir_a["unread"] == 0                  # the guest has read every event
    assert ir_a["ring_trbs"] == sum(size for _, size in ir.segments)
    # rates are over the time since the previous snapshot
    assert after["interval_s"] > 0
    assert a["bytes_in_per_s"] == pytest.approx(moves * TABLET_REPORT / after["interval_s"])


def test_top_counts_command_errors_by_completion_code(con):
    before = row(snapshot(con), "cmd")
    # the scripted guest disables a slot that is not enabled: Slot Not Enabled Error
    out = con.execute("py job = world.guest_job('bad', lambda: guest.disable_slot(99)); "
                      "await world.wait_job(job); job.result.cc")
    assert out.strip() == str(int(CC.SLOT_NOT_ENABLED))
    after = row(snapshot(con), "cmd")
    assert after["transfers"] == before["transfers"] + 1
    assert after["errors"] == {"Slot Not Enabled Error": 1}


def test_event_ring_fill_counts_unread_events(con):
    ir = con.controller.interrupters[0]
    con.execute("pause")
    fill = event_ring_fill(ir)
    assert fill is not None and fill[1] == sum(size for _, size in ir.segments)
    erdp = ir.erdp
    try:
        ir.erdp = ir.enqueue_pointer - 3 * 16        # as if software had left three unread
        assert event_ring_fill(ir) == (3, fill[1])
    finally:
        ir.erdp = erdp


def test_top_prints_n_snapshots_in_scripts(con):
    out = con.execute("top -n 2 -d 0.01")
    assert out.count("endpoints (rates over") == 2 and out.count("interrupters") == 2
    shots = json.loads(con.execute("top -n 2 -d 0.01 --json"))
    assert len(shots) == 2 and shots[1]["time_ns"] > shots[0]["time_ns"]
    assert "tablet" in out and "ep1in" in out
    assert "counters reset" in con.execute("top --reset --once")
    assert all(e["transfers"] == 0 for e in snapshot(con)["endpoints"])


def test_top_live_redraws_until_a_key_is_pressed(con):
    async def run() -> dict:
        with create_pipe_input() as keys:
            asyncio.get_running_loop().call_later(0.5, keys.send_text, "q")
            return await live_top(con, 0.05, input=keys, output=DummyOutput())

    started = con.counters.snapshot().time_ns
    data = con.loop.run_until_complete(run())
    # it kept redrawing: the last frame's rates are over one interval, not the whole run
    assert data["time_ns"] - started >= 0.4e9
    assert data["interval_s"] < 0.3
    assert {e["ring"] for e in data["endpoints"]} >= {"cmd"}
