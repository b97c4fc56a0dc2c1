"""A kit guest exports its gadgets over USB/IP, and this machine (not the guest) sees the list.

One boot for the module, with the host's root (where Debian's usbip tools are unpacked) and
guest port 3240 forwarded to a free port on 127.0.0.1 over an isolated user network.  Gadget
Zero's SourceSink (0525:a4a0) is plugged into dummy_hcd; `usbip bind` hands it to usbip-host
and usbipd offers it.  From here, a TCP connection to the forwarded port and an OP_REQ_DEVLIST
get back a reply that names its busid, its IDs and its one vendor-specific interface; after
`usbip unbind` the list is empty.  The few protocol bytes are spelled out here, on purpose apart
from the project's own USB/IP code.
"""
from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

import pytest

from xhcidbg.guestkit.gadgets import Gadget, Gadgets, Pattern, SourceSink
from xhcidbg.guestkit.launch import Vm
from xhcidbg.guestkit.testing import guest_kit
from xhcidbg.guestkit.usbip import AVAILABLE, USBIP_PORT, UsbipExporter, ensure_usbip_tools

pytestmark = pytest.mark.e2e

ZERO = Gadget("zero", [SourceSink(pattern=Pattern.MOD63)], product="Gadget Zero",
              serial="xhcidbg-usbip-1")

# Linux Documentation/usb/usbip_protocol.rst: big-endian; a common header of version, code and
# status; OP_REP_DEVLIST then a device count, each device 312 bytes plus 4 per interface.
VERSION, OP_REQ_DEVLIST, OP_REP_DEVLIST = 0x0111, 0x8005, 0x0005
HEADER = struct.Struct(">HHI")
DEVICE = struct.Struct(">256s32sIIIHHHBBBBBB")
INTERFACE = struct.Struct(">BBBx")


@dataclass
class Listed:
    path: str
    busid: str
    busnum: int
    devnum: int
    speed: int
    ids: tuple[int, int]
    configuration: int
    interfaces: list[tuple[int, int, int]]


async def devlist(host: str, port: int) -> list[Listed]:
    """What the server at host:port exports, by OP_REQ_DEVLIST (the server then closes)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(HEADER.pack(VERSION, OP_REQ_DEVLIST, 0))
        await writer.drain()
        version, code, status = HEADER.unpack(await reader.readexactly(HEADER.size))
        assert (version, code, status) == (VERSION, OP_REP_DEVLIST, 0)
        (count,) = struct.unpack(">I", await reader.readexactly(4))
        listed = []
        for _ in range(count):
            (path, busid, busnum, devnum, speed, vendor, product, _bcd, _cls, _sub, _proto,
             configuration, _configs, n_interfaces) = DEVICE.unpack(
                await reader.readexactly(DEVICE.size))
            interfaces = [INTERFACE.unpack(await reader.readexactly(INTERFACE.size))
                          for _ in range(n_interfaces)]
            listed.append(Listed(path.rstrip(b"\0").decode(), busid.rstrip(b"\0").decode(),
                                 busnum, devnum, speed, (vendor, product), configuration,
                                 interfaces))
        assert await reader.read() == b""          # nothing after the list
        return listed
    finally:
        writer.close()


class UsbipGuest:
    def __init__(self, loop: asyncio.AbstractEventLoop, vm: Vm, exporter: UsbipExporter):
        self.loop = loop
        self.vm = vm
        self.exporter = exporter

    def run(self, coroutine, timeout: float = 120.0):
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    def devlist(self) -> list[Listed]:
        return self.run(devlist(*self.exporter.address), 30)


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    qemu, kernel, initrd = guest_kit()     # skips only offline, and never under CI=true
    tools = ensure_usbip_tools()
    folder = tmp_path_factory.mktemp("usbip")
    loop = asyncio.new_event_loop()
    vm = None
    try:
        vm = loop.run_until_complete(asyncio.wait_for(Vm.start(
            qemu=qemu, kernel=kernel, initrd=initrd, host_root=True,
            forward_tcp={USBIP_PORT: 0}, log=folder / "serial.log", progress=False), 360))
        exporter = UsbipExporter(vm, tools)
        g = UsbipGuest(loop, vm, exporter)
        yield g
    finally:
        if vm is not None:
            loop.run_until_complete(asyncio.wait_for(vm.stop(), 60))
        loop.close()


def test_the_guest_is_reached_only_through_the_forwarded_port(guest):
    host, port = guest.exporter.address
    assert host == "127.0.0.1" and port == guest.vm.forwarded_tcp[USBIP_PORT] != USBIP_PORT
    assert "restrict=on" in " ".join(guest.vm.argv) and "-nic" not in guest.vm.argv
    address = guest.run(guest.vm.console.run("ip -4 -o addr show dev eth0", check=True)).output
    assert "10.0.2.15/24" in address


def test_a_bound_gadget_is_listed_from_this_machine_and_gone_after_unbind(guest):
    usb = Gadgets(guest.vm)
    guest.run(usb.load(udcs=1))
    plugged = guest.run(usb.plug(ZERO))
    guest.run(guest.exporter.start())
    assert guest.devlist() == []                   # usbipd up, nothing bound yet
    busid = guest.run(guest.exporter.bind(plugged))
    assert busid == plugged.sysfs.rsplit("/", 1)[-1] and "-" in busid
    assert guest.run(guest.exporter.status(busid)) == AVAILABLE
    [listed] = guest.devlist()
    assert listed.busid == busid and listed.path == plugged.sysfs
    assert (listed.busnum, listed.devnum) == (plugged.busnum, plugged.devnum)
    assert listed.speed == 3                        # USB_SPEED_HIGH
    assert listed.ids == (0x0525, 0xA4A0) and listed.configuration == 1
    assert listed.interfaces == [(0xFF, 0, 0)]      # SourceSink: vendor specific
    guest.run(guest.exporter.unbind(busid))
    assert guest.devlist() == []
    guest.run(guest.exporter.stop())
