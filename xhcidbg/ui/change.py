"""Changing things at a stop: a register written as the guest would (`set reg`, called from
live.py's `set`), guest memory (`poke`), a TRB or an endpoint context field by field (`edit`),
an event posted by hand (`post event`).  Layout fields come from their one declaration
(xhcidbg.emu.trb, .context, .regs); nothing here reaches past the controller's own interfaces
except `edit ep`, which changes the controller's copy of an endpoint context -- the thing a
debugger is for."""
from __future__ import annotations

import contextlib
import re
from argparse import Namespace
from typing import TYPE_CHECKING

from rich.text import Text

from ..conditions import parse_cc
from ..emu import events
from ..emu import regs as R
from ..emu.context import EP_CTX, EP_STATE_NAMES, EpState
from ..emu.layout import Layout
from ..emu.memory import DmaError
from ..emu.trb import TRB_SIZE, Trb, layout_of, trb_name
from . import render
from .registry import command, parser

if TYPE_CHECKING:
    from ..emu.controller import XhciController
    from ..emu.slots import SlotEndpoint
    from .console import Console

EXECUTION = "execution"
_PORT_REGS = {r.name for r in R.PORT_REGS}
_INDEXED = _PORT_REGS | {r.name for r in R.IR_REGS}
_NAME_INDEX = re.compile(r"^([A-Za-z_0-9]+)\[(\d+)\]$")
# fixed when an endpoint is configured (a new Configure Endpoint makes a new one)
_CACHED_EP_FIELDS = {"ep_type"}


def _number(text: str, what: str = "value") -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ValueError(f"{what} {text!r}: a number is needed (e.g. 0x1f, 31)") from None


def _assignments(words: list[str], layout: Layout) -> dict[str, int]:
    """FIELD=VALUE words, checked against `layout`'s fields."""
    out = {}
    for w in words:
        key, sep, value = w.partition("=")
        if not sep:
            raise ValueError(f"{w!r}: write FIELD=VALUE")
        key = key.lower()
        if key not in layout.by_name:
            raise ValueError(f"{layout.name} has no field {key!r}; fields: "
                             f"{', '.join(layout.by_name)}")
        f = layout.by_name[key]
        v = _number(value, key)
        if not 0 <= v <= f.mask:
            raise ValueError(f"{key}={value}: the field is {f.width} bit(s) wide "
                             f"(0..{f.mask:#x})")
        out[key] = v
    if not out:
        raise ValueError("which field? FIELD=VALUE")
    return out


# ==== set reg (live.py's `set` calls this) =======================================================
def register_offsets(controller: XhciController) -> dict[str, int]:
    """Every named BAR0 dword, name -> offset ("USBCMD", "PORTSC[3]", "DOORBELL[1]"...)."""
    out = {}
    for off in range(0, controller.bar_size, 4):
        name = controller.register_name(off).upper()
        if "+" not in name and name not in out:
            out[name] = off
    return out


def resolve_register(con: Console, words: list[str]) -> tuple[str, int, R.Register | None,
                                                               list[str]]:
    """NAME or NAME[INDEX] (or NAME INDEX) -> (label, offset, its declaration, the rest)."""
    if not words:
        raise ValueError("set reg NAME VALUE: which register?")
    name, rest = words[0].upper(), words[1:]
    m = _NAME_INDEX.match(name)
    index = None
    if m:
        name, index = m.group(1), int(m.group(2))
    elif name in _INDEXED and len(rest) >= 2 and rest[0].isdigit():
        index, rest = int(rest[0]), rest[1:]
    if name in _INDEXED and index is None:
        per = "port" if name in _PORT_REGS else "interrupter"
        raise ValueError(f"there is one {name} per {per}: write {name}[N]")
    with contextlib.suppress(ValueError):       # a declared register; else by offset table
        reg, offset, label = render.find_register(con.controller, name, index)
        return label, offset, reg, rest
    offsets = con.extras.get("register_offsets")
    if not isinstance(offsets, dict):
        offsets = con.extras["register_offsets"] = register_offsets(con.controller)
    label = f"{name}[{index}]" if index is not None else name
    if label not in offsets:
        raise ValueError(f"no register named {words[0]!r}; try `regs` for the list")
    return label, offsets[label], None, rest


async def set_register(con: Console, words: list[str]) -> None:
    """`set reg NAME VALUE` / `set reg NAME FIELD=VALUE...`: one MMIO write as the guest
    would make it (observers see it; RW1C bits not named are written as 0)."""
    label, offset, reg, rest = resolve_register(con, words)
    c = con.controller
    if not rest:
        raise ValueError(f"set reg {label} VALUE (or FIELD=VALUE ...)")
    if len(rest) == 1 and "=" not in rest[0]:
        value = _number(rest[0])
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{rest[0]}: registers are 32 bits")
    else:
        if reg is None:
            raise ValueError(f"{label} has no declared fields: give a VALUE")
        # not naming a write-1-to-clear or write-1-to-set bit must not clear or trigger it
        dw = [c.peek(offset) & ~(reg.rw1c | reg.rw1s)]
        for key, v in _assignments(rest, reg.layout).items():
            reg.layout.by_name[key].set(dw, v)
        value = dw[0]
    before = c.peek(offset)
    c.mmio_write(offset, 4, value)
    con.session.changed()
    await con.session.settle(0.5)
    after = c.peek(offset)
    con.data({"register": label, "offset": offset, "before": before, "written": value,
              "after": after})
    con.out.print(f"{label} (BAR0+{offset:#x}): {before:#010x}, wrote {value:#010x}, "
                  f"reads {after:#010x}")
    if reg is not None:
        con.out.print(Text("  " + render.fields_inline(reg.layout, [after])))


# ==== poke =======================================================================================
p = parser("poke", "Write guest memory (little-endian VALUE of --size bytes), as the guest\n"
                   "would: the controller sees it when it next reads there.  Not announced\n"
                   "as DMA (watchpoints see only the controller's accesses).",
           """poke 0x10000 0xdeadbeef          # 4 bytes
              poke 0x10040 1 --size 1           # one byte
              poke 0x20000 0x1234 --size 8""")
p.add_argument("address", type=lambda s: _number(s, "address"))
p.add_argument("value", type=_number)
p.add_argument("--size", type=int, choices=(1, 2, 4, 8), default=4)


@command(p, EXECUTION)
def poke(con: Console, args: Namespace) -> None:
    if not 0 <= args.value < 1 << (8 * args.size):
        raise ValueError(f"{args.value:#x} does not fit in {args.size} byte(s)")
    mem = con.controller.mem
    data = args.value.to_bytes(args.size, "little")
    try:
        old = mem.peek(args.address, args.size)
        mem.poke(args.address, data)
    except DmaError as e:
        raise ValueError(str(e)) from None
    _rings_reread(con.controller)
    con.data({"address": args.address, "size": args.size, "old": old.hex(), "new": data.hex()})
    con.out.print(f"{args.address:#x}: {old.hex(' ')} -> {data.hex(' ')}")


def _rings_reread(c: XhciController) -> None:
    """Guest memory changed by hand: rings read their TRBs again (drop the prefetch)."""
    c.cmd_ring.invalidate()
    for slot in c.slots.values():
        for ep in slot.endpoints.values():
            ep.ring.invalidate()


# ==== edit =======================================================================================
p = parser("edit", "Change a TRB in guest memory, or an endpoint context, field by field\n"
                   "(the field names of its layout: `trb ADDR` and `slots SLOT DCI` show them).\n"
                   "`edit ep` changes the controller's own copy of the endpoint context, what\n"
                   "it runs by, and writes it to the output device context; dequeue is the TR\n"
                   "Dequeue Pointer >> 4, as `slots SLOT DCI` shows it.",
           """edit trb 0x10040 cycle=0          # hand the TRB back to software
              edit trb 0x10040 ioc=1 length=8
              edit ep 1 3 ep_state=2             # halt slot 1's DCI 3
              edit ep 1 3 dequeue=0x1004 dcs=1   # TR Dequeue Pointer 0x10040""")
sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
s = sub.add_parser("trb", help="the TRB at ADDR")
s.add_argument("address", type=lambda s: _number(s, "address"))
s.add_argument("fields", nargs="+", metavar="FIELD=VALUE")
s = sub.add_parser("ep", help="the endpoint context of SLOT DCI")
s.add_argument("slot", type=int)
s.add_argument("dci", type=int)
s.add_argument("fields", nargs="+", metavar="FIELD=VALUE")


@command(p, EXECUTION)
def edit(con: Console, args: Namespace) -> None:
    if args.what == "trb":
        _edit_trb(con, args.address, args.fields)
    else:
        _edit_ep(con, args.slot, args.dci, args.fields)


def _edit_trb(con: Console, addr: int, words: list[str]) -> None:
    c = con.controller
    if addr & (TRB_SIZE - 1):
        raise ValueError(f"{addr:#x}: TRBs are 16-byte aligned")
    trb = render.read_trb(c.mem, addr)
    if trb is None:
        raise ValueError(f"guest address {addr:#x} is not readable")
    layout = layout_of(trb.type)
    dw = trb.dwords
    for key, v in _assignments(words, layout).items():
        layout.by_name[key].set(dw, v)
    new = Trb(addr, dw[0] | (dw[1] << 32), dw[2], dw[3])
    c.mem.poke(addr, new.pack())
    _rings_reread(c)
    con.data({"address": addr, "old": trb.dwords, "new": new.dwords})
    con.out.print(f"TRB @{addr:#x} ({trb_name(trb.type)}): {render.trb_text(trb)}")
    con.out.print(f"                 now: {render.trb_text(new)}")


def _endpoint(con: Console, slot_id: int, dci: int) -> SlotEndpoint:
    slot = con.controller.slots.get(slot_id)
    if slot is None:
        raise ValueError(f"slot {slot_id} is not enabled")
    ep = slot.endpoints.get(dci)
    if ep is None:
        raise ValueError(f"slot {slot_id} has no endpoint with DCI {dci} "
                         f"(has {sorted(slot.endpoints)})")
    return ep


def _edit_ep(con: Console, slot_id: int, dci: int, words: list[str]) -> None:
    c = con.controller
    ep = _endpoint(con, slot_id, dci)
    changes = _assignments(words, EP_CTX)
    cached = _CACHED_EP_FIELDS & set(changes)
    if cached:
        raise ValueError(f"{', '.join(sorted(cached))} is fixed when the endpoint is configured "
                         f"(Configure Endpoint makes a new one)")
    if "ep_state" in changes and changes["ep_state"] not in EP_STATE_NAMES:
        raise ValueError(f"ep_state {changes['ep_state']}: states are "
                         f"{', '.join(f'{k} {v}' for k, v in EP_STATE_NAMES.items())}")
    ep.sync_dequeue()                            # the live dequeue, not the last written back
    old = list(ep.ctx)
    old_state = ep.state
    for key, v in changes.items():
        EP_CTX.by_name[key].set(ep.ctx, v)
    if "dequeue" in changes or "dcs" in changes:
        ep.ring.set_dequeue(EP_CTX.get(ep.ctx, "dequeue") << 4, EP_CTX.get(ep.ctx, "dcs"))
        if ep.inflight:
            con.out.print(Text(f"note: {len(ep.inflight)} TD(s) in flight keep going; the "
                               f"ring goes on from the new dequeue pointer after them",
                               style="yellow"))
    if "interval" in changes:
        ep.interval = changes["interval"]
    if ep.state != old_state:
        for fn in c.hooks.on_state:
            fn("endpoint", f"{slot_id}/{dci}", EP_STATE_NAMES.get(old_state, "?"),
               EP_STATE_NAMES.get(ep.state, "?"))
    slot = ep.slot
    if slot.out_ctx:
        c.mem.poke(slot.out_ctx + dci * slot.context_size, EP_CTX.pack(ep.ctx))
    if ep.state == EpState.RUNNING:
        c.kick_endpoint(ep)
        con.session.changed()
    con.data({"slot": slot_id, "dci": dci, "old": EP_CTX.decode(old),
              "new": EP_CTX.decode(ep.ctx)})
    for key in changes:
        f = EP_CTX.by_name[key]
        con.out.print(f"slot {slot_id} DCI {dci} {key}: {render.fmt_value(f, f.get(old))} -> "
                      f"{render.fmt_value(f, f.get(ep.ctx))}")


# ==== post event =================================================================================
p = parser("post", "Post an event by hand, built as the controller builds its own, on an\n"
                   "interrupter's event ring (the guest sees it as from the controller).",
           """post event port 5                     # Port Status Change Event for port 5
              post event transfer 1 3 success 0      # Transfer Event, slot 1 DCI 3
              post event transfer 1 1 stall --trb 0x10040
              post event command success --slot 1   # Command Completion (no command behind it)
              post event host event_ring_full       # Host Controller Event
              post event port 1 --interrupter 1""")
p.add_argument("what", choices=("event",))
p.add_argument("type", choices=("port", "transfer", "command", "host"))
p.add_argument("args", nargs="*", metavar="ARG",
               help="port: PORT; transfer: SLOT DCI CC [LENGTH]; command: CC; host: CC")
p.add_argument("--trb", type=lambda s: _number(s, "address"),
               help="the TRB pointer (default: the ring's dequeue pointer; command: 0)")
p.add_argument("--slot", type=int, default=0, help="command: the slot id")
p.add_argument("--interrupter", type=int, default=0)


@command(p, EXECUTION)
async def post(con: Console, args: Namespace) -> None:
    c = con.controller
    a = args.args
    if args.type == "port":
        _arity(a, 1, 1, "post event port PORT")
        port = _number(a[0], "port")
        if c.port(port) is None:
            raise ValueError(f"port {port} does not exist (1..{len(c.ports)})")
        dwords = events.port_status_change(port)
    elif args.type == "transfer":
        _arity(a, 3, 4, "post event transfer SLOT DCI CC [LENGTH]")
        slot, dci = _number(a[0], "slot"), _number(a[1], "DCI")
        pointer = args.trb
        if pointer is None:
            pointer = _endpoint(con, slot, dci).ring.dequeue
        length = _number(a[3], "length") if len(a) > 3 else 0
        dwords = events.transfer_event(pointer, parse_cc(a[2]), length, slot, dci)
    elif args.type == "command":
        _arity(a, 1, 1, "post event command CC [--slot S] [--trb ADDR]")
        dwords = events.command_completion(args.trb or 0, parse_cc(a[0]), args.slot)
    else:
        _arity(a, 1, 1, "post event host CC")
        dwords = events.host_controller_event(parse_cc(a[0]))
    if not 0 <= args.interrupter < len(c.interrupters):
        raise ValueError(f"interrupter {args.interrupter} does not exist "
                         f"(0..{len(c.interrupters) - 1})")
    ir = c.interrupters[args.interrupter]
    at = ir.enqueue_pointer
    posted_before = ir.posted
    written = c.post_event(args.interrupter, dwords, note="posted by hand from the console")
    con.session.changed()
    await con.session.settle(0.5)
    decoded = render.linux.decode_trb(*dwords)
    con.data({"interrupter": args.interrupter, "dwords": dwords,
              "posted": ir.posted > posted_before, "address": at})
    if written is None or ir.posted == posted_before:
        con.out.print(Text(f"not written: {decoded} (dropped, no event ring, or the ring is "
                           f"full; see `log`)", style="red"))
        return
    con.out.print(f"posted on interrupter {args.interrupter} @{at:#x}: {decoded}")


def _arity(args: list[str], low: int, high: int, usage: str) -> None:
    if not low <= len(args) <= high:
        raise ValueError(f"usage: {usage}")
