"""The debugger's breakpoints, watchpoints, run-until commands and changes at a stop, driven
through the console against the in-process guest: each stop must be the controller really
doing the thing the breakpoint names."""
from __future__ import annotations

import json

from xhcidbg.emu import regs as R
from xhcidbg.emu.context import EP_CTX, EpState
from xhcidbg.emu.trb import CC, TRB_SIZE, Trb, TrbType
from xhcidbg.ui.render import recent_events

HCH = R.USBSTS.mask("hch")
BOS = 0x0F00                # GET_DESCRIPTOR(BOS): a USB 2 device stalls it


def slot_of(con, kind: str) -> int:
    return con.world.guest_device(kind).device.slot


def transfer_events(con, slot: int, dci: int) -> list[Trb]:
    ir = con.controller.interrupters[0]
    return [t for _, t in recent_events(ir, 256)
            if t.type == TrbType.TRANSFER_EVENT and t.control >> 24 == slot
            and (t.control >> 16) & 0x1F == dci]


def stall_ep0(con, kind: str = "tablet"):
    """The guest asks a USB 2 device for its BOS descriptor: the device stalls, ep0 halts."""
    dev = con.world.guest_device(kind).device
    return con.world.guest_job("stall", lambda: dev.control(0x80, 6, BOS, 0, 5, check=False))


def test_tbreak_doorbell_stops_once_then_is_gone(con):
    c = con.controller
    slot = slot_of(con, "tablet")
    out = con.execute(f"tbreak doorbell slot={slot}")
    assert f"temporary breakpoint #1 doorbell slot={slot}" in out
    out = con.execute("tablet move 100 200")             # the guest re-arms its poll: doorbell
    assert c.gate.paused
    assert f"doorbell {slot} rung" in out and "temporary breakpoint #1" in out
    assert con.breakpoints.points == []
    assert "no breakpoints" in con.execute("break")
    con.execute("continue")
    con.execute("tablet move 300 400")
    assert not c.gate.paused
    assert con.breakpoints.hits == 1


def test_ignore_skips_exactly_count_stops(con):
    c = con.controller
    slot = slot_of(con, "tablet")
    con.execute(f"break event slot={slot} dci=3")
    con.execute("ignore 1 2")
    for x in (1, 2):
        con.execute(f"tablet move {x} {x}")
        assert not c.gate.paused, f"stopped at hit {x}"
    bp = con.breakpoints.get(1)
    assert bp.hits == 2 and bp.ignore == 0
    con.execute("tablet move 3 3")
    assert c.gate.paused and bp.hits == 3
    assert "hit 3 times" in con.execute("break")


def test_break_event_cc_not_success_passes_successes_and_stops_on_a_stall(con):
    c = con.controller
    slot = slot_of(con, "tablet")
    con.execute("break event cc!=success")
    con.execute("keyboard type hi")                     # 8-byte reports: Success events
    assert not c.gate.paused and con.breakpoints.get(1).hits == 0
    job = stall_ep0(con)
    out = con.execute("wait stop -t 10")
    assert c.gate.paused
    assert "Stall Error" in out and f"slot {slot} ep 1" in out
    last = transfer_events(con, slot, 1)[-1]
    assert last.status >> 24 == CC.STALL_ERROR
    con.execute("delete all; continue")
    assert job.done and job.result.cc == CC.STALL_ERROR


def test_conditions_with_operators_and_condition_replaces_them(con):
    c = con.controller
    slot = slot_of(con, "tablet")
    assert "a number is needed" in con.execute("break event slot<x")
    assert "= or != only" in con.execute("break urb phase>done")
    con.execute(f"break urb slot={slot} phase=retired actual>6")   # the tablet sends 6 bytes
    con.execute("tablet move 1 1")
    assert not c.gate.paused and con.breakpoints.get(1).hits == 0
    out = con.execute(f"condition 1 slot={slot} phase=retired actual>=6")
    assert "actual>=6" in out
    con.execute("tablet move 2 2")
    assert c.gate.paused and con.breakpoints.get(1).hits == 1
    con.execute("condition 1")
    assert con.breakpoints.get(1).conditions == []


def test_commands_run_at_the_stop_and_can_continue(con):
    c = con.controller
    slot = slot_of(con, "tablet")
    con.execute(f"break event slot={slot} dci=3")
    out = con.execute("commands 1 'regs usbsts; continue'")
    assert "regs usbsts" in out and "continue" in out
    out = con.execute("tablet move 10 10")
    assert "breakpoint #1 event" in out and "commands:" in out
    assert "USBSTS @ BAR0+" in out                      # regs usbsts ran at the stop
    assert not c.gate.paused                            # ... and continue after it
    assert con.breakpoints.get(1).hits == 1
    con.execute("commands 1 ''")
    assert con.breakpoints.get(1).commands == []


def test_break_mmio_by_register_name_and_access(con):
    c = con.controller
    slot = slot_of(con, "tablet")
    assert "no register named" in con.execute("break mmio reg=NOPE")
    listeners = len(c.hooks.on_mmio)
    con.execute(f"break mmio reg=DOORBELL[{slot}] write")
    assert len(c.hooks.on_mmio) == listeners + 1        # MMIO is listened to only now
    out = con.execute("tablet move 5 6")
    assert c.gate.paused
    assert f"MMIO write of DOORBELL[{slot}]" in out
    con.execute("delete 1; continue")
    con.execute("break mmio reg=PORTSC access=read")   # every port's PORTSC
    port, _ = con.world.find("keyboard")
    out = con.execute("unplug keyboard")                # the guest's hub driver looks
    assert c.gate.paused and f"MMIO read of PORTSC[{port}]" in out
    con.execute("delete all")
    assert len(c.hooks.on_mmio) == listeners


def test_break_setup_on_the_request_fields(con):
    c = con.controller
    port, _ = con.world.find("keyboard")
    con.execute("break setup request=0x06 value=0x0100")   # GET_DESCRIPTOR(DEVICE)
    con.execute("unplug keyboard")
    out = con.execute(f"plug keyboard {port}")
    assert c.gate.paused
    assert "control request on slot" in out and "GET_DESCRIPTOR DEVICE index 0" in out
    con.execute("delete all; continue")
    assert con.world.guest_devices[port].device.slot in c.slots


def test_break_interrupt_and_until_interrupt(con):
    c = con.controller
    con.execute("break interrupt interrupter=1")        # nobody uses interrupter 1
    con.execute("tablet move 7 7")
    assert not c.gate.paused
    con.execute("delete all; pause")
    con.execute("tablet move 8 8")
    out = con.execute("until interrupt")
    assert c.gate.paused and "stopped (until: the next interrupt)" in out
    assert "interrupt signalled: interrupter 0" in out


def test_step_event_and_until_doorbell(con):
    c = con.controller
    slot = slot_of(con, "tablet")
    con.execute("pause")
    before = len(transfer_events(con, slot, 3))
    con.execute("tablet move 20 20")
    out = con.execute("step event")
    assert c.gate.paused and "stopped (step event: the next event)" in out
    assert len(transfer_events(con, slot, 3)) == before + 1
    con.execute("continue; pause")
    con.execute("tablet move 30 30")
    out = con.execute("until doorbell")      # the guest takes the report and polls again
    assert c.gate.paused and f"doorbell {slot} rung" in out


def test_until_without_the_event_keeps_running_and_says_so(con):
    c = con.controller
    out = con.execute("until doorbell -t 0.3")          # the guest is idle: no doorbell
    assert "still running" in out and not c.gate.paused
    con.execute("tablet move 1 2")                      # now one comes: it stops there
    assert c.gate.paused
    assert con.breakpoints.internal == []


def test_finish_retires_the_td(con):
    c = con.controller
    w = con.world
    slot = slot_of(con, "tablet")
    con.execute("pause")
    before = len(transfer_events(con, slot, 3))
    reports = w.report_count
    con.execute("tablet move 640 480")                  # the device answered; nothing retired
    assert len(transfer_events(con, slot, 3)) == before
    out = con.execute(f"finish {slot}/3")
    assert c.gate.paused
    assert f"stopped (finish: the TD on ring {slot}/3 retires)" in out
    assert len(transfer_events(con, slot, 3)) == before + 1
    assert w.report_count == reports + 1
    con.execute("tablet move 1 1")                      # the guest's next poll completes
    out = con.execute("finish")                         # the ring it stopped on: that TD
    assert f"stopped (finish: the TD on ring {slot}/3 retires)" in out
    assert w.report_count == reports + 2


def test_watch_ep_dequeue_hits_when_the_controller_writes_it(con):
    c = con.controller
    w = con.world
    slot = slot_of(con, "tablet")
    con.execute("tablet move 5 5")                      # the ring moved since it was configured
    assert c.hooks.on_dma == []                         # nobody watches: nothing attached
    out = con.execute(f"watch ep {slot} 3 dequeue")
    assert "watchpoint #1" in out and c.hooks.on_dma != []
    ep = w.guest_device("tablet").device.endpoint(0x81)
    job = w.guest_job("stop endpoint", lambda: ep.stop())    # Stop Endpoint: written back
    out = con.execute("wait stop -t 10")
    assert c.gate.paused and con.breakpoints.get(1).hits == 1
    live = c.slots[slot].endpoints[3].ring.dequeue
    assert f"new {live:#x}" in out and "the controller writes ep" in out
    out_ctx = int.from_bytes(c.mem.peek(c.dcbaap + 8 * slot, 8), "little") & ~0x3F
    con.execute("continue")
    assert job.done
    ctx = EP_CTX.unpack(c.mem.peek(out_ctx + 3 * c.context_size, 32))
    assert EP_CTX.get(ctx, "dequeue") << 4 == live
    con.execute("delete all")
    c.scheduler.run_due()
    assert c.hooks.on_dma == []


def test_watch_ep_state_sees_the_halt(con):
    c = con.controller
    slot = slot_of(con, "tablet")
    con.execute(f"watch ep {slot} 1 state")
    stall_ep0(con)
    out = con.execute("wait stop -t 10")
    assert c.gate.paused
    assert "old running (1) new halted (2)" in out


def test_watch_trb_on_read_sees_what_the_guest_wrote(con):
    c = con.controller
    slot = slot_of(con, "tablet")
    ring = c.slots[slot].endpoints[3].ring
    nxt = ring.dequeue                  # the guest queues its next poll here after a report
    out = con.execute(f"watch trb {nxt:#x} --on-read")
    assert "(on-read)" in out
    con.execute("tablet move 9 9")
    assert c.gate.paused
    hit = con.breakpoints.last_hit[1]
    assert "finds it changed" in hit and "Normal" in hit


def test_watch_reg_stops_at_the_guests_write(con):
    c = con.controller
    con.execute("watch reg ERDP_LO[0]")
    out = con.execute("tablet move 11 11")              # the guest moves ERDP after the event
    assert c.gate.paused and "the guest writes ERDP_LO[0]" in out


def test_rwatch_and_awatch_modes(con):
    c = con.controller
    ir = c.interrupters[0]
    nxt = ir.enqueue_pointer
    con.execute(f"awatch mem {nxt:#x} 16")      # the next event TRB: the controller writes it
    con.execute("tablet move 12 12")
    assert c.gate.paused
    assert "the controller writes mem" in con.breakpoints.last_hit[1]
    con.execute("delete all; continue")
    con.execute(f"rwatch mem {nxt:#x} 16")              # nobody reads an event TRB back
    con.execute("tablet move 13 13")
    assert not c.gate.paused


def test_save_delete_source_restores_the_same_list(con, tmp_path):
    slot = slot_of(con, "tablet")
    con.execute(f"break event cc!=success slot={slot}")
    con.execute("tbreak doorbell slot=0")
    con.execute("break mmio reg=USBCMD write --ignore 2")
    con.execute("break command type=address --commands 'regs usbsts; continue'")
    con.execute(f"watch ep {slot} 3 dequeue")
    con.execute("watch reg PORTSC[1]")
    con.execute("rwatch mem 0x10000 8")
    con.execute("disable 3")
    before = [b.definition() for b in con.breakpoints.points]
    path = tmp_path / "bp.xhcidbg"
    out = con.execute(f"save breakpoints {path}")
    assert f"saved {len(before)} breakpoint(s)" in out
    con.execute("delete all")
    assert con.breakpoints.points == []
    out = con.execute(f"source {path}")
    assert "error" not in out.lower(), out
    after = [b.definition() for b in con.breakpoints.points]
    assert after == before
    restored = con.breakpoints.points
    assert restored[2].ignore == 2 and not restored[2].enabled
    assert restored[3].commands == ["regs usbsts", "continue"]


def test_source_runs_a_file_and_reports_failures(con, tmp_path):
    path = tmp_path / "cmds"
    path.write_text("# a comment\nbreak event; break doorbell slot=1\nbogus\n")
    out = con.execute(f"source {path}")
    assert len(con.breakpoints.points) == 2
    assert "unknown command 'bogus'" in out and "1 of 3 command(s)" in out


def test_set_reg_usbcmd_run_stop_halts_the_controller(con):
    c = con.controller
    assert not c.usbsts & HCH
    assert "no register named" in con.execute("set reg NOPE 1")
    assert "one PORTSC per port" in con.execute("set reg PORTSC 0")
    out = con.execute("set reg USBCMD rs=0")
    assert c.usbsts & HCH and not c.running
    assert "reads" in out
    assert " hch" in f" {con.execute('regs usbsts')}"
    data = json.loads(con.execute("set reg USBCMD rs=0 --json"))
    assert data["register"] == "USBCMD" and not data["after"] & 1


def test_poke_and_edit_trb(con):
    c = con.controller
    slot = slot_of(con, "tablet")
    addr = c.slots[slot].endpoints[3].ring.dequeue - TRB_SIZE   # the poll TD in flight
    con.execute(f"poke {addr + 8:#x} 0x7 --size 1")
    assert c.mem.peek(addr + 8, 1) == b"\x07"
    assert "does not fit" in con.execute("poke 0x1000 0x100 --size 1")
    out = con.execute(f"edit trb {addr:#x} length=16 ioc=0")
    trb = Trb.unpack(addr, c.mem.peek(addr, TRB_SIZE))
    assert trb.status & 0x1FFFF == 16 and not trb.control & (1 << 5)
    assert "now:" in out
    assert "has no field 'colour'" in con.execute(f"edit trb {addr:#x} colour=1")


def test_edit_ep_state_changes_the_controllers_context(con):
    c = con.controller
    slot = slot_of(con, "tablet")
    ep = c.slots[slot].endpoints[3]
    out = con.execute(f"edit ep {slot} 3 ep_state=3")
    assert ep.state == EpState.STOPPED and "ep_state: 1 -> 3" in out
    out_ctx = c.slots[slot].out_ctx + 3 * c.context_size
    assert EP_CTX.get(EP_CTX.unpack(c.mem.peek(out_ctx, 32)), "ep_state") == EpState.STOPPED
    assert "endpoint 1/3: running -> stopped" in con.execute("log -n 5 state") or \
        any("running -> stopped" in r.text for r in con.activity.records)
    assert "fixed when the endpoint is configured" in con.execute(f"edit ep {slot} 3 ep_type=1")


def test_post_event_port_goes_to_the_guests_event_ring(con):
    c = con.controller
    ir = c.interrupters[0]
    posted = ir.posted
    out = con.execute("post event port 5")
    assert ir.posted == posted + 1 and "Port Status Change" in out
    events = [t for _, t in recent_events(ir, 4) if t.type == TrbType.PORT_STATUS_CHANGE]
    assert events and events[-1].param >> 24 == 5
    slot = slot_of(con, "tablet")
    out = con.execute(f"post event transfer {slot} 3 stall 0")
    last = transfer_events(con, slot, 3)[-1]
    assert last.status >> 24 == CC.STALL_ERROR and "Stall Error" in out


def test_listings_give_json(con):
    con.execute("break event cc=stall")
    con.execute("watch reg USBCMD")
    data = json.loads(con.execute("break --json"))
    assert [d["number"] for d in data] == [1, 2]
    assert data[0]["conditions"] == ["cc=stall"] and data[1]["type"] == "watchpoint"
    data = json.loads(con.execute("watch --json"))
    assert [d["number"] for d in data] == [2]
