"""The console's commands.  Each is registered with its parser (help and examples included);
`help COMMAND` prints that parser's help."""
from __future__ import annotations

import asyncio
import contextlib
import io
import shlex
from argparse import ArgumentTypeError, Namespace
from typing import TYPE_CHECKING, TypeVar

from rich.table import Table
from rich.text import Text

from ..devices import Keyboard, Tablet, UsbDevice
from ..session import DEVICE_NAMES, SCRATCH_STICK_MIB, make_device
from ..trace import cli as trace_cli
from . import render
from .observe import BREAK_KINDS, Breakpoint
from .registry import REGISTRY, CommandParser, command, parser
from .world import World

if TYPE_CHECKING:
    from .console import Console

EXECUTION, INSPECT, DEVICES, SESSION = "execution", "inspection", "devices", "session"
MAX_ADDRESS = (1 << 64) - 1
MAX_MEM_BYTES = 64 << 10        # `mem` shows at most this much at once
RUN_UNTIL_S = 10.0              # how long `until`, `finish`, `step event` wait for their stop
POLL_S = 0.002
MAX_SOURCE_DEPTH = 8
D = TypeVar("D", bound=UsbDevice)


def _plugged(con: Console, cls: type[D]) -> D:
    """The first plugged device of class `cls`, found by its name."""
    _, dev = con.session.find(cls.name)
    if not isinstance(dev, cls):
        raise LookupError(f"the device called {cls.name} is not a {cls.__name__}")
    return dev


def _ports(con: Console, words: list[str]) -> list[str]:
    return [str(p.number) for p in con.controller.ports]


def _slots(con: Console, words: list[str]) -> list[str]:
    return [str(s) for s in sorted(con.controller.slots)]


def _address(text: str) -> int:
    """A guest address: hex (0x...) or decimal."""
    try:
        return render.parse_number(text, MAX_ADDRESS)
    except ValueError as e:
        raise ArgumentTypeError(str(e)) from None


def _known_addresses(con: Console) -> list[str]:
    """Guest addresses the controller knows: the DCBAA, ring dequeue pointers, contexts."""
    c = con.controller
    out = [c.dcbaap, c.cmd_ring.dequeue]
    for s in c.slots.values():
        out += [s.out_ctx, s.input_ctx, *(e.ring.dequeue for e in s.endpoints.values())]
    out += [a for ir in c.interrupters if ir.segments for a in (ir.erstba, ir.erdp & ~0xF)]
    return [f"{a:#x}" for a in dict.fromkeys(out) if a]


# ==== inspection =================================================================================
p = parser("regs", "Capability, operational and runtime registers, decoded field by field.",
           """regs              # every fixed register, non-zero fields inline
              regs usbsts       # one register, all its fields with bits and meaning
              regs portsc 5     # PORTSC of port 5
              regs iman 0       # IMAN of interrupter 0""")
p.add_argument("name", nargs="?", help="a register name (USBCMD, PORTSC, IMAN, ...)")
p.add_argument("index", nargs="?", type=int, help="port number or interrupter index")


@command(p, INSPECT, complete=lambda con, w: render.register_names())
def regs(con: Console, args: Namespace) -> None:
    if args.name:
        con.out.print(render.register_view(con.controller, args.name, args.index))
        con.data(render.register_data(con.controller, args.name, args.index))
    else:
        con.out.print(render.regs_view(con.controller))
        con.data(render.regs_data(con.controller))


p = parser("ports", "Root hub ports: PORTSC decoded in Linux's words, the device on each.",
           """ports             # all ports
              ports 1           # just port 1""")
p.add_argument("port", nargs="?", type=int, help="one port number")


@command(p, INSPECT, complete=_ports)
def ports(con: Console, args: Namespace) -> None:
    con.out.print(render.ports_view(con.controller, args.port))
    con.data(render.ports_data(con.controller, args.port))


p = parser("slots", "Device slots; with a slot id, its slot context and endpoint contexts.",
           """slots             # every enabled slot
              slots 1           # slot 1: slot context field by field, its endpoints
              slots 1 3         # slot 1, endpoint context of DCI 3 (ep1in)""")
p.add_argument("slot", nargs="?", type=int)
p.add_argument("dci", nargs="?", type=int, help="endpoint DCI (1 = ep0, 3 = ep1in, 4 = ep2out)")


@command(p, INSPECT, aliases=("slot",), complete=_slots)
def slots(con: Console, args: Namespace) -> None:
    if args.slot is None:
        con.out.print(render.slots_view(con.controller))
        con.data(render.slots_data(con.controller))
    else:
        con.out.print(render.slot_view(con.controller, args.slot, args.dci))
        con.data(render.slot_data(con.controller, args.slot, args.dci))


p = parser("ring", "TRBs around a ring's dequeue pointer, decoded (`->` marks the dequeue).",
           """ring cmd          # the command ring
              ring 1/3          # slot 1, DCI 3: the tablet's interrupt IN ring
              ring 1/1 -b 8     # ep0 of slot 1 with 8 TRBs before the dequeue pointer""")
p.add_argument("ring", nargs="?", default=None, help="cmd or SLOT/DCI (default: the last ring "
                                                     "that moved)")
p.add_argument("-b", "--before", type=int, default=4, help="TRBs shown before the dequeue")
p.add_argument("-a", "--after", type=int, default=8, help="TRBs shown from the dequeue on")


@command(p, INSPECT, complete=lambda con, w: render.ring_names(con.controller))
def ring(con: Console, args: Namespace) -> None:
    name = args.ring or con.current_ring()
    before, after = max(0, args.before), max(1, args.after)
    con.out.print(render.ring_view(con.controller, name, before, after))
    con.data(render.ring_data(con.controller, name, before, after))


p = parser("trb", "One TRB in guest memory, every field of its type's layout.",
           "trb 0x10040       # decode the TRB at guest address 0x10040")
p.add_argument("address", type=_address)


@command(p, INSPECT, complete=lambda con, w: _known_addresses(con))
def trb(con: Console, args: Namespace) -> None:
    con.out.print(render.trb_view(con.controller, args.address))
    con.data(render.trb_at_data(con.controller, args.address))


p = parser("ctx", "A slot's device context as guest memory holds it: output, or --input.\n"
                  "The output context is the one the DCBAA entry points at; --input shows\n"
                  "the input context of the slot's last Address Device, Configure Endpoint\n"
                  "or Evaluate Context command (its add/drop flags and the contexts it adds).",
           """ctx 1             # slot 1's output context: slot context and endpoint contexts
              ctx 1 3           # just its endpoint context of DCI 3 (ep1in)
              ctx 1 --input     # the input context the last command read: add/drop flags...
              ctx 1 3 --input   # ...and just its endpoint context of DCI 3""")
p.add_argument("slot", type=int)
p.add_argument("dci", nargs="?", type=int, help="endpoint DCI (1 = ep0, 3 = ep1in, 4 = ep2out)")
p.add_argument("-i", "--input", action="store_true",
               help="the last input context the guest handed the controller for this slot")


def _ctx_complete(con: Console, words: list[str]) -> list[str]:
    positional = [w for w in words[:-1] if not w.startswith("-")]
    if not positional:
        return _slots(con, words)
    slot = con.controller.slots.get(int(positional[0])) if positional[0].isdigit() else None
    return [str(d) for d in sorted(slot.endpoints)] if slot and len(positional) == 1 else []


@command(p, INSPECT, complete=_ctx_complete)
def ctx(con: Console, args: Namespace) -> None:
    if args.input:
        held = con.breakpoints.held_command if con.controller.gate.paused else None
        con.out.print(render.input_context_view(con.controller, args.slot, args.dci, held))
        con.data(render.input_context_data(con.controller, args.slot, args.dci, held))
    else:
        con.out.print(render.output_context_view(con.controller, args.slot, args.dci))
        con.data(render.output_context_data(con.controller, args.slot, args.dci))


p = parser("decode", "Decode numbers you give: a TRB, a context or a register value.\n"
                     "A TRB's type field picks its layout; contexts are slot, ep (endpoint) and\n"
                     "ctrl (input control), missing dwords read as 0; Linux's decoding goes\n"
                     "underneath where Linux has one.  Numbers are hex (0x..) or decimal.",
           """decode 0x10000 0 8 0x421         # a TRB (param lo, hi, status, control): Normal
              decode trb 0 0 0 0x2401          # `trb` said explicitly: Enable Slot Command
              decode portsc 0x603              # PORTSC field by field, as Linux prints it
              decode usbsts 0x18               # any register by name
              decode slot 0x18100000 0x10000 0 0x18000001   # slot context dwords 0-3
              decode ep 0x60001 0x8003e 0x17101 0 8          # endpoint context dwords 0-4
              decode ctrl 0 0x9                # input control context: drop, add flags""")
p.add_argument("values", nargs="+", metavar="KIND|VALUE",
               help="trb, slot, ep, ctrl or a register name, then its values")


@command(p, INSPECT, complete=lambda con, w: render.decode_kinds() if len(w) <= 1 else [])
def decode(con: Console, args: Namespace) -> None:
    con.out.print(render.decode_view(args.values))
    con.data(render.decode_data(args.values))


p = parser("mem", f"Guest memory as a hexdump (at most {MAX_MEM_BYTES // 1024} KiB at once).",
           """mem 0x10000 64    # 64 bytes at guest address 0x10000
              mem 0x10000       # 256 bytes
              mem 4096 0x200    # decimal works too""")
p.add_argument("address", type=_address)
p.add_argument("length", nargs="?", type=_address, default=256,
               help=f"bytes (default 256, at most {MAX_MEM_BYTES})")


@command(p, INSPECT, aliases=("x",), complete=lambda con, w: _known_addresses(con)
         if len(w) <= 1 else [])
def mem(con: Console, args: Namespace) -> None:
    if not 1 <= args.length <= MAX_MEM_BYTES:
        raise ValueError(f"length {args.length}: 1..{MAX_MEM_BYTES} bytes at a time")
    data = render.read_guest(con.controller.mem, args.address, args.length)
    for line in hexdump(data, args.address):
        con.out.print(Text(line))
    con.data({"address": args.address, "length": len(data), "data": data})


p = parser("events", "The last events an interrupter wrote to its event ring.",
           """events            # interrupter 0, last 8 events
              events -n 20      # last 20
              events 1          # interrupter 1""")
p.add_argument("interrupter", nargs="?", type=int, default=0)
p.add_argument("-n", "--count", type=int, default=8)


@command(p, INSPECT, aliases=("ev",))
def events(con: Console, args: Namespace) -> None:
    con.out.print(render.events_view(con.controller, args.interrupter, max(1, args.count)))
    con.data(render.events_data(con.controller, args.interrupter, max(1, args.count)))


p = parser("interrupters", "Interrupters: IMAN, IMOD, event ring registers and counters.",
           "interrupters")


@command(p, INSPECT, aliases=("intr",))
def interrupters(con: Console, args: Namespace) -> None:
    counts = con.session.interrupts.counts
    con.out.print(render.interrupters_view(con.controller, counts))
    con.data(render.interrupters_data(con.controller, counts))


p = parser("devices", "Devices plugged in, with what the controller and the guest know of them.",
           "devices")


@command(p, INSPECT, aliases=("dev",))
def devices(con: Console, args: Namespace) -> None:
    session = con.session
    guest_devices = session.guest_devices if isinstance(session, World) else None
    con.out.print(render.devices_view(session, guest_devices))
    con.data(render.devices_data(session, guest_devices))


p = parser("context", "The panes shown after every stop; `context` alone redraws them.",
           """context                    # redraw
              context set status ring    # choose the panes
              context off                # no panes after stops""")
p.add_argument("action", nargs="?", choices=("set", "off", "on"))
p.add_argument("panes", nargs="*", help="status, hit, ring, events, ports, slots")


@command(p, INSPECT)
def context(con: Console, args: Namespace) -> None:
    if args.action == "set":
        bad = [x for x in args.panes if x not in con.PANES]
        if bad or not args.panes:
            raise ValueError(f"panes are {', '.join(con.PANES)}")
        con.panes = list(args.panes)
        con.context_enabled = True
    elif args.action in ("off", "on"):
        con.context_enabled = args.action == "on"
        con.out.print(f"context panes {args.action}")
        return
    con.show_context()


# ==== execution ==================================================================================
p = parser("pause", "Stop ring processing (MMIO is still answered; timers still run).",
           "pause")


@command(p, EXECUTION, aliases=("stop",))
async def pause(con: Console, args: Namespace) -> None:
    gate = con.controller.gate
    con.breakpoints.cancel_internal()       # a pending `until` ends at this stop too
    if gate.paused:
        con.out.print("already paused")
    gate.pause()
    await con.session.settle(0.5)
    await con.guest_settled()
    con.show_context()


p = parser("continue", "Resume ring processing until a breakpoint hits (or `pause`).",
           """continue
              c""")


@command(p, EXECUTION, aliases=("resume", "c", "cont"))
async def continue_(con: Console, args: Namespace) -> None:
    since = con.activity.seq
    con.breakpoints.last_hit = None
    con.controller.gate.resume()
    con.session.changed()
    await con.guest_settled()
    await con.session.settle(2.0)
    if con.controller.gate.paused:
        con.show_activity(since)
        con.show_context()
    elif not con.interactive:
        con.show_activity(since)
        con.out.print(render.status_line(con.controller))
    else:
        con.out.print("running")


p = parser("step", "Run N units of ring processing: one TRB, one TD (default) or one command;\n"
                   "`step event` runs until the next event is posted.\n"
                   "Pauses first if running; shows what happened and the context.",
           """step              # one TD on the first ring with work
              step trb          # one TRB
              step command      # the next command on the command ring
              step td 3         # three TDs
              step event        # run until the controller posts an event, then stop""")
p.add_argument("unit", nargs="?", default="td", choices=("trb", "td", "command", "event"))
p.add_argument("count", nargs="?", type=int, default=1)
p.add_argument("-t", "--timeout", type=float, default=RUN_UNTIL_S,
               help=f"event: seconds to wait before leaving it running (default {RUN_UNTIL_S:g})")


@command(p, EXECUTION, aliases=("s", "si"))
async def step(con: Console, args: Namespace) -> None:
    if args.unit == "event":
        for _ in range(max(1, args.count)):
            if not await run_until(con, "event", [], "step event: the next event",
                                   args.timeout):
                break
        return
    gate = con.controller.gate
    con.breakpoints.cancel_internal()
    if not gate.paused:
        gate.pause()
        await con.session.settle(0.5)
        await con.guest_settled()
    since, reports_before = con.mark()
    con.breakpoints.last_hit = None          # a hit during the step shows; the old one does not
    moved = []
    for _ in range(max(1, args.count)):
        key = gate.step(args.unit)
        if key is None:
            break
        moved.append(render.ring_key_name(key))
        con.session.changed()
        await con.session.settle(1.0)
    if not moved:
        pending = ", ".join(str(k) for k in gate.pending) or "none"
        con.out.print(f"nothing to step: no ring has a {args.unit} to run "
                      f"(rings with work: {pending})")
    else:
        con.out.print(f"stepped {len(moved)} {args.unit}(s) on ring(s) "
                      f"{', '.join(dict.fromkeys(moved))}")
        con.stepped_ring = moved[-1]
    con.data({"stepped": len(moved), "unit": args.unit, "rings": list(dict.fromkeys(moved))})
    con.show_activity(since)
    con.show_new_reports(reports_before)
    con.show_context()


async def run_until(con: Console, kind: str, conditions: list[str], label: str,
                    timeout: float) -> bool:
    """Resume with a one-shot stop armed; wait for it (or any breakpoint) up to `timeout` s.
    Returns whether the controller stopped; if not, the stop stays armed and it runs on."""
    bps = con.breakpoints
    gate = con.controller.gate
    bps.cancel_internal()
    bps.stop_at(kind, conditions, label)
    since, reports_before = con.mark()
    hits = bps.hits
    bps.last_hit = None
    gate.resume()
    con.session.changed()
    await con.guest_settled()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while bps.hits == hits and loop.time() < deadline:
        await asyncio.sleep(POLL_S)
    stopped = bps.hits != hits
    if stopped:
        await con.session.settle(0.5)
        await con.guest_settled()
    con.show_activity(since)
    con.show_new_reports(reports_before)
    hit = bps.last_hit
    con.data({"stopped": stopped, "waiting_for": label,
              "hit": None if hit is None else {"breakpoint": hit[0].number or None,
                                               "what": hit[1]}})
    if stopped:
        con.show_context()
    else:
        con.out.print(f"still running after {timeout:g} s, waiting for {label} (`wait stop` "
                      f"waits on; `pause` stops now)")
    return stopped


p = parser("finish", "Run until the current TD of the last stepped ring retires (its event\n"
                     "is posted), then stop; on the command ring, until the command completes.",
           """finish            # the ring `step` last moved (or the ring shown in the context)
              finish 1/3        # the TD on slot 1's ep1in ring""")
p.add_argument("ring", nargs="?", help="cmd or SLOT/DCI")
p.add_argument("-t", "--timeout", type=float, default=RUN_UNTIL_S)


@command(p, EXECUTION, aliases=("fin",), complete=lambda con, w: render.ring_names(con.controller))
async def finish(con: Console, args: Namespace) -> None:
    name = args.ring or con.current_ring()
    render.ring_of(con.controller, name)         # refuses rings that do not exist
    if name in ("cmd", "command"):
        await run_until(con, "command", [], "finish: the command completes", args.timeout)
        return
    slot, dci = (int(x, 0) for x in name.split("/"))
    ep = con.controller.slots[slot].endpoints[dci]
    if not ep.inflight and ep.building is None:
        con.out.print(f"no TD is in flight on ring {name}: waiting for the next one to retire")
    con.stepped_ring = f"{slot}/{dci}"
    await run_until(con, "urb", [f"slot={slot}", f"dci={dci}", "phase=retired"],
                    f"finish: the TD on ring {slot}/{dci} retires", args.timeout)


p = parser("until", "Run until the next doorbell, interrupt or event, then stop.",
           """until doorbell    # the guest rings a doorbell
              until interrupt   # the controller signals an interrupt
              until event       # the controller posts an event (as `step event`)""")
p.add_argument("what", choices=("doorbell", "interrupt", "event"))
p.add_argument("-t", "--timeout", type=float, default=RUN_UNTIL_S)


@command(p, EXECUTION, aliases=("u",))
async def until(con: Console, args: Namespace) -> None:
    await run_until(con, args.what, [], f"until: the next {args.what}", args.timeout)


# ---- breakpoints -------------------------------------------------------------------------------
_BREAK_HELP = ("Kinds and their conditions (KEY=VALUE; also KEY!=VALUE, KEY<N, KEY>N, KEY<=N,\n"
               "KEY>=N; names such as type=Setup or cc=stall match by their start):\n" +
               "\n".join(f"  {k}: " + ", ".join(f"{c}=" for c in v)
                         for k, v in BREAK_KINDS.items()))


def point_options(p: CommandParser) -> None:
    """The options every breakpoint and watchpoint takes (what `save breakpoints` writes)."""
    p.add_argument("--disabled", action="store_true", help="create it disabled")
    p.add_argument("--ignore", type=int, default=0, metavar="COUNT",
                   help="skip its next COUNT stops")
    p.add_argument("--commands", metavar="'CMD; CMD'",
                   help="console commands run when it stops (as `commands N`)")


def apply_point_options(con: Console, bp: Breakpoint, args: Namespace) -> None:
    if args.disabled:
        con.breakpoints.set_enabled(bp.number, False)
    if args.ignore:
        bp.ignore = max(0, args.ignore)
    if args.commands:
        bp.commands = split_commands(args.commands)


def _break_parser(name: str, what: str, examples: str) -> CommandParser:
    p = parser(name, what + "\n" + _BREAK_HELP, examples)
    p.add_argument("kind", nargs="?", choices=tuple(BREAK_KINDS))
    p.add_argument("conditions", nargs="*", metavar="KEY=VALUE")
    point_options(p)
    return p


def _break_complete(con: Console, words: list[str]) -> list[str]:
    if len(words) <= 1:
        return list(BREAK_KINDS)
    return [f"{k}=" for k in BREAK_KINDS.get(words[0], {})]


def list_points(con: Console, watchpoints_only: bool = False) -> None:
    points = [b for b in con.breakpoints.points if b.watch is not None or not watchpoints_only]
    con.data([b.data() for b in points])
    if not points:
        con.out.print("no watchpoints" if watchpoints_only else "no breakpoints")
    for b in points:
        extra = ["enabled" if b.enabled else "disabled", f"hit {b.hits} times"]
        if b.temporary:
            extra.append("temporary")
        if b.ignore:
            extra.append(f"ignores its next {b.ignore} stop(s)")
        con.out.print(f"{b}  ({', '.join(extra)})")
        for c in b.commands:
            con.out.print(f"        {c}")


def _make_break(con: Console, args: Namespace, temporary: bool) -> None:
    if args.kind is None:
        list_points(con)
        return
    bp = con.breakpoints.add(args.kind, args.conditions, temporary=temporary)
    apply_point_options(con, bp, args)
    con.data(bp.data())
    con.out.print(f"{'temporary ' if temporary else ''}breakpoint {bp}")


p = _break_parser("break", "Set a breakpoint on something the controller announces, or list "
                           "breakpoints and watchpoints.",
                  """break                      # list breakpoints and watchpoints
                     break trb type=Setup       # stop after a Setup Stage TRB is fetched
                     break trb ring=1/3         # any TRB on slot 1's ep1in ring
                     break command              # stop after every command completes
                     break command type=address # after Address Device
                     break doorbell slot=1      # when slot 1's doorbell is rung
                     break port port=5          # when PORTSC of port 5 changes
                     break event cc=stall       # when a Stall Error event is posted
                     break event cc!=success type=transfer   # a transfer that did not succeed
                     break urb ep=0x81 phase=done
                     break urb phase=retired actual>0
                     break mmio reg=USBCMD write          # the guest writes USBCMD
                     break mmio reg=PORTSC[5] access=read
                     break setup request=0x06 value=0x0100   # GET_DESCRIPTOR(DEVICE)
                     break interrupt interrupter=0
                     break event --ignore 3     # the 4th event from now
                     break command --commands 'regs usbsts; continue'""")


@command(p, EXECUTION, aliases=("b",), complete=_break_complete)
def break_(con: Console, args: Namespace) -> None:
    _make_break(con, args, temporary=False)


p = _break_parser("tbreak", "A temporary breakpoint: deleted when it first stops.",
                  """tbreak doorbell slot=1     # the next time slot 1's doorbell rings
                     tbreak event cc=stall""")


@command(p, EXECUTION, aliases=("tb",), complete=_break_complete)
def tbreak(con: Console, args: Namespace) -> None:
    _make_break(con, args, temporary=True)


p = parser("delete", "Delete breakpoints or watchpoints, or all of them.",
           """delete 2
              delete 2 3
              delete all""")
p.add_argument("which", nargs="+", help="breakpoint numbers, or `all`")


def _point_numbers(con: Console, words: list[str]) -> list[str]:
    return [str(b.number) for b in con.breakpoints.points] if len(words) <= 1 else []


@command(p, EXECUTION, aliases=("d",), complete=lambda con, w: [
    *(str(b.number) for b in con.breakpoints.points), "all"])
def delete(con: Console, args: Namespace) -> None:
    if "all" in args.which:
        n = con.breakpoints.delete(None)
    else:
        n = sum(con.breakpoints.delete(_number(w)) for w in args.which)
    con.out.print(f"deleted {n} breakpoint(s)")


def _number(text: str) -> int:
    try:
        return int(text.lstrip("#"))
    except ValueError:
        raise ValueError(f"{text!r} is not a breakpoint number") from None


for _name, _on in (("enable", True), ("disable", False)):
    p = parser(_name, f"{_name.capitalize()} breakpoints (all of them without a number).",
               f"""{_name} 1
                   {_name}             # every breakpoint and watchpoint""")
    p.add_argument("numbers", nargs="*", type=int)

    def _toggle(con: Console, args: Namespace, on: bool = _on) -> None:
        numbers = args.numbers or [b.number for b in con.breakpoints.points]
        for n in numbers:
            b = con.breakpoints.set_enabled(n, on)
            con.out.print(f"breakpoint {b} {'enabled' if on else 'disabled'}")

    command(p, EXECUTION, complete=lambda con, w: [str(b.number) for b in
                                                    con.breakpoints.points])(_toggle)


p = parser("ignore", "Let a breakpoint pass its next COUNT stops (it still counts them).",
           """ignore 2 5        # breakpoint 2 stops again at its 6th hit from now
              ignore 2 0        # stop at the next one""")
p.add_argument("number", type=_number)
p.add_argument("count", type=int)


@command(p, EXECUTION, complete=_point_numbers)
def ignore(con: Console, args: Namespace) -> None:
    b = con.breakpoints.get(args.number)
    b.ignore = max(0, args.count)
    con.out.print(f"breakpoint {b} ignores its next {b.ignore} stop(s)" if b.ignore
                  else f"breakpoint {b} stops at its next hit")


p = parser("condition", "Replace a breakpoint's conditions (none: it stops at every hit).",
           """condition 1 cc!=success           # breakpoint 1 now takes this condition only
              condition 1 slot=2 type=transfer
              condition 1                       # no conditions""")
p.add_argument("number", type=_number)
p.add_argument("conditions", nargs="*", metavar="KEY=VALUE")


def _condition_complete(con: Console, words: list[str]) -> list[str]:
    if len(words) <= 1:
        return _point_numbers(con, words)
    try:
        kind = con.breakpoints.get(_number(words[0])).kind
    except ValueError:
        return []
    return [f"{k}=" for k in BREAK_KINDS.get(kind, {})]


@command(p, EXECUTION, complete=_condition_complete)
def condition(con: Console, args: Namespace) -> None:
    b = con.breakpoints.set_conditions(args.number, args.conditions)
    con.out.print(f"breakpoint {b}")


p = parser("commands", "Console commands a breakpoint runs when it stops, given as one line\n"
                       "(`;` between commands; quote it).  Without commands: show them;\n"
                       "with '' : remove them.",
           """commands 2 'regs usbsts; continue'   # print USBSTS at each stop and go on
              commands 2                           # show them
              commands 2 ''                        # remove them""")
p.add_argument("number", type=_number)
p.add_argument("commands", nargs="*", metavar="CMD")


@command(p, EXECUTION, complete=_point_numbers)
def commands(con: Console, args: Namespace) -> None:
    b = con.breakpoints.get(args.number)
    if args.commands:
        b.commands = split_commands(" ".join(args.commands))
    con.data({"number": b.number, "commands": list(b.commands)})
    if not b.commands:
        con.out.print(f"breakpoint {b} runs no commands")
        return
    con.out.print(f"breakpoint {b} runs at each stop:")
    for c in b.commands:
        con.out.print(f"  {c}")


p = parser("save", "Write the breakpoints and watchpoints as console commands that make them\n"
                   "again (`source FILE` reads them back).",
           "save breakpoints /tmp/bp.xhcidbg")
p.add_argument("what", choices=("breakpoints",))
p.add_argument("file")


@command(p, SESSION)
def save(con: Console, args: Namespace) -> None:
    points = con.breakpoints.points
    lines = ["# xhcidbg breakpoints: `source` this file to make them again"]
    lines += [b.definition() for b in points]
    with open(args.file, "w") as f:
        f.write("\n".join(lines) + "\n")
    con.out.print(f"saved {len(points)} breakpoint(s) to {args.file}")


p = parser("source", "Run a file of console commands, one or more (`;`) a line; `#` comments.",
           """source /tmp/bp.xhcidbg     # e.g. what `save breakpoints` wrote
              source setup.xhcidbg""")
p.add_argument("file")


@command(p, SESSION)
async def source(con: Console, args: Namespace) -> None:
    depth = con.extras.get("source_depth", 0)
    if not isinstance(depth, int) or depth >= MAX_SOURCE_DEPTH:
        raise RuntimeError(f"`source` nested more than {MAX_SOURCE_DEPTH} deep (a file that "
                           f"sources itself?)")
    from .console import PROMPT as prompt  # the console imports this module
    with open(args.file) as f:
        lines = f.read().splitlines()
    con.extras["source_depth"] = depth + 1
    ran = failed = 0
    try:
        for line in lines:
            for cmd in split_commands(line):
                con.out.print(Text(f"{prompt}{cmd}", style="bold"))
                ran += 1
                failed += not await con.run_one(cmd)
                if con.quit_requested:
                    return
    finally:
        con.extras["source_depth"] = depth
    if failed:
        raise RuntimeError(f"{failed} of {ran} command(s) in {args.file} failed")


# ==== devices ====================================================================================
p = parser("tablet", "Drive the USB tablet: the guest polls it, so each action is a real "
                     "interrupt transfer.",
           """tablet move 100 200      # absolute position (0..32767 each)
              tablet click             # left click (press and release)
              tablet click right
              tablet press left
              tablet release left
              tablet scroll -3""")
sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
s = sub.add_parser("move", help="move to absolute X Y (0..32767)")
s.add_argument("x", type=int)
s.add_argument("y", type=int)
for _verb in ("click", "press", "release"):
    s = sub.add_parser(_verb, help=f"{_verb} a button (left, right, middle, back, forward)")
    s.add_argument("button", nargs="?", default="left")
s = sub.add_parser("scroll", help="turn the wheel N detents (positive: up)")
s.add_argument("clicks", type=int)


@command(p, DEVICES)
async def tablet(con: Console, args: Namespace) -> None:
    dev = _plugged(con, Tablet)
    since = con.mark()
    if args.action == "move":
        dev.move(args.x, args.y)
    elif args.action == "scroll":
        dev.scroll(args.clicks)
    else:
        getattr(dev, args.action)(args.button)
    await con.after_device_action(since)


p = parser("keyboard", "Drive the USB keyboard (US layout).",
           """keyboard type hi           # one press and one release report per character
              keyboard type "Hello, world"
              keyboard tap ctrl alt delete
              keyboard down shift
              keyboard up shift""")
sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
s = sub.add_parser("type", help="type text")
s.add_argument("text", nargs="+")
s = sub.add_parser("tap", help="press keys in order, release in reverse")
s.add_argument("keys", nargs="+")
s = sub.add_parser("down", help="hold a key")
s.add_argument("key")
s = sub.add_parser("up", help="release a key")
s.add_argument("key")


@command(p, DEVICES, aliases=("kbd",))
async def keyboard(con: Console, args: Namespace) -> None:
    dev = _plugged(con, Keyboard)
    since = con.mark()
    if args.action == "type":
        dev.type(" ".join(args.text))
    elif args.action == "tap":
        dev.tap(*args.keys)
    elif args.action == "down":
        dev.key_down(args.key)
    else:
        dev.key_up(args.key)
    await con.after_device_action(since)


p = parser("plug", "Plug a new device into a root port (hotplug); the guest enumerates it.",
           """plug tablet               # first free port of the right speed
              plug keyboard 3
              plug storage --image disk.img""")
p.add_argument("kind", choices=DEVICE_NAMES)
p.add_argument("port", nargs="?", type=int)
p.add_argument("--image", help=f"disk image for storage (default: a new {SCRATCH_STICK_MIB} MiB "
                               f"temporary one, or --storage-size MiB)")


@command(p, DEVICES)
async def plug(con: Console, args: Namespace) -> None:
    choice = con.device_choice
    dev = make_device(args.kind, image=args.image, speed=choice.speeds.get(args.kind),
                      readonly=choice.storage_readonly,
                      scratch_mib=choice.storage_size_mib or SCRATCH_STICK_MIB)
    since = con.activity.seq
    session = con.session
    number = session.plug(dev, args.port)
    con.out.print(f"{dev.name} plugged into port {number}")
    await session.settle(3.0)
    gd = session.guest_devices.get(number) if isinstance(session, World) else None
    if gd is not None:
        con.out.print(f"the guest enumerated it: {gd.device!r}")
    elif con.controller.gate.paused:
        con.out.print("the controller is paused: the guest will enumerate it after `continue`")
    con.show_activity(since, limit=12)


p = parser("unplug", "Pull a device out of its port (by port number or device kind).",
           """unplug 1
              unplug keyboard""")
p.add_argument("what", help="port number, or tablet / keyboard / storage")


@command(p, DEVICES, complete=lambda con, w: [str(p) for p in con.session.devices]
         + [d.name for d in con.session.devices.values()])
async def unplug(con: Console, args: Namespace) -> None:
    port = int(args.what) if args.what.isdigit() else con.session.find(args.what)[0]
    since = con.activity.seq
    dev = con.session.unplug(port)
    con.out.print(f"{dev.name} unplugged from port {port}")
    await con.session.settle(3.0)
    con.show_activity(since, limit=12)


p = parser("storage", "The mass-storage stick: its image, and what the guest reads from it.",
           """storage                  # image, size, and INQUIRY / READ CAPACITY by the guest
              storage read 0           # the guest reads block 0 (READ(10) over Bulk-Only)
              storage read 2048 4      # four blocks from LBA 2048""")
p.add_argument("action", nargs="?", choices=("info", "read"), default="info")
p.add_argument("lba", nargs="?", type=lambda s: int(s, 0), default=0)
p.add_argument("count", nargs="?", type=int, default=1)


@command(p, DEVICES)
async def storage(con: Console, args: Namespace) -> None:
    w = con.world
    port, dev = w.find("storage")
    if args.action == "info":
        con.out.print(f"port {port}: {render.describe_device(dev)}")
        disk = w.guest_storage()
        job = w.guest_job("storage info", lambda: (disk.inquiry(), disk.read_capacity()))
    else:
        if not 1 <= args.count <= 128:
            raise ValueError("read 1..128 blocks at a time")
        disk = w.guest_storage()
        job = w.guest_job(f"read {args.count} block(s) at {args.lba}",
                          lambda: disk.read(args.lba, args.count))
    if not await w.wait_job(job):
        con.out.print(f"guest: {job.what} is waiting (the controller is paused); "
                      f"`continue` lets it finish")
        return
    if job.error:
        raise ValueError(f"guest: {job.what} failed: {job.error}")
    if args.action == "info":
        inquiry, (last_lba, block_length) = job.result
        blocks = last_lba + 1
        con.out.print(f"guest: INQUIRY '{inquiry.vendor}' '{inquiry.product}' rev "
                      f"{inquiry.revision}; READ CAPACITY {blocks} blocks of {block_length} "
                      f"bytes ({blocks * block_length >> 20} MiB)")
    else:
        data: bytes = job.result
        con.out.print(f"guest: READ(10) LBA {args.lba}: {len(data)} bytes")
        for line in hexdump(data):
            con.out.print(Text(line))


p = parser("reports", "HID reports the guest received, most recent last.",
           """reports
              reports -n 50""")
p.add_argument("-n", "--count", type=int, default=10)


@command(p, DEVICES)
def reports(con: Console, args: Namespace) -> None:
    recs = list(con.world.reports)[-max(1, args.count):]
    for r in recs:
        con.out.print(str(r))
    if not recs:
        con.out.print("no reports yet (try `tablet move 100 200`)")


# ==== session ====================================================================================
p = parser("trace", "Capture to pcapng (Wireshark) and read captures back.",
           """trace start /tmp/usb.pcapng
              trace status
              trace stop
              trace show /tmp/usb.pcapng""", add_help=False)
p.add_argument("rest", nargs="*")
p.add_argument("-h", "--help", action="store_true")


@command(p, SESSION)
def trace(con: Console, args: Namespace) -> None:
    tp = parser("xhcidbg", "")
    trace_cli.add_trace_commands(tp.add_subparsers(dest="command"))
    argv = ["trace", *args.rest] + (["-h"] if args.help else [])
    ns = tp.parse(argv)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        trace_cli.run(ns, con.session.trace)
    con.out.print(Text(buf.getvalue().rstrip()))


p = parser("help", "List commands, or show one command's help and examples.",
           """help
              help step""")
p.add_argument("command", nargs="?")


@command(p, SESSION, aliases=("h", "?"), complete=lambda con, w: REGISTRY.names())
def help_(con: Console, args: Namespace) -> None:
    if args.command:
        cmd = REGISTRY.lookup(args.command)
        if cmd is None:
            raise ValueError(f"no command {args.command!r}")
        text = cmd.parser.format_help()
        if cmd.aliases:
            text += f"\naliases: {', '.join(cmd.aliases)}\n"
        con.out.print(Text(text.rstrip()))
        return
    for cat in (EXECUTION, INSPECT, DEVICES, SESSION):
        t = Table(title=cat, box=None, title_justify="left", show_header=False, padding=(0, 2))
        t.add_column(style="cyan")
        t.add_column()
        for cmd in sorted(REGISTRY.commands.values(), key=lambda c: c.name):
            if cmd.category == cat:
                alias = f" ({', '.join(cmd.aliases)})" if cmd.aliases else ""
                t.add_row(cmd.name + alias, cmd.summary)
        con.out.print(t)
    con.out.print("`help COMMAND` for its arguments and examples; separate commands with `;`.")


p = parser("quit", "Leave the console.", "quit")


@command(p, SESSION, aliases=("exit", "q"))
def quit_(con: Console, args: Namespace) -> None:
    con.quit_requested = True


def hexdump(data: bytes, base: int = 0) -> list[str]:
    """hexdump -C style lines, offsets counted from `base`; runs of identical lines collapse
    into `*`."""
    out, prev, starred = [], None, False
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        if chunk == prev and off + 16 < len(data):
            if not starred:
                out.append("*")
                starred = True
            continue
        prev, starred = chunk, False
        out.append(f"{base + off:08x}  {chunk.hex(' '):<47}  |"
                   + "".join(chr(b) if 32 <= b < 127 else "." for b in chunk) + "|")
    out.append(f"{base + len(data):08x}")
    return out


def split_commands(text: str) -> list[str]:
    """Split `a; b; 'c;d'` into commands at semicolons outside quotes.  A command that takes
    its line raw (`py`) takes the rest of the text, semicolons and all."""
    out, cur, quote = [], [], None
    for i, ch in enumerate(text):
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            cur.append(ch)
        elif ch == ";":
            out.append("".join(cur))
            cur = []
        elif not ch.isspace() and not "".join(cur).strip() and _raw_command(text[i:]):
            cur.append(text[i:])
            break
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [c.strip() for c in out if c.strip() and not c.strip().startswith("#")]


def _raw_command(line: str) -> bool:
    """The line starts with a command that takes the rest of its line as typed."""
    words = line.split(None, 1)
    cmd = REGISTRY.lookup(words[0]) if words else None
    return cmd is not None and cmd.raw


def split_words(line: str) -> list[str]:
    """A command's words; a raw command's are its name and the rest of the line as typed
    (after `--`, so that argparse takes it whole), with `--json` first if it starts so."""
    if _raw_command(line):
        name, *more = line.split(None, 1)
        rest = more[0].strip() if more else ""
        if rest in ("-h", "--help"):
            return [name, rest]
        json_first = rest == "--json" or rest.startswith("--json ")
        if json_first:
            rest = rest[len("--json"):].strip()
        return [name, *(["--json"] if json_first else []), *(["--", rest] if rest else [])]
    try:
        return shlex.split(line)
    except ValueError as e:
        raise ValueError(f"cannot parse {line!r}: {e}") from None
