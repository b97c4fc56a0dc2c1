"""Console commands about the guest: the scripted one in-process, or a real VM's Linux (its
serial shell, its kernel log, freezing it through QMP), `wait` for a condition, and `set`."""
from __future__ import annotations

import asyncio
import time
from argparse import Namespace
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich.text import Text

from ..emu.context import SlotState
from ..guestkit.launch import CommandResult, CommandTimeout, SerialConsole
from . import render
from .change import set_register
from .registry import command, parser
from .world import World

if TYPE_CHECKING:
    from .console import Console

SESSION, EXECUTION = "session", "execution"
POLL_S = 0.01
FOLLOW_S = 1.0                  # how often a followed kernel log is read


# ==== guest ======================================================================================
p = parser("guest", "The guest: its state; on a VM also its shell, its kernel log, freezing.",
           """guest                          # state: running, frozen, shell up, devices
              guest run lsusb -t             # a shell command in the VM; prints its output
              guest run 'dmesg | tail -5'
              guest log                      # the kernel messages that came since last time
              guest log -n 50                # the last 50 kernel messages
              guest log --follow             # print new kernel messages as they come (again: off)
              guest freeze                   # stop the VM's vCPUs now (QMP `stop`)
              guest thaw                     # let them run (QMP `cont`)""")
p.add_argument("action", nargs="?", choices=("status", "run", "log", "freeze", "thaw"),
               default="status")
p.add_argument("words", nargs="*", metavar="CMD", help="run: the shell command")
p.add_argument("-n", "--lines", type=int, help="log: the last N messages")
p.add_argument("--follow", action="store_true", help="log: follow the kernel log (toggles)")
p.add_argument("-t", "--timeout", type=float, default=60.0,
               help="run: seconds the command may take (default 60)")


@command(p, SESSION)
async def guest(con: Console, args: Namespace) -> None:
    session = con.session
    if isinstance(session, World):
        if args.action != "status":
            raise RuntimeError(f"`guest {args.action}` needs a VM (`xhcidbg vm`); this session's "
                               f"guest is the in-process scripted one")
        _scripted_status(con, session)
        return
    if args.action == "status":
        _live_status(con)
    elif args.action == "run":
        if not args.words:
            raise ValueError("guest run CMD: which command? (e.g. `guest run lsusb`)")
        result = await _run(con, " ".join(args.words), args.timeout)
        if result.output:
            con.out.print(Text(result.output.rstrip("\n")))
        if not result.ok:
            raise RuntimeError(f"the guest command exited with status {result.status}")
    elif args.action == "log":
        await _log(con, args)
    else:
        vmm = session.vmm
        if vmm is None:
            raise RuntimeError("no QMP: xhcidbg cannot freeze this guest (`serve --qmp PATH`)")
        changed = await (vmm.freeze() if args.action == "freeze" else vmm.thaw())
        state = "frozen" if vmm.frozen else "running"
        con.out.print(f"guest {state}" + ("" if changed else " already"))


def _scripted_status(con: Console, w: World) -> None:
    r = w.runner
    if w.driver is None:
        con.out.print("no guest runs in this session (--no-guest)")
        con.data({"kind": w.kind, "runs": False})
        return
    crash = str(r.crashed) if r.finished else None
    job = r.current.what if r.current is not None and not r.finished else None
    state = "stopped" if r.finished else "running" if job is not None else "idle"
    waiting = r.waiting is not None and not r.idle
    paused = con.controller.gate.paused
    text = {"stopped": f"stopped: {crash}", "running": f"running {job}",
            "idle": "idle (waiting for interrupts)"}[state]
    con.out.print(f"guest: {text}; {len(w.guest_devices)} device(s) enumerated; "
                  f"{len(w.reports)} report(s) received; {len(r.jobs)} job(s) queued")
    if waiting:
        con.out.print("  waiting on the controller" + (" (paused)" if paused else ""))
    for e in w.guest_errors:
        con.out.print(Text(f"  error: {e}", style="red"))
    con.data({"kind": w.kind, "runs": True, "state": state, "job": job, "crash": crash,
              "devices_enumerated": len(w.guest_devices), "reports": len(w.reports),
              "reports_received": w.report_count, "jobs_queued": len(r.jobs),
              "waiting_on_controller": waiting, "controller_paused": paused,
              "errors": list(w.guest_errors)})


def _live_status(con: Console) -> None:
    session = con.session
    con.out.print(con.guest_state() or "guest: running")
    shell = session.shell
    shell_state = "none" if shell is None else "up" if shell_up(shell) else "booting"
    con.out.print({"none": "shell: none (the VMM was started elsewhere; `xhcidbg vm` has one)",
                   "up": "shell: up", "booting": "shell: not up yet (booting)"}[shell_state])
    vmm = session.vmm
    if vmm is not None and vmm.freezes:
        con.out.print(f"frozen by xhcidbg {vmm.freezes} time(s), {vmm.frozen_s:.1f} s in all")
    configured = [(s.port.number, s.id) for s in con.controller.slots.values()
                  if s.port is not None and s.state == SlotState.CONFIGURED]
    con.out.print("devices the guest configured: "
                  + (", ".join(f"port {port} slot {slot}" for port, slot in configured)
                     or "none yet"))
    freeze = session.freeze
    con.data({"kind": session.kind, "qmp": vmm is not None,
              "frozen": vmm.frozen if vmm is not None else None,
              "freeze_enabled": freeze.enabled if freeze is not None else None,
              "freeze_error": (freeze.error or None) if freeze is not None else None,
              "shell": shell_state,
              "freezes": vmm.freezes if vmm is not None else 0,
              "frozen_s": vmm.frozen_s if vmm is not None else 0.0,
              "configured": [{"port": port, "slot": slot} for port, slot in configured]})


def shell_up(shell: SerialConsole) -> bool:
    return "shell ready" in shell.milestones


def _shell(con: Console) -> SerialConsole:
    shell = con.session.shell
    if shell is None:
        raise RuntimeError("this session has no guest shell: the VM was started elsewhere "
                           "(`xhcidbg vm` boots one with a shell)")
    if not shell_up(shell):
        raise RuntimeError("the guest shell is not up yet (`wait shell`)")
    vmm = con.session.vmm
    if vmm is not None and vmm.frozen:
        raise RuntimeError("the guest is frozen (the controller is stopped): `continue`, or "
                           "`guest thaw` to let it run while the controller stays paused")
    return shell


async def _run(con: Console, command_line: str, timeout: float) -> CommandResult:
    shell = _shell(con)
    if con.controller.gate.paused:
        con.out.print(Text("(the controller is paused: a command that touches USB waits for "
                           "`continue`)", style="yellow"))
    try:
        return await shell.run(command_line, timeout=timeout)
    except CommandTimeout as e:
        raise RuntimeError(str(e)) from None


class KernelLog:
    """The guest's kernel messages, read through its shell; remembers what was shown."""

    def __init__(self) -> None:
        self.shown = 0                   # messages already printed
        self.follower: asyncio.Task[None] | None = None

    async def read(self, con: Console) -> list[str]:
        result = await _run(con, "dmesg", 30)
        return result.output.splitlines()


def _kernel_log(con: Console) -> KernelLog:
    klog = con.extras.get("kernel_log")
    if not isinstance(klog, KernelLog):
        klog = con.extras["kernel_log"] = KernelLog()
    return klog


async def _log(con: Console, args: Namespace) -> None:
    klog = _kernel_log(con)
    if args.follow:
        if klog.follower is not None:
            klog.follower.cancel()
            klog.follower = None
            con.out.print("kernel log: no longer followed")
            return
        _shell(con)
        klog.follower = asyncio.get_running_loop().create_task(_follow(con, klog))
        con.out.print("kernel log: new messages are printed as they come (`guest log --follow` "
                      "again stops)")
        return
    lines = await klog.read(con)
    if len(lines) < klog.shown:           # the guest rebooted, or the ring wrapped
        klog.shown = 0
    show = lines[-args.lines:] if args.lines else lines[klog.shown:]
    klog.shown = len(lines)
    for line in show:
        con.out.print(Text(line))
    if not show:
        con.out.print("no new kernel messages")


async def _follow(con: Console, klog: KernelLog) -> None:
    klog.shown = len(await klog.read(con))
    while True:
        await asyncio.sleep(FOLLOW_S)
        try:
            lines = await klog.read(con)
        except RuntimeError:                  # frozen, or the shell went: try again later
            continue
        if len(lines) < klog.shown:
            klog.shown = 0
        for line in lines[klog.shown:]:
            con.notice(Text(f"guest: {line}", style="dim"))
        klog.shown = len(lines)


# ==== wait =======================================================================================
p = parser("wait", "Wait for a condition instead of sleeping; fails after the timeout.",
           """wait stop                      # a breakpoint, a step or a pause stopped it
              wait shell -t 300              # the VM's shell is up
              wait device storage            # the guest configured the device called storage
              wait device 5                  # ... the device on root port 5
              wait time 2                    # let 2 s pass (the session goes on meanwhile)""")
p.add_argument("what", choices=("stop", "shell", "device", "time"))
p.add_argument("which", nargs="?", help="device: a port number or a device name; time: seconds")
p.add_argument("-t", "--timeout", type=float, default=60.0, help="seconds (default 60)")


@command(p, EXECUTION)
async def wait(con: Console, args: Namespace) -> None:
    gate = con.controller.gate
    if args.what == "time":
        await asyncio.sleep(float(args.which or 1))
        return
    if args.what == "stop":
        hits = con.breakpoints.hits
        if await _until(lambda: gate.paused or con.breakpoints.hits != hits, args.timeout):
            await con.session.settle(0.5)
            await con.guest_settled()
            con.show_context()
            return
        raise TimeoutError(f"the controller did not stop within {args.timeout:g} s")
    if args.what == "shell":
        shell = con.session.shell
        if shell is None:
            raise RuntimeError("this session has no guest shell (the VM was started elsewhere)")
        if not await _until(lambda: shell_up(shell), args.timeout):
            raise TimeoutError(f"the guest shell was not up within {args.timeout:g} s")
        con.out.print("guest shell is up")
        return
    if not args.which:
        raise ValueError("wait device PORT|NAME: which device?")
    port = int(args.which) if args.which.isdigit() else con.session.find(args.which)[0]
    started = time.monotonic()
    if not await _until(lambda: _configured(con, port), args.timeout):
        state = render.slot_of_port(con.controller, port)
        raise TimeoutError(f"the guest did not configure the device on port {port} within "
                           f"{args.timeout:g} s (its slot: "
                           f"{'none' if state is None else state.id})"
                           + (" -- the controller is paused" if gate.paused else ""))
    slot = render.slot_of_port(con.controller, port)
    con.out.print(f"port {port}: the guest configured it as slot {slot.id if slot else '?'} "
                  f"after {time.monotonic() - started:.1f} s")


def _configured(con: Console, port: int) -> bool:
    slot = render.slot_of_port(con.controller, port)
    return slot is not None and slot.state == SlotState.CONFIGURED


async def _until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


# ==== set ========================================================================================
p = parser("set", "Show or change a console setting, or write a register as the guest would.",
           """set                            # every setting and its value
              set freeze off                 # stops no longer freeze the guest (it keeps running)
              set freeze on
              set reg USBCMD 0x4             # an MMIO write of USBCMD (here: R/S 0, halt)
              set reg USBCMD rs=0            # the same, by field (other bits as they read)
              set reg PORTSC[5] pr=1         # reset port 5 (RW1C change bits left alone)
              set reg IMAN[0] ie=1""")
p.add_argument("name", nargs="?", choices=("freeze", "reg"))
p.add_argument("values", nargs="*", metavar="VALUE",
               help="freeze: on or off; reg: NAME VALUE, or NAME FIELD=VALUE ...")


@command(p, SESSION)
async def set_(con: Console, args: Namespace) -> None:
    if args.name == "reg":
        await set_register(con, args.values)
        return
    freeze = con.session.freeze
    if args.name is None or not args.values:
        if freeze is None:
            why = ("no QMP" if con.session.live_guest else "the scripted guest waits for a "
                   "stopped controller by itself")
            con.out.print(f"freeze: unavailable ({why})")
        else:
            con.out.print(f"freeze: {'on' if freeze.enabled else 'off'} (stops freeze the guest)")
        return
    if len(args.values) != 1 or args.values[0] not in ("on", "off"):
        raise ValueError("set freeze on|off")
    if freeze is None:
        raise RuntimeError("freezing needs the VMM's QMP socket (`xhcidbg vm` has it; "
                           "`serve --qmp PATH`)")
    freeze.enabled = args.values[0] == "on"
    con.out.print(f"freeze {args.values[0]}")
