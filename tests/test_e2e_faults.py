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


def _said(stdout: str, label: str) -> list[str]:
    """The words after `label` on the one line that starts with it (`echo LABEL $(...)`)."""
    [line] = [x for x in stdout.splitlines() if x.startswith(label)]
    return line.split()[1:]


def _usb_devices(stdout: str, label: str = "devices:") -> set[str]:
    """What `echo devices: $(ls /sys/bus/usb/devices)` printed in the guest."""
    return set(_said(stdout, label))


def test_a_stall_on_the_sticks_bulk_in_is_recovered_and_the_data_is_intact(tmp_path, kit):
    image = tmp_path / "stick.img"
    payload = _stick(image, os.urandom(8 << 20))        # every block differs: a lost one shows
    log, cap = tmp_path / "faults.jsonl", tmp_path / "t.pcapng"
    r = _vm(tmp_path, "--storage", str(image), "--faults", "stalling-device", "--fault-log",
            str(log), "--trace", str(cap),
            "--run", "dd if=/dev/sda bs=64k 2>/dev/null | md5sum",
            "--run", "echo stat: $(cat /sys/block/sda/stat)",
            "--run", "echo errors: $(cat /sys/block/sda/device/ioerr_cnt"
                     " /sys/block/sda/device/iotmo_cnt)",
            "--run", "dmesg | grep -E 'usb 2-1|sd 0:|I/O error'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == hashlib.md5(payload).hexdigest()
    assert int(_said(r.stdout, "stat:")[2]) >= 8 << 11          # sectors read: all of it
    # the SCSI layer saw no failed and no timed-out command, and the stick was not reset:
    # usb-storage recovered the stall below it
    assert _said(r.stdout, "errors:") == ["0x0", "0x0"], r.stdout
    assert "reset SuperSpeed" not in r.stdout and "I/O error" not in r.stdout, r.stdout
    note, inj, outcome = _injections(log)
    assert note["action"] == "note" and note["where"]["reg"] == "USBCMD"    # Linux's HCRST
    assert inj["action"] == "cc" and inj["injected"]["cc"].startswith("6 ")
    assert inj["original"]["actual"] > 13                      # a data stage, not a CSW
    assert outcome["expect"] == "reset-endpoint then set-tr-dequeue within 2000ms"
    assert outcome["status"] == "met", outcome
    shown = _shown(cap)
    after = shown[shown.index("status 'Stall Error'"):]
    # xhci_handle_halted_endpoint(EP_HARD_RESET): Reset Endpoint without TSP, Set TR Dequeue
    # past the TD; then usb_clear_halt (CLEAR_FEATURE(ENDPOINT_HALT) on 0x81) and the CSW
    reset = re.search(r"Reset Endpoint Command: .* flags t:", after)
    dequeue = re.search(r"Set TR Dequeue Pointer Command", after)
    clear = re.search(r"S Co:2:\d+:0 s 02 01 0000 0081 0000 0", after)
    csw = re.search(r"C Bi:2:\d+:1 0 13 = 55534253", after)
    assert reset and dequeue and clear and csw, after[:3000]
    assert reset.start() < dequeue.start() < clear.start() < csw.start()


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
    log = tmp_path / "faults.jsonl"
    pci = "$(basename $(readlink -f /sys/bus/usb/devices/usb1/..))"
    gone = " && ".join(f"[ ! -e /sys/bus/usb/devices/{d} ]" for d in ("1-1", "1-2", "2-1"))
    r = _vm(tmp_path, "--storage", str(image), "--faults", "dying-controller",
            "--fault-log", str(log), "--command-timeout", "240",
            # until Linux gave up on the controller and disconnected its devices
            "--run", f"for i in $(seq 150); do dmesg | grep -q 'HC died' && {gone} && break; "
                     f"sleep 1; done; dmesg | grep -E 'xhci_hcd.*(Host System|not responding"
                     f"|dead|died)'",
            "--run", "echo before: $(ls /sys/bus/usb/devices)",
            "--run", "timeout 120 dd if=/dev/sda of=/dev/null bs=64k count=16; echo dd=$?",
            "--run", f"d={pci}; echo $d > /sys/bus/pci/drivers/xhci_hcd/unbind; sleep 1; "
                     f"echo $d > /sys/bus/pci/drivers/xhci_hcd/bind; for i in $(seq 60); do "
                     f"[ -s /sys/block/sda/size ] && [ $(cat /sys/block/sda/size) != 0 ] && "
                     f"break; sleep 1; done; echo after: $(ls /sys/bus/usb/devices); "
                     f"echo size: $(cat /sys/block/sda/size)", timeout=900)
    assert r.returncode == 0, r.stderr
    # no interrupt told xhci_irq (no "Host System Error" warning); a Stop Endpoint for what
    # never completed timed out, and xhci_handle_command_timeout declared the controller dead
    assert "Host System Error" not in r.stdout, r.stdout
    said = [x.split(": ", 1)[1] for x in r.stdout.splitlines() if "xhci_hcd 0000:" in x]
    assert said[:3] == ["xHCI host not responding to stop endpoint command",
                        "xHCI host controller not responding, assume dead",
                        "HC died; cleaning up"], r.stdout
    # usb_hc_died disconnected everything: only the root hubs are left, the stick unreadable
    assert _usb_devices(r.stdout, "before:") == {"usb1", "usb2", "1-0:1.0", "2-0:1.0"}, r.stdout
    assert re.search(r"^dd=[1-9]", r.stdout, re.M), r.stdout
    assert [i["action"] for i in _injections(log)] == ["note", "hse"]
    # bound again, xhci_hcd resets the controller and the stick is back, all of it
    assert {"1-1", "1-2", "2-1"} <= _usb_devices(r.stdout, "after:"), r.stdout
    assert _said(r.stdout, "size:") == [str(8 << 11)], r.stdout


def test_a_disconnect_mid_transfer_drops_the_device_and_a_reconnect_enumerates_it(tmp_path,
                                                                                 kit):
    image = tmp_path / "stick.img"
    payload = _stick(image, os.urandom(8 << 20))
    log, cap = tmp_path / "faults.jsonl", tmp_path / "t.pcapng"
    back = ("[ \"$(cat /sys/bus/usb/devices/2-1/devnum 2>/dev/null)\" = 3 ] && "
            "ls /sys/block | grep -q sd")
    r = _vm(tmp_path, "--storage", str(image), "--faults", "unplugged-mid-transfer",
            "--fault-log", str(log), "--trace", str(cap), "--command-timeout", "240",
            # until the stick is enumerated again (as device 3) and its disk is there
            "--run", f"for i in $(seq 60); do {back} && break; sleep 1; done; "
                     f"dmesg | grep -E 'usb 2-1: (USB disconnect|new SuperSpeed)'",
            "--run", "echo devnum: $(cat /sys/bus/usb/devices/2-1/devnum)",
            "--run", "d=$(ls /sys/block | grep sd); dd if=/dev/$d bs=64k 2>/dev/null"
                     " | md5sum", timeout=900)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sum("USB disconnect, device number 2" in x for x in lines) == 1, r.stdout
    assert sum("new SuperSpeed" in x for x in lines) == 2, r.stdout    # boot, then the replug
    assert _said(r.stdout, "devnum:") == ["3"], r.stdout               # a new enumeration
    assert lines[-1].split()[0] == hashlib.md5(payload).hexdigest()
    note, unplug, replug = _injections(log)
    assert (note["action"], unplug["action"], replug["action"]) == ("note", "disconnect",
                                                                     "reconnect")
    assert unplug["original"] == {"device": "storage"}
    shown = _shown(cap)
    after = shown[shown.index("(disconnect, match"):]
    # Connect Status Change -> usb_disconnect -> xhci_free_dev (Disable Slot), then the hub
    # driver enumerates the stick again (Enable Slot, Address Device)
    slot = unplug["where"]["slot"]
    steps = [re.search(p, after) for p in (rf"Disable Slot Command: slot {slot} ",
                                           r"Enable Slot Command", r"Address Device Command")]
    assert all(steps), after[:3000]
    assert steps[0].start() < steps[1].start() < steps[2].start()


def test_a_flaky_cable_run_twice_injects_the_same_faults_and_linux_soft_retries_each(tmp_path,
                                                                                    kit):
    payload = os.urandom(8 << 20)
    runs = []
    for n in range(2):
        image = tmp_path / f"stick{n}.img"
        _stick(image, payload)
        log, cap = tmp_path / f"faults{n}.jsonl", tmp_path / f"t{n}.pcapng"
        r = _vm(tmp_path, "--storage", str(image), "--faults", "flaky-cable",
                "--fault-log", str(log), "--trace", str(cap),
                "--run", "dd if=/dev/sda bs=64k 2>/dev/null | md5sum",
                "--run", "echo errors: $(cat /sys/block/sda/device/ioerr_cnt"
                         " /sys/block/sda/device/iotmo_cnt)",
                "--run", "dmesg | grep -E 'usb 2-1|sd 0:|I/O error'")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == hashlib.md5(payload).hexdigest()
        # nothing reached usb-storage or the SCSI layer: no failed or timed-out command, no
        # reset of the stick, no I/O error
        assert _said(r.stdout, "errors:") == ["0x0", "0x0"], r.stdout
        assert "reset SuperSpeed" not in r.stdout and "I/O error" not in r.stdout, r.stdout
        note, *faults = _injections(log)
        assert note["action"] == "note" and note["seed"] == 1
        assert faults and all(i["action"] == "cc" and i["injected"]["cc"].startswith("4 ")
                              for i in faults)
        # each one soft-retried (EP_SOFT_RESET): a Reset Endpoint with TSP, then the same TD
        # fetched again; never a hard reset that skips a TD
        shown = _shown(cap)
        for i in faults:
            after = shown[shown.index(f"(cc, match {i['match']})"):]
            reset = re.search(r"Reset Endpoint Command: .* flags T:", after)
            again = re.search(rf"BULK: @0x{i['where']['trb']:016x} ", after)
            assert reset and again and reset.start() < again.start(), after[:3000]
        assert len(re.findall(r"xhci_handle_command: .*Reset Endpoint Command: .* flags T:",
                              shown)) == len(faults)
        assert not re.search(r"Reset Endpoint Command: .* flags t:|Set TR Dequeue", shown)
        # by the match its WHEN let through: how much the firmware reads before Linux arms the
        # rule varies from boot to boot under TCG, what Linux reads after it does not
        runs.append([(i["rule"], i["eligible"], i["seed"], i["action"], i["injected"],
                      i["original"]) for i in faults])
    assert runs[0] == runs[1]


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
