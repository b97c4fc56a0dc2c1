"""How long the server takes over each message, kept for tests and benchmarks.

Handling times are perf_counter_ns differences; only the latest `KEEP` of each kind are kept, so
a long session costs bounded memory.  BAR0 register accesses taken by the dispatcher's fast path
are timed apart from the other commands.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from itertools import pairwise

from .protocol import Command

KEEP = 100000


class Measurements:
    def __init__(self) -> None:
        self.command_ns: dict[int, deque[int]] = {}
        self.counts: dict[int, int] = {}       # per command outside the BAR0 fast path
        # BAR0 fast-path handling times: (reads, writes).
        self.bar0_ns: tuple[deque[int], deque[int]] = (deque(maxlen=KEEP), deque(maxlen=KEEP))
        # perf_counter_ns at which each BAR0 read arrived: back-to-back guest reads arrive one
        # guest round trip apart.
        self.bar0_read_arrivals: deque[int] = deque(maxlen=KEEP)

    def command_handled(self, command: int, ns: int) -> None:
        d = self.command_ns.get(command)
        if d is None:
            d = self.command_ns[command] = deque(maxlen=KEEP)
        d.append(ns)
        self.counts[command] = self.counts.get(command, 0) + 1

    def read_round_trips(self, since: int = 0, limit_ns: int = 1_000_000) -> list[int]:
        """Gaps (ns) between consecutive BAR0 reads from arrival number `since` on, keeping only
        those under `limit_ns`: for a guest reading registers back to back, the cost of one
        guest MMIO read."""
        t = list(self.bar0_read_arrivals)[since:]
        return sorted(b - a for a, b in pairwise(t) if b - a < limit_ns)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per command (BAR0_READ and BAR0_WRITE for the fast path): count and median/p90
        handling time in microseconds."""
        out = {}
        for name, d in (("BAR0_READ", self.bar0_ns[0]), ("BAR0_WRITE", self.bar0_ns[1])):
            if d:
                out[name] = _spread(len(d), d)
        for cmd, d in self.command_ns.items():
            if not d:
                continue
            name = Command(cmd).name if cmd in Command._value2member_map_ else str(cmd)
            out[name] = _spread(self.counts.get(cmd, 0), d)
        return out


def _spread(count: int, ns: Iterable[int]) -> dict[str, float]:
    s = sorted(ns)
    return {"count": count, "median_us": s[len(s) // 2] / 1000,
            "p90_us": s[int(len(s) * 0.9)] / 1000}
