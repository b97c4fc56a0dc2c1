"""A vfio-user server presenting the xHCI controller as a PCI function to QEMU.

One asyncio loop runs everything: the listening socket, the client socket (read with recvmsg so
file descriptors arrive with the messages that carry them), the controller's timers and every
controller call.  No thread touches controller state.

    server = VfioUserServer(controller, "/tmp/xhci.sock", on_disconnect=stop)
    await server.start()
    print(server.device_arg)        # for QEMU: -device '<this>'
"""
from __future__ import annotations

import array
import asyncio
import errno
import json
import logging
import os
import socket
import stat
import time
from collections import deque
from typing import Callable

from .dma import DmaMaps
from .irq import EventfdInterrupts
from .pci import ConfigSpace, FunctionLayout, PciIdentity, xhci_function
from .protocol import (
    DEVICE_INFO, DMA_MAP, DMA_UNMAP, HEADER, IRQ_INFO, IRQ_SET, MAJOR, MINOR, NUM_IRQS,
    NUM_REGIONS, REGION_ACCESS, REGION_INFO, VERSION, WRITE_MULTI, WRITE_ONE, Command,
    DeviceFlags, HeaderFlags, IrqSetFlags, PciRegion, RegionFlags,
)

log = logging.getLogger("xhcidbg.vfio_user")

MAX_DATA_XFER = 1 << 20
MAX_MSG_FDS = 16                       # the most QEMU accepts (VFIO_USER_MAX_MAX_FDS)
MAX_DMA_MAPS = 65535
PAGE_SIZES = 4096
MAX_MULTI_WRITES = 200                 # QEMU's VFIO_USER_MULTI_MAX
# The largest message we take: a region access of MAX_DATA_XFER, with room for SET_IRQS bools
# and a VERSION's JSON.  A larger one cannot be honoured and ends the session.
MAX_MESSAGE = HEADER.size + REGION_ACCESS.size + MAX_DATA_XFER + 4096
# Replies waiting for a client that does not read them; beyond this the session ends rather
# than the server's memory growing without bound.
MAX_QUEUED_REPLIES = 64 << 20
# Receive room for more descriptors than we allow, so extras are received (then closed) rather
# than silently truncated.
_ANC_SPACE = socket.CMSG_SPACE(64 * array.array("i").itemsize)

_REPLY = int(HeaderFlags.REPLY)
_NO_REPLY = int(HeaderFlags.NO_REPLY)
_ERROR = int(HeaderFlags.ERROR)
_TYPE_MASK = int(HeaderFlags.TYPE_MASK)
_READ = int(Command.REGION_READ)
_WRITE = int(Command.REGION_WRITE)
_ACCESS_UNPACK = REGION_ACCESS.unpack_from
_HEADER_PACK = HEADER.pack_values
_HEADER_PACK_INTO = HEADER.pack_into


def qemu_device_arg(socket_path: str) -> str:
    """The value of QEMU's -device option that connects a vfio-user-pci function to us."""
    return json.dumps({"driver": "vfio-user-pci",
                       "socket": {"path": os.path.abspath(socket_path), "type": "unix"}},
                      separators=(",", ":"))


class ProtocolError(Exception):
    """The stream cannot be trusted any more: the session ends."""


def _interrupter_count(controller) -> int:
    for name in ("num_interrupters", "interrupters", "n_interrupters"):
        n = getattr(controller, name, None)
        if isinstance(n, int):
            return n
        if n is not None and hasattr(n, "__len__"):
            return len(n)
    raise TypeError("cannot tell how many interrupters the controller has")


# ---- regions --------------------------------------------------------------------------------
class Region:
    """One VFIO region: size, flags and access functions over (offset, count)."""

    def __init__(self, size: int, read=None, write=None):
        self.size = size
        self.read = read
        self.write = write
        self.flags = (RegionFlags.READ if read else 0) | (RegionFlags.WRITE if write else 0)


def _aligned_pieces(offset: int, count: int):
    """Split an access into naturally aligned 1/2/4/8-byte pieces (registers are accessed so)."""
    end = offset + count
    while offset < end:
        size = 8
        while size > 1 and (offset % size or offset + size > end):
            size >>= 1
        yield offset, size
        offset += size


class Bar0:
    """The controller's register file."""

    def __init__(self, controller):
        self.hc = controller

    def read(self, offset: int, count: int) -> bytes:
        if count in (1, 2, 4, 8) and offset % count == 0:
            return self.hc.mmio_read(offset, count).to_bytes(count, "little")
        return b"".join(self.hc.mmio_read(o, n).to_bytes(n, "little")
                        for o, n in _aligned_pieces(offset, count))

    def write(self, offset: int, data) -> None:
        count = len(data)
        if count in (1, 2, 4, 8) and offset % count == 0:
            self.hc.mmio_write(offset, count, int.from_bytes(data, "little"))
            return
        for o, n in _aligned_pieces(offset, count):
            self.hc.mmio_write(o, n, int.from_bytes(data[o - offset:o - offset + n], "little"))


class MsixBar:
    """The BAR holding the MSI-X table and PBA.  QEMU emulates the table and forwards only PBA
    reads; the table is kept here as plain storage in case a VMM forwards it too."""

    def __init__(self, layout: FunctionLayout, irq: EventfdInterrupts):
        self.msix = layout.msix
        self.irq = irq
        self.table = bytearray(self.msix.table_size)
        self.reset()

    def reset(self) -> None:
        masked = bytes(12) + (1).to_bytes(4, "little")     # vector control: masked
        for v in range(self.msix.vectors):
            self.table[v * 16:v * 16 + 16] = masked

    def read(self, offset: int, count: int) -> bytes:
        m = self.msix
        out = bytearray(count)
        for i in range(count):
            o = offset + i
            if m.table_offset <= o < m.table_offset + m.table_size:
                out[i] = self.table[o - m.table_offset]
            elif m.pba_offset <= o < m.pba_offset + m.pba_size:
                out[i] = self.irq.pba(o - m.pba_offset, 1)[0]
        return bytes(out)

    def write(self, offset: int, data) -> None:
        m = self.msix
        for i, b in enumerate(bytes(data)):
            o = offset + i
            if m.table_offset <= o < m.table_offset + m.table_size:
                self.table[o - m.table_offset] = b


# ---- the asyncio driver for the controller's scheduler ---------------------------------------
class SchedulerDriver:
    """Runs the controller's timers from the asyncio loop (monotonic clock)."""

    def __init__(self, scheduler, loop: asyncio.AbstractEventLoop):
        self.scheduler = scheduler
        self.loop = loop
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._armed_ns: int | None = None

    def start(self) -> None:
        self.scheduler.on_new_deadline = self._arm
        self._rearm()

    def stop(self) -> None:
        if self.scheduler.on_new_deadline == self._arm:
            self.scheduler.on_new_deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when_ns: int) -> None:
        if self._handle is not None and self._armed_ns is not None and self._armed_ns <= when_ns:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._armed_ns = when_ns
        delay = (when_ns - self.scheduler.now_ns()) / 1e9
        if delay <= 0:
            self._handle = self.loop.call_soon(self._run)
        else:
            self._handle = self.loop.call_later(delay, self._run)

    def _run(self) -> None:
        self._handle = None
        self._armed_ns = None
        try:
            self.scheduler.run_due()
        except Exception:
            log.exception("controller timer failed")
        self._rearm()

    def _rearm(self) -> None:
        d = self.scheduler.next_deadline()
        if d is not None:
            self._arm(d)


# Busy-polling after a message (see VfioUserServer._readable): measured on a 2-core machine with
# bench/linux_figures.py, a Linux guest's dd from the storage stick (warm host page cache) went
# from ~430 to 580-700 MB/s (QEMU's own usb-storage: ~1220 MB/s) and a register read round trip
# from ~95 to ~42 us, at the price of one core spinning while the guest is busy with the device.
BUSY_POLL_US = 1000
BUSY_POLL_TURN_NS = 5_000_000      # return to the event loop at least this often


# ---- the server ------------------------------------------------------------------------------
class VfioUserServer:
    def __init__(self, controller, socket_path: str, *,
                 on_disconnect: Callable[[], None] | None = None,
                 identity: PciIdentity = PciIdentity(),
                 msix: bool = True, msi: bool = True,
                 drive_scheduler: bool = True, busy_poll_us: int = BUSY_POLL_US):
        self.controller = controller
        # After a message, keep reading the socket for this long before sleeping in the event
        # loop: the VMM's next access then finds us awake instead of paying a wakeup.
        self.busy_poll_ns = busy_poll_us * 1000
        self.socket_path = os.path.abspath(str(socket_path))
        self.on_disconnect = on_disconnect
        self.layout = xhci_function(controller.bar_size, _interrupter_count(controller), identity,
                                    msix=msix, msi=msi)
        self.config = ConfigSpace(self.layout)
        self.irq = EventfdInterrupts(self.config)
        controller.irq = self.irq
        self.dma = DmaMaps(controller.mem, MAX_DMA_MAPS)
        self.regions: dict[int, Region] = {i: Region(0) for i in range(NUM_REGIONS)}
        bar0 = Bar0(controller)
        self.regions[PciRegion.BAR0] = Region(controller.bar_size, bar0.read, bar0.write)
        self.msix_bar = MsixBar(self.layout, self.irq) if msix else None
        if self.msix_bar is not None:
            self.regions[self.layout.msix.bar] = Region(self.layout.msix.bar_size,
                                                       self.msix_bar.read, self.msix_bar.write)
        self.regions[PciRegion.CONFIG] = Region(self.config.size, self.config.read,
                                                self.config.write)
        self.drive_scheduler = drive_scheduler
        self._handlers: dict[int, Callable] = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._device_info,
            Command.DEVICE_GET_REGION_INFO: self._region_info,
            Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.REGION_WRITE_MULTI: self._write_multi,
            Command.DEVICE_RESET: self._reset,
        }
        # Per-command handling time in ns (the latest ones) and counts, for measurements.
        self.timings: dict[int, deque[int]] = {}
        self.counts: dict[int, int] = {}
        self.client_caps: dict = {}
        self.last_disconnect_reason = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._sock: socket.socket | None = None
        self._sched: SchedulerDriver | None = None
        self._disconnected: asyncio.Event | None = None
        self._buf = bytearray(2 * MAX_MESSAGE)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._fds_for: dict[int, list[int]] = {}      # message start offset -> its descriptors
        self._out: deque[bytes] = deque()
        self._queued = 0
        self._versioned = False
        self._unknown_seen: set[int] = set()
        self._bar0_size = controller.bar_size
        self._reply_buf = bytearray(HEADER.size + REGION_ACCESS.size + 8)
        self._reply_view = memoryview(self._reply_buf)
        # BAR0 fast-path handling times in ns: [reads, writes] (the latest ones).
        self._hot_ns = (deque(maxlen=100000), deque(maxlen=100000))
        # perf_counter_ns at which each BAR0 read arrived: back-to-back guest reads arrive one
        # guest round trip apart.
        self.bar0_read_arrivals: deque[int] = deque(maxlen=100000)

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def device_arg(self) -> str:
        return qemu_device_arg(self.socket_path)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._disconnected = asyncio.Event()
        try:
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)       # a stale socket from an earlier run
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
        except OSError as e:
            listener.close()
            raise OSError(e.errno, f"cannot listen on {self.socket_path}: {e.strerror}") from None
        listener.listen(1)
        listener.setblocking(False)
        self._listener = listener
        self._loop.add_reader(listener.fileno(), self._accept)
        if self.drive_scheduler and hasattr(self.controller, "scheduler"):
            if getattr(self.controller.scheduler, "virtual", False):
                log.warning("the controller runs on a virtual clock: its timers will not follow "
                            "the guest's time")
            self._sched = SchedulerDriver(self.controller.scheduler, self._loop)
            self._sched.start()
        log.info("vfio-user server listening on %s", self.socket_path)

    async def wait_disconnected(self) -> str:
        """Wait until the current (or next) client goes away; returns why."""
        assert self._disconnected is not None, "start() first"
        await self._disconnected.wait()
        self._disconnected.clear()
        return self.last_disconnect_reason

    def close(self) -> None:
        if self._sock is not None:
            self._disconnect("server closed")
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        if self._sched is not None:
            self._sched.stop()
            self._sched = None

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("accept failed: %s", e)
            return
        if self._sock is not None:
            log.warning("a second client connected while one is being served; refused")
            sock.close()
            return
        sock.setblocking(False)
        self._sock = sock
        self._start = self._end = 0
        self._fds_for.clear()
        self._out.clear()
        self._versioned = False
        self._loop.add_reader(sock.fileno(), self._readable)
        log.info("vfio-user client connected")

    def _disconnect(self, reason: str) -> None:
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        self._loop.remove_reader(sock.fileno())
        if self._out:
            self._loop.remove_writer(sock.fileno())
            self._out.clear()
        self._queued = 0
        sock.close()
        for fds in self._fds_for.values():
            _close_all(fds)
        self._fds_for.clear()
        # The client's memory and eventfds are gone with it; device state stays (spec:
        # "Client Disconnection").
        self.dma.close()
        self.irq.close()
        self.last_disconnect_reason = reason
        log.info("vfio-user client disconnected: %s", reason)
        if self._disconnected is not None:
            self._disconnected.set()
        if self.on_disconnect is not None:
            try:
                self.on_disconnect()
            except Exception:
                log.exception("on_disconnect callback failed")

    # ---- receiving ---------------------------------------------------------------------------
    def _readable(self) -> None:
        if not self._receive() or not self.busy_poll_ns:
            return
        # Busy-poll: a guest driver's register reads come in bursts (an interrupt handler reads
        # four), and waking a sleeping process costs more than the read itself.  Bounded so the
        # loop's other work (timers, the VM's console, hotplug) still runs every few ms.
        now = time.perf_counter_ns()
        deadline, give_back = now + self.busy_poll_ns, now + BUSY_POLL_TURN_NS
        while self._sock is not None and now < deadline and now < give_back:
            if self._receive():
                deadline = time.perf_counter_ns() + self.busy_poll_ns
                if self.drive_scheduler:
                    self.controller.scheduler.run_due()
            else:
                os.sched_yield()     # a VMM thread sharing this core runs first
            now = time.perf_counter_ns()

    def _receive(self) -> bool:
        """Read what the socket has and handle it; False if there was nothing."""
        sock = self._sock
        if sock is None:
            return False
        if len(self._buf) - self._end < MAX_MESSAGE:
            self._compact()
        chunk_start = self._end
        try:
            n, anc, msg_flags, _ = sock.recvmsg_into([self._view[self._end:]], _ANC_SPACE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            self._disconnect(f"socket error: {e}")
            return False
        fds = _fds_from(anc)
        if msg_flags & socket.MSG_CTRUNC:
            _close_all(fds)
            self._disconnect("client sent more file descriptors than fit in one message")
            return False
        if n == 0:
            _close_all(fds)
            self._disconnect("client closed the connection")
            return False
        self._end += n
        if fds:
            self._attach_fds(chunk_start, fds)
        try:
            self._process()
        except ProtocolError as e:
            log.error("vfio-user protocol error: %s", e)
            self._disconnect(str(e))
        except Exception as e:          # a bug of ours: end the session rather than hang it
            log.exception("vfio-user message processing failed")
            self._disconnect(f"internal error: {e!r}")
        return True

    def _attach_fds(self, chunk_start: int, fds: list[int]) -> None:
        # The kernel returns a sendmsg's descriptors with its first bytes and stops reading after
        # them, so they belong to the last message that starts inside this chunk.
        p, owner = self._start, None
        while p < self._end:
            if p >= chunk_start:
                owner = p
            if self._end - p < HEADER.size:
                break
            size = HEADER.unpack_from(self._buf, p)[2]
            if size < HEADER.size:
                break
            p += size
        if owner is None:
            log.warning("file descriptors arrived in the middle of a message; closed")
            _close_all(fds)
            return
        self._fds_for.setdefault(owner, []).extend(fds)

    def _compact(self) -> None:
        s = self._start
        if s == 0:
            return
        n = self._end - s
        self._buf[:n] = self._buf[s:self._end]
        self._start, self._end = 0, n
        if self._fds_for:
            self._fds_for = {k - s: v for k, v in self._fds_for.items()}

    def _process(self) -> None:
        buf, view = self._buf, self._view
        p = self._start
        unpack = HEADER.unpack_from
        while self._sock is not None and self._end - p >= HEADER.size:
            msg_id, command, size, flags, _ = unpack(buf, p)
            if size < HEADER.size or size > MAX_MESSAGE:
                raise ProtocolError(f"message {msg_id} (command {command}) claims {size} bytes "
                                    f"(allowed {HEADER.size}..{MAX_MESSAGE})")
            if self._end - p < size:
                break
            fds = self._fds_for.pop(p, None) if self._fds_for else None
            self._start = p + size
            hot = (command == _READ or command == _WRITE) and not fds and self._versioned \
                and not flags & _TYPE_MASK
            if not (hot and self._bar0_access(msg_id, command, flags, p, size)):
                self._handle(msg_id, command, flags, view[p + HEADER.size:p + size], fds or [])
            p += size
        if self._start == self._end:
            self._start = self._end = 0

    # ---- dispatch ----------------------------------------------------------------------------
    def _bar0_access(self, msg_id: int, command: int, flags: int, p: int, size: int) -> bool:
        """The hot path: one naturally aligned register access to BAR0.  False: not that case,
        take the general path."""
        t0 = time.perf_counter_ns()
        buf = self._buf
        a = p + HEADER.size
        offset, region, count = _ACCESS_UNPACK(buf, a)
        if (region != 0 or count not in (1, 2, 4, 8) or offset % count
                or offset + count > self._bar0_size):
            return False
        if command == _READ:
            if size != HEADER.size + REGION_ACCESS.size:
                return False
            self.bar0_read_arrivals.append(t0)
            try:
                value = self.controller.mmio_read(offset, count)
            except Exception:
                log.exception("controller mmio_read(%#x, %d) failed", offset, count)
                value = (1 << 8 * count) - 1       # what a read of a dead function returns
            if not flags & _NO_REPLY:
                reply = self._reply_buf
                _HEADER_PACK_INTO(reply, 0, msg_id, command, 32 + count, _REPLY, 0)
                reply[16:32] = buf[a:a + 16]
                reply[32:32 + count] = value.to_bytes(count, "little")
                self._send(bytes(self._reply_view[:32 + count]))
        else:
            if size != HEADER.size + REGION_ACCESS.size + count:
                return False
            try:
                self.controller.mmio_write(offset, count,
                                           int.from_bytes(buf[a + 16:a + 16 + count], "little"))
            except Exception:
                log.exception("controller mmio_write(%#x, %d) failed", offset, count)
            if not flags & _NO_REPLY:
                self._send(_HEADER_PACK(msg_id, command, 32, _REPLY, 0) + bytes(buf[a:a + 16]))
        self._hot_ns[command == _WRITE].append(time.perf_counter_ns() - t0)
        return True

    def _handle(self, msg_id: int, command: int, flags: int, payload: memoryview,
                fds: list[int]) -> None:
        t0 = time.perf_counter_ns()
        if flags & _TYPE_MASK != 0:
            log.warning("unexpected reply (id %d, command %d) from the client ignored",
                        msg_id, command)
            _close_all(fds)
            return
        handler = self._handlers.get(command)
        if handler is None:
            if command not in self._unknown_seen:
                self._unknown_seen.add(command)
                log.warning("vfio-user command %d is not supported (ENOSYS)", command)
            _close_all(fds)
            result = errno.ENOSYS
        elif not self._versioned and command != Command.VERSION:
            log.warning("command %d before VERSION refused", command)
            _close_all(fds)
            result = errno.EINVAL
        else:
            try:
                result = handler(payload, fds)
            except ProtocolError:
                raise
            except Exception:
                log.exception("vfio-user command %d failed", command)
                result = errno.EIO
        if flags & _NO_REPLY:
            if isinstance(result, int) and result:
                log.warning("posted command %d (id %d) failed: %s", command, msg_id,
                            os.strerror(result))
        elif isinstance(result, int):
            if result:
                self._send(HEADER.pack_values(msg_id, command, HEADER.size, _REPLY | _ERROR,
                                              result))
            else:
                self._send(HEADER.pack_values(msg_id, command, HEADER.size, _REPLY, 0))
        else:
            self._send(HEADER.pack_values(msg_id, command, HEADER.size + len(result), _REPLY, 0)
                       + result)
        dt = time.perf_counter_ns() - t0
        d = self.timings.get(command)
        if d is None:
            d = self.timings[command] = deque(maxlen=100000)
        d.append(dt)
        self.counts[command] = self.counts.get(command, 0) + 1

    # ---- sending -----------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            return
        if self._out:
            self._out.append(data)
            self._queued += len(data)
            if self._queued > MAX_QUEUED_REPLIES:
                self._disconnect(f"client left {self._queued} bytes of replies unread")
            return
        try:
            n = sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._disconnect(f"socket error while replying: {e}")
            return
        if n < len(data):
            self._out.append(data[n:])
            self._queued = len(data) - n
            self._loop.add_writer(sock.fileno(), self._writable)

    def _writable(self) -> None:
        sock = self._sock
        while sock is not None and self._out:
            data = self._out[0]
            try:
                n = sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._disconnect(f"socket error while replying: {e}")
                return
            self._queued -= n
            if n < len(data):
                self._out[0] = data[n:]
                return
            self._out.popleft()
        if sock is not None:
            self._loop.remove_writer(sock.fileno())

    # ---- commands ----------------------------------------------------------------------------
    @staticmethod
    def _no_fds(fds: list[int], what: str) -> int:
        if fds:
            log.warning("%s arrived with %d unexpected file descriptors; closed", what, len(fds))
            _close_all(fds)
            return errno.EINVAL
        return 0

    def _version(self, payload: memoryview, fds: list[int]):
        if err := self._no_fds(fds, "VERSION"):
            return err
        if len(payload) < VERSION.size:
            raise ProtocolError("VERSION message too short")
        major, minor = VERSION.unpack_from(payload)
        if major != MAJOR:
            raise ProtocolError(f"client speaks vfio-user {major}.{minor}; we speak {MAJOR}.x")
        caps = {}
        text = bytes(payload[VERSION.size:]).split(b"\0", 1)[0]
        if text:
            try:
                caps = json.loads(text).get("capabilities", {})
                if not isinstance(caps, dict):
                    raise ValueError("capabilities is not an object")
            except (ValueError, AttributeError) as e:
                log.warning("VERSION capabilities unreadable (%s); using defaults", e)
                caps = {}
        self.client_caps = caps
        self._versioned = True
        ours = {"capabilities": {
            "max_msg_fds": MAX_MSG_FDS,
            "max_data_xfer_size": MAX_DATA_XFER,
            "pgsizes": PAGE_SIZES,
            "max_dma_maps": MAX_DMA_MAPS,
            # only posted writes of 8 bytes or less are coalesced; handled below
            "write_multiple": bool(caps.get("write_multiple", False)),
        }}
        log.info("vfio-user %d.%d client capabilities: %s", major, minor, caps)
        return VERSION.pack_values(MAJOR, min(minor, MINOR)) + json.dumps(ours).encode() + b"\0"

    def _dma_map(self, payload: memoryview, fds: list[int]):
        if len(payload) < DMA_MAP.size or len(fds) > 1:
            _close_all(fds)
            log.warning("DMA_MAP malformed (%d bytes, %d fds)", len(payload), len(fds))
            return errno.EINVAL
        _, flags, offset, iova, size = DMA_MAP.unpack_from(payload)
        return self.dma.map(iova, size, offset, flags, fds[0] if fds else None)

    def _dma_unmap(self, payload: memoryview, fds: list[int]):
        if err := self._no_fds(fds, "DMA_UNMAP"):
            return err
        if len(payload) < DMA_UNMAP.size:
            return errno.EINVAL
        _, flags, iova, size = DMA_UNMAP.unpack_from(payload)
        err = self.dma.unmap(iova, size, flags)
        return err or bytes(payload[:DMA_UNMAP.size])

    def _device_info(self, payload: memoryview, fds: list[int]):
        if err := self._no_fds(fds, "DEVICE_GET_INFO"):
            return err
        if len(payload) < 4 or int.from_bytes(payload[:4], "little") < DEVICE_INFO.size:
            return errno.EINVAL
        return DEVICE_INFO.pack_values(DEVICE_INFO.size, DeviceFlags.RESET | DeviceFlags.PCI,
                                       NUM_REGIONS, NUM_IRQS)

    def _region_info(self, payload: memoryview, fds: list[int]):
        if err := self._no_fds(fds, "DEVICE_GET_REGION_INFO"):
            return err
        if len(payload) < REGION_INFO.size:
            return errno.EINVAL
        argsz, _, index, _, _, _ = REGION_INFO.unpack_from(payload)
        if argsz < REGION_INFO.size or index >= NUM_REGIONS:
            return errno.EINVAL
        r = self.regions[index]
        return REGION_INFO.pack_values(REGION_INFO.size, r.flags if r.size else 0, index, 0,
                                       r.size, 0)

    def _irq_info(self, payload: memoryview, fds: list[int]):
        if err := self._no_fds(fds, "DEVICE_GET_IRQ_INFO"):
            return err
        if len(payload) < IRQ_INFO.size:
            return errno.EINVAL
        argsz, _, index, _ = IRQ_INFO.unpack_from(payload)
        if argsz < IRQ_INFO.size or index >= NUM_IRQS:
            return errno.EINVAL
        flags, count = self.irq.info(index)
        return IRQ_INFO.pack_values(IRQ_INFO.size, flags, index, count)

    def _set_irqs(self, payload: memoryview, fds: list[int]):
        err = self._set_irqs_checked(payload, fds)
        if err:
            _close_all(fds)
        return err

    def _set_irqs_checked(self, payload: memoryview, fds: list[int]) -> int:
        if len(payload) < IRQ_SET.size:
            return errno.EINVAL
        _, flags, index, start, count = IRQ_SET.unpack_from(payload)
        data = flags & IrqSetFlags.DATA_TYPES
        action = flags & IrqSetFlags.ACTIONS
        if (index >= NUM_IRQS or flags & ~(IrqSetFlags.DATA_TYPES | IrqSetFlags.ACTIONS)
                or data.bit_count() != 1 or action.bit_count() != 1):
            log.warning("SET_IRQS index %d flags %#x refused", index, flags)
            return errno.EINVAL
        total = self.irq.counts[index]
        if data == IrqSetFlags.DATA_NONE and count == 0:
            if fds:
                return errno.EINVAL
            if action == IrqSetFlags.ACTION_TRIGGER:
                self.irq.disable(index)
            return 0
        if start >= total or count > total - start:
            log.warning("SET_IRQS index %d vectors %d+%d out of range (%d)", index, start,
                        count, total)
            return errno.EINVAL
        if data == IrqSetFlags.DATA_EVENTFD:
            if action != IrqSetFlags.ACTION_TRIGGER:
                log.warning("SET_IRQS: mask/unmask eventfds are not supported")
                return errno.ENOTSUP
            if len(fds) not in (0, count):
                log.warning("SET_IRQS index %d: %d eventfds for %d vectors", index, len(fds),
                            count)
                return errno.EINVAL
            # No descriptors: unassign those vectors (QEMU does this while enabling MSI-X).
            self.irq.assign(index, start, list(fds) if fds else [None] * count)
            return 0
        if fds:
            return errno.EINVAL
        vectors = list(range(start, start + count))
        if data == IrqSetFlags.DATA_BOOL:
            if len(payload) < IRQ_SET.size + count:
                return errno.EINVAL
            bools = payload[IRQ_SET.size:IRQ_SET.size + count]
            vectors = [v for v, b in zip(vectors, bools) if b]
        if action == IrqSetFlags.ACTION_MASK:
            self.irq.mask(index, vectors)
        elif action == IrqSetFlags.ACTION_UNMASK:
            self.irq.unmask(index, vectors)
        else:
            self.irq.trigger(index, vectors)
        return 0

    def _access(self, payload: memoryview, writing: bool):
        """(region, offset, count) of a checked region access, or an errno."""
        if len(payload) < REGION_ACCESS.size:
            return errno.EINVAL
        offset, index, count = REGION_ACCESS.unpack_from(payload)
        region = self.regions.get(index)
        if region is None or count > MAX_DATA_XFER or offset + count > region.size:
            log.warning("%s of region %d at %#x+%d is outside it", "write" if writing else "read",
                        index, offset, count)
            return errno.EINVAL
        if (region.write if writing else region.read) is None:
            return errno.EINVAL
        if writing and len(payload) != REGION_ACCESS.size + count:
            log.warning("REGION_WRITE carries %d data bytes for a count of %d",
                        len(payload) - REGION_ACCESS.size, count)
            return errno.EINVAL
        return region, offset, count

    def _region_read(self, payload: memoryview, fds: list[int]):
        if fds:
            return self._no_fds(fds, "REGION_READ")
        checked = self._access(payload, False)
        if isinstance(checked, int):
            return checked
        region, offset, count = checked
        return bytes(payload[:REGION_ACCESS.size]) + region.read(offset, count)

    def _region_write(self, payload: memoryview, fds: list[int]):
        if fds:
            return self._no_fds(fds, "REGION_WRITE")
        checked = self._access(payload, True)
        if isinstance(checked, int):
            return checked
        region, offset, count = checked
        region.write(offset, payload[REGION_ACCESS.size:])
        return bytes(payload[:REGION_ACCESS.size])

    def _write_multi(self, payload: memoryview, fds: list[int]):
        if err := self._no_fds(fds, "REGION_WRITE_MULTI"):
            return err
        if len(payload) < WRITE_MULTI.size:
            return errno.EINVAL
        (n,) = WRITE_MULTI.unpack_from(payload)
        if n > MAX_MULTI_WRITES or len(payload) < WRITE_MULTI.size + n * WRITE_ONE.size:
            log.warning("REGION_WRITE_MULTI of %d writes in %d bytes refused", n, len(payload))
            return errno.EINVAL
        for i in range(n):
            offset, index, count, data = WRITE_ONE.unpack_from(
                payload, WRITE_MULTI.size + i * WRITE_ONE.size)
            region = self.regions.get(index)
            if (region is None or region.write is None or count > 8
                    or offset + count > region.size):
                log.warning("REGION_WRITE_MULTI entry %d (region %d at %#x+%d) refused",
                            i, index, offset, count)
                return errno.EINVAL
            region.write(offset, data[:count])
        return WRITE_MULTI.pack_values(n)

    def _reset(self, payload: memoryview, fds: list[int]):
        if err := self._no_fds(fds, "DEVICE_RESET"):
            return err
        self.controller.hardware_reset()
        self.config.reset()
        if self.msix_bar is not None:
            self.msix_bar.reset()
        self.irq.intx_level = False
        self.irq.intx_masked = False
        self.irq.msix_pending = self.irq.msi_pending = 0
        log.info("device reset")
        return 0

    # ---- measurements ------------------------------------------------------------------------
    def read_round_trips(self, since: int = 0, limit_ns: int = 1_000_000) -> list[int]:
        """Gaps (ns) between consecutive BAR0 reads from arrival number `since` on, keeping only
        those under `limit_ns`: for a guest reading registers back to back, the cost of one
        guest MMIO read."""
        t = list(self.bar0_read_arrivals)[since:]
        return sorted(b - a for a, b in zip(t, t[1:]) if b - a < limit_ns)

    def timing_summary(self) -> dict[str, dict[str, float]]:
        """Per command: count and median/p90 handling time in microseconds."""
        out = {}
        hot = {"BAR0_READ": self._hot_ns[0], "BAR0_WRITE": self._hot_ns[1]}
        for name, d in hot.items():
            s = sorted(d)
            if s:
                out[name] = {"count": len(s), "median_us": s[len(s) // 2] / 1000,
                             "p90_us": s[int(len(s) * 0.9)] / 1000}
        for cmd, d in self.timings.items():
            s = sorted(d)
            if not s:
                continue
            name = Command(cmd).name if cmd in Command._value2member_map_ else str(cmd)
            out[name] = {"count": self.counts.get(cmd, 0),
                         "median_us": s[len(s) // 2] / 1000,
                         "p90_us": s[int(len(s) * 0.9)] / 1000}
        return out


async def serve(controller, socket_path: str, on_disconnect: Callable[[], None] | None = None,
                *, announce: bool = True, **options) -> VfioUserServer:
    """Start serving `controller` on `socket_path`; print QEMU's -device argument if asked."""
    server = VfioUserServer(controller, socket_path, on_disconnect=on_disconnect, **options)
    await server.start()
    if announce:
        print(f"QEMU: -device '{server.device_arg}'", flush=True)
    return server


def _fds_from(anc) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
