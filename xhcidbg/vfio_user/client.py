"""A minimal blocking vfio-user client: the socket and SCM_RIGHTS mechanics QEMU's client uses.

Used by the protocol tests and to measure the server without a VM.  It speaks through the layouts
of `protocol`, so a layout mistake would hide from tests that use it; the real check of the
layouts is a test where QEMU itself is the client (tests/test_vfu_qemu.py).
"""
from __future__ import annotations

import array
import json
import socket
from collections.abc import Sequence
from typing import Any

from .protocol import (
    HEADER,
    MAX_DATA_XFER,
    MAX_DMA_MAPS,
    MAX_MSG_FDS,
    PAGE_SIZES,
    VERSION,
    Command,
    Header,
    HeaderFlags,
)


class VfuError(Exception):
    def __init__(self, command: int, err: int):
        super().__init__(f"command {command} failed with errno {err}")
        self.command = command
        self.errno = err


class Client:
    def __init__(self, path: str, timeout: float = 5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._id = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, command: int, payload: bytes = b"", fds: Sequence[int] = (), flags: int = 0,
             size: int | None = None) -> int:
        """Send one message (`size`: what its header claims, if not its true size); its id."""
        self._id = (self._id + 1) & 0xFFFF
        msg = HEADER.pack_values(self._id, command, size or HEADER.size + len(payload), flags,
                                 0) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([msg], anc)
        return self._id

    def _recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("server closed the connection")
            out += chunk
        return out

    def recv(self) -> tuple[Header, bytes]:
        """(header, payload) of the next message."""
        hdr = HEADER.unpack(self._recv_exact(HEADER.size))
        payload = self._recv_exact(hdr.size - HEADER.size)
        return hdr, payload

    def call(self, command: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes:
        """Send a command and return the payload of its reply; VfuError for an error reply."""
        msg_id = self.send(command, payload, fds)
        hdr, body = self.recv()
        assert hdr.id == msg_id, f"reply {hdr.id} to request {msg_id}"
        assert hdr.command == command
        assert hdr.flags & HeaderFlags.TYPE_MASK == HeaderFlags.REPLY
        if hdr.flags & HeaderFlags.ERROR:
            raise VfuError(command, hdr.error)
        return body

    def version(self, caps: dict[str, Any] | None = None) -> dict[str, Any]:
        """Negotiate (by default offering the server's own limits); the server's JSON."""
        caps = caps if caps is not None else {"capabilities": {
            "max_msg_fds": MAX_MSG_FDS, "max_data_xfer_size": MAX_DATA_XFER,
            "pgsizes": PAGE_SIZES, "max_dma_maps": MAX_DMA_MAPS, "write_multiple": True}}
        body = self.call(Command.VERSION,
                         VERSION.pack_values(0, 0) + json.dumps(caps).encode() + b"\0")
        major, minor = VERSION.unpack_from(body)
        assert (major, minor) == (0, 0)
        assert body.endswith(b"\0")
        reply: dict[str, Any] = json.loads(body[VERSION.size:-1])
        return reply
