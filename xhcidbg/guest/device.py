"""Device slots, endpoints and transfers: enumeration (4.3), transfer rings (4.11), endpoint
state and recovery (4.6.8, 4.6.9, 4.6.10), all from the host driver's side.

A `Transfer` is one TD.  It records every event the controller posted for it, the completion
code that ended it, how many bytes moved and, for IN transfers, the data.
"""
from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypedDict, Unpack

from ..devices.base import Speed
from ..emu.context import EpState, SlotState, XhciEpType
from ..emu.trb import CC, TrbType, cc_name
from . import descriptors as D
from . import trb as T
from .context import EP_CTX, INPUT_CTRL_CTX, SLOT_CTX
from .errors import DescriptorError, NoDevice, TransferFailed, XhciError
from .fields import address_field, flag, placed, shift_mask
from .rings import Block, ProducerRing

if TYPE_CHECKING:
    from .driver import CommandCompletion, Event, XhciDriver

KIB64 = 0x10000

# TRB bits used when building TDs (6.4.1), precomputed from the guest's TRB figures.
_TRT = T.LAYOUTS[TrbType.SETUP_STAGE]["trt"]
_ISOCH_TRB = T.LAYOUTS[TrbType.ISOCH]
_ENT = flag(T.ENT)
_ISP = flag(T.ISP)
_CH = flag(T.CHAIN)
_IOC = flag(T.IOC)
_IDT = flag(T.IDT)
_BEI = flag(T.BEI)
_DIR_IN = flag(T.DIR)
_SIA = flag(_ISOCH_TRB["sia"])
# read or placed once per TD: shifts, not calls
_TYPE_AT, _TYPE_MASK = shift_mask(T.TYPE, 3)
_INTR_AT, _INTR_MASK = shift_mask(T.INTERRUPTER, 2)
_NORMAL = placed(T.TYPE, TrbType.NORMAL)
_SETUP = placed(T.TYPE, TrbType.SETUP_STAGE)
_DATA = placed(T.TYPE, TrbType.DATA_STAGE)
_STATUS = placed(T.TYPE, TrbType.STATUS_STAGE)
_ISOCH = placed(T.TYPE, TrbType.ISOCH)
_EVENT_DATA = placed(T.TYPE, TrbType.EVENT_DATA)
_LEN_SHIFT, _LEN_MASK = shift_mask(T.LENGTH, 2)
_TD_SIZE_SHIFT, _TD_SIZE_MAX = shift_mask(T.TD_SIZE, 2)
_SETUP_LENGTH = 8                  # a Setup Stage TRB carries the 8 setup bytes (6.4.1.2.1)
_MAX_ESIT_LO = EP_CTX["max_esit_lo"]
_AVG_TRB_LENGTH_MAX = EP_CTX["avg_trb_length"].mask

# Completion codes that leave the endpoint where it was rather than ending a TD.
_STOPPED = (CC.STOPPED, CC.STOPPED_LENGTH_INVALID, CC.STOPPED_SHORT_PACKET)
_XRUN = (CC.RING_UNDERRUN, CC.RING_OVERRUN)

# Standard requests (USB 2.0 table 9-4)
GET_STATUS, CLEAR_FEATURE, SET_FEATURE, SET_ADDRESS = 0, 1, 3, 5
GET_DESCRIPTOR, SET_DESCRIPTOR, GET_CONFIGURATION, SET_CONFIGURATION = 6, 7, 8, 9
GET_INTERFACE, SET_INTERFACE = 10, 11
ENDPOINT_HALT = 0

_EP0_INITIAL_MPS = {Speed.LOW: 8, Speed.FULL: 8, Speed.HIGH: 64, Speed.SUPER: 512,
                    Speed.SUPER_PLUS: 512}

# A TRB of a TD being built: parameter, status, control.  An Event Data TRB's parameter may be
# None, for its own address (known once the TD is on the ring).
_TrbDraft = tuple[int | None, int, int]
OnComplete = Callable[["Transfer"], None]


class IsochStart(TypedDict, total=False):
    """When an isochronous TD starts (4.11.2.5): a Frame ID, or as soon as possible (SIA)."""

    frame_id: int | None
    sia: bool | None


class TdOptions(TypedDict, total=False):
    """`GuestEndpoint.submit`'s options for how a TD is built and queued (see there)."""

    trb_sizes: Iterable[int] | None
    max_trb_size: int
    isp: bool | None
    ioc: bool
    ent: bool
    bei: bool
    immediate: bool
    event_data: int | bool | None
    interrupter: int | None
    ring: bool
    on_complete: OnComplete | None
    buffer: int | None
    stream: int
    fetch_data: bool


class WaitOptions(TypedDict, total=False):
    """How the synchronous transfer helpers wait for a TD and treat its failure."""

    timeout_ns: int | None
    check: bool
    recover: bool


class TransferOptions(TdOptions, WaitOptions, total=False):
    """What `Device.bulk_in` and the other synchronous helpers take."""


class ControlOptions(TypedDict, total=False):
    """`Device.submit_control`'s options (see there), as `Device.control` passes them on."""

    w_length: int | None
    trb_sizes: Iterable[int] | None
    isp: bool
    immediate: bool
    event_data: int | bool | None
    interrupter: int | None
    ring: bool
    on_complete: OnComplete | None


class EnumerateOptions(TypedDict, total=False):
    """`Device.enumerate`'s options (see there), as `XhciDriver.enumerate` passes them on."""

    bsr_first: bool
    reset: bool | None
    configure: bool
    read_strings: bool
    interrupter: int
    config_index: int


class Transfer:
    """One TD on an endpoint's transfer ring."""

    __slots__ = (
        "__weakref__",
        "actual",
        "buf",
        "cancelled",
        "cc",
        "data",
        "done",
        "ed_keys",
        "end_seq",
        "ep",
        "events",
        "fetch_data",
        "first_seq",
        "ioc",
        "is_in",
        "kind",
        "length",
        "lens",
        "note",
        "offs",
        "on_complete",
        "owns_buffer",
        "setup",
        "short",
    )

    def __init__(self, ep: GuestEndpoint, kind: str, is_in: bool, length: int, buf: int):
        self.ep = ep
        self.kind = kind              # "control", "normal" (bulk/interrupt), "isoch"
        self.is_in = is_in
        self.length = length
        self.buf = buf
        self.first_seq = self.end_seq = 0
        self.offs: list[int] = []     # per TRB: data offset and data length, for residue math
        self.lens: list[int] = []
        self.events: list[Event] = []
        self.cc: int | None = None
        self.actual = 0
        self.data = b""
        self.done = False
        self.short = False
        self.cancelled = False
        self.ioc = True
        self.on_complete: OnComplete | None = None
        self.setup: bytes | None = None
        self.owns_buffer = True
        self.fetch_data = True
        self.note = ""
        self.ed_keys: list[int] = []

    @property
    def ok(self) -> bool:
        return self.done and self.cc in (CC.SUCCESS, CC.SHORT_PACKET)

    @property
    def residual(self) -> int:
        return self.length - self.actual

    @property
    def trb_count(self) -> int:
        return self.end_seq - self.first_seq

    def trb_addrs(self) -> list[int]:
        ring = self.ep.ring
        return [ring.addr_of(s) for s in range(self.first_seq, self.end_seq)]

    def wait(self, timeout_ns: int | None = None) -> Transfer:
        drv = self.ep.dev.drv
        drv.flush_doorbells()
        drv.wait_for(lambda: self.done, lambda: f"{self!r} to complete", timeout_ns)
        return self

    def check(self) -> Transfer:
        if not self.ok:
            raise TransferFailed(self)
        return self

    def __repr__(self) -> str:
        d = "in" if self.is_in else "out"
        state = ("cancelled" if self.cancelled else
                 f"cc {self.cc} '{cc_name(self.cc)}'" if self.cc is not None else
                 "done without an event" if self.done else "pending")
        return (f"Transfer(slot {self.ep.dev.slot} ep {self.ep.name} {self.kind} {d} "
                f"{self.actual}/{self.length} bytes, {state}"
                f"{', ' + self.note if self.note else ''})")


class GuestEndpoint:
    """One endpoint of a device slot, with its transfer ring and the TDs queued on it."""

    def __init__(self, dev: Device, dci: int, xtype: XhciEpType, max_packet: int,
                 max_burst: int = 0, mult: int = 0, interval: int = 0, max_esit: int = 0,
                 desc: D.EndpointDesc | None = None, ring_trbs: int | None = None,
                 ring_segments: int | None = None):
        drv = dev.drv
        self.dev = dev
        self.dci = dci
        self.xtype = xtype
        self.max_packet = max_packet
        self.max_burst = max_burst
        self.mult = mult
        self.interval = interval
        self.max_esit = max_esit
        self.desc = desc
        self.interrupter = dev.interrupter
        self.ring = ProducerRing(drv.mem, drv.alloc, ring_trbs or drv.transfer_ring_trbs,
                                 ring_segments or drv.transfer_ring_segments,
                                 f"{dev.slot}/{dci}", drv.toggle_every_link)
        self.tds: deque[Transfer] = deque()
        self.last_done: Transfer | None = None
        self.failed: Transfer | None = None      # the TD that halted the endpoint
        self.xrun_events: list[Event] = []       # isoch ring underrun/overrun events
        self.stop_events: list[Event] = []
        self.ed_values: dict[int, tuple[Transfer, int]] = {}   # Event Data value -> (TD, TRB)

    # ---- identity ----------------------------------------------------------------------------
    @property
    def number(self) -> int:
        return self.dci // 2

    @property
    def is_in(self) -> bool:
        return self.dci == 1 or bool(self.dci & 1)

    @property
    def address(self) -> int:
        return self.number | (0x80 if self.dci & 1 and self.dci > 1 else 0)

    @property
    def name(self) -> str:
        if self.dci == 1:
            return "ep0"
        return f"ep{self.number}{'in' if self.dci & 1 else 'out'}"

    def context(self) -> dict[str, int]:
        return self.dev.ep_context(self.dci)

    @property
    def state(self) -> EpState | int:
        """The Endpoint State of the output context (the raw value if it is no state)."""
        st = self.context()["ep_state"]
        try:
            return EpState(st)
        except ValueError:
            return st

    def __repr__(self) -> str:
        return (f"GuestEndpoint(slot {self.dev.slot} {self.name} dci {self.dci} "
                f"{self.xtype.name.lower()} mps {self.max_packet} burst {self.max_burst} "
                f"{len(self.tds)} pending)")

    def context_dwords(self) -> list[int]:
        """This endpoint's endpoint context for an input context (6.2.3)."""
        x = self.xtype
        periodic = x in (XhciEpType.ISOCH_IN, XhciEpType.ISOCH_OUT, XhciEpType.INTERRUPT_IN,
                         XhciEpType.INTERRUPT_OUT)
        if x == XhciEpType.CONTROL:
            avg = 8
        elif periodic:
            avg = max(1, min(self.max_esit, _AVG_TRB_LENGTH_MAX))
        else:
            avg = 3072
        isoch = x in (XhciEpType.ISOCH_IN, XhciEpType.ISOCH_OUT)
        ring = self.ring
        return EP_CTX.encode(
            ep_type=int(x), max_packet=self.max_packet, max_burst=self.max_burst,
            mult=self.mult, interval=self.interval, cerr=0 if isoch else 3,
            dequeue=address_field(EP_CTX["dequeue"], ring.enqueue_pointer), dcs=ring.pcs,
            avg_trb_length=avg, max_esit_lo=self.max_esit,
            max_esit_hi=self.max_esit >> _MAX_ESIT_LO.width)

    # ---- queueing ----------------------------------------------------------------------------
    def ring_doorbell(self, stream: int = 0) -> None:
        self.dev.drv.ring_doorbell(self.dev.slot, self.dci, stream)

    def _make_room(self, n: int) -> None:
        ring = self.ring
        if n > ring.capacity:
            raise XhciError(f"a TD of {n} TRBs does not fit on {self.name}'s ring "
                            f"({ring.capacity} usable TRBs)")
        if ring.space < n:
            drv = self.dev.drv
            drv.flush_doorbells()
            drv.wait_for(lambda: ring.space >= n, f"room for {n} TRBs on {self.name}'s ring")

    def _queue(self, td: Transfer, trbs: list[_TrbDraft]) -> Transfer:
        """Write a TD's TRBs (room already made).  Event Data TRBs whose data is None get
        their own address as the data, so their events lead back to this TD."""
        ring = self.ring
        first = td.first_seq = ring.enq_seq
        put = ring.put
        # The first TRB of several goes valid last, so the controller never sees half a TD.
        several = len(trbs) > 1
        for i, (p, s, c) in enumerate(trbs):
            if (c >> _TYPE_AT) & _TYPE_MASK == TrbType.EVENT_DATA:
                if p is None:
                    p = ring.addr_of(first + i)
                self.ed_values[p] = (td, i)
                td.ed_keys.append(p)
            assert p is not None, "only an Event Data TRB leaves its parameter to the ring"
            put(p, s, c, several and i == 0)
        if several:
            ring.validate(first, trbs[0][2])
        td.end_seq = ring.enq_seq
        self.tds.append(td)
        return td

    def _data_trbs(self, td: Transfer, buf: int, length: int, first_type: int, *, is_in: bool,
                   trb_sizes: Iterable[int] | None = None, max_trb_size: int = KIB64,
                   isp: bool | None = None, ioc: bool = True, ent: bool = False,
                   bei: bool = False, immediate: bytes | None = None,
                   event_data: int | bool | None = None, interrupter: int,
                   first_extra: int = 0) -> list[_TrbDraft]:
        """Normal-style TRBs for `length` bytes at `buf` (4.11.7.1: no TRB crosses 64 KiB),
        TD Size per 4.11.2.4, and an optional Event Data TRB closing the TD."""
        if immediate is not None:
            sizes = [len(immediate)]
        elif trb_sizes is not None:
            sizes = list(trb_sizes)
            if sum(sizes) != length:
                raise ValueError(f"trb_sizes add up to {sum(sizes)}, not {length}")
        else:
            sizes = []
            pos = 0
            step = max(1, min(max_trb_size, KIB64))
            while pos < length or not sizes:
                n = min(step, length - pos, KIB64 - ((buf + pos) % KIB64))
                sizes.append(n)
                pos += n
        if isp is None:
            isp = is_in
        mps = self.max_packet or 1
        intr = (interrupter & _INTR_MASK) << _INTR_AT
        with_ed = event_data is not None and event_data is not False
        n = len(sizes)
        trbs: list[_TrbDraft] = []
        offs, lens = td.offs, td.lens
        pos = 0
        for i, size in enumerate(sizes):
            last = i == n - 1
            remaining = length - pos - size
            td_size = 0 if last else min(_TD_SIZE_MAX, -(-remaining // mps))
            ctrl = (first_type | first_extra) if i == 0 else _NORMAL
            if isp:
                ctrl |= _ISP
            if not last or with_ed:
                ctrl |= _CH
                if ent:
                    ctrl |= _ENT
            elif ioc:
                ctrl |= _IOC | (_BEI if bei else 0)
            if immediate is not None:
                param = int.from_bytes(immediate.ljust(8, b"\0"), "little")
                ctrl |= _IDT
            else:
                param = buf + pos
            trbs.append((param, ((size & _LEN_MASK) << _LEN_SHIFT) | (td_size << _TD_SIZE_SHIFT)
                         | intr, ctrl))
            offs.append(pos)
            lens.append(size)
            pos += size
        if with_ed:
            assert event_data is not None, "with_ed says there is event data"
            value = None if event_data is True else int(event_data)
            # An Event Data TRB exists to produce an event: it always carries IOC.
            trbs.append((value, intr, _EVENT_DATA | _IOC | (_BEI if bei else 0)))
            offs.append(length)
            lens.append(0)
        return trbs

    def _prepare_buffer(self, data: bytes | None, length: int) -> int:
        drv = self.dev.drv
        buf = drv.alloc.buffer(max(length, 1))
        if data:
            drv.mem.write(buf, data)
        return buf

    def submit(self, data: bytes | None = None, length: int | None = None, *,
               trb_sizes: Iterable[int] | None = None, max_trb_size: int = KIB64,
               isp: bool | None = None, ioc: bool = True, ent: bool = False, bei: bool = False,
               immediate: bool = False, event_data: int | bool | None = None,
               interrupter: int | None = None, ring: bool = True,
               on_complete: OnComplete | None = None, buffer: int | None = None,
               isoch: IsochStart | None = None, stream: int = 0,
               fetch_data: bool = True) -> Transfer:
        """Queue one TD: `data` for OUT endpoints, `length` for IN.

        trb_sizes: split the data into TRBs of exactly these sizes (default: 64 KiB pieces,
        never crossing a 64 KiB boundary, or `max_trb_size` pieces); isp/ioc/ent/bei: TRB flags;
        immediate: put up to 8 OUT bytes in the TRB itself (IDT); event_data: close the TD with
        an Event Data TRB (True: its own address as the data, or an int to send);
        fetch_data=False: leave IN data in guest memory (`data` stays empty), as a real driver
        would with DMA; benchmarks use it so they measure the controller, not this copy.
        buffer: use this guest address instead of allocating one; ring=False: do not ring the
        doorbell yet.  Isochronous endpoints take `isoch=dict(frame_id=..., sia=...)`.
        """
        if self.dci == 1:
            raise XhciError("use Device.control() for endpoint 0")
        if self.is_in:
            if data is not None:
                raise ValueError(f"{self.name} is an IN endpoint: give a length, not data")
            length = int(length or 0)
        else:
            data = bytes(data or b"") if length is None else bytes(data or bytes(length))
            length = len(data)
        if immediate and (self.is_in or length > 8):
            raise ValueError("immediate data is for OUT transfers of at most 8 bytes")
        intr = self.interrupter if interrupter is None else interrupter
        isochronous = self.xtype in (XhciEpType.ISOCH_IN, XhciEpType.ISOCH_OUT)
        kind = "isoch" if isochronous else "normal"
        if buffer is None:
            buf = 0 if immediate else self._prepare_buffer(data, length)
            owns = not immediate
        else:
            buf = buffer
            owns = False
            if data:
                self.dev.drv.mem.write(buf, data)
        td = Transfer(self, kind, self.is_in, length, buf)
        td.owns_buffer = owns
        td.fetch_data = fetch_data
        td.ioc = ioc
        td.on_complete = on_complete
        first_type, extra = _NORMAL, 0
        if isochronous:
            first_type = _ISOCH
            extra = self._isoch_bits(length, **(isoch or {}))
        trbs = self._data_trbs(td, buf, length, first_type, is_in=self.is_in,
                               trb_sizes=trb_sizes, max_trb_size=max_trb_size, isp=isp, ioc=ioc,
                               ent=ent, bei=bei, immediate=data if immediate else None,
                               event_data=event_data, interrupter=intr, first_extra=extra)
        self._make_room(len(trbs))
        self._queue(td, trbs)
        if ring:
            self.ring_doorbell(stream)
        return td

    def _isoch_bits(self, length: int, frame_id: int | None = None, sia: bool | None = None
                    ) -> int:
        """Isoch TRB TBC/TLBPC (4.11.2.3, 4.14.1) and the start: SIA or a Frame ID."""
        mps = self.max_packet or 1
        burst = self.max_burst + 1
        tdpc = max(1, -(-length // mps))
        tbc = -(-tdpc // burst) - 1
        rem = tdpc % burst
        tlbpc = rem - 1 if rem else burst - 1
        bits = placed(_ISOCH_TRB["tbc"], tbc) | placed(_ISOCH_TRB["tlbpc"], tlbpc)
        if sia is None:
            sia = frame_id is None
        if sia:
            bits |= _SIA
        if frame_id is not None:
            bits |= placed(_ISOCH_TRB["frame_id"], frame_id)
        return bits

    # ---- completions -------------------------------------------------------------------------
    def _on_event(self, ev: Event) -> bool:
        cc = ev.cc
        td: Transfer | None = None
        j = -1
        if cc in _XRUN and not ev.event_data:
            self.xrun_events.append(ev)
            return True
        if ev.event_data:
            hit = self.ed_values.get(ev.param)
            if hit is not None and not hit[0].done:
                td, j = hit
        else:
            seq = self.ring.seq_of(ev.param)
            if seq is not None:
                for t in self.tds:
                    if t.first_seq <= seq < t.end_seq:
                        td = t
                        j = seq - t.first_seq
                        break
        if td is None:
            last = self.last_done
            if last is not None and not ev.event_data and ev.param in last.trb_addrs():
                # A second event for a TD already ended by a short packet (4.10.1.1).
                last.events.append(ev)
                return True
            return False
        td.events.append(ev)
        last_trb = j == len(td.offs) - 1
        if not td.short and cc != CC.STOPPED_LENGTH_INVALID:
            if ev.event_data:
                td.actual = min(ev.length, td.length)
            else:
                td.actual = max(0, min(td.length, td.offs[j] + td.lens[j] - ev.length))
        if cc == CC.SUCCESS:
            if last_trb:
                self._finish(td, cc)
        elif cc == CC.SHORT_PACKET:
            td.short = True
            if td.kind != "control" or last_trb:
                self._finish(td, cc)
        elif cc in _STOPPED:
            self.stop_events.append(ev)
        else:
            if td.kind != "isoch":
                self.failed = td
            self._finish(td, cc)
        return True

    def _finish(self, td: Transfer, cc: int) -> None:
        tds = self.tds
        while tds:
            t = tds.popleft()
            if t is td:
                break
            # An earlier TD ended silently: fine without IOC, a lost event with it.
            t.done = True
            if t.ioc:
                t.note = "completed without its transfer event"
            else:
                t.cc = CC.SUCCESS
                t.actual = t.length
            self._release(t)
        td.cc = cc
        td.done = True
        self.ring.consumed_through(td.end_seq)
        for k in td.ed_keys:
            self.ed_values.pop(k, None)
        self.last_done = td
        self._release(td)
        if td.on_complete is not None:
            td.on_complete(td)

    def _release(self, td: Transfer) -> None:
        drv = self.dev.drv
        if td.is_in and td.actual and td.buf and td.fetch_data:
            td.data = drv.mem.read(td.buf, td.actual)
        if td.owns_buffer and td.buf:
            drv.alloc.release(td.buf)
            td.owns_buffer = False
        for k in td.ed_keys:
            self.ed_values.pop(k, None)

    # ---- endpoint state ----------------------------------------------------------------------
    def reset(self, tsp: bool = False) -> CommandCompletion:
        return self.dev.drv.reset_endpoint(self.dev.slot, self.dci, tsp)

    def stop(self, suspend: bool = False) -> CommandCompletion:
        return self.dev.drv.stop_endpoint(self.dev.slot, self.dci, suspend)

    def set_dequeue(self, seq: int) -> CommandCompletion:
        """Move the controller's dequeue pointer to ring position `seq` (Set TR Dequeue)."""
        ring = self.ring
        c = self.dev.drv.set_tr_dequeue(self.dev.slot, self.dci, ring.addr_of(seq),
                                        ring.cycle_of(seq))
        if c.ok:
            ring.consumed_through(seq)
        return c

    def recover(self, clear_halt: bool | None = None) -> None:
        """After an error ended a TD (4.10.2): Reset Endpoint if it halted, Set TR Dequeue past
        the failed TD, CLEAR_FEATURE(ENDPOINT_HALT) for a stalled non-control endpoint, then
        restart the ring if TDs are still queued."""
        failed = self.failed
        self.failed = None
        state = self.state
        if state == EpState.HALTED:
            self.reset().check()
        if state in (EpState.HALTED, EpState.STOPPED):
            self.set_dequeue(failed.end_seq if failed is not None else self.ring.enq_seq).check()
        if clear_halt is None:
            clear_halt = failed is not None and failed.cc == CC.STALL_ERROR
        if clear_halt and self.dci != 1:
            self.dev.control(0x02, CLEAR_FEATURE, ENDPOINT_HALT, self.address, 0)
        if self.tds:
            self.ring_doorbell()

    def cancel_all(self) -> list[Transfer]:
        """Take every queued TD back: stop (or reset, if halted) the endpoint and move the
        dequeue pointer past them all (4.6.9, 4.6.10).  Returns the cancelled transfers."""
        state = self.state
        if state == EpState.RUNNING:
            self.stop()
            self.dev.drv.service()
        elif state == EpState.HALTED:
            self.reset().check()
        gone = [t for t in self.tds if not t.done]
        if state != EpState.DISABLED:
            self.set_dequeue(self.ring.enq_seq).check()
        for t in gone:
            t.cancelled = True
            t.done = True
            self._release(t)
        self.tds.clear()
        self.failed = None
        return gone

    def free_memory(self) -> None:
        for t in self.tds:
            if t.owns_buffer and t.buf:
                self.dev.drv.alloc.release(t.buf)
                t.owns_buffer = False
        self.tds.clear()
        self.ring.free_memory()


class Device:
    """A device slot and the USB device behind it."""

    def __init__(self, drv: XhciDriver, slot: int, port: int, speed: Speed, interrupter: int = 0,
                 route_string: int = 0):
        self.drv = drv
        self.slot = slot
        self.port = port
        self.speed = speed
        self.route_string = route_string
        self.interrupter = interrupter
        self.connected = True
        caps = drv.capabilities
        csz = caps.context_size
        self.csz = csz
        page = caps.page_size
        # Device and input contexts: 64-byte aligned, within one page (table 6-1); given back
        # (None) when the slot is disabled.
        output = Block(drv.mem, drv.alloc.alloc(32 * csz, 64, page), 32 * csz)
        self.output: Block | None = output
        self.input: Block | None = Block(drv.mem, drv.alloc.alloc(33 * csz, 64, page), 33 * csz)
        drv.set_dcbaa_entry(slot, output.addr)
        mps = _EP0_INITIAL_MPS.get(speed, 8)
        self.ep0 = GuestEndpoint(self, 1, XhciEpType.CONTROL, mps)
        self.endpoints: dict[int, GuestEndpoint] = {1: self.ep0}
        self.device_desc: D.DeviceDesc | None = None
        self.config: D.ConfigDesc | None = None
        self.configurations: list[D.ConfigDesc] = []
        self.strings: dict[int, str | None] = {}
        self.langids: list[int] = []
        self.configured_value = 0
        self.alternates: dict[int, int] = {}
        drv.devices[slot] = self

    # ---- enumeration (4.3) ---------------------------------------------------------------------
    @classmethod
    def enumerate(cls, drv: XhciDriver, port: int, *, bsr_first: bool = False,
                  reset: bool | None = None, configure: bool = True, read_strings: bool = True,
                  interrupter: int = 0, config_index: int = 0) -> Device:
        """bsr_first: Address Device with BSR=1, read the first 8 bytes of the device
        descriptor at address 0, then Address Device with BSR=0 (what Windows and SeaBIOS do).
        reset: reset the port first (default: USB2 ports always, USB3 ports when not enabled)."""
        st = drv.port_status(port)
        proto = drv.protocol_of(port)
        usb3 = proto.major >= 3 if proto is not None else bool(st.speed and st.speed >= 4)
        if reset is None:
            reset = not (usb3 and st.enabled)
        if reset:
            st = drv.reset_port(port)
            if usb3 and not st.enabled:
                st = drv.reset_port(port, warm=True)
        if not st.connected:
            raise NoDevice(f"the device on port {port} went away during reset ({st})")
        if not st.enabled:
            raise NoDevice(f"port {port} did not enable after reset ({st})")
        if st.speed is None:
            raise NoDevice(f"port {port} reports an unknown speed ID {st.speed_id} ({st})")
        slot = drv.enable_slot(proto.slot_type if proto is not None else 0).check().slot
        dev = cls(drv, slot, port, st.speed, interrupter)
        try:
            dev.address(bsr_first)
            dev.read_descriptors(read_strings, config_index)
            if configure:
                dev.set_configuration()
        except BaseException:
            try:
                dev.disable()
            except XhciError:
                dev._forget()
            raise
        return dev

    def _contexts(self) -> tuple[Block, Block]:
        """The output (device) and input contexts, which the slot has until it is disabled."""
        if self.output is None or self.input is None:
            raise XhciError(f"slot {self.slot} is disabled: its contexts were given back")
        return self.output, self.input

    def _write_address_input(self) -> None:
        inp = self._contexts()[1]
        csz = self.csz
        inp.write(0, bytes(inp.size))
        inp.write_dwords(0, INPUT_CTRL_CTX.encode(add=0b11))
        inp.write_dwords(csz, SLOT_CTX.encode(
            route_string=self.route_string, speed=int(self.speed), context_entries=1,
            root_hub_port=self.port, interrupter=self.interrupter))
        inp.write_dwords(2 * csz, self.ep0.context_dwords())

    def address(self, bsr_first: bool = False) -> None:
        drv = self.drv
        inp = self._contexts()[1]
        self._write_address_input()
        if bsr_first:
            drv.address_device(self.slot, inp.addr, bsr=True).check()
            self._fix_ep0_max_packet(self.get_descriptor(D.DEVICE, 0, 8))
            self._write_address_input()
        drv.address_device(self.slot, inp.addr, bsr=False).check()
        self.ep0.ring.consumed_through(self.ep0.ring.enq_seq)

    def _fix_ep0_max_packet(self, head: bytes) -> None:
        if len(head) < 8:
            raise DescriptorError(f"device descriptor head is {len(head)} bytes: {head.hex()}")
        superspeed = self.speed >= Speed.SUPER
        mps = (1 << head[7] if head[7] < 16 else 0) if superspeed else head[7]
        if mps not in (8, 16, 32, 64, 512):
            raise DescriptorError(f"bMaxPacketSize0 {head[7]} is not valid at "
                                  f"{self.speed.label}")
        if mps != self.ep0.max_packet:
            self.ep0.max_packet = mps
            self.evaluate_ep0()

    def evaluate_ep0(self) -> CommandCompletion:
        """Evaluate Context with the ep0 context (new max packet size)."""
        inp = self._contexts()[1]
        inp.write(0, bytes(inp.size))
        inp.write_dwords(0, INPUT_CTRL_CTX.encode(add=0b10))
        inp.write_dwords(2 * self.csz, self.ep0.context_dwords())
        return self.drv.evaluate_context(self.slot, inp.addr).check()

    def chosen_config(self) -> D.ConfigDesc:
        """The configuration descriptor `read_descriptors` (or `set_configuration`) chose."""
        if self.config is None:
            raise XhciError("read the descriptors first")
        return self.config

    def read_descriptors(self, read_strings: bool = True, config_index: int = 0) -> None:
        if self.device_desc is None:
            self._fix_ep0_max_packet(self.get_descriptor(D.DEVICE, 0, 8))
        self.device_desc = D.DeviceDesc.parse(self.get_descriptor(D.DEVICE, 0, 18))
        self.configurations = []
        for i in range(max(1, self.device_desc.num_configurations)):
            head = self.get_descriptor(D.CONFIGURATION, i, 9)
            if len(head) < 4:
                raise DescriptorError(f"configuration {i} header: {head.hex()}")
            total = int.from_bytes(head[2:4], "little")
            self.configurations.append(D.ConfigDesc.parse(
                self.get_descriptor(D.CONFIGURATION, i, max(total, 9))))
        self.config = self.configurations[min(config_index, len(self.configurations) - 1)]
        if read_strings:
            dd = self.device_desc
            for idx in (dd.manufacturer_index, dd.product_index, dd.serial_index):
                if idx:
                    self.string(idx)

    def string(self, index: int, langid: int | None = None) -> str | None:
        """A string descriptor (None when the device stalls the request)."""
        if index == 0:
            return None
        if langid is None:
            if not self.langids:
                t = self.control(0x80, GET_DESCRIPTOR, D.STRING << 8, 0, 255, check=False)
                self.langids = D.parse_langids(t.data) if t.ok and len(t.data) >= 2 else []
            langid = self.langids[0] if self.langids else 0x0409
        t = self.control(0x80, GET_DESCRIPTOR, (D.STRING << 8) | index, langid, 255, check=False)
        s = D.parse_string(t.data) if t.ok and len(t.data) >= 2 else None
        self.strings[index] = s
        return s

    @property
    def manufacturer(self) -> str | None:
        return self.strings.get(self.device_desc.manufacturer_index) if self.device_desc else None

    @property
    def product(self) -> str | None:
        return self.strings.get(self.device_desc.product_index) if self.device_desc else None

    @property
    def serial(self) -> str | None:
        return self.strings.get(self.device_desc.serial_index) if self.device_desc else None

    def get_descriptor(self, dtype: int, index: int, length: int, windex: int = 0) -> bytes:
        return self.control(0x80, GET_DESCRIPTOR, (dtype << 8) | index, windex, length).data

    # ---- configuration (4.3.5, 4.6.6) ----------------------------------------------------------
    def _endpoint_for(self, e: D.EndpointDesc) -> GuestEndpoint:
        t = e.transfer_type
        xtype = XhciEpType({0: 4, 1: 1, 2: 2, 3: 3}[t] + (4 if e.is_in and t else 0))
        speed = self.speed
        ss = speed >= Speed.SUPER
        periodic = t in (1, 3)
        burst = mult = 0
        if ss:
            burst = e.max_burst
            if t == 1:
                mult = e.ss_attributes & 3
        elif speed == Speed.HIGH and periodic:
            burst = e.hs_extra_transactions
        interval = 0
        if periodic:
            b = e.interval
            if speed >= Speed.HIGH or t == 1:
                # bInterval is 2**(b-1) (micro)frames; FS isoch counts frames = 8 microframes.
                interval = min(max(b, 1), 16) - 1 + (3 if speed < Speed.HIGH else 0)
            else:
                # FS/LS interrupt: bInterval frames -> the largest 2**n microframes within.
                interval = min(max((max(b, 1) * 8).bit_length() - 1, 3), 10)
        if ss and periodic:
            esit = e.bytes_per_interval
        elif periodic:
            esit = e.max_packet * (burst + 1)
        else:
            esit = 0
        return GuestEndpoint(self, e.dci, xtype, e.max_packet, burst, mult, interval, esit, e)

    def set_configuration(self, value: int | None = None,
                          alternates: dict[int, int] | None = None) -> None:
        """Configure Endpoint with every endpoint of the configuration (alternate 0 unless
        chosen), then SET_CONFIGURATION (4.3.5: the command goes first)."""
        cfg = self.config
        if value is not None:
            for c in self.configurations:
                if c.value == value:
                    cfg = self.config = c
        if cfg is None:
            raise XhciError("read the descriptors before configuring")
        if self.configured_value:
            self.deconfigure()
        self.alternates = dict(alternates or {})
        new = [self._endpoint_for(e) for i in cfg.active_interfaces(self.alternates)
               for e in i.endpoints if e.transfer_type != 0]
        try:
            self._configure_endpoints(add=new)
        except BaseException:
            for ep in new:
                ep.free_memory()
            raise
        self.control(0x00, SET_CONFIGURATION, cfg.value, 0, 0)
        self.configured_value = cfg.value

    def _configure_endpoints(self, add: Sequence[GuestEndpoint] = (),
                             drop: Sequence[int] = ()) -> None:
        output, inp = self._contexts()
        csz = self.csz
        inp.write(0, bytes(inp.size))
        add_flags = 1
        for ep in add:
            add_flags |= 1 << ep.dci
        drop_flags = 0
        for dci in drop:
            drop_flags |= 1 << dci
        inp.write_dwords(0, INPUT_CTRL_CTX.encode(add=add_flags, drop=drop_flags))
        keep = [d for d in self.endpoints if d not in drop]
        entries = max([1] + keep + [ep.dci for ep in add])
        slot = output.dwords(0, 8)
        inp.write_dwords(csz, SLOT_CTX.encode(slot, context_entries=entries, slot_state=0,
                                              usb_address=0))
        for ep in add:
            inp.write_dwords((ep.dci + 1) * csz, ep.context_dwords())
        self.drv.configure_endpoint(self.slot, inp.addr).check()
        for dci in drop:
            gone = self.endpoints.pop(dci, None)
            if gone is not None:
                gone.free_memory()
        for ep in add:
            old = self.endpoints.get(ep.dci)
            if old is not None and old is not ep:
                old.free_memory()
            self.endpoints[ep.dci] = ep

    def deconfigure(self) -> None:
        """Configure Endpoint with Deconfigure set (4.6.6): back to the Addressed state, then
        SET_CONFIGURATION(0)."""
        self.drv.configure_endpoint(self.slot, 0, deconfigure=True).check()
        for dci in [d for d in self.endpoints if d != 1]:
            self.endpoints.pop(dci).free_memory()
        self.control(0x00, SET_CONFIGURATION, 0, 0, 0)
        self.configured_value = 0

    def set_interface(self, interface: int, alternate: int) -> None:
        """Switch an interface's alternate setting: drop its endpoints, add the new ones."""
        cfg = self.chosen_config()
        old = cfg.interface(interface, self.alternates.get(interface, 0))
        new_if = cfg.interface(interface, alternate)
        if new_if is None:
            raise XhciError(f"interface {interface} has no alternate setting {alternate}")
        drop = [e.dci for e in (old.endpoints if old else []) if e.dci in self.endpoints]
        add = [self._endpoint_for(e) for e in new_if.endpoints if e.transfer_type != 0]
        self._configure_endpoints(add=add, drop=drop)
        self.control(0x01, SET_INTERFACE, alternate, interface, 0)
        self.alternates[interface] = alternate

    def disable(self) -> None:
        """Disable Slot and give back everything the slot used."""
        try:
            self.drv.disable_slot(self.slot).check()
        finally:
            self._forget()

    def reset_device(self) -> CommandCompletion:
        """Reset Device command (4.6.11): back to the Default state, endpoints but ep0 gone."""
        c = self.drv.reset_device(self.slot)
        if c.ok:
            for dci in [d for d in self.endpoints if d != 1]:
                self.endpoints.pop(dci).free_memory()
            self.configured_value = 0
        return c

    def _forget(self) -> None:
        drv = self.drv
        if drv.devices.get(self.slot) is self:
            del drv.devices[self.slot]
            if drv.dcbaa is not None:
                drv.set_dcbaa_entry(self.slot, 0)
        for ep in self.endpoints.values():
            if ep.ring.blocks:
                ep.free_memory()
        self.endpoints = {}
        for b in (self.output, self.input):
            if b is not None:
                drv.alloc.free(b.addr)
        self.output = self.input = None

    # ---- contexts ----------------------------------------------------------------------------
    def slot_context(self) -> dict[str, int]:
        return SLOT_CTX.decode(self._contexts()[0].dwords(0, 8))

    def ep_context(self, dci: int) -> dict[str, int]:
        return EP_CTX.decode(self._contexts()[0].dwords(dci * self.csz, 8))

    @property
    def slot_state(self) -> SlotState | int:
        """The Slot State of the output context (the raw value if it is no state)."""
        st = self.slot_context()["slot_state"]
        try:
            return SlotState(st)
        except ValueError:
            return st

    @property
    def address_assigned(self) -> int:
        return self.slot_context()["usb_address"]

    # ---- transfers ---------------------------------------------------------------------------
    def _on_transfer_event(self, ev: Event) -> bool:
        ep = self.endpoints.get(ev.ep)
        return ep is not None and ep._on_event(ev)

    def endpoint(self, ep: int) -> GuestEndpoint:
        """An endpoint by address (0x81 = 1 IN); 0 is the default control endpoint."""
        if ep in (0, 0x80):
            return self.ep0
        dci = 2 * (ep & 0x0F) + (1 if ep & 0x80 else 0)
        e = self.endpoints.get(dci)
        if e is None:
            raise XhciError(f"slot {self.slot} has no endpoint {ep:#04x} configured "
                            f"(have {', '.join(x.name for x in self.endpoints.values())})")
        return e

    def submit_control(self, bm_request_type: int, b_request: int, w_value: int = 0,
                       w_index: int = 0, data_or_length: bytes | int = 0, *,
                       w_length: int | None = None, trb_sizes: Iterable[int] | None = None,
                       isp: bool = True, immediate: bool = False,
                       event_data: int | bool | None = None, interrupter: int | None = None,
                       ring: bool = True, on_complete: OnComplete | None = None) -> Transfer:
        """Queue a control transfer (4.11.2.2): Setup Stage (IDT, TRT), optional Data Stage
        (DIR, chained Normal TRBs when split), Status Stage (opposite direction, IOC)."""
        ep = self.ep0
        is_in = bool(bm_request_type & 0x80)
        if is_in:
            if not isinstance(data_or_length, int):
                raise ValueError("an IN request takes a length")
            length, data = data_or_length, None
        else:
            data = bytes(data_or_length)      # an int: that many zero bytes
            length = len(data)
        wl = length if w_length is None else w_length
        intr = self.interrupter if interrupter is None else interrupter
        buf = 0
        if length and not immediate:
            buf = ep._prepare_buffer(data, length)
        td = Transfer(ep, "control", is_in, length, buf)
        td.owns_buffer = bool(buf)
        td.on_complete = on_complete
        setup = struct.pack("<BBHHH", bm_request_type & 0xFF, b_request & 0xFF, w_value & 0xFFFF,
                            w_index & 0xFFFF, wl & 0xFFFF)
        td.setup = setup
        trt = (3 if is_in else 2) if length else 0
        trbs: list[_TrbDraft] = [(int.from_bytes(setup, "little"),
                                 placed(T.LENGTH, _SETUP_LENGTH) | placed(T.INTERRUPTER, intr),
                                 _SETUP | _IDT | placed(_TRT, trt))]
        td.offs.append(0)
        td.lens.append(0)
        if length:
            trbs += ep._data_trbs(td, buf, length, _DATA, is_in=is_in, trb_sizes=trb_sizes,
                                  isp=isp, ioc=False, immediate=data if immediate else None,
                                  event_data=event_data, interrupter=intr,
                                  first_extra=_DIR_IN if is_in else 0)
        status_in = not (length and is_in)
        trbs.append((0, placed(T.INTERRUPTER, intr),
                     _STATUS | _IOC | (_DIR_IN if status_in else 0)))
        td.offs.append(length)
        td.lens.append(0)
        ep._make_room(len(trbs))
        ep._queue(td, trbs)
        if ring:
            ep.ring_doorbell()
        return td

    def control(self, bm_request_type: int, b_request: int, w_value: int = 0, w_index: int = 0,
                data_or_length: bytes | int = 0, *, timeout_ns: int | None = None,
                check: bool = True, recover: bool = True,
                **kw: Unpack[ControlOptions]) -> Transfer:
        """A control transfer, waited for.  A stall is recovered from (Reset Endpoint + Set TR
        Dequeue) unless recover=False; check=True raises TransferFailed on any error."""
        td = self.submit_control(bm_request_type, b_request, w_value, w_index, data_or_length,
                                 **kw)
        td.wait(timeout_ns)
        if recover and not td.ok and td.cc is not None and self.ep0.failed is td:
            self.ep0.recover()
        if check:
            td.check()
        return td

    def _sync(self, ep: int, want_in: bool, types: tuple[int, ...], what: str,
              data: bytes | None = None, length: int | None = None,
              timeout_ns: int | None = None, check: bool = True, recover: bool = True,
              isoch: IsochStart | None = None, **kw: Unpack[TdOptions]) -> Transfer:
        ep_addr = (ep | 0x80) if want_in else (ep & 0x7F)
        e = self.endpoint(ep_addr)
        if e.xtype.usb_type not in types:
            raise XhciError(f"{e.name} is a {e.xtype.name.lower()} endpoint, not {what}")
        td = e.submit(data, length, isoch=isoch, **kw)
        td.wait(timeout_ns)
        if recover and not td.ok and e.failed is td:
            e.recover()
        if check:
            td.check()
        return td

    def bulk_out(self, ep: int, data: bytes, **kw: Unpack[TransferOptions]) -> Transfer:
        return self._sync(ep, False, (2,), "bulk", data=data, **kw)

    def bulk_in(self, ep: int, length: int, **kw: Unpack[TransferOptions]) -> Transfer:
        return self._sync(ep, True, (2,), "bulk", length=length, **kw)

    def interrupt_out(self, ep: int, data: bytes, **kw: Unpack[TransferOptions]) -> Transfer:
        return self._sync(ep, False, (3,), "interrupt", data=data, **kw)

    def interrupt_in(self, ep: int, length: int, **kw: Unpack[TransferOptions]) -> Transfer:
        return self._sync(ep, True, (3,), "interrupt", length=length, **kw)

    def isoch_out(self, ep: int, data: bytes, *, frame_id: int | None = None,
                  sia: bool | None = None, **kw: Unpack[TransferOptions]) -> Transfer:
        return self._sync(ep, False, (1,), "isochronous", data=data,
                          isoch=IsochStart(frame_id=frame_id, sia=sia), **kw)

    def isoch_in(self, ep: int, length: int, *, frame_id: int | None = None,
                 sia: bool | None = None, **kw: Unpack[TransferOptions]) -> Transfer:
        return self._sync(ep, True, (1,), "isochronous", length=length,
                          isoch=IsochStart(frame_id=frame_id, sia=sia), **kw)

    def clear_halt(self, ep: int) -> None:
        """Recover a halted endpoint and clear the device's halt feature."""
        self.endpoint(ep).recover(clear_halt=True)

    def __repr__(self) -> str:
        d = self.device_desc
        ident = f" {d.vendor:04x}:{d.product:04x}" if d else ""
        name = f" '{self.product}'" if self.product else ""
        return (f"Device(slot {self.slot} port {self.port} {self.speed.label}{ident}{name}"
                f"{'' if self.connected else ' disconnected'})")
