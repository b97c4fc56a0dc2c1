"""The console's breakpoints and watchpoints (the activity log is `xhcidbg.ui.history`).

They attach to the controller's one observer interface (xhcidbg.emu.hooks) and only read what
is announced: no mutable announcement is changed.  A breakpoint that matches pauses the
controller's gate; the unit being run finishes, nothing after it starts.

Watchpoints see what the controller does: its DMA (the `dma` announcement) and the guest's
register writes (`mmio`).  A guest writing its own RAM makes no announcement -- a vfio-user
device cannot see it -- so such a change shows when the controller next reads the bytes (the
`change` mode: a read that finds a value other than the one the controller last saw).
"""
from __future__ import annotations

import itertools
import shlex
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..conditions import Condition, register_matches
from ..devices.descriptors import describe_setup
from ..emu.hooks import CommandStart, InterruptSignal, MmioAccess, TransferRecord
from ..emu.memory import BytesLike, DmaError
from ..emu.slots import endpoint_address
from ..emu.trb import (
    COMPLETION_CODE,
    EP_ID,
    EVENT_LENGTH,
    SLOT_ID,
    TRB_TYPE,
    Trb,
    TrbType,
    cc_name,
    trb_name,
)
from .render import linux, trb_text

if TYPE_CHECKING:
    from ..emu.controller import XhciController

# ---- breakpoints -------------------------------------------------------------------------------
# kind -> the conditions it takes (key -> what it means), for validation and help
BREAK_KINDS = {
    "trb": {"type": "TRB type (Setup, Data, Status, Normal, Link, No-Op, Enable Slot...)",
            "ring": "cmd or SLOT/DCI", "slot": "slot id of the ring", "dci": "endpoint DCI",
            "ep": "endpoint address (0x81...)"},
    "command": {"type": "command type (enable, address, configure, evaluate, stop...)",
                "slot": "slot id", "dci": "endpoint DCI (endpoint commands)",
                "cc": "completion code (success, stall, context...)",
                "at": "done (default: after it completed) or start (before it runs: the "
                      "command waits on the ring and `step command` runs it)"},
    "doorbell": {"slot": "doorbell index (0: command ring)", "target": "DCI rung",
                 "dci": "DCI rung (as target)", "ep": "endpoint address rung",
                 "stream": "stream id"},
    "port": {"port": "root port number"},
    "event": {"type": "event type (transfer, command, port...)", "cc": "completion code",
              "slot": "slot id", "dci": "endpoint DCI", "ep": "endpoint address",
              "interrupter": "interrupter index", "length": "transfer length field"},
    "urb": {"slot": "slot id", "dci": "endpoint DCI", "ep": "endpoint address (0x81...)",
            "phase": "submit, done (the device finished) or retired (the controller posted)",
            "status": "OK, STALL...", "length": "bytes asked for", "actual": "bytes moved",
            "cc": "completion code posted (phase=retired)"},
    "mmio": {"reg": "register name (USBCMD, PORTSC or PORTSC[3], IMAN[0], DOORBELL[1]...)",
             "access": "read or write (also as a bare word)", "offset": "BAR0 offset",
             "value": "the value read or written", "size": "access size in bytes"},
    "setup": {"request_type": "bmRequestType", "request": "bRequest", "value": "wValue",
              "index": "wIndex", "length": "wLength", "slot": "slot id"},
    "interrupt": {"interrupter": "interrupter index"},
}
_BARE_WORDS = {"mmio": {"read": "access", "write": "access"}}
WATCH_MODES = ("write", "read", "access", "change")


def parse_conditions(kind: str, words: Iterable[str]) -> list[Condition]:
    out = []
    for w in words:
        bare = _BARE_WORDS.get(kind, {}).get(w.lower())
        cond = Condition(bare, "=", w.lower()) if bare else Condition.parse(w)
        cond.check(BREAK_KINDS[kind], f"break {kind}")
        out.append(cond)
    return out


@dataclass
class MemWatch:
    """A range of guest memory watched for the controller's DMA."""

    addr: int
    length: int
    mode: str                          # one of WATCH_MODES
    target: str                        # how `watch` named it: "mem 0x1000 8", "ep 1 3 dequeue"
    show: Callable[[bytes], str] | None = None      # the watched bytes in words
    last: bytes = b""                  # the bytes the controller last saw (mode "change")

    def text(self, data: bytes) -> str:
        return self.show(data) if self.show is not None else data.hex(" ")

    def overlaps(self, addr: int, length: int) -> bool:
        return addr < self.addr + self.length and self.addr < addr + length

    def merged(self, base: bytes, addr: int, data: BytesLike) -> bytes:
        """`base` (the watched bytes) with the part of an access at `addr` laid over it."""
        lo, hi = max(addr, self.addr), min(addr + len(data), self.addr + self.length)
        out = bytearray(base)
        out[lo - self.addr:hi - self.addr] = bytes(memoryview(data)[lo - addr:hi - addr])
        return bytes(out)


@dataclass
class RegWatch:
    """A register watched for the guest's writes."""

    reg: str


@dataclass
class Breakpoint:
    number: int
    kind: str                          # a BREAK_KINDS key, or "watch"
    conditions: list[Condition] = field(default_factory=list)
    enabled: bool = True
    hits: int = 0
    temporary: bool = False            # deleted at its first stop (tbreak)
    ignore: int = 0                    # stops still to skip
    commands: list[str] = field(default_factory=list)     # run by the console at a stop
    watch: MemWatch | RegWatch | None = None
    label: str = ""                    # internal stops (until, finish): what they wait for

    @property
    def internal(self) -> bool:
        return self.number == 0

    def matches(self, facts: dict) -> bool:
        if facts.get("at") == "start" and not any(c.key == "at" for c in self.conditions):
            return False                  # a command breakpoint stops after it, unless asked
        return all(c.holds(facts) for c in self.conditions)

    @property
    def title(self) -> str:
        if self.internal:
            return self.label
        temporary = "temporary " if self.temporary else ""
        if isinstance(self.watch, MemWatch):
            mode = _MODE_FLAGS[self.watch.mode]
            return f"{temporary}watchpoint #{self.number} {self.watch.target} ({mode})"
        if isinstance(self.watch, RegWatch):
            return f"{temporary}watchpoint #{self.number} reg {self.watch.reg}"
        return f"{temporary}breakpoint {self}"

    def __str__(self) -> str:
        if self.internal:
            return self.label
        if isinstance(self.watch, MemWatch):
            w = self.watch
            return (f"#{self.number} watch {w.target} ({_MODE_FLAGS[w.mode]}) "
                    f"{w.addr:#x}+{w.length}")
        if isinstance(self.watch, RegWatch):
            return f"#{self.number} watch reg {self.watch.reg}"
        cond = " ".join(map(str, self.conditions))
        return f"#{self.number} {self.kind}{' ' + cond if cond else ''}"

    def definition(self) -> str:
        """The console command that makes this breakpoint again."""
        if isinstance(self.watch, MemWatch):
            line = f"watch {self.watch.target} --{_MODE_FLAGS[self.watch.mode]}"
        elif isinstance(self.watch, RegWatch):
            line = f"watch reg {self.watch.reg}"
        else:
            line = " ".join([("tbreak" if self.temporary else "break"), self.kind,
                             *(_quoted(str(c)) for c in self.conditions)])
        if not self.enabled:
            line += " --disabled"
        if self.ignore:
            line += f" --ignore {self.ignore}"
        if self.commands:
            line += f" --commands {_quoted('; '.join(self.commands))}"
        return line

    def data(self) -> dict[str, object]:
        out: dict[str, object] = {
            "number": self.number, "type": "watchpoint" if self.watch else "breakpoint",
            "kind": self.kind, "conditions": [str(c) for c in self.conditions],
            "enabled": self.enabled, "hits": self.hits, "temporary": self.temporary,
            "ignore": self.ignore, "commands": list(self.commands),
            "definition": self.definition()}
        if isinstance(self.watch, MemWatch):
            out.update(target=self.watch.target, mode=self.watch.mode, addr=self.watch.addr,
                       length=self.watch.length)
        elif isinstance(self.watch, RegWatch):
            out.update(target=f"reg {self.watch.reg}")
        return out


def _quoted(word: str) -> str:
    """`word` as the console splits it back (quotes only where its splitting needs them)."""
    return shlex.quote(word) if any(ch in word for ch in " \t'\";#") or not word else word


_MODE_FLAGS = {"write": "write", "read": "read", "access": "access", "change": "on-read"}


class _Listener:
    """Subscribes one announcement to a Breakpoints method, attached only while someone
    watches: an MMIO or DMA announcement nobody asked for must cost nothing."""

    def __init__(self, name: str, fn: Callable[..., None]):
        setattr(self, f"on_{name}", fn)


class Breakpoints:
    """The breakpoint and watchpoint list, attached to the hooks as one observer.  A stop
    pauses the controller's gate: the unit being run finishes, nothing after it starts."""

    def __init__(self, controller: XhciController,
                 on_hit: Callable[[Breakpoint, str], None] = lambda b, w: None):
        self.controller = controller
        self.gate = controller.gate
        self.on_hit = on_hit
        self.points: list[Breakpoint] = []
        self.internal: list[Breakpoint] = []     # one-shot stops of until, finish, step event
        self._numbers = itertools.count(1)
        self.last_hit: tuple[Breakpoint, str] | None = None
        self.last_ring: str | None = None       # the ring the last hit concerns, if one
        self.hits = 0                   # stops by any breakpoint, ever
        self._stepping_over: int | None = None  # the command TRB we stopped in front of
        self.held_command: Trb | None = None    # that command, until it runs
        self._kinds: set[str] = set()   # kinds with an enabled breakpoint (the hooks' filter)
        self._mmio = _Listener("mmio", self.on_mmio_access)
        self._dma = _Listener("dma", self.on_dma_access)
        self._attached: set[str] = set()
        self._registers: set[str] | None = None

    # ---- the list ---------------------------------------------------------------------------
    def add(self, kind: str, conditions: Iterable[str] = (), temporary: bool = False
            ) -> Breakpoint:
        if kind not in BREAK_KINDS:
            raise ValueError(f"no breakpoint kind {kind!r}; kinds: {', '.join(BREAK_KINDS)}")
        conds = parse_conditions(kind, conditions)
        self._check_registers(conds)
        bp = Breakpoint(next(self._numbers), kind, conds, temporary=temporary)
        self.points.append(bp)
        self._sync()
        return bp

    def add_watch(self, watch: MemWatch | RegWatch, temporary: bool = False) -> Breakpoint:
        if isinstance(watch, RegWatch):
            self._check_registers([Condition("reg", "=", watch.reg)])
        bp = Breakpoint(next(self._numbers), "watch", watch=watch, temporary=temporary)
        self.points.append(bp)
        self._sync()
        return bp

    def stop_at(self, kind: str, conditions: Iterable[str], label: str) -> Breakpoint:
        """A one-shot internal stop (not listed, gone at the next stop of any kind)."""
        bp = Breakpoint(0, kind, parse_conditions(kind, conditions), temporary=True,
                        label=label)
        self.internal.append(bp)
        self._sync()
        return bp

    def cancel_internal(self) -> None:
        if self.internal:
            self.internal.clear()
            self._sync()

    def delete(self, number: int | None = None) -> int:
        before = len(self.points)
        self.points = [] if number is None else [b for b in self.points if b.number != number]
        if number is not None and len(self.points) == before:
            raise ValueError(f"no breakpoint #{number}")
        self._sync()
        return before - len(self.points)

    def get(self, number: int) -> Breakpoint:
        for b in self.points:
            if b.number == number:
                return b
        raise ValueError(f"no breakpoint #{number}")

    def set_enabled(self, number: int, on: bool) -> Breakpoint:
        b = self.get(number)
        b.enabled = on
        self._sync()
        return b

    def set_conditions(self, number: int, words: Iterable[str]) -> Breakpoint:
        b = self.get(number)
        if b.watch is not None:
            raise ValueError(f"#{number} is a watchpoint: it takes no conditions")
        conds = parse_conditions(b.kind, words)
        self._check_registers(conds)
        b.conditions = conds
        return b

    def detach(self) -> None:
        """Take the MMIO and DMA listeners off the hooks (the console is leaving)."""
        hooks = self.controller.hooks
        for name in self._attached:
            hooks.detach(self._mmio if name == "mmio" else self._dma)
        self._attached.clear()

    def _sync(self) -> None:
        """Recompute which kinds are wanted; attach the MMIO and DMA listeners only while a
        breakpoint needs them."""
        live = [b for b in self.points if b.enabled] + self.internal
        self._kinds = {b.kind for b in live}
        want = set()
        for b in live:
            if b.kind == "mmio" or isinstance(b.watch, RegWatch):
                want.add("mmio")
            if isinstance(b.watch, MemWatch):
                want.add("dma")
        hooks = self.controller.hooks
        for name in want - self._attached:
            hooks.attach(self._mmio if name == "mmio" else self._dma)
        for name in self._attached - want:
            hooks.detach(self._mmio if name == "mmio" else self._dma)
        self._attached = want

    def _check_registers(self, conds: Iterable[Condition]) -> None:
        for c in conds:
            if c.key != "reg":
                continue
            names = self.register_names()
            base = c.value.upper().split("[", 1)[0]
            if c.value.upper() not in names and base not in names:
                raise ValueError(f"no register named {c.value!r} (e.g. USBCMD, USBSTS, "
                                 f"CRCR_LO, PORTSC, PORTSC[1], IMAN[0], DOORBELL[1])")

    def register_names(self) -> set[str]:
        """Every name BAR0 has, with and without its [index] (computed once)."""
        if self._registers is None:
            names = set()
            c = self.controller
            for off in range(0, c.bar_size, 4):
                name = c.register_name(off).upper()
                if "+" not in name:
                    names.add(name)
                    names.add(name.split("[", 1)[0])
            self._registers = names
        return self._registers

    # ---- hitting ----------------------------------------------------------------------------
    def _check(self, kind: str, facts: dict, what: Callable[[], str],
               ring: str | None = None) -> bool:
        stopped = []
        for bp in [*self.points, *self.internal]:
            if (bp.enabled and bp.kind == kind and bp.watch is None and bp.matches(facts)
                    and self._count(bp)):
                stopped.append(bp)
        if stopped:
            self._stop(stopped, what(), ring)
        return bool(stopped)

    def _count(self, bp: Breakpoint) -> bool:
        """A breakpoint was reached: count it; True if it stops (not ignored)."""
        bp.hits += 1
        if bp.ignore > 0:
            bp.ignore -= 1
            return False
        return True

    def _stop(self, stopped: list[Breakpoint], text: str, ring: str | None) -> None:
        self.hits += 1
        self.last_hit = (stopped[0], text)
        self.last_ring = ring
        self.gate.pause()
        gone = [b for b in stopped if b.temporary]
        if gone or self.internal:
            # momentary stops end at any stop; the lists change only after the announcement
            self.points = [b for b in self.points if b not in gone]
            self.internal.clear()
            self.controller.scheduler.call_soon(self._sync)
            self._kinds = {b.kind for b in self.points if b.enabled}
        for bp in stopped:
            self.on_hit(bp, text)

    def _wanted(self, kind: str) -> bool:
        return kind in self._kinds

    # ---- hooks (only the kinds someone asked for cost anything) --------------------------------
    def on_trb(self, ring: str, trb) -> None:
        if "trb" not in self._kinds:
            return
        slot = dci = ep = None
        if ring != "cmd" and "/" in ring:
            slot, dci = (int(x) for x in ring.split("/"))
            ep = endpoint_address(dci)
        self._check("trb", {"type": trb.type, "ring": ring, "slot": slot, "dci": dci, "ep": ep},
                    lambda: f"TRB on ring {ring} @{trb.addr:#x}: {trb_text(trb)}", ring)

    def on_command_start(self, start: CommandStart) -> None:
        if not self._wanted("command"):
            return
        trb = start.trb
        if self._stepping_over == trb.addr:       # we stopped before it: now it runs
            self._stepping_over = None
            self.held_command = None
            return
        if self._check("command", {"type": trb.type, "slot": SLOT_ID.of(trb.control),
                                   "at": "start"},
                       lambda: f"command {trb_name(trb.type)} @{trb.addr:#x} is next "
                               f"(slot {SLOT_ID.of(trb.control)}): `step command` runs it",
                       "cmd"):
            start.hold = True
            self._stepping_over = trb.addr
            self.held_command = trb

    def on_command(self, cmd) -> None:
        if "command" not in self._kinds:
            return
        t = cmd.trb.type
        dci = EP_ID.of(cmd.trb.control) if t in _ENDPOINT_COMMANDS else None
        self._check("command", {"type": t, "slot": cmd.slot, "cc": int(cmd.cc), "dci": dci,
                                "at": "done"},
                    lambda: f"command {trb_name(t)} completed: '{cc_name(cmd.cc)}' slot "
                            f"{cmd.slot}", "cmd")

    def on_doorbell(self, slot: int, target: int, stream: int) -> None:
        if "doorbell" not in self._kinds:
            return
        self._check("doorbell", {"slot": slot, "target": target, "stream": stream,
                                 "dci": target if slot else None,
                                 "ep": endpoint_address(target) if slot and target else None},
                    lambda: f"doorbell {slot} rung, target {target}",
                    "cmd" if slot == 0 else f"{slot}/{target}")

    def on_port(self, port: int, old: int, new: int) -> None:
        if "port" in self._kinds:
            self._check("port", {"port": port},
                        lambda: f"port {port}: PORTSC {old:#010x} -> {new:#010x}")

    def on_event_posted(self, ev) -> None:
        if "event" not in self._kinds:
            return
        dw = ev.dwords
        slot, dci = SLOT_ID.of(dw[3]), EP_ID.of(dw[3])
        self._check("event", {"type": TRB_TYPE.of(dw[3]), "cc": COMPLETION_CODE.of(dw[2]),
                              "slot": slot, "dci": dci,
                              "ep": endpoint_address(dci) if dci else None,
                              "length": EVENT_LENGTH.of(dw[2]), "interrupter": ev.interrupter},
                    lambda: f"event posted @{ev.addr:#x}: "
                            f"{linux.decode_trb(*dw) if linux else dw}",
                    f"{slot}/{dci}" if slot and dci else None)

    def on_interrupt(self, sig: InterruptSignal) -> None:
        interrupter = sig.interrupter
        if "interrupt" in self._kinds:
            self._check("interrupt", {"interrupter": interrupter},
                        lambda: f"interrupt signalled: interrupter {interrupter}")

    def _urb(self, rec: TransferRecord, phase: str) -> None:
        x = rec.xfer
        self._check("urb", {"slot": rec.slot, "dci": rec.dci, "ep": x.endpoint, "phase": phase,
                            "status": x.status.name if x.status is not None else None,
                            "length": x.length, "actual": x.actual if x.done else None,
                            "cc": rec.cc if phase == "retired" else None},
                    lambda: f"URB #{x.id} {phase}: slot {rec.slot} ep {x.endpoint:#04x}"
                            + (f" '{cc_name(rec.cc)}'" if phase == "retired" and rec.cc
                               is not None else ""),
                    f"{rec.slot}/{rec.dci}")

    def on_urb_submit(self, rec: TransferRecord) -> None:
        if "urb" in self._kinds:
            self._urb(rec, "submit")
        setup = rec.xfer.setup
        if "setup" in self._kinds and setup:
            rt, req, value, index, length = _SETUP.unpack(bytes(setup[:8]))
            self._check("setup", {"request_type": rt, "request": req, "value": value,
                                  "index": index, "length": length, "slot": rec.slot},
                        lambda: f"control request on slot {rec.slot}: "
                                f"{describe_setup(bytes(setup[:8]))}",
                        f"{rec.slot}/{rec.dci}")

    def on_urb_complete(self, rec: TransferRecord) -> None:
        if "urb" in self._kinds:
            self._urb(rec, "done")

    def on_urb_retired(self, rec: TransferRecord) -> None:
        if "urb" in self._kinds:
            self._urb(rec, "retired")

    # ---- MMIO and DMA (their listeners are attached only while needed) ------------------------
    def on_mmio_access(self, acc: MmioAccess) -> None:
        c = self.controller
        name = c.register_name(acc.offset)
        rw = "write" if acc.write else "read"
        if "mmio" in self._kinds:
            self._check("mmio", {"reg": name, "access": rw, "offset": acc.offset,
                                 "value": acc.value, "size": acc.size},
                        lambda: f"MMIO {rw} of {name} (BAR0+{acc.offset:#x}, {acc.size} bytes): "
                                f"{acc.value:#x}")
        if not acc.write:
            return
        stopped = []
        for bp in self.points:
            w = bp.watch
            if (bp.enabled and isinstance(w, RegWatch) and register_matches(w.reg, name)
                    and self._count(bp)):
                stopped.append(bp)
        if stopped:
            old = c.peek(acc.offset & ~3)          # announced before the write lands
            self._stop(stopped, f"the guest writes {name}: {acc.value:#010x} (was {old:#010x})",
                       None)

    def on_dma_access(self, write: bool, addr: int, length: int, data: BytesLike) -> None:
        stopped, texts = [], []
        for bp in self.points:
            w = bp.watch
            if not (bp.enabled and isinstance(w, MemWatch) and w.overlaps(addr, length)):
                continue
            text = self._watch_text(w, write, addr, data)
            if text is not None and self._count(bp):
                stopped.append(bp)
                texts.append(text)
        if stopped:
            self._stop(stopped, "; ".join(texts), None)

    def _watch_text(self, w: MemWatch, write: bool, addr: int, data: BytesLike) -> str | None:
        """What the access did to the watched bytes, or None if this watch does not stop."""
        try:
            current = self.controller.mem.peek(w.addr, w.length)    # before a write lands
        except DmaError:
            current = w.last or bytes(w.length)
        where = f"{w.target} ({w.addr:#x}+{w.length})"
        if write:
            new = w.merged(current, addr, data)
            w.last = new
            if (w.mode == "write" and new == current) or w.mode not in ("write", "access"):
                return None
            if new == current:
                return f"the controller writes {where}: unchanged {w.text(new)}"
            return f"the controller writes {where}: old {w.text(current)} new {w.text(new)}"
        seen = w.merged(w.last or current, addr, data)
        before, w.last = w.last, seen
        if w.mode in ("read", "access"):
            return f"the controller reads {where}: {w.text(seen)}"
        if w.mode == "change" and before and seen != before:
            return (f"the controller reads {where} and finds it changed: was "
                    f"{w.text(before)} now {w.text(seen)}")
        return None


_ENDPOINT_COMMANDS = {TrbType.RESET_ENDPOINT, TrbType.STOP_ENDPOINT, TrbType.SET_TR_DEQUEUE}
_SETUP = struct.Struct("<BBHHH")
