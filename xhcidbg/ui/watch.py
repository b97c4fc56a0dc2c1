"""Watchpoints: `watch`, `rwatch`, `awatch` on guest memory the controller reads or writes, and on
registers the guest writes; helpers name the usual targets (a DCBAA entry, an endpoint context
field of the output device context, a TRB)."""
from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..emu.commands import CONTEXT_ALIGN
from ..emu.context import EP_CTX, EP_STATE_NAMES
from ..emu.memory import DmaError
from ..emu.trb import TRB_SIZE, Trb
from .commands import apply_point_options, list_points, point_options
from .observe import MemWatch, RegWatch
from .registry import command, parser
from .render import trb_text

if TYPE_CHECKING:
    from .console import Console

EXECUTION = "execution"
DEFAULT_LENGTH = 4
EP_FIELDS = ("state", "dequeue")

_HELP = """\
Stop when the controller reads or writes guest memory, or the guest writes a register.

Targets:
  mem ADDR [LEN]         LEN bytes of guest memory (default 4)
  reg NAME               a register the guest writes (USBCMD, PORTSC[5], IMAN[0]...)
  dcbaa SLOT             the slot's DCBAA entry (its output device context pointer)
  ep SLOT DCI state|dequeue
                         EP State or TR Dequeue Pointer of the endpoint context in the
                         output device context (DCBAA entry + DCI * context size)
  trb ADDR               the TRB at ADDR (its cycle bit among the rest)

Modes (memory targets): --write (the default; `watch`): a controller write that changes
the bytes, old and new value shown; --read (`rwatch`): every controller read; --access
(`awatch`): every read or write; --on-read: a controller read that finds a value other
than the one it last read or wrote.

Watchpoints see only what the CONTROLLER does.  A guest writing its own RAM makes no
access anyone could see (a vfio-user device is not told), so such a change shows when the
controller next reads the bytes: use --on-read.  The controller writes an endpoint's TR
Dequeue Pointer into the output context on Stop Endpoint, Set TR Dequeue Pointer and
when the endpoint halts; TRBs on transfer and command rings it only reads (event TRBs it
writes)."""


def _watch_parser(name: str, default: str, examples: str) -> None:
    p = parser(name, _HELP if name == "watch" else
               f"`watch` in --{default} mode (see `help watch`): stop at every controller "
               f"{'read' if default == 'read' else 'read or write'} of the target.", examples)
    p.add_argument("target", nargs="?", choices=("mem", "reg", "dcbaa", "ep", "trb"))
    p.add_argument("words", nargs="*", metavar="ARG")
    modes = p.add_mutually_exclusive_group()
    for flag in ("write", "read", "access"):
        modes.add_argument(f"--{flag}", dest="mode", action="store_const", const=flag)
    modes.add_argument("--on-read", dest="mode", action="store_const", const="change",
                       help="a read that finds a new value (the guest changed it)")
    point_options(p)
    p.set_defaults(mode=None)

    def run(con: Console, args: Namespace) -> None:
        if args.target is None:
            list_points(con, watchpoints_only=True)
            return
        mode = args.mode or default
        bps = con.breakpoints
        if args.target == "reg":
            if len(args.words) != 1:
                raise ValueError("watch reg NAME: one register name (e.g. USBCMD, PORTSC[5])")
            if args.mode is not None:
                raise ValueError("watch reg stops at the guest's writes: it takes no mode")
            bp = bps.add_watch(RegWatch(args.words[0].upper()))
        else:
            bp = bps.add_watch(memory_watch(con, args.target, args.words, mode))
        apply_point_options(con, bp, args)
        con.data(bp.data())
        con.out.print(f"watchpoint {bp}")

    command(p, EXECUTION, complete=lambda con, w: ["mem", "reg", "dcbaa", "ep", "trb"]
            if len(w) <= 1 else list(EP_FIELDS) if w[0] == "ep" and len(w) == 4 else [])(run)


def _address(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ValueError(f"{text!r} is not an address (e.g. 0x10040)") from None
    if value < 0:
        raise ValueError(f"{text!r}: addresses are not negative")
    return value


def _argc(target: str, words: list[str], usage: str, low: int, high: int) -> None:
    if not low <= len(words) <= high:
        raise ValueError(f"watch {target} {usage}")


def memory_watch(con: Console, target: str, words: list[str], mode: str) -> MemWatch:
    """The range a memory target names, resolved now (the DCBAA and the contexts are read
    the way the controller finds them)."""
    c = con.controller
    show: Callable[[bytes], str] | None = None
    if target == "mem":
        _argc(target, words, "ADDR [LEN]", 1, 2)
        addr = _address(words[0])
        length = int(words[1], 0) if len(words) > 1 else DEFAULT_LENGTH
        if not 1 <= length <= 4096:
            raise ValueError("watch 1..4096 bytes")
        name = f"mem {addr:#x} {length}"
    elif target == "dcbaa":
        _argc(target, words, "SLOT", 1, 1)
        slot = _slot_number(con, words[0])
        if not c.dcbaap:
            raise ValueError("DCBAAP is not programmed yet")
        addr, length, name = c.dcbaap + 8 * slot, 8, f"dcbaa {slot}"
        show = _u64
    elif target == "ep":
        _argc(target, words, "SLOT DCI state|dequeue", 3, 3)
        slot, dci, what = _slot_number(con, words[0]), int(words[1], 0), words[2].lower()
        if not 1 <= dci <= 31:
            raise ValueError(f"DCI {dci}: endpoint contexts are DCI 1..31")
        if what not in EP_FIELDS:
            raise ValueError(f"watch ep SLOT DCI {'|'.join(EP_FIELDS)}: not {what!r}")
        base = output_context(con, slot) + dci * c.context_size
        if what == "state":
            addr, length, show = base, 4, _ep_state
        else:
            addr, length, show = base + 8, 8, _dequeue
        name = f"ep {slot} {dci} {what}"
    elif target == "trb":
        _argc(target, words, "ADDR", 1, 1)
        addr = _address(words[0]) & ~(TRB_SIZE - 1)
        length, name = TRB_SIZE, f"trb {addr:#x}"
        show = _trb
    else:
        raise ValueError(f"no watch target {target!r}")
    w = MemWatch(addr, length, mode, name, show)
    try:
        w.last = c.mem.peek(addr, length)       # the value a --on-read watch compares with
    except DmaError:
        raise ValueError(f"guest address {addr:#x}+{length} is not mapped") from None
    return w


def _slot_number(con: Console, text: str) -> int:
    slot = int(text, 0)
    if not 1 <= slot <= con.controller.max_slots:
        raise ValueError(f"slot {slot}: slots are 1..{con.controller.max_slots}")
    return slot


def output_context(con: Console, slot: int) -> int:
    """The slot's output device context, from its DCBAA entry as the controller reads it."""
    c = con.controller
    if not c.dcbaap:
        raise ValueError("DCBAAP is not programmed yet")
    entry = int.from_bytes(c.mem.peek(c.dcbaap + 8 * slot, 8), "little") & ~(CONTEXT_ALIGN - 1)
    if not entry:
        raise ValueError(f"slot {slot} has no output device context (its DCBAA entry is 0)")
    return entry


def _u64(data: bytes) -> str:
    return f"{int.from_bytes(data, 'little'):#x}"


def _ep_state(data: bytes) -> str:
    state = EP_CTX["ep_state"].of(int.from_bytes(data[:4], "little"))
    return f"{EP_STATE_NAMES.get(state, 'reserved')} ({state})"


def _dequeue(data: bytes) -> str:
    value = int.from_bytes(data, "little")
    return f"{value & ~0xF:#x} (dcs {value & 1})"


def _trb(data: bytes) -> str:
    return f"[{trb_text(Trb.unpack(0, data))}]"


_watch_parser("watch", "write",
              """watch                          # list watchpoints
                 watch mem 0x10000 8            # a controller write changes these 8 bytes
                 watch mem 0x10000 --on-read    # the guest changed them (seen at the next read)
                 watch reg USBCMD               # the guest writes USBCMD
                 watch reg PORTSC[5]
                 watch dcbaa 1                  # slot 1's DCBAA entry (use --on-read)
                 watch ep 1 3 dequeue           # TR Dequeue Pointer of slot 1 DCI 3
                 watch ep 1 3 state             # its EP State (running, halted, stopped...)
                 watch trb 0x10040 --on-read    # the guest rewrote this TRB (its cycle bit)""")
_watch_parser("rwatch", "read",
              """rwatch mem 0x10000 16         # every controller read of these bytes
                 rwatch trb 0x10040""")
_watch_parser("awatch", "access",
              """awatch mem 0x10000 16         # every controller read or write
                 awatch ep 1 1 state""")
