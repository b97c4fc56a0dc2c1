"""The chain, end to end: a real Linux guest driver using a real Linux USB device of another
machine through xhcidbg.  Two kit VMs on this machine: the exporter (gadgets on dummy_hcd,
handed to usbip-host and offered by Debian's usbipd through a forwarded port) and the guest,
whose USB controller is xhcidbg (a vfio-user server here) with that device imported over USB/IP
on one of its root ports.  What is asserted is what the two Linux kernels report: usbtest's
verdict on each of its test cases (driven through its usbfs ioctl), a disk usb-storage found
and the files written to it, as the exporter's own loop device reads them back, the kernel log
of a device pulled out mid-transfer, and usbip-host's state and usbipd's sockets across many
imports.

Each test exports its own gadget and takes it away again (in `finally`); the guest VM boots at
the first import (`Chain.attach`), so any test runs alone."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import shlex
import time
from collections.abc import AsyncIterator

import pytest
from test_e2e_fault_isoch import USBTEST

from xhcidbg.guestkit import launch
from xhcidbg.guestkit.gadgets import Gadget, Gadgets, MassStorage, Pattern, SourceSink
from xhcidbg.guestkit.hostroot import ROOT
from xhcidbg.guestkit.testing import guest_kit
from xhcidbg.guestkit.usbip import (
    AVAILABLE,
    HOST_DRIVER,
    USBIP_PORT,
    UsbipExporter,
    busid_of,
    ensure_usbip_tools,
)
from xhcidbg.usbip.device import UsbipDevice
from xhcidbg.vm.backend import Backend

pytestmark = pytest.mark.e2e

# usbtest's own pattern (its default, 0: zeros) on both ends
ZERO = Gadget("zero", [SourceSink(pattern=Pattern.ZEROS)], product="Gadget Zero",
              serial="xhcidbg-chain-1")
# bulk OUT/IN (1-4; 3 and 4 with lengths that vary), scatter-gather (5-8), chapter 9 (9),
# queued control (10), unlinks (11, 12), halts (13), vendor control (14), unaligned buffers
# (17-20), unaligned control (21)
CASES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 17, 18, 19, 20, 21]
ITERATIONS, LENGTH, SGLEN, VARY = 4, 4096, 4, 512


def poll(condition: str, timeout: float) -> str:
    """Kit-shell commands that wait until `condition` holds (status 1 if it never does)."""
    return (f"i=0; until {condition}; do i=$((i+1)); [ $i -lt {int(timeout / 0.05)} ] ||"
            " exit 1; usleep 50000; done")


def with_serial(serial: str) -> str:
    """Kit-shell commands printing the configured USB device(s) whose serial is `serial`."""
    return ("for d in /sys/bus/usb/devices/*; do"
            f" [ \"$(cat $d/serial 2>/dev/null)\" = {shlex.quote(serial)} ] &&"
            " [ -n \"$(cat $d/bConfigurationValue 2>/dev/null)\" ] && echo ${d##*/}; done; true")


class Chain:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.exporter_vm: launch.Vm | None = None
        self.guest: launch.Vm | None = None
        self.backend: Backend | None = None
        self.said: list[str] = []          # what the port mapper said

    def run(self, coro, timeout: float = 300.0):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    # ---- the exporter ---------------------------------------------------------------------
    @property
    def xsh(self) -> launch.SerialConsole:
        assert self.exporter_vm is not None
        return self.exporter_vm.console

    @contextlib.asynccontextmanager
    async def exported(self, gadget: Gadget) -> AsyncIterator[str]:
        """`gadget` plugged into the exporter and bound to usbip-host: its busid.  Afterwards it
        is unbound (also when it was unplugged meanwhile) and removed from configfs."""
        plugged = await self.gadgets.plug(gadget)
        busid = busid_of(plugged)
        try:
            await self.exporter.bind(plugged)
            yield busid
        finally:
            await self.unexport(gadget, busid)

    async def unexport(self, gadget: Gadget, busid: str) -> None:
        on_host = (await self.xsh.run(f"[ -e {HOST_DRIVER}/{busid} ]")).ok
        if not on_host and busid in self.exporter.bound:
            # Unplugged while bound: usbip-host still lists the busid and takes the device
            # back when it returns, so plug it in again for `usbip unbind` to undo it all.
            udc = self.gadgets.placed[gadget.name]
            await self.gadgets.shell.run(gadget.bind(udc), check=True)
            back = (f"[ -e {HOST_DRIVER}/{busid} ] || [ -n \"$(cat"
                    f" /sys/bus/usb/devices/{busid}/bConfigurationValue 2>/dev/null)\" ]")
            await self.xsh.run(poll(back, 30), 60, check=True)
            on_host = (await self.xsh.run(f"[ -e {HOST_DRIVER}/{busid} ]")).ok
        if on_host:
            await self.exporter.unbind(busid)
        elif busid in self.exporter.bound:
            self.exporter.bound.remove(busid)
        await self.gadgets.remove(gadget)

    # ---- this side and the guest ----------------------------------------------------------
    async def boot_guest(self) -> launch.Vm:
        if self.guest is None:
            assert self.backend is not None
            self.backend.port_mapper().remote.say = self.said.append
            self.guest = await launch.Vm.start(
                devices=[self.backend.device_arg], qemu=self.qemu, kernel=self.kernel,
                initrd=self.initrd, progress=False, host_root=True,
                log=self.folder / "guest.log")
        return self.guest

    @property
    def gsh(self) -> launch.SerialConsole:
        assert self.guest is not None
        return self.guest.console

    def url(self, busid: str) -> str:
        host, port = self.exporter.address
        return f"usbip://{host}:{port}/{busid}"

    async def attach(self, busid: str, timeout: float = 20.0) -> int:
        """Import `busid` onto a root port of xhcidbg (booting the guest first if need be);
        the port, once the device is on it."""
        await self.boot_guest()
        assert self.backend is not None
        remote = self.backend.port_mapper().remote
        start = len(self.said)
        url = self.url(busid)
        self.backend.port_mapper().attach(url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = remote.find(url)
            if found is not None:
                return found.port
            if not remote.importing:
                break                       # the import ended without a device
            await asyncio.sleep(0.02)
        raise AssertionError(f"{url} was not imported: {self.said[start:]}")

    async def guest_device(self, serial: str, timeout: float = 30.0) -> str:
        """The guest's name of the USB device with `serial` (e.g. 1-1), once usbcore has
        enumerated and configured it."""
        found = f"[ -n \"$({with_serial(serial)})\" ]"
        waited = await self.gsh.run(poll(found, timeout) + f"; {with_serial(serial)}",
                                    timeout + 30)
        names = waited.output.split()
        assert waited.ok and len(names) == 1, (waited.output, self.said)
        return names[0]

    async def guest_dropped(self, serial: str, timeout: float = 30.0) -> None:
        """Wait until the guest's usbcore has no device with `serial` any more."""
        gone = f"[ -z \"$({with_serial(serial)})\" ]"
        waited = await self.gsh.run(poll(gone, timeout), timeout + 30)
        assert waited.ok, f"the guest still has {serial} after {timeout} s: {self.said}"

    async def detach_all(self) -> None:
        """Whatever is still imported leaves (a failed test's cleanup)."""
        assert self.backend is not None
        remote = self.backend.port_mapper().remote
        for port in list(remote.attached):
            remote.detach(port)

    async def usbtest_bound(self, name: str, timeout: float = 20.0) -> None:
        await self.gsh.run("modprobe usbtest", check=True)
        await self.gsh.run(poll(f"[ -e /sys/bus/usb/drivers/usbtest/{name}:1.0 ]", timeout),
                           timeout + 30, check=True)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    qemu, kernel, initrd = guest_kit()
    tools = ensure_usbip_tools()
    folder = tmp_path_factory.mktemp("chain")
    loop = asyncio.new_event_loop()
    c = Chain(loop)
    try:
        c.exporter_vm = c.run(launch.Vm.start(
            qemu=qemu, kernel=kernel, initrd=initrd, host_root=True,
            forward_tcp={USBIP_PORT: 0}, log=folder / "exporter.log", progress=False), 360)
        c.gadgets = Gadgets(c.exporter_vm)
        c.run(c.gadgets.load(udcs=2))
        c.exporter = UsbipExporter(c.exporter_vm, tools)
        c.run(c.exporter.start())
        # two VMs share CI's 2 cores: no spinning after each vfio-user message (see the bench)
        c.backend = Backend(folder / "xhci.sock", [], busy_poll_us=0)
        c.run(c.backend.start())
        c.folder = folder
        c.qemu, c.kernel, c.initrd = qemu, kernel, initrd
        yield c
    finally:
        if c.guest is not None:
            c.run(c.guest.stop(), 60)
        if c.backend is not None:
            c.backend.close()
        if c.exporter_vm is not None:
            c.run(c.exporter_vm.stop(), 60)
        loop.close()


def test_linux_usbtest_passes_on_a_remote_gadget_zero_through_xhcidbg(chain, tmp_path):
    c = chain
    script = tmp_path / "usbtest_ioctl.py"
    script.write_text(USBTEST)

    async def body():
        async with c.exported(ZERO) as busid:
            port = await c.attach(busid)
            try:
                assert c.backend is not None and c.guest is not None
                name = await c.guest_device(ZERO.serial)
                await c.usbtest_bound(name)
                await c.gsh.run("dmesg -c > /dev/null")
                args = [str(script), str(ITERATIONS), str(LENGTH), str(SGLEN),
                        *map(str, CASES)]
                ran = await c.guest.host.run(" ".join([c.guest.host.python_path, *args]),
                                             timeout=900, env={"USBTEST_VARY": str(VARY)})
                log = (await c.gsh.run("dmesg -c")).output
                submitted = c.backend.port_mapper().remote.attached[port].device.submitted
                return ran, log, submitted
            finally:
                await c.detach_all()
                await c.guest_dropped(ZERO.serial)
    ran, log, submitted = c.run(body(), 1500)
    verdicts = dict(re.findall(r"test (\d+) status (-?\d+)", ran.output))
    assert verdicts == {str(n): "0" for n in CASES}, ran.output + log + "\n".join(c.said)
    assert submitted > 200, submitted           # all of it went over USB/IP
    assert "xhci" not in log.lower() or "error" not in log.lower(), log


DISK = "/tmp/xhcidbg-chain-disk.img"            # the backing file, in the exporter's host tree
DISK_MIB = 16
FILES = {"one.bin": 1 << 20, "two.bin": 200_000 + 7, "three.bin": 4097}


def test_a_remote_mass_storage_disk_holds_what_the_guest_wrote(chain):
    c = chain
    disk = Gadget("disk", [MassStorage(file=DISK)], serial="xhcidbg-chain-disk")
    image = f"{ROOT}{DISK}"                     # the same file, as the kit's shell sees it

    async def body():
        # The exporter's own usb-storage would take the disk's interface as soon as usbip-host
        # configures the device, next to the guest's: it stays unloaded meanwhile.
        await c.xsh.run("if [ -d /sys/module/usb_storage ]; then rmmod usb_storage; fi;"
                        " modprobe loop", check=True)
        await c.xsh.run(f"dd if=/dev/zero of={image} bs=1M count={DISK_MIB} 2>&1", check=True)
        try:
            async with c.exported(disk) as busid:
                port = await c.attach(busid)
                try:
                    return await write_in_guest(port)
                finally:
                    await c.gsh.run("umount /mnt/disk 2>/dev/null; true")
                    await c.detach_all()
                    await c.guest_dropped(disk.serial)
        finally:
            await c.xsh.run(f"umount /mnt/image 2>/dev/null; losetup -d /dev/loop0 2>/dev/null;"
                            f" rm -f {image}; modprobe usb-storage")

    async def write_in_guest(port: int):
        name = await c.guest_device(disk.serial)
        # usb-storage's disk: the block device under the interface's SCSI host
        blocks = f"/sys/bus/usb/devices/{name}/{name}:1.0/host*/target*/*/block/*"
        found = await c.gsh.run(poll(f"[ -e \"$(echo {blocks})\" ]", 30)
                                + f" && basename {blocks}", 60)
        assert found.ok, found.output + (await c.gsh.run("dmesg")).output
        sd = found.output.strip()
        size = int((await c.gsh.run(f"cat /sys/block/{sd}/size", check=True)).output)
        # sd prints "Attached" only after its block node shows in sysfs: wait for the line
        await c.gsh.run(poll(f"dmesg | grep -q '\\[{sd}\\] Attached SCSI'", 30), 60)
        log = (await c.gsh.run("dmesg")).output
        assert size * 512 == DISK_MIB << 20, size
        assert re.search(rf"usb-storage {re.escape(name)}:1\.0: USB Mass Storage device "
                         "detected", log), log
        assert re.search(rf"\[{sd}\] Attached SCSI (removable )?disk", log), log
        await c.gsh.run(f"mkdosfs /dev/{sd} && mkdir -p /mnt/disk &&"
                        f" mount -t vfat /dev/{sd} /mnt/disk", 120, check=True)
        written = {}
        for file, length in FILES.items():
            ran = await c.gsh.run(f"head -c {length} /dev/urandom > /mnt/disk/{file} &&"
                                  f" sha256sum /mnt/disk/{file}", 120, check=True)
            written[file] = ran.output.split()[0]
        await c.gsh.run("sync && umount /mnt/disk", 120, check=True)
        # Read back over USB/IP too: nothing of it left in the guest's page cache.
        await c.gsh.run("echo 3 > /proc/sys/vm/drop_caches && mount -t vfat -o ro"
                        f" /dev/{sd} /mnt/disk", 60, check=True)
        reread = parse_sums((await c.gsh.run("cd /mnt/disk && sha256sum *.bin", 120,
                                             check=True)).output)
        await c.gsh.run("umount /mnt/disk", 60, check=True)
        # The exporter's view: its backing file, through its own loop device, read-only.
        await c.xsh.run(f"losetup -r /dev/loop0 {image} && mkdir -p /mnt/image &&"
                        " mount -t vfat -o ro /dev/loop0 /mnt/image", 60, check=True)
        there = parse_sums((await c.xsh.run("cd /mnt/image && sha256sum *.bin", 120,
                                            check=True)).output)
        await c.xsh.run("umount /mnt/image && losetup -d /dev/loop0", 60, check=True)
        assert c.backend is not None
        submitted = c.backend.port_mapper().remote.attached[port].device.submitted
        return written, reread, there, submitted

    written, reread, there, submitted = c.run(body(), 900)
    assert len(set(written.values())) == len(FILES), written
    assert reread == written, (reread, written)
    assert there == written, (there, written)
    assert submitted > 100, submitted


def parse_sums(output: str) -> dict[str, str]:
    """sha256sum's lines: {file name: digest}."""
    return {line.split()[1]: line.split()[0] for line in output.splitlines() if line.strip()}


def test_a_device_unplugged_on_the_exporter_mid_transfer_leaves_the_guest_cleanly(chain,
                                                                                   tmp_path):
    c = chain
    source = Gadget("source", [SourceSink(pattern=Pattern.ZEROS)], product="Gadget Zero",
                    serial="xhcidbg-chain-unplug")
    script = tmp_path / "usbtest_ioctl.py"
    script.write_text(USBTEST)

    async def body():
        assert c.backend is not None
        remote = c.backend.port_mapper().remote
        errors = c.backend.controller.internal_errors
        async with c.exported(source) as busid:
            port = await c.attach(busid)
            try:
                assert c.guest is not None
                name = await c.guest_device(source.serial)
                await c.usbtest_bound(name)
                await c.gsh.run("dmesg -c > /dev/null")
                device = remote.attached[port].device
                # usbtest case 2: bulk IN reads, far more than could end before the unplug
                job = await c.guest.host.start(" ".join(
                    [c.guest.host.python_path, str(script), "1000000", "4096", "1", "2"]))
                begun = device.submitted
                for _ in range(600):
                    if device.submitted > begun + 200:
                        break
                    await asyncio.sleep(0.05)
                assert device.submitted > begun + 200, (begun, device.submitted,
                                                        await job.output())
                pulled = time.monotonic()
                await c.gadgets.unplug(source)      # out of the exporter's dummy_hcd
                ended = await job.wait(30)
                took = time.monotonic() - pulled
                await c.guest_dropped(source.serial)
                log = (await c.gsh.run("dmesg -c")).output
                alive = await c.gsh.run("echo alive; ls /sys/bus/usb/devices/")
                return (name, ended, took, log, alive, device, dict(remote.attached),
                        dict(remote.importing), c.backend.controller.internal_errors - errors)
            finally:
                await c.detach_all()

    name, ended, took, log, alive, device, attached, importing, errors = c.run(body(), 600)
    # usbtest's read loop failed (the device went), it did not hang or pass
    verdict = re.search(r"test 2 status (-?\d+)", ended.output)
    assert verdict and int(verdict.group(1)) < 0, ended.output
    assert took < 15, took
    assert re.search(rf"usb {re.escape(name)}: USB disconnect, device number \d+", log), log
    assert alive.ok and alive.output.startswith("alive") and name not in alive.output.split()
    assert "USB disconnect" in log and "BUG" not in log and "Call Trace" not in log, log
    # this side: the import ended, nothing of it left
    assert device.ended == "the server closed the connection", device.ended
    assert device.pending == 0 and device.port is None
    assert attached == {} and importing == {}, (attached, importing)
    assert errors == 0
    assert any("left port" in s for s in c.said), c.said


CYCLES, WARM_UP = 20, 3


async def usbipd_sockets(c: Chain) -> int:
    """How many sockets usbipd (the process running its binary, not the shells around it)
    holds open in the exporter."""
    assert c.exporter.job is not None
    listed = await c.xsh.run("for p in /proc/[0-9]*; do echo \"${p#/proc/}"
                             " $(tr '\\0' ' ' < $p/cmdline 2>/dev/null)\"; done", check=True)
    pids = [line.split()[0] for line in listed.output.splitlines()
            if len(line.split()) > 2 and line.split()[1].endswith(".so.2")
            and any(w.endswith("/usbipd") for w in line.split())]
    assert len(pids) == 1, listed.output
    fds = await c.xsh.run(f"ls -l /proc/{pids[0]}/fd", check=True)
    return fds.output.count("socket:")


def test_twenty_imports_and_detaches_leak_nothing_on_either_side(chain):
    c = chain
    source = Gadget("cycled", [SourceSink(pattern=Pattern.ZEROS)], product="Gadget Zero",
                    serial="xhcidbg-chain-cycles")

    def here() -> tuple[int, int]:
        return len(os.listdir("/proc/self/fd")), len(asyncio.all_tasks(c.loop))

    async def available(busid: str, timeout: float = 20.0) -> None:
        """usbip-host has the device back (exportable again) once the import ended."""
        deadline = time.monotonic() + timeout
        while (status := await c.exporter.status(busid)) != AVAILABLE:
            assert time.monotonic() < deadline, f"usbip-host status of {busid}: {status}"
            await asyncio.sleep(0.1)

    async def body():
        assert c.backend is not None
        remote = c.backend.port_mapper().remote
        errors = c.backend.controller.internal_errors
        counts, names = {}, []
        async with c.exported(source) as busid:
            try:
                for cycle in range(CYCLES):
                    if cycle == WARM_UP:
                        gc.collect()
                        counts["before"] = here(), await usbipd_sockets(c)
                    assert await c.exporter.status(busid) == AVAILABLE
                    port = await c.attach(busid)
                    names.append(await c.guest_device(source.serial))
                    remote.detach(port)
                    await c.guest_dropped(source.serial)
                    await available(busid)
                    assert remote.attached == {} and remote.importing == {}
                await asyncio.sleep(0.2)            # the closed connections' last callbacks
                gc.collect()
                counts["after"] = here(), await usbipd_sockets(c)
                alive = [o for o in gc.get_objects() if isinstance(o, UsbipDevice)]
                log = (await c.gsh.run("dmesg -c")).output
                return (counts, names, len(alive), log,
                        c.backend.controller.internal_errors - errors)
            finally:
                await c.detach_all()

    counts, names, alive, log, errors = c.run(body(), 900)
    assert len(names) == CYCLES
    # each import was a new device to the guest's usbcore, enumerated and dropped
    assert len(re.findall(r"New USB device found, idVendor=0525, idProduct=a4a0", log)) \
        >= CYCLES, log
    assert len(re.findall(r"USB disconnect, device number", log)) >= CYCLES, log
    (fds_before, tasks_before), sockets_before = counts["before"]
    (fds_after, tasks_after), sockets_after = counts["after"]
    assert fds_after == fds_before, counts
    assert tasks_after == tasks_before, counts
    assert sockets_after == sockets_before, counts
    assert alive == 0
    assert errors == 0
