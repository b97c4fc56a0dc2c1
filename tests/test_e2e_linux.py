"""End to end with a real Linux guest: xhcidbg is the USB controller of a QEMU VM.

One VM boots for the whole module (boots under TCG cost ~10 s each) with four devices at four
speeds: a tablet (full), a keyboard (low), a storage stick (super) and Gadget Zero (high).  The
tests then read what the guest itself reports (sysfs, /proc, dmesg over its serial console),
move data through the stick and check the image on the host, type and point from the host,
hot-plug devices many times, rebind the driver and reboot the guest.  They run in file order:
the stick's contents from one test are checked again after the reboot at the end.

No mocks: the controller, the vfio-user server, QEMU and the kernel are all the real thing.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import struct
from pathlib import Path

import pytest

from xhcidbg.devices import Keyboard, LoopbackDevice, Speed, StorageDevice, Tablet
from xhcidbg.vm import Backend

pytestmark = pytest.mark.e2e

launch = pytest.importorskip("xhcidbg.guestkit.launch")

STICK_MIB = 64
# Root ports: USB 2 ports 1-4 are the guest's bus 1, USB 3 ports 5-8 its bus 2.
EXPECTED = {   # sysfs name -> (product, speed in Mb/s)
    "1-1": ("xhcidbg USB Tablet", "12"),
    "1-2": ("xhcidbg USB Keyboard", "1.5"),
    "1-3": ("Gadget Zero", "480"),
    "2-1": ("xhcidbg Mass Storage", "5000"),
}
FIND_FUNCTION = "d=$(grep -l 0x0c0330 /sys/bus/pci/devices/*/class | head -1); d=${d%/class}"
ALL_PRESENT = " && ".join(
    [f"[ -n \"$(cat /sys/bus/usb/devices/{n}/bConfigurationValue 2>/dev/null)\" ]"
     for n in EXPECTED]
    + ["[ -b /dev/sda ]", "[ $(grep -c 'N: Name=\"xhcidbg' /proc/bus/input/devices) -eq 2 ]"])


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class Linux:
    """The booted guest, its backend, and the loop they run on (driven from the test)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, backend: Backend, image: Path,
                 serial: Path):
        self.loop = loop
        self.backend = backend
        self.image = image
        self.serial = serial
        self.vm = None

    def run(self, coroutine, timeout: float = 180.0):
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    async def sh(self, command: str, timeout: float = 120.0) -> str:
        result = await self.vm.console.run(command, timeout)
        assert result.ok, f"guest command {command!r} failed ({result.status}):\n{result.output}"
        return result.output

    async def until(self, condition: str, timeout: float = 60.0) -> None:
        """Wait, polling inside the guest (no round trip per try), until `condition` holds."""
        tries = int(timeout / 0.05)
        result = await self.vm.console.run(
            f"i=0; until {condition}; do i=$((i+1)); [ $i -ge {tries} ] && exit 1;"
            " usleep 50000; done", timeout * 3 + 30)
        if not result.ok:
            dmesg = (await self.vm.console.run("dmesg | tail -30")).output
            raise AssertionError(f"the guest never saw: {condition}\n{dmesg}")

    async def host_until(self, condition, timeout: float = 10.0) -> None:
        """Let the loop serve the guest until `condition()` holds on the host side."""
        deadline = self.loop.time() + timeout
        while not condition():
            assert self.loop.time() < deadline, "the host side never settled"
            await asyncio.sleep(0.05)

    def guest(self, command: str, timeout: float = 120.0) -> str:
        return self.run(self.sh(command, timeout), timeout + 30)


@pytest.fixture(scope="module")
def linux(tmp_path_factory):
    from xhcidbg.guestkit.testing import guest_kit
    qemu, kernel, initrd = guest_kit()
    tmp = tmp_path_factory.mktemp("e2e")
    image = tmp / "stick.img"
    with open(image, "wb") as f:
        f.truncate(STICK_MIB << 20)
    fds_before = open_fds()
    loop = asyncio.new_event_loop()
    backend = Backend(tmp / "xhci.sock", [Tablet(), Keyboard(speed=Speed.LOW),
                                          StorageDevice(image), LoopbackDevice(speed=Speed.HIGH)])
    g = Linux(loop, backend, image, tmp / "serial.log")
    try:
        g.run(backend.start())
        # -action reboot=reset: a guest reboot resets the machine instead of ending QEMU
        g.vm = g.run(launch.Vm.start(devices=[backend.device_arg], qemu=qemu, kernel=kernel,
                                     initrd=initrd, log=g.serial, progress=False,
                                     extra_args=["-action", "reboot=reset"]), 360)
        g.run(g.until(ALL_PRESENT, 90), 400)
        yield g
    finally:
        if g.vm is not None:
            g.run(g.vm.stop(), 60)
            g.run(backend.wait_disconnected(), 30)
        backend.close()
        loop.close()
    server = backend.server
    assert server.dma.maps == {} and server.irq.open_fds == []
    assert backend.controller.internal_errors == 0
    leaked = open_fds() - fds_before
    assert not leaked, f"descriptors left open: {sorted(leaked)}"


# ---- enumeration ----------------------------------------------------------------------------
def test_xhci_hcd_binds_and_every_device_enumerates_at_its_speed(linux):
    assert linux.guest(f"{FIND_FUNCTION}; basename $(readlink $d/driver)").strip() == "xhci_hcd"
    hubs = linux.guest("for h in usb1 usb2; do cat /sys/bus/usb/devices/$h/speed; done").split()
    assert hubs == ["480", "5000"]                     # the USB 2 and the USB 3 root hub
    for name, (product, speed) in EXPECTED.items():
        seen = linux.guest(f"cd /sys/bus/usb/devices/{name} && cat product speed").splitlines()
        assert seen == [product, speed], name
    dmesg = linux.guest("dmesg")
    for kind in ("full-speed", "low-speed", "high-speed"):
        assert f"new {kind} USB device number" in dmesg, kind
    assert "new SuperSpeed USB device number" in dmesg
    assert dmesg.count("USB hub found") >= 2

    inputs = linux.guest("cat /proc/bus/input/devices")
    for name in ("xhcidbg USB Tablet", "xhcidbg USB Keyboard"):
        block = next(b for b in inputs.split("\n\n") if name in b)
        assert "Bus=0003" in block and re.search(r"Handlers=.*event\d", block), block
    assert int(linux.guest("cat /sys/block/sda/size")) == STICK_MIB << 11     # 512-byte sectors
    assert "xhcidbg" in linux.guest("cat /sys/block/sda/device/vendor")
    assert linux.guest("basename $(readlink /sys/bus/usb/devices/2-1:1.0/driver)").strip() \
        == "usb-storage"


# ---- storage --------------------------------------------------------------------------------
def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_raw_blocks_written_by_the_guest_land_in_the_image_and_back(linux):
    offset, size = 40 << 20, (1 << 20) + 4096            # not a whole number of 64 KiB TRBs
    out = linux.guest("dd if=/dev/urandom of=/tmp/blob bs=4096 count=257 2>/dev/null &&"
                      f" dd if=/tmp/blob of=/dev/sda bs=4096 seek={offset // 4096}"
                      " oflag=direct conv=fsync 2>/dev/null && sha256sum /tmp/blob")
    with open(linux.image, "rb") as f:
        f.seek(offset)
        assert sha256_of(f.read(size)) == out.split()[0]

    # and the other way: the host writes, the guest reads past its page cache
    data = os.urandom(3 << 20)
    with open(linux.image, "r+b") as f:
        f.seek(48 << 20)
        f.write(data)
    out = linux.guest(f"dd if=/dev/sda bs=65536 skip={(48 << 20) // 65536} count=48"
                      " iflag=direct 2>/dev/null | sha256sum")
    assert out.split()[0] == sha256_of(data)


FILES = {"ONE.BIN": 300_000, "TWO.TXT": 0, "SUB/THREE.BIN": 2_500_000, "SUB/EMPTY.DAT": 0}


def test_filesystem_made_by_the_guest_holds_its_files(linux):
    script = ["mkdosfs -n XHCIDBG /dev/sda >/dev/null", "mount -t vfat /dev/sda /mnt",
              "mkdir /mnt/SUB", "echo 'written through xhcidbg' > /mnt/TWO.TXT"]
    for name, size in FILES.items():
        if size:
            script.append(f"dd if=/dev/urandom of=/mnt/{name} bs={size} count=1 iflag=fullblock"
                          " 2>/dev/null")
        elif name != "TWO.TXT":
            script.append(f"touch /mnt/{name}")
    script += ["sync", "cd /mnt && sha256sum " + " ".join(FILES), "cd /", "umount /mnt"]
    out = linux.guest(" && ".join(script))
    in_guest = {name: digest for digest, name in (line.split() for line in out.splitlines())}
    assert set(in_guest) == set(FILES)

    on_host = read_fat(linux.image.read_bytes())
    assert {name: sha256_of(data) for name, data in on_host.items()} == in_guest
    assert on_host["TWO.TXT"] == b"written through xhcidbg\n"
    assert [len(on_host[n]) for n in FILES if FILES[n]] == [s for s in FILES.values() if s]

    # read back in the guest from the device, not from its page cache
    out = linux.guest("echo 3 > /proc/sys/vm/drop_caches && mount -t vfat -o ro /dev/sda /mnt"
                      " && cd /mnt && sha256sum " + " ".join(FILES) + " && cd / && umount /mnt")
    assert {n: d for d, n in (line.split() for line in out.splitlines())} == in_guest
    linux.files = in_guest


# ---- input ----------------------------------------------------------------------------------
EVENT = struct.Struct("<qqHHi")            # struct input_event on x86-64
EV_KEY, EV_ABS = 1, 3
ABS_X, ABS_Y, BTN_LEFT = 0, 1, 0x110
KEY_H, KEY_I = 35, 23


def event_node(inputs: str, name: str) -> str:
    block = next(b for b in inputs.split("\n\n") if name in b)
    return re.search(r"Handlers=.*?(event\d+)", block).group(1)


def test_host_typing_and_pointing_reach_the_guest_as_input_events(linux):
    inputs = linux.guest("cat /proc/bus/input/devices")
    tablet_node = event_node(inputs, "xhcidbg USB Tablet")
    keyboard_node = event_node(inputs, "xhcidbg USB Keyboard")
    _, tablet = linux.backend.find("tablet")
    _, keyboard = linux.backend.find("keyboard")

    async def scenario():
        for node in (tablet_node, keyboard_node):
            await linux.sh(f"(cat /dev/input/{node} > /tmp/{node}.ev & echo $! > /tmp/{node}.pid)")
        await linux.sh("usleep 200000")            # the readers have the devices open
        tablet.move(1234, 23456)
        tablet.click()
        keyboard.type("hi")
        await asyncio.sleep(1.0)                   # the guest polls every 8 ms; TCG is slow
        out = {}
        for node in (tablet_node, keyboard_node):
            out[node] = await linux.sh(f"kill $(cat /tmp/{node}.pid); usleep 100000;"
                                       f" od -An -v -tx1 /tmp/{node}.ev")
        return out

    out = linux.run(scenario())

    def events(dump: str) -> list[tuple[int, int, int]]:
        raw = bytes.fromhex("".join(dump.split()))
        return [EVENT.unpack_from(raw, i)[2:] for i in range(0, len(raw) - len(raw) % 24, 24)]

    pointer = [e for e in events(out[tablet_node]) if e[0] in (EV_KEY, EV_ABS)]
    assert pointer == [(EV_ABS, ABS_X, 1234), (EV_ABS, ABS_Y, 23456),
                       (EV_KEY, BTN_LEFT, 1), (EV_KEY, BTN_LEFT, 0)]
    keys = [e for e in events(out[keyboard_node]) if e[0] == EV_KEY]
    assert keys == [(EV_KEY, KEY_H, 1), (EV_KEY, KEY_H, 0), (EV_KEY, KEY_I, 1),
                    (EV_KEY, KEY_I, 0)]


# ---- hotplug --------------------------------------------------------------------------------
def test_hotplug_storage_many_times_enumerates_again_and_leaks_nothing(linux):
    backend, hc = linux.backend, linux.backend.controller
    port, stick = backend.find("storage")
    slots_before, fds_before = sorted(hc.slots), open_fds()
    disconnects_before = linux.guest("dmesg").count("USB disconnect")

    async def cycle() -> str:
        backend.unplug(port)
        await linux.until("[ ! -e /sys/bus/usb/devices/2-1 ] && [ ! -b /dev/sda ]")
        backend.plug(stick, port)
        await linux.until("[ -b /dev/sda ] && [ -e /sys/bus/usb/devices/2-1/product ]")
        # the new /dev/sda answers reads
        await linux.sh("dd if=/dev/sda of=/dev/null bs=4096 count=4 iflag=direct 2>/dev/null")
        return (await linux.sh("cat /sys/bus/usb/devices/2-1/devnum")).strip()

    cycles = 10
    devnums = [linux.run(cycle(), 240) for _ in range(cycles)]
    assert len(set(devnums)) == cycles, devnums            # a fresh enumeration each time
    linux.run(linux.host_until(lambda: len(hc.slots) == len(slots_before)))
    assert linux.guest("dmesg").count("USB disconnect") - disconnects_before == cycles
    assert open_fds() == fds_before
    assert hc.internal_errors == 0


def test_hotplug_keyboard_and_a_new_device_on_a_free_port(linux):
    backend, hc = linux.backend, linux.backend.controller
    port, keyboard = backend.find("keyboard")
    slots_before = len(hc.slots)
    for _ in range(5):
        async def cycle():
            backend.unplug(port)
            await linux.until("! grep -q 'xhcidbg USB Keyboard' /proc/bus/input/devices")
            backend.plug(keyboard, port)
            await linux.until("grep -q 'xhcidbg USB Keyboard' /proc/bus/input/devices")
        linux.run(cycle(), 240)

    # a second stick, at high speed, on a free USB 2 port, then gone again
    extra = linux.image.with_name("extra.img")
    with open(extra, "wb") as f:
        f.truncate(8 << 20)
    second = StorageDevice(extra, speed=Speed.HIGH)
    try:
        async def visit():
            new_port = backend.plug(second)
            await linux.until("[ -b /dev/sdb ]")
            speed = await linux.sh(f"cat /sys/bus/usb/devices/1-{new_port}/speed")
            backend.unplug(new_port)
            await linux.until(f"[ ! -b /dev/sdb ] && [ ! -e /sys/bus/usb/devices/1-{new_port} ]")
            await linux.host_until(lambda: len(hc.slots) == slots_before)   # Disable Slot
            return new_port, speed.strip()
        new_port, speed = linux.run(visit(), 240)
    finally:
        second.close()
    assert new_port == 4 and speed == "480"
    assert len(hc.slots) == slots_before


# ---- reset and reboot -----------------------------------------------------------------------
def test_driver_unbind_and_bind_resets_and_reprobes_the_controller(linux):
    disconnects = linux.guest("dmesg").count("USB disconnect")
    linux.guest(f"{FIND_FUNCTION}; a=${{d##*/}};"
                " echo $a > /sys/bus/pci/drivers/xhci_hcd/unbind &&"
                " echo $a > /sys/bus/pci/drivers/xhci_hcd/bind")
    linux.run(linux.until(ALL_PRESENT, 90), 400)
    assert linux.guest("dmesg").count("USB disconnect") - disconnects >= len(EXPECTED) + 2
    assert linux.backend.controller.internal_errors == 0


def test_guest_reboot_leaves_a_controller_linux_probes_again(linux):
    server = linux.backend.server
    resets = server.stats.counts.get(13, 0)                     # vfio-user DEVICE_RESET

    async def reboot():
        await linux.vm.console.write("reboot -f\n")
        await linux.vm.console.wait_ready(300)
        await linux.until(ALL_PRESENT, 90)
    linux.run(reboot(), 500)
    assert server.stats.counts.get(13, 0) > resets              # QEMU reset the function with us
    assert float(linux.guest("cut -d' ' -f1 /proc/uptime")) < 120    # a fresh kernel
    for name, (product, speed) in EXPECTED.items():
        seen = linux.guest(f"cd /sys/bus/usb/devices/{name} && cat product speed").splitlines()
        assert seen == [product, speed], name
    files = getattr(linux, "files", None)
    if files:             # what the filesystem test wrote survived the reboot
        out = linux.guest("mount -t vfat -o ro /dev/sda /mnt && cd /mnt && sha256sum "
                          + " ".join(files) + " && cd / && umount /mnt")
        assert {n: d for d, n in (line.split() for line in out.splitlines())} == files


# ---- a FAT reader, to check on the host what the guest's vfat driver wrote -------------------
def read_fat(image: bytes) -> dict[str, bytes]:
    """Every file of a FAT12/16/32 image: {"DIR/NAME.EXT": contents} (8.3 names)."""
    bps, spc, reserved, nfats, root_entries, total16 = struct.unpack_from("<HBHBHH", image, 11)
    fat16_size = struct.unpack_from("<H", image, 22)[0]
    total32, fat32_size = struct.unpack_from("<II", image, 32)
    root_cluster = struct.unpack_from("<I", image, 44)[0]
    fat_size = fat16_size or fat32_size
    root_dir_sectors = (root_entries * 32 + bps - 1) // bps
    first_data = reserved + nfats * fat_size + root_dir_sectors
    clusters = ((total16 or total32) - first_data) // spc
    bits = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
    fat = image[reserved * bps:(reserved + fat_size) * bps]
    cluster_bytes = bps * spc

    def next_cluster(c: int) -> int:
        if bits == 32:
            return struct.unpack_from("<I", fat, 4 * c)[0] & 0x0FFFFFFF
        if bits == 16:
            return struct.unpack_from("<H", fat, 2 * c)[0]
        v = struct.unpack_from("<H", fat, c + c // 2)[0]
        return v >> 4 if c & 1 else v & 0xFFF

    end = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[bits]

    def chain(start: int, size: int | None) -> bytes:
        out, c = bytearray(), start
        while 2 <= c < end and len(out) < (size if size is not None else len(image)):
            sector = first_data + (c - 2) * spc
            out += image[sector * bps:sector * bps + cluster_bytes]
            c = next_cluster(c)
        return bytes(out[:size]) if size is not None else bytes(out)

    def walk(directory: bytes, prefix: str, files: dict[str, bytes]) -> None:
        for i in range(0, len(directory), 32):
            entry = directory[i:i + 32]
            if entry[0] == 0:
                break
            attr = entry[11]
            if entry[0] == 0xE5 or attr & 0x0F == 0x0F or attr & 0x08:  # deleted, LFN, label
                continue
            base, ext = entry[:8].decode().rstrip(), entry[8:11].decode().rstrip()
            if base in (".", ".."):
                continue
            name = prefix + base + (f".{ext}" if ext else "")
            first = (struct.unpack_from("<H", entry, 20)[0] << 16
                     | struct.unpack_from("<H", entry, 26)[0])
            size = struct.unpack_from("<I", entry, 28)[0]
            if attr & 0x10:
                walk(chain(first, None), name + "/", files)
            else:
                files[name] = chain(first, size) if size else b""

    if bits == 32:
        root = chain(root_cluster, None)
    else:
        start = (reserved + nfats * fat_size) * bps
        root = image[start:start + root_entries * 32]
    files: dict[str, bytes] = {}
    walk(root, "", files)
    return files
