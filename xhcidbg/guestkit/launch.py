"""Run the guest: QEMU under asyncio, its serial console as a command channel, and QMP.

Both the serial port and QMP are UNIX sockets that *we* listen on and QEMU connects to at start-up,
so not a byte of early boot output is lost and there is no polling for a socket to appear.
QEMU gets PR_SET_PDEATHSIG, so it dies with the Python process whatever way that ends; `stop`
asks it to quit over QMP first.  When QEMU ends on its own, every waiter on the console or QMP
gets a `VmExited` that carries QEMU's exit status and the end of its stderr.

    vm = await Vm.start(devices=[vfio_user_device("/tmp/x.sock")])
    result = await vm.console.run("ls /sys/bus/usb/devices")
    await vm.stop()

With `host_root=True` the guest also sees this machine's root filesystem (hostroot.py), and
`vm.host.run(...)` runs commands chrooted into it, the project's venv included.

The guest has no network unless `forward_tcp={guest_port: host_port}` asks for one: then QEMU's
user networking with `restrict=on` (the guest reaches nothing, not even this machine) forwards
127.0.0.1:host_port here to that guest port (host port 0: a free one, see `vm.forwarded_tcp`), and
the guest's eth0 is up at 10.0.2.15/24 once `start` returns.  That is how a guest service such as
usbipd (usbip.py) is reached from this machine and from nowhere else.  A guest client of a
service here listens instead, and this side connects to it (vhci_import.py): slirp's outbound
path (`guestfwd=...-cmd:`) held every guest message longer than one segment some 44 ms.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..session.vmm import Vmm, VmmError
from .initramfs import MODULES_LOADED, NET_MODULES, READY_MARKER, ensure_initramfs
from .kernel import ensure_kernel
from .qemu import QemuInstall, ensure_qemu
from .report import say

if TYPE_CHECKING:
    from .hostroot import HostRoot

DEFAULT_MEMORY_MIB = 256
# Lines that show the user how far a (slow, TCG) boot has come.
BOOT_MILESTONES = [
    (b"Linux version", "kernel started"),
    (b"Run /init", "init started"),
    (MODULES_LOADED.encode(), "modules loaded"),
    (READY_MARKER.encode(), "shell ready"),
]
STDERR_KEEP = 16384
TRANSCRIPT_KEEP = 1 << 20
PR_SET_PDEATHSIG = 1
# The address QEMU's user network (slirp) would hand the guest by DHCP, set statically instead:
# no DHCP client to run and wait for.
GUEST_ADDRESS = "10.0.2.15/24"
# Set once QEMU has ended: its exit status and its stderr.
Exited = asyncio.Future[tuple[int, str]]
# One accepted connection from QEMU.
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# Where progress lines go (the kit's `say`), if anywhere.
Report = Callable[[str], None]
_T = TypeVar("_T")


class VmExited(RuntimeError):
    """QEMU ended while something was still expected of it."""

    def __init__(self, returncode: int | None, stderr: str, console: str = ""):
        self.returncode = returncode
        self.stderr = stderr
        message = f"QEMU exited with status {returncode}"
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        if tail:
            message += f"; its stderr ends:\n{tail}"
        console_tail = "\n".join(console.strip().splitlines()[-20:])
        if console_tail:
            message += f"\nthe guest console ends:\n{console_tail}"
        super().__init__(message)


class CommandTimeout(TimeoutError):
    pass


@dataclass
class CommandResult:
    status: int
    output: str

    @property
    def ok(self) -> bool:
        return self.status == 0


def vfio_user_device(socket_path: str | Path, **properties: Any) -> str:
    """The `-device` value that connects QEMU to a vfio-user server on a UNIX socket."""
    return json.dumps({"driver": "vfio-user-pci",
                       "socket": {"path": str(socket_path), "type": "unix"}, **properties})


async def _exit_error(exited: Exited) -> VmExited:
    """The VmExited for a connection QEMU closed; waits briefly for its exit status."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(exited), 5)
    if exited.done():
        return VmExited(*exited.result())
    return VmExited(None, "connection to QEMU lost")


class _Stream:
    """Bytes arriving from one connection, kept whole, with waiting for a pattern."""

    def __init__(self, exited: Exited):
        self.data = bytearray()
        self.closed = False
        self._changed = asyncio.Condition()
        self._exited = exited

    async def feed(self, chunk: bytes) -> None:
        async with self._changed:
            if chunk:
                self.data += chunk
            else:
                self.closed = True
            self._changed.notify_all()

    async def wait_for(self, pattern: re.Pattern[bytes], start: int,
                       timeout: float) -> re.Match[bytes]:
        """The first match of `pattern` at or after offset `start`, waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                match = pattern.search(self.data, start)
                if match:
                    return match
                if self.closed:       # QEMU closed the socket: nothing more will come
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommandTimeout(f"no {pattern.pattern!r} on the console"
                                         f" within {timeout:g} s")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
        error = await _exit_error(self._exited)
        tail = self.data[-4096:].decode("utf-8", "replace").replace("\r\n", "\n")
        raise VmExited(error.returncode, error.stderr, tail)


class SerialConsole:
    """The guest shell on the serial port.

    Each command is sent as one shell input whose output is framed by a begin line and an end
    line carrying the exit status, written with printf so that the command text itself (should it
    ever be echoed) never matches the frame.  Commands run with stdin from /dev/null, so they
    cannot swallow the commands that follow.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 exited: Exited, log: Path | None = None,
                 progress: Report | None = None):
        self._writer = writer
        self._exited = exited
        self._stream = _Stream(exited)
        self._lock = asyncio.Lock()
        self._cursor = 0
        self._serial = 0
        self._started = time.monotonic()
        self._progress = progress
        self.milestones: dict[str, float] = {}     # label -> seconds since start
        # Open for as long as the console is; close() closes it.
        self._log = open(log, "ab") if log else None  # noqa: SIM115
        self._task = asyncio.create_task(self._pump(reader))

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        pending = list(BOOT_MILESTONES)
        while True:
            try:
                chunk = await reader.read(65536)
            except (ConnectionError, OSError):
                chunk = b""
            if self._log:
                self._log.write(chunk)
                self._log.flush()
            await self._stream.feed(chunk)
            tail = max(len(self._stream.data) - len(chunk) - 64, 0)
            for marker, label in list(pending):
                if self._stream.data.find(marker, tail) >= 0:
                    pending.remove((marker, label))
                    self.milestones[label] = time.monotonic() - self._started
                    if self._progress:
                        self._progress(f"boot: {label} after {self.milestones[label]:.1f} s")
            if not chunk:
                return

    @property
    def transcript(self) -> str:
        """What the guest wrote to the console (once past 1 MiB, from the last command on)."""
        return self._stream.data.decode("utf-8", "replace").replace("\r\n", "\n")

    async def wait_for(self, text: str | re.Pattern[bytes], timeout: float = 60.0) -> str:
        """Wait until `text` (or a bytes regex) appears after what was already consumed."""
        pattern = text if isinstance(text, re.Pattern) else re.compile(re.escape(text.encode()))
        match = await self._stream.wait_for(pattern, self._cursor, timeout)
        self._cursor = match.end()
        return match.group(0).decode("utf-8", "replace")

    async def wait_ready(self, timeout: float = 180.0) -> None:
        """Wait for /init to hand over the shell."""
        await self.wait_for(READY_MARKER, timeout)

    async def write(self, text: str) -> None:
        """Send raw text to the guest's serial port."""
        try:
            if self._stream.closed or self._writer.is_closing():
                raise ConnectionResetError
            self._writer.write(text.encode())
            await self._writer.drain()
        except (ConnectionError, OSError):
            raise await _exit_error(self._exited) from None

    async def run(self, command: str, timeout: float = 60.0, check: bool = False) -> CommandResult:
        """Run `command` in the guest shell; its output (stdout and stderr) and exit status."""
        if any(ord(c) < 32 and c not in "\n\t" for c in command):
            raise ValueError("control characters would be taken by the guest tty, not the shell")
        if any(len(line) > 3000 for line in command.splitlines()):
            raise ValueError("a command line longer than 3000 characters overflows the guest tty")
        async with self._lock:
            self._serial += 1
            n = self._serial
            begin = re.compile(rb"@@B%d@@\r?\n" % n)
            end = re.compile(rb"\r?\n@@E%d:(\d+)@@" % n)
            # A subshell, so that `exit` or `set -e` in the command cannot end the guest shell.
            await self.write(f"printf '\\n@@B%s@@\\n' {n}; ( {command}\n) </dev/null 2>&1;"
                             f" printf '\\n@@E%s:%s@@\\n' {n} \"$?\"\n")
            try:
                start = await self._stream.wait_for(begin, self._cursor, timeout)
                finish = await self._stream.wait_for(end, start.end(), timeout)
            except CommandTimeout:
                # Ctrl-C ends the command's subshell, so the shell takes the next command.
                await self.write("\x03")
                tail = self._stream.data[-2048:].decode("utf-8", "replace").replace("\r\n", "\n")
                raise CommandTimeout(f"guest command {command!r} did not finish within"
                                     f" {timeout:g} s; the console ends:\n{tail}") from None
            self._cursor = finish.end()
            output = bytes(self._stream.data[start.end():finish.start()])
            if len(self._stream.data) > TRANSCRIPT_KEEP:
                # Consumed output goes (the log file, if any, keeps everything).
                del self._stream.data[:self._cursor]
                self._cursor = 0
        text = output.decode("utf-8", "replace").replace("\r\n", "\n")
        result = CommandResult(int(finish.group(1)), text)
        if check and not result.ok:
            raise RuntimeError(f"guest command {command!r} failed with status {result.status}:\n"
                               f"{result.output}")
        return result

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._task
        if self._log:
            self._log.close()


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick for port 0).

    Another process could take it before QEMU binds it; QEMU then exits saying so."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def network_args(forward_tcp: Mapping[int, int]) -> list[str]:
    """QEMU options for a guest NIC on an isolated user network (`restrict=on`) with each
    guest TCP port of `forward_tcp` reachable at 127.0.0.1:<its host port> here."""
    forwards = "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}"
                       for guest, host in forward_tcp.items())
    # romfile= : no iPXE option ROM, which the kernel boot never runs and QEMU would have to find.
    return ["-netdev", f"user,id=net0,restrict=on{forwards}",
            "-device", "virtio-net-pci,netdev=net0,romfile="]


def network_script(address: str = GUEST_ADDRESS, timeout: float = 30.0) -> str:
    """Kit-shell commands that load virtio-net and bring the first NIC up at `address`."""
    tries = int(timeout / 0.05)
    return "\n".join([
        "set -e",
        f"modprobe -a virtio_pci {' '.join(NET_MODULES)}",
        f"i=0; until n=$(ls /sys/class/net | grep -v '^lo$' | head -n1); [ -n \"$n\" ]; do"
        f" i=$((i+1)); [ $i -lt {tries} ] || {{ echo 'no network interface appeared'; exit 1; }};"
        " usleep 50000; done",
        "ip link set lo up",
        f"ip addr add {address} dev \"$n\"",
        "ip link set \"$n\" up",
        "echo \"$n\"",
    ])


def _libc_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(prctl: Callable[..., int] | None, parent: int) -> Callable[[], None]:
    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:      # the parent died before prctl took effect
            os._exit(1)
    return preexec


def _kill_if_running(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()


def build_command(qemu: QemuInstall, *, kernel: Path, initrd: Path, serial_socket: Path,
                  qmp_socket: Path, memory_mib: int = DEFAULT_MEMORY_MIB, append: str = "",
                  devices: Iterable[str] = (), extra_args: Iterable[str] = (),
                  allow_reboot: bool = False,
                  forward_tcp: Mapping[int, int] | None = None) -> list[str]:
    """The full QEMU command line for a TCG q35 guest with shared (memfd) RAM.

    Unless allow_reboot, any reset (guest reboot, kernel panic, QMP system_reset) ends QEMU.
    Without forward_tcp ({guest_port: host_port}, both given) the guest has no NIC at all.
    """
    mem = f"{memory_mib}M"
    argv = qemu.command(
        "-nodefaults", "-no-user-config",
        "-machine", "q35,accel=tcg,memory-backend=mem",
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-m", mem, "-smp", "1",
        *(network_args(forward_tcp) if forward_tcp else ["-nic", "none"]),
        "-display", "none",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"console=ttyS0 panic=-1 {append}".strip(),
        "-chardev", f"socket,id=serial0,path={serial_socket},server=off",
        "-serial", "chardev:serial0",
        "-chardev", f"socket,id=qmp0,path={qmp_socket},server=off",
        "-object", "monitor-qmp,id=qmp,chardev=qmp0",
    )
    if not allow_reboot:
        argv.append("-no-reboot")
    for device in devices:
        argv += ["-device", device]
    return argv + list(extra_args)


class Vm:
    """One running QEMU guest; create with `await Vm.start(...)`."""

    def __init__(self) -> None:
        # Set while starting; read them through the properties of the same name once started.
        self._process: asyncio.subprocess.Process | None = None
        self._console: SerialConsole | None = None
        self._qmp: Vmm | None = None
        self._host: HostRoot | None = None
        self._exited: Exited | None = None
        self.argv: list[str] = []
        self.workdir: Path | None = None
        self.stderr = bytearray()
        self.on_exit: Callable[[int], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reaper: weakref.finalize[..., Vm] | None = None
        self._stopping = False
        self.forwarded_tcp: dict[int, int] = {}     # guest TCP port -> host port on 127.0.0.1

    @staticmethod
    def _started(part: _T | None) -> _T:
        if part is None:
            raise RuntimeError("the VM is not started: use `await Vm.start(...)`")
        return part

    @property
    def process(self) -> asyncio.subprocess.Process:
        return self._started(self._process)

    @property
    def console(self) -> SerialConsole:
        """The guest shell on the serial port."""
        return self._started(self._console)

    @property
    def qmp(self) -> Vmm:
        """QEMU's monitor (QMP), through QEMU's own client library."""
        return self._started(self._qmp)

    @property
    def host(self) -> HostRoot:
        """This machine's root filesystem in the guest, to run commands in (host_root=True)."""
        if self._host is None:
            raise RuntimeError("the VM was not started with host_root=True")
        return self._host

    @property
    def exited(self) -> Exited:
        """Done once QEMU has ended, with its exit status and stderr."""
        return self._started(self._exited)

    @classmethod
    async def start(cls, *, devices: Iterable[str] = (), extra_args: Iterable[str] = (),
                    memory_mib: int = DEFAULT_MEMORY_MIB, append: str = "",
                    qemu: QemuInstall | None = None, kernel: Path | None = None,
                    initrd: Path | None = None, log: Path | None = None,
                    wait_ready: bool = True, boot_timeout: float = 300.0,
                    progress: bool = True, allow_reboot: bool = False,
                    host_root: bool = False,
                    forward_tcp: Mapping[int, int] | None = None) -> Vm:
        """Start QEMU with the guest kernel and initramfs (fetched/built on first use).

        devices: `-device` values (e.g. from `vfio_user_device`); extra_args: more QEMU options;
        log: a file that receives the raw serial output; wait_ready: return only once the guest
        shell is up (boot under TCG takes several seconds); allow_reboot: a reset restarts the
        guest (then `await vm.console.wait_ready()` again) instead of ending QEMU; host_root:
        export this machine's `/` to the guest and mount it there, writable through a tmpfs
        overlay, for `vm.host` (needs wait_ready; after a reboot mount it again with
        `HostRoot.mount(vm.console)`); forward_tcp: {guest_port: host_port} reachable at
        127.0.0.1:host_port here (0: a free port; `vm.forwarded_tcp` says which), over an
        isolated user network whose eth0 comes up at 10.0.2.15/24 (needs wait_ready).
        """
        # A late import: hostroot builds on this module.
        from .hostroot import HostRoot, virtfs_args

        if host_root and not wait_ready:
            raise ValueError("host_root needs wait_ready: the tree is mounted from the shell")
        if host_root:
            extra_args = [*virtfs_args(), *extra_args]
        if forward_tcp and not wait_ready:
            raise ValueError("forward_tcp needs wait_ready: the NIC is set up from the shell")
        forwards = {guest: host or free_tcp_port() for guest, host in (forward_tcp or {}).items()}
        if qemu is None:
            qemu = await asyncio.to_thread(ensure_qemu)
        if kernel is None:
            kernel = await asyncio.to_thread(ensure_kernel)
        if initrd is None:
            initrd = await asyncio.to_thread(ensure_initramfs)
        vm = cls()
        vm.forwarded_tcp = forwards
        vm.workdir = Path(tempfile.mkdtemp(prefix="xhcidbg-vm-"))
        report = say if progress else None
        try:
            await vm._spawn(qemu, kernel, initrd, vm.workdir, memory_mib, append, devices,
                            extra_args, log, report, allow_reboot, forwards)
            if wait_ready:
                await vm.console.wait_ready(boot_timeout)
            if forwards:
                await vm.console.run(network_script(), 60, check=True)
            if host_root:
                vm._host = await HostRoot.mount(vm.console)
        except BaseException:
            await vm.stop()
            raise
        return vm

    async def _spawn(self, qemu: QemuInstall, kernel: Path, initrd: Path, workdir: Path,
                     memory_mib: int, append: str, devices: Iterable[str],
                     extra_args: Iterable[str], log: Path | None, report: Report | None,
                     allow_reboot: bool, forward_tcp: Mapping[int, int]) -> None:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[Connection] = loop.create_future()

        def accept_serial(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if accepted.done():
                writer.close()
            else:
                accepted.set_result((reader, writer))

        serial_path, qmp_path = workdir / "serial.sock", workdir / "qmp.sock"
        serial_server = await asyncio.start_unix_server(accept_serial, serial_path)
        exited = self._exited = loop.create_future()
        qmp = self._qmp = await Vmm.listen(
            str(qmp_path), gone=lambda: VmExited(*exited.result()) if exited.done() else None)
        self.argv = build_command(qemu, kernel=kernel, initrd=initrd, serial_socket=serial_path,
                                  qmp_socket=qmp_path, memory_mib=memory_mib, append=append,
                                  devices=devices, extra_args=extra_args, allow_reboot=allow_reboot,
                                  forward_tcp=forward_tcp)
        try:
            process = self._process = await asyncio.create_subprocess_exec(
                *self.argv, env=qemu.environ(), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                preexec_fn=_die_with_parent(_libc_prctl(), os.getpid()))
            assert process.stdout is not None and process.stderr is not None     # both PIPE
            self._reaper = weakref.finalize(self, _kill_if_running, process)
            self._tasks = [asyncio.create_task(self._watch(process, exited, report)),
                           asyncio.create_task(self._drain(process.stdout, report)),
                           asyncio.create_task(self._drain(process.stderr, report))]
            waiting = asyncio.gather(accepted, qmp.accept())
            done, _ = await asyncio.wait({waiting, exited}, timeout=60,
                                         return_when=asyncio.FIRST_COMPLETED)
            if waiting not in done:
                waiting.cancel()
                with contextlib.suppress(BaseException):
                    await waiting
                if exited.done():
                    raise VmExited(*exited.result())
                raise TimeoutError("QEMU did not connect its serial and QMP sockets within 60 s")
            try:
                waiting.result()         # QMP's greeting or negotiation failed: raises here
            except VmmError:
                # QEMU hung up on the monitor: most often because it is exiting with a reason
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(exited), 5)
                if exited.done():
                    raise VmExited(*exited.result()) from None
                raise
        finally:
            serial_server.close()
        serial_r, serial_w = accepted.result()
        self._console = SerialConsole(serial_r, serial_w, exited, log, report)

    async def _drain(self, stream: asyncio.StreamReader, report: Report | None) -> None:
        while line := await stream.readline():
            self.stderr += line
            del self.stderr[:-STDERR_KEEP]
            if report:
                report(f"qemu: {line.decode(errors='replace').rstrip()}")

    async def _watch(self, process: asyncio.subprocess.Process, exited: Exited,
                     report: Report | None) -> None:
        code = await process.wait()
        # Let the stderr reader collect QEMU's last words before anyone reports them.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._tasks[1:]), 2)
        exited.set_result((code, self.stderr.decode(errors="replace")))
        if not self._stopping and report:
            report(f"QEMU exited with status {code}" if code == 0
                   else f"[yellow]QEMU exited with status {code}[/]")
        if self.on_exit:
            self.on_exit(code)

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process else None

    async def wait_exit(self, timeout: float | None = None) -> int:
        code, _ = await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        return code

    async def stop(self, timeout: float = 10.0) -> int | None:
        """Ask QEMU to quit (QMP), kill it if it does not, and clean up. Safe to call twice."""
        self._stopping = True
        process = self._process
        if process and process.returncode is None:
            if self._qmp:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._qmp.quit(), min(timeout, 5))
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
        for task in self._tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
        for part in (self._console, self._qmp):
            if part:
                await part.close()
        if self._reaper:
            self._reaper.detach()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        return self.returncode

    async def __aenter__(self) -> Vm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
