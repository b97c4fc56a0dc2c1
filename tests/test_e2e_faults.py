"""Shipped fault scenarios against a real Linux guest (`xhcidbg vm --faults`): what is asserted
is Linux's own reaction (its kernel log, sysfs, the data it reads back) and the injection log."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def kit():
    from xhcidbg.guestkit.testing import guest_kit
    return guest_kit()


def _vm(tmp_path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xhcidbg", "vm", *args, "--poweroff"],
                          capture_output=True, text=True, timeout=timeout)


def _injections(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_stall_on_the_sticks_bulk_in_is_recovered_and_the_data_is_intact(tmp_path, kit):
    image = tmp_path / "stick.img"
    payload = os.urandom(1 << 20)
    image.write_bytes(payload + bytes(7 << 20))
    scenario = tmp_path / "stall.faults"
    scenario.write_text("# the third bulk IN data transfer of the stick stalls\n"
                        "urb device=storage dir=in length>512 nth=3 do stall\n")
    log, cap = tmp_path / "faults.jsonl", tmp_path / "t.pcapng"
    r = _vm(tmp_path, "--storage", str(image), "--faults", str(scenario), "--fault-log",
            str(log), "--trace", str(cap),
            "--run", "dd if=/dev/sda bs=64k count=16 2>/dev/null | md5sum",
            "--run", "cat /sys/block/sda/stat")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == hashlib.md5(payload).hexdigest()
    [inj] = _injections(log)
    assert inj["action"] == "cc" and inj["injected"]["cc"].startswith("6 ")
    shown = subprocess.run([sys.executable, "-m", "xhcidbg", "trace", "show", str(cap)],
                           capture_output=True, text=True, timeout=300).stdout
    after = shown[shown.index("Stall Error"):]
    # Linux's recovery: Reset Endpoint, then Set TR Dequeue Pointer past the stalled TD
    assert "Reset Endpoint" in after and "Set TR Dequeue" in after
    assert after.index("Reset Endpoint") < after.index("Set TR Dequeue")


def test_a_withheld_address_device_drives_linuxs_command_timeout_and_abort(tmp_path, kit):
    log, cap = tmp_path / "faults.jsonl", tmp_path / "t.pcapng"
    r = _vm(tmp_path, "--faults", "hung-command", "--fault-log", str(log), "--trace", str(cap),
            "--run", "sleep 15", "--run", "dmesg", "--run", "ls /sys/bus/usb/devices/",
            timeout=900)
    assert r.returncode == 0, r.stderr
    assert "Timeout while waiting for setup device command" in r.stdout
    assert [i["action"] for i in _injections(log)] == ["note", "withhold"]
    shown = subprocess.run([sys.executable, "-m", "xhcidbg", "trace", "show", str(cap)],
                           capture_output=True, text=True, timeout=300).stdout
    assert "Command Aborted" in shown and "Command Ring Stopped" in shown
    # the hub driver tried again and the devices enumerated: tablet and keyboard on bus 1
    assert "1-1" in r.stdout and "1-2" in r.stdout
