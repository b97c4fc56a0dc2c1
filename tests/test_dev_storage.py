"""Mass storage over Bulk-Only Transport, driven as a host's usb-storage driver would."""
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xhcidbg.devices import DirectHost, Disk, Speed, Status, StorageDevice
from xhcidbg.devices.bot import CSW, CswStatus, cbw
from xhcidbg.devices.descriptors import parse_descriptors
from xhcidbg.devices.scsi import (
    FixedSenseData,
    ReadCapacity10Data,
    ReadCapacity16Data,
    ReportLunsData,
    StandardInquiryData,
    VpdPage,
)

BLOCKS = 4096                       # 2 MiB images
IN, OUT = 0x81, 0x02


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(BLOCKS * 512))
    return path


class Bot:
    """The host side of Bulk-Only Transport: CBW, data phase in chunks, CSW."""

    def __init__(self, device, chunk=64 * 1024):
        self.dev = device
        self.host = DirectHost(device)
        self.host.enumerate()
        self.tag = 0
        self.chunk = chunk

    def command(self, cdb, length=0, data=None, lun=0, data_in=None):
        """Returns (CSW status, residue, data read).  STALLs on the data pipes are cleared as a
        host does, then the CSW is read."""
        self.tag += 1
        data_in = (data is None) if data_in is None else data_in
        assert self.host.write(OUT, cbw(self.tag, length, data_in, cdb, lun)) == 31
        received = b""
        if length and data_in:
            while len(received) < length:
                xfer = self.host.submit_in(IN, min(self.chunk, length - len(received)))
                assert xfer.done
                if xfer.status == Status.STALL:
                    self.host.clear_halt(IN)
                    break
                assert xfer.status == Status.OK
                received += xfer.result
                if xfer.actual < xfer.length:
                    break                                # short packet ends the data phase
        elif length:
            payload = data if data is not None else bytes(length)
            for pos in range(0, len(payload), self.chunk):
                xfer = self.host.submit_out(OUT, payload[pos:pos + self.chunk])
                assert xfer.done
                if xfer.status == Status.STALL:
                    self.host.clear_halt(OUT)
                    break
        status = self.csw()
        return status.bCSWStatus, status.dCSWDataResidue, received

    def csw(self):
        xfer = self.host.submit_in(IN, 13)
        if xfer.status == Status.STALL:
            self.host.clear_halt(IN)
            xfer = self.host.submit_in(IN, 13)
        assert xfer.done and xfer.status == Status.OK and xfer.actual == 13
        parsed = CSW.parse(xfer.result)
        assert parsed.dCSWTag == self.tag
        return parsed

    def sense(self, lun=0):
        status, _, data = self.command(bytes([0x03, 0, 0, 0, 18, 0]), 18, lun=lun)
        assert status == CswStatus.PASSED
        s = FixedSenseData.parse(data)
        assert s.response.code == 0x70
        return s.flags.sense_key, s.asc, s.ascq

    def read10(self, lba, blocks, length=None):
        cdb = bytes([0x28, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"
        return self.command(cdb, blocks * 512 if length is None else length)

    def write10(self, lba, data):
        blocks = len(data) // 512
        cdb = bytes([0x2A, 0]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"
        return self.command(cdb, len(data), data=data)


def test_enumerates_as_bulk_only_scsi(image):
    for speed, packet in ((Speed.SUPER, 1024), (Speed.HIGH, 512), (Speed.FULL, 64)):
        dev = StorageDevice(image, speed=speed)
        host = DirectHost(dev)
        enum = host.enumerate()
        parsed = parse_descriptors(enum.configuration)
        iface = next(p for n, p in parsed if n == "INTERFACE")
        assert (iface.bInterfaceClass, iface.bInterfaceSubclass, iface.bInterfaceProtocol) == \
            (0x08, 0x06, 0x50)
        eps = {p.bEndpointAddress: p for n, p in parsed if n == "ENDPOINT"}
        assert eps[IN].wMaxPacketSize == eps[OUT].wMaxPacketSize == packet
        assert eps[IN].bmAttributes == eps[OUT].bmAttributes == 2
        serial = enum.strings[enum.device.iSerialNumber]
        assert len(serial) >= 12 and all(ch in "0123456789ABCDEF" for ch in serial)
        assert host.control_in(0xA1, 0xFE, 0, 0, 1) == b"\x00"            # GET MAX LUN
        dev.close()


def test_inquiry_capacity_and_vpd(image):
    bot = Bot(StorageDevice(image))
    status, residue, data = bot.command(bytes([0x12, 0, 0, 0, 36, 0]), 36)
    assert (status, residue) == (0, 0)
    inq = StandardInquiryData.parse(data)
    assert inq.peripheral.device_type == 0 and inq.version == 5
    assert inq.format.response_data_format == 2 and inq.additional_length == 31
    assert (inq.vendor, inq.product) == ("xhcidbg", "Virtual Disk")
    # Allocation length shorter than the data: truncated, not an error.
    assert bot.command(bytes([0x12, 0, 0, 0, 5, 0]), 5)[:2] == (0, 0)
    # Host asks for more than the device has: short data, residue (case 5).
    status, residue, data = bot.command(bytes([0x12, 0, 0, 0, 96, 0]), 96)
    assert (status, residue, len(data)) == (0, 60, 36)
    pages = VpdPage.parse(bot.command(bytes([0x12, 1, 0x00, 0, 255, 0]), 255)[2])
    assert pages.page_code == 0 and list(pages.payload) == [0x00, 0x80, 0x83]
    serial = VpdPage.parse(bot.command(bytes([0x12, 1, 0x80, 0, 255, 0]), 255)[2])
    assert serial.payload.decode() == bot.dev.serial_number
    ident = VpdPage.parse(bot.command(bytes([0x12, 1, 0x83, 0, 255, 0]), 255)[2])
    assert ident.payload[4:12] == b"xhcidbg "
    status, _, _ = bot.command(bytes([0x12, 1, 0xB0, 0, 255, 0]), 255)
    assert status == CswStatus.FAILED and bot.sense() == (5, 0x24, 0)   # INVALID FIELD IN CDB
    assert bot.command(bytes(6), 0)[:2] == (0, 0)                        # TEST UNIT READY
    cap = ReadCapacity10Data.parse(bot.command(bytes([0x25] + [0] * 9), 8)[2])
    assert (cap.last_lba, cap.block_length) == (BLOCKS - 1, 512)
    cap16 = ReadCapacity16Data.parse(
        bot.command(bytes([0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]), 32)[2])
    assert (cap16.last_lba, cap16.block_length) == (BLOCKS - 1, 512)
    luns = ReportLunsData.parse(bot.command(bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0]),
                                            64)[2])
    assert list(luns.luns) == [0]


def test_write_sync_read_back(image, monkeypatch):
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    dev = StorageDevice(image)
    bot = Bot(dev, chunk=64 * 1024)              # 128 KiB commands in 64 KiB transfers
    payload = os.urandom(128 * 1024)
    assert bot.write10(100, payload) == (0, 0, b"")
    assert fsyncs == []
    sync = bytes([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0])                     # SYNCHRONIZE CACHE(10)
    assert bot.command(sync, 0)[:2] == (0, 0)
    assert fsyncs == [dev.disks[0].fd]
    status, residue, data = bot.read10(100, 256)
    assert (status, residue) == (0, 0)
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
    on_disk = image.read_bytes()
    assert on_disk[100 * 512:100 * 512 + len(payload)] == payload
    assert len(on_disk) == BLOCKS * 512
    # 16-byte commands at the very end of the medium, and SYNCHRONIZE CACHE(16).
    last = os.urandom(512)
    cdb = bytes([0x8A, 0]) + (BLOCKS - 1).to_bytes(8, "big") + (1).to_bytes(4, "big") + b"\0\0"
    assert bot.command(cdb, 512, data=last)[:2] == (0, 0)
    assert bot.command(bytes([0x91]) + bytes(15), 0)[:2] == (0, 0)
    cdb = bytes([0x88, 0]) + (BLOCKS - 1).to_bytes(8, "big") + (1).to_bytes(4, "big") + b"\0\0"
    assert bot.command(cdb, 512)[2] == last
    assert image.read_bytes()[-512:] == last
    # One big transfer for a big command works the same.
    bot.chunk = 1 << 20
    status, _, data = bot.read10(0, 2048)
    assert status == 0 and data == image.read_bytes()[:1 << 20]
    dev.close()


def test_out_of_range_and_unknown_opcode(image):
    bot = Bot(StorageDevice(image))
    status, residue, data = bot.read10(BLOCKS - 1, 2)                    # crosses the end
    assert (status, residue, data) == (CswStatus.FAILED, 1024, b"")      # case 4: IN stalled
    assert bot.sense() == (5, 0x21, 0)                                   # LBA OUT OF RANGE
    assert bot.sense() == (0, 0, 0)                                      # sense was consumed
    status, residue, _ = bot.write10(BLOCKS, bytes(512))
    assert (status, residue) == (CswStatus.FAILED, 512)                  # case 9: OUT stalled
    assert bot.sense() == (5, 0x21, 0)
    for opcode in (0xFF, 0x23, 0x15, 0x04):
        status, residue, _ = bot.command(bytes([opcode]) + bytes(5), 0)
        assert status == CswStatus.FAILED
        assert bot.sense() == (5, 0x20, 0)                               # INVALID OPCODE
    # READ(10) of zero blocks moves nothing and passes.
    assert bot.read10(0, 0) == (0, 0, b"")


def test_read_only_medium(image):
    before = image.read_bytes()
    bot = Bot(StorageDevice(image, readonly=True))
    status, residue, _ = bot.write10(0, os.urandom(4096))
    assert (status, residue) == (CswStatus.FAILED, 4096)
    assert bot.sense() == (7, 0x27, 0)                                   # DATA PROTECT
    assert image.read_bytes() == before
    assert bot.read10(0, 8)[2] == before[:4096]
    header = bot.command(bytes([0x1A, 0, 0x3F, 0, 192, 0]), 192)[2]      # MODE SENSE(6), all
    assert header[2] & 0x80                                              # WP
    assert bot.command(bytes([0x35]) + bytes(9), 0)[:2] == (0, 0)        # sync is harmless


def test_mode_sense_pages(image):
    bot = Bot(StorageDevice(image))
    data = bot.command(bytes([0x1A, 0, 0x08, 0, 255, 0]), 255)[2]
    assert data[0] == len(data) - 1 and data[2] & 0x80 == 0 and data[3] == 8
    caching = data[4 + 8:]
    assert caching[0] & 0x3F == 0x08 and caching[1] == 0x12 and caching[2] & 0x04   # WCE
    data = bot.command(bytes([0x1A, 0x08, 0x3F, 0, 255, 0]), 255)[2]        # DBD, all pages
    assert data[3] == 0 and data[4] == 0x08 and data[4 + 20] == 0x0A
    data = bot.command(bytes([0x5A, 0, 0x08, 0, 0, 0, 0, 0, 255, 0]), 255)[2]  # MODE SENSE(10)
    assert int.from_bytes(data[:2], "big") == len(data) - 2 and data[7] == 8
    data = bot.command(bytes([0x5A, 0x10, 0x08, 0, 0, 0, 0, 0, 255, 0]), 255)[2]   # LLBAA
    assert data[4] & 1 and data[7] == 16 and int.from_bytes(data[8:16], "big") == BLOCKS
    assert bot.command(bytes([0x1A, 0, 0x1C, 0, 255, 0]), 255)[0] == CswStatus.FAILED
    assert bot.sense() == (5, 0x24, 0)
    assert bot.command(bytes([0x1A, 0, 0xC8, 0, 255, 0]), 255)[0] == CswStatus.FAILED  # saved
    assert bot.sense() == (5, 0x39, 0)


def test_invalid_cbw_stalls_until_reset_recovery(image):
    bot = Bot(StorageDevice(image))
    host = bot.host
    bad = bytearray(cbw(1, 0, False, bytes(6)))
    bad[0:4] = b"USBX"
    for wrong in (bytes(bad), cbw(1, 0, False, bytes(6))[:30], cbw(1, 0, False, bytes(6)) + b"\0"):
        x = host.submit_out(OUT, wrong)
        assert x.status == Status.STALL
        assert host.submit_in(IN, 13).status == Status.STALL           # both pipes
        host.clear_halt(IN)
        host.clear_halt(OUT)
        assert host.submit_in(IN, 13).status == Status.STALL           # still, until reset
        assert host.submit_out(OUT, cbw(2, 0, False, bytes(6))).status == Status.STALL
        assert host.control_in(0x82, 0, 0, IN, 2) == b"\x01\x00"        # GET_STATUS: halted
        host.control_out(0x21, 0xFF, 0, 0)                             # Mass Storage Reset
        assert host.control_in(0x82, 0, 0, IN, 2) == b"\x01\x00"        # halts survive it
        host.clear_halt(IN)
        host.clear_halt(OUT)
        assert bot.command(bytes(6), 0)[:2] == (0, 0)                   # working again
    # Not meaningful: reserved flag bits, LUN out of range, CB length 0 or 17.
    for wrong in (bytearray(cbw(3, 0, False, bytes(6))), ):
        for offset, value in ((12, 0x01), (13, 0x01), (14, 0), (14, 17)):
            w = bytearray(wrong)
            w[offset] = value
            assert host.submit_out(OUT, bytes(w)).status == Status.STALL
            host.control_out(0x21, 0xFF, 0, 0)
            host.clear_halt(IN)
            host.clear_halt(OUT)
    assert bot.command(bytes(6), 0)[:2] == (0, 0)


def test_thirteen_cases_phase_errors(image):
    bot = Bot(StorageDevice(image))
    read1 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    write1 = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    assert bot.command(read1, 0)[0] == CswStatus.PHASE_ERROR               # case 2: Hn < Di
    assert bot.command(write1, 0, data_in=False)[0] == CswStatus.PHASE_ERROR   # case 3: Hn < Do
    status, _, data = bot.command(read1, 256)                              # case 7: Hi < Di
    assert status == CswStatus.PHASE_ERROR and len(data) == 256
    assert bot.command(write1, 512, data_in=True)[0] == CswStatus.PHASE_ERROR  # case 8: Hi <> Do
    assert bot.command(read1, 512, data=bytes(512))[0] == CswStatus.PHASE_ERROR  # 10: Ho <> Di
    before = image.read_bytes()[:512]
    status, _, _ = bot.command(write1, 256, data=os.urandom(256))          # case 13: Ho < Do
    assert status == CswStatus.PHASE_ERROR and image.read_bytes()[:512] == before
    # Case 6 and 12: exactly as expected.
    assert bot.command(read1, 512)[:2] == (0, 0)
    assert bot.command(write1, 512, data=bytes(512))[:2] == (0, 0)
    # Case 11: Ho > Do, the extra is accepted and reported as residue.
    payload = os.urandom(512)
    assert bot.command(write1, 1024, data=payload + bytes(512))[:2] == (0, 512)
    assert image.read_bytes()[:512] == payload
    # Case 5: Hi > Di.  A short transfer ends the data; a full one is followed by a STALL.
    status, residue, data = bot.read10(0, 1, length=1024)
    assert (status, residue, data) == (0, 512, payload)
    bot.chunk = 512
    status, residue, data = bot.read10(0, 1, length=1024)
    assert (status, residue, data) == (0, 512, payload)
    assert bot.command(bytes(6), 0)[:2] == (0, 0)                          # case 1


def test_bot_state_machine_across_transfers(image):
    dev = StorageDevice(image)
    bot = Bot(dev)
    host = bot.host
    # The host's IN may arrive before there is anything to send: it waits.
    early = host.submit_in(IN, 13)
    assert not early.done
    assert host.write(OUT, cbw(77, 0, False, bytes(6))) == 31
    assert early.done and CSW.parse(early.result).dCSWTag == 77
    # A CBW sent before the previous CSW is fetched waits its turn.
    host.write(OUT, cbw(78, 0, False, bytes(6)))
    queued = host.submit_out(OUT, cbw(79, 0, False, bytes(6)))
    assert not queued.done
    assert CSW.parse(host.read(IN, 13)).dCSWTag == 78
    assert queued.done and CSW.parse(host.read(IN, 13)).dCSWTag == 79
    # A READ split in odd-sized pieces.
    host.write(OUT, cbw(80, 3 * 512, True, bytes([0x28, 0, 0, 0, 0, 10, 0, 0, 3, 0])))
    pieces = [host.read(IN, n) for n in (100, 1000, 436)]
    assert b"".join(pieces) == image.read_bytes()[10 * 512:13 * 512]
    assert CSW.parse(host.read(IN, 13)).dCSWDataResidue == 0
    # Mass Storage Reset in the middle of a data phase: ready for a new CBW.
    host.write(OUT, cbw(81, 8 * 512, True, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])))
    host.read(IN, 512)
    host.control_out(0x21, 0xFF, 0, 0)
    bot.tag = 81
    assert bot.command(bytes(6), 0)[:2] == (0, 0)
    # Bad class requests stall.
    assert host.control(0x21, 0xFF, 1, 0).status == Status.STALL
    assert host.control(0xA1, 0xFE, 0, 0, 2).status == Status.STALL


def test_several_luns_keep_their_own_sense(image, tmp_path):
    other = tmp_path / "other.img"
    other.write_bytes(bytes(64 * 512))
    dev = StorageDevice(image, Disk(other, readonly=True))
    bot = Bot(dev)
    assert bot.host.control_in(0xA1, 0xFE, 0, 0, 1) == b"\x01"
    assert bot.read10(64, 1)[0] == 0                                     # fine on LUN 0
    cap = ReadCapacity10Data.parse(bot.command(bytes([0x25] + [0] * 9), 8, lun=1)[2])
    assert cap.last_lba == 63
    assert bot.command(bytes([0x28, 0, 0, 0, 0, 64, 0, 0, 1, 0]), 512, lun=1)[0] == 1
    assert bot.sense(lun=0) == (0, 0, 0)
    assert bot.sense(lun=1) == (5, 0x21, 0)
    luns = ReportLunsData.parse(bot.command(bytes([0xA0] + [0] * 8 + [64, 0, 0]), 64)[2])
    assert list(luns.luns) == [0, 1 << 48]
    assert "LUN 1" in dev.describe()


def test_removable_medium_eject(image):
    bot = Bot(StorageDevice(image, removable=True))
    inq = StandardInquiryData.parse(bot.command(bytes([0x12, 0, 0, 0, 36, 0]), 36)[2])
    assert inq.removable.rmb
    assert bot.command(bytes([0x1E, 0, 0, 0, 1, 0]), 0)[0] == 0         # PREVENT
    assert bot.command(bytes([0x1B, 0, 0, 0, 0x02, 0]), 0)[0] == 1      # eject refused
    assert bot.sense() == (5, 0x53, 2)
    assert bot.command(bytes([0x1E, 0, 0, 0, 0, 0]), 0)[0] == 0         # ALLOW
    assert bot.command(bytes([0x1B, 0, 0, 0, 0x02, 0]), 0)[0] == 0      # eject
    assert bot.command(bytes(6), 0)[0] == 1                             # TEST UNIT READY
    assert bot.sense() == (2, 0x3A, 0)                                  # MEDIUM NOT PRESENT
    assert bot.read10(0, 1)[0] == 1
    assert bot.command(bytes([0x1B, 0, 0, 0, 0x03, 0]), 0)[0] == 0      # load
    assert bot.command(bytes(6), 0)[0] == 0


def test_bad_images_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot open"):
        StorageDevice(tmp_path / "missing.img")
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="smaller than one"):
        StorageDevice(tiny)
    with pytest.raises(ValueError, match="at least one"):
        StorageDevice()


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(min_size=31, max_size=31), length=st.integers(0, 1 << 16),
       prefix=st.booleans())
def test_hostile_cbws_never_break_the_device(tmp_path_factory, blob, length, prefix):
    path = tmp_path_factory.getbasetemp() / "hostile.img"
    if not path.exists():
        path.write_bytes(bytes(64 * 512))
    dev = StorageDevice(path)
    bot = Bot(dev)
    host = bot.host
    if prefix:                                   # a well-formed wrapper around random bytes
        flags_lun_cblength = bytes([blob[12] & 0x80, 0, max(1, blob[14] % 17)])
        blob = b"USBC" + blob[4:8] + length.to_bytes(4, "little") + flags_lun_cblength + blob[15:]
    x = host.submit_out(OUT, blob)
    assert x.done
    for _ in range(4):
        for ep in (IN, OUT):
            xfer = host.submit_in(IN, 4096) if ep == IN else host.submit_out(OUT, bytes(512))
            if not xfer.done:
                dev.cancel(xfer)
    host.control_out(0x21, 0xFF, 0, 0)
    host.clear_halt(IN)
    host.clear_halt(OUT)
    bot.tag = 1000
    assert bot.command(bytes(6), 0)[:2] == (0, 0)
    dev.close()


def test_medium_errors_fail_the_command_with_sense(image, monkeypatch):
    """An image that cannot be read or written: the command fails with the medium error in the
    sense data, the data pipe stalls, and the device carries on."""
    dev = StorageDevice(image)
    bot = Bot(dev)

    def broken(*args):
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(os, "pread", broken)
        m.setattr(os, "preadv", broken)
        status, residue, data = bot.read10(0, 8)
    assert (status, residue, data) == (CswStatus.FAILED, 8 * 512, b"")
    assert bot.sense() == (3, 0x11, 0)                                   # UNRECOVERED READ ERROR
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", broken)
        status, residue, _ = bot.write10(0, bytes(4 * 512))
    assert (status, residue) == (CswStatus.FAILED, 4 * 512)
    assert bot.sense() == (3, 0x0C, 0)                                   # WRITE ERROR
    assert bot.read10(0, 1)[:2] == (0, 0)
    dev.close()
