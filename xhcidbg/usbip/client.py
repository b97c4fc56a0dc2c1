"""The USB/IP client's operations: what a server exports (OP_REQ_DEVLIST) and importing one
device of it (OP_REQ_IMPORT), whose connection then carries the device's URBs.

The server is another machine: every count and length it sends is checked before it is used,
and a reply that does not add up is a `UsbipError` that says what was wrong.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any

import construct as c

from .protocol import (
    BUSID_SIZE,
    DEVICE_INFO_SIZE,
    INTERFACE_INFO_SIZE,
    OP_HEADER_SIZE,
    PORT,
    VERSION,
    DevlistCount,
    ImportRequest,
    Op,
    OpHeader,
    UsbDeviceInfo,
    UsbInterfaceInfo,
    UsbSpeed,
)

MAX_EXPORTED = 1024            # devices in one list: more is a broken server
MAX_INTERFACES = 32            # USB allows 32 interfaces per configuration
CONNECT_TIMEOUT_S = 10.0


class UsbipError(Exception):
    """The server refused, went away, or sent something that is not USB/IP."""


_ADDRESS = re.compile(r"usbip://(\[[^\]]+\]|[^/:\[\]]+)(?::(\d+))?/([^/\s,]+)")


@dataclass(frozen=True)
class UsbipAddress:
    """usbip://HOST[:PORT]/BUSID: one device a server exports."""
    host: str
    port: int
    busid: str

    @classmethod
    def parse(cls, text: str) -> UsbipAddress:
        m = _ADDRESS.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"{text!r} is not usbip://HOST[:PORT]/BUSID (e.g. "
                             f"usbip://10.0.0.5/1-1.2; `xhcidbg devices --usbip HOST` lists "
                             f"what a server exports)")
        port = int(m.group(2)) if m.group(2) else PORT
        if not 0 < port < 65536:
            raise ValueError(f"{text!r}: port {port} is not a TCP port")
        if len(m.group(3).encode()) >= BUSID_SIZE:
            raise ValueError(f"{text!r}: a bus ID has fewer than {BUSID_SIZE} bytes")
        return cls(m.group(1).strip("[]"), port, m.group(3))

    @property
    def server(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"usbip://{self.server}/{self.busid}"


def parse_server(text: str) -> tuple[str, int]:
    """HOST[:PORT] (the port defaults to 3240)."""
    m = re.fullmatch(r"(\[[^\]]+\]|[^:\[\]]+)(?::(\d+))?", text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not HOST[:PORT]")
    return m.group(1).strip("[]"), int(m.group(2)) if m.group(2) else PORT


@dataclass
class Exported:
    """One device as a server describes it."""
    info: Any                                   # a parsed UsbDeviceInfo
    interfaces: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def busid(self) -> str:
        return str(self.info.busid)

    @property
    def speed(self) -> UsbSpeed | int:
        try:
            return UsbSpeed(self.info.speed)
        except ValueError:
            return int(self.info.speed)

    def data(self) -> dict[str, Any]:
        i = self.info
        speed = self.speed
        return {"busid": self.busid, "path": str(i.path), "bus": i.busnum, "address": i.devnum,
                "id": f"{i.idVendor:04x}:{i.idProduct:04x}",
                "speed": speed.name.lower() if isinstance(speed, UsbSpeed) else speed,
                "class": [i.bDeviceClass, i.bDeviceSubClass, i.bDeviceProtocol],
                "configuration": i.bConfigurationValue,
                "interfaces": [list(x) for x in self.interfaces]}


async def _read(reader: asyncio.StreamReader, n: int, what: str) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        raise UsbipError(f"the server closed the connection in the middle of {what} "
                         f"({len(e.partial)} of {n} bytes)") from None


async def _reply(reader: asyncio.StreamReader, code: Op) -> Any:
    header = OpHeader.parse(await _read(reader, OP_HEADER_SIZE, "its reply"))
    if header.code != code:
        raise UsbipError(f"the server answered with operation {header.code:#06x}, not "
                         f"{code.name} ({code:#06x}): not a USB/IP server?")
    if header.version != VERSION:
        raise UsbipError(f"the server speaks USB/IP {header.version:#06x}; this client "
                         f"{VERSION:#06x}")
    return header


async def connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (TimeoutError, OSError) as e:
        raise UsbipError(f"cannot reach a USB/IP server at {host}:{port} ({e or 'timed out'}); "
                         "is usbipd running there, and the port open?") from None


async def list_exported(host: str, port: int = PORT, timeout: float = CONNECT_TIMEOUT_S
                        ) -> list[Exported]:
    """What the server at host:port exports (OP_REQ_DEVLIST)."""
    reader, writer = await connect(host, port, timeout)
    try:
        writer.write(OpHeader.build({"version": VERSION, "code": Op.REQ_DEVLIST, "status": 0}))
        await writer.drain()
        async with asyncio.timeout(timeout):
            await _reply(reader, Op.REP_DEVLIST)
            count = DevlistCount.parse(await _read(reader, 4, "the device count"))
            if count > MAX_EXPORTED:
                raise UsbipError(f"the server says it exports {count} devices: not believed")
            out = []
            for _ in range(count):
                info = UsbDeviceInfo.parse(await _read(reader, DEVICE_INFO_SIZE, "a device"))
                if info.bNumInterfaces > MAX_INTERFACES:
                    raise UsbipError(f"device {info.busid!r} has {info.bNumInterfaces} "
                                     f"interfaces: more than USB allows")
                interfaces = []
                for _ in range(info.bNumInterfaces):
                    i = UsbInterfaceInfo.parse(await _read(reader, INTERFACE_INFO_SIZE,
                                                           "an interface"))
                    interfaces.append((i.bInterfaceClass, i.bInterfaceSubClass,
                                       i.bInterfaceProtocol))
                out.append(Exported(info, interfaces))
            return out
    except (c.ConstructError, UnicodeDecodeError) as e:
        raise UsbipError(f"the server's device list does not parse: {e}") from None
    except TimeoutError:
        raise UsbipError(f"the server at {host}:{port} did not answer in {timeout} s") from None
    finally:
        writer.close()


async def import_device(address: UsbipAddress, timeout: float = CONNECT_TIMEOUT_S
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]:
    """Import `address` (OP_REQ_IMPORT): the connection that now carries its URBs, and the
    device as the server describes it."""
    reader, writer = await connect(address.host, address.port, timeout)
    try:
        writer.write(OpHeader.build({"version": VERSION, "code": Op.REQ_IMPORT, "status": 0})
                     + ImportRequest.build({"busid": address.busid}))
        await writer.drain()
        async with asyncio.timeout(timeout):
            header = await _reply(reader, Op.REP_IMPORT)
            if header.status != 0:
                raise UsbipError(f"{address}: the server refused the import (status "
                                 f"{header.status}): not exported, or imported by another "
                                 "client")
            info = UsbDeviceInfo.parse(await _read(reader, DEVICE_INFO_SIZE, "the device"))
        if info.busid != address.busid:
            raise UsbipError(f"{address}: the server imported {info.busid!r} instead")
        return reader, writer, info
    except BaseException as e:
        writer.close()
        if isinstance(e, TimeoutError):
            raise UsbipError(f"{address}: no answer to the import in {timeout} s") from None
        if isinstance(e, (c.ConstructError, UnicodeDecodeError)):
            raise UsbipError(f"{address}: the import reply does not parse: {e}") from None
        raise
