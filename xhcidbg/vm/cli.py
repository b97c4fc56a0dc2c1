"""`xhcidbg serve` and `xhcidbg vm`: the controller as a real VM's USB controller.

`serve` runs the controller and its virtual devices as a vfio-user server for a VMM the user
starts; `vm` is the same server plus QEMU booting the guest kit's Linux against it.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..faults.cli import add_fault_options, apply_fault_options
from ..session import add_device_options, close_devices, device_choice, make_devices
from ..session.options import add_script_options
from ..session.vmm import Vmm, VmmError
from ..trace.cli import add_trace_option, tracing
from ..vfio_user.server import BUSY_POLL_US
from .backend import Backend, memory_options

if TYPE_CHECKING:
    from ..guestkit.launch import Vm
    from ..guestkit.qemu import QemuInstall
    from ..ui.console import Console

Main = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]

SERVE_EXAMPLES = """examples:
  xhcidbg serve --socket /tmp/xhci.sock
  xhcidbg serve --socket /tmp/xhci.sock --storage disk.img --loopback
  xhcidbg serve --socket /tmp/xhci.sock --storage new.img --storage-size 128 --once
  xhcidbg serve --socket /tmp/xhci.sock --qmp /tmp/qmp.sock     the console freezes the guest
  xhcidbg serve --socket /tmp/xhci.sock -c 'break command type=address' --batch < cmds

then start QEMU (>= 10.1) with shared guest RAM and the printed -device option (and, for
--qmp, a QMP socket):
  qemu-system-x86_64 -machine q35 -m 512M \\
      -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem \\
      -device '{"driver":"vfio-user-pci","socket":{"path":"/tmp/xhci.sock","type":"unix"}}' \\
      -qmp unix:/tmp/qmp.sock,server=on,wait=off ...

With standard input a terminal the console opens (--no-console: it does not).
"""

VM_EXAMPLES = """examples:
  xhcidbg vm                                   boot Linux with a tablet and a keyboard
  xhcidbg vm --storage disk.img --loopback     and a storage stick and Gadget Zero
  xhcidbg vm --storage new.img --storage-size 64 --speed storage=high
  xhcidbg vm --serial-log guest.log -m 512 -- -smp 2 -d guest_errors
  xhcidbg vm --storage d.img --run 'cat /proc/partitions' --poweroff
  xhcidbg vm -c 'wait shell -t 300; guest run lsusb; ports'      console commands, then exit
  xhcidbg vm --batch < script.txt                  a failing command makes the exit status 1

The guest kit (QEMU >= 10.1 with vfio-user, a Debian kernel, a busybox initramfs) is fetched on
first use, verified against Debian's signed indexes, and cached (python -m xhcidbg.guestkit).
The guest's serial console is a shell the host drives (--run, `guest run` in the console);
kernel messages go to dmesg (`guest log`).  With standard input a terminal the console opens
as soon as QEMU runs; a breakpoint or `pause` also freezes the guest's vCPUs over QMP (`set
freeze off` to let them run), so Linux's USB timeouts do not fire while you look.
"""


# ---- shared options -------------------------------------------------------------------------
def add_options(parser: argparse.ArgumentParser) -> None:
    """The device options every session takes, then the vfio-user controller's."""
    add_device_options(parser, scratch_stick=False)
    g = parser.add_argument_group("controller")
    g.add_argument("--usb2-ports", type=int, default=4, metavar="N",
                   help="USB 2 root ports (default 4)")
    g.add_argument("--usb3-ports", type=int, default=4, metavar="N",
                   help="USB 3 root ports (default 4)")
    g.add_argument("--no-msix", action="store_true",
                   help="offer MSI and INTx only (the guest falls back to MSI)")
    g.add_argument("--busy-poll", type=int, default=BUSY_POLL_US, metavar="US",
                   help=f"after each message from the VMM, keep polling for US microseconds "
                        f"instead of sleeping (default {BUSY_POLL_US}; 0 saves the CPU, costs "
                        f"throughput: each guest register read then pays a wakeup; faster when "
                        f"VMs outnumber the cores, which the spinning takes from them)")
    add_trace_option(g)
    g.add_argument("-v", "--verbose", action="store_true",
                   help="log what the controller refuses and the vfio-user session")
    add_fault_options(parser.add_argument_group("faults"))
    g = parser.add_argument_group("console")
    g.add_argument("--no-console", action="store_true",
                   help="no console even when standard input is a terminal")
    add_script_options(g)
    g.add_argument("--no-freeze", action="store_true",
                   help="stops of the controller leave the guest running (its timers fire)")
    g.add_argument("--api", metavar="PATH",
                   help="also answer console commands as JSON lines on this UNIX socket, and "
                        "send stop, guest and device events there (see the README); without a "
                        "terminal or --batch the session then runs until a `quit` request")


def _console_mode(args: argparse.Namespace) -> str | None:
    """'batch', 'interactive', 'api' (the socket alone) or None (no console)."""
    if args.batch or args.commands:
        return "batch"
    if not args.no_console and not args.poweroff_set and sys.stdin.isatty():
        return "interactive"
    return "api" if args.api else None


def _open_console(backend: Backend, args: argparse.Namespace) -> Console:
    from ..ui.console import Console
    return Console(session=backend, devices=device_choice(args), width=args.width)


async def _console_phase(console: Console, args: argparse.Namespace) -> int:
    """Run the console (the prompt, the batch commands, or only the API socket); 1 if a batch
    command failed."""
    from ..ui.api import ApiServer

    await console.astart()
    api = ApiServer(console, args.api) if args.api else None
    try:
        if api is not None:
            await api.start()
            _say(f"API: JSON lines on {api.path}")
        mode = _console_mode(args)
        if mode == "interactive":
            await console.ainteract()
            return 0
        if mode == "api":
            await console.wait_quit()
            return 0
        lines = list(args.commands or [])
        if args.batch:
            lines += (await asyncio.to_thread(sys.stdin.read)).splitlines()
        return 1 if await console.arun_script(lines, echo=args.echo) else 0
    finally:
        if api is not None:
            await api.close()
        await console.aclose()


def _say(text: str) -> None:
    print(f"xhcidbg: {text}", file=sys.stderr, flush=True)


def _configure_logging(args: argparse.Namespace) -> None:
    # The CLI's root logger shows errors only; a VM's user wants the session's warnings too.
    level = logging.INFO if args.verbose else logging.WARNING
    for name in ("xhcidbg.vm", "xhcidbg.session", "xhcidbg.vfio_user", "xhcidbg.emu"):
        logging.getLogger(name).setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger().setLevel(min(logging.getLogger().level, level))


def _make_backend(args: argparse.Namespace, socket_path: str) -> Backend:
    devices = make_devices(device_choice(args), say=_say)
    try:
        backend = Backend(socket_path, devices, usb2_ports=args.usb2_ports,
                          usb3_ports=args.usb3_ports, msix=not args.no_msix,
                          busy_poll_us=max(0, args.busy_poll), say=_say)
    except BaseException:
        close_devices(devices)
        raise
    try:
        apply_fault_options(backend.faults, args, say=_say)
    except BaseException:
        backend.close()
        raise
    return backend


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _run(main: Main, args: argparse.Namespace) -> int:
    _configure_logging(args)
    try:
        return asyncio.run(main(args))
    except (ValueError, OSError) as e:
        _say(f"error: {e}")
        return 2
    except KeyboardInterrupt:          # before the signal handlers were in place (kit fetch)
        _say("interrupted")
        return 130


# ---- serve ----------------------------------------------------------------------------------
async def serve_main(args: argparse.Namespace) -> int:
    args.poweroff_set = False
    backend = _make_backend(args, args.socket)
    stop = asyncio.Event()
    qmp: asyncio.Task[None] | None = None
    try:
        await backend.start()
        backend.attach_all(device_choice(args).attach)
        with tracing(backend.trace, args, say=_say), _stop_on_signals(stop):
            print(f"-device '{backend.device_arg}'", flush=True)
            _say(f"serving on {backend.socket_path}; QEMU also needs shared guest RAM: "
                 + " ".join(shlex.quote(a) for a in memory_options(512)))
            if args.qmp:
                qmp = asyncio.ensure_future(_follow_qmp(backend, args))
            serving = _serve_clients(backend, args, stop)
            if _console_mode(args) is None:
                return await serving
            done = await _first(serving, _console_phase(_open_console(backend, args), args))
            return int(done.pop().result())
    finally:
        if qmp is not None:
            qmp.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await qmp
        if backend.vmm is not None:
            await backend.vmm.close()      # bounded: QEMU may be hanging up at this moment
        backend.close()


async def _serve_clients(backend: Backend, args: argparse.Namespace, stop: asyncio.Event) -> int:
    while True:
        done = await _first(backend.wait_disconnected(), stop.wait())
        if stop.is_set():
            _say("stopping")
            return 0
        reason = done.pop().result()
        _say(f"the VMM went away ({reason})")
        if args.once:
            return 0
        # The next VMM finds the controller as after power-on.
        backend.controller.hardware_reset()
        _say("waiting for the next VMM")


QMP_RETRY_S = 0.5


async def _follow_qmp(backend: Backend, args: argparse.Namespace) -> None:
    """Keep a QMP connection to the user's QEMU: connect once it is up, again after it went."""
    told = False
    while True:
        try:
            vmm = await Vmm.connect(args.qmp, timeout=5)
        except VmmError as e:
            if not told:
                _say(f"QMP: waiting for {args.qmp} ({e})")
                told = True
            await asyncio.sleep(QMP_RETRY_S)
            continue
        told = False
        backend.use_vmm(vmm)
        if backend.freeze is not None:
            backend.freeze.enabled = not args.no_freeze
        _say(f"QMP connected ({args.qmp}): stops of the controller freeze the guest"
             if not args.no_freeze else f"QMP connected ({args.qmp})")
        try:
            await vmm.wait_gone()
        finally:
            # the session forgets the VMM before the close, so a teardown that cancels this
            # task does not close it a second time
            backend.drop_vmm()
            await vmm.close()
        _say("QMP: QEMU went away")


async def _first(*awaitables: Awaitable[Any]) -> set[asyncio.Future[Any]]:
    """Wait for the first of `awaitables` to finish; cancel the others."""
    tasks: list[asyncio.Future[Any]] = [asyncio.ensure_future(a) for a in awaitables]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return done


# ---- vm -------------------------------------------------------------------------------------
GUEST_USB_LIST = (
    "for d in /sys/bus/usb/devices/[0-9]*; do case $d in *:*) continue;; esac;"
    " echo \"${d##*/} $(cat $d/speed) Mb/s $(cat $d/product 2>/dev/null)\"; done")


def _guest_kit(args: argparse.Namespace) -> tuple[QemuInstall, Path, Path]:
    from ..guestkit import ensure_initramfs, ensure_kernel, ensure_qemu
    return (ensure_qemu(),
            Path(args.kernel) if args.kernel else ensure_kernel(),
            Path(args.initrd) if args.initrd else ensure_initramfs())


async def vm_main(args: argparse.Namespace) -> int:
    from ..guestkit.launch import CommandTimeout, Vm, VmExited
    from ..guestkit.report import KitError

    args.poweroff_set = args.poweroff
    if args.qemu_args and not args.qemu_args[0].startswith("-"):
        raise ValueError(f"unexpected argument {args.qemu_args[0]!r} (QEMU options go after --)")
    if args.memory < 64:
        raise ValueError("--memory must be at least 64 MiB")
    for path in (args.kernel, args.initrd):
        if path and not os.path.isfile(path):
            raise ValueError(f"{path} does not exist")
    try:
        qemu, kernel, initrd = await asyncio.to_thread(_guest_kit, args)
    except KitError as e:
        _say(f"error: {e}")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="xhcidbg-vm-"))
    backend = _make_backend(args, args.socket or str(workdir / "xhci.sock"))
    stop = asyncio.Event()
    vm: Vm | None = None
    started = time.monotonic()
    try:
        await backend.start()
        backend.attach_all(device_choice(args).attach)
        with tracing(backend.trace, args, say=_say), _stop_on_signals(stop):
            _say(f"starting QEMU {qemu.version} ({args.memory} MiB, TCG): kernel {kernel.name}")
            booting = asyncio.ensure_future(Vm.start(
                devices=[backend.device_arg], extra_args=args.qemu_args,
                memory_mib=args.memory, append=args.append, qemu=qemu, kernel=kernel,
                initrd=initrd, log=Path(args.serial_log) if args.serial_log else None,
                wait_ready=False, progress=True))
            await _first(asyncio.shield(booting), stop.wait())
            if stop.is_set():
                _say("stopping")
                booting.cancel()
                with contextlib.suppress(BaseException):
                    await booting
                return 0
            vm = booting.result()
            pid = vm.process.pid if vm.process is not None else "?"
            _say(f"QEMU running (pid {pid}); xhcidbg holds its QMP socket")
            if args.serial_log:
                _say(f"guest serial console -> {args.serial_log}")
            return await _run_guest(vm, backend, args, stop, started)
    except VmExited as e:
        _say(f"QEMU exited while starting: {e}")
        return 1
    except CommandTimeout as e:
        _say(f"error: {e}")
        return 1
    finally:
        if vm is not None:
            await vm.stop()
        backend.close()
        shutil.rmtree(workdir, ignore_errors=True)


async def _run_guest(vm: Vm, backend: Backend, args: argparse.Namespace, stop: asyncio.Event,
                     started: float) -> int:
    from ..guestkit.launch import VmExited

    qemu_exit = _exit_of(vm)
    shell = vm.console
    backend.shell = shell
    backend.use_vmm(vm.qmp)
    if backend.freeze is not None:
        backend.freeze.enabled = not args.no_freeze
    mode = _console_mode(args)

    def exited() -> asyncio.Future[tuple[int, str]]:
        return asyncio.shield(qemu_exit)

    try:
        if mode is not None and not args.run:
            # the console opens at once: enumeration during boot can be stopped at, too
            code = await _console_with_guest(backend, args, stop, qemu_exit)
            if code is not None:
                return code
            if not args.poweroff:
                return 0
            await shell.write("poweroff -f\n")
            await _first(exited(), stop.wait())
            return 0 if qemu_exit.done() else await _qemu_gone(vm)
        done = await _first(shell.wait_ready(args.boot_timeout), exited(), stop.wait())
        if stop.is_set():
            _say("stopping: QEMU quits")
            return 0
        if qemu_exit.done():
            return await _qemu_gone(vm)
        done.pop().result()          # a boot timeout raises here
        _say(f"guest shell ready after {time.monotonic() - started:.1f} s")
        await asyncio.sleep(args.settle)
        usb = await shell.run(GUEST_USB_LIST)
        for line in usb.output.strip().splitlines():
            _say(f"guest sees USB {line}")
        for command in args.run:
            result = await shell.run(command, timeout=args.command_timeout)
            sys.stdout.write(result.output if result.output.endswith("\n") or not result.output
                             else result.output + "\n")
            sys.stdout.flush()
            if not result.ok:
                _say(f"guest command {command!r} exited with status {result.status}")
        if mode is not None:
            code = await _console_with_guest(backend, args, stop, qemu_exit)
            if code is not None:
                return code
            if not args.poweroff:
                return 0
        if args.poweroff:
            _say("powering the guest off")
            await shell.write("poweroff -f\n")
        else:
            _say("running; Ctrl-C (or SIGTERM) stops the guest and xhcidbg")
        await _first(exited(), stop.wait())
        if stop.is_set() and not qemu_exit.done():
            _say("stopping: QEMU quits")
            return 0
        return await _qemu_gone(vm)
    except VmExited:
        return await _qemu_gone(vm)


async def _console_with_guest(backend: Backend, args: argparse.Namespace, stop: asyncio.Event,
                              qemu_exit: asyncio.Future[tuple[int, str]]) -> int | None:
    """The console while the guest runs.  The exit status when the session must end now
    (the console failed a batch command, QEMU went, a signal came); None to go on."""
    console = _open_console(backend, args)
    done = await _first(_console_phase(console, args), asyncio.shield(qemu_exit), stop.wait())
    if stop.is_set():
        _say("stopping: QEMU quits")
        return 0
    if qemu_exit.done():
        code, _ = qemu_exit.result()
        _say(f"QEMU exited (status {code}); the console ends")
        return 0 if code == 0 else 1
    failed = int(done.pop().result())
    return failed or None


def _exit_of(vm: Vm) -> asyncio.Future[tuple[int, str]]:
    """What QEMU's end resolves to: (exit status, its standard error)."""
    if vm.exited is None:
        raise RuntimeError("QEMU has not been started")
    return vm.exited


async def _qemu_gone(vm: Vm) -> int:
    code, _ = await asyncio.shield(_exit_of(vm))
    if code == 0:
        _say("QEMU exited; done")
        return 0
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    _say(f"QEMU {how}; the guest is gone, stopping")
    return 1


# ---- registration ---------------------------------------------------------------------------
def add_vm_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]
                    ) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Add `serve` and `vm` to an argparse sub-parser set; each sets `func(args) -> int`."""
    serve = subparsers.add_parser(
        "serve", help="serve the controller to a VMM you start yourself (vfio-user)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SERVE_EXAMPLES,
        description="Run the xHCI controller and its virtual devices as a vfio-user server "
                    "and print the -device option that connects QEMU (>= 10.1) to it.")
    serve.add_argument("--socket", metavar="PATH", required=True,
                       help="UNIX socket to listen on (a stale socket there is replaced)")
    serve.add_argument("--once", action="store_true",
                       help="exit when the VMM disconnects instead of waiting for the next one")
    serve.add_argument("--qmp", metavar="PATH",
                       help="the QMP socket of the QEMU you start (-qmp unix:PATH,server=on,"
                            "wait=off): stops of the controller then freeze the guest")
    add_options(serve)
    serve.set_defaults(func=lambda args: _run(serve_main, args))

    vm = subparsers.add_parser(
        "vm", help="boot a Linux guest whose USB controller is xhcidbg",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=VM_EXAMPLES,
        usage="%(prog)s [options] [-- QEMU-OPTION ...]",
        description="Serve the controller over vfio-user and boot the guest kit's Linux under "
                    "QEMU (TCG) with it as the USB controller.  xhcidbg and QEMU live and die "
                    "together.")
    g = vm.add_argument_group("guest")
    g.add_argument("-m", "--memory", metavar="MIB", type=int, default=256,
                   help="guest RAM in MiB (default 256)")
    g.add_argument("--serial-log", metavar="FILE",
                   help="append everything the guest writes on its serial console to FILE")
    g.add_argument("--append", metavar="ARGS", default="",
                   help="more kernel command-line arguments (e.g. 'pci=nomsi')")
    g.add_argument("--kernel", metavar="FILE", help="boot this kernel instead of the kit's")
    g.add_argument("--initrd", metavar="FILE", help="use this initramfs instead of the kit's")
    g.add_argument("--socket", metavar="PATH",
                   help="the vfio-user socket (default: in a private temporary folder)")
    g.add_argument("--boot-timeout", metavar="S", type=float, default=300.0,
                   help="give up if the guest shell is not up after S seconds (default 300)")
    g = vm.add_argument_group("guest commands")
    g.add_argument("--run", metavar="CMD", action="append", default=[],
                   help="run CMD in the guest shell once it is up and print its output "
                        "(repeatable; in order)")
    g.add_argument("--command-timeout", metavar="S", type=float, default=120.0,
                   help="time allowed for each --run command (default 120)")
    g.add_argument("--settle", metavar="S", type=float, default=2.0,
                   help="seconds to let USB enumeration finish before listing devices and "
                        "running commands (default 2)")
    g.add_argument("--poweroff", action="store_true",
                   help="power the guest off after the --run commands (xhcidbg then exits)")
    add_options(vm)
    vm.add_argument("qemu_args", nargs="*", metavar="-- QEMU-OPTION",
                    help="everything after -- goes to QEMU as it is")
    vm.set_defaults(func=lambda args: _run(vm_main, args))
    return serve, vm
