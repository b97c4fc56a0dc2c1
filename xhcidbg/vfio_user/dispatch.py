"""Commands from the client to their handlers, and the replies back.

`Dispatcher.deliver` takes each complete message from the connection.  A naturally aligned
register access to BAR0 - nearly every message while a guest drives the controller - goes
straight to the controller; everything else goes through the handler table below.  A handler
returns the reply payload, or an errno for an error reply; a posted command (NO_REPLY) gets no
reply either way.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from xhcidbg.emu.controller import XhciController

from .dma import DmaMaps
from .framing import ProtocolError, close_fds
from .irq import EventfdInterrupts
from .measurements import Measurements
from .pci import ConfigSpace
from .protocol import (
    DEVICE_INFO,
    DMA_MAP,
    DMA_UNMAP,
    HEADER,
    IRQ_INFO,
    IRQ_SET,
    MAJOR,
    MAX_DATA_XFER,
    MAX_DMA_MAPS,
    MAX_MSG_FDS,
    MAX_MULTI_WRITES,
    MINOR,
    NUM_IRQS,
    NUM_REGIONS,
    PAGE_SIZES,
    REGION_ACCESS,
    REGION_INFO,
    VERSION,
    WRITE_MULTI,
    WRITE_ONE,
    Command,
    DeviceFlags,
    HeaderFlags,
    IrqSetFlags,
    PciRegion,
)
from .regions import FunctionRegions, VfioRegion

log = logging.getLogger("xhcidbg.vfio_user")

# A handler's answer: the reply payload, or an errno (0: success with an empty reply).
Reply = bytes | int
Handler = Callable[[memoryview, Sequence[int]], Reply]

_REPLY = int(HeaderFlags.REPLY)
_NO_REPLY = int(HeaderFlags.NO_REPLY)
_ERROR = int(HeaderFlags.ERROR)
_TYPE_MASK = int(HeaderFlags.TYPE_MASK)
_READ = int(Command.REGION_READ)
_WRITE = int(Command.REGION_WRITE)
_ACCESSES = frozenset((_READ, _WRITE))
_BAR0 = int(PciRegion.BAR0)
_ACCESS_UNPACK = REGION_ACCESS.unpack_from
_ACCESS_SIZE = REGION_ACCESS.size
_HEADER_SIZE = HEADER.size
_REPLY_DATA = _HEADER_SIZE + _ACCESS_SIZE          # where a read reply's data begins
_HEADER_PACK = HEADER.pack_values
_HEADER_PACK_INTO = HEADER.pack_into


def _ignore_reply(data: bytes) -> None:
    """Where replies go while no client is connected."""


class Dispatcher:
    """Answers the client's commands from the function's parts; one per server, reused by each
    session (`start_session`)."""

    def __init__(self, controller: XhciController, config: ConfigSpace,
                 regions: FunctionRegions, irq: EventfdInterrupts, dma: DmaMaps,
                 stats: Measurements):
        self.controller = controller
        self.config = config
        self.regions = regions
        self.irq = irq
        self.dma = dma
        self.stats = stats
        self.send: Callable[[bytes], None] = _ignore_reply
        self.versioned = False
        self._unknown_seen: set[int] = set()
        self._bar0_size = controller.bar_size
        self._reply_buf = bytearray(_REPLY_DATA + 8)
        self._reply_view = memoryview(self._reply_buf)
        # the fast path's measurements, bound once
        self._read_arrived = stats.bar0_read_arrivals.append
        self._read_ns = stats.bar0_ns[0].append
        self._write_ns = stats.bar0_ns[1].append
        self._handlers: dict[int, Handler] = {
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

    def start_session(self, send: Callable[[bytes], None]) -> None:
        """A new client: replies go to `send`, and it must begin with VERSION."""
        self.send = send
        self.versioned = False

    def end_session(self) -> None:
        self.send = _ignore_reply

    # ---- dispatch ----------------------------------------------------------------------------
    def deliver(self, msg_id: int, command: int, flags: int, payload: memoryview,
                fds: Sequence[int]) -> None:
        """One message from the connection (see framing.Deliver)."""
        if (command in _ACCESSES and not fds and self.versioned and not flags & _TYPE_MASK
                and self._bar0_access(msg_id, command, flags, payload)):
            return
        self._handle(msg_id, command, flags, payload, fds)

    def _bar0_access(self, msg_id: int, command: int, flags: int, payload: memoryview) -> bool:
        """The hot path: one naturally aligned register access to BAR0.  False: not that case,
        take the general path."""
        t0 = time.perf_counter_ns()
        size = len(payload)
        if size < _ACCESS_SIZE:
            return False
        offset, region, count = _ACCESS_UNPACK(payload)
        if (region != _BAR0 or count not in (1, 2, 4, 8) or offset % count
                or offset + count > self._bar0_size):
            return False
        if command == _READ:
            if size != _ACCESS_SIZE:
                return False
            self._read_arrived(t0)
            try:
                value = self.controller.mmio_read(offset, count)
            except Exception:
                log.exception("controller mmio_read(%#x, %d) failed", offset, count)
                value = (1 << 8 * count) - 1       # what a read of a dead function returns
            if not flags & _NO_REPLY:
                reply = self._reply_buf
                _HEADER_PACK_INTO(reply, 0, msg_id, command, _REPLY_DATA + count, _REPLY, 0)
                reply[_HEADER_SIZE:_REPLY_DATA] = payload
                reply[_REPLY_DATA:_REPLY_DATA + count] = value.to_bytes(count, "little")
                self.send(bytes(self._reply_view[:_REPLY_DATA + count]))
            self._read_ns(time.perf_counter_ns() - t0)
        else:
            if size != _ACCESS_SIZE + count:
                return False
            try:
                self.controller.mmio_write(offset, count,
                                           int.from_bytes(payload[_ACCESS_SIZE:], "little"))
            except Exception:
                log.exception("controller mmio_write(%#x, %d) failed", offset, count)
            if not flags & _NO_REPLY:
                self.send(_HEADER_PACK(msg_id, command, _REPLY_DATA, _REPLY, 0)
                          + bytes(payload[:_ACCESS_SIZE]))
            self._write_ns(time.perf_counter_ns() - t0)
        return True

    def _handle(self, msg_id: int, command: int, flags: int, payload: memoryview,
                fds: Sequence[int]) -> None:
        t0 = time.perf_counter_ns()
        if flags & _TYPE_MASK != 0:
            log.warning("unexpected reply (id %d, command %d) from the client ignored",
                        msg_id, command)
            close_fds(fds)
            return
        handler = self._handlers.get(command)
        result: Reply
        if handler is None:
            if command not in self._unknown_seen:
                self._unknown_seen.add(command)
                log.warning("vfio-user command %d is not supported (ENOSYS)", command)
            close_fds(fds)
            result = errno.ENOSYS
        elif not self.versioned and command != Command.VERSION:
            log.warning("command %d before VERSION refused", command)
            close_fds(fds)
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
                self.send(HEADER.pack_values(msg_id, command, HEADER.size, _REPLY | _ERROR,
                                             result))
            else:
                self.send(HEADER.pack_values(msg_id, command, HEADER.size, _REPLY, 0))
        else:
            self.send(HEADER.pack_values(msg_id, command, HEADER.size + len(result), _REPLY, 0)
                      + result)
        self.stats.command_handled(command, time.perf_counter_ns() - t0)

    # ---- commands ----------------------------------------------------------------------------
    @staticmethod
    def _no_fds(fds: Sequence[int], what: str) -> int:
        if fds:
            log.warning("%s arrived with %d unexpected file descriptors; closed", what, len(fds))
            close_fds(fds)
            return errno.EINVAL
        return 0

    def _version(self, payload: memoryview, fds: Sequence[int]) -> Reply:
        if err := self._no_fds(fds, "VERSION"):
            return err
        if len(payload) < VERSION.size:
            raise ProtocolError("VERSION message too short")
        major, minor = VERSION.unpack_from(payload)
        if major != MAJOR:
            raise ProtocolError(f"client speaks vfio-user {major}.{minor}; we speak {MAJOR}.x")
        caps: dict[str, Any] = {}
        text = bytes(payload[VERSION.size:]).split(b"\0", 1)[0]
        if text:
            try:
                caps = json.loads(text).get("capabilities", {})
                if not isinstance(caps, dict):
                    raise ValueError("capabilities is not an object")
            except (ValueError, AttributeError) as e:
                log.warning("VERSION capabilities unreadable (%s); using defaults", e)
                caps = {}
        self.versioned = True
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

    def _dma_map(self, payload: memoryview, fds: Sequence[int]) -> Reply:
        if len(payload) < DMA_MAP.size or len(fds) > 1:
            close_fds(fds)
            log.warning("DMA_MAP malformed (%d bytes, %d fds)", len(payload), len(fds))
            return errno.EINVAL
        _, flags, offset, iova, size = DMA_MAP.unpack_from(payload)
        return self.dma.map(iova, size, offset, flags, fds[0] if fds else None)

    def _dma_unmap(self, payload: memoryview, fds: Sequence[int]) -> Reply:
        if err := self._no_fds(fds, "DMA_UNMAP"):
            return err
        if len(payload) < DMA_UNMAP.size:
            return errno.EINVAL
        _, flags, iova, size = DMA_UNMAP.unpack_from(payload)
        err = self.dma.unmap(iova, size, flags)
        return err or bytes(payload[:DMA_UNMAP.size])

    def _device_info(self, payload: memoryview, fds: Sequence[int]) -> Reply:
        if err := self._no_fds(fds, "DEVICE_GET_INFO"):
            return err
        if len(payload) < 4 or int.from_bytes(payload[:4], "little") < DEVICE_INFO.size:
            return errno.EINVAL
        return DEVICE_INFO.pack_values(DEVICE_INFO.size, DeviceFlags.RESET | DeviceFlags.PCI,
                                       NUM_REGIONS, NUM_IRQS)

    def _region_info(self, payload: memoryview, fds: Sequence[int]) -> Reply:
        if err := self._no_fds(fds, "DEVICE_GET_REGION_INFO"):
            return err
        if len(payload) < REGION_INFO.size:
            return errno.EINVAL
        argsz, _, index, _, _, _ = REGION_INFO.unpack_from(payload)
        region = self.regions.get(index)
        if argsz < REGION_INFO.size or region is None:
            return errno.EINVAL
        return REGION_INFO.pack_values(REGION_INFO.size, region.flags if region.size else 0,
                                       index, 0, region.size, 0)

    def _irq_info(self, payload: memoryview, fds: Sequence[int]) -> Reply:
        if err := self._no_fds(fds, "DEVICE_GET_IRQ_INFO"):
            return err
        if len(payload) < IRQ_INFO.size:
            return errno.EINVAL
        argsz, _, index, _ = IRQ_INFO.unpack_from(payload)
        if argsz < IRQ_INFO.size or index >= NUM_IRQS:
            return errno.EINVAL
        flags, count = self.irq.info(index)
        return IRQ_INFO.pack_values(IRQ_INFO.size, flags, index, count)

    def _set_irqs(self, payload: memoryview, fds: Sequence[int]) -> Reply:
        err = self._set_irqs_checked(payload, fds)
        if err:
            close_fds(fds)
        return err

    def _set_irqs_checked(self, payload: memoryview, fds: Sequence[int]) -> int:
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
            vectors = [v for v, b in zip(vectors, bools, strict=True) if b]
        if action == IrqSetFlags.ACTION_MASK:
            self.irq.mask(index, vectors)
        elif action == IrqSetFlags.ACTION_UNMASK:
            self.irq.unmask(index, vectors)
        else:
            self.irq.trigger(index, vectors)
        return 0

    def _locate(self, payload: memoryview, what: str) -> tuple[VfioRegion, int, int] | int:
        """(region, offset, count) of a region access that lies inside its region, or an
        errno."""
        if len(payload) < REGION_ACCESS.size:
            return errno.EINVAL
        offset, index, count = REGION_ACCESS.unpack_from(payload)
        region = self.regions.get(index)
        if region is None or count > MAX_DATA_XFER or offset + count > region.size:
            log.warning("%s of region %d at %#x+%d is outside it", what, index, offset, count)
            return errno.EINVAL
        return region, offset, count

    def _region_read(self, payload: memoryview, fds: Sequence[int]) -> Reply:
        if fds:
            return self._no_fds(fds, "REGION_READ")
        where = self._locate(payload, "read")
        if isinstance(where, int):
            return where
        region, offset, count = where
        if region.read is None:
            return errno.EINVAL
        return bytes(payload[:REGION_ACCESS.size]) + region.read(offset, count)

    def _region_write(self, payload: memoryview, fds: Sequence[int]) -> Reply:
        if fds:
            return self._no_fds(fds, "REGION_WRITE")
        where = self._locate(payload, "write")
        if isinstance(where, int):
            return where
        region, offset, count = where
        if region.write is None:
            return errno.EINVAL
        if len(payload) != REGION_ACCESS.size + count:
            log.warning("REGION_WRITE carries %d data bytes for a count of %d",
                        len(payload) - REGION_ACCESS.size, count)
            return errno.EINVAL
        region.write(offset, payload[REGION_ACCESS.size:])
        return bytes(payload[:REGION_ACCESS.size])

    def _write_multi(self, payload: memoryview, fds: Sequence[int]) -> Reply:
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

    def _reset(self, payload: memoryview, fds: Sequence[int]) -> Reply:
        if err := self._no_fds(fds, "DEVICE_RESET"):
            return err
        self.controller.hardware_reset()
        self.config.reset()
        self.regions.reset()
        self.irq.reset()
        log.info("device reset")
        return 0
