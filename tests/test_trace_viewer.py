"""The viewer reads captures other tools wrote, and says what it cannot read."""
from __future__ import annotations

import io
import struct

from xhcidbg.decode import usbmon as um
from xhcidbg.trace import pcapng
from xhcidbg.trace.cli import main as cli_main
from xhcidbg.trace.viewer import Reader, show

DEVICE_DESC = bytes.fromhex("120100020000004009120100000101020301")


def usbmon_pair(bo="<", qemu=False):
    """A GET_DESCRIPTOR(Device) submit and completion as the kernel (or QEMU) writes them."""
    setup = bytes.fromhex("8006000100001200")
    s = um.UsbmonRecord(0xFFFF8881234, "S", um.XFER_CONTROL, 0x80, 3, 1, 0, ord("<"), 1000, 5,
                        0 if qemu else -115, 18, 0, setup)
    c = um.UsbmonRecord(0xFFFF8881234, "C", um.XFER_CONTROL, 0x80, 3, 1, 0 if qemu else ord("-"),
                        ord("=") if qemu else 0, 1000, 9, 0, 18, 18 + 64 if qemu else 18,
                        bytes(8), data=DEVICE_DESC)
    return [um.pack_record(s, bo), um.pack_record(c, bo)]


def classic_pcap(path, packets, bo="<", linktype=220, nsec=False):
    magic = 0xA1B23C4D if nsec else 0xA1B2C3D4
    with open(path, "wb") as f:
        f.write(struct.pack(bo + "IHHiIII", magic, 2, 4, 0, 0, 4096 + 64, linktype))
        for i, data in enumerate(packets):
            frac = (5 + 4 * i) * (1000 if nsec else 1)      # the same instants either way
            f.write(struct.pack(bo + "IIII", 1000, frac, len(data), len(data)) + data)


def show_text(path, **kw) -> tuple[str, Reader]:
    out = io.StringIO()
    reader = show(path, out=out, **kw)
    return out.getvalue(), reader


def test_reads_a_qemu_style_classic_pcap(tmp_path):
    path = tmp_path / "qemu.pcap"
    classic_pcap(path, usbmon_pair(qemu=True))
    text, reader = show_text(path)
    lines = text.splitlines()
    assert lines[0].endswith("usbmon: ffff8881234 1000000005 S Ci:1:003:0 "
                             "s 80 06 0100 0000 0012 18 <")
    assert lines[1].endswith("usbmon: ffff8881234 1000000009 C Ci:1:003:0 0 18 = "
                             "12010002 00000040 09120100 00010102 0301")
    assert reader.capture.format == "pcap" and not reader.problems.lines(reader.capture)


def test_reads_big_endian_files_the_same(tmp_path):
    little, big = tmp_path / "le.pcap", tmp_path / "be.pcap"
    classic_pcap(little, usbmon_pair("<"))
    classic_pcap(big, usbmon_pair(">"), bo=">", nsec=True)
    t_le, _ = show_text(little)
    t_be, _ = show_text(big)
    assert t_le == t_be and "C Ci:1:003:0 0 18 = 12010002" in t_le


def test_reads_pcapng_from_other_writers_with_other_resolutions(tmp_path):
    """A microsecond-resolution pcapng with a 48-byte (DLT 189) interface and an Ethernet one."""
    path = tmp_path / "mixed.pcapng"
    s, _c = usbmon_pair()
    with open(path, "wb") as f:
        f.write(pcapng.section_header(application="dumpcap"))
        # IDBs without if_tsresol: microseconds
        for linktype in (189, 1):
            f.write(pcapng._block(pcapng.IDB, struct.pack("<HHI", linktype, 0, 0)))
        f.write(pcapng.enhanced_packet(0, 1_000_000_005, s[:48]))
        f.write(pcapng.enhanced_packet(1, 1_000_000_006, b"\xff" * 60))
        f.write(pcapng.enhanced_packet(1, 1_000_000_007, b"\xff" * 60))
    text, reader = show_text(path)
    assert "S Ci:1:003:0 s 80 06 0100 0000 0012 18 <" in text
    notes = reader.problems.lines(reader.capture)
    assert len(notes) == 1 and "interface 1" in notes[0] and "2 packets not shown" in notes[0]
    assert "link type 1" in notes[0]


def test_says_when_a_file_was_cut_short(tmp_path):
    path = tmp_path / "cut.pcap"
    classic_pcap(path, usbmon_pair())
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    text, reader = show_text(path)
    assert text.count("usbmon:") == 1
    assert any("cut short" in n for n in reader.problems.lines(reader.capture))


def test_cli_reports_unreadable_files_clearly(tmp_path, capsys):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, world")
    assert cli_main(["trace", "show", str(junk)]) == 2
    assert "not a pcap or pcapng file" in capsys.readouterr().err
    assert cli_main(["trace", "show", str(tmp_path / "missing.pcapng")]) == 2
    assert "cannot open" in capsys.readouterr().err
    assert cli_main(["trace", "show", str(junk), "ep=9"]) == 2
    assert "9in or 9out" in capsys.readouterr().err
