"""The console's inspection views in their text and JSON forms, against the in-process guest
(which enumerates a tablet, a keyboard and a stick): each must show what the controller and
guest memory really hold."""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from prompt_toolkit.document import Document

from xhcidbg.emu import regs as R
from xhcidbg.emu.context import EP_CTX, SLOT_CTX, XhciEpType
from xhcidbg.emu.trb import SLOT_ID, TRB_SIZE, Trb, TrbType
from xhcidbg.ui import Console
from xhcidbg.ui.completion import CommandCompleter
from xhcidbg.ui.registry import REGISTRY
from xhcidbg.ui.render import peek, recent_events


def as_json(con: Console, line: str):
    out = con.execute(f"{line} --json")
    data = json.loads(out)
    # a command without a data form answers {"ok": ..., "text": ...}: every view has one
    assert not (isinstance(data, dict) and set(data) == {"ok", "text"}), (line, data)
    return data


def slot_of(con: Console, device: str) -> int:
    port, _ = con.world.find(device)
    return con.world.guest_devices[port].device.slot


def dcbaa_entry(con: Console, slot: int) -> int:
    c = con.controller
    return c.mem.read_u64(c.dcbaap + 8 * slot)


def test_ports_json_shows_the_tablet_connected_on_its_slot(con):
    port, _ = con.world.find("tablet")
    [p] = as_json(con, f"ports {port}")
    assert p["port"] == port and p["connected"] is True
    assert p["portsc"] == con.controller.port(port).portsc
    assert p["device"] == {"name": "tablet", "speed": "full-speed"}
    assert p["slot"] == slot_of(con, "tablet")
    assert "Connected Enabled" in p["status"]


def test_regs_json_reads_the_live_registers(con):
    regs = {r["name"]: r for r in as_json(con, "regs")}
    usbcmd = peek(con.controller, R.OP_BASE + R.USBCMD.offset)
    assert regs["USBCMD"]["value"] == usbcmd and regs["USBCMD"]["fields"]["rs"] == 1
    assert regs["USBCMD"]["block"] == "operational"
    assert regs["USBSTS"]["decoded"].startswith(
        f"0x{peek(con.controller, R.OP_BASE + R.USBSTS.offset):08x}")
    one = as_json(con, "regs portsc 1")
    assert one["label"] == "PORTSC[1]" and one["value"] == con.controller.port(1).portsc
    assert set(one["fields"]) == {f.name for f in R.PORTSC.layout.fields}
    assert one["fields"]["ccs"] == 1 and "Connected" in one["decoded"]
    assert "Connected" in con.execute("regs portsc 1")          # the text shows Linux's line too


def test_slots_json_matches_the_controller(con):
    c = con.controller
    rows = {r["slot"]: r for r in as_json(con, "slots")}
    assert set(rows) == set(c.slots)
    tablet = rows[slot_of(con, "tablet")]
    assert tablet["device"] == "tablet" and tablet["state_name"] == "configured"
    ep = next(e for e in tablet["endpoints"] if e["dci"] == 3)
    assert ep["type"] == XhciEpType.INTERRUPT_IN and ep["type_name"] == "Int IN"
    assert ep["dequeue"] == c.slots[tablet["slot"]].endpoints[3].ring.dequeue
    one = as_json(con, f"slots {tablet['slot']} 3")
    assert one["context"]["fields"]["ep_type"] == XhciEpType.INTERRUPT_IN
    assert one["context"]["fields"]["dequeue"] << 4 == ep["dequeue"]
    assert "Type Int IN" in one["context"]["decoded"]


def test_ctx_reads_the_output_context_the_dcbaa_points_at(con):
    slot = slot_of(con, "tablet")
    data = as_json(con, f"ctx {slot}")
    assert data["address"] == dcbaa_entry(con, slot) == con.controller.slots[slot].out_ctx
    # the usb address is the one `slots` shows
    row = next(ln.split() for ln in con.execute("slots").splitlines()
               if ln.split()[:1] == [str(slot)])
    usb_address = data["slot_context"]["fields"]["usb_address"]
    assert row[3] == str(usb_address)
    assert usb_address == SLOT_CTX.get(con.controller.slots[slot].ctx, "usb_address") != 0
    assert data["slot_context"]["meanings"]["slot_state"] == "configured"
    eps = {e["dci"]: e for e in data["endpoints"]}
    assert set(eps) == {1, 3}
    assert eps[3]["fields"]["ep_type"] == XhciEpType.INTERRUPT_IN
    assert eps[3]["meanings"]["ep_type"] == "Int IN" and eps[3]["ep"] == "ep1in"
    assert eps[3]["address"] == data["address"] + 3 * con.controller.context_size
    # what the guest's memory holds, not the controller's copy: change it and ctx follows
    mem = con.controller.mem
    saved = mem.read(eps[3]["address"], 32)
    dw = EP_CTX.unpack(saved)
    EP_CTX["max_packet"].set(dw, 0x1234)
    mem.write(eps[3]["address"], EP_CTX.pack(dw))
    try:
        assert as_json(con, f"ctx {slot} 3")["endpoints"][0]["fields"]["max_packet"] == 0x1234
        assert con.controller.slots[slot].endpoints[3].max_packet == 8
    finally:
        mem.write(eps[3]["address"], saved)
    text = con.execute(f"ctx {slot}")
    assert f"@ {data['address']:#x} (DCBAA entry {slot})" in text
    assert "Type Int IN" in text and f"Addr {usb_address}" in text


def test_ctx_input_shows_the_last_configure_endpoint(con):
    slot = slot_of(con, "tablet")
    guest_eps = con.world.guest_devices[con.world.find("tablet")[0]].device.endpoints
    want_add = 1 | sum(1 << d for d in guest_eps if d != 1)         # A0 and each endpoint
    data = as_json(con, f"ctx {slot} --input")
    assert data["command_name"] == "Configure Endpoint Command"
    assert data["add"] == want_add == data["control"]["fields"]["add"] and data["drop"] == 0
    assert data["address"] == con.controller.slots[slot].input_ctx
    assert [e["dci"] for e in data["endpoints"]] == [3]
    assert data["endpoints"][0]["fields"]["ep_type"] == XhciEpType.INTERRUPT_IN
    assert data["slot_context"]["fields"]["root_hub_port"] == con.world.find("tablet")[0]
    text = con.execute(f"ctx {slot} --input")
    assert "last read by Configure Endpoint Command" in text and "Add: slot 1in" in text


@contextlib.contextmanager
def keyboard_replugged_and_stopped(con, breakpoint: str) -> Iterator[int]:
    """Unplug the keyboard, set `breakpoint`, plug it back: yields its port with the controller
    stopped there; afterwards the breakpoints go and the controller runs on."""
    port, _ = con.world.find("keyboard")
    con.execute(f"unplug keyboard; {breakpoint}")
    try:
        con.execute(f"plug keyboard {port}")
        assert con.controller.gate.paused
        yield port
    finally:
        con.execute("delete all; continue")


def test_ctx_input_follows_each_command_of_a_hotplug(con):
    c = con.controller
    with keyboard_replugged_and_stopped(con, "break command type=address") as port:
        slot = next(s.id for s in c.slots.values() if s.port is c.port(port))
        data = as_json(con, f"ctx {slot} --input")
        assert data["command_name"] == "Address Device Command"
        assert data["add"] == 0b11 and "Add: slot ep0" in data["control"]["decoded"]
        assert data["slot_context"]["fields"]["root_hub_port"] == port
        assert [e["dci"] for e in data["endpoints"]] == [1]
    assert as_json(con, f"ctx {slot} --input")["command_name"] == "Configure Endpoint Command"


def test_decode_reads_numbers_as_the_views_read_memory(con):
    slot = slot_of(con, "tablet")
    ring = as_json(con, f"ring {slot}/3")
    queued = next(t for t in ring["trbs"] if t["readable"] and not t["empty"])
    dw = queued["dwords"]
    data = as_json(con, "decode " + " ".join(hex(v) for v in dw))
    assert data["type_name"] == "Normal" == queued["type_name"]
    assert data["decoded"] == queued["decoded"] and data["fields"] == queued["fields"]
    assert as_json(con, "decode " + " ".join(str(v) for v in dw)) == data    # decimal too
    assert "TRB: Normal" in con.execute("decode " + " ".join(hex(v) for v in dw))
    assert as_json(con, "decode trb 0 0 0 0x2401")["type_name"] == "Enable Slot Command"
    portsc = con.controller.port(1).portsc
    assert as_json(con, f"decode portsc {portsc:#x}")["decoded"] == \
        as_json(con, "ports 1")[0]["status"]
    sctx = con.controller.slots[slot].ctx
    got = as_json(con, "decode slot " + " ".join(hex(v) for v in sctx[:4]))
    assert got["fields"]["usb_address"] == SLOT_CTX.get(sctx, "usb_address")
    assert got["meanings"]["slot_state"] == "configured"
    ep = as_json(con, "decode ep 0x60001 0x8003e 0x17101 0 8")
    assert ep["fields"]["ep_type"] == XhciEpType.INTERRUPT_IN and ep["fields"]["interval"] == 6
    assert "Type Int IN" in ep["decoded"] and "deq 0000000000017101" in ep["decoded"]
    assert as_json(con, "decode ctrl 0 9")["decoded"] == "Add: slot 1in"
    assert "is not a number" in con.execute("decode 0xzz 0 0 0")
    assert "four dwords" in con.execute("decode 1 2 3")


def test_mem_dumps_the_dcbaa_entry_ctx_uses(con):
    c = con.controller
    slot = slot_of(con, "tablet")
    out_ctx = as_json(con, f"ctx {slot}")["address"]
    data = as_json(con, f"mem {c.dcbaap:#x} {8 * (slot + 1)}")
    assert data["address"] == c.dcbaap and data["length"] == 8 * (slot + 1)
    raw = bytes.fromhex(data["data"])
    assert int.from_bytes(raw[8 * slot:8 * slot + 8], "little") == out_ctx
    text = con.execute(f"mem {c.dcbaap:#x} {8 * (slot + 1)}")
    line = out_ctx.to_bytes(8, "little").hex(" ")
    assert any(ln.startswith(f"{c.dcbaap + 16 * (slot // 2):08x}") and line in ln
               for ln in text.splitlines())


def test_mem_refuses_what_is_not_guest_memory(con):
    top = max(r.end for r in con.controller.mem.regions)
    out = con.execute(f"mem {top + 0x1000:#x} 16")
    assert "is not guest memory" in out and "internal error" not in out
    out = con.execute(f"mem {top - 8:#x} 16")
    assert "only 0x8 of the 0x10 bytes" in out
    assert "1..65536 bytes" in con.execute("mem 0 0x10001")
    assert json.loads(con.execute(f"mem {top:#x} --json"))["ok"] is False
    assert con.execute("mem 0 16").splitlines()[0].startswith("00000000  ")


def test_ring_events_interrupters_and_trb_json(con):
    c = con.controller
    slot = slot_of(con, "tablet")
    ring = as_json(con, f"ring {slot}/3")
    at = [t for t in ring["trbs"] if t["at_dequeue"]]
    assert len(at) == 1 and at[0]["address"] == c.slots[slot].endpoints[3].ring.dequeue
    assert ring["ring_type"] == "INTR" and ring["ccs"] == c.slots[slot].endpoints[3].ring.ccs
    queued = next(t for t in ring["trbs"] if t["readable"] and not t["empty"])
    trb = as_json(con, f"trb {queued['address']:#x}")
    raw = Trb.unpack(queued["address"], c.mem.read(queued["address"], TRB_SIZE))
    assert trb["dwords"] == raw.dwords and trb["type"] == raw.type
    assert trb["cycle"] == raw.cycle and trb["fields"]["length"] == raw.status & 0x1FFFF
    events = as_json(con, "events -n 3")
    last_addr, last = recent_events(c.interrupters[0], 1)[0]
    assert events["events"][-1]["address"] == last_addr
    assert events["events"][-1]["type"] == last.type
    assert events["posted"] == c.interrupters[0].posted
    [ir0] = [i for i in as_json(con, "interrupters") if i["index"] == 0]
    assert ir0["ie"] == 1 and ir0["posted"] == c.interrupters[0].posted
    assert ir0["messages"] == con.session.interrupts.counts[0]


def test_devices_log_break_and_guest_json(con):
    devices = {d["name"]: d for d in as_json(con, "devices")}
    assert set(devices) == {"tablet", "keyboard", "storage"}
    assert devices["tablet"]["slot"] == slot_of(con, "tablet") == devices["tablet"]["guest_slot"]
    assert devices["tablet"]["polling"] == [0x81] and devices["storage"]["guest_kind"] == "storage"
    log = as_json(con, "log -n 5 event")
    assert log and all(r["kind"] == "event" for r in log)
    assert [r["seq"] for r in log] == [r.seq for r in con.activity.records
                                       if r.kind == "event"][-len(log):]
    added = as_json(con, "break urb ep=0x81")
    try:
        listing = as_json(con, "break")
        assert added in listing
        assert added["conditions"] == ["ep=0x81"] and added["enabled"] is True
    finally:
        con.execute(f"delete {added['number']}")
    guest = as_json(con, "guest")
    assert guest["runs"] is True and guest["devices_enumerated"] == 3
    assert guest["errors"] == [] and guest["state"] in ("idle", "running")


def test_every_view_answers_json(con):
    slot = slot_of(con, "tablet")
    c = con.controller
    for line in ("ports", "regs", "regs usbsts", "slots", f"slots {slot}", f"slots {slot} 3",
                 f"ring {slot}/3", "ring cmd", f"trb {c.cmd_ring.dequeue:#x}", "events",
                 "interrupters", "devices", "log", "break", "guest", f"ctx {slot}",
                 f"ctx {slot} 1", f"ctx {slot} --input", "decode portsc 0x603",
                 f"mem {c.dcbaap:#x} 64"):
        as_json(con, line)
    failed = json.loads(con.execute("ctx 42 --json"))          # errors still answer JSON
    assert failed["ok"] is False and "DCBAA entry 42" in failed["text"]
    assert "slot ids are 1..64" in json.loads(con.execute("ctx 99 --json"))["text"]


def test_ctx_is_the_context_command_no_more(con):
    assert REGISTRY.lookup("ctx").name == "ctx"
    assert "ctx" not in REGISTRY.lookup("context").aliases
    assert "context panes off" in con.execute("context off")
    con.execute("context on")


def test_completion_of_the_new_views(con):
    comp = CommandCompleter(con)

    def words(text):
        return [x.text for x in comp.get_completions(Document(text), None)]

    slot = slot_of(con, "tablet")
    assert str(slot) in words("ctx ")
    assert words(f"ctx {slot} ")[:2] == ["1", "3"] and "--input" in words(f"ctx {slot} --")
    assert "portsc" in words("decode p") and "slot" in words("decode s")
    assert f"{con.controller.dcbaap:#x}" in words("mem ")


def test_guest_and_devices_json_on_a_session_without_the_scripted_guest():
    from xhcidbg.devices import Tablet
    from xhcidbg.session import Session
    session = Session([Tablet()])
    con = Console(session=session, width=200).start()
    try:
        guest = as_json(con, "guest")
        assert guest["kind"] == "session" and guest["qmp"] is False
        assert guest["shell"] == "none" and guest["configured"] == []
        assert "shell: none" in con.execute("guest")
        [tablet] = as_json(con, "devices")
        assert tablet["name"] == "tablet" and tablet["slot"] is None    # nothing enumerated it
        assert tablet["guest_kind"] is None
    finally:
        con.close()
        session.close()


def test_ctx_input_at_a_stop_before_the_command_shows_what_it_is_about_to_read(con):
    with keyboard_replugged_and_stopped(con, "break command type=address at=start"):
        held = con.breakpoints.held_command
        assert held is not None and held.type == TrbType.ADDRESS_DEVICE
        slot = SLOT_ID.of(held.control)
        data = as_json(con, f"ctx {slot} --input")
        assert data["read"] is False and data["command_name"] == "Address Device Command"
        assert data["address"] == held.param and data["add"] == 0b11
        con.execute("step command")
        after = as_json(con, f"ctx {slot} --input")
        assert after["read"] is True and after["address"] == held.param
