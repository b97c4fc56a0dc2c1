"""The exporting side of USB/IP in a kit guest: Linux's usbip-host and Debian's usbipd.

A gadget plugged into the guest (gadgets.py) is an ordinary USB device there; `usbip bind` hands
it to the usbip-host driver and usbipd offers it on TCP port 3240.  With the VM started with
`forward_tcp={3240: 0}` (launch.py: an isolated user network), that port is reachable from this
machine, and only from it, at `UsbipExporter.address`, so a USB/IP client here (xhcidbg) imports a
real Linux-enumerated device without any USB hardware and without root on this machine.

    vm = await Vm.start(host_root=True, forward_tcp={USBIP_PORT: 0})
    plugged = await Gadgets(vm).plug(Gadget("zero", [SourceSink()]))
    exporter = UsbipExporter(vm)
    await exporter.start()                      # usbip-host loaded, usbipd listening
    busid = await exporter.bind(plugged)        # e.g. "3-1": listed by OP_REQ_DEVLIST now
    host, port = exporter.address               # ("127.0.0.1", <the forwarded port>)
    await exporter.unbind(busid); await exporter.stop()

The tools are Debian's own `usbip` package of the machine's release (for bookworm the one built
from the same linux source as the guest kernel), unpacked with its shared libraries, libc and
loader included, into a prefix in the user cache (`ensure_usbip_tools`, fetched by
`python -m xhcidbg.guestkit fetch`), exactly as qemu.py builds the private QEMU.  The guest runs
them from this machine's tree (`vm.host`, chrooted) through the prefix's own loader, so nothing
of this machine's libraries is needed and nothing needs installing.
"""
from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .cache import cache_dir, cache_lock, guest_archive
from .qemu import LIB_DIRS, LOADER, PrefixBuilder
from .report import KitError, OfflineError, human_size, say

if TYPE_CHECKING:
    from .archive import Archive
    from .gadgets import Plugged
    from .hostroot import Job
    from .launch import Vm

USBIP_PACKAGE = "usbip"
PROGRAMS = {"usbipd": "usr/sbin/usbipd", "usbip": "usr/sbin/usbip"}
USBIP_PORT = 3240                   # IANA's usbip port, usbipd's default
HOST_DRIVER = "/sys/bus/usb/drivers/usbip-host"
STAMP = ".xhcidbg-complete.json"
AVAILABLE, USED = 1, 2              # a bound device's usbip_status: exportable, imported


@dataclass(frozen=True)
class UsbipTools:
    """Debian's usbip and usbipd in a private prefix, run through the prefix's own loader."""
    prefix: Path
    version: str                    # the Debian package version, e.g. 2.0+6.1.176-1

    def argv(self, program: str, *args: str) -> list[str]:
        """The command line that runs `program` ("usbip" or "usbipd") with `args`."""
        libs = ":".join(str(self.prefix / d) for d in LIB_DIRS if (self.prefix / d).is_dir())
        loader = next((self.prefix / d / LOADER for d in LIB_DIRS
                       if (self.prefix / d / LOADER).exists()), None)
        if loader is None:
            raise KitError(f"no {LOADER} in {self.prefix}: libc6 was not unpacked")
        return [str(loader), "--library-path", libs, str(self.prefix / PROGRAMS[program]),
                *args]

    def command(self, program: str, *args: str) -> str:
        """`argv` as one shell command line."""
        return shlex.join(self.argv(program, *args))


def _prefix_dir() -> Path:
    return cache_dir() / "usbip"


def installed_usbip_tools() -> UsbipTools | None:
    """The tools already in the cache, without touching the network."""
    prefix = _prefix_dir()
    try:
        stamp = json.loads((prefix / STAMP).read_text())
        return UsbipTools(prefix, stamp["package_version"])
    except (OSError, ValueError, KeyError):
        return None


def build_usbip_tools(archive: Archive | None = None) -> UsbipTools:
    """Fetch `usbip` and what its programs load from the machine's release into a new prefix."""
    archive = archive or guest_archive()
    root = archive.get(USBIP_PACKAGE)
    prefix = _prefix_dir()
    building = prefix.with_name("usbip.building")
    shutil.rmtree(building, ignore_errors=True)
    say(f"unpacking the USB/IP tools ({USBIP_PACKAGE} {root.version}) into {prefix}")
    builder = PrefixBuilder(archive, building)
    for binary in PROGRAMS.values():      # both: they need the same libraries, but check
        builder.binary = binary
        builder.build(root)
    tools = UsbipTools(building, root.version)
    ran = subprocess.run(tools.argv("usbip", "version"), capture_output=True, text=True)
    if ran.returncode != 0 or "usbip" not in ran.stdout:
        raise KitError(f"usbip from {USBIP_PACKAGE} {root.version} in {building} does not run:"
                       f" {(ran.stderr or ran.stdout).strip()}")
    stamp = {"package_version": root.version, "version": ran.stdout.strip(),
             "packages": {p.name: p.version for p in builder.unpacked.values()}}
    (building / STAMP).write_text(json.dumps(stamp, indent=1))
    shutil.rmtree(prefix, ignore_errors=True)
    building.rename(prefix)
    total = sum(p.size for p in builder.unpacked.values())
    say(f"USB/IP tools ready ({ran.stdout.strip()}): {len(builder.unpacked)} packages,"
        f" {human_size(total)} of .deb files")
    return UsbipTools(prefix, root.version)


def ensure_usbip_tools() -> UsbipTools:
    """Debian's usbip/usbipd for the guest: the cached prefix, or a new one."""
    found = installed_usbip_tools()
    if found:
        return found
    try:
        with cache_lock():
            return installed_usbip_tools() or build_usbip_tools()
    except OfflineError as e:
        raise OfflineError(f"missing: the USB/IP tools (not yet in {_prefix_dir()}), and"
                           f" {USBIP_PACKAGE} could not be fetched: {e}") from e


def busid_of(plugged: Plugged | str) -> str:
    """The USB/IP bus id of a plugged gadget: its sysfs name (e.g. "3-1")."""
    return plugged if isinstance(plugged, str) else plugged.sysfs.rstrip("/").rsplit("/", 1)[-1]


def _poll(condition: str, what: str, timeout: float) -> str:
    """Kit-shell commands that wait (polling) until `condition` holds, else fail saying `what`."""
    tries = int(timeout / 0.05)
    return (f"i=0; until {condition}; do i=$((i+1)); [ $i -lt {tries} ] ||"
            f" {{ echo {shlex.quote(what)}; exit 1; }}; usleep 50000; done")


class UsbipExporter:
    """usbipd in a kit guest (started with host_root and forward_tcp) exporting its devices.

    Modules load through the kit's shell (its modprobe knows the guest kernel); usbipd and
    `usbip bind` run chrooted in this machine's tree (`vm.host`), where the tools' prefix is.
    """

    def __init__(self, vm: Vm, tools: UsbipTools | None = None, port: int = USBIP_PORT):
        self.vm = vm
        self.tools = tools
        self.port = port                # usbipd's port in the guest
        self.job: Job | None = None
        self.bound: list[str] = []

    @property
    def address(self) -> tuple[str, int]:
        """Where a USB/IP client on this machine reaches usbipd: 127.0.0.1 and the host port
        QEMU forwards to the guest's port."""
        try:
            return "127.0.0.1", self.vm.forwarded_tcp[self.port]
        except KeyError:
            raise RuntimeError(f"the VM forwards no host port to guest port {self.port}:"
                               f" start it with forward_tcp={{{self.port}: 0}}") from None

    async def start(self, timeout: float = 60.0) -> None:
        """Load usbip-host and start usbipd (IPv4, in the foreground as a guest job, so its
        messages stay readable with `job.output()`); returns once it listens."""
        if self.tools is None:
            self.tools = await asyncio.to_thread(ensure_usbip_tools)
        # usbipd refuses to start without the driver it lists devices from.
        await self.vm.console.run("modprobe -a usbip-core usbip-host", check=True)
        self.job = await self.vm.host.start(
            self.tools.command("usbipd", "-4", "--tcp-port", str(self.port)))
        # /proc/net/tcp: local address 00000000:<port in hex>, state 0A (LISTEN).
        listening = f"grep -q ' 00000000:{self.port:04X} 00000000:0000 0A ' /proc/net/tcp"
        waited = await self.vm.console.run(
            _poll(f"{listening} || ! [ -d /proc/{self.job.pid} ]", "usbipd is not listening",
                  timeout) + f"; {listening}", timeout + 30)
        if not waited.ok:
            output = await self.job.output()
            await self.stop()
            raise RuntimeError(f"usbipd did not start listening on port {self.port}:\n{output}")

    def _usbip(self, *args: str) -> str:
        if self.tools is None:
            raise RuntimeError("the exporter is not started: `await exporter.start()`")
        return self.tools.command("usbip", *args)

    async def bind(self, plugged: Plugged | str, timeout: float = 30.0,
                   configure: bool = True) -> str:
        """Hand the device to usbip-host (`usbip bind`), so that usbipd lists it; its busid.

        Unbinding usbcore's generic driver (which `usbip bind` does) unconfigures the device,
        and usbip-host (a device driver since Linux 5.x) leaves it so: usbipd would then list
        it with configuration 0 and no interfaces, which some clients refuse.  With
        `configure` the configuration it had is set again, as older kernels exported it (the
        client's SET_CONFIGURATION then selects it anew); its interfaces get no kernel driver
        unless one matches them (usbtest would match Gadget Zero: keep it unloaded).
        """
        busid = busid_of(plugged)
        value_file = f"/sys/bus/usb/devices/{busid}/bConfigurationValue"
        before = (await self.vm.console.run(f"cat {value_file}", check=True)).output.strip()
        await self.vm.host.run(self._usbip("bind", "-b", busid), timeout, check=True)
        await self.vm.console.run(_poll(f"[ -e {HOST_DRIVER}/{busid} ]",
                                        f"{busid} is not on usbip-host", timeout),
                                  timeout + 30, check=True)
        self.bound.append(busid)
        if configure and before:
            await self.vm.console.run(f"echo {shlex.quote(before)} > {value_file}", timeout,
                                      check=True)
        return busid

    async def unbind(self, plugged: Plugged | str, timeout: float = 30.0) -> None:
        """Give the device back to the guest's own drivers (`usbip unbind`): no longer listed."""
        busid = busid_of(plugged)
        await self.vm.host.run(self._usbip("unbind", "-b", busid), timeout, check=True)
        await self.vm.console.run(_poll(f"! [ -e {HOST_DRIVER}/{busid} ]",
                                        f"{busid} is still on usbip-host", timeout),
                                  timeout + 30, check=True)
        if busid in self.bound:
            self.bound.remove(busid)

    async def status(self, plugged: Plugged | str) -> int:
        """usbip-host's state of a bound device: AVAILABLE (1), USED (2, imported by a client)
        or 3 (error)."""
        result = await self.vm.console.run(
            f"cat /sys/bus/usb/devices/{busid_of(plugged)}/usbip_status", check=True)
        return int(result.output)

    async def stop(self) -> None:
        """Stop usbipd (devices stay bound to usbip-host until `unbind`)."""
        if self.job is not None:
            await self.job.stop()
            await self.job.wait(30)
            self.job = None
