"""The tracer: a hooks observer that writes everything the controller announces to pcapng.

Interface 0 carries the xHCI-level records (`records.py`, link type USER0, decoded by the
shipped Wireshark dissector); one interface per USB bus carries usbmon records (link type 220)
that stock Wireshark, tshark and tcpdump decode.  Annotations (notes of fault rules, the
console's own marks) become packet comments.

Records are built on the controller's thread and only appended to a queue there; a small
writer thread flushes the queue every `flush_interval` seconds (and on stop).  Whole blocks are
written at once, so a process killed mid-capture leaves a file that is valid up to the last
flush.  The queue is bounded: if the disk or the FIFO reader cannot keep up, records are
dropped and counted rather than memory growing without end.

The hot path is cheap on purpose (bench/trace_overhead.py measures it): each frequent record is
packed together with its pcapng block header in one `struct` call (`records.EPB_*`), appended
to a deque without a lock (the controller's thread only appends, the writer only pops), and a
transfer's data is copied once, into its block.
"""
from __future__ import annotations

import errno
import functools
import os
import platform
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from xhcidbg.emu.trb import TrbType
from . import pcapng, records
from .filters import CaptureFilter, dci_of_address
from xhcidbg.emu import regs
from .records import (CTX_INPUT_CONTROL, CTX_SLOT, EPB_DOORBELL, EPB_EVENT, EPB_INTERRUPT,
                      EPB_MMIO_HEAD, EPB_PORT, EPB_TRB, HEAD, Kind, Ring)
from .urb import HAS_NOTE, urb_interval, usbmon_block, usbmon_record

DEFAULT_SNAPLEN = 65535        # bytes per usbmon record, header included (as tcpdump)
DEFAULT_BUSES = {1: "USB 2.0 root hub", 2: "USB 3 root hub"}


class _Rotate:
    """Marker in the queue: start the next file here (it has no bytes of its own)."""

    def __len__(self) -> int:
        return 0


_ROTATE = _Rotate()
_EPB = pcapng.EPB
_M32, _M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
_H_MMIO, _H_DOORBELL, _H_TRB = HEAD[Kind.MMIO], HEAD[Kind.DOORBELL], HEAD[Kind.TRB]
_H_EVENT, _H_INTERRUPT, _H_PORT = HEAD[Kind.EVENT], HEAD[Kind.INTERRUPT], HEAD[Kind.PORT]
_TRANSFER_EVENT, _PORT_STATUS_CHANGE = int(TrbType.TRANSFER_EVENT), int(TrbType.PORT_STATUS_CHANGE)
_DCBAAP_LO = regs.OP_BASE + regs.DCBAAP_LO.offset
_DCBAAP_HI = regs.OP_BASE + regs.DCBAAP_HI.offset
_MMIO_NAMES_MAX = 4096         # register names remembered with their ready block tails
FLUSH_EARLY = 4 << 20          # wake the writer before the interval when this much is waiting

# commands after which the tracer reads the contexts they changed (as Linux's tracepoints do)
_CTX_COMMANDS = frozenset((TrbType.ADDRESS_DEVICE, TrbType.CONFIGURE_ENDPOINT,
                           TrbType.EVALUATE_CONTEXT, TrbType.RESET_ENDPOINT,
                           TrbType.STOP_ENDPOINT, TrbType.SET_TR_DEQUEUE, TrbType.RESET_DEVICE))

_EP_ONLY = frozenset((TrbType.RESET_ENDPOINT, TrbType.STOP_ENDPOINT))   # Linux traces no slot ctx


class TraceError(Exception):
    pass


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
        except Exception as e:            # noqa: BLE001 - reported in status()
            self._error = f"{fn.__name__}: {type(e).__name__}: {e}"
    return wrapper


class Tracer:
    """Capture what `controller` does to `path` (a file or a FIFO).

    filters: a `CaptureFilter`, or its text form (`"slot=1 kind=trb,urb"`).
    max_bytes / max_seconds: start a new file (`name_00001.pcapng`, ...) after that much;
    max_files: keep only that many of them (a ring buffer).
    """

    def __init__(self, controller: Any = None, path: str | os.PathLike = "xhcidbg.pcapng",
                 filters: CaptureFilter | str | list[str] | None = None, *,
                 snaplen: int = DEFAULT_SNAPLEN, flush_interval: float = 0.2,
                 max_bytes: int | None = None, max_seconds: float | None = None,
                 max_files: int | None = None, buses: dict[int, str] | None = None,
                 clock: Callable[[], int] | None = None, max_buffer: int = 64 << 20,
                 comment: str = ""):
        self.controller = controller
        self.path = Path(path)
        self.filter = filters if isinstance(filters, CaptureFilter) else CaptureFilter.parse(filters)
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
        self._clock = clock or self._default_clock()
        self._lock = threading.Lock()        # the buffer and counters
        self._io_lock = threading.Lock()     # the file
        self._buf: list = []
        self._pending = 0
        self._records = 0
        self._written = 0
        self._dropped = 0
        self._error = ""
        self._headers: list[bytes] = []      # SHB and IDBs: repeated at the top of every file
        self._bus_iface: dict[int, int] = {}
        self._file = None
        self._file_bytes = 0
        self._file_started = 0.0
        self._files: list[Path] = []            # the files that are still there
        self._file_index = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: SimpleNamespace | None = None
        self._running = False
        # what the tracer learns from the traffic to read contexts and resolve ports
        self._dcbaap = 0
        self._slot_port: dict[int, int] = {}
        self._slot_fs_ls: dict[int, bool] = {}     # full- or low-speed device in the slot
        self._ring_cache: dict[str, tuple[int, int, int, int]] = {}
        self._inflight: set[int] = set()         # URB ids whose submission was traced
        self._started_ns = 0
        self._initial_buses = dict(DEFAULT_BUSES if buses is None else buses)

    # ---- public API ------------------------------------------------------------------------
    def start(self) -> "Tracer":
        if self._running:
            raise TraceError("this tracer is already running")
        self._headers = [pcapng.section_header(
            hardware=platform.machine(), os_name=f"{platform.system()} {platform.release()}",
            application="xhcidbg", comment=self.comment)]
        self._headers.append(pcapng.interface_description(
            records.LINKTYPE, 0xFFFF, "xhci", "xhcidbg xHCI controller records"))
        for bus, desc in sorted(self._initial_buses.items()):
            self._add_bus(bus, desc, announce=False)
        self._file_bytes = sum(map(len, self._headers))
        if not self._fifo:
            self._open_next()            # fail here, in the caller, if the path is unusable
        self._stop.clear()
        sched = getattr(self.controller, "scheduler", None)
        self._started_ns = sched.now_ns() if sched is not None else 0
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
                    with self._lock:
                        self._error = (f"no reader ever opened the FIFO; {self._records} "
                                       f"records were not delivered")
                if self._file is not None:
                    self._file.close()
                    self._file = None
        return self.status()

    def status(self) -> TraceStatus:
        with self._lock:
            return TraceStatus(str(self.path), self._running, str(self.filter), self._records,
                               self._written, self._dropped, [str(p) for p in self._files],
                               self._error)

    def annotate(self, text: str, level: str = "info") -> None:
        """Put a mark in the trace (a LOG record whose packet comment is `text`)."""
        if "log" in self.filter.kinds:
            self._emit(0, records.log(level, text), comment=text)

    def __enter__(self) -> "Tracer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- hook callbacks --------------------------------------------------------------------
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
        if "context" in k and not hasattr(self.controller, "dcbaap"):
            obs.on_mmio = self.on_mmio       # to learn DCBAAP from the guest's writes
        if k & {"urb", "xurb"}:
            obs.on_urb_submit = self.on_urb_submit
            obs.on_urb_complete = self.on_urb_complete
        return obs

    @_guarded
    def on_mmio(self, access) -> None:
        name = access.name
        if access.write and name.startswith("DCBAAP"):
            if name == "DCBAAP_LO":
                self._dcbaap = (self._dcbaap & ~0xFFFFFFFF) | (access.value & 0xFFFFFFC0)
                if access.size == 8:
                    self._dcbaap = access.value & ~0x3F
            elif name == "DCBAAP_HI":
                self._dcbaap = (self._dcbaap & 0xFFFFFFFF) | (access.value & 0xFFFFFFFF) << 32
        if "mmio" not in self.filter.kinds:
            return
        if self.filter.ports is not None and name.startswith("PORT") and "[" in name:
            if int(name[name.index("[") + 1:-1]) not in self.filter.ports:
                return
        self._emit(0, records.mmio(access.offset, access.size, access.write, access.value, name))

    @_guarded
    def on_doorbell(self, slot: int, target: int, stream: int) -> None:
        f = self.filter
        if slot and not (f.slot_ok(slot, self._slot_port.get(slot)) and f.dci_ok(target)):
            return
        self._emit(0, records.doorbell(slot, target, stream))

    def _ring(self, ring: str) -> tuple[int, int, int, int]:
        hit = self._ring_cache.get(ring)
        if hit is None:
            if ring == "cmd":
                hit = (Ring.COMMAND, 0, 0, 0)
            else:
                parts = [int(p) for p in ring.split("/")] + [0, 0]
                hit = (Ring.TRANSFER, parts[0], parts[1], parts[2])
            self._ring_cache[ring] = hit
        return hit

    @_guarded
    def on_trb(self, ring: str, trb) -> None:
        kind, slot, dci, stream = self._ring(ring)
        if kind == Ring.COMMAND:
            slot = trb.control >> 24            # the slot the command is about
        f = self.filter
        if slot and not (f.slot_ok(slot, self._slot_port.get(slot)) and f.dci_ok(dci)):
            return
        self._emit(0, records.trb(trb.addr, kind, slot if kind else 0, dci, stream, trb.dwords))

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

    @_guarded
    def on_event_posted(self, ev) -> None:
        dw = ev.dwords
        slot = dw[3] >> 24
        ttype = dw[3] >> 10 & 0x3F
        f = self.filter
        if slot and not f.slot_ok(slot, self._slot_port.get(slot)):
            return
        if ttype == TrbType.TRANSFER_EVENT and not f.dci_ok(dw[3] >> 16 & 0x1F):
            return
        if ttype == TrbType.PORT_STATUS_CHANGE and f.ports is not None \
                and dw[0] >> 24 not in f.ports:
            return
        self._emit(0, records.event(ev.addr, ev.interrupter, ev.drop, dw), comment=ev.note)

    @_guarded
    def on_port(self, port: int, old: int, new: int) -> None:
        if self.filter.ports is None or port in self.filter.ports:
            self._emit(0, records.port(port, old, new))

    @_guarded
    def on_interrupt(self, interrupter: int) -> None:
        self._emit(0, records.interrupt(interrupter))

    @_guarded
    def on_state(self, kind: str, ident: str, old: str, new: str) -> None:
        self._emit(0, records.state(kind, ident, old, new))

    @_guarded
    def on_log(self, level: str, message: str) -> None:
        self._emit(0, records.log(level, message))

    def _urb_wanted(self, xfer) -> bool:
        f = self.filter
        if f.buses is not None and xfer.bus not in f.buses:
            return False
        if xfer.slot and not f.slot_ok(xfer.slot, self._slot_port.get(xfer.slot)):
            return False
        return f.dci_ok(xfer.dci or dci_of_address(xfer.endpoint))

    @_guarded
    def on_urb_submit(self, xfer) -> None:
        if self._urb_wanted(xfer):
            if len(self._inflight) > 1 << 16:    # transfers dropped without completion
                self._inflight.clear()
            self._inflight.add(xfer.id)
            self._emit_urb(xfer, "S")

    @_guarded
    def on_urb_complete(self, xfer) -> None:
        if not self._urb_wanted(xfer):
            return
        if xfer.id in self._inflight:
            self._inflight.discard(xfer.id)
            event = "C"
        elif xfer.submitted_ns and xfer.submitted_ns < self._started_ns:
            event = "C"                          # submitted before tracing began
        else:
            event = "E"                          # never handed to a device: a submit error
        self._emit_urb(xfer, event)

    def _emit_urb(self, xfer, event: str) -> None:
        ts = self._clock()
        interval = urb_interval(xfer.interval, self._slot_fs_ls.get(xfer.slot, False)) \
            if xfer.interval else 0
        data, orig = usbmon_record(xfer, event, ts, self.snaplen - 64, interval)
        note = xfer.note if HAS_NOTE else ""
        if "urb" in self.filter.kinds:
            iface = self._bus_iface.get(xfer.bus)
            if iface is None:
                iface = self._add_bus(xfer.bus, f"bus {xfer.bus}")
            self._emit(iface, data, orig, note, ts)
        if "xurb" in self.filter.kinds:
            # its own URB id (top bit set), so Wireshark pairs each copy with its own submit
            copy = (xfer.id | 1 << 63).to_bytes(8, "little") + data[8:]
            self._emit(0, records.urb(xfer.slot, xfer.dci, xfer.stream, copy), orig + 8, note, ts)

    # ---- contexts --------------------------------------------------------------------------
    def _context_size(self) -> int:
        return 64 if getattr(self.controller, "context_size", 32) == 64 else 32

    def _snapshot_contexts(self, ttype: int, slot: int, trb) -> None:
        """Read the contexts a command changed, as Linux's xhci_handle_cmd_* tracepoints show
        them.  Guest memory is read defensively: a bad pointer just means no record."""
        mem = getattr(self.controller, "mem", None)
        if mem is None:
            return
        dcbaap = getattr(self.controller, "dcbaap", 0) or self._dcbaap
        stride = self._context_size()
        try:
            out = mem.read_u64(dcbaap + 8 * slot) & ~0x3F if dcbaap else 0
            dcis: list[int] = []
            if ttype in (TrbType.ADDRESS_DEVICE, TrbType.CONFIGURE_ENDPOINT,
                         TrbType.EVALUATE_CONTEXT):
                inp = trb.param & ~0xF
                ctrl = mem.read(inp, 32)
                self._context(inp, slot, CTX_INPUT_CONTROL, ttype, ctrl)
                add = int.from_bytes(ctrl[4:8], "little")
                dcis = [1] if ttype != TrbType.CONFIGURE_ENDPOINT else \
                    [d for d in range(2, 32) if add >> d & 1]
            elif ttype in (TrbType.RESET_ENDPOINT, TrbType.STOP_ENDPOINT, TrbType.SET_TR_DEQUEUE):
                dcis = [trb.control >> 16 & 0x1F]
            if not out:
                return
            if ttype not in _EP_ONLY:
                slot_ctx = mem.read(out, 32)
                self._context(out, slot, CTX_SLOT, ttype, slot_ctx)
                if slot_ctx[6]:
                    self._slot_port[slot] = slot_ctx[6]
                self._slot_fs_ls[slot] = slot_ctx[2] >> 4 & 0xF in (1, 2)
            for dci in dcis:
                if 1 <= dci <= 31:
                    self._context(out + stride * dci, slot, dci, ttype, mem.read(out + stride * dci, 32))
        except Exception:            # noqa: BLE001 - the guest pointed somewhere unmapped
            return

    def _context(self, addr: int, slot: int, dci: int, reason: int, raw: bytes) -> None:
        dw = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 32, 4)]
        self._emit(0, records.context(addr, slot, dci, reason, dw))

    # ---- buffer and files ------------------------------------------------------------------
    def _default_clock(self) -> Callable[[], int]:
        sched = getattr(self.controller, "scheduler", None)
        if sched is None:
            return time.time_ns
        # wall-clock start, then the controller's own (possibly virtual) time: reproducible
        # intervals in tests, real ones with a real VM
        wall, base = time.time_ns(), sched.now_ns()
        return lambda: wall + sched.now_ns() - base

    def _add_bus(self, bus: int, desc: str, announce: bool = True) -> int:
        iface = len(self._headers) - 1          # headers = SHB + one IDB per interface
        idb = pcapng.interface_description(pcapng.LINKTYPE_USB_LINUX_MMAPPED, self.snaplen,
                                           f"usbmon{bus}", f"xhcidbg {desc} (bus {bus})")
        self._headers.append(idb)
        self._bus_iface[bus] = iface
        if announce:
            with self._lock:
                self._buf.append(idb)
                self._pending += len(idb)
        return iface

    def _emit(self, iface: int, data: bytes, orig: int | None = None, comment: str = "",
              ts: int | None = None) -> None:
        block = pcapng.enhanced_packet(iface, self._clock() if ts is None else ts, data, orig,
                                       comment)
        n = len(block)
        with self._lock:
            if self._pending + n > self.max_buffer:
                self._dropped += 1
                return
            self._buf.append(block)
            self._pending += n
            self._records += 1
            if self._pending > FLUSH_EARLY and self._pending - n <= FLUSH_EARLY:
                self._wake.set()             # much to write: do not wait for the interval
            if self._rotating:
                self._file_bytes += n
                if (self.max_bytes and self._file_bytes >= self.max_bytes) or \
                        (self.max_seconds and time.monotonic() - self._file_started
                         >= self.max_seconds):
                    self._buf.append(_ROTATE)
                    self._file_bytes = sum(map(len, self._headers))
                    self._file_started = time.monotonic()

    def _writer(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write out everything buffered (whole blocks only)."""
        with self._lock:
            buf, self._buf, self._pending = self._buf, [], 0
        if not buf:
            return
        with self._io_lock:
            try:
                if self._file is None and self._fifo and not self._open_fifo():
                    with self._lock:             # no reader yet: keep the records for later
                        self._buf[:0] = buf
                        self._pending += sum(len(b) for b in buf if b is not _ROTATE)
                    return
                if self._file is None:
                    return
                chunk: list[bytes] = []
                for item in buf:
                    if item is _ROTATE:
                        self._write(b"".join(chunk))
                        chunk = []
                        self._open_next()
                    else:
                        chunk.append(item)
                self._write(b"".join(chunk))
            except OSError as e:
                if e.errno == errno.EPIPE:
                    self._error = "the FIFO's reader went away; tracing stopped writing"
                else:
                    self._error = f"{type(e).__name__}: {e}"
                if self._file is not None:
                    try:
                        self._file.close()
                    except OSError:
                        pass
                self._file = None
                self._fifo = False       # do not reopen: stop writing, keep counting

    def _write(self, data: bytes) -> None:
        if data:
            self._file.write(data)
            with self._lock:
                self._written += len(data)

    def _open_fifo(self) -> bool:
        """Open the FIFO once a reader (tshark -i, wireshark -k -i) has opened it."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return False
            raise
        os.set_blocking(fd, True)
        self._file = open(fd, "wb", buffering=0)
        self._files.append(self.path)
        self._write(b"".join(self._headers))
        return True

    def _next_path(self) -> Path:
        if not self._rotating:
            return self.path
        self._file_index += 1
        return self.path.with_name(f"{self.path.stem}_{self._file_index:05d}"
                                   f"{self.path.suffix or '.pcapng'}")

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        path = self._next_path()
        try:
            # unbuffered: each flush is one write() of whole blocks
            self._file = open(path, "wb", buffering=0)
        except OSError as e:
            raise TraceError(f"cannot write the trace to {path}: {e.strerror}") from None
        self._files.append(path)
        self._file_started = time.monotonic()
        self._write(b"".join(self._headers))
        while self.max_files and len(self._files) > self.max_files:
            old = self._files.pop(0)
            try:
                old.unlink()
            except OSError:
                pass
