"""Shipped fault scenarios against a real Linux guest (`xhcidbg vm --faults`): what is asserted
is Linux's own reaction (its kernel log, sysfs, the data it reads back) and the injection log."""
from __future__ import annotations

import hashlib
import json
import os
import re
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


def _stick(path, payload: bytes | None = None) -> bytes:
    """An 8 MiB stick image at `path` whose first MiB is `payload` (random by default)."""
    payload = os.urandom(1 << 20) if payload is None else payload
    path.write_bytes(payload + bytes((8 << 20) - len(payload)))
    return payload


def _injections(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _shown(cap) -> str:
    """The capture as `xhcidbg trace show` prints it (Linux's xhci tracepoint text, usbmon)."""
    return subprocess.run([sys.executable, "-m", "xhcidbg", "trace", "show", str(cap)],
                          capture_output=True, text=True, timeout=300).stdout


def _usb_devices(stdout: str) -> set[str]:
    """What `echo devices: $(ls /sys/bus/usb/devices)` printed in the guest."""
    [line] = [x for x in stdout.splitlines() if x.startswith("devices:")]
    return set(line.split()[1:])


def test_a_stall_on_the_sticks_bulk_in_is_recovered_and_the_data_is_intact(tmp_path, kit):
    image = tmp_path / "stick.img"
    payload = _stick(image)
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
    shown = _shown(cap)
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
    shown = _shown(cap)
    assert "Command Aborted" in shown and "Command Ring Stopped" in shown
    # the hub driver tried again and the devices enumerated: tablet and keyboard on bus 1
    assert "1-1" in r.stdout and "1-2" in r.stdout


def test_hse_makes_linux_declare_the_controller_dead_and_rebinding_brings_it_back(tmp_path,
                                                                                  kit):
    image = tmp_path / "stick.img"
    _stick(image)
    scenario = tmp_path / "hse.faults"
    scenario.write_text("urb device=storage dir=in length>512 nth=3 do hse\n")
    log = tmp_path / "faults.jsonl"
    pci = "$(basename $(readlink -f /sys/bus/usb/devices/usb1/..))"
    r = _vm(tmp_path, "--storage", str(image), "--faults", str(scenario), "--fault-log", str(log),
            "--command-timeout", "240",
            "--run", "timeout 120 dd if=/dev/sda of=/dev/null bs=64k count=16; echo dd=$?",
            "--run", "sleep 2; dmesg | grep -E 'xhci_hcd.*(dead|died)' | head -3",
            "--run", f"d={pci}; echo $d > /sys/bus/pci/drivers/xhci_hcd/unbind; sleep 1; "
                     f"echo $d > /sys/bus/pci/drivers/xhci_hcd/bind; sleep 10; "
                     f"ls /sys/bus/usb/devices/; cat /sys/block/sda/size", timeout=900)
    assert r.returncode == 0, r.stderr
    assert "dd=0" not in r.stdout                           # the read failed: the HC died
    assert "assume dead" in r.stdout or "HC died" in r.stdout, r.stdout
    assert [i["action"] for i in _injections(log)] == ["hse"]
    after = r.stdout.splitlines()
    assert "2-1" in " ".join(after[-3:]) and after[-1] == str(8 << 11), r.stdout


def test_a_disconnect_mid_transfer_drops_the_device_and_a_reconnect_enumerates_it(tmp_path,
                                                                                 kit):
    image = tmp_path / "stick.img"
    payload = _stick(image)
    scenario = tmp_path / "unplug.faults"
    scenario.write_text("urb device=storage dir=in length>512 phase=submit nth=3 "
                        "do disconnect and reconnect ms=3000\n")
    log = tmp_path / "faults.jsonl"
    r = _vm(tmp_path, "--storage", str(image), "--faults", str(scenario), "--fault-log", str(log),
            "--command-timeout", "240",
            "--run", "timeout 120 dd if=/dev/sda of=/dev/null bs=64k count=16; echo dd=$?",
            "--run", "sleep 10; dmesg | grep -E 'usb 2-1: (USB disconnect|new SuperSpeed)'",
            "--run", "d=$(ls /sys/block | grep sd); dd if=/dev/$d bs=64k count=16 2>/dev/null"
                     " | md5sum", timeout=900)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sum("USB disconnect" in x for x in lines) == 1, r.stdout
    assert sum("new SuperSpeed" in x for x in lines) == 2, r.stdout    # boot, then the replug
    assert lines[-1].split()[0] == hashlib.md5(payload).hexdigest()
    assert [i["action"] for i in _injections(log)] == ["disconnect", "reconnect"]


def test_a_seeded_probabilistic_scenario_run_twice_injects_the_same_faults(tmp_path, kit):
    payload = os.urandom(1 << 20)
    scenario = tmp_path / "flaky.faults"
    scenario.write_text("seed 42\n"
                        "urb device=storage dir=in length>512 probability=0.2 times=4 "
                        "do xact-error\n")
    runs = []
    for n in range(2):
        image = tmp_path / f"stick{n}.img"
        _stick(image, payload)
        log = tmp_path / f"faults{n}.jsonl"
        r = _vm(tmp_path, "--storage", str(image), "--faults", str(scenario),
                "--fault-log", str(log),
                "--run", "dd if=/dev/sda bs=64k count=16 2>/dev/null | md5sum")
        assert r.returncode == 0, r.stderr
        # transaction errors are soft-retried: the data arrives intact
        assert r.stdout.split()[0] == hashlib.md5(payload).hexdigest()
        runs.append([(i["rule"], i["match"], i["seed"], i["action"], i["injected"])
                     for i in _injections(log)])
    assert runs[0] == runs[1] and len(runs[0]) == 4


def test_a_babbled_csw_is_recovered_by_reset_endpoint_and_a_reset_of_the_stick(tmp_path, kit):
    image = tmp_path / "stick.img"
    payload = _stick(image)
    log, cap = tmp_path / "faults.jsonl", tmp_path / "t.pcapng"
    r = _vm(tmp_path, "--storage", str(image), "--faults", "babbling-device",
            "--fault-log", str(log), "--trace", str(cap),
            "--run", "dd if=/dev/sda bs=64k count=16 2>/dev/null | md5sum",
            "--run", "dmesg | grep -E 'usb 2-1|sd 0:|sda'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == hashlib.md5(payload).hexdigest()
    # usb-storage took the babbled CSW for a transport error and reset the stick, once
    assert r.stdout.count("usb 2-1: reset SuperSpeed USB device number 2 using xhci_hcd") == 1, \
        r.stdout
    # a CSW, not a data stage: no Illegal Request sense faked for a babbled data stage
    assert "Illegal Request" not in r.stdout, r.stdout
    inj, outcome = _injections(log)
    assert inj["action"] == "cc" and inj["injected"]["cc"].startswith("3 ")
    assert inj["original"]["actual"] == 13
    assert outcome["expect"] == "reset-endpoint then set-tr-dequeue"
    assert outcome["status"] == "met", outcome
    shown = _shown(cap)
    after = shown[shown.index("status 'Babble Detected'"):]
    # xhci_handle_halted_endpoint, then the port reset usb_stor_port_reset asked for
    reset = re.search(r"write PORTSC\[\d+\] = \S+ \([^)]*In-Reset", after)
    assert reset is not None
    assert after.index("Reset Endpoint") < after.index("Set TR Dequeue") < reset.start()


def test_a_slow_device_delays_every_in_completion_and_linux_only_waits(tmp_path, kit):
    image = tmp_path / "stick.img"
    payload = _stick(image)
    log, cap = tmp_path / "faults.jsonl", tmp_path / "t.pcapng"
    r = _vm(tmp_path, "--storage", str(image), "--faults", "slow-device",
            "--fault-log", str(log), "--trace", str(cap),
            "--run", "dd if=/dev/sda bs=64k count=16 2>/dev/null | md5sum",
            "--run", "dmesg | grep -E 'usb|xhci|sd |scsi'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == hashlib.md5(payload).hexdigest()
    injections = _injections(log)
    assert {(i["action"], i["injected"]["delay_ms"]) for i in injections} == {("delay", 30.0)}
    # every IN completion of the stick (bus 2 holds only the stick) came late: the firmware's,
    # Linux's probe and dd's reads alike
    shown = _shown(cap)
    bulk = len(re.findall(r"usbmon: \S+ \S+ C Bi:2:", shown))
    control = len(re.findall(r"usbmon: \S+ \S+ C Ci:2:", shown))
    assert bulk >= 16 and control > 0
    assert sum(i["where"]["ep"] == 0x81 for i in injections) == bulk
    assert sum(i["where"]["ep"] == 0 for i in injections) == control
    # nothing timed out: no abort, no reset, no failed command
    assert not re.search(r"reset|time.?out|abort|failed|error", r.stdout, re.I), r.stdout


def test_a_surprise_removed_controller_is_declared_dead_and_the_guest_goes_on(tmp_path, kit):
    image = tmp_path / "stick.img"
    _stick(image)
    log = tmp_path / "faults.jsonl"
    r = _vm(tmp_path, "--storage", str(image), "--faults", "surprise-removed",
            "--fault-log", str(log),
            "--run", "for i in $(seq 60); do dmesg | grep -q 'HC died' && break; sleep 1; done;"
                     " dmesg | grep -E 'xhci_hcd.*(dead|died)'",
            "--run", "timeout 60 dd if=/dev/sda of=/dev/null bs=64k count=16; echo dd=$?",
            "--run", "echo devices: $(ls /sys/bus/usb/devices)", timeout=900)
    assert r.returncode == 0, r.stderr            # the guest powered off and xhcidbg ended
    assert "Traceback" not in r.stderr, r.stderr
    # xhci_irq read USBSTS as all ones: xhci_hc_died, then usb_hc_died
    assert "xHCI host controller not responding, assume dead" in r.stdout, r.stdout
    assert "HC died; cleaning up" in r.stdout, r.stdout
    # the shell answered every command; the stick was not readable
    assert re.search(r"^dd=[1-9]", r.stdout, re.M), r.stdout
    # only the root hubs are left: the tablet, keyboard and stick were disconnected
    assert _usb_devices(r.stdout) == {"usb1", "usb2", "1-0:1.0", "2-0:1.0"}, r.stdout
    [inj] = _injections(log)
    assert inj["action"] == "all-ones" and inj["match"] == 50


def test_an_event_ring_full_error_is_warned_about_and_the_rings_go_on(tmp_path, kit):
    image = tmp_path / "stick.img"
    payload = _stick(image)
    log = tmp_path / "faults.jsonl"
    r = _vm(tmp_path, "--storage", str(image), "--faults", "event-ring-full",
            "--fault-log", str(log),
            "--run", "dd if=/dev/sda bs=64k count=16 2>/dev/null | md5sum",
            "--run", "dmesg | grep -E 'xhci_hcd'",
            "--run", "echo devices: $(ls /sys/bus/usb/devices)")
    assert r.returncode == 0, r.stderr
    # armed at Linux's own HCRST (the firmware's transfers do not count), then the event
    assert [i["action"] for i in _injections(log)] == ["note", "event-ring-full"]
    # handle_event has no case for a Host Controller Event: it warns, consumes it, goes on
    assert r.stdout.count("xhci_hcd 0000:00:01.0: ERROR unknown event type 37") == 1, r.stdout
    assert not re.search(r"dead|died|halt", r.stdout), r.stdout
    assert {"1-1", "1-2", "2-1"} <= _usb_devices(r.stdout)
    assert r.stdout.split()[0] == hashlib.md5(payload).hexdigest()
