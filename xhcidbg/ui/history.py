"""The console's record of what the controller announced, kept as typed entries, and the two
commands that read it: `log` (searchable by slot, endpoint, kind, TRB and text) and `history`
(one TRB's story: the doorbell, the fetches, the URB and the event that retired it).

Announcements can be frequent (every TRB, every URB, every event), so recording one costs a
clock read and one small object: the raw values are kept and turned into text only when
someone looks (`Entry.text`).  What the controller may change or reuse after the announcement
(the data of a finished URB, which can live in the guest's own buffers) is copied when it is
announced, at most DATA_SHOWN bytes of it.
"""
from __future__ import annotations

import itertools
import re
import time
from argparse import Namespace
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.text import Text

from ..decode import xhci as linux
from ..emu.hooks import CommandResult, EventRecord, InterruptSignal, TransferRecord
from ..emu.layout import DWORD_BITS
from ..emu.trb import (
    CHAIN,
    COMPLETION_CODE,
    EP_ID,
    SLOT_ID,
    TRB_TYPE,
    Trb,
    TrbType,
    cc_name,
    trb_name,
)
from . import render
from .registry import command, parser

if TYPE_CHECKING:
    from .console import Console

INSPECT = "inspection"
MAX_ENTRIES = 20000            # about 3 MB; a few thousand TDs of history
DATA_SHOWN = 32                # bytes of URB data the text shows
KINDS = ("doorbell", "trb", "command", "event", "urb", "port", "state", "interrupt", "log")

# Event types whose TRB Pointer names a TRB (a Transfer Event with ED set carries Event Data)
_POINTER_EVENTS = frozenset(int(t) for t in (TrbType.TRANSFER_EVENT, TrbType.COMMAND_COMPLETION))
# Event types with a Slot ID field
_SLOT_EVENTS = frozenset(int(t) for t in (
    TrbType.TRANSFER_EVENT, TrbType.COMMAND_COMPLETION, TrbType.BANDWIDTH_REQUEST,
    TrbType.DOORBELL_EVENT, TrbType.DEVICE_NOTIFICATION))
_ED = 1 << 2                   # Transfer Event: the pointer is Event Data
_CHAIN = CHAIN.bits


class Entry:
    """One announcement.  `slot`/`dci` say which endpoint it concerns (None: none or the
    command ring), `addr` the TRB it is about (a fetched or command TRB; for an event, where
    it was written in the event ring), `pointer` an event's TRB Pointer, `cc` a completion
    code; `what` holds the rest raw, for the text made on demand."""

    __slots__ = ("_text", "addr", "cc", "dci", "kind", "pointer", "seq", "slot", "time_ns",
                 "what")

    def __init__(self, seq: int, time_ns: int, kind: str, slot: int | None, dci: int | None,
                 addr: int | None, pointer: int | None, cc: int | None, what: tuple):
        self.seq = seq
        self.time_ns = time_ns
        self.kind = kind
        self.slot = slot
        self.dci = dci
        self.addr = addr
        self.pointer = pointer
        self.cc = cc
        self.what = what
        self._text: str | None = None

    @property
    def text(self) -> str:
        """The line the console shows (made the first time it is asked for)."""
        if self._text is None:
            self._text = _TEXT[self.kind](self)
        return self._text

    @property
    def phase(self) -> str | None:
        """An URB entry's phase: submit, done or retired."""
        return self.what[0] if self.kind == "urb" and self.what else None

    @property
    def transfer(self) -> TransferRecord | None:
        return self.what[1] if self.kind == "urb" and self.what else None

    def concerns(self, addr: int) -> bool:
        """The entry is about the TRB at `addr`: its fetch, its command, an event pointing at
        it, or an URB whose TD holds it."""
        if (self.addr == addr and self.kind in ("trb", "command")) or self.pointer == addr:
            return True
        rec = self.transfer
        return rec is not None and addr in rec.trbs

    def __repr__(self) -> str:
        return f"<Entry #{self.seq} {self.kind}: {self.text}>"


class History:
    """Every announcement the console cares about (not MMIO), most recent last, at most
    `maxlen` of them.  The console's activity log: `since`, `seq` and `last_ring` are what it
    shows after each command."""

    def __init__(self, maxlen: int = MAX_ENTRIES, clock: Callable[[], int] = time.monotonic_ns):
        self.records: deque[Entry] = deque(maxlen=maxlen)
        self._seq = itertools.count(1)
        self.clock = clock
        self.origin_ns = clock()               # times are shown from here
        self.last_ring: str | None = None      # ring of the last TRB fetched
        self._rings: dict[str, tuple[int | None, int | None]] = {"cmd": (None, None)}

    def use_clock(self, clock: Callable[[], int]) -> None:
        """Take times from `clock` (the controller's: virtual in tests) from now on."""
        self.clock = clock
        self.origin_ns = clock()

    @property
    def seq(self) -> int:
        """The number the next entry will get (use it to ask for what came after)."""
        return self.records[-1].seq + 1 if self.records else 1

    def since(self, seq: int) -> list[Entry]:
        recs = self.records
        if not recs or seq > recs[-1].seq:
            return []
        start = max(0, seq - recs[0].seq)       # sequence numbers are consecutive
        return list(itertools.islice(recs, start, None))

    def add(self, kind: str, text: str) -> None:
        """A line of the console's own (not an announcement), already in words."""
        entry = Entry(next(self._seq), self.clock(), kind, None, None, None, None, None, ())
        entry._text = text
        self.records.append(entry)

    def _add(self, kind: str, slot: int | None, dci: int | None, addr: int | None,
             pointer: int | None, cc: int | None, what: tuple) -> None:
        self.records.append(Entry(next(self._seq), self.clock(), kind, slot, dci, addr, pointer,
                                  cc, what))

    def _ring(self, ring: str) -> tuple[int | None, int | None]:
        found = self._rings.get(ring)
        if found is None:
            slot, _, dci = ring.partition("/")
            found = self._rings[ring] = (int(slot), int(dci)) if dci else (None, None)
        return found

    # ---- hooks ------------------------------------------------------------------------------
    def on_doorbell(self, slot: int, target: int, stream: int) -> None:
        # doorbell 0 rings the command ring: it concerns no slot
        self._add("doorbell", slot or None, target if slot else None, None, None, None,
                  (slot, target, stream))

    def on_trb(self, ring: str, trb: Trb) -> None:
        self.last_ring = ring
        slot, dci = self._ring(ring)
        self._add("trb", slot, dci, trb.addr, None, None, (ring, trb))

    def on_command(self, cmd: CommandResult) -> None:
        self._add("command", cmd.slot or None, None, cmd.trb.addr, None, int(cmd.cc),
                  (cmd.trb, cmd.param, cmd.note))

    def on_event_posted(self, ev: EventRecord) -> None:
        dw = ev.dwords
        control = dw[3]
        kind = TRB_TYPE.of(control)
        slot = SLOT_ID.of(control) if kind in _SLOT_EVENTS else None
        dci = EP_ID.of(control) if kind == TrbType.TRANSFER_EVENT else None
        pointer = (dw[0] | dw[1] << DWORD_BITS
                   if kind in _POINTER_EVENTS and not control & _ED else None)
        self._add("event", slot or None, dci, ev.addr, pointer, COMPLETION_CODE.of(dw[2]),
                  (ev.interrupter, tuple(dw), ev.note, ev.drop))

    def on_urb_submit(self, rec: TransferRecord) -> None:
        data = rec.xfer.data
        shown = bytes(data[:DATA_SHOWN]) if data else b""
        self._add("urb", rec.slot, rec.dci, None, None, None, ("submit", rec, shown))

    def on_urb_complete(self, rec: TransferRecord) -> None:
        x = rec.xfer
        shown = x.in_data(DATA_SHOWN) if x.is_in and x.actual else b""
        self._add("urb", rec.slot, rec.dci, None, None, None,
                  ("done", rec, x.status, x.actual, shown))

    def on_urb_retired(self, rec: TransferRecord) -> None:
        self._add("urb", rec.slot, rec.dci, None, None, rec.cc, ("retired", rec))

    def on_port(self, port: int, old: int, new: int) -> None:
        self._add("port", None, None, None, None, None, (port, old, new))

    def on_state(self, kind: str, ident: str, old: str, new: str) -> None:
        slot, _, dci = ident.partition("/")
        self._add("state", int(slot) if kind in ("slot", "endpoint") and slot.isdigit()
                  else None, int(dci) if dci.isdigit() else None, None, None, None,
                  (kind, ident, old, new))

    def on_interrupt(self, sig: InterruptSignal) -> None:
        self._add("interrupt", None, None, None, None, None, (sig.interrupter,))

    def on_log(self, level: str, message: str) -> None:
        self._add("log", None, None, None, None, None, (level, message))


# ---- text, made when shown ----------------------------------------------------------------------
def _doorbell_text(e: Entry) -> str:
    slot, target, stream = e.what
    return f"doorbell {slot}: {linux.decode_doorbell(slot, target | (stream << 16))}"


def _trb_text(e: Entry) -> str:
    ring, trb = e.what
    return f"fetch {ring:>5} @{trb.addr:#x}: {render.trb_text(trb)}"


def _command_text(e: Entry) -> str:
    trb, _param, note = e.what
    return (f"command {trb_name(trb.type)} @{trb.addr:#x} -> '{cc_name(e.cc or 0)}' "
            f"slot {e.slot or 0}" + (f" ({note})" if note else ""))


def _event_text(e: Entry) -> str:
    interrupter, dw, note, dropped = e.what
    where = "dropped" if dropped else f"@{e.addr:#x}"
    return (f"event intr {interrupter} {where}: {linux.decode_trb(*dw)}"
            + (f" ({note})" if note else ""))


def _urb_text(e: Entry) -> str:
    phase, rec = e.what[:2]
    x = rec.xfer
    if phase == "submit":
        shown = e.what[2]
        data = f" data {shown.hex(' ')}" if shown else ""
        return (f"URB #{x.id} submit slot {rec.slot} ep {x.endpoint:#04x} "
                f"{x.ep_type.name.lower()} {'in' if x.is_in else 'out'} len {x.length}"
                f"{' setup ' + x.setup.hex(' ') if x.setup else ''}{data}")
    if phase == "done":
        status, actual, shown = e.what[2:]
        data = f" data {shown.hex(' ')}" if shown else ""
        more = "..." if x.is_in and actual > DATA_SHOWN else ""
        return (f"URB #{x.id} done   slot {rec.slot} ep {x.endpoint:#04x} "
                f"{status.name if status is not None else '?'} actual {actual}{data}{more}")
    return f"URB #{x.id} retired slot {rec.slot} ep {x.endpoint:#04x} -> '{cc_name(e.cc or 0)}'"


def _port_text(e: Entry) -> str:
    port, old, new = e.what
    return f"port {port}: PORTSC {old:#010x} -> {new:#010x} {linux.decode_portsc(new).strip()}"


def _state_text(e: Entry) -> str:
    kind, ident, old, new = e.what
    return f"{kind} {ident}: {old or '?'} -> {new}"


def _interrupt_text(e: Entry) -> str:
    return f"interrupt: interrupter {e.what[0]}"


def _log_text(e: Entry) -> str:
    level, message = e.what
    return f"{level}: {message}"


_TEXT: dict[str, Callable[[Entry], str]] = {
    "doorbell": _doorbell_text, "trb": _trb_text, "command": _command_text,
    "event": _event_text, "urb": _urb_text, "port": _port_text, "state": _state_text,
    "interrupt": _interrupt_text, "log": _log_text}


def entry_data(e: Entry, origin_ns: int = 0) -> dict[str, object]:
    """One entry as data: the typed fields, what is particular to its kind, and its text."""
    out: dict[str, object] = {
        "seq": e.seq, "time_ns": e.time_ns, "time_s": (e.time_ns - origin_ns) / 1e9,
        "kind": e.kind, "slot": e.slot, "dci": e.dci, "addr": e.addr, "pointer": e.pointer,
        "cc": e.cc, "cc_name": cc_name(e.cc) if e.cc is not None else None}
    w = e.what                  # empty for a line of the console's own
    if not w:
        out["text"] = e.text
        return out
    if e.kind == "trb":
        out.update(ring=w[0], type=w[1].type, type_name=trb_name(w[1].type),
                   dwords=w[1].dwords)
    elif e.kind == "event":
        event_type = TRB_TYPE.of(w[1][3])
        out.update(interrupter=w[0], type=event_type, type_name=trb_name(event_type),
                   dwords=list(w[1]))
    elif e.kind == "command":
        out.update(type=w[0].type, type_name=trb_name(w[0].type), param=w[1])
    elif e.kind == "doorbell":
        out.update(target=w[1], stream=w[2])
    elif e.kind == "urb":
        rec: TransferRecord = w[1]
        out.update(phase=w[0], urb=rec.xfer.id, endpoint=rec.xfer.endpoint,
                   length=rec.xfer.length, trbs=list(rec.trbs), internal=rec.internal)
        if w[0] == "done":
            out.update(status=w[2].name if w[2] is not None else None, actual=w[3])
    elif e.kind == "port":
        out.update(port=w[0], old=w[1], new=w[2])
    elif e.kind == "state":
        out.update(object=w[0], ident=w[1], old=w[2], new=w[3])
    elif e.kind == "interrupt":
        out.update(interrupter=w[0])
    out["text"] = e.text
    return out


# ---- searching ---------------------------------------------------------------------------------
@dataclass
class Search:
    """What `log` keeps: every condition given must hold."""

    kinds: tuple[str, ...] = ()
    slot: int | None = None
    dci: int | None = None
    trb: int | None = None
    pattern: re.Pattern[str] | None = None

    def matches(self, e: Entry) -> bool:
        if self.kinds and e.kind not in self.kinds:
            return False
        if self.slot is not None and e.slot != self.slot:
            return False
        if self.dci is not None and e.dci != self.dci:
            return False
        if self.trb is not None and not e.concerns(self.trb):
            return False
        return self.pattern is None or self.pattern.search(e.text) is not None


def endpoint_dci(address: int) -> int:
    """The DCI of an endpoint address (0x81 -> 3, 0x02 -> 4; 0 and 0x80 -> 1, ep0)."""
    number = address & 0x0F
    if address & ~0x8F:
        raise ValueError(f"{address:#x} is not an endpoint address (0x00..0x0f, 0x80..0x8f)")
    return 1 if number == 0 else number * 2 + (1 if address & 0x80 else 0)


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip().lower() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"no record kind {', '.join(bad)}; kinds: {', '.join(KINDS)}")
    return kinds


# ---- a TRB's story -----------------------------------------------------------------------------
@dataclass
class Story:
    """What happened to one TRB (the TD it belongs to), oldest first."""

    addr: int
    ring: str | None
    slot: int | None
    dci: int | None
    td: tuple[int, ...]
    steps: list[tuple[str, Entry]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def step(self, role: str) -> Entry | None:
        return next((e for r, e in self.steps if r == role), None)

    @property
    def urb(self) -> TransferRecord | None:
        e = self.step("submit") or self.step("done") or self.step("retired")
        return e.transfer if e is not None else None

    @property
    def outcome(self) -> str:
        """Where the TD stands: retired, completed (not retired yet), submitted, fetched."""
        if self.ring == "cmd":
            cmd = self.step("command")
            return f"completed '{cc_name(cmd.cc or 0)}'" if cmd else "fetched, not completed"
        if (e := self.step("retired")) is not None:
            return f"retired '{cc_name(e.cc or 0)}'"
        events = [e for r, e in self.steps if r == "event"]
        if self.step("done") is not None:
            return "completed by the device, not retired yet"
        if self.step("submit") is not None:
            return "submitted; the device has not completed it"
        if events:
            return f"event posted '{cc_name(events[-1].cc or 0)}' (no URB: nothing to transfer)"
        return "fetched; no URB (the TD is not complete yet, or it had nothing to transfer)"


def _is_fetch_on(e: Entry, ring: str) -> bool:
    return e.kind == "trb" and e.addr is not None and e.what[0] == ring


def _chained_td(entries: Sequence[Entry], i: int, ring: str) -> tuple[int, ...]:
    """Without an URB to say which TRBs made the TD: the fetches around entry `i` joined by
    their chain bits (Link TRBs in between are skipped)."""
    before: list[int] = []
    for j in range(i - 1, -1, -1):
        e = entries[j]
        if not _is_fetch_on(e, ring) or e.what[1].type == TrbType.LINK:
            continue
        if not e.what[1].control & _CHAIN:
            break
        before.append(e.addr or 0)
    td = [*reversed(before), entries[i].addr or 0]
    last: Trb = entries[i].what[1]
    for j in range(i + 1, len(entries)):
        e = entries[j]
        if not last.control & _CHAIN:
            break
        if not _is_fetch_on(e, ring) or e.what[1].type == TrbType.LINK:
            continue
        td.append(e.addr or 0)
        last = e.what[1]
    return tuple(td)


def _story(entries: Sequence[Entry], i: int, end: int) -> Story:
    """The story of the TRB fetched by `entries[i]`, looking no further than `end` (where the
    same address is fetched again)."""
    fetch = entries[i]
    addr = fetch.addr or 0
    ring: str = fetch.what[0]
    slot, dci = fetch.slot, fetch.dci
    story = Story(addr, ring, slot, dci, (addr,))
    submit = None
    if ring != "cmd":
        submit = next((e for e in itertools.islice(entries, i + 1, end)
                       if e.kind == "urb" and e.phase == "submit" and e.slot == slot
                       and e.dci == dci and addr in (e.transfer.trbs if e.transfer else ())),
                      None)
        story.td = submit.transfer.trbs if submit and submit.transfer else _chained_td(
            entries, i, ring)
    td = set(story.td)
    first = i
    for j in range(i - 1, -1, -1):          # where the TD's first TRB was fetched
        e = entries[j]
        if not _is_fetch_on(e, ring) or e.what[1].type == TrbType.LINK:
            continue
        if e.addr not in td or e.addr == addr:
            break
        first = j
    for j in range(first - 1, -1, -1):      # the doorbell that set the ring going
        e = entries[j]
        if e.kind == "doorbell" and (e.slot, e.dci) == ((None, None) if ring == "cmd"
                                                       else (slot, dci)):
            story.steps.append(("doorbell", e))
            break
    else:
        story.notes.append("no doorbell for this ring is recorded before its fetch (it is "
                           "older than the log, or the ring was already running)")
    urb = submit.transfer if submit is not None else None
    interrupter: int | None = None
    for j in range(first, end):
        e = entries[j]
        kind = e.kind
        if kind == "trb":
            if _is_fetch_on(e, ring) and e.addr in td:
                story.steps.append(("fetch", e))
        elif kind == "urb":
            if urb is not None and e.transfer is urb:
                story.steps.append((e.phase or "urb", e))
        elif kind == "command":
            if ring == "cmd" and e.addr == addr:
                story.steps.append(("command", e))
        elif kind == "event":
            if e.pointer in td and (e.dci == dci and e.slot == slot if ring != "cmd"
                                    else e.dci is None):
                story.steps.append(("event", e))
                interrupter = e.what[0]
        elif kind == "interrupt" and interrupter is not None and e.what[:1] == (interrupter,):
            story.steps.append(("interrupt", e))
            interrupter = None
    return story


def stories(entries: Sequence[Entry], addr: int, every: bool = False) -> list[Story]:
    """The story of the TRB at `addr`: the latest time it was fetched, or (`every`) each."""
    fetches = [i for i, e in enumerate(entries) if e.kind == "trb" and e.addr == addr
               and e.what[1].type != TrbType.LINK]
    if not fetches:
        events = [e for e in entries if e.kind == "event" and e.pointer == addr]
        if not events:
            return []
        story = Story(addr, None, events[-1].slot, events[-1].dci, (addr,),
                      [("event", e) for e in (events if every else events[-1:])])
        story.notes.append("its fetch is older than the log: only the events pointing at it "
                           "are left")
        return [story]
    picks = fetches if every else fetches[-1:]
    out = []
    for i in picks:
        ring = entries[i].what[0]
        end = next((j for j in fetches if j > i and _is_fetch_on(entries[j], ring)),
                   len(entries))
        out.append(_story(entries, i, end))
    return out


def _device_name(con: Console, slot: int | None) -> str:
    s = con.controller.slots.get(slot) if slot else None
    if s is None or s.port is None:
        return ""
    dev = con.session.devices.get(s.port.number)
    return dev.name if dev is not None else ""


def _story_title(con: Console, story: Story) -> str:
    where = ("the command ring" if story.ring == "cmd" else
             f"ring {story.ring}" if story.ring else
             f"slot {story.slot} DCI {story.dci}")
    if story.slot and story.dci:
        name = _device_name(con, story.slot)
        where += f" (slot {story.slot} {name + ', ' if name else ''}{render.ep_name(story.dci)})"
    fetched = next((e for r, e in story.steps if r == "fetch" and e.addr == story.addr), None)
    what = trb_name(fetched.what[1].type) if fetched is not None else "TRB"
    parts = [f"{what} @{story.addr:#x} on {where}"]
    if story.ring and story.ring != "cmd":
        parts.append(f"TD of {len(story.td)} TRB(s)")
    urb = story.urb
    if urb is not None:
        parts.append(f"URB #{urb.xfer.id}")
    parts.append(story.outcome)
    return ", ".join(parts)


def story_data(con: Console, story: Story, origin_ns: int) -> dict[str, object]:
    urb = story.urb
    retired = story.step("retired") or story.step("command")
    return {"trb": story.addr, "ring": story.ring, "slot": story.slot, "dci": story.dci,
            "device": _device_name(con, story.slot) or None, "td": list(story.td),
            "urb": urb.xfer.id if urb is not None else None, "outcome": story.outcome,
            "cc": retired.cc if retired is not None else None,
            "steps": [{"role": role, **entry_data(e, origin_ns)} for role, e in story.steps],
            "notes": list(story.notes)}


def _show_story(con: Console, story: Story, origin_ns: int) -> None:
    con.out.print(Text(_story_title(con, story), style="bold"))
    start = story.steps[0][1].time_ns if story.steps else 0
    for role, e in story.steps:
        con.out.print(Text(f"{e.seq:7} {(e.time_ns - origin_ns) / 1e9:12.6f} "
                           f"{(e.time_ns - start) / 1e6:+11.3f}ms  {role:<9} {e.text}"))
    for note in story.notes:
        con.out.print(Text(f"  ({note})", style="dim"))


# ==== log ========================================================================================
p = parser("log", "What the controller announced: doorbells, TRBs, URBs, events, ports...\n"
                  "Conditions narrow it (all must hold); records are kept as they were\n"
                  f"announced (the last {MAX_ENTRIES}), each with its time in seconds.",
           """log                            # the last 30 records
              log -n 100 urb                 # the last 100 URB records
              log --slot 1 --kind event      # slot 1's events
              log --slot 1 --dci 3           # everything about slot 1's ep1in (DCI 3)
              log --slot 1 --ep 0x81         # the same, by endpoint address
              log --kind urb,event -g Stall  # URBs and events whose text matches /Stall/
              log -g 'Address Device'        # a regular expression over each record's text
              log --trb 0x17110              # the fetch, URB and event of the TRB at 0x17110
              log --slot 3 --json            # as data: seq, time, slot, dci, addr, cc...""")
p.add_argument("kind", nargs="?", help="only records of this kind (or kinds, comma-separated): "
                                       + ", ".join(KINDS))
p.add_argument("-k", "--kind", dest="kinds", metavar="KIND[,KIND]", help="the same as KIND")
p.add_argument("-s", "--slot", type=int, help="only records about this slot")
p.add_argument("--dci", type=int, help="only records about this endpoint DCI (1 = ep0, 3 = "
                                       "ep1in...)")
p.add_argument("--ep", type=lambda s: int(s, 0), metavar="ADDRESS",
               help="only records about this endpoint address (0x81...)")
p.add_argument("-t", "--trb", type=lambda s: int(s, 0), metavar="ADDRESS",
               help="only records about the TRB at this guest address")
p.add_argument("-g", "--grep", metavar="REGEX", help="only records whose text matches (Python "
                                                      "regular expression, case-insensitive)")
p.add_argument("-n", "--count", type=int, default=30, help="show the last N (default 30)")


def _log_complete(con: Console, words: list[str]) -> list[str]:
    """Record kinds where a kind goes: after --kind, or as the positional."""
    before = words[-2] if len(words) >= 2 else ""
    if before in ("-k", "--kind"):
        return list(KINDS)
    if before.startswith("-") and before not in ("--json", "-h", "--help"):
        return []                              # another option's value
    return [] if any(w in KINDS for w in words[:-1]) else list(KINDS)


@command(p, INSPECT, complete=_log_complete)
def log(con: Console, args: Namespace) -> None:
    history = history_of(con)
    kinds = _kinds(",".join(k for k in (args.kind, args.kinds) if k))
    dci = args.dci
    if args.ep is not None:
        by_ep = endpoint_dci(args.ep)
        if dci is not None and dci != by_ep:
            raise ValueError(f"--dci {dci} and --ep {args.ep:#04x} (DCI {by_ep}) disagree")
        dci = by_ep
    try:
        pattern = re.compile(args.grep, re.IGNORECASE) if args.grep else None
    except re.error as error:
        raise ValueError(f"-g {args.grep!r}: {error}") from None
    search = Search(kinds, args.slot, dci, args.trb, pattern)
    count = max(1, args.count)
    found: deque[Entry] = deque(maxlen=count)
    found.extend(e for e in history.records if search.matches(e))
    origin = history.origin_ns
    for e in found:
        con.out.print(Text(f"{e.seq:7} {(e.time_ns - origin) / 1e9:12.6f} {e.text}"))
    if not found:
        con.out.print("nothing recorded yet" if not history.records else
                      "no record matches")
    con.data([entry_data(e, origin) for e in found])


# ==== history ====================================================================================
p = parser("history", "The story of a transfer or command TRB, in order with times: the\n"
                      "doorbell that set its ring going, its fetch (and the other TRBs of its\n"
                      "TD), the URB the device got and its completion, and the event that\n"
                      "retired it (its TRB Pointer names the TRB or the last TRB of its TD).\n"
                      "Columns: seq, time (s), time since the first step, step, record.",
           """history 0x17110                # the latest TD that used the TRB at 0x17110
              why 0x17110                    # the same
              history 0x17110 --all          # every time that TRB was fetched (rings wrap)
              history 0x10020                # a command: doorbell 0, fetch, completion event
              history 0x17110 --json         # as data: td, urb, outcome, steps""")
p.add_argument("address", type=lambda s: int(s, 0), help="the TRB's guest address (0x...)")
p.add_argument("-a", "--all", action="store_true", help="every time the TRB was fetched, not "
                                                        "only the latest")


def recent_trbs(history: History, limit: int = 40) -> list[str]:
    """TRB addresses worth asking about: the latest fetched, newest first."""
    seen: dict[str, None] = {}
    for e in reversed(history.records):
        if e.kind == "trb" and e.addr is not None:
            seen.setdefault(f"{e.addr:#x}")
            if len(seen) >= limit:
                break
    return list(seen)


def _history_complete(con: Console, words: list[str]) -> list[str]:
    return recent_trbs(history_of(con)) if len(words) <= 1 else []


@command(p, INSPECT, aliases=("why",), complete=_history_complete)
def history(con: Console, args: Namespace) -> None:
    hist = history_of(con)
    entries = list(hist.records)
    found = stories(entries, args.address, args.all)
    if not found:
        oldest = f" (it holds records #{entries[0].seq}..#{entries[-1].seq})" if entries else ""
        raise LookupError(f"nothing recorded about a TRB at {args.address:#x}: it was not "
                          f"fetched and no event points at it{oldest}")
    for n, story in enumerate(found):
        if n:
            con.out.print()
        _show_story(con, story, hist.origin_ns)
    con.data({"address": args.address,
              "stories": [story_data(con, s, hist.origin_ns) for s in found]})


def history_of(con: Console) -> History:
    h = con.activity
    if not isinstance(h, History):
        raise RuntimeError("this console keeps no structured history")
    return h


__all__ = ["KINDS", "Entry", "History", "Search", "Story", "endpoint_dci", "entry_data",
           "recent_trbs", "stories"]
