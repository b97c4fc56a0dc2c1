"""One client's socket as a stream of vfio-user messages, with the descriptors they carry.

Reads use recvmsg, so SCM_RIGHTS file descriptors arrive with the bytes they were sent with; each
set is attached to the message it came with and handed over with it.  Replies the client does not
read at once are queued and written when the socket is writable again.  Nothing here knows what a
command means: complete messages go to the `deliver` callback, and whatever makes the stream
untrustworthy ends the session through `lost`.
"""
from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from .protocol import HEADER, MAX_DATA_XFER, REGION_ACCESS

log = logging.getLogger("xhcidbg.vfio_user")

# The largest message we take: a region access of MAX_DATA_XFER, with room for SET_IRQS bools
# and a VERSION's JSON.  A larger one cannot be honoured and ends the session.
MAX_MESSAGE = HEADER.size + REGION_ACCESS.size + MAX_DATA_XFER + 4096
# Replies waiting for a client that does not read them; beyond this the session ends rather
# than the server's memory growing without bound.
MAX_QUEUED_REPLIES = 64 << 20
# Receive room for more descriptors than we allow, so extras are received (then closed) rather
# than silently truncated.
_ANC_SPACE = socket.CMSG_SPACE(64 * array.array("i").itemsize)

# deliver(msg_id, command, flags, payload, fds): one complete message.  The payload is a view
# into the receive buffer, valid only during the call; the descriptors become the callee's.
Deliver = Callable[[int, int, int, memoryview, Sequence[int]], None]
_NO_FDS: tuple[int, ...] = ()


class ProtocolError(Exception):
    """The stream cannot be trusted any more: the session ends."""


class Connection:
    """The socket of the client being served, from accept until the session ends."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, deliver: Deliver,
                 lost: Callable[[str], None]):
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.deliver = deliver
        self.lost = lost
        self.open = True
        self._buf = bytearray(2 * MAX_MESSAGE)
        self._view = memoryview(self._buf)
        self._start = self._end = 0                   # the unprocessed bytes of _buf
        self._fds_for: dict[int, list[int]] = {}      # message start offset -> its descriptors
        self._out: deque[bytes] = deque()
        self._queued = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket and every descriptor not yet handed over.  Safe to call twice."""
        if not self.open:
            return
        self.open = False
        if self._out:
            self.loop.remove_writer(self.sock.fileno())
            self._out.clear()
        self._queued = 0
        self.sock.close()
        for fds in self._fds_for.values():
            close_fds(fds)
        self._fds_for.clear()

    # ---- receiving ---------------------------------------------------------------------------
    def receive(self) -> bool:
        """Read what the socket has and deliver the complete messages; False if there was
        nothing to read."""
        if not self.open:
            return False
        if len(self._buf) - self._end < MAX_MESSAGE:
            self._compact()
        chunk_start = self._end
        try:
            n, anc, msg_flags, _ = self.sock.recvmsg_into([self._view[self._end:]], _ANC_SPACE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            self.lost(f"socket error: {e}")
            return False
        fds = _fds_from(anc)
        if msg_flags & socket.MSG_CTRUNC:
            close_fds(fds)
            self.lost("client sent more file descriptors than fit in one message")
            return False
        if n == 0:
            close_fds(fds)
            self.lost("client closed the connection")
            return False
        self._end += n
        if fds:
            self._attach_fds(chunk_start, fds)
        try:
            self._process()
        except ProtocolError as e:
            log.error("vfio-user protocol error: %s", e)
            self.lost(str(e))
        except Exception as e:          # a bug of ours: end the session rather than hang it
            log.exception("vfio-user message processing failed")
            self.lost(f"internal error: {e!r}")
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
            close_fds(fds)
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
        while self.open and self._end - p >= HEADER.size:
            msg_id, command, size, flags, _ = unpack(buf, p)
            if size < HEADER.size or size > MAX_MESSAGE:
                raise ProtocolError(f"message {msg_id} (command {command}) claims {size} bytes "
                                    f"(allowed {HEADER.size}..{MAX_MESSAGE})")
            if self._end - p < size:
                break
            fds = self._fds_for.pop(p, _NO_FDS) if self._fds_for else _NO_FDS
            self._start = p + size
            self.deliver(msg_id, command, flags, view[p + HEADER.size:p + size], fds)
            p += size
        if self._start == self._end:
            self._start = self._end = 0

    # ---- sending -----------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if not self.open:
            return
        if self._out:
            self._out.append(data)
            self._queued += len(data)
            if self._queued > MAX_QUEUED_REPLIES:
                self.lost(f"client left {self._queued} bytes of replies unread")
            return
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self.lost(f"socket error while replying: {e}")
            return
        if n < len(data):
            self._out.append(data[n:])
            self._queued = len(data) - n
            self.loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        while self.open and self._out:
            data = self._out[0]
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.lost(f"socket error while replying: {e}")
                return
            self._queued -= n
            if n < len(data):
                self._out[0] = data[n:]
                return
            self._out.popleft()
        if self.open:
            self.loop.remove_writer(self.sock.fileno())


def _fds_from(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
