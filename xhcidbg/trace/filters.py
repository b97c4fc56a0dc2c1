"""Capture filters: which records the tracer writes.

A filter is a set of `key=value[,value...]` terms, e.g. `slot=1,2 ep=1in kind=trb,event,urb`.
Every term narrows; a term only judges the records that carry its attribute (an MMIO access
has no slot, so `slot=1` keeps it -- add `kind=` to leave such records out):

    kind=   mmio doorbell trb event command port interrupt context state log urb xurb
            (urb: usbmon records on the per-bus interfaces, which stock tools decode;
             xurb: the same records again on the xHCI interface with their slot and endpoint
             (URB id with its top bit set), for the shipped dissector -- off unless asked for)
    bus=    usbmon bus number of a transfer
    port=   root hub port: port changes, port registers, and everything of the slot on that port
    slot=   slot ID (doorbells, TRBs, events, commands, contexts, transfers)
    ep=     endpoint: 0, 1in, 2out, 0x81 ... (compared as a DCI)
    dci=    device context index 1-31
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

KINDS = ("mmio", "doorbell", "trb", "event", "command", "port", "interrupt", "context", "state",
         "log", "fault", "urb", "xurb")
DEFAULT_KINDS = frozenset(KINDS) - {"xurb"}


class FilterError(ValueError):
    """A capture filter term the user gave is not understood."""


def endpoint_dci(text: str) -> int:
    """'0' -> 1, '1in' -> 3, '2out' -> 4, '0x81' -> 3."""
    t = text.strip().lower()
    m = re.fullmatch(r"(\d+)(in|out)?", t)
    if m:
        num, d = int(m.group(1)), m.group(2)
        if num > 15:
            raise FilterError(f"endpoint number {num} is above 15")
        if num == 0:
            return 1
        if d is None:
            raise FilterError(f"say which direction: {num}in or {num}out")
        return num * 2 + (d == "in")
    if t.startswith("0x"):
        try:
            addr = int(t, 16)
        except ValueError:
            raise FilterError(f"bad endpoint address {text!r}") from None
        if addr & 0x70 or addr > 0xFF:
            raise FilterError(f"bad endpoint address {text!r}")
        num = addr & 0xF
        return 1 if num == 0 else num * 2 + bool(addr & 0x80)
    raise FilterError(f"bad endpoint {text!r} (use 0, 1in, 2out or 0x81)")


def dci_of_address(endpoint: int) -> int:
    num = endpoint & 0xF
    return 1 if num == 0 else num * 2 + bool(endpoint & 0x80)


@dataclass
class CaptureFilter:
    kinds: frozenset[str] = DEFAULT_KINDS
    buses: frozenset[int] | None = None
    ports: frozenset[int] | None = None
    slots: frozenset[int] | None = None
    dcis: frozenset[int] | None = None
    text: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, terms: list[str] | str | None) -> CaptureFilter:
        if terms is None:
            return cls()
        if isinstance(terms, str):
            terms = terms.split()
        f = cls(text=list(terms))
        for term in terms:
            key, sep, value = term.partition("=")
            key = key.strip().lower()
            values = [v for v in value.split(",") if v.strip()]
            if not sep or not values:
                raise FilterError(f"filter term {term!r} is not key=value")
            try:
                if key == "kind":
                    bad = [v for v in values if v not in KINDS]
                    if bad:
                        raise FilterError(f"unknown record kind {bad[0]!r}; kinds: "
                                          f"{' '.join(KINDS)}")
                    f.kinds = frozenset(values)
                elif key in ("bus", "port", "slot", "dci"):
                    nums = frozenset(int(v, 0) for v in values)
                    setattr(f, {"bus": "buses", "port": "ports", "slot": "slots",
                                "dci": "dcis"}[key], nums)
                elif key in ("ep", "endpoint"):
                    f.dcis = frozenset(endpoint_dci(v) for v in values)
                else:
                    raise FilterError(f"unknown filter key {key!r} "
                                      f"(kind, bus, port, slot, ep, dci)")
            except ValueError as e:
                if isinstance(e, FilterError):
                    raise
                raise FilterError(f"filter term {term!r}: {e}") from None
        return f

    def __str__(self) -> str:
        return " ".join(self.text) or "everything"

    # the tracer asks these on its hot paths: each is a couple of set lookups
    def slot_ok(self, slot: int, port: int | None) -> bool:
        return ((self.slots is None or not slot or slot in self.slots)
                and (self.ports is None or port is None or port in self.ports))

    def dci_ok(self, dci: int) -> bool:
        return self.dcis is None or not dci or dci in self.dcis
