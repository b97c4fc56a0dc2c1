"""Linux's own USB/IP client (vhci-hcd) in a kit guest, reached by a connection from this side.

`usbip attach` in a guest connects out, and on QEMU's user network a guest's outbound connection
(a `cmd:` guestfwd with a relay process) holds every guest-to-host message longer than one
segment some 44 ms: measured with a plain socket, a 4144-byte message and its 48-byte answer
take 44 ms that way and 0.6 ms over a host forward (`forward_tcp`), 48 bytes 0.4 ms either way.
Every bulk OUT transfer and every mass-storage command is such a message.  So here the guest
listens on a forwarded port, this side connects to it and relays each connection to the USB/IP
server (RELAY, one process per connection), and the guest half does over the accepted
connection what `usbip attach` does: OP_REQ_IMPORT, the attach to a free vhci-hcd port of the
device's speed, and the record that `usbip port` and `usbip detach` read.

    vm = await Vm.start(host_root=True, forward_tcp={3240: here}, ...)   # `here`: a free port
    importer = VhciImporter(vm, here)
    await importer.listen(usbipd_port, ["1-1", "2-1"])  # the guest half started and listening
    ports = await importer.connect()                    # imported: the vhci ports, in order
    ...                                                 # `usbip detach -p N` in the guest ends one
    importer.close()                                    # relays left over are ended

The guest half is this module run as a script in the guest (the host's tree, the venv's
Python): `python -m xhcidbg.guestkit.vhci_import --port 3240 --server 127.0.0.1:N 1-1 2-1`.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..usbip.protocol import (
    DEVICE_INFO_SIZE,
    OP_HEADER_SIZE,
    PORT,
    VERSION,
    ImportRequest,
    Op,
    OpHeader,
    UsbDeviceInfo,
)
from .vudc import Speed, attach

if TYPE_CHECKING:
    from .hostroot import Job
    from .launch import Vm

VHCI_STATE = "/var/run/vhci_hcd"        # usbip attach's records: "host port busid" per port
LISTENING, ATTACHED, FAILED = "@@listening", "@@attached ", "@@failed "
# A relay process per connection: its stdin is the connection to the guest, joined to
# 127.0.0.1:argv[1] here, each direction closed when its sender closes, so that each end sees
# the other's close (a detach in the guest reaches usbipd as one).
RELAY = """import socket, sys, threading
far = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
far.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
guest = socket.socket(fileno=0)
def pump(source, sink):
    while data := source.recv(65536):
        sink.sendall(data)
    sink.shutdown(socket.SHUT_WR)
back = threading.Thread(target=pump, args=(far, guest), daemon=True)
back.start()
pump(guest, far)
back.join()
"""


# ---- in the guest ----------------------------------------------------------------------------

def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"the server closed the connection after {len(data)} of "
                                  f"{n} bytes of its import reply")
        data += chunk
    return data


def import_over(sock: socket.socket, busid: str, server: str) -> dict[str, object]:
    """OP_REQ_IMPORT `busid` over `sock`, then hand `sock` to vhci-hcd as usbip attach does."""
    sock.sendall(OpHeader.build({"version": VERSION, "code": Op.REQ_IMPORT, "status": 0})
                 + ImportRequest.build({"busid": busid}))
    header = OpHeader.parse(_exactly(sock, OP_HEADER_SIZE))
    if header.code != Op.REP_IMPORT or header.status != 0:
        raise ConnectionError(f"{busid}: the server answered operation {header.code:#06x} "
                              f"status {header.status} (not exported, or imported elsewhere?)")
    info = UsbDeviceInfo.parse(_exactly(sock, DEVICE_INFO_SIZE))
    if info.busid != busid:
        raise ConnectionError(f"the server imported {info.busid!r}, not {busid!r}")
    port = attach(sock, Speed(info.speed), devid=(info.busnum << 16) | info.devnum)
    host, _, service = server.rpartition(":")
    os.makedirs(VHCI_STATE, exist_ok=True)
    with open(f"{VHCI_STATE}/port{port.port}", "w") as f:
        f.write(f"{host} {service} {busid}\n")
    return {"busid": busid, "port": port.port, "speed": int(info.speed)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="vhci-hcd imports over accepted connections")
    p.add_argument("--port", type=int, default=PORT, help="where to listen (default 3240)")
    p.add_argument("--server", default="", help="HOST:PORT for usbip port's records")
    p.add_argument("busids", nargs="+", help="one import per accepted connection, in order")
    a = p.parse_args(argv)
    with socket.create_server(("0.0.0.0", a.port)) as listener:
        print(LISTENING, flush=True)
        for busid in a.busids:
            sock, _ = listener.accept()
            with sock:         # vhci-hcd holds its own reference once attached
                try:
                    print(ATTACHED + json.dumps(import_over(sock, busid, a.server)),
                          flush=True)
                except (OSError, ValueError) as e:
                    print(FAILED + f"{busid}: {e}", flush=True)
                    return 1
    return 0


# ---- on this side ----------------------------------------------------------------------------

class VhciImporter:
    """Imports into `vm`'s vhci-hcd from a USB/IP server on 127.0.0.1 here, through the guest
    port forwarded here as `forwarded` (`Vm.start(forward_tcp={guest_port: forwarded})`)."""

    def __init__(self, vm: Vm, forwarded: int, guest_port: int = PORT):
        self.vm, self.forwarded, self.guest_port = vm, forwarded, guest_port
        self.relays: list[subprocess.Popen[bytes]] = []
        self._job: Job | None = None
        self._count = 0

    async def listen(self, server_port: int, busids: Sequence[str],
                     timeout: float = 60.0) -> None:
        """Start the guest half for `busids` and wait until it listens (its Python started:
        seconds under TCG, kept out of what `connect` takes)."""
        if self._job is not None:
            raise RuntimeError("a listen is still waiting for its connect")
        host = self.vm.host
        self._job = await host.start(shlex.join([
            host.python_path, "-m", "xhcidbg.guestkit.vhci_import", "--port",
            str(self.guest_port), "--server", f"127.0.0.1:{server_port}", *busids]))
        self._server_port, self._count = server_port, len(busids)
        await self._job.wait_output(LISTENING, timeout)

    async def connect(self, timeout: float = 60.0) -> list[int]:
        """One relayed connection per busid given to `listen`; the vhci ports they went to."""
        job, self._job = self._job, None
        if job is None:
            raise RuntimeError("connect without listen")
        for _ in range(self._count):
            with socket.create_connection(("127.0.0.1", self.forwarded), timeout) as guest:
                guest.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                guest.settimeout(None)      # the relay reads it blocking
                self.relays.append(subprocess.Popen(
                    [sys.executable, "-c", RELAY, str(self._server_port)], stdin=guest.fileno()))
        ended = await job.wait(timeout)
        attached = [json.loads(line[len(ATTACHED):]) for line in ended.output.splitlines()
                    if line.startswith(ATTACHED)]
        if ended.status != 0 or len(attached) != self._count:
            raise RuntimeError(f"vhci-hcd did not import all of them (status {ended.status}):"
                               f"\n{ended.output}")
        self.relays = [r for r in self.relays if r.poll() is None]
        return [int(a["port"]) for a in attached]

    def close(self) -> None:
        """End the relays still running (a detach in the guest ends its own)."""
        for relay in self.relays:
            if relay.poll() is None:
                relay.kill()
            relay.wait()
        self.relays.clear()


if __name__ == "__main__":
    sys.exit(main())
