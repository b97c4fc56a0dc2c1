"""A kit guest exports its gadgets over USB/IP, and this machine (not the guest) sees the list.

One boot for the module, with the host's root (where Debian's usbip tools are unpacked) and
guest port 3240 forwarded to a free port on 127.0.0.1 over an isolated user network.  Gadget
Zero's SourceSink (0525:a4a0) is plugged into dummy_hcd; `usbip bind` hands it to usbip-host
and usbipd offers it.  From here, a TCP connection to the forwarded port and an OP_REQ_DEVLIST
get back a reply that names its busid, its IDs and its one vendor-specific interface; after
`usbip unbind` the list is empty.  Last, Linux's own client (vhci-hcd, in the guest) imports the
export, so the server end is known to work for a client, not only to list: once by `usbip
attach` over the guest's loopback, once over a connection made from here (VhciImporter).  The
few protocol bytes are spelled out here, on purpose apart from the project's own USB/IP code.
"""
from __future__ import annotations

import asyncio
import os
import struct
from dataclasses import dataclass

import pytest

from xhcidbg.guestkit.gadgets import Gadget, Gadgets, Pattern, Plugged, SourceSink
from xhcidbg.guestkit.launch import Vm
from xhcidbg.guestkit.report import OfflineError
from xhcidbg.guestkit.testing import guest_kit
from xhcidbg.guestkit.usbip import AVAILABLE, USBIP_PORT, USED, UsbipExporter, ensure_usbip_tools
from xhcidbg.guestkit.vhci_import import VhciImporter

pytestmark = pytest.mark.e2e

ZERO = Gadget("zero", [SourceSink(pattern=Pattern.MOD63)], product="Gadget Zero",
              serial="xhcidbg-usbip-1")
IMPORT_PORT = 3241          # where VhciImporter's guest half listens

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
    """The booted VM, its plugged gadget and exporter, and the loop they run on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, vm: Vm, exporter: UsbipExporter,
                 plugged: Plugged):
        self.loop = loop
        self.vm = vm
        self.exporter = exporter
        self.plugged = plugged

    def run(self, coroutine, timeout: float = 120.0):
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    def devlist(self) -> list[Listed]:
        """What usbipd exports, asked from this machine through the forwarded port."""
        return self.run(devlist(*self.exporter.address), 30)

    def shell(self, command: str) -> str:
        """A command in the kit's own shell (busybox, the initramfs tree)."""
        result = self.run(self.vm.console.run(command, 60))
        assert result.ok, f"guest command {command!r} failed ({result.status}):\n{result.output}"
        return result.output

    def usbip(self, *args: str) -> str:
        """Debian's usbip, chrooted in this machine's tree in the guest."""
        tools = self.exporter.tools
        assert tools is not None
        return self.run(self.vm.host.run(tools.command("usbip", *args), 60, check=True)).output


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    qemu, kernel, initrd = guest_kit()     # skips only offline, and never under CI=true
    try:
        tools = ensure_usbip_tools()
    except OfflineError as e:
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip(f"USB/IP tools unavailable offline: {e}")
    folder = tmp_path_factory.mktemp("usbip")
    loop = asyncio.new_event_loop()
    vm = None
    try:
        vm = loop.run_until_complete(asyncio.wait_for(Vm.start(
            qemu=qemu, kernel=kernel, initrd=initrd, host_root=True,
            forward_tcp={USBIP_PORT: 0, IMPORT_PORT: 0}, log=folder / "serial.log",
            progress=False), 360))
        usb = Gadgets(vm)
        loop.run_until_complete(asyncio.wait_for(usb.load(udcs=1), 120))
        plugged = loop.run_until_complete(asyncio.wait_for(usb.plug(ZERO), 120))
        yield UsbipGuest(loop, vm, UsbipExporter(vm, tools), plugged)
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
    # restrict=on: the guest reaches nothing here, not even QEMU's own listener on that port
    # (10.0.2.2 is this machine's 127.0.0.1 for an unrestricted guest, which gets connected).
    tried = guest.run(guest.vm.console.run(f"nc -w 3 10.0.2.2 {port} < /dev/null", 30))
    assert not tried.ok and "refused" in tried.output, tried.output


def test_a_bound_gadget_is_listed_from_this_machine_and_gone_after_unbind(guest):
    plugged = guest.plugged
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



def test_linuxs_own_client_imports_the_export(guest):
    # The reference client (vhci-hcd, in the same guest over its loopback), so that a later
    # failure of another client is not the server's: the device comes up configured on vhci.
    guest.run(guest.exporter.start())
    busid = guest.run(guest.exporter.bind(guest.plugged))
    guest.shell("modprobe vhci-hcd")
    guest.usbip("attach", "-r", "127.0.0.1", "-b", busid)
    assert guest.run(guest.exporter.status(busid)) == USED
    wait = ("i=0; until for d in /sys/devices/platform/vhci_hcd.*/usb*/*-*/; do"
            " [ -n \"$(cat $d/bConfigurationValue 2>/dev/null)\" ] && break; d=; done;"
            " [ -n \"$d\" ]; do i=$((i+1)); [ $i -lt 400 ] || exit 1; usleep 50000; done;")
    seen = guest.shell(wait + " cat $d/idVendor $d/idProduct $d/bConfigurationValue").split()
    assert seen == ["0525", "a4a0", "1"]
    guest.usbip("detach", "-p", "0")
    guest.shell(f"i=0; until [ \"$(cat /sys/bus/usb/devices/{busid}/usbip_status)\" ="
                f" {AVAILABLE} ]; do i=$((i+1)); [ $i -lt 400 ] || exit 1; usleep 50000; done")
    guest.run(guest.exporter.unbind(busid))
    guest.run(guest.exporter.stop())


def test_vhci_imports_over_a_connection_made_from_this_machine(guest):
    # What bench/usbip_chain.py gives vhci: the guest listens, this side connects and relays
    # to usbipd; the guest half imports and attaches as `usbip attach` would.
    guest.run(guest.exporter.start())
    busid = guest.run(guest.exporter.bind(guest.plugged))
    guest.shell("modprobe vhci-hcd")
    importer = VhciImporter(guest.vm, guest.vm.forwarded_tcp[IMPORT_PORT], IMPORT_PORT)
    _, usbipd = guest.exporter.address
    try:
        guest.run(importer.listen(usbipd, [busid]))
        [port] = guest.run(importer.connect())
        assert guest.run(guest.exporter.status(busid)) == USED
        wait = (f"i=0; until d=$(echo /sys/devices/platform/vhci_hcd.0/usb*/*-{port + 1});"
                " [ -n \"$(cat $d/bConfigurationValue 2>/dev/null)\" ]; do i=$((i+1));"
                " [ $i -lt 400 ] || exit 1; usleep 50000; done;")
        seen = guest.shell(wait + " cat $d/idVendor $d/idProduct $d/serial").split()
        assert seen == ["0525", "a4a0", ZERO.serial]
        # usbip's own tools see the import as theirs: the port in use, the record it wrote
        listed = guest.usbip("port")
        assert f"Port {port:02d}: <Port in Use>" in listed, listed
        assert f"-> usbip://127.0.0.1:{usbipd}/{busid}" in listed, listed
        [relay] = importer.relays
        guest.usbip("detach", "-p", str(port))
        guest.shell(f"i=0; until [ \"$(cat /sys/bus/usb/devices/{busid}/usbip_status)\" ="
                    f" {AVAILABLE} ]; do i=$((i+1)); [ $i -lt 400 ] || exit 1; usleep 50000;"
                    " done")
        assert relay.wait(30) == 0          # both ends closed: the relay has ended by itself
    finally:
        importer.close()
    guest.run(guest.exporter.unbind(busid))
    guest.run(guest.exporter.stop())
