"""A SCSI target of direct-access logical units (disks) backed by image files (SPC-4, SBC-3).

`ScsiTarget` is the SCSI half of a mass storage device, apart from the USB transport that
carries its commands: Bulk-Only Transport (`storage`) today, a UAS transport could use it as it
is.  The interface between the two is narrow: the transport hands `execute` a logical unit
number and a command block and gets an `Outcome` -- failed or not (sense data then waits on
the logical unit for REQUEST SENSE), and the data phase the command wants.  The transport moves
that data in pieces of its own choosing with `Outcome.read`, `read_into` and `write`; a medium
error there raises `MediumError` after leaving its sense data.

Reads and writes go straight between the host's buffers and the image, one pread/pwrite (or
preadv) per piece.  SYNCHRONIZE CACHE fsyncs the image: written data is on disk when it
completes.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from . import scsi
from .scsi import Op, Sense

log = logging.getLogger(__name__)

__all__ = ["BLOCK", "Direction", "Disk", "MediumError", "Outcome", "ScsiTarget"]

BLOCK = 512
CDB_LENGTH = 16                  # the longest command block handled (READ/WRITE(16))

Buffer = bytes | bytearray | memoryview


class Disk:
    """One logical unit: an image file of 512-byte blocks, and its SCSI state (sense data,
    medium present, removal prevented)."""

    def __init__(self, path: str | os.PathLike[str], readonly: bool = False,
                 removable: bool = False, vendor: str = "xhcidbg", product: str = "Virtual Disk",
                 revision: str = "1.0", serial: str | None = None):
        self.path = os.fspath(path)
        self.readonly = readonly
        self.removable = removable
        self.vendor, self.product, self.revision = vendor, product, revision
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            raise ValueError(f"cannot open disk image {self.path!r}: {e.strerror}") from None
        size = os.fstat(self.fd).st_size
        self.blocks = size // BLOCK
        if self.blocks == 0:
            self.close()
            raise ValueError(f"disk image {self.path!r} is smaller than one {BLOCK}-byte block")
        # A USB mass storage device's serial number has at least 12 hex digits (BOT 4.1.1) and
        # the device takes the first disk's; derive a stable one from the path.
        self.serial = serial or hashlib.sha1(
            os.path.realpath(self.path).encode()).hexdigest()[:12].upper()
        self.sense: Sense = scsi.NO_SENSE
        self.present = True
        self.prevent_removal = False

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        while len(data) < length:           # regular files only read short at EOF
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                raise OSError(f"short read at {offset + len(data)} from {self.path}")
            data += more
        return data

    def read_into(self, offset: int, views: list[memoryview]) -> int:
        """Read straight into the host's buffers (one preadv, no copy); returns bytes read."""
        total = sum(len(v) for v in views)
        done = 0
        while done < total:
            n = os.preadv(self.fd, views, offset + done)
            if n <= 0:
                raise OSError(f"short read at {offset + done} from {self.path}")
            done += n
            if done < total:
                views = _skip(views, n)
        return done

    def write(self, offset: int, data: Buffer) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def flush(self) -> None:
        if not self.readonly:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        return (f"Disk({self.path!r}, {self.blocks} blocks"
                f"{', read-only' if self.readonly else ''})")


class Direction(Enum):
    """Which way a command's data phase goes."""

    IN = "in"                    # to the host
    OUT = "out"                  # from the host


class MediumError(Exception):
    """Reading or writing the image failed; the logical unit now holds the sense data."""


@dataclass(frozen=True)
class Outcome:
    """What a SCSI command asks of the transport: whether it failed, and the data phase it
    wants -- `length` bytes (Di / Do) in `direction`.  Positions given to `read`, `read_into`
    and `write` count from the start of that data phase."""

    failed: bool = False
    direction: Direction | None = None
    length: int = 0
    data: bytes = b""                # the data-in bytes, for non-media commands
    disk: Disk | None = None         # media transfers: the span of the image from `offset`
    offset: int = 0

    @property
    def on_medium(self) -> bool:
        """The data is on the image (it can go straight into the host's buffers)."""
        return self.disk is not None

    def read(self, pos: int, n: int) -> bytes:
        """`n` data-in bytes from `pos`."""
        if self.disk is None:
            return self.data[pos:pos + n]
        try:
            return self.disk.read(self.offset + pos, n)
        except OSError as e:
            raise self._medium_error(scsi.UNRECOVERED_READ_ERROR, "read from", e) from e

    def read_into(self, pos: int, views: list[memoryview]) -> None:
        """Data-in bytes from `pos` straight into the host's buffers, filling them."""
        if self.disk is None:
            raise ValueError("only media data is read into buffers")
        try:
            self.disk.read_into(self.offset + pos, views)
        except OSError as e:
            raise self._medium_error(scsi.UNRECOVERED_READ_ERROR, "read from", e) from e

    def write(self, pos: int, data: Buffer) -> None:
        """Data-out bytes at `pos`; a command with nothing on the medium discards them."""
        if self.disk is None:
            return
        try:
            self.disk.write(self.offset + pos, data)
        except OSError as e:
            raise self._medium_error(scsi.WRITE_ERROR, "write to", e) from e

    def _medium_error(self, sense: Sense, what: str, error: OSError) -> MediumError:
        assert self.disk is not None
        self.disk.sense = sense
        return MediumError(f"{what} {self.disk.path} failed: {error}")


GOOD = Outcome()


class ScsiTarget:
    """Logical units 0.. (one `Disk` each) and the commands of a direct-access block device.
    Every command sees the sense data of the previous one (REQUEST SENSE, INQUIRY and REPORT
    LUNS leave it alone; the others clear it first)."""

    def __init__(self, disks: Sequence[Disk]):
        self.disks = list(disks)

    def execute(self, lun: int, cdb: bytes) -> Outcome:
        """Run one command block (1..16 bytes) on a logical unit; failures leave sense data."""
        disk = self.disks[lun]
        cdb = bytes(cdb[:CDB_LENGTH]).ljust(CDB_LENGTH, b"\0")
        op = cdb[0]
        handler = self._COMMANDS.get(op)
        if op not in (Op.REQUEST_SENSE, Op.INQUIRY, Op.REPORT_LUNS):
            disk.sense = scsi.NO_SENSE
        if handler is None:
            return self._fail(disk, scsi.INVALID_COMMAND_OPERATION_CODE)
        try:
            return handler(self, disk, cdb)
        except OSError as e:
            log.error("%s on %s failed: %s", Op(op).name, disk.path, e)
            return self._fail(disk, scsi.WRITE_ERROR)

    @staticmethod
    def _fail(disk: Disk, sense: Sense) -> Outcome:
        disk.sense = sense
        return Outcome(failed=True)

    @staticmethod
    def _reply(data: bytes, allocation_length: int) -> Outcome:
        data = data[:allocation_length]
        return Outcome(direction=Direction.IN, length=len(data), data=data)

    def _not_ready(self, disk: Disk) -> Outcome | None:
        return None if disk.present else self._fail(disk, scsi.MEDIUM_NOT_PRESENT)

    def _test_unit_ready(self, disk: Disk, cdb: bytes) -> Outcome:
        return self._not_ready(disk) or GOOD

    def _request_sense(self, disk: Disk, cdb: bytes) -> Outcome:
        cmd = scsi.RequestSense.parse(cdb)
        sense = disk.sense
        disk.sense = scsi.NO_SENSE
        data = scsi.FixedSenseData.build({
            "response": {"valid": False, "code": 0x70},
            "flags": {"filemark": False, "eom": False, "ili": False, "sense_key": sense.key},
            "information": 0, "command_specific": 0, "asc": sense.asc, "ascq": sense.ascq,
            "fru": 0, "sense_key_specific": b"\0\0\0"})
        return self._reply(data, cmd.allocation_length)

    def _inquiry(self, disk: Disk, cdb: bytes) -> Outcome:
        cmd = scsi.Inquiry.parse(cdb)
        peripheral = {"qualifier": 0, "device_type": 0}      # direct-access block device
        if not cmd.flags.evpd:
            if cmd.page_code:
                return self._fail(disk, scsi.INVALID_FIELD_IN_CDB)
            data = scsi.StandardInquiryData.build({
                "peripheral": peripheral, "removable": {"rmb": disk.removable},
                "version": 5, "format": {"normaca": False, "hisup": False,
                                         "response_data_format": 2},
                "additional_length": 31, "flags": b"\0\0\0", "vendor": disk.vendor,
                "product": disk.product, "revision": disk.revision})
            return self._reply(data, cmd.allocation_length)
        if cmd.page_code == scsi.VPD_SUPPORTED_PAGES:
            payload = bytes([scsi.VPD_SUPPORTED_PAGES, scsi.VPD_UNIT_SERIAL_NUMBER,
                             scsi.VPD_DEVICE_IDENTIFICATION])
        elif cmd.page_code == scsi.VPD_UNIT_SERIAL_NUMBER:
            payload = disk.serial.encode("ascii")
        elif cmd.page_code == scsi.VPD_DEVICE_IDENTIFICATION:
            payload = scsi.DesignationDescriptor.build({
                "codes": {"protocol_identifier": 0, "code_set": 2},
                "kind": {"piv": False, "association": 0, "designator_type": 1},
                "designator": (disk.vendor.encode("ascii")[:8].ljust(8)
                               + disk.product.encode("ascii")[:16].ljust(16)
                               + disk.serial.encode("ascii"))})
        else:
            return self._fail(disk, scsi.INVALID_FIELD_IN_CDB)
        data = scsi.VpdPage.build({"peripheral": peripheral, "page_code": cmd.page_code,
                                   "payload": payload})
        return self._reply(data, cmd.allocation_length)

    def _read_capacity_10(self, disk: Disk, cdb: bytes) -> Outcome:
        if not disk.present:
            return self._fail(disk, scsi.MEDIUM_NOT_PRESENT)
        data = scsi.ReadCapacity10Data.build({"last_lba": min(disk.blocks - 1, 0xFFFFFFFF),
                                              "block_length": BLOCK})
        return self._reply(data, 8)

    def _service_action_in(self, disk: Disk, cdb: bytes) -> Outcome:
        cmd = scsi.ServiceActionIn16.parse(cdb)
        if cmd.service_action & 0x1F != scsi.READ_CAPACITY_16_ACTION:
            return self._fail(disk, scsi.INVALID_FIELD_IN_CDB)
        if not disk.present:
            return self._fail(disk, scsi.MEDIUM_NOT_PRESENT)
        data = scsi.ReadCapacity16Data.build({"last_lba": disk.blocks - 1, "block_length": BLOCK,
                                              "protection": 0, "exponents": 0, "alignment": 0})
        return self._reply(data, cmd.allocation_length)

    def _media_span(self, disk: Disk, cdb: bytes, write: bool) -> Outcome:
        cmd = (scsi.Rw10 if cdb[0] in (Op.READ_10, Op.WRITE_10) else scsi.Rw16).parse(cdb)
        if not disk.present:
            return self._fail(disk, scsi.MEDIUM_NOT_PRESENT)
        if write and disk.readonly:
            return self._fail(disk, scsi.WRITE_PROTECTED)
        if cmd.lba + cmd.blocks > disk.blocks:
            return self._fail(disk, scsi.LBA_OUT_OF_RANGE)
        return Outcome(direction=Direction.OUT if write else Direction.IN,
                       length=cmd.blocks * BLOCK, disk=disk, offset=cmd.lba * BLOCK)

    def _read(self, disk: Disk, cdb: bytes) -> Outcome:
        return self._media_span(disk, cdb, write=False)

    def _write(self, disk: Disk, cdb: bytes) -> Outcome:
        return self._media_span(disk, cdb, write=True)

    def _synchronize_cache(self, disk: Disk, cdb: bytes) -> Outcome:
        cmd = (scsi.Rw10 if cdb[0] == Op.SYNCHRONIZE_CACHE_10 else scsi.Rw16).parse(cdb)
        if not disk.present:
            return self._fail(disk, scsi.MEDIUM_NOT_PRESENT)
        if cmd.lba + cmd.blocks > disk.blocks:
            return self._fail(disk, scsi.LBA_OUT_OF_RANGE)
        disk.flush()
        return GOOD

    def _mode_pages(self, disk: Disk, code: int, pc: int) -> bytes | None:
        changeable = pc == 1
        caching = scsi.CachingModePage.build({
            "page": {"ps": False, "spf": False, "code": scsi.CACHING_PAGE},
            # write-back cache: data is durable once SYNCHRONIZE CACHE completes
            "flags": {"ic": False, "abpf": False, "cap": False, "disc": False, "size": False,
                      "wce": not changeable, "mf": False, "rcd": False},
            "retention_priority": 0, "disable_prefetch_length": 0, "minimum_prefetch": 0,
            "maximum_prefetch": 0, "maximum_prefetch_ceiling": 0, "flags2": 0,
            "cache_segments": 0, "cache_segment_size": 0})
        control = scsi.ControlModePage.build({
            "page": {"ps": False, "spf": False, "code": scsi.CONTROL_PAGE},
            "fields": bytes(10)})
        return {scsi.CACHING_PAGE: caching, scsi.CONTROL_PAGE: control,
                scsi.ALL_PAGES: caching + control}.get(code)

    def _mode_sense(self, disk: Disk, cdb: bytes) -> Outcome:
        six = cdb[0] == Op.MODE_SENSE_6
        cmd = (scsi.ModeSense6 if six else scsi.ModeSense10).parse(cdb)
        if cmd.page.pc == 3:
            return self._fail(disk, scsi.SAVING_PARAMETERS_NOT_SUPPORTED)
        subpage_ok = cmd.subpage_code == 0 or (cmd.page.code == scsi.ALL_PAGES
                                               and cmd.subpage_code == 0xFF)
        pages = self._mode_pages(disk, cmd.page.code, cmd.page.pc) if subpage_ok else None
        if pages is None:
            return self._fail(disk, scsi.INVALID_FIELD_IN_CDB)
        wp = scsi.WRITE_PROTECT if disk.readonly else 0
        long_lba = not six and cmd.flags.llbaa
        block = b""
        if not cmd.flags.dbd:
            if long_lba:
                block = scsi.LongBlockDescriptor.build({"blocks": disk.blocks,
                                                        "block_length": BLOCK})
            else:
                block = scsi.ShortBlockDescriptor.build({
                    "density_code": 0, "blocks": min(disk.blocks, 0xFFFFFF),
                    "block_length": BLOCK})
        if six:
            header = scsi.ModeParameterHeader6.build({
                "mode_data_length": min(255, 3 + len(block) + len(pages)), "medium_type": 0,
                "device_specific": wp, "block_descriptor_length": len(block)})
        else:
            header = scsi.ModeParameterHeader10.build({
                "mode_data_length": 6 + len(block) + len(pages), "medium_type": 0,
                "device_specific": wp, "flags": {"longlba": bool(block) and long_lba},
                "block_descriptor_length": len(block)})
        return self._reply(header + block + pages, cmd.allocation_length)

    def _prevent_allow(self, disk: Disk, cdb: bytes) -> Outcome:
        cmd = scsi.PreventAllowMediumRemoval.parse(cdb)
        disk.prevent_removal = bool(cmd.prevent & 1)
        return GOOD

    def _start_stop(self, disk: Disk, cdb: bytes) -> Outcome:
        action = scsi.StartStopUnit.parse(cdb).action
        if action.power_condition or not action.loej or not disk.removable:
            return GOOD                    # spinning up/down means nothing to an image file
        if action.start:
            disk.present = True
        elif disk.prevent_removal:
            return self._fail(disk, scsi.MEDIUM_REMOVAL_PREVENTED)
        else:
            disk.flush()
            disk.present = False
        return GOOD

    def _report_luns(self, disk: Disk, cdb: bytes) -> Outcome:
        cmd = scsi.ReportLuns.parse(cdb)
        if cmd.allocation_length < 16:
            return self._fail(disk, scsi.INVALID_FIELD_IN_CDB)
        data = scsi.ReportLunsData.build({"luns": [scsi.lun_entry(i)
                                                   for i in range(len(self.disks))]})
        return self._reply(data, cmd.allocation_length)

    _COMMANDS: ClassVar[dict[int, Callable[[ScsiTarget, Disk, bytes], Outcome]]] = {
        Op.TEST_UNIT_READY: _test_unit_ready,
        Op.REQUEST_SENSE: _request_sense,
        Op.INQUIRY: _inquiry,
        Op.READ_CAPACITY_10: _read_capacity_10,
        Op.SERVICE_ACTION_IN_16: _service_action_in,
        Op.READ_10: _read,
        Op.READ_16: _read,
        Op.WRITE_10: _write,
        Op.WRITE_16: _write,
        Op.SYNCHRONIZE_CACHE_10: _synchronize_cache,
        Op.SYNCHRONIZE_CACHE_16: _synchronize_cache,
        Op.MODE_SENSE_6: _mode_sense,
        Op.MODE_SENSE_10: _mode_sense,
        Op.PREVENT_ALLOW_MEDIUM_REMOVAL: _prevent_allow,
        Op.START_STOP_UNIT: _start_stop,
        Op.REPORT_LUNS: _report_luns,
    }


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    """The buffers after their first `n` bytes."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out
