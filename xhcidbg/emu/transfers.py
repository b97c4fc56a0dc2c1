"""Transfer rings: turning TDs into USB transfers and completions into Transfer Events
(xHCI 1.2 sections 4.10, 4.11, 4.14).

A TD is assembled TRB by TRB (so the debugger can step one TRB), handed to the device as one
`UsbTransfer`, and retired in ring order when the device completes it: IN data scattered into
the TRB buffers, events posted where IOC, ISP, Event Data or an error say so.  Retiring goes by
kind, as a host driver reads it back: control, bulk/interrupt and isochronous TDs each have
their own walk over the TRBs, and one `_finish` records what was posted and decides the halt.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from ..devices.base import Status, UsbTransfer
from . import events
from .context import EpState, XhciEpType
from .gate import Gate
from .hooks import Hooks, TransferRecord
from .interfaces import ErrorReporter, EventPoster
from .memory import DmaError, GuestMemory
from .rings import RingError
from .timing import Scheduler
from .trb import (
    BEI,
    BM_REQUEST_TYPE,
    CC,
    CHAIN,
    COMPLETION_CODE,
    DIR,
    FRAME_ID,
    IDT,
    INTERRUPTER,
    IOC,
    ISP,
    LENGTH,
    SIA,
    Trb,
    TrbType,
)

if TYPE_CHECKING:
    from .slots import SlotEndpoint

MAX_TD_TRBS = 1024           # bounds the memory one TD may make us gather
TRBS_PER_STEP = 64           # a long TD is assembled over several gate turns
SETUP_PACKET_BYTES = 8
IMMEDIATE_DATA_MAX = 8       # IDT carries at most the 8 bytes of the TRB's parameter
FRAMES = FRAME_ID.mask + 1   # Frame ID counts 1 ms frames modulo 2048
MICROFRAME_NS = 125_000
T = TrbType
_DATA_TYPES = (T.NORMAL, T.DATA_STAGE, T.ISOCH)
_BLOCKABLE = (T.NORMAL, T.ISOCH, T.EVENT_DATA)   # the TRB types that have a BEI flag
# flags tested on every TD, derived once from the TRB declarations
_IOC, _ISP, _IDT, _CHAIN, _BEI, _SIA, _DIR = (IOC.bits, ISP.bits, IDT.bits, CHAIN.bits, BEI.bits,
                                              SIA.bits, DIR.bits)
_LEN = LENGTH.mask
_DIR_IN = BM_REQUEST_TYPE.put(0x80)              # bmRequestType bit 7: device to host
_INTR_SHIFT, _INTR_MASK = INTERRUPTER.lo, INTERRUPTER.mask
_CC_SHIFT, _CC_MASK = COMPLETION_CODE.lo, COMPLETION_CODE.mask

STATUS_CC = {
    Status.OK: CC.SUCCESS, Status.STALL: CC.STALL_ERROR, Status.BABBLE: CC.BABBLE_DETECTED,
    Status.XACT_ERROR: CC.USB_TRANSACTION_ERROR, Status.NODEV: CC.USB_TRANSACTION_ERROR,
    Status.CANCELLED: CC.STOPPED,
}
# Completions that leave the endpoint running: Stopped is the host's own doing, a Data Buffer
# Error is the host's memory (4.10.2.x); every other error halts a non-isochronous endpoint.
_NO_HALT = (CC.SUCCESS, CC.SHORT_PACKET, CC.STOPPED, CC.DATA_BUFFER_ERROR)
VENDOR_INFO = range(224, 256)    # vendor-defined information codes report, they do not halt


_SHORT = -1      # _DataWalk.data: a short packet ended this part of the TD, its event posted


class _DataWalk:
    """Reading the data TRBs of a finished TD back in ring order: scatter the IN data, count
    the Event Data Transfer Length, post the events IOC, ISP and errors ask for."""

    __slots__ = ("cc", "edtla", "engine", "ep", "failed", "last_data", "pos", "remaining",
                 "result", "short", "td")

    def __init__(self, engine: TransferEngine, ep: SlotEndpoint, td: Td, xfer: UsbTransfer):
        self.engine, self.ep, self.td = engine, ep, td
        self.cc = status_cc(xfer) if td.force_cc is None else td.force_cc
        self.failed = self.cc != CC.SUCCESS
        self.result = memoryview(xfer.result) if xfer.is_in and not xfer.in_place else None
        self.remaining, self.pos, self.edtla, self.short = xfer.actual, 0, 0, False
        self.last_data = next((t for t in reversed(td.trbs) if t.type in _DATA_TYPES), None)

    def data(self, trb: Trb) -> int | None:
        """One Normal/Data/Isoch TRB.  None: go on; _SHORT: a short packet was reported;
        otherwise the completion code that fails the TD (its event posted)."""
        engine, ep, td = self.engine, self.ep, self.td
        length = trb.status & _LEN
        n = min(length, self.remaining)
        if n and self.result is not None and not engine._scatter(
                ep, td, trb, self.result[self.pos:self.pos + n], length - n):
            return CC.DATA_BUFFER_ERROR
        self.pos += n
        self.remaining -= n
        self.edtla += n
        residue = length - n
        if self.failed and (residue or trb is self.last_data):
            engine._post(ep, td, trb, self.cc, residue)
            return self.cc
        if residue and not self.short:
            self.short = True
            if trb.control & (_ISP | _IOC):
                engine._post(ep, td, trb, CC.SHORT_PACKET, residue)
                return _SHORT
            return None
        if trb.control & _IOC:
            engine._post(ep, td, trb, CC.SHORT_PACKET if self.short else CC.SUCCESS, residue)
        return None

    def event_data(self, trb: Trb) -> None:
        """An Event Data TRB: its event carries the bytes moved since the last one."""
        if trb.control & _IOC:
            self.engine._post(self.ep, self.td, trb,
                              CC.SHORT_PACKET if self.short else CC.SUCCESS, self.edtla,
                              event_data=True)
        self.edtla = 0


def status_cc(xfer: UsbTransfer) -> int:
    """The completion code a real controller reports for how the transfer ended on the bus."""
    if xfer.status is None:
        return CC.USB_TRANSACTION_ERROR
    return STATUS_CC.get(xfer.status, CC.USB_TRANSACTION_ERROR)


def trb_length(trb: Trb) -> int:
    return trb.status & _LEN


class Td:
    __slots__ = ("bad", "cc", "done", "ep", "force_cc", "force_residue", "force_state",
                 "iso_frame", "record", "start", "start_ccs", "trbs", "xfer")

    def __init__(self, ep: SlotEndpoint):
        self.ep = ep
        self.trbs: list[Trb] = []
        self.start = ep.ring.dequeue
        self.start_ccs = ep.ring.ccs
        self.xfer: UsbTransfer | None = None
        self.done = False
        self.bad: tuple[Trb, str] | None = None     # (offending TRB, why) -> TRB Error
        self.cc: int | None = None                  # the last completion code posted for it
        self.iso_frame = 0
        self.record: TransferRecord | None = None   # made only when someone observes
        self.force_cc: int | None = None            # an observer's outcome (TransferRecord)
        self.force_residue: int | None = None
        self.force_state: str | None = None

    def complete_after(self, trb: Trb, control_ep: bool) -> bool:
        """Does `trb` end this TD?"""
        if control_ep and self.trbs and self.trbs[0].type == T.SETUP_STAGE:
            return trb.type == T.STATUS_STAGE
        return not (trb.control & _CHAIN)


class TransferEngine:
    """Assembles, submits and retires the TDs of every endpoint.  It is given what it uses:
    guest memory, the clock, the hooks, the error reporter, the event poster, the gate (a
    completion that arrives while paused waits for a step), the MFINDEX reader (isochronous
    scheduling) and `kick` (an endpoint has work again)."""

    def __init__(self, mem: GuestMemory, scheduler: Scheduler, hooks: Hooks,
                 report: ErrorReporter, post_event: EventPoster, gate: Gate,
                 mfindex: Callable[[], int], kick: Callable[[SlotEndpoint], None],
                 max_inflight: int = 8):
        self.mem = mem
        self.scheduler = scheduler
        self.hooks = hooks
        self.report = report
        self.post_event = post_event
        self.gate = gate
        self.mfindex = mfindex
        self.kick = kick
        self.max_inflight = max_inflight

    # ---- assembling TDs --------------------------------------------------------------------------
    def step(self, ep: SlotEndpoint, unit: str) -> bool:
        """Advance `ep` by one TRB (unit 'trb') or one TD; False when there is nothing to do."""
        if ep.state != EpState.RUNNING:
            return False
        if ep.inflight and ep.inflight[0].done:
            self._retire_ready(ep)        # a finished TD waiting to retire is one unit of work
            return True
        if ep.isoch_timer is not None:
            return False                  # the next isoch TD waits for its frame
        if ep.inflight and ep.polled:
            return False    # one outstanding TD on interrupt/control endpoints, as a device polls
        device = ep.slot.device
        if len(ep.inflight) >= ((device.queue_depth if device is not None else None)
                                or self.max_inflight):
            return False
        progressed = False
        fetched = 0
        while True:
            td = ep.building
            if td is None:
                td = ep.building = Td(ep)
            try:
                trb = ep.ring.fetch()
            except RingError as e:
                ep.building = None
                self._trb_error(ep, Trb(e.addr, 0, 0, 0), str(e))
                return True
            except DmaError as e:
                ep.building = None
                self.report.host_system_error(f"endpoint {ep.slot.id}/{ep.dci}: transfer ring "
                                              f"unreadable ({e})")
                return True
            if trb is None:
                if not td.trbs:
                    ep.building = None
                return progressed
            progressed = True
            td.trbs.append(trb)
            if len(td.trbs) > MAX_TD_TRBS:
                ep.building = None
                self._trb_error(ep, trb, f"TD longer than {MAX_TD_TRBS} TRBs")
                return True
            if td.complete_after(trb, ep.ep_type == XhciEpType.CONTROL):
                ep.building = None
                if ep.is_isoch:
                    self._schedule_isoch(ep, td)
                else:
                    self.submit(ep, td)
                return True
            fetched += 1
            if unit == "trb" or fetched >= TRBS_PER_STEP:
                return True

    # ---- submitting ------------------------------------------------------------------------------
    def submit(self, ep: SlotEndpoint, td: Td) -> None:
        slot = ep.slot
        why = self._validate(ep, td)
        if why:
            self._trb_error(ep, why[0], why[1])
            return
        first = td.trbs[0]
        if first.type == T.NOOP or (first.type == T.EVENT_DATA and len(td.trbs) == 1):
            td.done = True
            ep.inflight.append(td)
            self._retire_ready(ep)
            return
        setup = None
        is_in = ep.is_in
        if first.type == T.SETUP_STAGE:
            setup = struct.pack("<Q", first.param)
            is_in = bool(first.param & _DIR_IN)
        length = 0
        out = []
        try:
            for trb in td.trbs:
                if trb.type in _DATA_TYPES:
                    n = trb.status & _LEN
                    length += n
                    if not is_in and n:
                        if trb.control & _IDT:       # the data is the parameter itself
                            out.append(trb.param.to_bytes(IMMEDIATE_DATA_MAX, "little")[:n])
                        else:
                            out.append(self.mem.read(trb.param, n))
        except DmaError as e:
            self.report.refuse(f"dbe{slot.id}/{ep.dci}", f"endpoint {slot.id}/{ep.dci}: OUT "
                               f"data buffer unreadable ({e}); Data Buffer Error")
            td.done = True
            ep.inflight.append(td)
            self._post(ep, td, td.trbs[-1], CC.DATA_BUFFER_ERROR, trb_length(td.trbs[-1]))
            ep.inflight.pop()
            return
        data = None if is_in else (out[0] if len(out) == 1 else b"".join(out))
        endpoint = ep.address if setup is None else 0
        xfer = UsbTransfer(endpoint, ep.transfer_type, length, setup=setup, data=data,
                           on_complete=partial(self._on_complete, td), interval=ep.interval)
        if setup is None and is_in:
            xfer.endpoint |= 0x80
            xfer.buffers_fn = lambda: self._guest_buffers(td)
        if first.type == T.ISOCH:
            td.iso_frame = (self.mfindex() >> 3) % FRAMES
        td.xfer = xfer
        ep.inflight.append(td)
        if self.hooks.on_urb_submit:
            record = self._record(td, xfer)
            record.submitted_ns = self.scheduler.now_ns()
            for fn in self.hooks.on_urb_submit:
                fn(record)
        replay, ep.replay = ep.replay, None
        if replay is not None and replay[0] == td.start and replay[1].length == length:
            # The device answered this TD already; only the host saw it fail.  A device whose
            # packets were not acknowledged sends them again: the same answer, not its next one
            done = replay[1]
            if is_in:
                xfer.complete(Status.OK, done.in_data())
            else:
                xfer.complete(Status.OK, actual=done.actual)
            return
        dev = slot.device
        if dev is None or slot.port is None or not slot.port.enabled:
            xfer.complete(Status.NODEV)
            return
        try:
            dev.submit(xfer)
        except Exception as e:      # a device bug must not take the controller down
            self.report.refuse(f"devexc{slot.id}", f"slot {slot.id}: device {dev!r} raised "
                               f"{e!r} on {xfer!r}; reporting a USB Transaction Error")
            xfer.complete(Status.XACT_ERROR)

    def _record(self, td: Td, xfer: UsbTransfer) -> TransferRecord:
        """What observers see of `td`, made when the first observer looks."""
        record = td.record
        if record is None:
            slot = td.ep.slot
            port = slot.port
            record = td.record = TransferRecord(
                xfer, slot.id, td.ep.dci, port.number if port is not None else 0,
                2 if port is not None and port.usb3 else 1, slot.address,
                iso_frame=td.iso_frame, trbs=tuple(t.addr for t in td.trbs))
        return record

    # ---- isochronous scheduling (4.11.2.5, 4.14.2) -----------------------------------------------
    def _schedule_isoch(self, ep: SlotEndpoint, td: Td) -> None:
        """Run an isoch TD in its frame: at once, later on a timer, or never (Missed Service)."""
        now = self.scheduler.now_ns()
        first = td.trbs[0]
        if first.control & _SIA:                        # as soon as possible
            start = max(now, ep.next_service_ns)
        else:
            mf = self.mfindex()
            frame = FRAME_ID.of(first.control)
            ahead = (frame - (mf >> 3)) % FRAMES
            if ahead >= FRAMES // 2:                    # that frame has already passed
                ep.inflight.append(td)
                td.done = True
                length = sum(trb_length(t) for t in td.trbs if t.type in _DATA_TYPES)
                self._post(ep, td, first, CC.MISSED_SERVICE, length)
                ep.inflight.remove(td)
                return
            start = now + ahead * 8 * MICROFRAME_NS - (mf & 7) * MICROFRAME_NS if ahead else now
        ep.next_service_ns = start + ep.interval_ns
        if start <= now:
            self.submit(ep, td)
            return
        ep.inflight.append(td)          # waiting for its frame; take_back rewinds to it
        ep.isoch_timer = self.scheduler.call_later(start - now, self._isoch_due, ep, td)

    def _isoch_due(self, ep: SlotEndpoint, td: Td) -> None:
        ep.isoch_timer = None
        if td not in ep.inflight or ep.state != EpState.RUNNING:
            return
        ep.inflight.remove(td)
        self.submit(ep, td)
        self.kick(ep)

    def _guest_buffers(self, td: Td) -> list[memoryview] | None:
        """Views of the TD's IN buffers in guest memory, if every one is directly mapped."""
        views = []
        mem = self.mem
        for trb in td.trbs:
            if trb.type in _DATA_TYPES:
                n = trb.status & _LEN
                if n:
                    v = mem.view(trb.param, n)
                    if v is None:
                        return None
                    views.append(v)
        return views

    def _validate(self, ep: SlotEndpoint, td: Td) -> tuple[Trb, str] | None:
        first = td.trbs[0]
        t0 = first.type
        if t0 == T.NORMAL and len(td.trbs) == 1 and not first.control & _IDT and not ep.is_isoch \
                and ep.ep_type != XhciEpType.CONTROL:
            return None     # the common case: one plain Normal TRB on a bulk/interrupt ring
        control = ep.ep_type == XhciEpType.CONTROL
        isoch = ep.is_isoch
        if t0 == T.NOOP and len(td.trbs) == 1:
            return None
        if control:
            if t0 != T.SETUP_STAGE:
                return first, f"{first!r} cannot start a control TD (expected Setup Stage)"
            if not first.control & _IDT or trb_length(first) != SETUP_PACKET_BYTES:
                return first, "Setup Stage TRB without IDT or with a length other than 8"
            dir_in = bool(first.param & _DIR_IN)
            for trb in td.trbs[1:]:
                if trb.type == T.DATA_STAGE and bool(trb.control & _DIR) != dir_in:
                    return trb, "Data Stage direction disagrees with bmRequestType"
                if trb.type not in (T.DATA_STAGE, T.NORMAL, T.EVENT_DATA, T.STATUS_STAGE, T.NOOP):
                    return trb, f"{trb!r} does not belong in a control TD"
            return None
        allowed = (T.ISOCH, T.NORMAL, T.EVENT_DATA, T.NOOP) if isoch else (T.NORMAL, T.EVENT_DATA,
                                                                          T.NOOP)
        if isoch and t0 != T.ISOCH:
            return first, f"{first!r} cannot start an isoch TD"
        for trb in td.trbs:
            if trb.type not in allowed or (trb.type == T.ISOCH and trb is not first):
                return trb, f"{trb!r} does not belong on a {ep.ep_type.name} ring"
            if trb.control & _IDT and trb.type == T.NORMAL and (
                    ep.is_in or trb_length(trb) > IMMEDIATE_DATA_MAX):
                return trb, "Immediate Data on an IN endpoint or longer than 8 bytes"
        return None

    # ---- completion ------------------------------------------------------------------------------
    def _on_complete(self, td: Td, xfer_done: UsbTransfer | None = None) -> None:
        """The device finished `td`'s transfer (it calls back with the transfer: td.xfer)."""
        xfer = td.xfer
        if xfer is not None and self.hooks.on_urb_complete:
            record = self._record(td, xfer)
            record.completed_ns = self.scheduler.now_ns()
            for fn in self.hooks.on_urb_complete:
                fn(record)
            td.force_cc, td.force_residue = record.force_cc, record.force_residue
            td.force_state = record.force_state
            if record.withhold:
                return      # never retires: Stop Endpoint or a reset takes it back
            if record.delay_ns > 0:
                delay, record.delay_ns = record.delay_ns, 0
                self.scheduler.call_later(delay, self._completed, td)
                return
        self._completed(td)

    def _completed(self, td: Td) -> None:
        td.done = True
        ep = td.ep
        if td not in ep.inflight:
            return          # taken back by Stop Endpoint / Disable Slot meanwhile
        if not self.gate.paused:
            self._retire_ready(ep)
        # While paused nothing retires: the completion waits as gate work, and retiring it is
        # the next step on this ring (as a halted schedule would not see the device's answer).
        self.kick(ep)

    def _retire_ready(self, ep: SlotEndpoint) -> None:
        while ep.inflight and ep.inflight[0].done:
            td = ep.inflight.popleft()
            if not self._retire(ep, td):
                # The endpoint halted: the dequeue pointer names the failed TD and the TDs
                # behind it go back to the ring.
                self.take_back(ep, td.start, td.start_ccs)
                ep.write_back()
                return

    def _retire(self, ep: SlotEndpoint, td: Td) -> bool:
        """Scatter data and post events for a finished TD.  False if the endpoint halted."""
        xfer = td.xfer
        if xfer is None:
            self._retire_noop(ep, td)
            return True
        first = td.trbs[0]
        if (xfer.status == Status.OK and len(td.trbs) == 1 and first.type == T.NORMAL
                and td.force_cc is None):
            failed = self._retire_one_normal(ep, td, xfer)     # the common case, kept short
        elif first.type == T.SETUP_STAGE:
            failed = self._retire_control(ep, td, xfer)
        elif ep.is_isoch:
            failed = self._retire_isoch(ep, td, xfer)
        else:
            failed = self._retire_bulk_intr(ep, td, xfer)
        if failed is None and not self.hooks.on_urb_retired and td.force_state is None:
            return True                      # nothing to tell, nothing halts: the common case
        return self._finish(ep, td, xfer, failed)

    def _finish(self, ep: SlotEndpoint, td: Td, xfer: UsbTransfer, failed: int | None) -> bool:
        """Tell observers what was posted; halt the endpoint on an error that halts it (a
        real controller halts every endpoint but an isochronous one).  False if it halted."""
        if self.hooks.on_urb_retired:
            record = self._record(td, xfer)
            record.cc = td.cc if td.cc is not None else (failed or CC.SUCCESS)
            for fn in self.hooks.on_urb_retired:
                fn(record)
        forced = td.force_state
        if forced is not None:
            if forced == "running":
                return True
            ep.set_state(EpState.ERROR if forced == "error" else EpState.HALTED)
            ep.replay = (td.start, xfer) if td.force_cc is not None else None
            return False
        if failed is None or failed in _NO_HALT or failed in VENDOR_INFO or ep.is_isoch:
            return True
        ep.set_state(EpState.ERROR if failed == CC.TRB_ERROR else EpState.HALTED)
        ep.replay = (td.start, xfer) if td.force_cc is not None else None
        return False

    def _retire_noop(self, ep: SlotEndpoint, td: Td) -> None:
        """A TD of No-Op or lone Event Data TRBs: events where they ask for one."""
        for trb in td.trbs:
            if trb.control & _IOC:
                self._post(ep, td, trb, CC.SUCCESS, 0, event_data=trb.type == T.EVENT_DATA)

    def _retire_one_normal(self, ep: SlotEndpoint, td: Td, xfer: UsbTransfer) -> int | None:
        trb = td.trbs[0]
        n = xfer.actual
        residue = (trb.status & _LEN) - n
        if n and xfer.is_in and not xfer.in_place:
            try:                             # _scatter, inline on the common path
                self.mem.write(trb.param, xfer.result)
            except DmaError as e:
                self._buffer_error(ep, td, trb, e, residue + n)
                return CC.DATA_BUFFER_ERROR
        if residue:
            if trb.control & (_ISP | _IOC):
                self._post(ep, td, trb, CC.SHORT_PACKET, residue)
        elif trb.control & _IOC:
            self._post(ep, td, trb, CC.SUCCESS, 0)
        return None

    def _scatter(self, ep: SlotEndpoint, td: Td, trb: Trb, data: bytes | memoryview,
                 residue: int) -> bool:
        """IN data into the TRB's buffer; False if it is unwritable, after posting a Data
        Buffer Error with `residue`."""
        try:
            self.mem.write(trb.param, data)
        except DmaError as e:
            self._buffer_error(ep, td, trb, e, residue)
            return False
        return True

    def _buffer_error(self, ep: SlotEndpoint, td: Td, trb: Trb, e: DmaError,
                      residue: int) -> None:
        self.report.refuse(f"dbe{ep.slot.id}/{ep.dci}", f"endpoint {ep.slot.id}/{ep.dci}: "
                           f"IN data buffer unwritable ({e}); Data Buffer Error")
        self._post(ep, td, trb, CC.DATA_BUFFER_ERROR, residue)

    def _retire_bulk_intr(self, ep: SlotEndpoint, td: Td, xfer: UsbTransfer) -> int | None:
        """Normal TRBs (and Event Data, No-Op) of a bulk or interrupt TD.  Returns the
        completion code that fails the TD, or None."""
        walk = _DataWalk(self, ep, td, xfer)
        for trb in td.trbs:
            t = trb.type
            if t in _DATA_TYPES:
                outcome = walk.data(trb)
                if outcome == _SHORT:
                    return None              # the rest of the TD is skipped (4.10.1.1)
                if outcome is not None:
                    return outcome
            elif t == T.EVENT_DATA:
                walk.event_data(trb)
            elif trb.control & _IOC:
                self._post(ep, td, trb, CC.SUCCESS, 0)
        if walk.failed:
            self._post(ep, td, td.trbs[-1], walk.cc, 0)
            return walk.cc
        return None

    def _retire_isoch(self, ep: SlotEndpoint, td: Td, xfer: UsbTransfer) -> int | None:
        """An isochronous TD reads back as a bulk one does; its errors never halt the
        endpoint (`_finish`), the next service interval goes on."""
        return self._retire_bulk_intr(ep, td, xfer)

    def _retire_control(self, ep: SlotEndpoint, td: Td, xfer: UsbTransfer) -> int | None:
        """Setup, Data and Status stages.  A short Data stage skips to the Status stage."""
        walk = _DataWalk(self, ep, td, xfer)
        cc, failed = walk.cc, walk.failed
        skip_to_status = False
        for trb in td.trbs:
            t = trb.type
            ioc = trb.control & _IOC
            if t in _DATA_TYPES:
                if skip_to_status:
                    continue
                outcome = walk.data(trb)
                if outcome == _SHORT:
                    skip_to_status = True
                elif outcome is not None:
                    return outcome
            elif t == T.EVENT_DATA:
                if not skip_to_status:
                    walk.event_data(trb)
                walk.edtla = 0
            elif t == T.STATUS_STAGE:
                if failed:
                    self._post(ep, td, trb, cc, 0)
                    return cc
                if ioc:
                    self._post(ep, td, trb, CC.SUCCESS, 0)
            elif t == T.SETUP_STAGE:
                if failed and walk.last_data is None and not any(x.type == T.STATUS_STAGE
                                                                 for x in td.trbs):
                    self._post(ep, td, trb, cc, 0)
                    return cc
                if ioc and not failed:
                    self._post(ep, td, trb, CC.SUCCESS, 0)
            elif ioc:
                self._post(ep, td, trb, CC.SUCCESS, 0)
        return None

    def _post(self, ep: SlotEndpoint, td: Td, trb: Trb, cc: int, length: int,
              event_data: bool = False) -> None:
        """One Transfer Event for `trb`, to the interrupter it names; remembers the code that
        was really written (an observer may have rewritten it) as the TD's."""
        intr = (trb.status >> _INTR_SHIFT) & _INTR_MASK
        block = bool(trb.control & _BEI) and trb.type in _BLOCKABLE
        if td.force_residue is not None and cc == td.force_cc:
            length = td.force_residue
        pointer = trb.param if event_data else trb.addr
        written = self.post_event(intr, events.transfer_event(pointer, cc, length, ep.slot.id,
                                                              ep.dci, event_data), block)
        td.cc = (written[2] >> _CC_SHIFT) & _CC_MASK if written is not None else cc

    def _trb_error(self, ep: SlotEndpoint, trb: Trb, why: str) -> None:
        self.report.refuse(f"trberr{ep.slot.id}/{ep.dci}", f"endpoint {ep.slot.id}/{ep.dci}: "
                           f"{why}; TRB Error, endpoint to Error state")
        self.post_event(0, events.transfer_event(trb.addr, CC.TRB_ERROR, 0, ep.slot.id, ep.dci))
        ep.set_state(EpState.ERROR)

    def stopped(self, ep: SlotEndpoint, td: Td) -> None:
        """Stop Endpoint took `td` back: the Stopped event names the TD's first TRB."""
        trb = td.trbs[0] if td.trbs else Trb(td.start, 0, 0, 0)
        length = trb_length(trb) if trb.type in _DATA_TYPES else 0
        self.post_event(0, events.transfer_event(trb.addr, CC.STOPPED, length, ep.slot.id,
                                                 ep.dci))

    # ---- taking TDs back -------------------------------------------------------------------------
    def take_back(self, ep: SlotEndpoint, dequeue: int | None = None,
                  ccs: int | None = None) -> Td | None:
        """Cancel every TD in flight and rewind the ring to the first one (or to `dequeue`).
        Returns the first cancelled TD, if any."""
        first = ep.inflight[0] if ep.inflight else None
        dev = ep.slot.device
        for td in ep.inflight:
            if td.xfer is not None and not td.xfer.done and dev is not None:
                dev.cancel(td.xfer)
        if ep.building is not None and ep.building.trbs:
            first = first or ep.building
        if first is not None and dequeue is None:
            dequeue, ccs = first.start, first.start_ccs
        ep.inflight.clear()
        ep.building = None
        ep.cancel_timers()
        if dequeue is not None:
            ep.ring.set_dequeue(dequeue, ccs if ccs is not None else ep.ring.ccs)
        return first


__all__ = ["STATUS_CC", "Td", "TransferEngine", "status_cc", "trb_length"]
