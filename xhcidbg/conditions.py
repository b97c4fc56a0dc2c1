"""The condition language shared by breakpoints and fault rules: KEY OP VALUE on one decoded
field of an announcement (`cc!=success`, `ep=0x81`, `type=address`, `length>512`).

Names compare by prefix the way a driver author types them (`stall`, `short`, `address`); a
completion code's whole name picks it alone.  Nothing here knows the console or the controller.
"""
from __future__ import annotations

from dataclasses import dataclass

from .emu.trb import CC_NAMES, TRB_NAMES, TrbType

# keys whose values are names, not numbers; everything else compares as a number
NAMED_KEYS = {"type", "cc"}             # a name (prefix) or a number; = and != only by name
TEXT_KEYS = {"ring", "phase", "status", "access", "at", "dir", "device"}
OPERATORS = ("!=", "<=", ">=", "==", "=", "<", ">")


def norm(text: str) -> str:
    return text.lower().replace(" ", "").replace("-", "").replace("_", "")


def numeric(text: str) -> bool:
    try:
        int(text, 0)
    except ValueError:
        return False
    return True


def type_matches(want: str, t: int) -> bool:
    if numeric(want):
        return int(want, 0) == t
    w = norm(want)
    names: tuple[str, ...] = (norm(TRB_NAMES.get(t, "")),)
    if t in TrbType._value2member_map_:
        names += (norm(TrbType(t).name),)
    return any(n.startswith(w) for n in names)


def cc_matches(want: str, cc: int) -> bool:
    """By number, by a code's whole name (`stopped` is Stopped alone), or by the start of
    names (`stopped-` any Stopped code)."""
    if numeric(want):
        return int(want, 0) == cc
    w = norm(want)
    exact = _CC_BY_NAME.get(w)
    if exact is not None:
        return exact == cc
    return norm(CC_NAMES.get(cc, "")).startswith(w)


_CC_BY_NAME = {norm(name): cc for cc, name in CC_NAMES.items()}


def parse_cc(text: str) -> int:
    """A completion code by number or by (the start of) its name: 'stall', 'short', 6."""
    if numeric(text):
        return int(text, 0)
    found = [cc for cc in CC_NAMES if cc_matches(text, cc)]
    if len(found) != 1:
        raise ValueError(f"completion code {text!r}: " + (
            "matches " + ", ".join(CC_NAMES[c] for c in found) if found
            else "no such name (success, stall, short, trb error, ...)"))
    return found[0]


def _int(text: str) -> int:
    return int(text, 0)


def register_matches(want: str, name: str) -> bool:
    """`PORTSC` matches every port's PORTSC[n]; `PORTSC[3]` only port 3's."""
    want, name = want.upper(), name.upper()
    return name == want or ("[" not in want and name.split("[", 1)[0] == want)


@dataclass(frozen=True)
class Condition:
    """KEY OP VALUE on one decoded field of an announcement."""

    key: str
    op: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Condition:
        at = min((i for i in (text.find(c) for c in "=!<>") if i >= 0), default=-1)
        if at <= 0:
            raise ValueError(f"condition {text!r}: write KEY=VALUE, KEY!=VALUE, KEY<VALUE or "
                             f"KEY>VALUE (e.g. cc!=success)")
        op = next(o for o in OPERATORS if text.startswith(o, at))
        value = text[at + len(op):]
        if not value:
            raise ValueError(f"condition {text!r}: no value after {op!r}")
        return cls(text[:at].lower(), "=" if op == "==" else op, value)

    def check(self, allowed: dict[str, str], what: str) -> None:
        """Refuse a key `allowed` does not have (`what` names the command for the error) and
        a value its key cannot take."""
        if self.key not in allowed:
            raise ValueError(f"`{what}` takes {', '.join(allowed)}; not {self.key!r}")
        ordered = self.op not in ("=", "!=")
        if self.key in TEXT_KEYS or self.key == "reg":
            if ordered:
                raise ValueError(f"{self}: {self.key} takes = or != only")
        elif self.key in NAMED_KEYS:
            if ordered and not numeric(self.value):
                raise ValueError(f"{self}: {self.op} needs a number")
            if self.key == "cc":
                parse_cc(self.value)
        else:
            try:
                _int(self.value)
            except ValueError:
                raise ValueError(f"{self}: a number is needed") from None

    def holds(self, facts: dict) -> bool:
        have = facts.get(self.key)
        if have is None:
            return False
        op, want = self.op, self.value
        if self.key in TEXT_KEYS:
            same = norm(str(have)) == norm(want)
        elif self.key == "reg":
            same = register_matches(want, have)
        elif self.key in NAMED_KEYS and not numeric(want):
            same = (type_matches if self.key == "type" else cc_matches)(want, have)
        else:
            a, b = int(have), _int(want)
            return {"=": a == b, "!=": a != b, "<": a < b, ">": a > b, "<=": a <= b,
                    ">=": a >= b}[op]
        return same if op == "=" else not same

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"
