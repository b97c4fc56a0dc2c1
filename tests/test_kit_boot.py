"""Boot the guest kit's kernel and initramfs in the fetched QEMU on QEMU's own xHCI, and check from
the guest shell what Linux found; plus the launcher's handling of QEMU failing and of its parent
dying.  This boot is also the reference run for the benchmark (bench/boot_reference.py)."""
import asyncio
import signal
import subprocess
import sys
import time

import pytest

from xhcidbg.guestkit.launch import Vm, VmExited, build_command, vfio_user_device
from xhcidbg.guestkit.reference import make_disk, qemu_xhci_args, read_speed, wait_enumerated
from xhcidbg.guestkit.testing import guest_kit

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kit():
    return guest_kit()


def test_private_qemu_is_new_enough_and_has_vfio_user(kit):
    qemu, _, _ = kit
    major, minor = map(int, qemu.version.split(".")[:2])
    assert (major, minor) >= (10, 1)
    out = subprocess.run(qemu.command("-nodefaults", "-device", "vfio-user-pci,help"),
                         env=qemu.environ(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "socket" in out.stdout, out.stderr
    if qemu.prefix:
        assert qemu.env["QEMU_MODULE_DIR"].startswith(str(qemu.prefix))


def test_command_line_shape(kit, tmp_path):
    qemu, kernel, initrd = kit
    argv = build_command(qemu, kernel=kernel, initrd=initrd, serial_socket=tmp_path / "s",
                         qmp_socket=tmp_path / "q", memory_mib=512, append="quiet",
                         devices=[vfio_user_device(tmp_path / "x.sock")], extra_args=["-S"])
    line = " ".join(argv)
    assert "-machine q35,accel=tcg,memory-backend=mem" in line
    assert "-object memory-backend-memfd,id=mem,size=512M,share=on -m 512M" in line
    assert "-nic none" in line and "-display none" in line and argv[-1] == "-S"
    assert "-no-reboot" in argv
    assert argv[argv.index("-append") + 1] == "console=ttyS0 panic=-1 quiet"
    device = argv[argv.index("-device") + 1]
    assert device == '{"driver": "vfio-user-pci", "socket": {"path": "%s", "type": "unix"}}' % (
        tmp_path / "x.sock")


def test_guest_on_qemu_xhci_finds_tablet_and_disk(kit, tmp_path):
    qemu, kernel, initrd = kit
    disk = make_disk(tmp_path / "disk.img", 64)

    async def scenario():
        vm = await Vm.start(qemu=qemu, kernel=kernel, initrd=initrd,
                            extra_args=qemu_xhci_args(disk), log=tmp_path / "serial.log",
                            allow_reboot=True)
        try:
            run = vm.console.run
            uptime = await wait_enumerated(vm.console)
            assert 0 < uptime < 120
            # xhci_hcd bound to the PCI function and registered a USB 2 and a USB 3 root hub.
            bound = await run("ls /sys/bus/pci/drivers/xhci_hcd/")
            assert "0000:" in bound.output
            devices = (await run("ls /sys/bus/usb/devices")).output.split()
            assert {"usb1", "usb2"} <= set(devices)
            products = (await run("cat /sys/bus/usb/devices/*/product")).output
            assert "QEMU USB Tablet" in products and "QEMU USB HARDDRIVE" in products
            assert (await run("ls /sys/bus/usb/drivers/usbhid/ | grep -c :")).output.strip() == "1"
            storage = await run("ls /sys/bus/usb/drivers/usb-storage/ | grep -c :")
            assert storage.output.strip() == "1"
            inputs = (await run("cat /proc/bus/input/devices")).output
            tablet = next(block for block in inputs.split("\n\n") if "QEMU USB Tablet" in block)
            assert "Bus=0003" in tablet and "event" in tablet
            assert (await run("cat /sys/block/sda/size")).output.strip() == str(64 << 11)

            # A filesystem written through usb-storage lands in the host's image.
            fs = await run("mkdosfs /dev/sda >/dev/null && mount -t vfat /dev/sda /mnt &&"
                           " echo written-by-the-guest > /mnt/note.txt && umount /mnt &&"
                           " mount -t vfat /dev/sda /mnt && cat /mnt/note.txt && umount /mnt", 120)
            assert fs.ok and fs.output == "written-by-the-guest\n", fs.output
            speed = await read_speed(vm.console, mib=32)
            assert speed.bytes == 32 << 20 and speed.mb_per_s > 1

            # The console protocol: status, stderr, no trailing-newline output, state isolation.
            assert (await run("echo out; echo err >&2; exit 7")) .status == 7
            assert (await run("echo out; echo err >&2")).output == "out\nerr\n"
            assert (await run("printf abc")).output == "abc"
            assert (await run("cat")).output == ""          # stdin is /dev/null, not our commands

            # QMP: pause and resume the guest.
            assert (await vm.qmp.query_status())["status"] == "running"
            await vm.qmp.stop()
            assert (await vm.qmp.query_status())["status"] == "paused"
            await vm.qmp.cont()
            assert (await run("echo back")).output == "back\n"

            # A reset reboots the guest (allow_reboot), and it finds its devices again.
            await vm.qmp.system_reset()
            await vm.console.wait_ready(180)
            assert 0 < await wait_enumerated(vm.console) < 120

            # Guest power-off ends QEMU, and the launcher says so to whoever waits.
            await vm.console.write("poweroff -f\n")
            assert await vm.wait_exit(60) == 0
            with pytest.raises(VmExited):
                await run("true", timeout=5)
        finally:
            await vm.stop()
        return uptime

    uptime = asyncio.run(scenario())
    assert b"written-by-the-guest" in disk.read_bytes()
    assert "xhcidbg-guest: modules loaded" in (tmp_path / "serial.log").read_text(errors="replace")
    print(f"devices enumerated at {uptime:.2f} s guest uptime")


def test_qemu_failing_to_start_is_reported(kit):
    qemu, kernel, initrd = kit

    async def start():
        await Vm.start(qemu=qemu, kernel=kernel, initrd=initrd, progress=False,
                       extra_args=["-device", "no-such-device-xyz"])

    with pytest.raises(VmExited, match="no-such-device-xyz") as info:
        asyncio.run(start())
    assert info.value.returncode not in (0, None)


CHILD = """
import asyncio, sys
from xhcidbg.guestkit.launch import Vm
async def main():
    vm = await Vm.start(wait_ready=False, progress=False, extra_args=["-S"])
    print(vm.process.pid, flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_qemu_dies_with_the_python_process(kit):
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(child.stdout.readline())
        assert not _dead(pid)
        child.send_signal(signal.SIGKILL)      # no cleanup code runs in the child
        child.wait(10)
        deadline = time.monotonic() + 10
        while not _dead(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _dead(pid)
    finally:
        if child.poll() is None:
            child.kill()
