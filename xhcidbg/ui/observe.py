"""The console's hooks observers: the activity log and the breakpoints.

Both attach to the controller's one observer interface (xhcidbg.emu.hooks) and only read what
is announced: neither changes a mutable announcement.  A breakpoint that matches pauses the
controller's gate; the unit being run finishes, nothing after it starts.
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..emu.hooks import CommandStart, TransferRecord
from ..emu.trb import CC_NAMES, SLOT_ID, TRB_NAMES, TrbType, cc_name, trb_name
from .render import linux, trb_text

MAX_RECORDS = 4000


@dataclass
class Record:
    seq: int
    kind: str
    text: str


class ActivityLog:
    """Everything the controller announced, one line each, most recent last."""

    def __init__(self, maxlen: int = MAX_RECORDS):
        self.records: deque[Record] = deque(maxlen=maxlen)
        self._seq = itertools.count(1)
        self.last_ring: str | None = None       # ring of the last TRB fetched

    @property
    def seq(self) -> int:
        """The number the next record will get (use it to ask for what came after)."""
        return self.records[-1].seq + 1 if self.records else 1

    def since(self, seq: int) -> list[Record]:
        return [r for r in self.records if r.seq >= seq]

    def add(self, kind: str, text: str) -> None:
        self.records.append(Record(next(self._seq), kind, text))

    # ---- hooks ------------------------------------------------------------------------------
    def on_doorbell(self, slot: int, target: int, stream: int) -> None:
        what = (linux.decode_doorbell(slot, target | (stream << 16)) if linux
                else f"slot {slot} target {target}")
        self.add("doorbell", f"doorbell {slot}: {what}")

    def on_trb(self, ring: str, trb) -> None:
        self.last_ring = ring
        self.add("trb", f"fetch {ring:>5} @{trb.addr:#x}: {trb_text(trb)}")

    def on_command(self, cmd) -> None:
        self.add("command", f"command {trb_name(cmd.trb.type)} @{cmd.trb.addr:#x} -> "
                            f"'{cc_name(cmd.cc)}' slot {cmd.slot}")

    def on_event_posted(self, ev) -> None:
        dw = ev.dwords
        self.add("event", f"event intr {ev.interrupter} @{ev.addr:#x}: "
                          f"{linux.decode_trb(*dw) if linux else dw}")

    def on_urb_submit(self, rec: TransferRecord) -> None:
        x = rec.xfer
        data = f" data {bytes(x.data[:32]).hex(' ')}" if x.data else ""
        self.add("urb", f"URB #{x.id} submit slot {rec.slot} ep {x.endpoint:#04x} "
                        f"{x.ep_type.name.lower()} {'in' if x.is_in else 'out'} len {x.length}"
                        f"{' setup ' + x.setup.hex(' ') if x.setup else ''}{data}")

    def on_urb_complete(self, rec: TransferRecord) -> None:
        x = rec.xfer
        data = f" data {x.in_data(32).hex(' ')}" if x.is_in and x.actual else ""
        more = "..." if x.is_in and x.actual > 32 else ""
        status = x.status.name if x.status is not None else "?"
        self.add("urb", f"URB #{x.id} done   slot {rec.slot} ep {x.endpoint:#04x} {status} "
                        f"actual {x.actual}{data}{more}")

    def on_port(self, port: int, old: int, new: int) -> None:
        text = linux.decode_portsc(new).strip() if linux else f"{new:#x}"
        self.add("port", f"port {port}: PORTSC {old:#010x} -> {new:#010x} {text}")

    def on_state(self, kind: str, ident: str, old: str, new: str) -> None:
        self.add("state", f"{kind} {ident}: {old or '?'} -> {new}")

    def on_interrupt(self, interrupter: int) -> None:
        self.add("interrupt", f"interrupt: interrupter {interrupter}")

    def on_log(self, level: str, message: str) -> None:
        self.add("log", f"{level}: {message}")


# ---- breakpoints -------------------------------------------------------------------------------
# kind -> the conditions it takes (key -> what it means), for validation and help
BREAK_KINDS = {
    "trb": {"type": "TRB type (Setup, Data, Status, Normal, Link, No-Op, Enable Slot...)",
            "ring": "cmd or SLOT/DCI", "slot": "slot id of the ring", "dci": "endpoint DCI"},
    "command": {"type": "command type (enable, address, configure, evaluate, stop...)",
                "slot": "slot id", "cc": "completion code (success, stall, context...)",
                "at": "done (default: after it completed) or start (before it runs: the "
                      "command waits on the ring and `step command` runs it)"},
    "doorbell": {"slot": "doorbell index (0: command ring)", "target": "DCI rung"},
    "port": {"port": "root port number"},
    "event": {"type": "event type (transfer, command, port...)", "cc": "completion code",
              "slot": "slot id", "dci": "endpoint DCI", "interrupter": "interrupter index"},
    "urb": {"slot": "slot id", "ep": "endpoint address (0x81...)", "phase": "submit or done",
            "status": "OK, STALL..."},
}


def _norm(text: str) -> str:
    return text.lower().replace(" ", "").replace("-", "").replace("_", "")


def _type_matches(want: str, t: int) -> bool:
    if want.isdigit():
        return int(want) == t
    w = _norm(want)
    names: tuple[str, ...] = (_norm(TRB_NAMES.get(t, "")),)
    if t in TrbType._value2member_map_:
        names += (_norm(TrbType(t).name),)
    return any(n.startswith(w) for n in names)


def _cc_matches(want: str, cc: int) -> bool:
    if want.isdigit():
        return int(want) == cc
    return _norm(CC_NAMES.get(cc, "")).startswith(_norm(want))


def _int(text: str) -> int:
    return int(text, 0)


@dataclass
class Breakpoint:
    number: int
    kind: str
    conditions: dict[str, str] = field(default_factory=dict)
    enabled: bool = True
    hits: int = 0

    def __post_init__(self):
        allowed = BREAK_KINDS[self.kind]
        for key, value in self.conditions.items():
            if key not in allowed:
                raise ValueError(f"`break {self.kind}` takes {', '.join(allowed)}; not {key!r}")
            if key in ("slot", "dci", "target", "port", "interrupter", "ep"):
                try:
                    _int(value)
                except ValueError:
                    raise ValueError(f"{key}={value!r}: a number is needed") from None

    def matches(self, facts: dict) -> bool:
        if facts.get("at") == "start" and "at" not in self.conditions:
            return False                  # a command breakpoint stops after it, unless asked
        for key, want in self.conditions.items():
            have = facts.get(key)
            if have is None:
                return False
            if key == "type":
                if not _type_matches(want, have):
                    return False
            elif key == "cc":
                if not _cc_matches(want, have):
                    return False
            elif key in ("ring", "phase", "status", "at"):
                if _norm(str(have)) != _norm(want):
                    return False
            elif _int(want) != have:
                return False
        return True

    def __str__(self) -> str:
        cond = " ".join(f"{k}={v}" for k, v in self.conditions.items())
        return f"#{self.number} {self.kind}{' ' + cond if cond else ''}"


class Breakpoints:
    """The breakpoint list, attached to the hooks as one observer."""

    def __init__(self, gate, on_hit: Callable[[Breakpoint, str], None] = lambda b, w: None):
        self.gate = gate
        self.on_hit = on_hit
        self.points: list[Breakpoint] = []
        self._numbers = itertools.count(1)
        self.last_hit: tuple[Breakpoint, str] | None = None
        self.last_ring: str | None = None       # the ring the last hit concerns, if one
        self.hits = 0                   # hits of all breakpoints, ever
        self._stepping_over: int | None = None  # the command TRB we stopped in front of

    def add(self, kind: str, conditions: dict[str, str]) -> Breakpoint:
        if kind not in BREAK_KINDS:
            raise ValueError(f"no breakpoint kind {kind!r}; kinds: {', '.join(BREAK_KINDS)}")
        bp = Breakpoint(next(self._numbers), kind, dict(conditions))
        self.points.append(bp)
        return bp

    def delete(self, number: int | None = None) -> int:
        before = len(self.points)
        self.points = [] if number is None else [b for b in self.points if b.number != number]
        if len(self.points) == before:
            raise ValueError(f"no breakpoint #{number}")
        return before - len(self.points)

    def get(self, number: int) -> Breakpoint:
        for b in self.points:
            if b.number == number:
                return b
        raise ValueError(f"no breakpoint #{number}")

    def _check(self, kind: str, facts: dict, what: Callable[[], str],
               ring: str | None = None) -> bool:
        for bp in self.points:
            if bp.enabled and bp.kind == kind and bp.matches(facts):
                bp.hits += 1
                self.hits += 1
                text = what()
                self.last_hit = (bp, text)
                self.last_ring = ring
                self.gate.pause()
                self.on_hit(bp, text)
                return True
        return False

    # ---- hooks (only the kinds someone asked for cost anything) --------------------------------
    def _wanted(self, kind: str) -> bool:
        return any(b.enabled and b.kind == kind for b in self.points)

    def on_trb(self, ring: str, trb) -> None:
        if not self._wanted("trb"):
            return
        slot = dci = None
        if ring != "cmd" and "/" in ring:
            slot, dci = (int(x) for x in ring.split("/"))
        self._check("trb", {"type": trb.type, "ring": ring, "slot": slot, "dci": dci},
                    lambda: f"TRB on ring {ring} @{trb.addr:#x}: {trb_text(trb)}", ring)

    def on_command_start(self, start: CommandStart) -> None:
        if not self._wanted("command"):
            return
        trb = start.trb
        if self._stepping_over == trb.addr:       # we stopped before it: now it runs
            self._stepping_over = None
            return
        if self._check("command", {"type": trb.type, "slot": SLOT_ID.of(trb.control),
                                   "at": "start"},
                       lambda: f"command {trb_name(trb.type)} @{trb.addr:#x} is next "
                               f"(slot {SLOT_ID.of(trb.control)}): `step command` runs it",
                       "cmd"):
            start.hold = True
            self._stepping_over = trb.addr

    def on_command(self, cmd) -> None:
        if self._wanted("command"):
            self._check("command", {"type": cmd.trb.type, "slot": cmd.slot, "cc": int(cmd.cc),
                                    "at": "done"},
                        lambda: f"command {trb_name(cmd.trb.type)} completed: "
                                f"'{cc_name(cmd.cc)}' slot {cmd.slot}", "cmd")

    def on_doorbell(self, slot: int, target: int, stream: int) -> None:
        if self._wanted("doorbell"):
            self._check("doorbell", {"slot": slot, "target": target},
                        lambda: f"doorbell {slot} rung, target {target}",
                        "cmd" if slot == 0 else f"{slot}/{target}")

    def on_port(self, port: int, old: int, new: int) -> None:
        if self._wanted("port"):
            self._check("port", {"port": port},
                        lambda: f"port {port}: PORTSC {old:#010x} -> {new:#010x}")

    def on_event_posted(self, ev) -> None:
        if self._wanted("event"):
            dw = ev.dwords
            self._check("event", {"type": (dw[3] >> 10) & 0x3F, "cc": dw[2] >> 24,
                                  "slot": dw[3] >> 24, "dci": (dw[3] >> 16) & 0x1F,
                                  "interrupter": ev.interrupter},
                        lambda: f"event posted @{ev.addr:#x}: "
                                f"{linux.decode_trb(*dw) if linux else dw}",
                        f"{dw[3] >> 24}/{(dw[3] >> 16) & 0x1F}" if dw[3] >> 24 else None)

    def _urb(self, rec: TransferRecord, phase: str) -> None:
        x = rec.xfer
        if self._wanted("urb"):
            self._check("urb", {"slot": rec.slot, "ep": x.endpoint, "phase": phase,
                                "status": x.status.name if x.status is not None else None},
                        lambda: f"URB #{x.id} {phase}: slot {rec.slot} ep {x.endpoint:#04x}",
                        f"{rec.slot}/{rec.dci}")

    def on_urb_submit(self, rec: TransferRecord) -> None:
        self._urb(rec, "submit")

    def on_urb_complete(self, rec: TransferRecord) -> None:
        self._urb(rec, "done")
