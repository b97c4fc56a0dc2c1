"""The fault engine: rules (xhcidbg.faults.rules) applied to a running controller.

It attaches to the controller's hooks ahead of every other observer (the tracer then records the
faulted values) and changes only what the mutable announcements let an observer change, or calls
the controller's public methods a real failure would trigger (a Host System Error, an unplug).
The controller does not know it is there.

Every injection is one `Injection` (rule, match count, seed, where, original and injected values),
kept in `engine.log`, told to `listeners` (the console, the tracer's packet comments) and written
as JSON lines by `write_log`.  Probabilities draw from one `random.Random(seed)`, and only when a
match passed every other test, so the same scenario, seed and guest behaviour inject the same
faults; `replay_rules` turns a log back into a scenario that injects exactly those.
"""
from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..conditions import type_matches
from ..devices.base import Status, UsbDevice
from ..devices.descriptors import descriptor_fields
from ..emu import events, regs
from ..emu.hooks import (
    CommandResult,
    CommandStart,
    EventRecord,
    InterruptSignal,
    MmioAccess,
    TransferRecord,
)
from ..emu.memory import DmaError
from ..emu.regs import USBCMD, USBSTS
from ..emu.slots import endpoint_address
from ..emu.trb import (
    CC,
    COMPLETION_CODE,
    EP_ID,
    SLOT_ID,
    TRB_TYPE,
    TrbType,
    cc_name,
    layout_of,
    trb_name,
)
from . import rules as R
from .rules import Action, Rule, RuleError, parse_ms

if TYPE_CHECKING:
    from ..emu.controller import XhciController

_SETUP = struct.Struct("<BBHHH")
_CA_CS = 0x6                                 # CRCR Command Abort | Command Stop
_HCRST = USBCMD.mask("hcrst")
_CNR = USBSTS.mask("cnr")
_PR, _WPR = regs.PORTSC.mask("pr"), regs.PORTSC.mask("wpr")
_REGISTERS = {r.name: r for r in vars(regs).values() if isinstance(r, regs.Register)}
_ENDPOINT_COMMANDS = {TrbType.RESET_ENDPOINT, TrbType.STOP_ENDPOINT, TrbType.SET_TR_DEQUEUE}


@dataclass
class Injection:
    """One fault injected: what a log line holds."""

    rule: int
    name: str
    definition: str
    match: int                      # the rule's WHERE match this was (replay pins it: nth=)
    eligible: int                   # ...and the one its WHEN let through: draws follow these,
                                    # so it repeats where `match` counts differing early traffic
    seed: int
    t_ms: float                     # since the engine started
    action: str
    where: dict[str, Any] = field(default_factory=dict)      # slot, ep, TRB/command address...
    original: dict[str, Any] = field(default_factory=dict)
    injected: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        label = f"#{self.rule}" + (f" {self.name}" if self.name else "")
        where = " ".join(f"{k}={_show(v)}" for k, v in self.where.items())
        orig = ", ".join(f"{k} {_show(v)}" for k, v in self.original.items())
        new = ", ".join(f"{k} {_show(v)}" for k, v in self.injected.items())
        change = f": {orig} -> {new}" if orig or new else ""
        return f"fault {label} ({self.action}, match {self.match}) {where}{change}"

    def json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _show(v: Any) -> str:
    return f"{v:#x}" if isinstance(v, int) and v > 255 else str(v)


@dataclass
class Expectation:
    """A rule fired with `expect ...`: did the guest react so (in time)?"""

    rule: Rule
    fired_ms: float
    step: int = 0                   # the next step to see
    status: str = "pending"         # pending, met, failed
    seen: list[str] = field(default_factory=list)   # "name @t ms" per step seen
    why: str = ""

    def text(self) -> str:
        assert self.rule.expect is not None
        head = f"#{self.rule.number} expect {self.rule.expect} (fired at {self.fired_ms:.1f} ms)"
        got = "; ".join(self.seen) or "nothing yet"
        return f"{head}: {self.status.upper()}: {got}{' -- ' + self.why if self.why else ''}"

    def data(self) -> dict[str, Any]:
        return {"rule": self.rule.number, "expect": str(self.rule.expect),
                "fired_ms": self.fired_ms, "status": self.status, "seen": self.seen,
                "why": self.why}


class _Listener:
    def __init__(self, name: str, fn: Callable[..., None]):
        setattr(self, f"on_{name}", fn)


class FaultEngine:
    """Rules, their counters and state machines, the seeded RNG and the injection log."""

    def __init__(self, controller: XhciController, seed: int | None = None):
        self.controller = controller
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        self.rng = random.Random(self.seed)
        self.rules: list[Rule] = []
        self.log: list[Injection] = []
        self.listeners: list[Callable[[Injection], None]] = []
        self.states: dict[str, str] = {}
        self.fired_rules: set[str] = set()
        self._numbers = 0
        self._t0 = controller.scheduler.now_ns()
        self._attached: dict[str, _Listener] = {}
        self._last_command: int | None = None
        self._command_cc: dict[int, tuple[Rule, int, int]] = {}   # TRB addr -> rule, cc, match
        self._ignore_abort = 0
        self._all_ones = False
        self._cnr_until: float | None = None     # ms since start; inf: for ever
        self._cnr_armed: float | None = None
        self._unplugged: dict[int, UsbDevice] = {}
        self._last_unplugged: int | None = None
        self._replaying: set[int] = set()        # ids of events we post again ourselves
        self._held: dict[int, list[list[Any]]] = {}   # interrupter -> [dwords, timer] reordered
        self._timers: list[Any] = []
        self.expectations: list[Expectation] = []
        self.expect_listeners: list[Callable[[Expectation], None]] = []   # met or failed

    # ---- rules ---------------------------------------------------------------------------------
    def add(self, text: str | Rule, source: str = "", lineno: int = 1) -> Rule:
        """Add one rule (its text, as in the console and scenario files).  Raises RuleError."""
        rule = text if isinstance(text, Rule) else R.parse_rule(text, lineno, source)
        if rule is None:
            raise RuleError("an empty rule", lineno, 1, source)
        self._numbers += 1
        rule.number = self._numbers
        self.rules.append(rule)
        if rule.kind == "time":
            self._arm_time(rule)
        self._sync()
        return rule

    def load(self, text: str, source: str = "") -> list[Rule]:
        """A scenario: rules, comments, `seed N` lines.  A JSON-lines injection log is a
        scenario too: it replays as the rules that inject exactly what it recorded.  Nothing
        is added if any line is bad."""
        if text.lstrip().startswith("{"):
            text = replay_rules(text)
        parsed: list[Rule] = []
        for n, line in enumerate(text.splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if words and words[0].lower() == "seed":
                if len(words) != 2 or not words[1].isdigit():
                    raise RuleError("expected `seed N` (a whole number)", n, 1, source)
                self.reseed(int(words[1]))
                continue
            rule = R.parse_rule(line, n, source)
            if rule is not None:
                parsed.append(rule)
        return [self.add(r) for r in parsed]

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)

    def get(self, ref: int | str) -> Rule:
        for r in self.rules:
            if str(r.number) == str(ref).lstrip("#") or (r.name and r.name == ref):
                return r
        raise ValueError(f"no fault rule {ref!r} (`fault list` shows them)")

    def delete(self, ref: int | str | None = None) -> int:
        gone = list(self.rules) if ref is None else [self.get(ref)]
        self.rules = [r for r in self.rules if r not in gone]
        self._sync()
        return len(gone)

    def set_enabled(self, ref: int | str, on: bool) -> Rule:
        r = self.get(ref)
        r.enabled = on
        self._sync()
        return r

    # ---- attaching -----------------------------------------------------------------------------
    def attach(self) -> FaultEngine:
        self._sync()
        return self

    def detach(self) -> None:
        hooks = self.controller.hooks
        for listener in self._attached.values():
            hooks.detach(listener)
        self._attached.clear()
        for t in self._timers:
            t.cancel()
        self._timers.clear()

    def _wanted(self) -> set[str]:
        want = set()
        for r in self.rules:
            if not r.enabled:
                continue
            if r.kind == "urb":
                want.add("urb_submit" if r.phase == "submit" else "urb_complete")
            elif r.kind == "command":
                want |= {"command_start", "command"}
            elif r.kind == "event":
                want.add("event")
            elif r.kind in ("doorbell", "mmio", "port", "interrupt"):
                want.add(r.kind)
        if self._ignore_abort or self._all_ones or self._cnr_armed is not None \
                or self._cnr_until is not None:
            want.add("mmio")
        if self._all_ones:
            want.add("event")
        if self._command_cc:
            want.add("command")
        pending = self._pending_steps()
        if pending - {"hcrst", "port-reset"}:
            want.add("command_start")
        if pending & {"hcrst", "port-reset"}:
            want.add("mmio")
        return want

    def _sync(self) -> None:
        """Attach a listener for each announcement some rule or effect needs, no other: an
        MMIO access nobody faults must cost nothing."""
        hooks = self.controller.hooks
        want = self._wanted()
        for name in want - set(self._attached):
            self._attached[name] = hooks.attach(_Listener(name, getattr(self, f"_on_{name}")),
                                                first=True)
        for name in set(self._attached) - want:
            hooks.detach(self._attached.pop(name))

    # ---- deciding ------------------------------------------------------------------------------
    def now_ms(self) -> float:
        return (self.controller.scheduler.now_ns() - self._t0) / 1e6

    def _machine(self, ref: str) -> tuple[str, str]:
        machine, _, state = ref.rpartition(".")
        return machine or "main", state

    def _fires(self, rule: Rule) -> bool:
        """`rule`'s WHERE matched: count it, and say whether its WHEN lets it fire."""
        rule.seen += 1
        w = rule.when
        if "state" in w:
            machine, state = self._machine(w["state"])
            if self.states.get(machine, "init") != state:
                return False
        now = self.now_ms()
        if "after" in w and now < parse_ms(w["after"]):
            return False
        if "before" in w and now >= parse_ms(w["before"]):
            return False
        if "after_rule" in w and w["after_rule"] not in self.fired_rules:
            return False
        rule.eligible += 1
        n = rule.eligible - int(w.get("skip", "0"), 0)
        if n < 1:
            return False
        if "nth" in w and n != int(w["nth"], 0):
            return False
        if "every" in w and n % int(w["every"], 0):
            return False
        if "times" in w and rule.fired >= int(w["times"], 0):
            return False
        if "probability" in w and self.rng.random() >= float(w["probability"]):
            return False
        rule.fired += 1
        if "new_state" in w:
            machine, state = self._machine(w["new_state"])
            self.states[machine] = state
        self.fired_rules.add(rule.name or str(rule.number))
        if rule.expect is not None:
            self._expect(rule, now)
        return True

    # ---- expectations --------------------------------------------------------------------------
    def _expect(self, rule: Rule, now: float) -> None:
        exp = Expectation(rule, round(now, 3))
        self.expectations.append(exp)
        within = rule.expect.within_ms if rule.expect is not None else None
        if within is not None:
            def due() -> None:
                if exp.status == "pending":
                    exp.status = "failed"
                    exp.why = f"not within {within:g} ms"
                    self._decided(exp)
            self._timers.append(self.controller.scheduler.call_later(int(within * 1e6), due))
        # at once: the guest may react within this very announcement's doorbell.  Safe during
        # an announcement: it only adds listeners, to announcements other than this one
        self._sync()

    def _reacted(self, name: str, facts: dict[str, Any], matches: Callable[[str], bool]) -> None:
        """The guest did something an expectation may wait for."""
        for exp in self.expectations:
            if exp.status != "pending" or exp.rule.expect is None:
                continue
            step = exp.rule.expect.steps[exp.step]
            if matches(step.name) and all(c.holds(facts) for c in step.conditions):
                exp.seen.append(f"{name} @{self.now_ms():.1f} ms")
                exp.step += 1
                if exp.step == len(exp.rule.expect.steps):
                    exp.status = "met"
                    self._decided(exp)

    def _decided(self, exp: Expectation) -> None:
        for fn in self.expect_listeners:
            fn(exp)
        self.controller.scheduler.call_soon(self._sync)

    def _pending_steps(self) -> set[str]:
        return {e.rule.expect.steps[e.step].name for e in self.expectations
                if e.status == "pending" and e.rule.expect is not None}

    def _matching(self, kind: str, facts: dict[str, Any]) -> list[Rule]:
        """The rules that fire at this announcement.  Every rule decides on the states as they
        were before it: a state a rule moves to counts from the next announcement on."""
        out = []
        before = dict(self.states)
        moved: dict[str, str] = {}
        for r in self.rules:
            if r.enabled and r.kind == kind and (kind != "urb" or r.phase == facts["phase"]) \
                    and all(c.holds(facts) for c in r.conditions):
                self.states = dict(before)
                if self._fires(r):
                    out.append(r)
                    moved |= {k: v for k, v in self.states.items() if before.get(k) != v}
        self.states = before | moved
        return out

    def _record(self, rule: Rule, action: str, where: dict[str, Any],
                original: dict[str, Any] | None = None,
                injected: dict[str, Any] | None = None) -> Injection:
        inj = Injection(rule.number, rule.name, rule.definition(), rule.seen, rule.eligible,
                        self.seed, round(self.now_ms(), 3), action, where, original or {},
                        injected or {})
        self.log.append(inj)
        for fn in self.listeners:
            fn(inj)
        return inj

    # ---- transfers -----------------------------------------------------------------------------
    def _urb_facts(self, rec: TransferRecord, phase: str) -> dict[str, Any]:
        x = rec.xfer
        dev = self._device(rec.port)
        facts: dict[str, Any] = {
            "slot": rec.slot, "dci": rec.dci, "ep": x.endpoint if not x.setup else 0,
            "dir": "in" if x.is_in else "out", "length": x.length, "stream": x.stream,
            "port": rec.port, "device": dev.name if dev is not None else None, "phase": phase}
        if rec.trbs:
            try:
                control = int.from_bytes(self.controller.mem.peek(rec.trbs[0] + 12, 4), "little")
                facts["type"] = TRB_TYPE.of(control)
            except DmaError:
                facts["type"] = None
        if x.setup:
            rt, req, value, index, _ = _SETUP.unpack(bytes(x.setup[:8]))
            facts.update(request_type=rt, request=req, value=value, index=index)
        return facts

    def _device(self, port: int) -> UsbDevice | None:
        p = self.controller.port(port) if port else None
        return p.device if p is not None else None

    def _on_urb_submit(self, rec: TransferRecord) -> None:
        for rule in self._matching("urb", self._urb_facts(rec, "submit")):
            where = self._urb_where(rec)
            for action in rule.actions:
                self._global(rule, action, where, port=rec.port)

    def _urb_where(self, rec: TransferRecord) -> dict[str, Any]:
        where: dict[str, Any] = {"slot": rec.slot, "ep": rec.xfer.endpoint, "urb": rec.xfer.id}
        if rec.trbs:
            where["trb"] = rec.trbs[0]
        return where

    def _on_urb_complete(self, rec: TransferRecord) -> None:
        for rule in self._matching("urb", self._urb_facts(rec, "done")):
            where = self._urb_where(rec)
            for action in rule.actions:
                if not self._transfer_action(rule, action, rec, where):
                    self._global(rule, action, where, port=rec.port)

    def _transfer_action(self, rule: Rule, action: Action, rec: TransferRecord,
                         where: dict[str, Any]) -> bool:
        x = rec.xfer
        a, args = action.name, action.args
        original = {"status": x.status.name if x.status is not None else None,
                    "actual": x.actual}
        if a == "cc":
            cc = int(args["code"])
            rec.force_cc = cc
            if "residue" in args:
                rec.force_residue = int(args["residue"], 0)
            if "state" in args:
                rec.force_state = args["state"].lower()
            injected: dict[str, Any] = {"cc": f"{cc} ({R.cc_label(cc)})"}
            if rec.force_residue is not None:
                injected["residue"] = rec.force_residue
            if rec.force_state:
                injected["state"] = rec.force_state
            if cc in (4, 3, 6) and x.status == Status.OK:       # the bus outcome follows
                x.status = {6: Status.STALL, 3: Status.BABBLE, 4: Status.XACT_ERROR}[cc]
            self._record(rule, "cc", where, original, injected)
        elif a == "short":
            n = min(int(args["length"], 0), x.actual)
            x.actual = n
            if not x.in_place:
                x.result = bytes(x.result[:n])
            self._record(rule, "short", where, original, {"actual": n})
        elif a == "corrupt":
            self._corrupt(rule, action, rec, where)
        elif a == "delay":
            ms = parse_ms(args["ms"])
            rec.delay_ns = int(ms * 1e6)
            self._record(rule, "delay", where, {}, {"delay_ms": ms})
        elif a == "withhold":
            rec.withhold = True
            self._record(rule, "withhold", where, original, {"completion": "never"})
        else:
            return False
        return True

    def _corrupt(self, rule: Rule, action: Action, rec: TransferRecord,
                 where: dict[str, Any]) -> None:
        x = rec.xfer
        if not x.is_in or x.actual == 0:
            self._record(rule, "corrupt", where, {"actual": x.actual},
                         {"note": "nothing to corrupt (not IN data)"})
            return
        data = bytearray(x.in_data())
        changes: list[tuple[int, int, int]] = []
        if "field" in action.args:
            located = self._descriptor_field(data, action.args)
            if isinstance(located, str):
                self._record(rule, "corrupt", where, {"actual": x.actual}, {"note": located})
                return
            kind, name, off, size = located
            value = int(action.args["value"], 0) & ((1 << (8 * size)) - 1)
            old_value = int.from_bytes(data[off:off + size], "little")
            data[off:off + size] = value.to_bytes(size, "little")
            changes.extend((off + i, (old_value >> 8 * i) & 0xFF, data[off + i])
                           for i in range(size))
            where = where | {"field": f"{kind}.{name}"}
        elif "bits" in action.args:
            for _ in range(int(action.args["bits"], 0)):
                bit = self.rng.randrange(len(data) * 8)
                old = data[bit // 8]
                data[bit // 8] ^= 1 << (bit % 8)
                changes.append((bit // 8, old, data[bit // 8]))
        else:
            off = int(action.args["offset"], 0)
            if off >= len(data):
                self._record(rule, "corrupt", where, {"actual": x.actual},
                             {"note": f"offset {off} is past the {len(data)} bytes delivered"})
                return
            old = data[off]
            data[off] = int(action.args.get("value", str(old ^ 0xFF)), 0) & 0xFF
            changes.append((off, old, data[off]))
        if x.in_place:
            pos = 0
            for view in x.in_buffers() or ():
                n = min(len(view), len(data) - pos)
                view[:n] = data[pos:pos + n]
                pos += n
                if pos >= len(data):
                    break
        else:
            x.result = bytes(data)
        self._record(rule, "corrupt", where,
                     {"bytes": [f"{o}:{a:#04x}" for o, a, _ in changes]},
                     {"bytes": [f"{o}:{b:#04x}" for o, _, b in changes]})

    @staticmethod
    def _descriptor_field(data: bytes | bytearray, args: dict[str, str]
                          ) -> tuple[str, str, int, int] | str:
        """The field `field=[TYPE.]NAME` (its `occurrence`-th) in the descriptors being
        delivered, or why there is none."""
        kind, _, name = args["field"].rpartition(".")
        want = int(args.get("occurrence", "1"), 0)
        found = [f for f in descriptor_fields(data)
                 if f[1].lower() == name.lower() and (not kind or f[0] == kind.upper())]
        if len(found) < want:
            return (f"no {args['field']} (occurrence {want}) in the {len(data)} bytes "
                    f"delivered ({len(found)} found)")
        return found[want - 1]

    # ---- commands ------------------------------------------------------------------------------
    def _on_command_start(self, start: CommandStart) -> None:
        trb = start.trb
        if trb.addr == self._last_command:
            return                   # announced again (a paused gate): it was decided already
        self._last_command = trb.addr
        t = trb.type
        slot = SLOT_ID.of(trb.control)
        facts: dict[str, Any] = {"type": t, "slot": slot,
                 "dci": EP_ID.of(trb.control) if t in _ENDPOINT_COMMANDS else None}
        if self.expectations:
            layout = layout_of(t)
            fields = {k: layout.get(trb.dwords, k) for k in ("tsp", "sp", "bsr")
                      if k in layout.by_name}
            self._reacted(trb_name(t), facts | fields,
                          lambda step: step not in ("hcrst", "port-reset")
                          and type_matches(step, t))
        for rule in self._matching("command", facts):
            where = {"command": trb_name(t), "trb": trb.addr, "slot": slot}
            for action in rule.actions:
                if action.name == "withhold":
                    start.withhold = True
                    self._record(rule, "withhold", where, {}, {"completion": "never"})
                elif action.name == "cc":
                    self._command_cc[trb.addr] = (rule, int(action.args["code"]), rule.seen)
                elif action.name == "ignore-abort":
                    self._ignore_abort += 1
                    self._record(rule, "ignore-abort", where, {}, {"abort": "ignored"})
                else:
                    self._global(rule, action, where, port=self._slot_port(slot))
        self._sync()

    def _slot_port(self, slot: int) -> int:
        s = self.controller.slots.get(slot)
        return s.port.number if s is not None and s.port is not None else 0

    def _on_command(self, result: CommandResult) -> None:
        if result.trb.addr == self._last_command:
            self._last_command = None
        pending = self._command_cc.pop(result.trb.addr, None)
        if pending is None:
            return
        rule, cc, _ = pending
        original = {"cc": f"{int(result.cc)} ({cc_name(result.cc)})"}
        result.cc = cc
        result.note = f"fault #{rule.number}: completion code {cc}"
        self._record(rule, "cc", {"command": trb_name(result.trb.type), "trb": result.trb.addr},
                     original, {"cc": f"{cc} ({R.cc_label(cc)})"})
        if not self._command_cc:
            self.controller.scheduler.call_soon(self._sync)

    # ---- events, doorbells, registers, ports -------------------------------------------------
    def _on_event(self, ev: EventRecord) -> None:
        if self._all_ones:
            ev.drop = True
            return
        if id(ev) in self._replaying:
            self._replaying.discard(id(ev))
            return
        held = self._held.get(ev.interrupter)
        if held:                       # events held back to be written after this one
            self._held[ev.interrupter] = []
            for dwords, timer in held:
                timer.cancel()
                self._post_later(ev.interrupter, dwords, 0)
        dw = ev.dwords
        slot, dci, etype = SLOT_ID.of(dw[3]), EP_ID.of(dw[3]), TRB_TYPE.of(dw[3])
        facts = {"type": etype, "cc": COMPLETION_CODE.of(dw[2]), "slot": slot,
                 "dci": dci, "ep": endpoint_address(dci) if dci else None,
                 "interrupter": ev.interrupter}
        for rule in self._matching("event", facts):
            where = {"event": trb_name(etype), "slot": slot, "dci": dci}
            for action in rule.actions:
                if action.name == "drop":
                    ev.drop = True
                    ev.note = f"fault #{rule.number}: dropped"
                    self._record(rule, "drop", where, {"event": "posted"}, {"event": "dropped"})
                elif action.name == "duplicate":
                    self._post_later(ev.interrupter, ev.dwords, 0)
                    self._record(rule, "duplicate", where, {"copies": 1}, {"copies": 2})
                elif action.name == "delay":
                    ms = parse_ms(action.args["ms"])
                    ev.drop = True
                    self._post_later(ev.interrupter, ev.dwords, int(ms * 1e6))
                    self._record(rule, "delay", where, {}, {"delay_ms": ms})
                elif action.name == "reorder":
                    ev.drop = True
                    self._hold(ev, parse_ms(action.args.get("ms", "100")))
                    self._record(rule, "reorder", where, {"order": "as generated"},
                                 {"order": "after the next event"})
                elif action.name == "event-lost":
                    ev.drop = True
                    ev.note = f"fault #{rule.number}: lost"
                    self._controller_event(rule, CC.EVENT_LOST, ev.interrupter, where)
                else:
                    self._global(rule, action, where)

    def _post_later(self, interrupter: int, dwords: list[int], delay_ns: int) -> Any:
        """Write the event `dwords` ourselves after `delay_ns` (0: once this announcement is
        over); returns the timer."""
        dwords = list(dwords)

        def post() -> None:
            c = self.controller
            if c.running:
                again = EventRecord(interrupter, list(dwords), note="fault: posted again")
                self._replaying.add(id(again))
                c.interrupters[interrupter].post(again)
        timer = self.controller.scheduler.call_later(delay_ns, post)
        self._timers.append(timer)
        return timer

    def _hold(self, ev: EventRecord, ms: float) -> None:
        """Keep `ev` back until the next event of its interrupter is written (or `ms`)."""
        held = self._held.setdefault(ev.interrupter, [])
        entry: list[Any] = [list(ev.dwords), None]

        def timed_out() -> None:
            if entry in held:
                held.remove(entry)
                self._post_later(ev.interrupter, entry[0], 0)
        entry[1] = self.controller.scheduler.call_later(int(ms * 1e6), timed_out)
        self._timers.append(entry[1])
        held.append(entry)

    def _on_doorbell(self, slot: int, target: int, stream: int) -> None:
        for rule in self._matching("doorbell", {"slot": slot, "target": target,
                                                "stream": stream}):
            for action in rule.actions:
                self._global(rule, action, {"doorbell": slot, "target": target},
                             port=self._slot_port(slot))

    def _on_port(self, port: int, old: int, new: int) -> None:
        for rule in self._matching("port", {"port": port}):
            for action in rule.actions:
                self._global(rule, action, {"port": port, "portsc": new}, port=port)

    def _on_interrupt(self, sig: InterruptSignal) -> None:
        where = {"interrupter": sig.interrupter}
        for rule in self._matching("interrupt", where):
            for action in rule.actions:
                if action.name == "lose":
                    sig.lost = True
                    self._record(rule, "lose", where, {"message": "sent"},
                                 {"message": "lost"})
                else:
                    self._global(rule, action, where)

    def _on_mmio(self, acc: MmioAccess) -> None:
        c = self.controller
        if self._all_ones:
            if acc.write:
                acc.drop = True
            else:
                acc.value = (1 << (8 * acc.size)) - 1
            return
        name = c.register_name(acc.offset)
        if acc.write and self.expectations:
            if name == "USBCMD" and acc.value & _HCRST:
                self._reacted("HCRST", {}, lambda step: step == "hcrst")
            elif name.startswith("PORTSC[") and acc.value & (_PR | _WPR):
                self._reacted(f"{name} reset", {}, lambda step: step == "port-reset")
        if acc.write and self._ignore_abort and name == "CRCR_LO" and acc.value & _CA_CS \
                and c.crr:
            self._ignore_abort -= 1
            acc.value &= ~_CA_CS
            self._sync()
        if self._cnr_armed is not None and acc.write and name == "USBCMD" \
                and acc.value & _HCRST:
            ms, self._cnr_armed = self._cnr_armed, None
            self._cnr_until = self.now_ms() + ms
        if self._cnr_until is not None and not acc.write and name == "USBSTS":
            if self.now_ms() < self._cnr_until:
                acc.value |= _CNR
            else:
                self._cnr_until = None
                c.scheduler.call_soon(self._sync)
        if not any(r.kind == "mmio" and r.enabled for r in self.rules):
            return
        facts: dict[str, Any] = {"reg": name, "access": "write" if acc.write else "read",
                                 "value": acc.value, "offset": acc.offset}
        reg = _REGISTERS.get(name.split("[", 1)[0])
        if reg is not None and acc.size == 4:        # its fields, by name: hcrst=1, ca=1
            facts.update(reg.layout.decode([acc.value]))
        for rule in self._matching("mmio", facts):
            for action in rule.actions:
                self._global(rule, action, {"reg": name, "value": acc.value})

    # ---- actions anywhere ----------------------------------------------------------------------
    def _global(self, rule: Rule, action: R.Action, where: dict[str, Any],
                port: int = 0) -> None:
        """The actions that do not rewrite what was matched: ports, the controller, pause."""
        c = self.controller
        a, args = action.name, action.args
        if a == "disconnect":
            n = int(args.get("port", str(port)), 0)
            p = c.port(n)
            if p is None or p.device is None:
                self._record(rule, a, where, {}, {"note": f"port {n} has no device"})
                return
            dev = c.detach(n)
            self._unplugged[n] = dev
            self._last_unplugged = n
            self._record(rule, a, where | {"port": n}, {"device": dev.name},
                         {"device": "unplugged"})
        elif a == "reconnect":
            self._reconnect(rule, args, where, port)
        elif a in ("over-current", "ss-inactive", "warm-reset-required", "reset-fail"):
            n = int(args.get("port", str(port)), 0)
            p = c.port(n)
            if p is None:
                self._record(rule, a, where, {}, {"note": f"there is no port {n}"})
                return
            before = p.portsc
            if a == "over-current":
                p.over_current(True)
                if "ms" in args:
                    self._timers.append(c.scheduler.call_later(
                        int(parse_ms(args["ms"]) * 1e6), p.over_current, False))
            elif a == "reset-fail":
                p.fail_resets += int(args.get("times", "1"), 0)
            else:
                p.link_error(regs.PLS_INACTIVE if a == "ss-inactive" else regs.PLS_COMPLIANCE)
            self._record(rule, a, where | {"port": n}, {"portsc": before},
                         {"portsc": p.portsc})
        elif a == "hse":
            c.host_system_error(f"injected by fault rule #{rule.number}")
            self._record(rule, a, where, {}, {"usbsts": "HSE, halted"})
        elif a == "hce":
            c.host_controller_error(f"injected by fault rule #{rule.number}")
            self._record(rule, a, where, {}, {"usbsts": "HCE, halted"})
        elif a == "all-ones":
            self._all_ones = True
            self._record(rule, a, where, {}, {"registers": "all ones"})
            # at once: the firing transfer's own event and interrupt must not get out.  Safe
            # inside an announcement: it adds listeners to announcements other than this one
            self._sync()
        elif a == "cnr-stuck":
            self._cnr_armed = parse_ms(args["ms"]) if "ms" in args else float("inf")
            self._record(rule, a, where, {}, {"cnr_ms": self._cnr_armed})
            c.scheduler.call_soon(self._sync)
        elif a in ("event-ring-full", "event-lost"):
            self._controller_event(rule, CC.EVENT_RING_FULL if a == "event-ring-full"
                                   else CC.EVENT_LOST, int(args.get("interrupter", "0"), 0),
                                   where)
        elif a == "note":
            self._record(rule, a, where, {}, {})
        elif a == "pause":
            c.gate.pause()
            self._record(rule, a, where, {}, {"controller": "paused"})
        else:
            self._record(rule, a, where, {}, {"note": f"{a} does not apply here"})

    def _reconnect(self, rule: Rule, args: dict[str, str], where: dict[str, Any],
                   port: int) -> None:
        """Plug an unplugged device back, later (ms=) and perhaps at another speed (speed=):
        a USB 3 device whose SuperSpeed link failed comes back on a USB 2 port."""
        c = self.controller
        speed = R.parse_speed(args["speed"]) if "speed" in args else None
        n = self._last_unplugged or port
        if "port" in args and speed is None:
            n = int(args["port"], 0)
        dev = self._unplugged.get(n)
        if dev is None:
            self._record(rule, "reconnect", where, {},
                         {"note": f"no device was unplugged from port {n}"})
            return
        target = int(args["port"], 0) if "port" in args else None
        if speed is not None and speed != dev.speed:
            supports = getattr(dev, "supports", None)      # virtual devices can; real ones not
            if supports is None or not supports(speed):
                self._record(rule, "reconnect", where, {"speed": dev.speed.label},
                             {"note": f"{dev.name} cannot run at {speed.label}"})
                return
        delay = int(parse_ms(args.get("ms", "0")) * 1e6)

        def plug() -> None:
            if self._unplugged.get(n) is not dev:
                return
            try:
                if speed is not None and speed != dev.speed:
                    dev.set_speed(speed)        # type: ignore[attr-defined]
                c.attach(dev, target if target is not None or speed is not None else n)
            except ValueError as e:
                self._record(rule, "reconnect", where | {"port": n}, {},
                             {"note": f"reconnect failed: {e}"})
                return
            del self._unplugged[n]
        self._timers.append(c.scheduler.call_later(delay, plug))
        injected: dict[str, Any] = {"reconnect_ms": delay / 1e6}
        if speed is not None:
            injected["speed"] = speed.label
        self._record(rule, "reconnect", where | {"port": n}, {"speed": dev.speed.label},
                     injected)

    def _controller_event(self, rule: Rule, cc: int, interrupter: int,
                          where: dict[str, Any]) -> None:
        """A Host Controller Event with completion code `cc` (Event Ring Full, Event Lost)."""
        c = self.controller
        action = "event-ring-full" if cc == CC.EVENT_RING_FULL else "event-lost"
        if not 0 <= interrupter < len(c.interrupters):
            self._record(rule, action, where, {},
                         {"note": f"there is no interrupter {interrupter}"})
            return
        label = cc_name(cc)
        c.post_event(interrupter, events.host_controller_event(cc),
                     note=f"fault #{rule.number}: {label}")
        self._record(rule, action, where, {}, {"event": f"Host Controller Event, {label}"})

    # ---- time rules ----------------------------------------------------------------------------
    def _arm_time(self, rule: Rule) -> None:
        at = parse_ms(rule.when.get("after", "0"))
        delay = max(0.0, at - self.now_ms())

        def due() -> None:
            if rule in self.rules and rule.enabled and self._fires(rule):
                for action in rule.actions:
                    self._global(rule, action, {"time_ms": round(self.now_ms(), 3)})
        self._timers.append(self.controller.scheduler.call_later(int(delay * 1e6), due))

    # ---- records -------------------------------------------------------------------------------
    def write_log(self, path: str) -> None:
        with open(path, "w") as f:
            for inj in self.log:
                f.write(inj.json() + "\n")

    def log_lines(self) -> Iterable[str]:
        return (inj.json() for inj in self.log)

    def summary(self) -> str:
        active = sum(1 for r in self.rules if r.enabled)
        return f"{active} rule{'s' * (active != 1)}, {len(self.log)} injected"


def replay_rules(log_text: str) -> str:
    """A scenario that injects exactly what a JSON-lines log recorded: each injection becomes
    its rule pinned to the match it fired at (`nth=`), without its probability and WHEN."""
    lines = []
    seen: set[tuple[int, int]] = set()
    for n, raw in enumerate(log_text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            if "expect" in rec:
                continue                 # an expectation's outcome, not an injection
            rule = R.parse_rule(rec["definition"])
            match = int(rec["match"])
        except (ValueError, KeyError, TypeError) as e:
            raise RuleError(f"not an injection log line ({e})", n, 1) from None
        if rule is None or (int(rec["rule"]), match) in seen:
            continue
        seen.add((int(rec["rule"]), match))
        keep = {k: v for k, v in rule.when.items() if k == "new_state"}
        actions = " and ".join(str(a) for a in rule.actions)
        when = " ".join([f"nth={match}", *(f"{k}={v}" for k, v in keep.items())])
        lines.append(f"{rule.where()} {when} do {actions}")
    return "\n".join(lines) + "\n"
