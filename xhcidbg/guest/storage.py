"""Mass storage over the scripted driver: Bulk-Only Transport (BOT 1.0) carrying SCSI commands.

The CBW/CSW and CDB layouts are the ones the storage device declares (`xhcidbg.devices.bot`,
`xhcidbg.devices.scsi`): one declaration per layout, used by both ends.

    disk = MassStorage(dev)
    last_lba, block = disk.read_capacity()
    disk.write(0, b"x" * 512); assert disk.read(0, 1) == b"x" * 512
"""
from __future__ import annotations

from dataclasses import dataclass

import construct as c

from ..devices import bot, scsi
from ..devices.bot import BotRequest, CswStatus
from ..devices.scsi import Op
from ..emu.trb import CC
from .device import Device
from .errors import XhciError


class StorageError(XhciError):
    pass


@dataclass
class ScsiResult:
    status: int                # CswStatus
    residue: int
    data: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status == CswStatus.PASSED


class MassStorage:
    """One BOT interface of a configured device."""

    def __init__(self, dev: Device, interface: int | None = None):
        self.dev = dev
        for i in dev.chosen_config().active_interfaces(dev.alternates):
            if (interface is None and i.interface_class == bot.MSC_CLASS
                    and i.interface_protocol == bot.BULK_ONLY_PROTOCOL) or i.number == interface:
                self.interface = i.number
                bulk = [e for e in i.endpoints if e.transfer_type == 2]
                self.ep_in = next(e.address for e in bulk if e.is_in)
                self.ep_out = next(e.address for e in bulk if not e.is_in)
                break
        else:
            raise StorageError(f"{dev} has no Bulk-Only mass storage interface")
        self.tag = 0
        self.block_length = 512

    # ---- class requests (BOT 3.1, 3.2, 5.3.4) ------------------------------------------------
    def get_max_lun(self) -> int:
        t = self.dev.control(0xA1, BotRequest.GET_MAX_LUN, 0, self.interface, 1, check=False)
        return t.data[0] if t.ok and t.data else 0    # a stall means a single LUN

    def reset_recovery(self) -> None:
        """Mass Storage Reset, then clear the halt on both bulk pipes."""
        self.dev.control(0x21, BotRequest.MASS_STORAGE_RESET, 0, self.interface, 0)
        self.dev.clear_halt(self.ep_in)
        self.dev.clear_halt(self.ep_out)

    # ---- one command -------------------------------------------------------------------------
    def command(self, cdb: bytes, data_in: int = 0, data_out: bytes | None = None,
                lun: int = 0, timeout_ns: int | None = None) -> ScsiResult:
        """CBW, data phase, CSW (BOT 5).  A stalled data or status pipe is cleared the way the
        spec says (BOT 6.7.2, 6.7.3); an invalid CSW triggers reset recovery."""
        self.tag = (self.tag + 1) & 0xFFFFFFFF
        length = len(data_out) if data_out is not None else data_in
        dev = self.dev
        dev.bulk_out(self.ep_out, bot.cbw(self.tag, length, data_out is None and data_in > 0,
                                          cdb, lun), timeout_ns=timeout_ns)
        data = b""
        if length:
            if data_out is not None:
                t = dev.bulk_out(self.ep_out, data_out, check=False, timeout_ns=timeout_ns)
            else:
                t = dev.bulk_in(self.ep_in, data_in, check=False, timeout_ns=timeout_ns)
                data = t.data
            if not t.ok and t.cc != CC.STALL_ERROR:
                raise StorageError(f"data phase failed: {t}")
        t = dev.bulk_in(self.ep_in, bot.CSW_LENGTH, check=False, timeout_ns=timeout_ns)
        if t.cc == CC.STALL_ERROR:          # stalled status pipe: cleared already, try again
            t = dev.bulk_in(self.ep_in, bot.CSW_LENGTH, check=False, timeout_ns=timeout_ns)
        try:
            if not t.ok or len(t.data) != bot.CSW_LENGTH:
                raise ValueError(f"{t}")
            csw = bot.CSW.parse(t.data)
            if csw.dCSWTag != self.tag:
                raise ValueError(f"tag {csw.dCSWTag} for CBW tag {self.tag}")
        except Exception as e:
            self.reset_recovery()
            raise StorageError(f"no valid CSW: {e}") from None
        if csw.bCSWStatus == CswStatus.PHASE_ERROR:
            self.reset_recovery()
        return ScsiResult(csw.bCSWStatus, csw.dCSWDataResidue, data)

    def _check(self, r: ScsiResult, what: str) -> ScsiResult:
        if not r.ok:
            sense = self.request_sense()
            raise StorageError(f"{what} failed: CSW status {r.status}, sense {sense}")
        return r

    # ---- SCSI commands -------------------------------------------------------------------------
    def test_unit_ready(self, lun: int = 0) -> bool:
        cdb = scsi.TestUnitReady.build(dict(opcode=Op.TEST_UNIT_READY, control=0))
        return self.command(cdb, lun=lun).ok

    def request_sense(self, lun: int = 0) -> scsi.Sense | None:
        cdb = scsi.RequestSense.build(dict(opcode=Op.REQUEST_SENSE, flags=dict(desc=False),
                                           allocation_length=18, control=0))
        r = self.command(cdb, data_in=18, lun=lun)
        if not r.ok or len(r.data) < 14:
            return None
        s = scsi.FixedSenseData.parse(r.data[:18].ljust(18, b"\0"))
        return scsi.Sense(scsi.SenseKey(s.flags.sense_key), s.asc, s.ascq)

    def inquiry(self, lun: int = 0) -> c.Container:
        cdb = scsi.Inquiry.build(dict(opcode=Op.INQUIRY, flags=dict(evpd=False), page_code=0,
                                      allocation_length=36, control=0))
        r = self._check(self.command(cdb, data_in=36, lun=lun), "INQUIRY")
        return scsi.StandardInquiryData.parse(r.data.ljust(36, b"\0"))

    def read_capacity(self, lun: int = 0) -> tuple[int, int]:
        """(last LBA, block length)."""
        cdb = scsi.ReadCapacity10.build(dict(opcode=Op.READ_CAPACITY_10, lba=0,
                                             flags=dict(pmi=False), control=0))
        r = self._check(self.command(cdb, data_in=8, lun=lun), "READ CAPACITY(10)")
        d = scsi.ReadCapacity10Data.parse(r.data)
        self.block_length = d.block_length or 512
        return d.last_lba, d.block_length

    def read(self, lba: int, blocks: int, lun: int = 0) -> bytes:
        cdb = scsi.Rw10.build(dict(opcode=Op.READ_10, flags=0, lba=lba, group=0, blocks=blocks,
                                   control=0))
        r = self._check(self.command(cdb, data_in=blocks * self.block_length, lun=lun),
                        f"READ(10) of {blocks} blocks at {lba}")
        return r.data

    def write(self, lba: int, data: bytes, lun: int = 0) -> None:
        if len(data) % self.block_length:
            raise ValueError(f"write of {len(data)} bytes is not whole {self.block_length}-byte "
                             f"blocks")
        cdb = scsi.Rw10.build(dict(opcode=Op.WRITE_10, flags=0, lba=lba, group=0,
                                   blocks=len(data) // self.block_length, control=0))
        self._check(self.command(cdb, data_out=bytes(data), lun=lun),
                    f"WRITE(10) of {len(data)} bytes at {lba}")
