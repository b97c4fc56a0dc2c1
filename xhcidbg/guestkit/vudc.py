"""USB/IP inside a kit guest: devices on vhci-hcd, so that the guest has isochronous IN.

vhci-hcd is a host controller whose devices live at the other end of a stream socket, spoken to
in USB/IP (CMD_SUBMIT, RET_SUBMIT, CMD_UNLINK, RET_UNLINK).  Nothing needs a network: a socketpair
made in the guest joins vhci-hcd's end (written to /sys/devices/platform/vhci_hcd.0/attach as
"port sockfd devid speed") to one of two device sides:

- `VudcGadgets`: the kernel's usbip-vudc, a UDC whose configfs gadget (gadgets.py's `Gadget`, as
  declared there) answers over USB/IP (its socket goes to the UDC's `usbip_sockfd`).  Control,
  bulk and interrupt data move; isochronous data does not: vudc offers iso-capable endpoints (a
  SourceSink binds with its alt 1 iso pair) but vudc_transfer.c's v_timer answers every iso URB
  with -EXDEV under "TODO: support", so each packet reaches libusb as an error with no data.
- `IsoSources`: `IsoSource`, a USB/IP device served by a Python process in the guest (this
  module run as a script), with isochronous IN and OUT endpoints whose packets, lengths and
  per-packet statuses it decides.  usbcore, usbfs and libusb in the guest see a device on a real
  Linux host controller driver; only the device side is software, as for every gadget.

    sources = IsoSources(vm)                # vm = await Vm.start(host_root=True)
    plugged = await sources.plug(IsoSource("iso", lengths=(1024, 512, 0)))
    await sources.unplug(plugged)           # vhci detach: the host side has dropped it

The kernel holds both ends of the socketpair once written (sockfd_lookup), so the process that
made them may close them: a vudc link is a one-shot command, an IsoSource lives as long as it
serves.  Detaching the vhci port shuts the socket: usbip-vudc returns to "available" (its
usbip_status 1) with the gadget still bound, ready for a new link.  In this kernel (Debian 6.1)
vhci-hcd makes 8 controllers of 15 high-speed and 15 SuperSpeed ports; usbcore has configured
the device about 0.5 s after the attach, and usbfs opens it from then on.  What a plug waits for
is mostly the guest's Python starting: under TCG, over 9p, an IsoSource's process takes 3 to 4 s
to reach its attach, 8 s the first time in a VM (`guest_command`).
"""
from __future__ import annotations

import argparse
import errno
import glob
import heapq
import json
import os
import pathlib
import select
import shlex
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from .gadgets import GADGET_MODULES, Gadget, Plugged

if TYPE_CHECKING:
    from ..devices.base import Speed as BusSpeed
    from ..devices.declaration import Configuration
    from ..devices.descriptor_set import DescriptorSet
    from .hostroot import Job, Shell
    from .launch import SerialConsole, Vm

VHCI = "/sys/devices/platform/vhci_hcd.0"       # attach, detach and status live on the first
VUDC_MODULE, VHCI_MODULE = "usbip-vudc", "vhci-hcd"     # modprobe brings usbip-core with them
UDC_PREFIX = "usbip-vudc."
AVAILABLE = 1           # usbip_status of a vudc that can take a socket (SDEV_ST_AVAILABLE)
PORT_FREE = 4           # a vhci port's status with nothing attached (VDEV_ST_NULL)


class Speed(IntEnum):
    """What vhci's attach takes: the kernel's enum usb_device_speed."""
    LOW = 1
    FULL = 2
    HIGH = 3
    SUPER = 5


MBPS = {Speed.LOW: 2, Speed.FULL: 12, Speed.HIGH: 480, Speed.SUPER: 5000}   # sysfs `speed`


# ---- in the guest: attaching to vhci-hcd (stdlib only, run from the host's tree) --------------

@dataclass
class VhciPort:
    """A vhci-hcd root port: `port` is what attach and detach take, counted over every
    controller, each with its high-speed ports first, then its SuperSpeed ones."""
    port: int
    controller: int     # vhci_hcd.N
    rhport: int         # 0-based on that controller's root hub of the port's kind

    def sysfs_glob(self) -> str:
        """The device's sysfs directory, on either root hub of the controller (an attach goes
        to the hub of its speed; `wait_plugged` keeps the one whose hub is that fast)."""
        return f"/sys/devices/platform/vhci_hcd.{self.controller}/usb*/*-{self.rhport + 1}"


def free_port(speed: Speed) -> VhciPort:
    """The first vhci port of `speed`'s kind (SuperSpeed or not) with nothing attached, read
    from the status files (`status`, `status.1`, ...: "hub port sta spd dev sockfd busid")."""
    kind = "ss" if speed is Speed.SUPER else "hs"
    def suffix_number(path: str) -> int:
        suffix = path.rpartition("/status")[2].lstrip(".")
        return int(suffix or 0)

    files = sorted(glob.glob(f"{VHCI}/status*"), key=suffix_number)
    ports: list[tuple[str, int, int]] = []
    for name in files:
        with open(name) as f:
            for line in f.read().splitlines()[1:]:
                words = line.split()
                ports.append((words[0], int(words[1]), int(words[2])))
    per_controller = len(ports) // max(len(files), 1)
    for hub, number, status in ports:
        if hub == kind and status == PORT_FREE:
            return VhciPort(number, number // per_controller, number % (per_controller // 2))
    raise RuntimeError(f"every {kind} port of vhci-hcd is taken")


def attach(sock: socket.socket, speed: Speed, devid: int = 1) -> VhciPort:
    """Hand `sock` to vhci-hcd on a free port: a device of `speed` appears there."""
    port = free_port(speed)
    with open(f"{VHCI}/attach", "w") as f:
        f.write(f"{port.port} {sock.fileno()} {devid} {int(speed)}")
    return port


def link_udc(udc: str, speed: Speed = Speed.HIGH) -> VhciPort:
    """Join the bound gadget of vudc `udc` to vhci-hcd; both ends stay with the kernel."""
    device_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with device_end, host_end:
        with open(f"/sys/class/udc/{udc}/device/usbip_sockfd", "w") as f:
            f.write(str(device_end.fileno()))
        return attach(host_end, speed)


# ---- in the guest: a USB/IP device of our own ------------------------------------------------
# The server below speaks xhcidbg.usbip.protocol's declarations and answers with descriptors
# that xhcidbg.devices builds; both need construct, so the server imports them when it is made,
# which leaves the rest of this module importable by a Python started without site (-S).

ISO_SOURCE_IDS = (0x1D6B, 0x0104)   # Linux Foundation "multifunction composite": usbtest and
# other drivers leave it to usbfs, unlike g_zero's 0525:a4a0.


def iso_packet(index: int, length: int) -> bytes:
    """What an IsoSource sends as its `index`th IN packet (counted from the SET_INTERFACE that
    selected alt 1): byte i is (index + i) % 256, so a lost, doubled or reordered packet shows
    in its first byte and a shifted one in the rest."""
    return bytes((index + i) & 0xFF for i in range(length))


@dataclass
class IsoSource:
    """A device with one vendor interface: alt 0 without endpoints, alt 1 with isochronous IN
    0x81 (and OUT 0x01, a sink that takes every packet) of `max_packet` bytes, `mult` extra
    transactions per microframe (high speed), every 2**(interval-1) (micro)frames.

    Packet k of the IN stream is `iso_packet(k, lengths[k % len(lengths)])` (cut to what the
    host asked, status -EOVERFLOW then) unless statuses[k % len(statuses)] is an error (a
    negative errno: the packet has no data).  Each transfer is answered when its last packet's
    (micro)frame has passed, counting from the end of the transfer before it.
    """
    name: str
    max_packet: int = 1024
    interval: int = 1
    mult: int = 0
    speed: Speed = Speed.HIGH
    lengths: Sequence[int] = ()             # default: every packet max_packet * (mult + 1)
    statuses: Sequence[int] = (0,)
    ids: tuple[int, int] = ISO_SOURCE_IDS
    serial: str = ""                        # default: the name

    def __post_init__(self) -> None:
        if self.speed not in (Speed.FULL, Speed.HIGH):
            raise ValueError("an IsoSource runs at full or high speed")
        limit = 1023 if self.speed is Speed.FULL else 1024
        if not 0 < self.max_packet <= limit or not 1 <= self.interval <= 16:
            raise ValueError(f"max_packet 1..{limit} and interval 1..16")
        if not 0 <= self.mult <= (2 if self.speed is Speed.HIGH else 0):
            raise ValueError("mult 0..2, at high speed only")
        if not self.statuses or any(s > 0 for s in self.statuses):
            raise ValueError("statuses are 0 or negative errnos")

    @property
    def packet_bytes(self) -> int:
        return self.max_packet * (self.mult + 1)

    @property
    def period(self) -> float:
        """Seconds between packets: (micro)frames of 125 us at high speed, 1 ms at full."""
        return (125e-6 if self.speed is Speed.HIGH else 1e-3) * 2 ** (self.interval - 1)

    def packet(self, index: int, asked: int) -> tuple[int, bytes]:
        """(status, data) of IN packet `index` where the host asked for `asked` bytes."""
        status = self.statuses[index % len(self.statuses)]
        if status:
            return status, b""
        lengths = self.lengths or (self.packet_bytes,)
        length = lengths[index % len(lengths)]
        if length > asked:
            return -errno.EOVERFLOW, iso_packet(index, asked)
        return 0, iso_packet(index, length)

    def descriptors(self) -> DescriptorSet:
        """Its descriptors, declared as the virtual devices declare theirs and built by the
        same `DescriptorSet`: one speed, so no device qualifier; strings 1-3 are the
        manufacturer, the product and the serial number."""
        from ..devices.base import EpType
        from ..devices.declaration import Configuration, EndpointDecl, Interface
        from ..devices.descriptor_set import DescriptorSet

        interval_us = round(self.period * 1e6)
        endpoints = tuple(EndpointDecl(address, EpType.ISOCHRONOUS, self.max_packet,
                                       interval_us, hs_mult=self.mult)
                          for address in (0x81, 0x01))
        configuration = Configuration(interfaces=(Interface(0), Interface(0, endpoints, 1)))
        vendor, product = self.ids
        return DescriptorSet(_IsoSourceDevice(
            vendor, product, product=f"xhcidbg iso source {self.name}",
            serial_number=self.serial or self.name, speeds=(self.bus_speed,),
            configurations=(configuration,)))

    @property
    def bus_speed(self) -> BusSpeed:
        """`speed` as xhcidbg.devices counts speeds."""
        from ..devices.base import Speed as BusSpeed
        return BusSpeed.HIGH if self.speed is Speed.HIGH else BusSpeed.FULL

    def device_descriptor(self) -> bytes:
        return self.descriptors().device(self.bus_speed)

    def configuration_descriptor(self) -> bytes:
        return self.descriptors().configuration(0, self.bus_speed)

    def arguments(self) -> list[str]:
        """This module's command line that serves the source (see `main`)."""
        return ["iso-source", json.dumps({
            "name": self.name, "max_packet": self.max_packet, "interval": self.interval,
            "mult": self.mult, "speed": int(self.speed), "lengths": list(self.lengths),
            "statuses": list(self.statuses), "ids": list(self.ids), "serial": self.serial})]

    @classmethod
    def from_argument(cls, text: str) -> IsoSource:
        values = json.loads(text)
        values["speed"] = Speed(values["speed"])
        values["ids"] = tuple(values["ids"])
        return cls(**values)


@dataclass
class _IsoSourceDevice:
    """The device level of an IsoSource's declaration (a `DeviceDeclaration`)."""
    vendor_id: int
    product_id: int
    product: str | None
    serial_number: str | None
    speeds: tuple[BusSpeed, ...]
    configurations: tuple[Configuration, ...]
    manufacturer: str | None = "xhcidbg"
    device_version: int = 0x0100
    device_class: int = 0
    device_subclass: int = 0
    device_protocol: int = 0


@dataclass
class _Served:
    """What a serving IsoSource has done, printed as JSON when it ends."""
    transfers: int = 0
    in_packets: int = 0
    out_packets: int = 0
    out_bytes: int = 0
    unlinked: int = 0
    control: list[str] = field(default_factory=list)     # the requests, "bmRequestType:bRequest"


class _Server:
    """One IsoSource's side of a USB/IP stream: control on ep0, isochronous on 0x81/0x01."""

    def __init__(self, source: IsoSource, sock: socket.socket):
        from ..usbip import protocol

        self.source, self.sock = source, sock
        # Together these imports take one to two seconds under TCG: made here, before the
        # attach, so that usbcore's first GET_DESCRIPTOR (5 s to answer) does not wait on them.
        self.wire = protocol
        self.descriptors = source.descriptors()
        self.configuration = 0
        self.alternate = 0
        self.next_packet = 0                    # index of the next IN packet
        self.busy_until: dict[int, float] = {}  # endpoint address -> when its last packet ends
        self.pending: list[tuple[float, int, bytes]] = []   # (due, seqnum, RET_SUBMIT) heap
        self.served = _Served()
        self.start = time.monotonic()

    def reply(self, command: int, seqnum: int, body: bytes) -> bytes:
        """A RET_SUBMIT or RET_UNLINK header with its command-specific `body`."""
        message: bytes = self.wire.URB_HEADER.build({
            "command": command, "seqnum": seqnum, "devid": 0, "direction": 0, "ep": 0,
            "body": body})
        return message

    def ret_submit(self, seqnum: int, status: int, data: bytes = b"",
                   packets: Sequence[Mapping[str, int]] = (), frame: int = 0) -> bytes:
        """RET_SUBMIT with its IN data (compacted, for isochronous) and packet descriptors."""
        wire = self.wire
        actual = sum(p["actual_length"] for p in packets) if packets else len(data)
        body = wire.RET_SUBMIT.build({
            "status": status, "actual_length": actual, "start_frame": frame,
            "number_of_packets": len(packets),
            "error_count": sum(p["status"] != 0 for p in packets)})
        iso = b"".join(wire.ISO_PACKET.build(p) for p in packets)
        return self.reply(wire.Command.RET_SUBMIT, seqnum, body) + data + iso

    def control(self, setup: bytes, data: bytes) -> tuple[int, bytes]:
        """(status, IN data) of a control request; -EPIPE is a stall."""
        from ..devices.declaration import Request
        from ..devices.descriptors import DescriptorType
        from ..devices.descriptors import StandardRequest as R

        request = Request(setup, data=data)
        kind, value, index = request.request_type, request.value, request.index
        self.served.control.append(f"{kind:#04x}:{request.request}")
        answer: bytes | None = None
        if kind == 0x80 and request.request == R.GET_DESCRIPTOR:
            which, number = value >> 8, value & 0xFF
            speed = self.source.bus_speed
            if which == DescriptorType.DEVICE:
                answer = self.descriptors.device(speed)
            elif which == DescriptorType.CONFIGURATION and number == 0:
                answer = self.descriptors.configuration(0, speed)
            elif which == DescriptorType.STRING:
                answer = self.descriptors.string(number)
        elif kind == 0x00 and request.request == R.SET_CONFIGURATION:
            self.configuration, self.alternate = value & 0xFF, 0
            answer = b""
        elif kind == 0x80 and request.request == R.GET_CONFIGURATION:
            answer = bytes([self.configuration])
        elif kind == 0x01 and request.request == R.SET_INTERFACE and index == 0 and value <= 1:
            self.alternate = value
            self.next_packet = 0
            self.busy_until.clear()
            answer = b""
        elif kind == 0x81 and request.request == R.GET_INTERFACE and index == 0:
            answer = bytes([self.alternate])
        elif kind in (0x80, 0x81, 0x82) and request.request == R.GET_STATUS:
            answer = bytes(2)
        elif kind in (0x00, 0x02) and request.request in (R.CLEAR_FEATURE, R.SET_FEATURE):
            answer = b""
        if answer is None:
            return -errno.EPIPE, b""
        return 0, answer[:request.length]

    def isochronous(self, seqnum: int, address: int,
                    asked: Sequence[tuple[int, int]]) -> tuple[float, bytes]:
        """(when it is due, RET_SUBMIT) of an isochronous transfer of packets asking these
        (offset, length)s."""
        source = self.source
        now = time.monotonic()
        begin = max(now, self.busy_until.get(address, 0.0))
        due = begin + len(asked) * source.period
        self.busy_until[address] = due
        data, packets = [], []
        for offset, length in asked:
            if self.alternate != 1:
                status, chunk = -errno.EPIPE, b""           # no such endpoint in alt 0
            elif address & 0x80:
                status, chunk = source.packet(self.next_packet, length)
                self.next_packet += 1
                self.served.in_packets += 1
            else:
                status, chunk = 0, b""
                self.served.out_packets += 1
                self.served.out_bytes += length
            size = len(chunk) if address & 0x80 else (length if status == 0 else 0)
            data.append(chunk)
            packets.append({"offset": offset, "length": length, "actual_length": size,
                            "status": status})
        self.served.transfers += 1
        frame = int((begin - self.start) / source.period) & 0xFFFF
        return due, self.ret_submit(seqnum, 0, b"".join(data), packets, frame)

    def handle(self, buffer: bytearray) -> int:
        """Take one whole message from the front of `buffer`; the bytes used (0: not whole)."""
        wire = self.wire
        head = wire.URB_HEADER_SIZE
        if len(buffer) < head:
            return 0
        header = wire.URB_HEADER.parse(bytes(buffer[:head]))
        if header.command == wire.Command.CMD_UNLINK:
            victim = wire.CmdUnlink.parse(header.body).unlink_seqnum
            waiting = [p for p in self.pending if p[1] == victim]
            status = 0
            if waiting:                 # not answered yet: it never will be
                self.pending.remove(waiting[0])
                heapq.heapify(self.pending)
                status = -errno.ECONNRESET
                self.served.unlinked += 1
            self.sock.sendall(self.reply(wire.Command.RET_UNLINK, header.seqnum,
                                         wire.RET_UNLINK.build({"status": status})))
            return head
        if header.command != wire.Command.CMD_SUBMIT:
            raise RuntimeError(f"USB/IP command {header.command} is not for a device")
        submit = wire.CMD_SUBMIT.parse(header.body)
        is_in = header.direction == wire.Direction.IN
        out = 0 if is_in else submit.transfer_buffer_length
        packets = max(submit.number_of_packets, 0)
        step = wire.ISO_PACKET_SIZE
        size = head + out + step * packets
        if len(buffer) < size:
            return 0
        data = bytes(buffer[head:head + out])
        address = header.ep | (0x80 if is_in else 0)
        if header.ep == 0:
            status, answer = self.control(submit.setup, data)
            self.sock.sendall(self.ret_submit(header.seqnum, status, answer))
        elif header.ep == 1 and packets > 0:
            start = head + out
            asked = [wire.ISO_PACKET.parse(bytes(buffer[at:at + step]))
                     for at in range(start, size, step)]
            due, message = self.isochronous(header.seqnum, address,
                                            [(p.offset, p.length) for p in asked])
            heapq.heappush(self.pending, (due, header.seqnum, message))
        else:
            self.sock.sendall(self.ret_submit(header.seqnum, -errno.EPIPE))
        return size

    def serve(self) -> None:
        """Answer until vhci-hcd closes the stream (detach, or the device disconnected)."""
        buffer = bytearray()
        while True:
            now = time.monotonic()
            while self.pending and self.pending[0][0] <= now:
                _, _, message = heapq.heappop(self.pending)
                self.sock.sendall(message)
            wait = self.pending[0][0] - now if self.pending else None
            readable, _, _ = select.select([self.sock], [], [], wait)
            if not readable:
                continue
            try:
                chunk = self.sock.recv(1 << 16)
            except (ConnectionResetError, OSError):
                return
            if not chunk:
                return
            buffer += chunk
            while used := self.handle(buffer):
                del buffer[:used]


def serve_iso_source(source: IsoSource) -> None:
    """Attach `source` to vhci-hcd and serve it until detached; prints "@@ attached PORT
    CONTROLLER RHPORT" once attached and "@@ served {json}" at the end."""
    device_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with device_end:
        server = _Server(source, device_end)    # ready before usbcore's first request
        with host_end:
            port = attach(host_end, source.speed)
        print(f"@@ attached {port.port} {port.controller} {port.rhport}", flush=True)
        try:
            server.serve()
        finally:
            print(f"@@ served {json.dumps(server.served.__dict__)}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """`link UDC [SPEED]`: join a bound vudc gadget to vhci-hcd, print "PORT CONTROLLER
    RHPORT"; `iso-source JSON`: serve an IsoSource (`IsoSource.arguments`)."""
    parser = argparse.ArgumentParser(prog="python -m xhcidbg.guestkit.vudc")
    commands = parser.add_subparsers(dest="command", required=True)
    link = commands.add_parser("link")
    link.add_argument("udc")
    link.add_argument("speed", nargs="?", type=int, default=int(Speed.HIGH))
    source = commands.add_parser("iso-source")
    source.add_argument("declaration")
    arguments = parser.parse_args(argv)
    if arguments.command == "link":
        port = link_udc(arguments.udc, Speed(arguments.speed))
        print(port.port, port.controller, port.rhport)
    else:
        serve_iso_source(IsoSource.from_argument(arguments.declaration))
    return 0


# ---- from the machine that runs the VM -------------------------------------------------------

# The tree holding the xhcidbg package, the same path in the guest's chroot.
PACKAGE_ROOT = str(pathlib.Path(__file__).resolve().parents[2])


def guest_command(python: str, *arguments: str) -> str:
    """The chroot command that runs `main` with `arguments`, with the venv's site-packages
    (an IsoSource's server needs construct).  Measured in a kit VM (TCG, the tree over 9p),
    from the job's start to "@@ attached": 3 to 4 s, 8 s the first time in a VM; the
    stdlib-only server this replaced, started without `site`, took 1.5 to 2.5 s (3 s first).
    Of the difference, `site` is some 0.3 s, construct with usbip.protocol 0.5 to 0.8 s and
    the xhcidbg.devices package (which imports every device) 0.5 to 1 s."""
    code = (f"import sys; sys.path.insert(0, {PACKAGE_ROOT!r});"
            " from xhcidbg.guestkit.vudc import main; sys.exit(main(sys.argv[1:]))")
    return shlex.join([python, "-c", code, *arguments])


@dataclass
class VhciPlugged(Plugged):
    """A device on a vhci-hcd port as the guest sees it once configured (`udc` names what
    serves it: the vudc, or the IsoSource)."""
    port: int = 0


def wait_plugged(port: VhciPort, mbps: int, timeout: float) -> str:
    """Polls in the guest until the device on `port` is configured; prints its sysfs path,
    busnum, devnum and speed.  Only the root hub as fast as the attach counts (the same rhport
    exists on the controller's other hub)."""
    tries = int(timeout / 0.05)
    hub_speed = 5000 if mbps >= 5000 else 480
    return (f"i=0; d=; while [ $i -lt {tries} ]; do for c in {port.sysfs_glob()}; do"
            f" [ \"$(cat \"${{c%/*}}/speed\" 2>/dev/null)\" = {hub_speed} ] || continue;"
            " [ -n \"$(cat \"$c/bConfigurationValue\" 2>/dev/null)\" ] && d=$c; done;"
            " [ -n \"$d\" ] && break; sleep 0.05; i=$((i+1)); done;"
            f" [ -n \"$d\" ] || {{ echo 'nothing configured on vhci port {port.port} within"
            f" {timeout:g} s'; cat {VHCI}/status; exit 1; }};"
            " echo \"$d $(cat \"$d/busnum\" \"$d/devnum\" \"$d/speed\")\"")


def wait_detached(port: int, timeout: float) -> str:
    """Polls in the guest until vhci port `port` is free again (its device gone with it)."""
    tries = int(timeout / 0.05)
    return (f"i=0; while [ $i -lt {tries} ]; do"
            f" awk -v p={port} '$2+0 == p && $3+0 == {PORT_FREE} {{ f = 1 }} END {{ exit !f }}'"
            f" {VHCI}/status* && exit 0; sleep 0.05; i=$((i+1)); done;"
            f" echo 'vhci port {port} is still in use after {timeout:g} s'; exit 1")


class _Vhci:
    """What both kinds share: vhci-hcd loaded, ports detached and waited for."""

    def __init__(self, vm: Vm, shell: Shell | None = None):
        self.console: SerialConsole = vm.console
        self.shell: Shell = shell or vm.host
        self.loaded = False

    async def _run(self, shell: Shell, lines: Iterable[str], what: str,
                   timeout: float = 60.0) -> str:
        result = await shell.run("\n".join(["set -e", *lines]), timeout)
        if not result.ok:
            raise RuntimeError(f"{what} failed (status {result.status}):\n{result.output}")
        return result.output

    async def _load(self, *commands: str) -> None:
        """Run `commands` (modprobes, through the kit's shell: its modprobe knows the kit's
        kernel), then load vhci-hcd; loading again changes nothing."""
        await self._run(self.console, [*commands, f"modprobe {VHCI_MODULE}",
                                       f"[ -e {VHCI}/attach ]"], "loading USB/IP")
        self.loaded = True

    async def _configured(self, port: VhciPort, speed: Speed, served_by: str,
                          timeout: float) -> VhciPlugged:
        output = await self._run(self.console, [wait_plugged(port, MBPS[speed], timeout)],
                                 f"enumerating {served_by}", timeout + 30)
        sysfs, busnum, devnum, mbps = output.split()
        return VhciPlugged(served_by, sysfs, int(busnum), int(devnum), int(mbps), port.port)

    async def detach(self, port: int, timeout: float = 30.0) -> None:
        """Pull the plug on vhci port `port` and wait until it is free (the device gone)."""
        await self._run(self.console, [f"echo {port} > {VHCI}/detach || true",
                                       wait_detached(port, timeout)],
                        f"detaching vhci port {port}", timeout + 30)


class VudcGadgets(_Vhci):
    """gadgets.py's `Gadget`s on usbip-vudc, seen through vhci-hcd: high speed at most, with
    iso endpoints that bind but move no data (see the module's docstring).

    Each gadget keeps the vudc it was first bound to; unplugging detaches the vhci port and
    leaves the gadget bound, so plugging again only links anew.
    """

    def __init__(self, vm: Vm, shell: Shell | None = None, python: str = sys.executable):
        super().__init__(vm, shell)
        self.python = python
        self.udcs: list[str] = []
        self.created: dict[str, Gadget] = {}
        self.placed: dict[str, str] = {}        # gadget name -> its vudc
        self.ports: dict[str, int] = {}         # gadget name -> its vhci port while plugged

    async def load(self, udcs: int = 1) -> list[str]:
        """Load usbip-vudc with `udcs` controllers (a loaded one is kept, whatever its count),
        the gadget functions and vhci-hcd; the vudc names."""
        functions = [m for m in GADGET_MODULES if m != "dummy_hcd"]
        await self._load(f"[ -d /sys/module/usbip_vudc ] || modprobe {VUDC_MODULE} num={udcs}",
                         f"modprobe -a {' '.join(functions)}")
        self.udcs = sorted(os.path.basename(p) for p in (await self._run(
            self.console, [f"ls -d /sys/class/udc/{UDC_PREFIX}*"], "listing vudcs")).split())
        return list(self.udcs)

    async def create(self, gadget: Gadget) -> None:
        """Make `gadget` in configfs, unbound."""
        if gadget.name in self.created:
            raise ValueError(f"a gadget named {gadget.name!r} exists already")
        await self._run(self.shell, gadget.create(), f"creating gadget {gadget.name}")
        self.created[gadget.name] = gadget

    async def plug(self, gadget: Gadget, timeout: float = 30.0) -> VhciPlugged:
        """Bind `gadget` to a vudc (creating it first if need be), link that vudc to a free
        vhci port and wait until the guest has configured the device."""
        if not self.loaded:
            await self.load()
        if gadget.name in self.ports:
            raise ValueError(f"{gadget.name} is plugged in already")
        if gadget.name not in self.created:
            await self.create(gadget)
        udc = self.placed.get(gadget.name)
        if udc is None:
            free = [u for u in self.udcs if u not in self.placed.values()]
            if not free:
                raise RuntimeError(f"every vudc is taken ({len(self.udcs)} loaded)")
            udc = free[0]
            await self._run(self.shell, [gadget.bind(udc)], f"binding {gadget.name} to {udc}")
            self.placed[gadget.name] = udc
        command = guest_command(self.python, "link", udc, str(int(Speed.HIGH)))
        output = await self._run(self.shell, [command], f"linking {udc} to vhci-hcd")
        port, controller, rhport = (int(n) for n in output.split()[-3:])
        self.ports[gadget.name] = port
        return await self._configured(VhciPort(port, controller, rhport), Speed.HIGH, udc,
                                      timeout)

    async def unplug(self, gadget: Gadget, timeout: float = 30.0) -> None:
        """Detach the gadget's vhci port, and wait until its vudc can take a new link."""
        port = self.ports.pop(gadget.name, None)
        udc = self.placed.get(gadget.name)
        if port is None or udc is None:
            return
        await self.detach(port, timeout)
        tries = int(timeout / 0.05)
        await self._run(self.console, [
            f"i=0; until [ \"$(cat /sys/class/udc/{udc}/device/usbip_status)\" = {AVAILABLE} ];"
            f" do i=$((i+1)); [ $i -lt {tries} ] || exit 1; sleep 0.05; done"],
            f"waiting for {udc} to be available")

    async def remove(self, gadget: Gadget, timeout: float = 30.0) -> None:
        """Unplug `gadget` and take it out of configfs; its vudc is free again."""
        await self.unplug(gadget, timeout)
        if gadget.name in self.created:
            await self._run(self.shell, gadget.remove(), f"removing {gadget.name}")
        self.created.pop(gadget.name, None)
        self.placed.pop(gadget.name, None)


@dataclass
class ServedSource:
    """An IsoSource being served: where it is and the guest job that serves it."""
    source: IsoSource
    job: Job
    plugged: VhciPlugged


class IsoSources(_Vhci):
    """`IsoSource`s on vhci-hcd, each served by this module run as a job in the host's tree."""

    def __init__(self, vm: Vm, python: str = sys.executable):
        super().__init__(vm)
        self.host = vm.host
        self.python = python

    async def load(self) -> None:
        """Load vhci-hcd (and usbip-core)."""
        await self._load()

    async def plug(self, source: IsoSource, timeout: float = 30.0) -> ServedSource:
        """Start serving `source` on a free vhci port and wait until the guest has configured
        it."""
        if not self.loaded:
            await self.load()
        job = await self.host.start(guest_command(self.python, *source.arguments()))
        try:
            output = await job.wait_output("@@ attached", timeout)
            line = next(x for x in output.splitlines() if x.startswith("@@ attached"))
            port, controller, rhport = (int(n) for n in line.split()[2:5])
            plugged = await self._configured(VhciPort(port, controller, rhport), source.speed,
                                             source.name, timeout)
        except BaseException:
            await job.stop()
            raise
        return ServedSource(source, job, plugged)

    async def unplug(self, served: ServedSource, timeout: float = 30.0) -> dict[str, object]:
        """Detach the source's port; the serving job ends.  What it served (`_Served`)."""
        await self.detach(served.plugged.port, timeout)
        result = await served.job.wait(timeout)
        for line in result.output.splitlines():
            if line.startswith("@@ served "):
                served_json: dict[str, object] = json.loads(line[len("@@ served "):])
                return served_json
        raise RuntimeError(f"the iso source ended ({result.status}) without a summary:\n"
                           f"{result.output}")


if __name__ == "__main__":
    sys.exit(main())
