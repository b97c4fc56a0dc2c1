"""USB mass storage: Bulk-Only Transport carrying SCSI block commands, backed by image files.

`StorageDevice("disk.img")` is one logical unit of 512-byte blocks (`readonly=True` makes it
write protected; more images make more LUNs).  Super speed by default; high and full speed
work too (the same declaration, with 512- and 64-byte bulk packets).

The transport follows BOT 1.0: a CBW is validated (a bad one stalls both bulk pipes until Reset
Recovery), the host's expectation (dCBWDataTransferLength and direction) is reconciled with
what the command wants to move per the thirteen cases of BOT 6.7 (residue, phase error,
stalling the data pipe), and the data phase may span any number of bulk transfers of any size.
Reads and writes go straight between the host's transfer and the image with one pread/pwrite
per transfer.  SYNCHRONIZE CACHE fsyncs the image: written data is on disk when it completes.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from enum import Enum

import construct as c

from . import scsi
from .base import EpType, Speed, Status, UsbTransfer
from .bot import (
    BULK_ONLY_PROTOCOL,
    CBW,
    CBW_LENGTH,
    MSC_CLASS,
    SCSI_TRANSPARENT_SUBCLASS,
    BotRequest,
    CswStatus,
    csw,
    is_meaningful,
)
from .declaration import (
    Configuration,
    EndpointDecl,
    Interface,
    Request,
    Stall,
    control_request,
    on_transfer,
)
from .scsi import Op, Sense
from .standard import StandardDevice

log = logging.getLogger(__name__)

BLOCK = 512
BULK_IN, BULK_OUT = 0x81, 0x02
MAX_LUNS = 16


class Disk:
    """One logical unit: an image file of 512-byte blocks, and its SCSI state (sense data,
    medium present, removal prevented)."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False, removable: bool = False,
                 vendor: str = "xhcidbg", product: str = "Virtual Disk", revision: str = "1.0",
                 serial: str | None = None):
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
        # BOT wants a serial of at least 12 hex digits; derive a stable one from the path
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

    def write(self, offset: int, data) -> None:
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

    def __del__(self):
        if getattr(self, "fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        return (f"Disk({self.path!r}, {self.blocks} blocks"
                f"{', read-only' if self.readonly else ''})")


class Phase(Enum):
    COMMAND = "command"          # waiting for a CBW on bulk OUT
    DATA_IN = "data-in"
    DATA_OUT = "data-out"
    STATUS = "status"            # the CSW is ready for bulk IN
    NEED_RESET = "reset"         # invalid CBW seen: stall both pipes until Reset Recovery


@dataclass
class Outcome:
    """What a SCSI command wants to do: its status, and the data it wants to move."""

    failed: bool = False
    direction: str | None = None     # "in", "out" or None
    length: int = 0                  # bytes the device intends to move (Di / Do)
    data: bytes = b""                # the data-in bytes, for non-media commands
    disk: Disk | None = None         # media transfers: the span of the image
    offset: int = 0


GOOD = Outcome()


class StorageDevice(StandardDevice):
    name = "storage"
    product = "xhcidbg Mass Storage"
    speeds = (Speed.FULL, Speed.HIGH, Speed.SUPER)
    default_speed = Speed.SUPER
    configurations = (
        Configuration(1, max_power_ma=200, interfaces=(
            Interface(0, cls=MSC_CLASS, subclass=SCSI_TRANSPARENT_SUBCLASS,
                      protocol=BULK_ONLY_PROTOCOL, name="Bulk-Only storage", endpoints=(
                          EndpointDecl(BULK_IN, EpType.BULK, max_burst=15),
                          EndpointDecl(BULK_OUT, EpType.BULK, max_burst=15))),)),
    )

    def __init__(self, *images: str | os.PathLike | Disk, readonly: bool = False,
                 speed: Speed | None = None, removable: bool = False):
        if not images:
            raise ValueError("StorageDevice needs at least one disk image")
        if len(images) > MAX_LUNS:
            raise ValueError(f"at most {MAX_LUNS} logical units")
        self.disks = [i if isinstance(i, Disk) else Disk(i, readonly=readonly,
                                                         removable=removable) for i in images]
        self.serial_number = self.disks[0].serial
        self._reset_transport()
        super().__init__(speed)

    def close(self) -> None:
        for disk in self.disks:
            disk.close()

    # ---- BOT state ---------------------------------------------------------------------------

    def _reset_transport(self) -> None:
        self.phase = Phase.COMMAND
        self.tag = 0
        self.expected = 0            # dCBWDataTransferLength
        self.moved = 0               # data-phase bytes moved so far
        self.outcome = GOOD
        self.csw_status = CswStatus.PASSED
        self.residue = 0
        self.processed = 0           # data-out bytes written to the medium
        self.write_failed = False

    def on_reset(self) -> None:
        self._reset_transport()

    def on_configured(self, config) -> None:
        self._reset_transport()

    def on_endpoint_reset(self, address: int) -> None:
        # BOT 6.6.1: after an invalid CBW both pipes stay stalled until a Mass Storage Reset.
        if self.phase is Phase.NEED_RESET:
            self.set_halt(address)

    @control_request(BotRequest.MASS_STORAGE_RESET)
    def _mass_storage_reset(self, r: Request) -> None:
        if r.value or r.length or r.interface != 0:
            raise Stall
        self._reset_transport()      # halts stay: the host clears them next (Reset Recovery)

    @control_request(BotRequest.GET_MAX_LUN)
    def _get_max_lun(self, r: Request) -> bytes:
        if r.value or r.length != 1 or r.interface != 0:
            raise Stall
        return bytes([len(self.disks) - 1])

    # ---- bulk pipes -------------------------------------------------------------------------

    @on_transfer(BULK_OUT)
    def _bulk_out(self, xfer: UsbTransfer) -> None:
        if self.phase is Phase.NEED_RESET:
            self.set_halt(BULK_OUT)
            xfer.complete(Status.STALL)
        elif self.phase in (Phase.COMMAND, Phase.DATA_OUT) and not self.parked(BULK_OUT):
            self._serve_out(xfer)
        else:
            self.park(xfer)          # NAK until the CSW has been fetched
        self._pump()

    @on_transfer(BULK_IN)
    def _bulk_in(self, xfer: UsbTransfer) -> None:
        if self.phase is Phase.NEED_RESET:
            self.set_halt(BULK_IN)
            xfer.complete(Status.STALL)
        elif self.phase in (Phase.DATA_IN, Phase.STATUS) and not self.parked(BULK_IN):
            self._serve_in(xfer)
        else:
            self.park(xfer)          # NAK: nothing to send yet
        self._pump()

    def _pump(self) -> None:
        """Serve transfers that waited for the phase they belong to."""
        while True:
            if self.phase in (Phase.DATA_IN, Phase.STATUS) and not self.is_halted(BULK_IN) \
                    and self.parked(BULK_IN):
                self._serve_in(self.unpark(BULK_IN))
            elif self.phase in (Phase.COMMAND, Phase.DATA_OUT) \
                    and not self.is_halted(BULK_OUT) and self.parked(BULK_OUT):
                self._serve_out(self.unpark(BULK_OUT))
            else:
                return

    def _serve_out(self, xfer: UsbTransfer) -> None:
        data = xfer.data if xfer.data is not None else b""
        if self.phase is Phase.COMMAND:
            self._command(xfer, data)
        else:
            self._data_out(xfer, data)

    def _serve_in(self, xfer: UsbTransfer) -> None:
        if self.phase is Phase.STATUS:
            self.phase = Phase.COMMAND
            xfer.complete(Status.OK, csw(self.tag, self.residue, self.csw_status))
        else:
            self._data_in(xfer)

    # ---- the thirteen cases (BOT 6.7) -----------------------------------------------------

    def _command(self, xfer: UsbTransfer, data) -> None:
        parsed = None
        if len(data) == CBW_LENGTH:
            try:
                parsed = CBW.parse(bytes(data))
            except c.ConstructError:
                parsed = None
        if parsed is None or not is_meaningful(parsed) or parsed.bCBWLUN >= len(self.disks):
            log.info("%s: invalid CBW (%d bytes), stalling until reset recovery", self.name,
                     len(data))
            self.phase = Phase.NEED_RESET
            xfer.complete(Status.STALL)
            self.set_halt(BULK_OUT)
            self.set_halt(BULK_IN)
            return
        xfer.complete(Status.OK)
        self.tag = parsed.dCBWTag
        self.expected = parsed.dCBWDataTransferLength
        self.moved = 0
        self.processed = 0
        self.write_failed = False
        host_in = bool(parsed.bmCBWFlags & 0x80)
        disk = self.disks[parsed.bCBWLUN]
        cdb = bytes(parsed.CBWCB[:parsed.bCBWCBLength]).ljust(16, b"\0")
        outcome = self.execute(disk, cdb)
        self.outcome = outcome
        status = CswStatus.FAILED if outcome.failed else CswStatus.PASSED
        wants = outcome.direction if outcome.length else None
        if self.expected == 0:                                   # Hn
            self._status(status if wants is None else CswStatus.PHASE_ERROR, 0)  # 1 / 2, 3
        elif host_in:
            if wants is None:                                    # case 4: Hi > Dn
                self._status(status, self.expected, stall=BULK_IN)
            elif wants == "in":                                  # 5, 6: Hi >= Di; 7: Hi < Di
                self.phase = Phase.DATA_IN
                self.csw_status = status if outcome.length <= self.expected \
                    else CswStatus.PHASE_ERROR
            else:                                                # case 8: Hi <> Do
                self._status(CswStatus.PHASE_ERROR, self.expected, stall=BULK_IN)
        else:
            if wants is None:                                    # case 9: Ho > Dn
                self._status(status, self.expected, stall=BULK_OUT)
            elif wants == "in":                                  # case 10: Ho <> Di
                self._status(CswStatus.PHASE_ERROR, self.expected, stall=BULK_OUT)
            else:                                                # 11, 12: Ho >= Do; 13: Ho < Do
                self.phase = Phase.DATA_OUT
                self.csw_status = status if outcome.length <= self.expected \
                    else CswStatus.PHASE_ERROR

    def _status(self, status: CswStatus, residue: int, stall: int | None = None) -> None:
        self.phase = Phase.STATUS
        self.csw_status = status
        self.residue = residue
        if stall is not None:
            self.set_halt(stall)

    def _data_in(self, xfer: UsbTransfer) -> None:
        outcome = self.outcome
        to_send = min(outcome.length, self.expected)
        n = min(xfer.length, to_send - self.moved)
        chunk = None
        try:
            views = xfer.in_buffers() if outcome.disk is not None and n else None
            if views is not None:
                # Straight from the image into the host's buffers.
                outcome.disk.read_into(outcome.offset + self.moved, _take(views, n))
            elif outcome.disk is not None:
                chunk = outcome.disk.read(outcome.offset + self.moved, n)
            else:
                chunk = outcome.data[self.moved:self.moved + n]
        except OSError as e:
            log.error("%s: read from %s failed: %s", self.name, outcome.disk.path, e)
            outcome.disk.sense = scsi.UNRECOVERED_READ_ERROR
            self._status(CswStatus.FAILED, self.expected - self.moved)
            self.set_halt(BULK_IN)
            xfer.complete(Status.STALL)
            return
        self.moved += n
        if self.moved >= to_send:
            self._status(self.csw_status, self.expected - self.moved)
            if self.moved < self.expected and n == xfer.length:
                # All sent but the host expects more and this transfer was not short: STALL
                # the pipe so the host stops waiting for data (BOT 6.7.2, case 5).
                self._deliver(xfer, chunk, n)
                self.set_halt(BULK_IN)
                return
        self._deliver(xfer, chunk, n)

    @staticmethod
    def _deliver(xfer: UsbTransfer, chunk, n: int) -> None:
        if chunk is None:
            xfer.complete(Status.OK, filled=n)
        else:
            xfer.complete(Status.OK, chunk)

    def _data_out(self, xfer: UsbTransfer, data) -> None:
        outcome = self.outcome
        take = min(len(data), self.expected - self.moved)
        # Bytes beyond what the command wants are accepted and dropped (case 11); case 13
        # (the host sends less than the command needs) writes nothing.
        useful = 0 if self.csw_status == CswStatus.PHASE_ERROR else \
            max(0, min(take, outcome.length - self.moved))
        if useful and not self.write_failed:
            try:
                outcome.disk.write(outcome.offset + self.moved, memoryview(data)[:useful])
                self.processed += useful
            except OSError as e:
                log.error("%s: write to %s failed: %s", self.name, outcome.disk.path, e)
                outcome.disk.sense = scsi.WRITE_ERROR
                self.write_failed = True
                self.csw_status = CswStatus.FAILED
        self.moved += take
        xfer.complete(Status.OK, actual=take)
        if self.moved >= self.expected:
            self._status(self.csw_status, self.expected - self.processed)

    # ---- SCSI ---------------------------------------------------------------------------------

    def execute(self, disk: Disk, cdb: bytes) -> Outcome:
        """Run one SCSI command against a logical unit; failures leave sense data."""
        op = cdb[0]
        handler = self._COMMANDS.get(op)
        if op not in (Op.REQUEST_SENSE, Op.INQUIRY, Op.REPORT_LUNS):
            disk.sense = scsi.NO_SENSE
        if handler is None:
            return self._fail(disk, scsi.INVALID_COMMAND_OPERATION_CODE)
        try:
            return handler(self, disk, cdb)
        except OSError as e:
            log.error("%s: %s on %s failed: %s", self.name, Op(op).name, disk.path, e)
            return self._fail(disk, scsi.WRITE_ERROR)

    @staticmethod
    def _fail(disk: Disk, sense: Sense) -> Outcome:
        disk.sense = sense
        return Outcome(failed=True)

    @staticmethod
    def _reply(data: bytes, allocation_length: int) -> Outcome:
        data = data[:allocation_length]
        return Outcome(direction="in", length=len(data), data=data)

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
        return Outcome(direction="out" if write else "in", length=cmd.blocks * BLOCK,
                       disk=disk, offset=cmd.lba * BLOCK)

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

    _COMMANDS = {
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

    def describe(self) -> str:
        disks = ", ".join(f"LUN {i}: {d.path} ({d.blocks * BLOCK // (1 << 20)} MiB"
                          f"{', read-only' if d.readonly else ''})"
                          for i, d in enumerate(self.disks))
        return f"{super().describe()}; {disks}"


def _take(views: list[memoryview], n: int) -> list[memoryview]:
    """The first `n` bytes of a list of buffers."""
    out = []
    for v in views:
        if n <= 0:
            break
        out.append(v[:n])
        n -= len(out[-1])
    return out


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
