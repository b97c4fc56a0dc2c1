"""`top`: per-endpoint traffic and per-interrupter event ring fill, redrawn every second.

The numbers come from `Counters`, a hooks observer the console attaches when it starts.  It
only adds integers (the hot announcements -- TRB fetches, URB completions, events -- each cost
a dict lookup and an increment); names, rates and the event ring's fill are worked out when a
snapshot is taken.
"""
from __future__ import annotations

import asyncio
import io
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console as RichConsole
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..emu.hooks import CommandResult, EventRecord, InterruptSignal, TransferRecord
from ..emu.interrupters import Interrupter
from ..emu.trb import CC, TRB_SIZE, Trb, cc_name
from . import render
from .registry import command, parser

if TYPE_CHECKING:
    from prompt_toolkit.formatted_text import ANSI
    from prompt_toolkit.input import Input
    from prompt_toolkit.output import Output

    from .console import Console

INSPECT = "inspection"
COMMAND_RING = (0, 0)               # the command ring's key among the endpoints
_FINE = (CC.SUCCESS, CC.SHORT_PACKET)   # what a transfer may end with and not be an error


class EndpointCounts:
    """What went through one ring: TRBs fetched, transfers retired (commands, for the command
    ring), bytes each way, and the completion codes that were errors."""

    __slots__ = ("bytes_in", "bytes_out", "errors", "transfers", "trbs")

    def __init__(self) -> None:
        self.trbs = 0
        self.transfers = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors: dict[int, int] = {}

    def copy(self) -> EndpointCounts:
        c = EndpointCounts()
        c.trbs, c.transfers, c.bytes_in, c.bytes_out = (self.trbs, self.transfers,
                                                        self.bytes_in, self.bytes_out)
        c.errors = dict(self.errors)
        return c


class Counters:
    """The hooks observer `top` reads.  Keys are (slot, DCI); the command ring is (0, 0)."""

    def __init__(self, clock: Callable[[], int]):
        self.clock = clock
        self.started_ns = clock()
        self.endpoints: dict[tuple[int, int], EndpointCounts] = {}
        self._rings: dict[str, EndpointCounts] = {}
        self.events: dict[int, int] = {}           # interrupter -> events posted
        self.interrupts: dict[int, int] = {}       # interrupter -> interrupts signalled
        self.last: Snapshot | None = None          # the snapshot rates are measured from

    def reset(self) -> None:
        self.endpoints.clear()
        self._rings.clear()
        self.events.clear()
        self.interrupts.clear()
        self.started_ns = self.clock()
        self.last = None

    def _endpoint(self, key: tuple[int, int]) -> EndpointCounts:
        c = self.endpoints.get(key)
        if c is None:
            c = self.endpoints[key] = EndpointCounts()
        return c

    def _ring(self, ring: str) -> EndpointCounts:
        slot, _, dci = ring.partition("/")
        c = self._rings[ring] = self._endpoint((int(slot), int(dci)) if dci else COMMAND_RING)
        return c

    # ---- hooks ------------------------------------------------------------------------------
    def on_trb(self, ring: str, trb: Trb) -> None:
        c = self._rings.get(ring)
        if c is None:
            c = self._ring(ring)
        c.trbs += 1

    def on_command(self, cmd: CommandResult) -> None:
        c = self._endpoint(COMMAND_RING)
        c.transfers += 1
        if cmd.cc != CC.SUCCESS:
            c.errors[cmd.cc] = c.errors.get(cmd.cc, 0) + 1

    def on_urb_complete(self, rec: TransferRecord) -> None:
        if rec.internal:
            return
        x = rec.xfer
        c = self._endpoint((rec.slot, rec.dci))
        if x.is_in:
            c.bytes_in += x.actual
        else:
            c.bytes_out += x.actual

    def on_urb_retired(self, rec: TransferRecord) -> None:
        if rec.internal:
            return
        c = self._endpoint((rec.slot, rec.dci))
        c.transfers += 1
        cc = rec.cc
        if cc is not None and cc not in _FINE:
            c.errors[cc] = c.errors.get(cc, 0) + 1

    def on_event_posted(self, ev: EventRecord) -> None:
        self.events[ev.interrupter] = self.events.get(ev.interrupter, 0) + 1

    def on_interrupt(self, sig: InterruptSignal) -> None:
        self.interrupts[sig.interrupter] = self.interrupts.get(sig.interrupter, 0) + 1

    # ---- reading ----------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The counts now; the next snapshot's rates are measured from this one."""
        previous = self.last if self.last is not None else Snapshot(self.started_ns)
        previous.previous = None              # keep one step of history, not a chain
        snap = Snapshot(self.clock(), {k: c.copy() for k, c in self.endpoints.items()},
                        dict(self.events), dict(self.interrupts), previous)
        self.last = snap
        return snap


@dataclass
class Snapshot:
    time_ns: int
    endpoints: dict[tuple[int, int], EndpointCounts] = field(default_factory=dict)
    events: dict[int, int] = field(default_factory=dict)
    interrupts: dict[int, int] = field(default_factory=dict)
    previous: Snapshot | None = None

    @property
    def seconds(self) -> float:
        """Time since the previous snapshot (or since counting started)."""
        return (self.time_ns - self.previous.time_ns) / 1e9 if self.previous else 0.0

    def rate(self, now: int, before: int) -> float | None:
        s = self.seconds
        return (now - before) / s if s > 0 else None


def event_ring_fill(ir: Interrupter) -> tuple[int, int] | None:
    """(events written and not yet consumed by software, TRBs in the event ring), or None
    when the interrupter has no event ring."""
    if not ir.segments:
        return None
    total = 0
    deq = enq = None
    erdp = ir.erdp & ~0xF
    for i, (base, size) in enumerate(ir.segments):
        if base <= erdp < base + size * TRB_SIZE:
            deq = total + (erdp - base) // TRB_SIZE
        if i == ir.seg:
            enq = total + ir.enq_index
        total += size
    if deq is None or enq is None:            # ERDP outside the ring: nothing known as read
        return None
    return (enq - deq) % total + len(ir.backlog), total


def _device(con: Console, slot_id: int) -> str:
    slot = con.controller.slots.get(slot_id)
    if slot is None:
        return "(disabled)"
    if slot.port is None:
        return ""
    dev = con.session.devices.get(slot.port.number)
    return dev.name if dev is not None else ""


def snapshot_data(con: Console, snap: Snapshot) -> dict[str, object]:
    """A snapshot as data: one object per ring (the command ring, every endpoint enabled now,
    and the rings that moved before their slot went), one per interrupter set up."""
    before = snap.previous.endpoints if snap.previous else {}
    zero = EndpointCounts()
    keys = {COMMAND_RING, *snap.endpoints}
    keys.update((sid, dci) for sid, s in con.controller.slots.items() for dci in s.endpoints)
    endpoints = []
    for key in sorted(keys):
        c, b = snap.endpoints.get(key, zero), before.get(key, zero)
        slot, dci = key
        endpoints.append({
            "ring": "cmd" if key == COMMAND_RING else f"{slot}/{dci}", "slot": slot or None,
            "dci": dci or None, "device": _device(con, slot) if slot else None,
            "endpoint": render.ep_name(dci) if dci else "command ring",
            "trbs": c.trbs, "transfers": c.transfers, "bytes_in": c.bytes_in,
            "bytes_out": c.bytes_out,
            "bytes_in_per_s": snap.rate(c.bytes_in, b.bytes_in),
            "bytes_out_per_s": snap.rate(c.bytes_out, b.bytes_out),
            "transfers_per_s": snap.rate(c.transfers, b.transfers),
            "errors": {cc_name(cc): n for cc, n in sorted(c.errors.items())}})
    interrupters = []
    prev_events = snap.previous.events if snap.previous else {}
    prev_intr = snap.previous.interrupts if snap.previous else {}
    for ir in render.active_interrupters(con.controller):
        fill = event_ring_fill(ir)
        i = ir.index
        interrupters.append({
            "index": i, "events": snap.events.get(i, 0),
            "events_per_s": snap.rate(snap.events.get(i, 0), prev_events.get(i, 0)),
            "interrupts": snap.interrupts.get(i, 0),
            "interrupts_per_s": snap.rate(snap.interrupts.get(i, 0), prev_intr.get(i, 0)),
            "unread": fill[0] if fill else None, "ring_trbs": fill[1] if fill else None,
            "full": ir.full, "backlog": len(ir.backlog), "lost": ir.lost})
    return {"time_ns": snap.time_ns, "interval_s": snap.seconds, "endpoints": endpoints,
            "interrupters": interrupters}


def _num(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("k", 1 << 10)):
        if n >= 10 * size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _rate(r: object) -> str:
    return "-" if not isinstance(r, int | float) else _num(round(r))


def snapshot_view(data: dict[str, object]) -> RenderableType:
    """The tables `top` draws, from `snapshot_data`."""
    t = Table(box=box.SIMPLE_HEAD, title=f"endpoints (rates over {data['interval_s']:.1f} s)",
              title_justify="left")
    for col in ("ring", "device", "endpoint", "TRBs", "xfers", "in", "in/s", "out", "out/s",
                "errors"):
        t.add_column(col, justify="left" if col in ("ring", "device", "endpoint", "errors")
                     else "right")
    endpoints = data["endpoints"]
    assert isinstance(endpoints, list)
    for e in endpoints:
        errors = ", ".join(f"{name} {n}" for name, n in e["errors"].items()) or "-"
        t.add_row(e["ring"], e["device"] or "", e["endpoint"], str(e["trbs"]),
                  str(e["transfers"]), _num(e["bytes_in"]), _rate(e["bytes_in_per_s"]),
                  _num(e["bytes_out"]), _rate(e["bytes_out_per_s"]),
                  Text(errors, style="red" if e["errors"] else ""))
    it = Table(box=box.SIMPLE_HEAD, title="interrupters", title_justify="left")
    for col in ("#", "events", "events/s", "unread", "of", "fill", "interrupts", "intr/s",
                "backlog", "lost"):
        it.add_column(col, justify="right")
    interrupters = data["interrupters"]
    assert isinstance(interrupters, list)
    for i in interrupters:
        unread, size = i["unread"], i["ring_trbs"]
        fill = f"{100 * unread / size:.0f}%" if unread is not None and size else "-"
        it.add_row(str(i["index"]), str(i["events"]), _rate(i["events_per_s"]),
                   "-" if unread is None else str(unread), "-" if size is None else str(size),
                   Text(fill + (" FULL" if i["full"] else ""), style="red" if i["full"] else ""),
                   str(i["interrupts"]), _rate(i["interrupts_per_s"]), str(i["backlog"]),
                   str(i["lost"]))
    if not it.row_count:
        it.caption = "no interrupter is set up"
    return Group(t, it)


def counters_of(con: Console) -> Counters:
    counters = con.counters
    if counters is None:
        raise RuntimeError("the console has not started")
    return counters


def _ansi(renderable: RenderableType, width: int) -> str:
    buf = io.StringIO()
    RichConsole(file=buf, force_terminal=True, color_system="standard", width=width,
                highlight=False).print(renderable)
    return buf.getvalue()


class _LiveFrame:
    """What `live_top` shows: the latest snapshot, as data and as terminal text."""

    def __init__(self, con: Console):
        self.con = con
        self.data: dict[str, object] = {}
        self.text: ANSI | None = None

    def draw(self, width: int) -> None:
        from prompt_toolkit.formatted_text import ANSI
        self.data = snapshot_data(self.con, counters_of(self.con).snapshot())
        hint = Text("any key: back to the console", style="dim")
        self.text = ANSI(_ansi(Group(snapshot_view(self.data), hint), max(40, width - 1)))


async def live_top(con: Console, interval: float, input: Input | None = None,
                   output: Output | None = None) -> dict[str, object]:
    """Redraw the snapshot in place every `interval` seconds until a key is pressed; returns
    the last snapshot's data."""
    from prompt_toolkit.application import Application
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
    from prompt_toolkit.layout import Layout, Window
    from prompt_toolkit.layout.controls import FormattedTextControl

    counters_of(con)
    frame = _LiveFrame(con)
    keys = KeyBindings()

    @keys.add("<any>")
    def _leave(event: KeyPressEvent) -> None:
        event.app.exit()

    app: Application[None] = Application(
        layout=Layout(Window(FormattedTextControl(lambda: frame.text))), key_bindings=keys,
        full_screen=False, input=input, output=output)
    frame.draw(app.output.get_size().columns)

    async def tick() -> None:
        while True:
            await asyncio.sleep(interval)
            frame.draw(app.output.get_size().columns)
            app.invalidate()

    ticker = asyncio.get_running_loop().create_task(tick())
    try:
        await app.run_async()
    finally:
        ticker.cancel()
    return frame.data


# ==== top ========================================================================================
p = parser("top", "Traffic per endpoint and event ring fill per interrupter, redrawn every\n"
                  "second until a key is pressed.  Per ring: TRBs fetched, transfers retired\n"
                  "(commands on the command ring), bytes in and out and their rates, errors by\n"
                  "completion code; per interrupter: events, unread events in its event ring,\n"
                  "interrupts and their rates.  Rates are over the time since the previous\n"
                  "snapshot.  In scripts and through the API it prints one snapshot (-n: N).",
           """top                            # live until a key is pressed
              top --once                     # one snapshot (rates since the last one)
              top -n 5 -d 0.5                # five snapshots half a second apart
              top --once --json              # a snapshot as data
              top --reset                    # count from zero again""")
p.add_argument("-n", "--count", type=int, help="print N snapshots and return")
p.add_argument("-d", "--delay", type=float, default=1.0, metavar="SECONDS",
               help="seconds between snapshots (default 1)")
p.add_argument("--once", action="store_true", help="one snapshot (the same as -n 1)")
p.add_argument("--reset", action="store_true", help="set every counter to zero first")


@command(p, INSPECT)
async def top(con: Console, args: Namespace) -> None:
    counters = counters_of(con)
    if args.reset:
        counters.reset()
        con.out.print("counters reset")
    interval = max(0.05, args.delay)
    count = 1 if args.once else args.count
    if count is None and con.at_prompt:
        con.data(await live_top(con, interval))
        return
    shots = []
    for n in range(max(1, count or 1)):
        if n:
            await asyncio.sleep(interval)
        data = snapshot_data(con, counters.snapshot())
        shots.append(data)
        con.out.print(snapshot_view(data))
    con.data(shots[0] if len(shots) == 1 else shots)


__all__ = ["Counters", "EndpointCounts", "Snapshot", "event_ring_fill", "live_top",
           "snapshot_data", "snapshot_view"]
