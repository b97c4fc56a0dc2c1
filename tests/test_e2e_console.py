"""The console on a live Linux guest, driven as its users drive it: through a pseudo-terminal
(pexpect), through `--batch`, and through the API socket, with `xhcidbg vm` as a process.

What is asserted is what Linux itself reports (its kernel log, sysfs, data read back through
its block layer) and what the host's image file holds afterwards.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.e2e

pexpect = pytest.importorskip("pexpect")
BOOT_S = 300
PROMPT = "xhcidbg>"          # prompt_toolkit moves the cursor instead of printing the space
TROUBLE = re.compile(r"Timeout|timeout|error -|not accepting address|reset (full|high|low|Super)"
                     r"|Abort|failed")


@pytest.fixture(scope="module")
def kit():
    from xhcidbg.guestkit.testing import guest_kit
    return guest_kit()


def xhcidbg(*args: str) -> list[str]:
    return [sys.executable, "-m", "xhcidbg", *args]


def _batch(script: str, *options: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(xhcidbg("vm", "--batch", "--width", "200", *options), input=script,
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def _running(log_path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """xhcidbg ARGS as a process with no terminal, its output in `log_path`; killed at the end
    if it is still running."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(xhcidbg(*args), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, text=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _usb_kernel_lines(dmesg: str, port: str) -> list[str]:
    return [line for line in dmesg.splitlines() if f"usb {port}" in line or "xhci_hcd" in line]


def test_a_breakpoint_before_address_device_is_stepped_and_linux_gets_the_stick(tmp_path, kit):
    image = tmp_path / "stick.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    child = pexpect.spawn(sys.executable, ["-m", "xhcidbg", "vm", "--no-keyboard", "--width",
                                           "200"], encoding="utf-8", timeout=120,
                          dimensions=(50, 200),
                          env={**os.environ, "TERM": "xterm", "NO_COLOR": "1",
                               "PROMPT_TOOLKIT_COLOR_DEPTH": "DEPTH_1_BIT",
                               "PROMPT_TOOLKIT_NO_CPR": "1"})
    child.logfile_read = open(tmp_path / "console.log", "w")  # noqa: SIM115  (closed with child)
    try:
        child.expect("Tab completes.", timeout=BOOT_S)
        child.expect(PROMPT)
        child.sendline("wait shell -t 300")
        child.expect("guest shell is up", timeout=BOOT_S)
        child.sendline("guest log --follow")               # kernel messages as they come
        child.expect("new messages are printed")
        child.sendline("break command type=address at=start")
        child.expect(r"breakpoint #1 command type=address at=start")
        child.sendline(f"plug storage --image {image}")
        child.expect("guest: frozen")                       # the stop froze the VM's vCPUs
        child.expect(r"breakpoint #1 command type=address at=start hit: command Address Device "
                     r"Command @0x[0-9a-f]+ is next \(slot (\d+)\)")
        slot = int(child.match.group(1))
        child.sendline(f"ctx {slot} --input")             # what Linux hands the command
        child.expect("about to be read by the held Address Device Command")
        child.expect("Add: slot ep0")
        child.sendline("ring cmd")
        child.expect(r"dequeue 0x[0-9a-f]+")                # the command still waits there
        child.sendline("step command")
        child.expect(r"stepped 1 command\(s\) on ring\(s\) cmd")
        child.expect(rf"command Address Device Command @0x[0-9a-f]+ -> 'Success' slot {slot}")
        child.sendline("delete all")
        child.sendline("continue")
        child.expect("running")
        child.sendline("wait device storage -t 120")
        child.expect(r"the guest configured it as slot (\d+)", timeout=150)
        child.expect(r"guest: \[ *[\d.]+\] usb \S+: New USB device found", timeout=60)
        # usb-storage scans the LUN a moment after the configuration: wait for the disk
        child.sendline("guest run 'until [ -b /dev/sda ]; do usleep 100000; done;"
                       " printf xhcidbg-was-here > /tmp/f; dd if=/tmp/f of=/dev/sda"
                       " bs=512 conv=sync,fsync 2>/dev/null; echo 3 > /proc/sys/vm/drop_caches;"
                       " dd if=/dev/sda bs=512 count=1 iflag=direct 2>/dev/null | head -c 16;"
                       " echo; cat /sys/block/sda/size'")
        child.expect(r"xhcidbg-was-here\r?\n(\d+)", timeout=120)
        assert int(child.match.group(1)) == 16 << 11        # Linux sees the whole stick
        child.sendline("guest run dmesg")
        child.expect(PROMPT)
        child.sendline("quit")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close(force=True)
    with open(image, "rb") as f:
        assert f.read(16) == b"xhcidbg-was-here"            # it reached the host's image
    assert child.exitstatus == 0, (tmp_path / "console.log").read_text()[-3000:]


FREEZE_SCRIPT = """\
wait shell -t 300
break command type=address at=start
plug keyboard
wait stop -t 60
guest
wait time {hold}
guest
delete all
continue
wait time 8
guest run dmesg
"""


def test_a_frozen_guest_waits_out_a_60_s_stop_without_a_timeout(kit):
    out = _batch(FREEZE_SCRIPT.format(hold=60), "--no-keyboard")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "guest: frozen" in out.stdout
    # `guest` right at the stop, then after the 60 s: the second tells the time frozen
    frozen = re.findall(r"frozen by xhcidbg 1 time\(s\), ([\d.]+) s in all", out.stdout)
    assert len(frozen) == 2 and float(frozen[1]) >= 60, out.stdout[-3000:]
    lines = _usb_kernel_lines(out.stdout, "1-2")
    assert any("Product: xhcidbg USB Keyboard" in line for line in lines), lines
    assert not [line for line in lines if TROUBLE.search(line)], lines


def test_with_freezing_off_linux_times_out_the_stopped_command_and_recovers(kit):
    out = _batch(FREEZE_SCRIPT.format(hold=12), "--no-keyboard", "--no-freeze")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "keeps running" in out.stdout            # the stop said the guest is not frozen
    lines = _usb_kernel_lines(out.stdout, "1-2")
    assert any("Timeout while waiting for setup device command" in line for line in lines), lines
    assert any("Product: xhcidbg USB Keyboard" in line for line in lines), lines   # recovered


def test_a_batch_script_whose_command_fails_exits_non_zero(kit):
    # the shell can be up before Linux has enumerated the tablet: wait for that too
    out = _batch("wait shell -t 300\nwait device tablet -t 60\n"
                 "guest run cat /sys/bus/usb/devices/1-1/product\n"
                 "guest log -n 400\nguest run false\nports\n", "--no-keyboard", "--echo")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "xhcidbg USB Tablet" in out.stdout            # the commands before it ran
    assert "usb 1-1: Product: xhcidbg USB Tablet" in out.stdout      # the guest's kernel log
    assert "exited with status 1" in out.stdout
    assert "root hub ports" in out.stdout                # and the ones after it


def test_the_api_socket_answers_ports_and_delivers_a_stop_event(tmp_path, kit):
    path = str(tmp_path / "api.sock")
    with _running(tmp_path / "xhcidbg.log", "vm", "--no-keyboard", "--api", path) as proc:
        deadline = time.monotonic() + BOOT_S
        while not os.path.exists(path):
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "xhcidbg.log").read_text()
            time.sleep(0.2)
        client = _ApiClient(path)
        reply = client.request("wait shell -t 300", timeout=BOOT_S)
        assert reply["ok"], reply
        ports = client.request("ports --json")
        assert ports["ok"] and isinstance(ports["data"], list), ports
        tablet = next(p for p in ports["data"] if p["device"] and p["device"]["name"] ==
                      "tablet")
        assert tablet["connected"] and tablet["slot"] == 1
        assert client.request("break command type=enable at=start")["ok"]
        assert client.request("plug keyboard")["ok"]
        assert client.event("hello", 10)["controller"] == "running"
        stop = client.event("stop", timeout=60)
        assert stop["reason"] == "breakpoint" and stop["breakpoint"] == 1, stop
        assert client.event("guest", timeout=30)["state"] == "frozen"
        assert client.request("delete all; continue")["ok"]
        assert client.event("enumerated", timeout=120, port=2)["slot"] == 2
        bad = client.request("no-such-command")
        assert not bad["ok"] and "unknown command" in bad["text"]
        client.send(b"{not json\n")
        assert "not JSON" in client.reply(None)["error"]
        client.request("quit")
        assert proc.wait(60) == 0


class _ApiClient:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buffer = b""
        self.events: list[dict] = []
        self.replies: list[dict] = []
        self.ids = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, command: str, timeout: float = 60) -> dict:
        self.ids += 1
        self.send(json.dumps({"id": self.ids, "command": command}).encode() + b"\n")
        return self.reply(self.ids, timeout)

    def reply(self, ident: int | None, timeout: float = 60) -> dict:
        return self._wait(lambda: next((r for r in self.replies if r.get("id") == ident), None),
                          timeout)

    def event(self, name: str, timeout: float = 60, **fields) -> dict:
        """The first event called `name` (with these field values) since the last one taken."""
        def found():
            for e in self.events:
                if e["event"] == name and all(e.get(k) == v for k, v in fields.items()):
                    self.events.remove(e)
                    return e
            return None
        return self._wait(found, timeout)

    def _wait(self, find, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while (got := find()) is None:
            left = deadline - time.monotonic()
            assert left > 0, f"nothing came within {timeout} s; events {self.events}"
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            assert chunk, "the API closed the connection"
            self.buffer += chunk
            *lines, self.buffer = self.buffer.split(b"\n")
            for line in lines:
                message = json.loads(line)
                (self.events if "event" in message else self.replies).append(message)
        if got in self.replies:
            self.replies.remove(got)
        return got


def test_serve_with_qmp_freezes_the_users_qemu_at_a_stop(tmp_path, kit):
    import asyncio

    from xhcidbg.guestkit import launch

    qemu, kernel, initrd = kit
    sock, qmp, api = (str(tmp_path / n) for n in ("xhci.sock", "qmp.sock", "api.sock"))
    async def session(proc: subprocess.Popen[str]) -> tuple[str, str, str]:
        while not os.path.exists(api):
            assert proc.poll() is None, (tmp_path / "xhcidbg.log").read_text()
            await asyncio.sleep(0.1)
        client = await asyncio.to_thread(_ApiClient, api)
        hello = await asyncio.to_thread(client.event, "hello", 10)
        assert hello == {"event": "hello", "controller": "running", "guest": "no QMP"}, hello
        # the user's QEMU, with a QMP socket of its own for xhcidbg beside the kit's
        vm = await launch.Vm.start(devices=[json.dumps({"driver": "vfio-user-pci", "socket": {
            "path": sock, "type": "unix"}})], qemu=qemu, kernel=kernel, initrd=initrd,
            progress=False, extra_args=["-qmp", f"unix:{qmp},server=on,wait=off"])
        try:
            reply = await asyncio.to_thread(client.request, "wait device keyboard -t 300", 300)
            assert reply["ok"], reply
            await asyncio.to_thread(client.event, "guest", 30)   # QMP connected: it runs
            assert (await asyncio.to_thread(client.request, "pause"))["ok"]
            frozen = (await vm.qmp.query_status())["status"]     # QEMU's word, not ours
            assert (await asyncio.to_thread(client.request, "continue"))["ok"]
            running = (await vm.qmp.query_status())["status"]
            status = (await asyncio.to_thread(client.request, "guest"))["text"]
            await asyncio.to_thread(client.request, "quit")
            return frozen, running, status
        finally:
            await vm.stop()

    with _running(tmp_path / "xhcidbg.log", "serve", "--socket", sock, "--qmp", qmp, "--api",
                  api, "--no-tablet") as proc:
        frozen, running, status = asyncio.run(session(proc))
        assert (frozen, running) == ("paused", "running")
        assert "frozen by xhcidbg 1 time(s)" in status, status
        assert proc.wait(60) == 0


WATCH_SCRIPT = """\
wait shell -t 300
wait device tablet -t 60
guest run 'e=$(grep -A5 "xhcidbg USB Tablet" /proc/bus/input/devices | grep -o "event[0-9]*"); \
cat /dev/input/$e > /dev/null & echo $! > /tmp/pid'
wait time 2
watch ep 1 3 dequeue
guest run 'kill $(cat /tmp/pid)'
wait stop -t 30
ring cmd
delete all
continue
"""


def test_a_watchpoint_on_the_tr_dequeue_pointer_hits_when_linux_moves_it(kit):
    # usbhid polls the tablet while its event device is open; closing it cancels the URB:
    # Linux stops the endpoint and moves its dequeue pointer past the cancelled TD
    out = _batch(WATCH_SCRIPT, "--no-keyboard")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    hit = re.search(r"watchpoint #1 ep 1 3 dequeue \(write\) hit: the controller writes ep 1 3 "
                    r"dequeue \(0x[0-9a-f]+\+8\): old (0x[0-9a-f]+) \(dcs \d\) new "
                    r"(0x[0-9a-f]+)", out.stdout)
    assert hit and hit.group(1) != hit.group(2), out.stdout[-3000:]
    assert re.search(r"Set TR Dequeue Pointer Command: deq [0-9a-f]+ stream 0 slot 1 ep 3",
                     out.stdout), out.stdout[-3000:]
