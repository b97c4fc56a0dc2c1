"""The tracer: a hooks observer that writes everything the controller announces to pcapng.

Interface 0 carries the xHCI-level records (`records.py`, link type USER0, decoded by the
shipped Wireshark dissector); one interface per USB bus carries usbmon records (link type 220)
that stock Wireshark, tshark and tcpdump decode.  Annotations (notes of fault rules, the
console's own marks) become packet comments.

Records are built on the controller's thread and copied there into a queue of fixed-size
chunks; a small writer thread writes out what was filled every `flush_interval` seconds (and
on stop), straight from the chunks, whole blocks only, so a process killed mid-capture leaves
a file that is valid up to the last flush.  The queue is bounded: if the disk or the FIFO
reader cannot keep up, records are dropped and counted rather than memory growing without end.

The hot path is cheap on purpose (bench/trace_overhead.py measures it): each frequent record is
packed together with its pcapng block header in one `struct` call (`records.EPB_*`); a
transfer's data is copied once, from the guest's buffers into a chunk; chunks are reused, so
a busy capture does not keep asking the system for fresh memory; and nothing takes a lock:
the controller's thread only fills chunks and publishes how far (`_Chunk.end`), the writer only
writes up to there and hands finished chunks back.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import platform
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import BinaryIO, Literal, Protocol, overload

from xhcidbg.emu.hooks import Hooks, InterruptSignal, MmioAccess, TransferRecord
from xhcidbg.emu.memory import GuestMemory
from xhcidbg.emu.timing import Scheduler
from xhcidbg.emu.trb import TrbType

from . import pcapng, records
from .filters import CaptureFilter, dci_of_address
from .records import (
    CTX_INPUT_CONTROL,
    CTX_SLOT,
    EPB_DOORBELL,
    EPB_EVENT,
    EPB_INTERRUPT,
    EPB_MMIO_HEAD,
    EPB_PORT,
    EPB_TRB,
    HEAD,
    Kind,
    Ring,
)
from .urb import urb_interval, usbmon_block, usbmon_record

DEFAULT_SNAPLEN = 65535        # bytes per usbmon record, header included (as tcpdump)
DEFAULT_BUSES = {1: "USB 2.0 root hub", 2: "USB 3 root hub"}


CHUNK_SIZE = 1 << 20           # the unit of the record queue
SPARE_CHUNKS = 4               # finished chunks kept for reuse


class _Chunk:
    """A piece of the record queue.  The controller's thread fills `buf` and then publishes
    `end`; the writer writes `buf[written:end]`.  A chunk is only filled further while it is
    the last one in the queue."""

    __slots__ = ("buf", "end", "limit", "rotate", "written")

    def __init__(self, size: int = CHUNK_SIZE):
        # a memoryview: slice assignment into it copies straight in (a bytearray's own would
        # first copy anything that is not a bytearray into a temporary one)
        self.buf = memoryview(bytearray(size))
        self.end = 0
        self.limit = size              # the fast path fills up to here (0: never, see _room)
        self.written = 0
        self.rotate = 0                # > 0: start the next file after this chunk, with
                                       # that many of the tracer's headers at its top

    def reset(self) -> _Chunk:
        self.end = self.written = self.rotate = 0
        self.limit = len(self.buf)
        return self


_EPB = pcapng.EPB
_M32, _M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
_H_MMIO, _H_DOORBELL, _H_TRB = HEAD[Kind.MMIO], HEAD[Kind.DOORBELL], HEAD[Kind.TRB]
_H_EVENT, _H_INTERRUPT, _H_PORT = HEAD[Kind.EVENT], HEAD[Kind.INTERRUPT], HEAD[Kind.PORT]
_TRANSFER_EVENT, _PORT_STATUS_CHANGE = int(TrbType.TRANSFER_EVENT), int(TrbType.PORT_STATUS_CHANGE)
_MMIO_NAMES_MAX = 4096         # register names remembered with their ready block tails
_MMIO_HEAD_LEN = EPB_MMIO_HEAD.size

# commands after which the tracer reads the contexts they changed (as Linux's tracepoints do)
_CTX_COMMANDS = frozenset((TrbType.ADDRESS_DEVICE, TrbType.CONFIGURE_ENDPOINT,
                           TrbType.EVALUATE_CONTEXT, TrbType.RESET_ENDPOINT,
                           TrbType.STOP_ENDPOINT, TrbType.SET_TR_DEQUEUE, TrbType.RESET_DEVICE))

_EP_ONLY = frozenset((TrbType.RESET_ENDPOINT, TrbType.STOP_ENDPOINT))   # Linux traces no slot ctx


def _sets_address(xfer) -> bool:
    """The SET_ADDRESS an xHC sends by itself for an Address Device command: no TD on a
    transfer ring behind it (`context` is None), standard request 5 to a device.

    The usbmon interfaces leave it out, as Linux's usbmon does on real xHCI hardware: there
    the kernel never submits an URB for SET_ADDRESS, the controller issues it inside the
    command, so a capture from a real machine has none either and ours compares line for
    line.  It is not lost: the Address Device command and its completion (and its contexts)
    are on the xHCI interface, and `kind=xurb` puts the request itself there too, with its
    slot.  A SET_ADDRESS the guest queues on a transfer ring (which Linux never does) has a
    TD, and is written like any other request."""
    setup = xfer.setup
    return setup is not None and len(setup) >= 2 and setup[0] == 0x00 and setup[1] == 0x05


class TracedController(Protocol):
    """What the tracer reads of the controller it traces (an `XhciController`)."""

    hooks: Hooks
    mem: GuestMemory
    scheduler: Scheduler
    context_size: int
    dcbaap: int

    def register_name(self, offset: int) -> str: ...


class TraceError(Exception):
    """A capture could not be started or written; the message says what to do."""


@dataclass
class TraceStatus:
    path: str
    running: bool
    filter: str
    records: int = 0
    bytes_written: int = 0
    dropped: int = 0
    files: list[str] = field(default_factory=list)
    error: str = ""

    def __str__(self) -> str:
        state = "tracing" if self.running else "stopped"
        s = (f"{state} to {self.path} ({self.filter}): {self.records} records, "
             f"{self.bytes_written} bytes written")
        if len(self.files) > 1:
            s += f", {len(self.files)} files"
        if self.dropped:
            s += f", {self.dropped} records DROPPED (writer could not keep up)"
        if self.error:
            s += f"; error: {self.error}"
        return s


def _guarded(fn: Callable) -> Callable:
    """Hook callbacks must never raise into the controller: a tracer bug becomes a status
    error, not a dead backend."""
    @functools.wraps(fn)
    def wrapper(self, *args):
        try:
            fn(self, *args)
        except Exception as e:
            self._error = f"{fn.__name__}: {type(e).__name__}: {e}"
    return wrapper


class Tracer:
    """Capture what `controller` does to `path` (a file or a FIFO).

    filters: a `CaptureFilter`, or its text form (`"slot=1 kind=trb,urb"`).
    max_bytes / max_seconds: start a new file (`name_00001.pcapng`, ...) after that much;
    max_files: keep only that many of them (a ring buffer).
    """

    def __init__(self, controller: TracedController | None = None,
                 path: str | os.PathLike[str] = "xhcidbg.pcapng",
                 filters: CaptureFilter | str | list[str] | None = None, *,
                 snaplen: int = DEFAULT_SNAPLEN, flush_interval: float = 0.2,
                 max_bytes: int | None = None, max_seconds: float | None = None,
                 max_files: int | None = None, buses: dict[int, str] | None = None,
                 clock: Callable[[], int] | None = None, max_buffer: int = 64 << 20,
                 comment: str = ""):
        self.controller = controller
        self.path = Path(path)
        self.filter = (filters if isinstance(filters, CaptureFilter)
                       else CaptureFilter.parse(filters))
        if snaplen < 64:
            raise TraceError("snaplen must hold at least the 64-byte usbmon header")
        self.snaplen = snaplen
        self.flush_interval = flush_interval
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.max_files = max_files
        self.max_buffer = max_buffer
        self.comment = comment
        self._rotating = bool(max_bytes or max_seconds)
        self._fifo = self.path.exists() and stat.S_ISFIFO(self.path.stat().st_mode)
        if self._fifo and (self._rotating or max_files):
            raise TraceError(f"{self.path} is a FIFO: it cannot be rotated")
        # timestamps: self._now() + self._ts_offset (ns since the epoch)
        self._now, self._ts_offset = self._timebase(clock)
        self._io_lock = threading.Lock()     # the file
        # The record queue: the controller's thread fills the last chunk and appends new ones,
        # the writer pops written ones and hands them back through `_spare`.  Each counter has
        # one writing thread, so none needs a lock.
        self._chunk = _Chunk()
        self._chunks: deque[_Chunk] = deque([self._chunk])
        self._spare: deque[_Chunk] = deque()
        self._max_chunks = max(2, max_buffer // CHUNK_SIZE)
        self._records = 0                    # (controller's thread)
        self._dropped = 0                    # (controller's thread)
        self._written = 0                    # (writer)
        self._error = ""
        self._headers: list[bytes] = []      # SHB and IDBs: repeated at the top of every file
        self._start_headers = 0              # how many of them there were at start
        self._bus_iface: dict[int, int] = {}
        self._file: BinaryIO | None = None
        self._file_bytes = 0
        self._header_bytes = 0
        self._file_started = 0.0
        self._files: list[Path] = []            # the files that are still there
        self._file_index = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: SimpleNamespace | None = None
        self._running = False
        # what the hot paths ask of the filter, answered once
        f = self.filter
        self._narrow = any(x is not None for x in (f.buses, f.ports, f.slots, f.dcis))
        self._want_urb = "urb" in f.kinds
        self._want_xurb = "xurb" in f.kinds
        self._max_data = self.snaplen - 64
        # what the tracer learns from the traffic to read contexts and resolve ports
        self._mmio_names: dict[int, str] = {}     # offset -> register name
        self._slot_port: dict[int, int] = {}
        self._slot_fs_ls: dict[int, bool] = {}     # full- or low-speed device in the slot
        self._ring_cache: dict[str, tuple[int, int, int, int]] = {}
        self._mmio_tails: dict[str, tuple[int, int, bytes, bool]] = {}
        self._inflight: set[int] = set()         # URB ids whose submission was traced
        self._started_ns = 0
        self._initial_buses = dict(DEFAULT_BUSES if buses is None else buses)

    # ---- public API ------------------------------------------------------------------------
    def start(self) -> Tracer:
        if self._running:
            raise TraceError("this tracer is already running")
        self._headers = [pcapng.section_header(
            hardware=platform.machine(), os_name=f"{platform.system()} {platform.release()}",
            application="xhcidbg", comment=self.comment)]
        self._headers.append(pcapng.interface_description(
            records.LINKTYPE, 0xFFFF, "xhci", "xhcidbg xHCI controller records"))
        for bus, desc in sorted(self._initial_buses.items()):
            self._add_bus(bus, desc, announce=False)
        self._file_bytes = self._header_bytes = sum(map(len, self._headers))
        self._start_headers = len(self._headers)
        if self._rotating:
            self._chunk.limit = 0
        if not self._fifo:
            self._open_next()            # fail here, in the caller, if the path is unusable
        self._stop.clear()
        self._started_ns = self.controller.scheduler.now_ns() if self.controller else 0
        self._running = True
        self._thread = threading.Thread(target=self._writer, name="xhcidbg-trace", daemon=True)
        self._thread.start()
        if self.controller is not None:
            self._observer = self._make_observer()
            self.controller.hooks.attach(self._observer)
        return self

    def stop(self) -> TraceStatus:
        if self._running:
            if self._observer is not None:
                assert self.controller is not None   # an observer means a controller
                self.controller.hooks.detach(self._observer)
                self._observer = None
            self._running = False
            self._stop.set()
            self._wake.set()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            self.flush()
            with self._io_lock:
                if self._fifo and self._file is None:
                    self._error = (f"no reader ever opened the FIFO; {self._records} "
                                   f"records were not delivered")
                if self._file is not None:
                    self._file.close()
                    self._file = None
        return self.status()

    def status(self) -> TraceStatus:
        return TraceStatus(str(self.path), self._running, str(self.filter), self._records,
                           self._written, self._dropped, [str(p) for p in self._files],
                           self._error)

    def annotate(self, text: str, level: str = "info") -> None:
        """Put a mark in the trace (a LOG record whose packet comment is `text`)."""
        if "log" in self.filter.kinds:
            self._emit(0, records.log(level, text), comment=text)

    def fault(self, rule: int, match: int, text: str) -> None:
        """An injection of the fault engine: a FAULT record (filter it in Wireshark with
        `xhci.fault.rule`) whose packet comment is `text`."""
        if "fault" in self.filter.kinds:
            self._emit(0, records.fault(rule, match, text), comment=text)

    def __enter__(self) -> Tracer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- hook callbacks --------------------------------------------------------------------
    # The frequent ones (mmio, doorbell, trb, event, interrupt, urb) pack their block in one
    # call and catch their own errors; the rare ones go through `_guarded` and `_emit`.
    def _make_observer(self) -> SimpleNamespace:
        """Subscribe only what the filter keeps, so a filtered-out kind costs nothing."""
        k = self.filter.kinds
        obs = SimpleNamespace()
        wanted = {"mmio": self.on_mmio, "doorbell": self.on_doorbell, "trb": self.on_trb,
                  "event": self.on_event_posted, "port": self.on_port,
                  "interrupt": self.on_interrupt, "state": self.on_state, "log": self.on_log}
        for kind, fn in wanted.items():
            if kind in k:
                setattr(obs, fn.__name__, fn)
        if k & {"command", "context"}:
            obs.on_command = self.on_command
        if k & {"urb", "xurb"}:
            obs.on_urb_submit = self.on_urb_submit
            obs.on_urb_retired = self.on_urb_retired
        return obs

    def _failed(self, where: str, e: Exception) -> None:
        """Hook callbacks never raise into the controller: a tracer bug becomes a status
        error, not a dead backend."""
        self._error = f"{where}: {type(e).__name__}: {e}"

    def _mmio_tail(self, name: str) -> tuple[int, int, bytes, bool]:
        """(block length, record length, register name + padding + block length, whether
        the filter keeps it) of an MMIO record naming `name`."""
        text = name.encode()
        n = records.LAYOUTS[Kind.MMIO].size + len(text)
        total = pcapng.EPB_OVERHEAD + (n + 3 & ~3)
        keep = True
        if self.filter.ports is not None and name.startswith("PORT") and name.endswith("]"):
            keep = int(name[name.index("[") + 1:-1]) in self.filter.ports
        tail = (total, n, text + pcapng.EPB_TAIL[n & 3].pack(total), keep)
        if len(self._mmio_tails) < _MMIO_NAMES_MAX:
            self._mmio_tails[name] = tail
        return tail

    def on_mmio(self, access: MmioAccess) -> None:
        try:
            name = self._mmio_names.get(access.offset)
            if name is None:
                name = self._register_name(access.offset)
            total, n, tail, keep = self._mmio_tails.get(name) or self._mmio_tail(name)
            if not keep:
                return
            c = self._chunk
            if c.end + total > c.limit:
                room = self._room(total)
                if room is None:
                                return
                c = room
            at = c.end
            ts = self._now() + self._ts_offset
            EPB_MMIO_HEAD.pack_into(c.buf, at, _EPB, total, 0, ts >> 32, ts & _M32, n, n,
                                    _H_MMIO, access.offset & _M32,
                                    access.size & 0xFF | access.write << 8, access.value & _M64)
            c.buf[at + _MMIO_HEAD_LEN:at + total] = tail
            c.end = at + total                   # published: the writer may take it now
            self._records += 1
        except Exception as e:
            self._failed("on_mmio", e)

    def _register_name(self, offset: int) -> str:
        """The register's name, from the controller's register table (looked up here, by
        the observer, once per offset: the controller's MMIO path never builds names)."""
        name = self.controller.register_name(offset) if self.controller else f"BAR0+{offset:#x}"
        if len(self._mmio_names) < _MMIO_NAMES_MAX:
            self._mmio_names[offset] = name
        return name

    def on_doorbell(self, slot: int, target: int, stream: int) -> None:
        try:
            if self._narrow and slot:
                f = self.filter
                if not (f.slot_ok(slot, self._slot_port.get(slot)) and f.dci_ok(target)):
                    return
            c = self._chunk
            if c.end + 44 > c.limit:
                room = self._room(44)
                if room is None:
                                return
                c = room
            ts = self._now() + self._ts_offset
            EPB_DOORBELL.pack_into(c.buf, c.end, _EPB, 44, 0, ts >> 32, ts & _M32, 12, 12,
                                   _H_DOORBELL, slot & 0xFF,
                                   target & 0xFF | (stream & 0xFFFF) << 16, 44)
            c.end += 44
            self._records += 1
        except Exception as e:
            self._failed("on_doorbell", e)

    def _ring(self, ring: str) -> tuple[int, int, int, int]:
        """(ring kind, slot, DCI, the record's slot/dci/ring/stream dword) of a ring's name."""
        hit = self._ring_cache.get(ring)
        if hit is None:
            if ring == "cmd":
                hit = (Ring.COMMAND, 0, 0, 0)          # the command record carries no slot
            else:
                slot, dci, stream = ([int(p) for p in ring.split("/")] + [0, 0])[:3]
                hit = (Ring.TRANSFER, slot, dci, slot & 0xFF | (dci & 0x1F) << 8
                       | Ring.TRANSFER << 13 | (stream & 0xFFFF) << 16)
            self._ring_cache[ring] = hit
        return hit

    def on_trb(self, ring: str, trb) -> None:
        try:
            kind, slot, dci, info = self._ring_cache.get(ring) or self._ring(ring)
            if self._narrow:
                if kind == Ring.COMMAND:
                    slot = trb.control >> 24            # the slot the command is about
                f = self.filter
                if slot and not (f.slot_ok(slot, self._slot_port.get(slot)) and f.dci_ok(dci)):
                    return
            c = self._chunk
            if c.end + 64 > c.limit:
                room = self._room(64)
                if room is None:
                                return
                c = room
            ts = self._now() + self._ts_offset
            EPB_TRB.pack_into(c.buf, c.end, _EPB, 64, 0, ts >> 32, ts & _M32, 32, 32, _H_TRB,
                              trb.addr & _M64, info, trb.param, trb.status, trb.control, 64)
            c.end += 64
            self._records += 1
        except Exception as e:
            self._failed("on_trb", e)

    @_guarded
    def on_command(self, cmd) -> None:
        trb = cmd.trb
        ttype = trb.type
        slot = cmd.slot or (trb.control >> 24)
        f = self.filter
        if slot and not f.slot_ok(slot, self._slot_port.get(slot)):
            return
        if "command" in f.kinds:
            self._emit(0, records.command(trb.addr, cmd.cc, slot, cmd.param, trb.dwords),
                       comment=cmd.note)
        if "context" in f.kinds and ttype in _CTX_COMMANDS and slot:
            self._snapshot_contexts(ttype, slot, trb)

    def _event_wanted(self, dw: list[int]) -> bool:
        f = self.filter
        slot = dw[3] >> 24
        ttype = dw[3] >> 10 & 0x3F
        if slot and not f.slot_ok(slot, self._slot_port.get(slot)):
            return False
        if ttype == _TRANSFER_EVENT and not f.dci_ok(dw[3] >> 16 & 0x1F):
            return False
        return not (ttype == _PORT_STATUS_CHANGE and f.ports is not None
                    and dw[0] >> 24 not in f.ports)

    def on_event_posted(self, ev) -> None:
        try:
            dw = ev.dwords
            if self._narrow and not self._event_wanted(dw):
                return
            if ev.note:
                self._emit(0, records.event(ev.addr, ev.interrupter, ev.drop, dw),
                           comment=ev.note)
                return
            c = self._chunk
            if c.end + 64 > c.limit:
                room = self._room(64)
                if room is None:
                                return
                c = room
            ts = self._now() + self._ts_offset
            EPB_EVENT.pack_into(c.buf, c.end, _EPB, 64, 0, ts >> 32, ts & _M32, 32, 32,
                                _H_EVENT, ev.addr & _M64, ev.interrupter & 0x3FF | ev.drop << 16,
                                dw[0], dw[1], dw[2], dw[3], 64)
            c.end += 64
            self._records += 1
        except Exception as e:
            self._failed("on_event_posted", e)

    def on_port(self, port: int, old: int, new: int) -> None:
        try:
            if self.filter.ports is None or port in self.filter.ports:
                ts = self._now() + self._ts_offset
                self._put(EPB_PORT.pack(_EPB, 48, 0, ts >> 32, ts & _M32, 16, 16, _H_PORT,
                                        port & 0xFF, old & _M32, new & _M32, 48))
        except Exception as e:
            self._failed("on_port", e)

    def on_interrupt(self, sig: InterruptSignal) -> None:
        interrupter = sig.interrupter
        try:
            c = self._chunk
            if c.end + 40 > c.limit:
                room = self._room(40)
                if room is None:
                                return
                c = room
            ts = self._now() + self._ts_offset
            EPB_INTERRUPT.pack_into(c.buf, c.end, _EPB, 40, 0, ts >> 32, ts & _M32, 8, 8,
                                    _H_INTERRUPT, interrupter & 0xFFFF, 40)
            c.end += 40
            self._records += 1
        except Exception as e:
            self._failed("on_interrupt", e)

    @_guarded
    def on_state(self, kind: str, ident: str, old: str, new: str) -> None:
        self._emit(0, records.state(kind, ident, old, new))

    @_guarded
    def on_log(self, level: str, message: str) -> None:
        self._emit(0, records.log(level, message))

    def _urb_wanted(self, rec: TransferRecord) -> bool:
        f = self.filter
        if f.buses is not None and rec.bus not in f.buses:
            return False
        if rec.slot and not f.slot_ok(rec.slot, self._slot_port.get(rec.slot)):
            return False
        return f.dci_ok(rec.dci or dci_of_address(rec.xfer.endpoint))

    def on_urb_submit(self, rec: TransferRecord) -> None:
        try:
            if self._narrow and not self._urb_wanted(rec):
                return
            inflight = self._inflight
            if len(inflight) > 1 << 16:        # transfers dropped without completion
                inflight.clear()
            inflight.add(rec.xfer.id)
            self._emit_urb(rec, "S")
        except Exception as e:
            self._failed("on_urb_submit", e)

    def on_urb_retired(self, rec: TransferRecord) -> None:
        """The completion goes into the trace when the controller has posted it, with the
        completion code it posted (a fault rule's rewrite included)."""
        try:
            if self._narrow and not self._urb_wanted(rec):
                return
            inflight = self._inflight
            if rec.xfer.id in inflight:
                inflight.discard(rec.xfer.id)
                event = "C"
            elif rec.submitted_ns < self._started_ns:
                event = "C"                          # submitted before tracing began
            else:
                event = "E"                          # never handed to a device: a submit error
            self._emit_urb(rec, event)
        except Exception as e:
            self._failed("on_urb_retired", e)

    def _emit_urb(self, rec: TransferRecord, event: str) -> None:
        ts = self._now() + self._ts_offset
        xfer = rec.xfer
        interval = xfer.interval
        if interval:
            interval = urb_interval(interval, self._slot_fs_ls.get(rec.slot, False))
        note = rec.note
        if self._want_urb and not (rec.internal and _sets_address(xfer)):
            iface = self._bus_iface.get(rec.bus)
            if iface is None:
                iface = self._add_bus(rec.bus, f"bus {rec.bus}")
            self._put_pieces(*usbmon_block(rec, event, ts, self._max_data, interval, iface,
                                           pcapng.comment_option(note) if note else b""))
        if self._want_xurb:
            data, orig = usbmon_record(rec, event, ts, self._max_data, interval)
            # its own URB id (top bit set), so Wireshark pairs each copy with its own submit
            copy = (xfer.id | 1 << 63).to_bytes(8, "little") + data[8:]
            self._emit(0, records.urb(rec.slot, rec.dci, xfer.stream, copy), orig + 8, note, ts)

    # ---- contexts --------------------------------------------------------------------------
    def _context_size(self) -> int:
        return self.controller.context_size if self.controller else 32

    def _snapshot_contexts(self, ttype: int, slot: int, trb) -> None:
        """Read the contexts a command changed, as Linux's xhci_handle_cmd_* tracepoints show
        them.  Guest memory is read defensively: a bad pointer just means no record; and by
        peeking, so that the tracer's reading is not announced as the controller's DMA."""
        if self.controller is None:
            return
        mem = self.controller.mem
        dcbaap = self.controller.dcbaap
        stride = self._context_size()
        try:
            out = int.from_bytes(mem.peek(dcbaap + 8 * slot, 8), "little") & ~0x3F if dcbaap else 0
            dcis: list[int] = []
            if ttype in (TrbType.ADDRESS_DEVICE, TrbType.CONFIGURE_ENDPOINT,
                         TrbType.EVALUATE_CONTEXT):
                inp = trb.param & ~0xF
                ctrl = mem.peek(inp, 32)
                self._context(inp, slot, CTX_INPUT_CONTROL, ttype, ctrl)
                add = int.from_bytes(ctrl[4:8], "little")
                dcis = [1] if ttype != TrbType.CONFIGURE_ENDPOINT else \
                    [d for d in range(2, 32) if add >> d & 1]
            elif ttype in (TrbType.RESET_ENDPOINT, TrbType.STOP_ENDPOINT, TrbType.SET_TR_DEQUEUE):
                dcis = [trb.control >> 16 & 0x1F]
            if not out:
                return
            if ttype not in _EP_ONLY:
                slot_ctx = mem.peek(out, 32)
                self._context(out, slot, CTX_SLOT, ttype, slot_ctx)
                if slot_ctx[6]:
                    self._slot_port[slot] = slot_ctx[6]
                self._slot_fs_ls[slot] = slot_ctx[2] >> 4 & 0xF in (1, 2)
            for dci in dcis:
                if 1 <= dci <= 31:
                    at = out + stride * dci
                    self._context(at, slot, dci, ttype, mem.peek(at, 32))
        except Exception:
            return

    def _context(self, addr: int, slot: int, dci: int, reason: int, raw: bytes) -> None:
        dw = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 32, 4)]
        self._emit(0, records.context(addr, slot, dci, reason, dw))

    # ---- queue and files -------------------------------------------------------------------
    def _timebase(self, clock: Callable[[], int] | None) -> tuple[Callable[[], int], int]:
        if clock is not None:
            return clock, 0
        if self.controller is None:
            return time.time_ns, 0
        sched = self.controller.scheduler
        # wall-clock start, then the controller's own (possibly virtual) time: reproducible
        # intervals in tests, real ones with a real VM (the same clock as the scheduler's,
        # read without going through it)
        now = sched.now_ns if sched.virtual else time.monotonic_ns
        return now, time.time_ns() - sched.now_ns()

    def _clock(self) -> int:
        return self._now() + self._ts_offset

    def _add_bus(self, bus: int, desc: str, announce: bool = True) -> int:
        iface = len(self._headers) - 1          # headers = SHB + one IDB per interface
        idb = pcapng.interface_description(pcapng.LINKTYPE_USB_LINUX_MMAPPED, self.snaplen,
                                           f"usbmon{bus}", f"xhcidbg {desc} (bus {bus})")
        self._headers.append(idb)
        self._bus_iface[bus] = iface
        if announce:                            # not a record: never dropped, not counted
            c = self._chunk
            if c.end + len(idb) > len(c.buf):
                c = self._next_chunk(len(idb), force=True)
            c.buf[c.end:c.end + len(idb)] = idb
            c.end += len(idb)
        return iface

    def _emit(self, iface: int, data: bytes, orig: int | None = None, comment: str = "",
              ts: int | None = None) -> None:
        self._put(pcapng.enhanced_packet(iface, self._clock() if ts is None else ts, data, orig,
                                         comment))

    # Queuing a block of n bytes: the fast path writes it at the current chunk's `end` when
    # it fits below `limit`, then publishes the new `end`; anything else goes through `_room`.
    def _put(self, block: bytes) -> None:
        """Queue one whole block (or count it dropped when the queue is full)."""
        c = self._chunk
        n = len(block)
        if c.end + n > c.limit:
            room = self._room(n)
            if room is None:
                        return
            c = room
        c.buf[c.end:c.end + n] = block
        c.end += n                           # published: the writer may take it now
        self._records += 1

    def _put_pieces(self, total: int, pieces) -> None:
        """`_put` for a block given in pieces (`total` bytes): each is copied once, here."""
        c = self._chunk
        if c.end + total > c.limit:
            room = self._room(total)
            if room is None:
                        return
            c = room
        buf, at = c.buf, c.end
        for p in pieces:
            end = at + len(p)
            buf[at:end] = p
            at = end
        c.end = at
        self._records += 1

    def _room(self, n: int) -> _Chunk | None:
        """The slow path of queuing `n` bytes: file rotation (every block comes here when
        rotating), a new chunk when this one is full, or None when the queue is at its bound
        (the record is counted as dropped)."""
        c = self._chunk
        if self._rotating:
            if self._file_bytes > self._header_bytes and (
                    (self.max_bytes and self._file_bytes + n > self.max_bytes) or
                    (self.max_seconds and time.monotonic() - self._file_started
                     >= self.max_seconds)):
                c.rotate = len(self._headers)    # the next file starts after this chunk
                c = self._next_chunk(n, force=True)
                self._file_bytes = self._header_bytes = sum(map(len, self._headers))
                self._file_started = time.monotonic()
            self._file_bytes += n
            if c.end + n <= len(c.buf):
                return c
        return self._next_chunk(n)

    @overload
    def _next_chunk(self, need: int, force: Literal[True]) -> _Chunk: ...
    @overload
    def _next_chunk(self, need: int, force: bool = False) -> _Chunk | None: ...

    def _next_chunk(self, need: int, force: bool = False) -> _Chunk | None:
        """Start a new chunk with room for `need` bytes; None (and the record counted as
        dropped) if the queue is at its bound and `force` is not set."""
        if len(self._chunks) >= self._max_chunks and not force:
            self._dropped += 1
            return None
        if need <= CHUNK_SIZE and self._spare:
            c = self._spare.pop().reset()
        else:
            c = _Chunk(max(CHUNK_SIZE, need))
        if self._rotating:
            c.limit = 0                      # every block takes the slow path: it counts
        self._chunks.append(c)               # from now on, the previous chunk is final
        self._chunk = c
        self._wake.set()                     # a full chunk is waiting: write it now
        return c

    def _writer(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write out everything queued so far (whole blocks only)."""
        with self._io_lock:
            chunks = self._chunks
            while True:
                c = chunks[0]
                final = len(chunks) > 1      # asked before `end`: then `end` will not move
                end = c.end
                if end > c.written:
                    if self._file is None and self._fifo and not self._open_fifo_safely():
                        return               # no reader yet: keep everything for later
                    if self._file is not None:
                        try:
                            self._write(c.buf[c.written:end])
                        except OSError as e:
                            self._write_failed(e)
                    c.written = end
                if not final:
                    return
                chunks.popleft()
                if c.rotate and self._file is not None:
                    try:
                        self._open_next(c.rotate)
                    except (OSError, TraceError) as e:
                        self._write_failed(e)
                if len(c.buf) == CHUNK_SIZE and len(self._spare) < SPARE_CHUNKS:
                    self._spare.append(c)

    def _open_fifo_safely(self) -> bool:
        try:
            return self._open_fifo()
        except OSError as e:
            self._write_failed(e)
            return False

    def _write_failed(self, e: Exception) -> None:
        if isinstance(e, OSError) and e.errno == errno.EPIPE:
            self._error = "the FIFO's reader went away; tracing stopped writing"
        else:
            self._error = f"{type(e).__name__}: {e}"
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = None
        self._fifo = False       # do not reopen: stop writing, keep counting

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        file = self._file
        assert file is not None              # only called with a file open
        while view:                      # a signal may cut a write to a FIFO short
            done = file.write(view)
            self._written += done
            view = view[done:]

    def _open_fifo(self) -> bool:
        """Open the FIFO once a reader (tshark -i, wireshark -k -i) has opened it."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return False
            raise
        os.set_blocking(fd, True)
        self._file = open(fd, "wb", buffering=0)  # noqa: SIM115 - open while tracing
        self._files.append(self.path)
        # the interfaces added since start are in the queue already
        self._write(b"".join(self._headers[:self._start_headers]))
        return True

    def _next_path(self) -> Path:
        if not self._rotating:
            return self.path
        self._file_index += 1
        return self.path.with_name(f"{self.path.stem}_{self._file_index:05d}"
                                   f"{self.path.suffix or '.pcapng'}")

    def _open_next(self, headers: int | None = None) -> None:
        """Start the next file with the first `headers` of the tracer's headers (all)."""
        if self._file is not None:
            self._file.close()
        path = self._next_path()
        try:
            # unbuffered: each flush is one write() of whole blocks
            self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - open while tracing
        except OSError as e:
            raise TraceError(f"cannot write the trace to {path}: {e.strerror}") from None
        self._files.append(path)
        self._file_started = time.monotonic()
        self._write(b"".join(self._headers[:headers]))
        while self.max_files and len(self._files) > self.max_files:
            old = self._files.pop(0)
            with contextlib.suppress(OSError):
                old.unlink()
