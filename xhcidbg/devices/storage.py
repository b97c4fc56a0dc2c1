"""USB mass storage: Bulk-Only Transport carrying SCSI block commands to disk images.

`StorageDevice("disk.img")` is one logical unit of 512-byte blocks (`readonly=True` makes it
write protected; more images make more LUNs).  Super speed by default; high and full speed
work too (the same declaration, with 512- and 64-byte bulk packets).

This module is the transport, following BOT 1.0: a CBW is validated (a bad one stalls both bulk
pipes until Reset Recovery), the host's expectation (dCBWDataTransferLength and direction) is
reconciled with what the command wants to move per the thirteen cases of BOT 6.7 (residue,
phase error, stalling the data pipe), and the data phase may span any number of bulk transfers
of any size.  The commands themselves run on a `ScsiTarget` (`scsi_target`), which also reads
and writes the images.
"""
from __future__ import annotations

import logging
import os
from enum import Enum

import construct as c

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
from .scsi_target import BLOCK, GOOD, Buffer, Direction, Disk, MediumError, Outcome, ScsiTarget
from .standard import StandardDevice

log = logging.getLogger(__name__)

__all__ = ["StorageDevice"]

BULK_IN, BULK_OUT = 0x81, 0x02
MAX_LUNS = 16                # bCBWLUN has four bits


class Phase(Enum):
    """Where the transport is in the command / data / status cycle (BOT 5)."""

    COMMAND = "command"          # waiting for a CBW on bulk OUT
    DATA_IN = "data-in"
    DATA_OUT = "data-out"
    STATUS = "status"            # the CSW is ready for bulk IN
    NEED_RESET = "reset"         # invalid CBW seen: stall both pipes until Reset Recovery


class StorageDevice(StandardDevice):
    """A USB mass storage device: one Bulk-Only interface, a `ScsiTarget` behind it."""

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

    def __init__(self, *images: str | os.PathLike[str] | Disk, readonly: bool = False,
                 speed: Speed | None = None, removable: bool = False):
        if not images:
            raise ValueError("StorageDevice needs at least one disk image")
        if len(images) > MAX_LUNS:
            raise ValueError(f"at most {MAX_LUNS} logical units")
        self.target = ScsiTarget([i if isinstance(i, Disk) else
                                  Disk(i, readonly=readonly, removable=removable)
                                  for i in images])
        self.serial_number = self.disks[0].serial
        self._reset_transport()
        super().__init__(speed)

    @property
    def disks(self) -> list[Disk]:
        """The logical units, LUN 0 first."""
        return self.target.disks

    def close(self) -> None:
        for disk in self.disks:
            disk.close()

    # ---- BOT state ---------------------------------------------------------------------------

    def _reset_transport(self) -> None:
        self.phase = Phase.COMMAND
        self.tag = 0
        self.expected = 0            # dCBWDataTransferLength
        self.moved = 0               # data-phase bytes moved so far
        self.outcome: Outcome = GOOD  # of the command in progress
        self.csw_status = CswStatus.PASSED
        self.residue = 0
        self.processed = 0           # data-out bytes written to the medium
        self.write_failed = False

    def on_reset(self) -> None:
        self._reset_transport()

    def on_configured(self, config: Configuration | None) -> None:
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
            if (self.phase in (Phase.DATA_IN, Phase.STATUS) and not self.is_halted(BULK_IN)
                    and (xfer := self.unpark(BULK_IN)) is not None):
                self._serve_in(xfer)
            elif (self.phase in (Phase.COMMAND, Phase.DATA_OUT) and not self.is_halted(BULK_OUT)
                    and (xfer := self.unpark(BULK_OUT)) is not None):
                self._serve_out(xfer)
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

    def _command(self, xfer: UsbTransfer, data: Buffer) -> None:
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
        outcome = self.target.execute(parsed.bCBWLUN, parsed.CBWCB[:parsed.bCBWCBLength])
        self.outcome = outcome
        status = CswStatus.FAILED if outcome.failed else CswStatus.PASSED
        wants = outcome.direction if outcome.length else None
        if self.expected == 0:                                   # Hn
            self._status(status if wants is None else CswStatus.PHASE_ERROR, 0)  # 1 / 2, 3
        elif host_in:
            if wants is None:                                    # case 4: Hi > Dn
                self._status(status, self.expected, stall=BULK_IN)
            elif wants is Direction.IN:                          # 5, 6: Hi >= Di; 7: Hi < Di
                self.phase = Phase.DATA_IN
                self.csw_status = status if outcome.length <= self.expected \
                    else CswStatus.PHASE_ERROR
            else:                                                # case 8: Hi <> Do
                self._status(CswStatus.PHASE_ERROR, self.expected, stall=BULK_IN)
        else:
            if wants is None:                                    # case 9: Ho > Dn
                self._status(status, self.expected, stall=BULK_OUT)
            elif wants is Direction.IN:                          # case 10: Ho <> Di
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
            views = xfer.in_buffers() if outcome.on_medium and n else None
            if views is not None:
                # Straight from the image into the host's buffers.
                outcome.read_into(self.moved, _take(views, n))
            else:
                chunk = outcome.read(self.moved, n)
        except MediumError as e:
            log.error("%s: %s", self.name, e)
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
    def _deliver(xfer: UsbTransfer, chunk: bytes | None, n: int) -> None:
        if chunk is None:
            xfer.complete(Status.OK, filled=n)
        else:
            xfer.complete(Status.OK, chunk)

    def _data_out(self, xfer: UsbTransfer, data: Buffer) -> None:
        outcome = self.outcome
        take = min(len(data), self.expected - self.moved)
        # Bytes beyond what the command wants are accepted and dropped (case 11); case 13
        # (the host sends less than the command needs) writes nothing.
        useful = 0 if self.csw_status == CswStatus.PHASE_ERROR else \
            max(0, min(take, outcome.length - self.moved))
        if useful and not self.write_failed:
            try:
                outcome.write(self.moved, memoryview(data)[:useful])
                self.processed += useful
            except MediumError as e:
                log.error("%s: %s", self.name, e)
                self.write_failed = True
                self.csw_status = CswStatus.FAILED
        self.moved += take
        xfer.complete(Status.OK, actual=take)
        if self.moved >= self.expected:
            self._status(self.csw_status, self.expected - self.processed)

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
