"""Transfer rings: turning TDs into USB transfers and completions into Transfer Events
(xHCI 1.2 sections 4.10, 4.11, 4.14).

A TD is assembled TRB by TRB (so the debugger can step one TRB), handed to the device as one
`UsbTransfer`, and retired in ring order when the device completes it: IN data scattered into
the TRB buffers, events posted where IOC, ISP, Event Data or an error say so.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ..devices.base import Status, UsbTransfer
from .context import EpState, XhciEpType
from .memory import DmaError
from .rings import RingError
from .trb import CC, TRB_SIZE, Trb, TrbType

if TYPE_CHECKING:
    from .controller import XhciController
    from .slots import Endpoint

MAX_TD_TRBS = 1024           # bounds the memory one TD may make us gather
TRBS_PER_STEP = 64           # a long TD is assembled over several gate turns
T = TrbType
_DATA_TYPES = (T.NORMAL, T.DATA_STAGE, T.ISOCH)

STATUS_CC = {
    Status.OK: CC.SUCCESS, Status.STALL: CC.STALL_ERROR, Status.BABBLE: CC.BABBLE_DETECTED,
    Status.XACT_ERROR: CC.USB_TRANSACTION_ERROR, Status.NODEV: CC.USB_TRANSACTION_ERROR,
    Status.CANCELLED: CC.STOPPED,
}


class Td:
    __slots__ = ("ep", "trbs", "start", "start_ccs", "xfer", "done", "bad")

    def __init__(self, ep: "Endpoint"):
        self.ep = ep
        self.trbs: list[Trb] = []
        self.start = ep.ring.dequeue
        self.start_ccs = ep.ring.ccs
        self.xfer: UsbTransfer | None = None
        self.done = False
        self.bad: tuple[Trb, str] | None = None     # (offending TRB, why) -> TRB Error

    def complete_after(self, trb: Trb, control_ep: bool) -> bool:
        """Does `trb` end this TD?"""
        t = trb.type
        if control_ep and self.trbs and self.trbs[0].type == T.SETUP_STAGE:
            return t == T.STATUS_STAGE
        return not (trb.control & 0x10)            # chain bit clear


class TransferEngine:
    def __init__(self, hc: "XhciController"):
        self.hc = hc

    # ---- assembling TDs ---------------------------------------------------------------------------
    def step(self, ep: "Endpoint", unit: str) -> bool:
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
        if len(ep.inflight) >= self.hc.max_inflight:
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
                self.hc.host_system_error(f"endpoint {ep.slot.id}/{ep.dci}: transfer ring "
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

    # ---- submitting ---------------------------------------------------------------------------------
    def submit(self, ep: "Endpoint", td: Td) -> None:
        hc = self.hc
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
            is_in = bool(first.param & 0x80)
        length = 0
        out = []
        try:
            for trb in td.trbs:
                if trb.type in _DATA_TYPES:
                    n = trb.status & 0x1FFFF
                    length += n
                    if not is_in and n:
                        if trb.control & 0x40:       # IDT: the data is the parameter itself
                            out.append(trb.param.to_bytes(8, "little")[:n])
                        else:
                            out.append(hc.mem.read(trb.param, n))
        except DmaError as e:
            hc.refuse(f"dbe{slot.id}/{ep.dci}", f"endpoint {slot.id}/{ep.dci}: OUT data buffer "
                      f"unreadable ({e}); Data Buffer Error")
            td.done = True
            ep.inflight.append(td)
            self._post(ep, td.trbs[-1], CC.DATA_BUFFER_ERROR, td.trbs[-1].status & 0x1FFFF)
            ep.inflight.pop()
            return
        data = None if is_in else (out[0] if len(out) == 1 else b"".join(out))
        endpoint = ep.address if setup is None else 0
        xfer = UsbTransfer(endpoint, ep.transfer_type, length, setup=setup, data=data,
                           on_complete=self._on_complete,
                           interval=(ep.ctx[0] >> 16) & 0xFF)
        if setup is None and is_in:
            xfer.endpoint |= 0x80
            xfer.buffers_fn = lambda: self._guest_buffers(td)
        xfer.slot, xfer.dci = slot.id, ep.dci
        xfer.bus = 2 if slot.port is not None and slot.port.usb3 else 1
        xfer.devnum = slot.address
        xfer.submitted_ns = hc.scheduler.now_ns()
        if first.type == T.ISOCH:
            xfer.iso_frame = (hc.mfindex() >> 3) & 0x7FF
        xfer.context = td
        td.xfer = xfer
        ep.inflight.append(td)
        for fn in hc.hooks.on_urb_submit:
            fn(xfer)
        dev = slot.device
        if dev is None or not slot.port.enabled:
            xfer.complete(Status.NODEV)
            return
        try:
            dev.submit(xfer)
        except Exception as e:      # a device bug must not take the controller down
            hc.refuse(f"devexc{slot.id}", f"slot {slot.id}: device {dev!r} raised {e!r} on "
                      f"{xfer!r}; reporting a USB Transaction Error")
            xfer.complete(Status.XACT_ERROR)

    # ---- isochronous scheduling (4.11.2.5, 4.14.2) ---------------------------------------------------
    def _schedule_isoch(self, ep: "Endpoint", td: Td) -> None:
        """Run an isoch TD in its frame: at once, later on a timer, or never (Missed Service)."""
        hc = self.hc
        now = hc.scheduler.now_ns()
        first = td.trbs[0]
        if first.control & (1 << 31):                   # SIA: as soon as possible
            start = max(now, ep.next_service_ns)
        else:
            mf = hc.mfindex()
            frame = (first.control >> 20) & 0x7FF
            ahead = (frame - (mf >> 3)) % 2048
            if ahead >= 1024:                           # that frame has already passed
                ep.inflight.append(td)
                td.done = True
                length = sum(t.status & 0x1FFFF for t in td.trbs if t.type in _DATA_TYPES)
                self._post(ep, first, CC.MISSED_SERVICE, length)
                ep.inflight.remove(td)
                return
            start = now + ahead * 1_000_000 - (mf & 7) * 125_000 if ahead else now
        ep.next_service_ns = start + ep.interval_ns
        if start <= now:
            self.submit(ep, td)
            return
        ep.inflight.append(td)          # waiting for its frame; take_back rewinds to it
        ep.isoch_timer = hc.scheduler.call_later(start - now, self._isoch_due, ep, td)

    def _isoch_due(self, ep: "Endpoint", td: Td) -> None:
        ep.isoch_timer = None
        if td not in ep.inflight or ep.state != EpState.RUNNING:
            return
        ep.inflight.remove(td)
        self.submit(ep, td)
        self.hc.kick_endpoint(ep)

    def _guest_buffers(self, td: Td) -> list[memoryview] | None:
        """Views of the TD's IN buffers in guest memory, if every one is directly mapped."""
        views = []
        mem = self.hc.mem
        for trb in td.trbs:
            if trb.type in _DATA_TYPES:
                n = trb.status & 0x1FFFF
                if n:
                    v = mem.view(trb.param, n)
                    if v is None:
                        return None
                    views.append(v)
        return views

    def _validate(self, ep: "Endpoint", td: Td) -> tuple[Trb, str] | None:
        first = td.trbs[0]
        t0 = first.type
        if t0 == T.NORMAL and len(td.trbs) == 1 and not first.control & 0x40 and not ep.is_isoch \
                and ep.ep_type != XhciEpType.CONTROL:
            return None     # the common case: one plain Normal TRB on a bulk/interrupt ring
        control = ep.ep_type == XhciEpType.CONTROL
        isoch = ep.is_isoch
        if t0 == T.NOOP and len(td.trbs) == 1:
            return None
        if control:
            if t0 != T.SETUP_STAGE:
                return first, f"{first!r} cannot start a control TD (expected Setup Stage)"
            if not first.control & 0x40 or (first.status & 0x1FFFF) != 8:
                return first, "Setup Stage TRB without IDT or with a length other than 8"
            dir_in = bool(first.param & 0x80)
            for trb in td.trbs[1:]:
                if trb.type == T.DATA_STAGE and bool(trb.control & (1 << 16)) != dir_in:
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
            if trb.control & 0x40 and trb.type == T.NORMAL and (
                    ep.is_in or (trb.status & 0x1FFFF) > 8):
                return trb, "Immediate Data on an IN endpoint or longer than 8 bytes"
        return None

    # ---- completion ------------------------------------------------------------------------------
    def _on_complete(self, xfer: UsbTransfer) -> None:
        hc = self.hc
        for fn in hc.hooks.on_urb_complete:
            fn(xfer)
        td: Td = xfer.context
        td.done = True
        ep = td.ep
        if td not in ep.inflight:
            return          # taken back by Stop Endpoint / Disable Slot meanwhile
        if not hc.gate.paused:
            self._retire_ready(ep)
        # While paused nothing retires: the completion waits as gate work, and retiring it is
        # the next step on this ring (as a halted schedule would not see the device's answer).
        hc.kick_endpoint(ep)

    def _retire_ready(self, ep: "Endpoint") -> None:
        while ep.inflight and ep.inflight[0].done:
            td = ep.inflight.popleft()
            if not self._retire(ep, td):
                # The endpoint halted: the dequeue pointer names the failed TD and the TDs
                # behind it go back to the ring.
                self.take_back(ep, td.start, td.start_ccs)
                ep.write_back()
                return

    def _retire(self, ep: "Endpoint", td: Td) -> bool:
        """Scatter data and post events for a finished TD.  False if the endpoint halted."""
        hc = self.hc
        xfer = td.xfer
        if xfer is not None and xfer.status == Status.OK and len(td.trbs) == 1 \
                and td.trbs[0].type == T.NORMAL:
            # The common case, kept short: one Normal TRB that completed.
            trb = td.trbs[0]
            n = xfer.actual
            residue = (trb.status & 0x1FFFF) - n
            if n and xfer.is_in and not xfer.in_place:
                try:
                    hc.mem.write(trb.param, xfer.result)
                except DmaError as e:
                    hc.refuse(f"dbe{ep.slot.id}/{ep.dci}", f"endpoint {ep.slot.id}/{ep.dci}:"
                              f" IN data buffer unwritable ({e}); Data Buffer Error")
                    self._post(ep, trb, CC.DATA_BUFFER_ERROR, residue + n)
                    return True
            if residue:
                if trb.control & 0x24:                          # ISP or IOC
                    self._post(ep, trb, CC.SHORT_PACKET, residue)
            elif trb.control & 0x20:
                self._post(ep, trb, CC.SUCCESS, 0)
            return True
        if xfer is None:          # No-Op TD
            for trb in td.trbs:
                if trb.control & 0x20:
                    if trb.type == T.EVENT_DATA:
                        self._post(ep, trb, CC.SUCCESS, 0, event_data=True)
                    else:
                        self._post(ep, trb, CC.SUCCESS, 0)
            return True
        status = xfer.status
        cc = STATUS_CC.get(status, CC.USB_TRANSACTION_ERROR)
        failed = cc not in (CC.SUCCESS,)
        result = memoryview(xfer.result) if xfer.is_in and not xfer.in_place else None
        remaining = xfer.actual
        pos = 0
        short = False
        edtla = 0
        control = td.trbs[0].type == T.SETUP_STAGE
        skip_to_status = False
        data_trbs = [t for t in td.trbs if t.type in _DATA_TYPES]
        last_data = data_trbs[-1] if data_trbs else None
        for trb in td.trbs:
            t = trb.type
            ioc = trb.control & 0x20
            if t in _DATA_TYPES:
                if skip_to_status:
                    continue
                length = trb.status & 0x1FFFF
                n = min(length, remaining)
                if n and result is not None:
                    try:
                        hc.mem.write(trb.param, result[pos:pos + n])
                    except DmaError as e:
                        hc.refuse(f"dbe{ep.slot.id}/{ep.dci}", f"endpoint {ep.slot.id}/{ep.dci}:"
                                  f" IN data buffer unwritable ({e}); Data Buffer Error")
                        self._post(ep, trb, CC.DATA_BUFFER_ERROR, length - n)
                        return True
                pos += n
                remaining -= n
                edtla += n
                residue = length - n
                if failed and (residue or trb is last_data):
                    self._post(ep, trb, cc, residue)
                    return self._halt(ep, cc)
                if residue and not short:
                    short = True
                    if trb.control & 0x4 or ioc:                   # ISP or IOC
                        self._post(ep, trb, CC.SHORT_PACKET, residue)
                        if control:
                            skip_to_status = True
                            continue
                        return True
                    continue
                if ioc:
                    self._post(ep, trb, CC.SHORT_PACKET if short else CC.SUCCESS, residue)
            elif t == T.EVENT_DATA:
                if ioc and not skip_to_status:
                    self._post(ep, trb, CC.SHORT_PACKET if short else CC.SUCCESS, edtla,
                               event_data=True)
                edtla = 0
            elif t == T.STATUS_STAGE:
                if failed:
                    self._post(ep, trb, cc, 0)
                    return self._halt(ep, cc)
                if ioc:
                    self._post(ep, trb, CC.SUCCESS, 0)
            elif t == T.SETUP_STAGE:
                if failed and not data_trbs and not any(x.type == T.STATUS_STAGE for x in td.trbs):
                    self._post(ep, trb, cc, 0)
                    return self._halt(ep, cc)
                if ioc and not failed:
                    self._post(ep, trb, CC.SUCCESS, 0)
            elif ioc:
                self._post(ep, trb, CC.SUCCESS, 0)
        if failed and not control:
            self._post(ep, td.trbs[-1], cc, 0)
            return self._halt(ep, cc)
        return True

    def _halt(self, ep: "Endpoint", cc: int) -> bool:
        if cc == CC.STOPPED:
            return True
        if cc in (CC.DATA_BUFFER_ERROR,):
            return True
        if ep.is_isoch:
            return True     # isoch errors do not halt: the next service interval goes on
        ep.set_state(EpState.HALTED)
        return False

    def _post(self, ep: "Endpoint", trb: Trb, cc: int, length: int, event_data: bool = False):
        intr = (trb.status >> 22) & 0x3FF
        block = bool(trb.control & (1 << 9)) and trb.type in (T.NORMAL, T.ISOCH, T.EVENT_DATA)
        self.hc.post_transfer_event(ep, trb, cc, length, intr, event_data, block)

    def _trb_error(self, ep: "Endpoint", trb: Trb, why: str) -> None:
        self.hc.refuse(f"trberr{ep.slot.id}/{ep.dci}", f"endpoint {ep.slot.id}/{ep.dci}: {why}; "
                       f"TRB Error, endpoint to Error state")
        self.hc.post_transfer_event(ep, trb, CC.TRB_ERROR, 0, 0, False, False)
        ep.set_state(EpState.ERROR)

    # ---- taking TDs back -----------------------------------------------------------------------------
    def take_back(self, ep: "Endpoint", dequeue: int | None = None, ccs: int | None = None):
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
        if ep.building is not None and dequeue is None and ep.building.trbs:
            dequeue, ccs = ep.building.start, ep.building.start_ccs
        ep.inflight.clear()
        ep.building = None
        ep.cancel_timers()
        if dequeue is not None:
            ep.ring.set_dequeue(dequeue, ccs)
        return first


def stopped_event_trb(td: Td) -> Trb:
    return td.trbs[0] if td.trbs else Trb(td.start, 0, 0, 0)


__all__ = ["TransferEngine", "Td", "STATUS_CC", "stopped_event_trb", "TRB_SIZE"]
