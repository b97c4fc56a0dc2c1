"""The hand-written record packers agree with the declared layouts, and the committed Lua
dissector is what the declarations generate."""
from xhcidbg.emu.hooks import InterruptSignal
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


def test_whole_block_packers_write_what_enhanced_packet_writes():
    """The tracer's one-call packers (record and EPB together) against the plain packers
    wrapped by the general EPB writer."""
    from xhcidbg.emu.trb import Trb
    from xhcidbg.trace import pcapng
    from xhcidbg.trace.records import (
        EPB_DOORBELL,
        EPB_EVENT,
        EPB_INTERRUPT,
        EPB_MMIO_HEAD,
        EPB_PORT,
        EPB_TRB,
        HEAD,
    )
    ts = 0x1_2345_6789_ABCD
    hi, lo = ts >> 32, ts & 0xFFFFFFFF
    dw = [0x11111111, 0x22222222, 0x33333333, 0x44444444]

    def framed(struct_, plain, *fields):
        n = len(plain)
        return struct_.pack(pcapng.EPB, 32 + n, 0, hi, lo, n, n, *fields, 32 + n)

    trb = Trb(0x1_0000_2000, dw[0] | dw[1] << 32, dw[2], dw[3])
    cases = [
        (framed(EPB_DOORBELL, records.doorbell(5, 3, 9), HEAD[Kind.DOORBELL], 5, 3 | 9 << 16),
         records.doorbell(5, 3, 9)),
        (framed(EPB_TRB, records.trb(trb.addr, 1, 7, 31, 65535, dw), HEAD[Kind.TRB], trb.addr,
                7 | 31 << 8 | 1 << 13 | 65535 << 16, trb.param, trb.status, trb.control),
         records.trb(trb.addr, 1, 7, 31, 65535, dw)),
        (framed(EPB_EVENT, records.event(0x3000, 5, True, dw), HEAD[Kind.EVENT], 0x3000,
                5 | 1 << 16, *dw), records.event(0x3000, 5, True, dw)),
        (framed(EPB_PORT, records.port(2, 0x2A0, 0x206E1), HEAD[Kind.PORT], 2, 0x2A0, 0x206E1),
         records.port(2, 0x2A0, 0x206E1)),
        (framed(EPB_INTERRUPT, records.interrupt(3), HEAD[Kind.INTERRUPT], 3),
         records.interrupt(3)),
    ]
    for got, plain in cases:
        assert got == pcapng.enhanced_packet(0, ts, plain)
    plain = records.mmio(0x480, 4, True, 0x1234, "PORTSC[3]")
    n = len(plain)
    total = 32 + (n + 3 & ~3)
    head = EPB_MMIO_HEAD.pack(pcapng.EPB, total, 0, hi, lo, n, n, HEAD[Kind.MMIO], 0x480,
                              4 | 1 << 8, 0x1234)
    assert head + b"PORTSC[3]" + pcapng.EPB_TAIL[n & 3].pack(total) == \
        pcapng.enhanced_packet(0, ts, plain)


def test_usbmon_block_is_the_usbmon_record_in_an_epb():
    from xhcidbg.devices.base import EpType, Status, UsbTransfer
    from xhcidbg.emu.hooks import TransferRecord
    from xhcidbg.trace import pcapng
    from xhcidbg.trace.urb import usbmon_block, usbmon_record
    ctrl = UsbTransfer(0, EpType.CONTROL, 18, setup=bytes.fromhex("8006000100001200"))
    bulk = UsbTransfer(0x02, EpType.BULK, 5, data=b"hello")
    iso = UsbTransfer(0x83, EpType.ISOCHRONOUS, 192, interval=1)
    ts = 1_700_000_000_123_456_789
    for xfer, done in ((ctrl, lambda: ctrl.complete(Status.OK, bytes(range(18)))),
                       (bulk, lambda: bulk.complete(Status.OK, actual=5)),
                       (iso, lambda: iso.complete(Status.OK, bytes(100)))):
        for event in ("S", "C"):
            if event == "C":
                done()
            for max_data, comment in ((65535 - 64, ""), (3, "fault rule 1")):
                rec = TransferRecord(xfer, 0, 0, 0, *((1, 2) if xfer is ctrl else (0, 0)))
                record, orig = usbmon_record(rec, event, ts, max_data, 8)
                total, pieces = usbmon_block(rec, event, ts, max_data, 8, 2,
                                             pcapng.comment_option(comment))
                block = b"".join(pieces)
                assert len(block) == total
                assert block == pcapng.enhanced_packet(2, ts, record, orig, comment)


def test_a_full_queue_drops_and_counts_records_and_the_file_stays_valid(tmp_path):
    """Nobody reads the FIFO: the queue fills to its bound, then records are dropped and
    counted; once a reader comes, what was kept arrives as a valid capture."""
    import os
    import threading

    from xhcidbg.emu.controller import XhciController
    from xhcidbg.trace import tracer as T
    from xhcidbg.trace.pcapng import read_capture
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    c = XhciController()
    t = T.Tracer(c, fifo, "kind=interrupt", max_buffer=2 * T.CHUNK_SIZE,
                 flush_interval=0.01).start()
    per_chunk = T.CHUNK_SIZE // 40
    for _ in range(3 * per_chunk):
        for fn in c.hooks.on_interrupt:
            fn(InterruptSignal(1))
    st = t.status()
    assert st.records == 2 * per_chunk and st.dropped == per_chunk
    got = {}
    reader = threading.Thread(target=lambda: got.setdefault("data", fifo.read_bytes()))
    reader.start()
    import time
    deadline = time.monotonic() + 30
    while not t.status().bytes_written and time.monotonic() < deadline:
        time.sleep(0.01)                 # the writer opens the FIFO once the reader has
    st = t.stop()
    reader.join(30)
    assert not st.error and st.bytes_written == len(got["data"])
    path = tmp_path / "copy.pcapng"
    path.write_bytes(got["data"])
    with open(path, "rb") as f:
        cap, packets = read_capture(f)
        assert sum(1 for _ in packets) == st.records and not cap.truncated
