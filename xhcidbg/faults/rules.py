"""The fault rule language: one rule per line, the same words in the console (`fault add`), in
scenario files (`--faults FILE`) and in the Python API (`FaultEngine.add`).

    [NAME:] WHERE [KEY=VALUE...] [WHEN...] do ACTION [ARG=VALUE...] [and ACTION ...]

    stall-in:  urb ep=0x81 nth=2 do stall
    flaky:     urb dir=in times=3 probability=0.2 do xact-error
    hung:      command type=address nth=1 do withhold
               urb ep=0x81 phase=submit after_rule=flaky do disconnect and reconnect ms=500
    # comments run to the end of the line

WHERE is what the rule watches (`KINDS`) and KEY=VALUE the conditions on it, in the condition
language breakpoints use (xhcidbg.conditions).  WHEN (`WHEN_KEYS`) says which of the matches
fire, and ACTION (`ACTIONS`) what is done then.  A bad rule is refused with its line, column and
what was expected there.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..conditions import Condition, parse_cc, type_matches
from ..devices.base import SPEED_NAMES, Speed
from ..emu import regs
from ..emu.trb import CC_NAMES, TrbType

_COMMAND_TYPES = [t for t in TrbType if 9 <= t <= 23]     # the command TRB types

# where: kind -> {key: what it means}
KINDS: dict[str, dict[str, str]] = {
    "urb": {"slot": "slot id", "dci": "endpoint DCI", "ep": "endpoint address (0x81...)",
            "dir": "in or out", "type": "TRB type of the TD's first TRB (normal, setup, isoch)",
            "length": "bytes asked for", "stream": "stream id", "port": "root port",
            "device": "device name (storage, tablet, keyboard, loopback...)",
            "request_type": "setup bmRequestType", "request": "setup bRequest",
            "value": "setup wValue", "index": "setup wIndex",
            "phase": "done (default: the device finished it) or submit (handed to the device)"},
    "command": {"type": "command type (enable, address, configure, stop, reset endpoint...)",
                "slot": "slot id", "dci": "endpoint DCI (endpoint commands)"},
    "doorbell": {"slot": "doorbell index (0: command ring)", "target": "DCI rung",
                 "stream": "stream id"},
    "mmio": {"reg": "register name (USBCMD, PORTSC[1], CRCR_LO, ERDP_LO[0]...)",
             "access": "read or write", "value": "the value read or written",
             "offset": "BAR0 offset"},
    "event": {"type": "event type (transfer, command completion, port status change...)",
              "cc": "completion code", "slot": "slot id", "dci": "endpoint DCI",
              "interrupter": "interrupter index"},
    "port": {"port": "root port number"},
    "interrupt": {"interrupter": "interrupter index"},
    "time": {},                          # fires once, at after=T
}

# when: key -> what it means
WHEN_KEYS = {
    "nth": "fire at the Nth match only",
    "every": "fire at every Nth match",
    "skip": "let the first K matches pass",
    "times": "fire at most K times",
    "probability": "fire with probability P (0..1), drawn from the engine's seed",
    "after": "only after T since the engine started (500, 500ms, 2s)",
    "before": "only before T since the engine started (with after: a window)",
    "after_rule": "only once the rule NAME has fired",
    "state": "only while a state machine is in a state (STATE or MACHINE.STATE)",
    "new_state": "move a state machine when this rule fires (STATE or MACHINE.STATE)",
}

# what: action -> (the kinds it works on (None: any), {arg: what it means}, what it does)
ACTIONS: dict[str, tuple[tuple[str, ...] | None, dict[str, str], str]] = {
    "cc": (("urb", "command"), {"code": "completion code (name or number, 192-255 vendor)",
                                "residue": "residual length in the Transfer Event",
                                "state": "endpoint afterwards: running, halted or error"},
           "complete with this completion code"),
    "stall": (("urb",), {}, "Stall Error, endpoint Halted"),
    "babble": (("urb",), {}, "Babble Detected, endpoint Halted"),
    "xact-error": (("urb",), {}, "USB Transaction Error, endpoint Halted"),
    "trb-error": (("urb",), {}, "TRB Error, endpoint Error"),
    "short": (("urb",), {"length": "bytes delivered"}, "a short packet of LENGTH bytes"),
    "corrupt": (("urb",), {"offset": "byte offset in the IN data", "value": "the byte put there",
                           "bits": "flip this many random bits instead",
                           "field": "a descriptor field by name instead of an offset "
                                    "(bMaxPacketSize0, ENDPOINT.wMaxPacketSize...)",
                           "occurrence": "which one of several such fields (default 1)"},
                "change the IN data on its way to the guest"),
    "delay": (("urb", "event"), {"ms": "milliseconds"}, "deliver it this much later"),
    "withhold": (("urb", "command"), {}, "never complete it (the guest's timeout and abort)"),
    "ignore-abort": (("command",), {}, "ignore the next Command Abort / Stop (CRCR CA, CS)"),
    "drop": (("event",), {}, "the event is never written"),
    "duplicate": (("event",), {}, "the event is written twice"),
    "reorder": (("event",), {"ms": "written anyway after this long if no later event comes "
                                   "(default 100)"},
                "the event is written after the next one of its interrupter"),
    "event-lost": (None, {"interrupter": "interrupter index (default: the matched event's)"},
                   "a Host Controller Event with Event Lost Error (an event rule's own event "
                   "is dropped: the one that was lost)"),
    "lose": (("interrupt",), {}, "the MSI/MSI-X message never reaches the host (the "
                                 "controller clears IP as if it had been sent)"),
    "event-ring-full": (None, {"interrupter": "interrupter index"},
                        "post a Host Controller Event: Event Ring Full Error"),
    "disconnect": (None, {"port": "root port (default: the matched device's)"},
                   "unplug the device (in the middle of its TD if the match is one)"),
    "reconnect": (None, {"port": "root port (default: the last one disconnected)",
                         "ms": "after this many milliseconds",
                         "speed": "at another speed: full, high or super (a USB 3 device "
                                  "that fell back to its USB 2 port; the first free port of "
                                  "that protocol unless port= says which)"},
                  "plug the disconnected device back in"),
    "over-current": (None, {"port": "root port (default: the matched device's)",
                            "ms": "clear it after this many milliseconds (default: never)"},
                     "over-current on the port: OCA/OCC, the port disabled"),
    "ss-inactive": (None, {"port": "root port"}, "the USB 3 link falls into SS.Inactive "
                                                  "(only a warm reset recovers it)"),
    "warm-reset-required": (None, {"port": "root port"}, "the USB 3 link falls into "
                                                          "Compliance Mode (warm reset)"),
    "reset-fail": (None, {"port": "root port", "times": "this many resets (default 1)"},
                   "the next port reset ends without enabling the port"),
    "hse": (None, {}, "Host System Error: the controller halts"),
    "hce": (None, {}, "Host Controller Error: the controller halts"),
    "all-ones": (None, {}, "registers read all ones, writes are lost (surprise removal)"),
    "cnr-stuck": (None, {"ms": "for this long (default: for ever)"},
                  "USBSTS.CNR stays set after the next controller reset"),
    "pause": (None, {}, "stop the controller (and freeze the guest) at the match"),
    "note": (None, {}, "only log the match (and move a state machine with new_state)"),
}
# an mmio rule also tests the fields of the register it names (hcrst=1, ca=1, ...)
_MMIO_KEYS = KINDS["mmio"] | {f.name: f"a register field ({r.name})"
                              for r in vars(regs).values() if isinstance(r, regs.Register)
                              for f in r.layout.fields}
_SHORTHAND_CC = {"stall": "stall", "babble": "babble", "xact-error": "4",
                 "trb-error": "5"}
STATES = ("running", "halted", "error")


class RuleError(ValueError):
    """A rule that does not parse: `line` and `column` (1-based) point at the offending word."""

    def __init__(self, message: str, line: int = 1, column: int = 1, source: str = ""):
        self.line, self.column, self.source, self.reason = line, column, source, message
        where = f"{source}:" if source else ""
        super().__init__(f"{where}{line}:{column}: {message}")


@dataclass
class Action:
    name: str
    args: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return " ".join([self.name, *(f"{k}={v}" for k, v in self.args.items())])


@dataclass
class Step:
    """One guest reaction an `expect` waits for: a command it issues (by type, with field
    conditions: `reset-endpoint(tsp=1)`), `hcrst` (it resets the controller) or `port-reset`."""

    name: str
    conditions: list[Condition] = field(default_factory=list)

    def __str__(self) -> str:
        conds = ",".join(str(c) for c in self.conditions)
        return f"{self.name}({conds})" if conds else self.name


@dataclass
class Expect:
    steps: list[Step]
    within_ms: float | None = None

    def __str__(self) -> str:
        text = " then ".join(str(s) for s in self.steps)
        return text + (f" within {self.within_ms:g}ms" if self.within_ms is not None else "")


@dataclass
class Rule:
    kind: str
    conditions: list[Condition]
    when: dict[str, str]
    actions: list[Action]
    name: str = ""
    number: int = 0
    enabled: bool = True
    text: str = ""
    expect: Expect | None = None
    # counters (the engine keeps them)
    seen: int = 0                     # matches of WHERE
    eligible: int = 0                 # ... that also passed state, time and after_rule
    fired: int = 0

    @property
    def phase(self) -> str:
        for c in self.conditions:
            if c.key == "phase":
                return c.value.lower()
        return "done"

    def where(self) -> str:
        return " ".join([self.kind, *(str(c) for c in self.conditions)])

    def definition(self) -> str:
        when = [f"{k}={v}" for k, v in self.when.items()]
        do = " and ".join(str(a) for a in self.actions)
        name = f"{self.name}: " if self.name else ""
        expect = f" expect {self.expect}" if self.expect is not None else ""
        return f"{name}{' '.join([self.where(), *when])} do {do}{expect}"

    def data(self) -> dict[str, object]:
        return {"number": self.number, "name": self.name, "enabled": self.enabled,
                "definition": self.definition(), "seen": self.seen, "fired": self.fired}


_WORD = re.compile(r"\S+")


def _words(line: str) -> list[tuple[str, int]]:
    """(word, 1-based column), up to a # that starts a word (a comment)."""
    out = []
    for m in _WORD.finditer(line):
        if m.group().startswith("#"):
            break
        out.append((m.group(), m.start() + 1))
    return out


def parse_speed(text: str) -> Speed:
    try:
        return SPEED_NAMES[text.lower()]
    except KeyError:
        raise ValueError(f"speed is one of {', '.join(SPEED_NAMES)}") from None


def parse_ms(text: str) -> float:
    """500, 500ms, 1.5s -> milliseconds."""
    t = text.strip().lower()
    scale = 1.0
    if t.endswith("ms"):
        t = t[:-2]
    elif t.endswith("s"):
        t, scale = t[:-1], 1000.0
    value = float(t) * scale
    if value < 0:
        raise ValueError("a time cannot be negative")
    return value


def _check_when(key: str, value: str) -> None:
    if key in ("nth", "every", "times"):
        if int(value, 0) < 1:
            raise ValueError(f"{key} needs a count of 1 or more")
    elif key == "skip":
        if int(value, 0) < 0:
            raise ValueError("skip needs a count of 0 or more")
    elif key == "probability":
        p = float(value)
        if not 0.0 <= p <= 1.0:
            raise ValueError("probability is between 0 and 1")
    elif key in ("after", "before"):
        parse_ms(value)
    elif key in ("state", "new_state", "after_rule") and not re.fullmatch(r"[A-Za-z0-9_.-]+",
                                                                          value):
        raise ValueError(f"{key} takes a name (letters, digits, - _ .)")


def _check_action(action: Action, kind: str) -> None:
    kinds, args, _ = ACTIONS[action.name]
    if kinds is not None and kind not in kinds:
        raise ValueError(f"`{action.name}` acts on {' or '.join(kinds)} rules, not {kind}")
    for k, v in action.args.items():
        if k not in args:
            raise ValueError(f"`{action.name}` takes {', '.join(args) or 'no arguments'}; "
                             f"not {k!r}")
        if k == "code":
            parse_cc(v)
        elif k == "state":
            if v.lower() not in STATES:
                raise ValueError(f"state is one of {', '.join(STATES)}")
        elif k == "ms":
            parse_ms(v)
        elif k == "speed":
            parse_speed(v)
        elif k == "field":
            if not re.fullmatch(r"(?:[A-Za-z_]+\.)?[A-Za-z][A-Za-z0-9_]*", v):
                raise ValueError("field is a descriptor field name (bMaxPacketSize0, "
                                 "ENDPOINT.wMaxPacketSize)")
        else:
            int(v, 0)
    if action.name == "corrupt" and "field" in action.args and (
            {"offset", "bits"} & set(action.args)):
        raise ValueError("`corrupt` takes field= or offset= or bits=, one of them")
    if action.name == "cc" and "code" not in action.args:
        raise ValueError("`cc` needs code=CODE (e.g. cc code=stall, cc code=200 residue=0)")
    if action.name == "short" and "length" not in action.args:
        raise ValueError("`short` needs length=N")
    if action.name == "delay" and "ms" not in action.args:
        raise ValueError("`delay` needs ms=N")
    if action.name == "corrupt" and not {"bits", "offset", "field"} & set(action.args):
        raise ValueError("`corrupt` needs offset=N [value=V], field=NAME value=V or bits=N")
    if action.name == "corrupt" and "field" in action.args and "value" not in action.args:
        raise ValueError("`corrupt field=NAME` needs value=V")


def parse_rule(line: str, lineno: int = 1, source: str = "") -> Rule | None:
    """One rule from one line; None for a blank or comment line.  Raises RuleError."""
    words = _words(line)
    if not words:
        return None

    def fail(message: str, col: int) -> RuleError:
        return RuleError(message, lineno, col, source)

    end = words[-1][1] + len(words[-1][0])     # the column after the rule's last word

    name = ""
    i = 0
    if words[0][0].endswith(":"):
        name = words[0][0][:-1]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise fail(f"rule name {name!r}: letters, digits, - _ . only", words[0][1])
        i = 1
    if i >= len(words):
        raise fail(f"expected what the rule watches: {', '.join(KINDS)}", end)
    kind, col = words[i]
    kind = kind.lower()
    if kind == "erdp":          # the guest moving an Event Ring Dequeue Pointer
        kind = "mmio"
        conds = [Condition("reg", "=", "ERDP_LO"), Condition("access", "=", "write")]
    elif kind not in KINDS:
        raise fail(f"expected what the rule watches ({', '.join(KINDS)}, erdp), not {kind!r}",
                   col)
    else:
        conds = []
    i += 1
    when: dict[str, str] = {}
    while i < len(words) and words[i][0].lower() != "do":
        word, col = words[i]
        if "=" not in word and not any(o in word for o in "<>!"):
            raise fail(f"expected KEY=VALUE or `do`, not {word!r}", col)
        key = re.split(r"[=<>!]", word, maxsplit=1)[0].lower()
        if key in WHEN_KEYS:
            value = word.split("=", 1)[1] if "=" in word else ""
            try:
                _check_when(key, value)
            except ValueError as e:
                raise fail(f"{word}: {e}", col) from None
            when[key] = value
        else:
            try:
                c = Condition.parse(word)
                c.check(_MMIO_KEYS if kind == "mmio" else KINDS[kind], kind)
            except ValueError as e:
                raise fail(f"{e} (or a WHEN key: {', '.join(WHEN_KEYS)})", col) from None
            if c.key == "phase" and c.value.lower() not in ("done", "submit"):
                raise fail("phase is done or submit", col)
            conds.append(c)
        i += 1
    if i >= len(words):
        raise fail("expected `do ACTION` (e.g. do stall, do cc code=babble, do withhold)",
                   end)
    i += 1
    actions: list[Action] = []
    while True:
        if i >= len(words):
            raise fail(f"expected an action: {', '.join(ACTIONS)}", end)
        word, col = words[i]
        act = word.lower()
        if act not in ACTIONS:
            raise fail(f"expected an action ({', '.join(ACTIONS)}), not {word!r}", col)
        action = Action(act)
        i += 1
        while i < len(words) and words[i][0].lower() not in ("and", "expect"):
            arg, acol = words[i]
            if "=" not in arg:
                raise fail(f"expected ARG=VALUE or `and`, not {arg!r}", acol)
            k, v = arg.split("=", 1)
            action.args[k.lower()] = v
            i += 1
        if act in _SHORTHAND_CC:
            action = Action("cc", {"code": _SHORTHAND_CC[act]} | action.args)
            action.args.setdefault("code", _SHORTHAND_CC[act])
        try:
            _check_action(action, kind)
        except ValueError as e:
            raise fail(str(e), col) from None
        if action.name == "cc":
            action.args["code"] = str(parse_cc(action.args["code"]))
        actions.append(action)
        if i >= len(words) or words[i][0].lower() == "expect":
            break
        i += 1                       # `and`
    expect = None
    if i < len(words):
        expect = _parse_expect(words[i + 1:], fail, end)
    return Rule(kind, conds, when, actions, name=name, text=line.strip(), expect=expect)


STEP_KEYS = {"tsp": "Transfer State Preserve (Reset Endpoint)", "slot": "slot id",
             "dci": "endpoint DCI", "sp": "Suspend (Stop Endpoint)", "bsr": "Block Set Address"}
_STEP = re.compile(r"([A-Za-z][A-Za-z0-9-]*)(?:\((.*)\))?$")


def _parse_expect(words: list[tuple[str, int]], fail, end: int) -> Expect:
    """expect STEP [then STEP]... [within T]"""
    steps: list[Step] = []
    within = None
    i = 0
    while i < len(words):
        word, col = words[i]
        if word.lower() == "within":
            if i + 1 >= len(words):
                raise fail("expected a time after `within` (1s, 500ms)", end)
            try:
                within = parse_ms(words[i + 1][0])
            except ValueError:
                raise fail(f"expected a time (1s, 500ms), not {words[i + 1][0]!r}",
                           words[i + 1][1]) from None
            if i + 2 < len(words):
                raise fail("nothing may follow `within T`", words[i + 2][1])
            break
        if word.lower() == "then":
            if not steps:
                raise fail("`then` needs a step before it", col)
            i += 1
            continue
        m = _STEP.match(word)
        if m is None:
            raise fail(f"expected a guest reaction (a command type such as reset-endpoint, "
                       f"or hcrst, port-reset), not {word!r}", col)
        name, conds = m.group(1).lower(), []
        if name not in ("hcrst", "port-reset") and not any(
                type_matches(name, t) for t in _COMMAND_TYPES):
            raise fail(f"{name!r} is no command type, hcrst or port-reset", col)
        for text in filter(None, (m.group(2) or "").split(",")):
            try:
                c = Condition.parse(text)
                c.check(STEP_KEYS, "expect")
            except ValueError as e:
                raise fail(str(e), col) from None
            conds.append(c)
        steps.append(Step(name, conds))
        i += 1
    if not steps:
        raise fail("expected what the guest should do after `expect` (e.g. "
                   "expect reset-endpoint(tsp=1) then set-tr-dequeue within 1s)", end)
    return Expect(steps, within)


def parse_rules(text: str, source: str = "") -> list[Rule]:
    """Every rule of a scenario file (comments and blank lines allowed)."""
    rules = []
    for n, line in enumerate(text.splitlines(), 1):
        rule = parse_rule(line, n, source)
        if rule is not None:
            rules.append(rule)
    return rules


def cc_label(cc: int) -> str:
    return CC_NAMES.get(cc, "vendor-defined" if cc >= 192 else "reserved")
