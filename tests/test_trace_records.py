"""The hand-written record packers agree with the declared layouts, and the committed Lua
dissector is what the declarations generate."""
from xhcidbg.trace import dissector, records
from xhcidbg.trace.records import Kind


def test_packers_match_the_declared_layouts():
    trb = [0x11111111, 0x22222222, 0x33333333, 0x44444444]
    cases = {
        records.mmio(0x480, 4, True, 0x1234, "PORTSC[3]"):
            (Kind.MMIO, dict(offset=0x480, size=4, write=1, value=0x1234), b"PORTSC[3]"),
        records.doorbell(5, 3, 9): (Kind.DOORBELL, dict(db=5, target=3, stream=9), b""),
        records.trb(0x1_0000_2000, records.Ring.TRANSFER, 7, 31, 65535, trb):
            (Kind.TRB, dict(address=0x1_0000_2000, ring=1, slot=7, dci=31, stream=65535), b""),
        records.event(0x3000, 1023, True, trb):
            (Kind.EVENT, dict(address=0x3000, interrupter=1023, dropped=1), b""),
        records.command(0x4000, 6, 200, 0xABCDEF, trb):
            (Kind.COMMAND, dict(address=0x4000, cc=6, slot=200, param=0xABCDEF), b""),
        records.port(12, 0x2A0, 0x206E1): (Kind.PORT, dict(port=12, old=0x2A0, new=0x206E1), b""),
        records.interrupt(3): (Kind.INTERRUPT, dict(interrupter=3), b""),
        records.context(0x5000, 9, 32, 12, list(range(8))):
            (Kind.CONTEXT, dict(address=0x5000, slot=9, dci=32, reason=12), b""),
        records.log("warning", "odd"): (Kind.LOG, dict(level=2), b"odd"),
        records.urb(3, 4, 0, b"U" * 64): (Kind.URB, dict(slot=3, dci=4, stream=0), b"U" * 64),
        records.state("slot", "1", "default", "addressed"):
            (Kind.STATE, {}, b"slot\x00" b"1\x00default\x00addressed"),
    }
    for data, (kind, fields, tail) in cases.items():
        rec = records.parse(data)
        assert rec.kind == kind and rec.fields["version"] == records.VERSION
        assert {k: rec.fields[k] for k in fields} == fields
        assert rec.tail == tail
        if kind in (Kind.TRB, Kind.EVENT, Kind.COMMAND):
            assert rec.trb == trb
        if kind == Kind.CONTEXT:
            assert rec.dwords[4:12] == list(range(8))


def test_parse_rejects_what_it_cannot_read():
    for bad, why in ((b"\x01", "shorter"), (b"\x63\x01\x00\x00", "unknown"),
                     (b"\x01\x09\x00\x00" + bytes(16), "version"), (b"\x03\x01\x00\x00", "needs")):
        try:
            records.parse(bad)
        except ValueError as e:
            assert why in str(e)
        else:
            raise AssertionError(f"{bad!r} parsed")


def test_committed_lua_dissector_is_generated_from_the_declarations():
    committed = dissector.REPO_COPY.read_text()
    assert committed == dissector.generate(), (
        "captures/xhcidbg.lua is stale: run `python -m xhcidbg.trace.dissector`")
