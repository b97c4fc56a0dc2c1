"""The console driven through its Python API against the in-process guest: what it shows must be
what the controller, the devices and the guest really did."""
from __future__ import annotations

import os
import struct

from prompt_toolkit.document import Document

from xhcidbg.devices.keyboard import keycode
from xhcidbg.emu import regs as R
from xhcidbg.emu.trb import CC, TrbType
from xhcidbg.session import DeviceChoice
from xhcidbg.ui import Console, WorldOptions
from xhcidbg.ui.completion import CommandCompleter
from xhcidbg.ui.registry import REGISTRY
from xhcidbg.ui.render import peek, recent_events


def tablet_report(x: int, y: int, buttons: int = 0, wheel: int = 0) -> bytes:
    """The tablet's 6-byte input report as its report descriptor lays it out."""
    return struct.pack("<BHHb", buttons, x, y, wheel)


def transfer_events(controller, slot: int, dci: int) -> list:
    ir = controller.interrupters[0]
    return [t for _, t in recent_events(ir, 256)
            if t.type == TrbType.TRANSFER_EVENT and t.control >> 24 == slot
            and (t.control >> 16) & 0x1F == dci]


def test_start_enumerates_the_three_devices(con):
    c = con.controller
    assert c.running
    kinds = {con.world.devices[p].name: p for p in con.world.devices}
    assert set(kinds) == {"tablet", "keyboard", "storage"}
    for name, port in kinds.items():
        p = c.port(port)
        assert p.enabled, name
        slot = next(s for s in c.slots.values() if s.port is p)
        assert slot.state == 3                               # configured
        assert con.world.guest_devices[port].device.slot == slot.id
    out = con.execute("ports")
    lines = {int(ln.split()[0]): ln for ln in out.splitlines() if ln.strip()[:1].isdigit()}
    for port in kinds.values():
        assert "Connected Enabled" in lines[port] and f"{c.port(port).portsc:#010x}" in lines[port]
    empty = next(p.number for p in c.ports if p.device is None)
    assert "Not-connected" in lines[empty]


def test_regs_show_live_values_field_by_field(con):
    out = con.execute("regs")
    usbcmd = peek(con.controller, R.OP_BASE + R.USBCMD.offset)
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("USBCMD"))
    assert f"{usbcmd:#010x}" in line and " rs " in f" {line} "
    one = con.execute("regs portsc 1")
    portsc = con.controller.port(1).portsc
    assert f"{portsc:#010x}" in one
    for f in R.PORTSC.layout.fields:                         # every declared field is listed
        assert f"\n  {f.name} " in one


def test_pause_tablet_move_step_td_completes_the_interrupt_td(con):
    c = con.controller
    w = con.world
    port, _tablet = w.find("tablet")
    slot = w.guest_devices[port].device.slot
    con.execute("pause")
    before = len(transfer_events(c, slot, 3))
    reports_before = w.report_count
    con.execute("tablet move 100 200")
    # paused: the device answered, but nothing was retired and the guest got nothing yet
    assert len(transfer_events(c, slot, 3)) == before
    assert w.report_count == reports_before
    out = con.execute("step td")
    events = transfer_events(c, slot, 3)
    assert len(events) == before + 1
    assert events[-1].status >> 24 in (CC.SUCCESS, CC.SHORT_PACKET)
    want = tablet_report(100, 200)
    assert w.reports[-1].data == want and w.report_count == reports_before + 1
    assert want.hex(" ") in out
    assert "Transfer Event" in out and "PAUSED" in out


def test_keyboard_type_produces_reports(con):
    w = con.world
    start = w.report_count
    out = con.execute("keyboard type hi")
    got = [r.data for r in list(w.reports)[-(w.report_count - start):] if r.device == "keyboard"]
    assert [r[2] for r in got] == [keycode("h"), 0, keycode("i"), 0]
    assert all(len(r) == 8 for r in got)
    assert got[0].hex(" ") in out


def test_help_exists_for_every_command(con):
    listing = con.execute("help")
    for name in REGISTRY.commands:
        assert name in listing
        text = con.execute(f"help {name}")
        assert text.startswith("usage: " + name), name
        assert "examples:" in text, name
        own = con.execute(f"{name} -h")
        if name == "trace":                  # hands -h to the tracer's own parser
            assert "usage: xhcidbg trace" in own
        else:
            assert own.strip() == text.split("\naliases:")[0].strip()


def test_breakpoint_on_address_device_stops_hotplug_enumeration(con):
    c = con.controller
    w = con.world
    port, _ = w.find("keyboard")
    con.execute("unplug keyboard")
    assert port not in w.guest_devices and c.port(port).device is None
    out = con.execute("break command type=address")
    assert "#1 command type=address" in out
    out = con.execute(f"plug keyboard {port}")
    assert c.gate.paused
    bp = con.breakpoints.get(1)
    assert bp.hits == 1 and "Address Device" in out and "hit" in out
    assert port not in w.guest_devices                     # enumeration is held mid-way
    con.execute("delete all; continue")
    assert not c.gate.paused
    assert w.guest_devices[port].device.slot in c.slots


def test_breakpoint_trb_setup_and_step_trb(con):
    c = con.controller
    con.execute("break trb type=Setup")
    out = con.execute("storage")                          # INQUIRY... goes over bulk, not ep0
    assert not c.gate.paused
    con.execute("unplug tablet")
    out = con.execute("plug tablet")
    assert c.gate.paused and "Setup Stage" in out
    hit_ring = con.activity.last_ring
    _slot, dci = map(int, hit_ring.split("/"))
    assert dci == 1
    out = con.execute("step trb")
    assert "stepped 1 trb" in out
    out = con.execute("delete 1; continue")
    assert not c.gate.paused


def test_step_with_nothing_to_do_says_so(con):
    con.execute("pause")
    out = con.execute("step command")
    assert "nothing to step" in out


def test_rings_slots_events_views(con):
    c = con.controller
    port, _ = con.world.find("tablet")
    slot = con.world.guest_devices[port].device.slot
    ep = c.slots[slot].endpoints[3]
    out = con.execute(f"ring {slot}/3")
    arrow = next(ln for ln in out.splitlines() if ln.strip().startswith("->"))
    assert f"{ep.ring.dequeue:#x}" in arrow
    out = con.execute(f"slots {slot} 3")
    assert "Int IN" in out and "running" in out
    out = con.execute("events -n 4")
    last_addr = recent_events(c.interrupters[0], 1)[0][0]
    assert f"{last_addr:#x}" in out
    out = con.execute("interrupters")
    assert str(c.interrupters[0].posted) in out


def test_storage_read_goes_through_the_guest(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
        f.seek(512)
        f.write(b"xhcidbg was here")
    with Console(WorldOptions(DeviceChoice(storage=[str(image)], tablet=False, keyboard=False)),
                 width=160) as con:
        out = con.execute("storage")
        assert f"READ CAPACITY {os.path.getsize(image) // 512} blocks" in out
        out = con.execute("storage read 1")
        assert "xhcidbg was here" in out
        urbs = [r.text for r in con.activity.records if r.kind == "urb" and "bulk in" in r.text]
        assert urbs, "the read went over the bulk IN endpoint"


def test_errors_are_clear(con):
    assert "unknown command 'bogus'" in con.execute("bogus")
    assert "invalid choice" in con.execute("step sideways")
    assert "slot 42 is not enabled" in con.execute("slots 42")
    assert "`break trb` takes" in con.execute("break trb colour=red")
    assert "no register named" in con.execute("regs NOPE")


def test_completion_knows_commands_arguments_and_live_values(con):
    comp = CommandCompleter(con)

    def words(text):
        return [c.text for c in comp.get_completions(Document(text), None)]

    assert "tablet" in words("tab")
    assert "move" in words("tablet m")
    assert "td" in words("step ")
    assert "1/3" in words("ring ")
    assert "type=" in words("break trb ")


def test_the_status_toolbar_follows_the_controller_and_the_capture(con, tmp_path):
    assert con.toolbar_text().startswith("controller: running | guest: in-process scripted guest")
    assert "capture: off" in con.toolbar_text() and "faults: none" in con.toolbar_text()
    con.execute(f"pause; trace start {tmp_path / 't.pcapng'}")
    bar = con.toolbar_text()
    assert bar.startswith("controller: paused") and f"capture: {tmp_path / 't.pcapng'}" in bar
    con.execute("trace stop; continue")
    assert con.toolbar_text().startswith("controller: running")
    assert "capture: off" in con.toolbar_text()
