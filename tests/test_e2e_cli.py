"""End to end through the user-facing commands: `xhcidbg vm` and `xhcidbg serve` as processes.

- `vm` boots the guest with a stick made by --storage-size, runs --run commands, passes the
  options after `--` to QEMU, keeps the serial console in a file and exits with QEMU on
  --poweroff;
- killing QEMU makes xhcidbg say so and exit; stopping xhcidbg takes QEMU with it;
- `serve` prints the -device option, and a QEMU started with it (by this test, as a user would)
  boots Linux with the served devices.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.e2e

launch = pytest.importorskip("xhcidbg.guestkit.launch")


@pytest.fixture(scope="module")
def kit():
    from xhcidbg.guestkit.testing import guest_kit
    return guest_kit()


def xhcidbg() -> list[str]:
    """`python -m xhcidbg` once cli.py offers this package's commands; until then the package's
    own entry point (the same parsers and code)."""
    from xhcidbg.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    wired = all(name in sub.choices and "xhcidbg.vm" in getattr(
        sub.choices[name].get_default("func"), "__module__", "") for name in ("vm", "serve"))
    return [sys.executable, "-m", "xhcidbg" if wired else "xhcidbg.vm"]


def test_vm_command_boots_runs_commands_and_exits_with_the_guest(tmp_path, kit):
    image, serial = tmp_path / "stick.img", tmp_path / "serial.log"
    proc = subprocess.run(
        [*xhcidbg(), "vm", "--storage", str(image), "--storage-size", "16", "--loopback",
         "--speed", "loopback=high", "-m", "320", "--serial-log", str(serial),
         "--run", "cat /sys/block/sda/size", "--run", "cat /sys/class/dmi/id/product_serial",
         "--run", "grep MemTotal /proc/meminfo", "--poweroff",
         "--", "-smbios", "type=1,serial=XHCIDBG-E2E"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(16 << 11)                       # the stick the option created
    assert lines[1] == "XHCIDBG-E2E"                       # the options after -- reached QEMU
    mem_kib = int(lines[2].split()[1])
    assert 256 << 10 < mem_kib <= 320 << 10                # -m 320
    assert image.stat().st_size == 16 << 20
    log = proc.stderr
    for seen in ("1-1 12 Mb/s xhcidbg USB Tablet", "1-2 12 Mb/s xhcidbg USB Keyboard",
                 "1-3 480 Mb/s Gadget Zero", "2-1 5000 Mb/s xhcidbg Mass Storage"):
        assert f"guest sees USB {seen}" in log, log
    assert "QEMU exited; done" in log
    text = serial.read_text(errors="replace")
    assert "Linux version" in text and "@@xhcidbg-ready@@" in text     # the whole console


def start_vm(tmp_path) -> tuple[subprocess.Popen, int]:
    """`xhcidbg vm` running in the background; returns it and QEMU's pid once it is up."""
    proc = subprocess.Popen([*xhcidbg(), "vm", "--no-keyboard"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if match := re.search(r"QEMU running \(pid (\d+)\)", line):
            return proc, int(match.group(1))
        assert time.monotonic() < deadline, "QEMU did not start"
    raise AssertionError(f"xhcidbg vm ended with {proc.wait()} before QEMU ran")


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):      # exited, not yet reaped
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_when_qemu_dies_xhcidbg_says_so_and_exits(tmp_path, kit):
    proc, qemu = start_vm(tmp_path)
    try:
        time.sleep(2)                      # mid-boot: the controller is serving SeaBIOS or Linux
        os.kill(qemu, signal.SIGKILL)
        rest = proc.stderr.read()
        assert proc.wait(30) == 1
        assert "QEMU was killed by signal 9" in rest, rest
        assert "Traceback" not in rest, rest
    finally:
        proc.kill()
        proc.wait()


def test_when_xhcidbg_stops_qemu_exits(tmp_path, kit):
    proc, qemu = start_vm(tmp_path)
    try:
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(30) == 0, rest
        assert "Traceback" not in rest, rest
        assert gone(qemu, 15), "QEMU outlived xhcidbg"
    finally:
        proc.kill()
        proc.wait()


def test_serve_prints_the_device_option_a_users_qemu_boots_with(tmp_path, kit):
    qemu, kernel, initrd = kit
    sock = tmp_path / "xhci.sock"
    image = tmp_path / "stick.img"
    proc = subprocess.Popen([*xhcidbg(), "serve", "--socket", str(sock), "--once", "--no-tablet",
                             "--storage", str(image), "--storage-size", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        option = re.fullmatch(r"-device '(.*)'\n", line)
        assert option, line
        device = json.loads(option.group(1))
        assert device == {"driver": "vfio-user-pci",
                          "socket": {"path": str(sock), "type": "unix"}}

        async def boot():
            vm = await launch.Vm.start(devices=[option.group(1)], qemu=qemu, kernel=kernel,
                                       initrd=initrd, progress=False)
            try:
                return (await vm.console.run(
                    "i=0; until [ -b /dev/sda ] && grep -q 'USB Keyboard' /proc/bus/input/devices;"
                    " do i=$((i+1)); [ $i -gt 1200 ] && exit 1; usleep 50000; done;"
                    " cat /sys/bus/usb/devices/*/product | sort", 120)).output
            finally:
                await vm.stop()

        products = asyncio.run(boot()).split()
        assert "Storage" in products and "Keyboard" in products and "Tablet" not in products
        assert proc.wait(30) == 0                          # --once: the VMM left, so do we
        err = proc.stderr.read()
        assert "the VMM went away" in err and "Traceback" not in err, err
        assert not sock.exists()
    finally:
        proc.kill()
        proc.wait()


def test_user_mistakes_get_a_message_and_status_2_before_anything_starts(tmp_path):
    def run(*argv):
        return subprocess.run(xhcidbg() + list(argv), capture_output=True, text=True, timeout=60)

    missing = tmp_path / "missing.img"
    r = run("vm", "--storage", str(missing))
    assert r.returncode == 2 and "does not exist" in r.stderr and "--storage-size" in r.stderr
    assert "Traceback" not in r.stderr and not missing.exists()
    r = run("serve", "--socket", str(tmp_path / "s"), "--speed", "tablet=super")
    assert r.returncode == 2 and "the tablet runs at full or high speed, not super" in r.stderr, \
        r.stderr
    r = run("serve", "--socket", str(tmp_path / "s"), "--speed", "mouse=fast")
    assert r.returncode == 2 and "DEVICE=SPEED" in r.stderr
    r = run("vm", "stray")
    assert r.returncode == 2 and "QEMU options go after --" in r.stderr
    assert not (tmp_path / "s").exists()
