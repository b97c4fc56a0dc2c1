"""A small USB/IP server for the client's tests without VMs: it exports one of xhcidbg's
virtual devices (as usbip-host exports a real one) and can be told to misbehave.  It speaks
through the same declarations as the client (xhcidbg.usbip.protocol); the real kernel server
(usbip-host, usbipd) is what the end-to-end tests use."""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from xhcidbg.devices.base import EpType, Status, UsbTransfer
from xhcidbg.devices.descriptors import setup_packet
from xhcidbg.devices.standard import StandardDevice
from xhcidbg.usbip.protocol import (
    CMD_SUBMIT,
    ISO_PACKET,
    ISO_PACKET_SIZE,
    OP_HEADER_SIZE,
    RET_SUBMIT,
    RET_UNLINK,
    URB_HEADER,
    URB_HEADER_SIZE,
    VERSION,
    CmdUnlink,
    Command,
    DevlistCount,
    Errno,
    ImportRequest,
    Op,
    OpHeader,
    UsbDeviceInfo,
    UsbInterfaceInfo,
    UsbSpeed,
)

_ERRNO = {Status.OK: 0, Status.STALL: -Errno.EPIPE, Status.BABBLE: -Errno.EOVERFLOW,
          Status.XACT_ERROR: -Errno.EPROTO, Status.NODEV: -Errno.ENODEV,
          Status.CANCELLED: -Errno.ECONNRESET}
_SPEED = {1: UsbSpeed.LOW, 2: UsbSpeed.FULL, 3: UsbSpeed.HIGH, 4: UsbSpeed.SUPER}


@dataclass
class Served:
    submits: int = 0
    unlinks: int = 0
    unlinked_in_time: int = 0
    imports: int = 0


@dataclass
class VirtualExport:
    """Serve `device` as bus ID `busid`; `misbehave` names one way to break the protocol on the
    first bulk IN reply: "long" (more bytes than asked), "iso" (packets for a non-iso URB),
    "unknown" (a reply for a seqnum never sent)."""
    device: StandardDevice
    busid: str = "1-1"
    busnum: int = 1
    devnum: int = 2
    misbehave: str = ""
    served: Served = field(default_factory=Served)
    server: asyncio.base_events.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    clients: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", port)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and drop every connection: the server went away."""
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.close()
        self.writers.clear()
        # and let each connection's task see its end, rather than be cancelled with the loop
        if self.clients:
            await asyncio.wait(self.clients, timeout=5)

    def info(self) -> dict[str, object]:
        d = self.device.device_descriptor()
        return {"path": f"/sys/devices/virtual/{self.busid}", "busid": self.busid,
                "busnum": self.busnum, "devnum": self.devnum,
                "speed": _SPEED[int(self.device.speed)], "idVendor": d[8] | d[9] << 8,
                "idProduct": d[10] | d[11] << 8, "bcdDevice": d[12] | d[13] << 8,
                "bDeviceClass": d[4], "bDeviceSubClass": d[5], "bDeviceProtocol": d[6],
                "bConfigurationValue": 0, "bNumConfigurations": d[17], "bNumInterfaces": 1}

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.clients.add(task)
            task.add_done_callback(self.clients.discard)
        self.writers.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            op = OpHeader.parse(await reader.readexactly(OP_HEADER_SIZE))
            if op.code == Op.REQ_DEVLIST:
                writer.write(OpHeader.build({"version": VERSION, "code": Op.REP_DEVLIST,
                                             "status": 0}) + DevlistCount.build(1)
                             + UsbDeviceInfo.build(self.info())
                             + UsbInterfaceInfo.build({"bInterfaceClass": 0xFF,
                                                       "bInterfaceSubClass": 0,
                                                       "bInterfaceProtocol": 0}))
                await writer.drain()
                writer.close()
                return
            request = ImportRequest.parse(await reader.readexactly(32))
            ok = op.code == Op.REQ_IMPORT and request.busid == self.busid
            writer.write(OpHeader.build({"version": VERSION, "code": Op.REP_IMPORT,
                                         "status": 0 if ok else 1})
                         + (UsbDeviceInfo.build(self.info()) if ok else b""))
            if not ok:
                writer.close()
                return
            self.served.imports += 1
            self.device.bus_reset()             # as the exporting host enumerated it
            self.device.submit(UsbTransfer(0, EpType.CONTROL, 0,
                                           setup=setup_packet(0, 5, self.devnum)))
            await self._urbs(reader, writer)

    async def _urbs(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending: dict[int, UsbTransfer] = {}
        while True:
            header = URB_HEADER.parse(await reader.readexactly(URB_HEADER_SIZE))
            if header.command == Command.CMD_UNLINK:
                target = CmdUnlink.parse(header.body).unlink_seqnum
                self.served.unlinks += 1
                xfer = pending.pop(target, None)
                in_time = xfer is not None and self.device.cancel(xfer)
                self.served.unlinked_in_time += in_time
                writer.write(URB_HEADER.build({
                    "command": Command.RET_UNLINK, "seqnum": header.seqnum, "devid": 0,
                    "direction": 0, "ep": 0, "body": RET_UNLINK.build(
                        {"status": -Errno.ECONNRESET if in_time else 0})}))
                continue
            cmd = CMD_SUBMIT.parse(header.body)
            is_in = header.direction == 1
            length = cmd.transfer_buffer_length
            data = b"" if is_in else await reader.readexactly(length)
            self.served.submits += 1
            if cmd.number_of_packets > 0:
                raw = await reader.readexactly(cmd.number_of_packets * ISO_PACKET_SIZE)
                packets = [ISO_PACKET.parse(raw[i:i + ISO_PACKET_SIZE])
                           for i in range(0, len(raw), ISO_PACKET_SIZE)]
                self._iso(writer, header, is_in, data, packets)
                continue
            if header.ep == 0:
                xfer = UsbTransfer(0, EpType.CONTROL, length, setup=cmd.setup,
                                   data=data or None)
            else:
                address = header.ep | (0x80 if is_in else 0)
                decl = self.device.endpoint(address)
                ep_type = decl.type if decl is not None else EpType.BULK
                xfer = UsbTransfer(address, ep_type, length, data=None if is_in else data)
            xfer._on_complete = lambda x, s=header.seqnum, c=cmd, i=is_in: self._done(
                writer, pending, s, c, i, x)
            pending[header.seqnum] = xfer
            self.device.submit(xfer)

    def _iso(self, writer: asyncio.StreamWriter, header: object, is_in: bool, data: bytes,
             packets: list) -> None:
        """An isochronous URB: each packet to the device as a transfer of its own, the reply
        once all are done -- IN data compacted, as usbip-host sends it."""
        address = header.ep | (0x80 if is_in else 0)                    # type: ignore[attr-defined]
        results: list[tuple[int, bytes, int]] = []

        def finish() -> None:
            descriptors = b"".join(
                ISO_PACKET.build({"offset": p.offset, "length": p.length,
                                  "actual_length": n if kind != "iso-offset" or i else n + 1,
                                  "status": st})
                for i, (p, (st, _, n)) in enumerate(zip(packets, results, strict=True)))
            compact = b"".join(chunk for _, chunk, _ in results) if is_in else b""
            writer.write(URB_HEADER.build({
                "command": Command.RET_SUBMIT, "seqnum": header.seqnum,  # type: ignore[attr-defined]
                "devid": 0, "direction": 0, "ep": 0, "body": RET_SUBMIT.build({
                    "status": 0, "actual_length": sum(n for _, _, n in results),
                    "start_frame": 0, "number_of_packets": len(packets),
                    "error_count": sum(1 for st, _, _ in results if st)})})
                + compact + descriptors)

        kind = self.misbehave if is_in else ""
        if kind == "iso-offset":
            self.misbehave = ""
        for p in packets:
            chunk = data[p.offset:p.offset + p.length]
            xfer = UsbTransfer(address, EpType.ISOCHRONOUS, p.length,
                               data=None if is_in else chunk)

            def done(x: UsbTransfer) -> None:
                got = bytes(x.in_data()) if is_in else b""
                results.append((_ERRNO.get(x.status or Status.OK, -Errno.EPROTO), got,
                                len(got) if is_in else x.actual))
                if len(results) == len(packets):
                    finish()
            xfer._on_complete = done
            self.device.submit(xfer)

    def _done(self, writer: asyncio.StreamWriter, pending: dict[int, UsbTransfer], seqnum: int,
              cmd: object, is_in: bool, xfer: UsbTransfer) -> None:
        if pending.pop(seqnum, None) is None:
            return                              # unlinked: RET_UNLINK answered for it
        data = bytes(xfer.in_data()) if is_in else b""
        actual = len(data) if is_in else xfer.actual
        packets = getattr(cmd, "number_of_packets", 0)
        iso = b""
        if packets > 0:
            iso = ISO_PACKET.build({"offset": 0, "length": cmd.transfer_buffer_length,  # type: ignore[attr-defined]
                                    "actual_length": actual, "status": 0})
        if is_in and xfer.endpoint and self.misbehave:
            kind, self.misbehave = self.misbehave, ""
            if kind == "long":
                data += bytes(64)
                actual = len(data)
            elif kind == "iso":
                packets, iso = 1, ISO_PACKET.build({"offset": 0, "length": actual,
                                                    "actual_length": actual, "status": 0})
            elif kind == "unknown":
                seqnum += 1000
        writer.write(URB_HEADER.build({
            "command": Command.RET_SUBMIT, "seqnum": seqnum, "devid": 0, "direction": 0,
            "ep": 0, "body": RET_SUBMIT.build({
                "status": _ERRNO.get(xfer.status or Status.OK, -Errno.EPROTO),
                "actual_length": actual, "start_frame": 0,
                "number_of_packets": packets, "error_count": 0})}) + data + iso)
