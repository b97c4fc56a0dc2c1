"""Rich views of the controller: registers, ports, slots and contexts, rings, events.

Every field shown here comes from the one `Layout` declaration of its register, TRB or context
(xhcidbg.emu.regs, .trb, .context); the one-line summaries are Linux's own decoders
(xhcidbg.decode.xhci), the text a driver author already reads in tracepoints and debugfs.
Nothing here changes controller state or announces anything on its hooks.

Each view has a data form next to it (`ports_view` / `ports_data`, ...): what `--json` prints,
plain dicts, lists, ints and strings read from the same facts as the text.
"""
from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..decode import xhci as linux  # Linux's decoders: the text driver authors read
from ..devices import UsbDevice
from ..devices.standard import StandardDevice
from ..emu import regs as R
from ..emu.commands import POINTER_ALIGN
from ..emu.context import (
    EP_CTX,
    EP_STATE_NAMES,
    EP_TYPE_NAMES,
    INPUT_CTRL_CTX,
    SLOT_CTX,
    SLOT_STATE_NAMES,
)
from ..emu.controller import XhciController
from ..emu.interrupters import Interrupter
from ..emu.layout import Field, Layout
from ..emu.memory import DmaError, GuestMemory
from ..emu.rings import Ring
from ..emu.slots import DeviceSlot, SlotEndpoint
from ..emu.trb import SLOT_ID, TRB_SIZE, Trb, TrbType, cc_name, layout_of, trb_name

if TYPE_CHECKING:
    from ..session import Session
    from .world import GuestDevice

Data = dict[str, object]          # one object of a view's data form


# ---- reading state without side effects ------------------------------------------------------
def peek(controller: XhciController, offset: int) -> int:
    """A BAR0 dword as the guest would read it, without announcing an MMIO access (so the
    console's own looking never shows up in traces or trips breakpoints)."""
    return controller.peek(offset)


def read_trb(mem: GuestMemory, addr: int) -> Trb | None:
    try:
        return Trb.unpack(addr, mem.peek(addr, TRB_SIZE))
    except DmaError:
        return None


# ---- fields ---------------------------------------------------------------------------------
def bits(f: Field) -> str:
    lo = f.dword * 32 + f.lo
    return f"{lo}" if f.width == 1 else f"{lo + f.width - 1}:{lo}"


def fmt_value(f: Field, v: int) -> str:
    if f.width == 1:
        return str(v)
    if f.width >= 16 or "pointer" in f.name or "dequeue" in f.name:
        return f"{v:#x}"
    return f"{v}" if v < 10 else f"{v} ({v:#x})"


def fields_inline(layout: Layout, dw: Sequence[int], skip: Iterable[str] = ()) -> str:
    """`name=value` for every non-zero field, in declaration order."""
    skip = set(skip)
    out = []
    for f in layout.fields:
        if f.name in skip:
            continue
        v = f.get(dw)
        if v:
            out.append(f.name if f.width == 1 else f"{f.name}={fmt_value(f, v)}")
    return " ".join(out)


def read_fields(layout: Layout, dw: Sequence[int]) -> list[tuple[Field, int, str]]:
    """(field, value, what the value means or "") for every field of `layout` over `dw`: the
    one reading both `layout_table` and `layout_data` show."""
    out = []
    for f in layout.fields:
        v = f.get(dw)
        out.append((f, v, _meaning(layout, f, v)))
    return out


def layout_table(title: str, layout: Layout, dw: Sequence[int], note: str = ""
                 ) -> Table | Group:
    """Every field of `layout` over `dw`: bits, value and what it means; `note` (a one-line
    decode) goes underneath."""
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("field", style="cyan")
    t.add_column("bits", justify="right", style="dim")
    t.add_column("value", justify="right")
    t.add_column("meaning", style="dim")
    for f, v, meaning in read_fields(layout, dw):
        t.add_row(f.name, bits(f), Text(fmt_value(f, v), style="bold" if v else "dim"),
                  meaning or f.doc)
    return Group(t, Text(note, style="italic")) if note else t


def layout_data(layout: Layout, dw: Sequence[int], decoded: str = "") -> Data:
    """`layout_table` as data: every field's value by name, the meanings of those that have
    one (state and type names...), and the one-line decode (Linux's) when there is one."""
    readings = read_fields(layout, dw)
    out: Data = {"fields": {f.name: v for f, v, _ in readings},
                 "meanings": {f.name: m for f, _, m in readings if m}}
    if decoded:
        out["decoded"] = decoded
    return out


def _meaning(layout: Layout, f: Field, v: int) -> str:
    if layout is SLOT_CTX and f.name == "slot_state":
        return SLOT_STATE_NAMES.get(v, "reserved")
    if layout is EP_CTX and f.name == "ep_state":
        return EP_STATE_NAMES.get(v, "reserved")
    if layout is EP_CTX and f.name == "ep_type":
        return EP_TYPE_NAMES.get(v, "not valid")
    if f.name == "cc":
        return cc_name(v)
    if f.name == "type" and f.width == 6:
        return trb_name(v)
    if f.name == "pls":
        return R.PLS_NAMES.get(v, "reserved")
    if f.name == "speed" and v:
        return {1: "full-speed", 2: "low-speed", 3: "high-speed", 4: "super-speed",
                5: "super-speed plus"}.get(v, "")
    return ""


# ---- registers ---------------------------------------------------------------------------------
def register_blocks(controller: XhciController
                    ) -> list[tuple[str, int, Sequence[R.Register]]]:
    """(section, base offset, registers) for the BAR0 blocks with fixed registers."""
    return [("capability", 0, R.CAP_REGS), ("operational", R.OP_BASE, R.OP_REGS),
            ("runtime", R.RT_BASE, (R.MFINDEX,))]


def find_register(controller: XhciController, name: str, index: int | None = None
                  ) -> tuple[R.Register, int, str]:
    """A register by name (case-insensitive); port registers take a 1-based port number,
    interrupter registers an interrupter index.  Returns (register, BAR offset, label)."""
    key = name.upper()
    for _, base, regs in register_blocks(controller):
        for r in regs:
            if r.name == key:
                return r, base + r.offset, r.name
    for r in R.PORT_REGS:
        if r.name == key:
            port = index or 1
            if not 1 <= port <= len(controller.ports):
                raise ValueError(f"port {port} does not exist (1..{len(controller.ports)})")
            return r, R.PORT_BASE + 0x10 * (port - 1) + r.offset, f"{r.name}[{port}]"
    for r in R.IR_REGS:
        if r.name == key:
            i = index or 0
            if not 0 <= i < len(controller.interrupters):
                raise ValueError(f"interrupter {i} does not exist "
                                 f"(0..{len(controller.interrupters) - 1})")
            return r, R.RT_BASE + R.IR_BASE + R.IR_STRIDE * i + r.offset, f"{r.name}[{i}]"
    raise ValueError(f"no register named {name!r}; try `regs` for the list")


def register_names() -> list[str]:
    names = [r.name for r in R.CAP_REGS + R.OP_REGS + R.PORT_REGS + R.IR_REGS]
    return [*names, R.MFINDEX.name]


def register_named(name: str) -> R.Register:
    """A register's declaration by name, wherever it lives (for decoding given values)."""
    key = name.upper()
    for r in (*R.CAP_REGS, *R.OP_REGS, *R.PORT_REGS, *R.IR_REGS, R.MFINDEX, R.DOORBELL):
        if r.name == key:
            return r
    raise ValueError(f"no register named {name!r}; try `regs` for the list")


def register_decoded(r: R.Register, v: int) -> str:
    """Linux's decoding of a register value, for the registers Linux decodes."""
    if r is R.PORTSC:
        return portsc_text(v)
    if r is R.USBSTS:
        return linux.decode_usbsts(v).strip()
    return ""


def register_readings(controller: XhciController) -> list[tuple[str, R.Register, int, int]]:
    """(block, register, BAR offset, value) of every fixed register, as the guest reads it."""
    out = []
    for section, base, regs in register_blocks(controller):
        for r in regs:
            off = base + r.offset
            out.append((section, r, off, peek(controller, off)))
    return out


def regs_view(controller: XhciController) -> Group:
    tables: dict[str, Table] = {}
    for section, r, off, v in register_readings(controller):
        t = tables.get(section)
        if t is None:
            t = tables[section] = Table(title=f"{section} registers", box=box.SIMPLE_HEAD,
                                        title_justify="left")
            t.add_column("register", style="cyan")
            t.add_column("offset", justify="right", style="dim")
            t.add_column("value", justify="right")
            t.add_column("fields")
        extra = f"  [{register_decoded(r, v)}]" if r is R.USBSTS else ""
        t.add_row(r.name, f"{off:#06x}", f"{v:#010x}", fields_inline(r.layout, [v]) + extra)
    return Group(*tables.values())


def regs_data(controller: XhciController) -> list[Data]:
    """`regs --json`: every fixed register with all its fields."""
    out = []
    for section, r, off, v in register_readings(controller):
        entry: Data = {"block": section, "name": r.name, "offset": off, "value": v}
        entry.update(layout_data(r.layout, [v], register_decoded(r, v)))
        out.append(entry)
    return out


def register_view(controller: XhciController, name: str, index: int | None = None
                  ) -> Table | Group:
    r, off, label = find_register(controller, name, index)
    v = peek(controller, off)
    note = "  ".join(x for x in (register_decoded(r, v), r.doc) if x)
    return layout_table(f"{label} @ BAR0+{off:#06x} = {v:#010x}", r.layout, [v], note)


def register_data(controller: XhciController, name: str, index: int | None = None) -> Data:
    """`regs NAME --json`: one register, every field."""
    r, off, label = find_register(controller, name, index)
    v = peek(controller, off)
    out: Data = {"name": r.name, "label": label, "offset": off, "value": v}
    out.update(layout_data(r.layout, [v], register_decoded(r, v)))
    return out


# ---- ports ---------------------------------------------------------------------------------------
def describe_device(device: UsbDevice) -> str:
    """A device in one line: what a declared device says of itself, else its name."""
    return device.describe() if isinstance(device, StandardDevice) else device.name


def portsc_text(v: int) -> str:
    return linux.decode_portsc(v).strip()


def slot_of_port(controller: XhciController, number: int) -> DeviceSlot | None:
    for slot in controller.slots.values():
        if slot.port is not None and slot.port.number == number:
            return slot
    return None


def ports_view(controller: XhciController, only: int | None = None) -> Table:
    t = Table(title="root hub ports", box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("port", justify="right", style="cyan")
    t.add_column("proto")
    t.add_column("PORTSC", justify="right")
    t.add_column("status (Linux xhci_decode_portsc)")
    t.add_column("device")
    t.add_column("slot", justify="right")
    for p in controller.ports:
        if only is not None and p.number != only:
            continue
        v = p.portsc
        dev = p.device
        slot = slot_of_port(controller, p.number)
        style = "bold" if v & 1 else "dim"
        t.add_row(str(p.number), p.protocol, f"{v:#010x}", Text(portsc_text(v), style=style),
                  f"{dev.name} ({dev.speed.label})" if dev is not None else "",
                  str(slot.id) if slot else "")
    return t


def ports_data(controller: XhciController, only: int | None = None) -> list[dict[str, object]]:
    """`ports --json`: one object per root port."""
    out: list[dict[str, object]] = []
    for p in controller.ports:
        if only is not None and p.number != only:
            continue
        dev = p.device
        slot = slot_of_port(controller, p.number)
        out.append({"port": p.number, "protocol": p.protocol, "portsc": p.portsc,
                    "status": portsc_text(p.portsc),
                    "connected": bool(p.portsc & 1),
                    "device": None if dev is None else {"name": dev.name,
                                                        "speed": dev.speed.label},
                    "slot": slot.id if slot else None})
    return out


# ---- slots and endpoint contexts ---------------------------------------------------------------
def ep_name(dci: int) -> str:
    if dci == 1:
        return "ep0"
    return f"ep{dci // 2}{'in' if dci & 1 else 'out'}"


def enabled_slot(controller: XhciController, slot_id: int) -> DeviceSlot:
    s = controller.slots.get(slot_id)
    if s is None:
        raise ValueError(f"slot {slot_id} is not enabled (enabled: "
                         f"{', '.join(map(str, sorted(controller.slots))) or 'none'})")
    return s


@dataclass
class EndpointSummary:
    """What `slots N` lists of one endpoint: its context's main fields and its ring."""

    dci: int
    ep: str
    type: int
    type_name: str
    state: int
    state_name: str
    max_packet: int
    interval: int
    dequeue: int
    ccs: int
    in_flight: int

    @classmethod
    def of(cls, ep: SlotEndpoint) -> EndpointSummary:
        c = ep.ctx
        ep_type = EP_CTX.get(c, "ep_type")
        return cls(ep.dci, ep_name(ep.dci), ep_type, EP_TYPE_NAMES.get(ep_type, "?"), ep.state,
                   EP_STATE_NAMES.get(ep.state, "?"), EP_CTX.get(c, "max_packet"),
                   EP_CTX.get(c, "interval"), ep.ring.dequeue, ep.ring.ccs, len(ep.inflight))


@dataclass
class SlotSummary:
    """What `slots` lists of one slot."""

    slot: int
    port: int | None
    state: int
    state_name: str
    usb_address: int
    speed: int
    speed_name: str
    device: str | None
    endpoints: list[EndpointSummary]

    @classmethod
    def of(cls, s: DeviceSlot) -> SlotSummary:
        speed = SLOT_CTX.get(s.ctx, "speed")
        dev = s.device
        return cls(s.id, s.port.number if s.port else None, s.state,
                   SLOT_STATE_NAMES.get(s.state, "?"), SLOT_CTX.get(s.ctx, "usb_address"), speed,
                   linux.SPEEDS.get(speed, ""), dev.name if dev else None,
                   [EndpointSummary.of(e) for _, e in sorted(s.endpoints.items())])


def slots_view(controller: XhciController) -> Table:
    t = Table(title="device slots", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("slot", "port", "state", "address", "speed", "device", "endpoints"):
        t.add_column(col, justify="right" if col in ("slot", "port", "address") else "left")
    for row in slot_summaries(controller):
        eps = " ".join(f"{e.ep}:{e.state_name}" for e in row.endpoints)
        t.add_row(str(row.slot), "-" if row.port is None else str(row.port), row.state_name,
                  str(row.usb_address), _speed(row.speed), row.device or "", eps)
    if not controller.slots:
        t.caption = "no slot is enabled"
    return t


def slot_summaries(controller: XhciController) -> list[SlotSummary]:
    return [SlotSummary.of(controller.slots[sid]) for sid in sorted(controller.slots)]


def slots_data(controller: XhciController) -> list[Data]:
    """`slots --json`: every enabled slot."""
    return [asdict(row) for row in slot_summaries(controller)]


def _speed(v: int) -> str:
    return {1: "full", 2: "low", 3: "high", 4: "super", 5: "super+"}.get(v, "-")


def _live_endpoint(controller: XhciController, slot_id: int, dci: int
                   ) -> tuple[SlotEndpoint, list[int], str]:
    """An endpoint's context with the live dequeue pointer (not the one last written back),
    and Linux's decoding of it."""
    s = enabled_slot(controller, slot_id)
    ep = s.endpoints.get(dci)
    if ep is None:
        raise ValueError(f"slot {slot_id} has no endpoint with DCI {dci} "
                         f"(has {sorted(s.endpoints)})")
    dw = list(ep.ctx)
    EP_CTX["dequeue"].set(dw, ep.ring.dequeue >> 4)
    EP_CTX["dcs"].set(dw, ep.ring.ccs)
    return ep, dw, ep_context_text(dw)


def ep_context_text(dw: Sequence[int]) -> str:
    return linux.decode_ep_context(dw[0], dw[1], dw[2] | (dw[3] << 32), dw[4])


def slot_context_text(dw: Sequence[int]) -> str:
    return linux.decode_slot_context(*dw[:4])


def slot_view(controller: XhciController, slot_id: int, dci: int | None = None) -> Group:
    if dci is not None:
        ep, dw, line = _live_endpoint(controller, slot_id, dci)
        return Group(layout_table(f"slot {slot_id} {ep_name(dci)} (DCI {dci}) endpoint context",
                                  EP_CTX, dw, line),
                     Text(f"in flight: {len(ep.inflight)} TD(s)"
                          f"{', assembling one' if ep.building else ''}"))
    s = enabled_slot(controller, slot_id)
    parts = [layout_table(f"slot {slot_id} slot context", SLOT_CTX, s.ctx,
                          slot_context_text(s.ctx))]
    t = Table(title=f"slot {slot_id} endpoints", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("dci", "ep", "type", "state", "maxp", "interval", "dequeue", "ccs", "in flight"):
        t.add_column(col)
    for e in SlotSummary.of(s).endpoints:
        t.add_row(str(e.dci), e.ep, e.type_name, e.state_name, str(e.max_packet),
                  str(e.interval), f"{e.dequeue:#x}", str(e.ccs), str(e.in_flight))
    parts.append(t)
    return Group(*parts)


def slot_data(controller: XhciController, slot_id: int, dci: int | None = None) -> Data:
    """`slots N [DCI] --json`: the controller's copy of the slot context (or of one endpoint
    context, with its live dequeue pointer) field by field."""
    if dci is not None:
        ep, dw, line = _live_endpoint(controller, slot_id, dci)
        return {"slot": slot_id, "dci": dci, "ep": ep_name(dci),
                "context": layout_data(EP_CTX, dw, line), "in_flight": len(ep.inflight),
                "assembling": ep.building is not None}
    s = enabled_slot(controller, slot_id)
    out = asdict(SlotSummary.of(s))
    out["context"] = layout_data(SLOT_CTX, s.ctx, slot_context_text(s.ctx))
    return out


# ---- device and input contexts in guest memory --------------------------------------------------
MAX_DCI = 31
ADD_SLOT = 1 << 0                # input control context A0: the slot context


def read_guest(mem: GuestMemory, addr: int, length: int) -> bytes:
    """`length` bytes of guest memory at `addr`; a ValueError that says where guest memory is
    when they are not all readable."""
    with contextlib.suppress(DmaError):
        return mem.peek(addr, length)            # looking is not a DMA: no watchpoint sees it
    readable = _readable_from(mem, addr)
    regions = ", ".join(f"{r.start:#x}..{r.end - 1:#x}" for r in mem.regions) or "none"
    if readable:
        raise ValueError(f"only {readable:#x} of the {length:#x} bytes from {addr:#x} are guest "
                         f"memory (mapped: {regions})")
    raise ValueError(f"{addr:#x} is not guest memory (mapped: {regions})")


def _readable_from(mem: GuestMemory, addr: int) -> int:
    """How many bytes from `addr` lie in consecutive directly readable regions."""
    pos = addr
    for r in mem.regions:
        if r.start <= pos < r.end and (r.view is not None or r.reader is not None):
            pos = r.end
    return pos - addr


def read_context(controller: XhciController, addr: int) -> list[int]:
    """The dwords that carry fields of the context at `addr` (32- and 64-byte contexts alike)."""
    return SLOT_CTX.unpack(read_guest(controller.mem, addr, SLOT_CTX.size))


@dataclass
class ContextReading:
    """A context as it is in guest memory now."""

    index: int                 # 0 slot (or input control), else the endpoint's DCI
    address: int
    dwords: list[int]

    @property
    def ep(self) -> str:
        return ep_name(self.index) if self.index else "slot"


def output_context_address(controller: XhciController, slot_id: int) -> int:
    """The output device context of `slot_id`, from the guest's DCBAA entry."""
    if not 1 <= slot_id <= controller.max_slots:
        raise ValueError(f"slot ids are 1..{controller.max_slots}")
    if not controller.dcbaap:
        raise ValueError("DCBAAP is 0: the guest has not given the controller a device context "
                         "base address array")
    entry = controller.dcbaap + 8 * slot_id
    addr = int.from_bytes(read_guest(controller.mem, entry, 8), "little")
    if addr == 0:
        raise ValueError(f"DCBAA entry {slot_id} (at {entry:#x}) is 0: slot {slot_id} has no "
                         f"output device context")
    return addr


def output_contexts(controller: XhciController, slot_id: int, dci: int | None = None
                    ) -> tuple[int, ContextReading | None, list[ContextReading]]:
    """(address, slot context, endpoint contexts) of the slot's output device context: one
    endpoint if `dci` is given, else those up to Context Entries that are not all zero."""
    base = output_context_address(controller, slot_id)
    size = controller.context_size
    if dci is not None:
        _check_dci(dci)
        return base, None, [ContextReading(dci, base + dci * size,
                                           read_context(controller, base + dci * size))]
    sctx = ContextReading(0, base, read_context(controller, base))
    last = max(1, SLOT_CTX.get(sctx.dwords, "context_entries"))
    eps = []
    for d in range(1, last + 1):
        c = ContextReading(d, base + d * size, read_context(controller, base + d * size))
        if any(c.dwords):
            eps.append(c)
    return base, sctx, eps


def _check_dci(dci: int) -> None:
    if not 1 <= dci <= MAX_DCI:
        raise ValueError(f"DCI {dci}: endpoint contexts are DCI 1 (ep0) .. {MAX_DCI} (ep15in)")


def _context_note(controller: XhciController, slot_id: int, base: int) -> str:
    s = controller.slots.get(slot_id)
    if s is None:
        return f"slot {slot_id} is not enabled: this is what guest memory holds"
    if s.out_ctx and s.out_ctx != base:
        return (f"the controller writes slot {slot_id}'s context to {s.out_ctx:#x}, not here "
                f"(the DCBAA entry changed since Address Device)")
    return ""


def _context_tables(readings: Iterable[ContextReading], what: str) -> list[Table | Group]:
    parts: list[Table | Group] = []
    for c in readings:
        if c.index == 0:
            parts.append(layout_table(f"{what} slot context @ {c.address:#x}", SLOT_CTX,
                                      c.dwords, slot_context_text(c.dwords)))
        else:
            parts.append(layout_table(f"{what} {c.ep} (DCI {c.index}) endpoint context @ "
                                      f"{c.address:#x}", EP_CTX, c.dwords,
                                      ep_context_text(c.dwords)))
    return parts


def _context_data(c: ContextReading) -> Data:
    if c.index == 0:
        return {"address": c.address, **layout_data(SLOT_CTX, c.dwords,
                                                    slot_context_text(c.dwords))}
    return {"dci": c.index, "ep": c.ep, "address": c.address,
            **layout_data(EP_CTX, c.dwords, ep_context_text(c.dwords))}


def output_context_view(controller: XhciController, slot_id: int, dci: int | None = None
                        ) -> Group:
    base, sctx, eps = output_contexts(controller, slot_id, dci)
    parts: list[Table | Group | Text] = [
        Text(f"slot {slot_id} output device context @ {base:#x} (DCBAA entry {slot_id}), "
             f"read from guest memory", style="bold")]
    note = _context_note(controller, slot_id, base)
    if note:
        parts.append(Text(note, style="yellow"))
    parts += _context_tables([sctx, *eps] if sctx is not None else eps, f"slot {slot_id}")
    if sctx is not None and not eps:
        parts.append(Text("no endpoint context is filled in yet", style="dim"))
    return Group(*parts)


def output_context_data(controller: XhciController, slot_id: int, dci: int | None = None
                        ) -> Data:
    """`ctx SLOT [DCI] --json`."""
    base, sctx, eps = output_contexts(controller, slot_id, dci)
    return {"slot": slot_id, "context": "output", "address": base,
            "enabled": slot_id in controller.slots,
            "slot_context": None if sctx is None else _context_data(sctx),
            "endpoints": [_context_data(c) for c in eps]}


@dataclass
class InputContextReading:
    slot: int
    address: int
    command: int               # the TRB type of the command that read it
    control: list[int]         # the input control context
    contexts: list[ContextReading]
    read: bool = True          # the command has read it (False: it is about to)

    @property
    def drop(self) -> int:
        return INPUT_CTRL_CTX.get(self.control, "drop")

    @property
    def add(self) -> int:
        return INPUT_CTRL_CTX.get(self.control, "add")


_INPUT_COMMANDS = (TrbType.ADDRESS_DEVICE, TrbType.CONFIGURE_ENDPOINT, TrbType.EVALUATE_CONTEXT)


def input_context(controller: XhciController, slot_id: int, dci: int | None = None,
                  pending: Trb | None = None) -> InputContextReading:
    """The input context the last Address Device / Configure Endpoint / Evaluate Context
    command of the slot read -- or, given the `pending` command a breakpoint holds before it
    runs, the one that command is about to read -- as it is in guest memory now: its control
    context, and the slot and endpoint contexts it adds (or the one of `dci`)."""
    s = enabled_slot(controller, slot_id)
    if (pending is not None and pending.type in _INPUT_COMMANDS
            and SLOT_ID.of(pending.control) == slot_id):
        base, command, read = pending.param & ~(POINTER_ALIGN - 1), pending.type, False
    elif s.input_ctx:
        base, command, read = s.input_ctx, s.input_command, True
    else:
        raise ValueError(f"slot {slot_id} has not been given an input context yet (Address "
                         f"Device, Configure Endpoint and Evaluate Context give one)")
    size = controller.context_size
    control = read_context(controller, base)
    # index 0 is the input control context; the device context's index i follows at i + 1
    if dci is not None:
        _check_dci(dci)
        wanted = [dci]
    else:
        add = INPUT_CTRL_CTX.get(control, "add")
        wanted = [i for i in range(MAX_DCI + 1) if add >> i & 1]
    contexts = [ContextReading(i, base + (i + 1) * size,
                               read_context(controller, base + (i + 1) * size)) for i in wanted]
    return InputContextReading(slot_id, base, command, control, contexts, read)


def ctrl_context_text(dw: Sequence[int]) -> str:
    return linux.decode_ctrl_ctx(INPUT_CTRL_CTX.get(dw, "drop"),
                                 INPUT_CTRL_CTX.get(dw, "add")) or "no flags"


def input_context_view(controller: XhciController, slot_id: int, dci: int | None = None,
                       pending: Trb | None = None) -> Group:
    r = input_context(controller, slot_id, dci, pending)
    how = "last read by" if r.read else "about to be read by the held"
    parts: list[Table | Group | Text] = [
        Text(f"slot {slot_id} input context @ {r.address:#x}, {how} "
             f"{trb_name(r.command)}; as guest memory holds it now", style="bold"),
        layout_table(f"input control context @ {r.address:#x}", INPUT_CTRL_CTX, r.control,
                     ctrl_context_text(r.control))]
    parts += _context_tables(r.contexts, "input")
    if dci is not None and not r.add >> dci & 1:
        parts.append(Text(f"(A{dci} is not set: the command did not read this context)",
                          style="yellow"))
    return Group(*parts)


def input_context_data(controller: XhciController, slot_id: int, dci: int | None = None,
                       pending: Trb | None = None) -> Data:
    """`ctx SLOT --input --json`."""
    r = input_context(controller, slot_id, dci, pending)
    slot_ctx = next((c for c in r.contexts if c.index == 0), None)
    return {"slot": slot_id, "context": "input", "address": r.address, "command": r.command,
            "command_name": trb_name(r.command), "read": r.read, "drop": r.drop, "add": r.add,
            "control": {"address": r.address,
                        **layout_data(INPUT_CTRL_CTX, r.control, ctrl_context_text(r.control))},
            "slot_context": None if slot_ctx is None else _context_data(slot_ctx),
            "endpoints": [_context_data(c) for c in r.contexts if c.index]}


# ---- rings ------------------------------------------------------------------------------------
def ring_of(controller: XhciController, name: str) -> tuple[Ring, str]:
    """'cmd' or 'SLOT/DCI' -> (Ring, Linux ring type string)."""
    if name in ("cmd", "command"):
        return controller.cmd_ring, "CMD"
    try:
        slot_id, dci = (int(x, 0) for x in name.split("/"))
    except ValueError:
        raise ValueError(f"ring {name!r}: use `cmd` or SLOT/DCI such as 1/3") from None
    s = controller.slots.get(slot_id)
    if s is None or dci not in s.endpoints:
        raise ValueError(f"no ring {name}: " + (f"slot {slot_id} is not enabled" if s is None
                         else f"slot {slot_id} has DCIs {sorted(s.endpoints)}"))
    ep = s.endpoints[dci]
    kind = "CTRL" if dci == 1 else {1: "ISOC", 2: "BULK", 3: "INTR"}.get(ep.ep_type.usb_type,
                                                                           "BULK")
    return ep.ring, kind


def ring_key_name(key: Hashable) -> str:
    """The gate's key for a ring with work, as the console names rings: cmd or SLOT/DCI."""
    if isinstance(key, tuple):
        slot_id, dci = key
        return f"{slot_id}/{dci}"
    return str(key)


def ring_names(controller: XhciController) -> list[str]:
    names = ["cmd"]
    for sid, s in sorted(controller.slots.items()):
        names += [f"{sid}/{d}" for d in sorted(s.endpoints)]
    return names


def trb_text(trb: Trb) -> str:
    return linux.decode_trb(*trb.dwords)


def trb_data(trb: Trb) -> Data:
    """One TRB as data: its type, cycle bit, dwords, every field of its type's layout and
    Linux's one-line decoding."""
    out: Data = {"type": trb.type, "type_name": trb_name(trb.type), "cycle": trb.cycle,
                 "dwords": trb.dwords}
    out.update(layout_data(layout_of(trb.type), trb.dwords, trb_text(trb)))
    return out


def _is_empty(trb: Trb) -> bool:
    return not (trb.param or trb.status or trb.control)


@dataclass
class RingEntry:
    """One TRB slot of a ring as `ring` shows it."""

    address: int
    trb: Trb | None            # None: the address is not readable guest memory
    before_dequeue: bool       # already consumed (shown for context)
    dequeue: bool = False      # the dequeue pointer points here
    owned: bool = False        # its cycle bit says it is the controller's to run


def ring_entries(controller: XhciController, name: str, before: int = 4, after: int = 8
                 ) -> tuple[Ring, str, list[RingEntry]]:
    """The ring called `name` (cmd or SLOT/DCI), its Linux ring type and its TRBs around the
    dequeue pointer: up to `before` non-empty ones before it, then the ones from it on that
    the controller owns, and the first that it does not (or the first unreadable one)."""
    ring, kind = ring_of(controller, name)
    mem = controller.mem
    entries = []
    for i in range(before, 0, -1):
        addr = ring.dequeue - i * TRB_SIZE
        trb = read_trb(mem, addr) if addr >= 0 else None
        if trb is not None and not _is_empty(trb):
            entries.append(RingEntry(addr, trb, before_dequeue=True))
    addr, ccs = ring.dequeue, ring.ccs
    for i in range(after):
        trb = read_trb(mem, addr)
        if trb is None:
            entries.append(RingEntry(addr, None, False, dequeue=i == 0))
            break
        owned = trb.cycle == ccs
        entries.append(RingEntry(addr, trb, False, dequeue=i == 0, owned=owned))
        if not owned:
            break
        if trb.type == TrbType.LINK:
            if trb.control & 2:
                ccs ^= 1
            addr = trb.param & ~0xF
        else:
            addr += TRB_SIZE
    return ring, kind, entries


def ring_view(controller: XhciController, name: str, before: int = 4, after: int = 8) -> Table:
    ring, kind, entries = ring_entries(controller, name, before, after)
    t = Table(title=f"{kind} ring {name}: dequeue {ring.dequeue:#x}, cycle state {ring.ccs}",
              box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("", width=2)
    t.add_column("address", justify="right", style="dim")
    t.add_column("C", justify="right")
    t.add_column("TRB (Linux xhci_decode_trb)")
    for e in entries:
        trb = e.trb
        if trb is None:
            t.add_row("", f"{e.address:#x}", "", Text("(not readable guest memory)", style="red"))
        elif e.before_dequeue:
            t.add_row("", f"{e.address:#x}", str(trb.cycle), Text(trb_text(trb), style="dim"))
        else:
            if _is_empty(trb):
                label = "(empty: nothing queued here yet)"
            else:
                label = trb_text(trb) + ("" if e.owned else "   [software's: cycle bit not ours]")
            t.add_row("->" if e.dequeue else "", f"{e.address:#x}", str(trb.cycle),
                      Text(label, style="bold" if e.owned else "dim"))
    return t


def ring_data(controller: XhciController, name: str, before: int = 4, after: int = 8) -> Data:
    """`ring --json`: the ring's dequeue state and its TRBs, each decoded."""
    ring, kind, entries = ring_entries(controller, name, before, after)
    trbs = []
    for e in entries:
        entry: Data = {"address": e.address, "at_dequeue": e.dequeue,
                       "before_dequeue": e.before_dequeue, "owned": e.owned,
                       "readable": e.trb is not None}
        if e.trb is not None:
            entry["empty"] = _is_empty(e.trb)
            entry.update(trb_data(e.trb))
        trbs.append(entry)
    return {"ring": name, "ring_type": kind, "dequeue": ring.dequeue, "ccs": ring.ccs,
            "trbs": trbs}


def trb_view(controller: XhciController, addr: int) -> Table | Group:
    trb = _trb_at(controller, addr)
    lay = layout_of(trb.type)
    return layout_table(f"TRB @ {addr:#x}: {trb_name(trb.type)}", lay, trb.dwords, trb_text(trb))


def trb_at_data(controller: XhciController, addr: int) -> Data:
    """`trb ADDR --json`."""
    return {"address": addr, **trb_data(_trb_at(controller, addr))}


def _trb_at(controller: XhciController, addr: int) -> Trb:
    trb = read_trb(controller.mem, addr)
    if trb is None:
        raise ValueError(f"guest address {addr:#x} is not readable")
    return trb


# ---- decoding values the user gives -----------------------------------------------------------
# decode KIND VALUES...: the layout, how many dwords it takes at most, Linux's decoder over them
DECODE_CONTEXTS: dict[str, tuple[Layout, int]] = {
    "slot": (SLOT_CTX, SLOT_CTX.ndwords), "ep": (EP_CTX, EP_CTX.ndwords),
    "ctrl": (INPUT_CTRL_CTX, INPUT_CTRL_CTX.ndwords)}
_CONTEXT_TEXT = {"slot": slot_context_text, "ep": ep_context_text, "ctrl": ctrl_context_text}
DWORD_MAX = 0xFFFFFFFF


def decode_kinds() -> list[str]:
    """What `decode` takes before its values (a TRB needs none: four dwords alone)."""
    return ["trb", *DECODE_CONTEXTS, *(n.lower() for n in register_names())]


def parse_number(text: str, limit: int = DWORD_MAX) -> int:
    """0x1f, 31, 0b11111 or 0o37 (and 1_000); 0..limit."""
    try:
        v = int(text, 0)
    except ValueError:
        raise ValueError(f"{text!r} is not a number (write 0x1f or 31)") from None
    if not 0 <= v <= limit:
        raise ValueError(f"{text} is out of range (0..{limit:#x})")
    return v


@dataclass
class Decoded:
    """Numbers the user gave, read as one structure."""

    kind: str                  # trb, slot, ep, ctrl or a register's name
    title: str
    layout: Layout
    dwords: list[int]
    text: str                  # Linux's decoding ("" when Linux has none)
    given: int                 # how many dwords were given (the rest read as 0)


def decode_values(words: Sequence[str]) -> Decoded:
    """`decode` arguments: four TRB dwords, or a kind (`trb`, `slot`, `ep`, `ctrl`, a register
    name) and its values."""
    if not words:
        raise ValueError("decode what? four TRB dwords, or slot/ep/ctrl/REGISTER and values")
    kind = words[0].lower()
    values = words[1:]
    if kind not in DECODE_CONTEXTS and kind != "trb":
        try:
            register = register_named(kind)
        except ValueError:
            if not kind[:1].isdigit():
                raise ValueError(f"{words[0]!r} is neither a number nor one of trb, slot, ep, "
                                 f"ctrl or a register name") from None
            kind, values = "trb", list(words)
        else:
            if len(values) != 1:
                raise ValueError(f"{register.name.lower()} takes one 32-bit value; {len(values)} "
                                 f"given")
            v = parse_number(values[0])
            return Decoded(register.name.lower(), f"{register.name} = {v:#010x}",
                           register.layout, [v], register_decoded(register, v), 1)
    dw = [parse_number(v) for v in values]
    if kind == "trb":
        if len(dw) != 4:
            raise ValueError(f"a TRB is four dwords (parameter low, high, status, control); "
                             f"{len(dw)} given")
        trb = Trb(0, dw[0] | dw[1] << 32, dw[2], dw[3])
        return Decoded("trb", f"TRB: {trb_name(trb.type)}", layout_of(trb.type), dw,
                       trb_text(trb), 4)
    layout, most = DECODE_CONTEXTS[kind]
    if not 1 <= len(dw) <= most:
        raise ValueError(f"{kind} takes 1 to {most} dwords (D0 D1 ...; missing ones read as "
                         f"0); {len(dw)} given")
    padded = dw + [0] * (layout.ndwords - len(dw))
    return Decoded(kind, layout.name, layout, padded, _CONTEXT_TEXT[kind](padded), len(dw))


def decode_view(words: Sequence[str]) -> Table | Group:
    d = decode_values(words)
    table = layout_table(d.title, d.layout, d.dwords, d.text)
    if d.given < len(d.dwords):
        return Group(table, Text(f"(dwords {d.given}..{len(d.dwords) - 1} were not given: read "
                                 f"as 0)", style="dim"))
    return table


def decode_data(words: Sequence[str]) -> Data:
    """`decode ... --json`."""
    d = decode_values(words)
    if d.kind == "trb":
        trb = Trb(0, d.dwords[0] | d.dwords[1] << 32, d.dwords[2], d.dwords[3])
        return {"kind": "trb", **trb_data(trb)}
    return {"kind": d.kind, "layout": d.layout.name, "dwords": d.dwords,
            **layout_data(d.layout, d.dwords, d.text)}


# ---- event rings and interrupters ------------------------------------------------------------
def recent_events(ir: Interrupter, count: int) -> list[tuple[int, Trb]]:
    """The last `count` event TRBs the interrupter wrote, oldest first."""
    if not ir.segments:
        return []
    out = []
    seg, idx = ir.seg, ir.enq_index
    mem = ir.mem
    for _ in range(min(count, sum(n for _, n in ir.segments))):
        idx -= 1
        if idx < 0:
            seg = (seg - 1) % len(ir.segments)
            idx = ir.segments[seg][1] - 1
        addr = ir.segments[seg][0] + idx * TRB_SIZE
        trb = read_trb(mem, addr)
        if trb is None or (trb.control == 0 and trb.param == 0):
            break
        out.append((addr, trb))
    return out[::-1]


def interrupter_at(controller: XhciController, index: int) -> Interrupter:
    if not 0 <= index < len(controller.interrupters):
        raise ValueError(f"interrupter {index} does not exist "
                         f"(0..{len(controller.interrupters) - 1})")
    return controller.interrupters[index]


def events_view(controller: XhciController, interrupter: int = 0, count: int = 8) -> Table:
    ir = interrupter_at(controller, interrupter)
    t = Table(title=f"event ring of interrupter {interrupter}: enqueue {ir.enqueue_pointer:#x} "
                    f"(PCS {ir.pcs}), ERDP {ir.erdp:#x}, {ir.posted} posted",
              box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("", width=5)
    t.add_column("address", justify="right", style="dim")
    t.add_column("C", justify="right")
    t.add_column("event (Linux xhci_decode_trb)")
    erdp = ir.erdp & ~0xF
    for addr, trb in recent_events(ir, count):
        mark = "ERDP" if addr == erdp else ""
        # events at or after ERDP are not consumed by software yet
        t.add_row(mark, f"{addr:#x}", str(trb.cycle), trb_text(trb))
    if not ir.segments:
        t.caption = "no event ring (ERSTSZ/ERSTBA not programmed)"
    return t


def events_data(controller: XhciController, interrupter: int = 0, count: int = 8) -> Data:
    """`events --json`: the event ring's state and its last events, oldest first."""
    ir = interrupter_at(controller, interrupter)
    erdp = ir.erdp & ~0xF
    return {"interrupter": interrupter, "enqueue": ir.enqueue_pointer, "pcs": ir.pcs,
            "erdp": ir.erdp, "posted": ir.posted, "set_up": bool(ir.segments),
            "events": [{"address": addr, "at_erdp": addr == erdp, **trb_data(trb)}
                       for addr, trb in recent_events(ir, count)]}


def active_interrupters(controller: XhciController) -> list[Interrupter]:
    """The interrupters software set up or that did something (the rest are all reset)."""
    return [ir for ir in controller.interrupters if ir.segments or ir.ie or ir.ip or ir.posted]


def interrupters_view(controller: XhciController, msix_counts: Sequence[int] | None = None
                      ) -> Table:
    t = Table(title="interrupters", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("#", "IMAN", "IMOD", "ERSTSZ", "ERSTBA", "ERDP", "enqueue", "PCS", "posted",
                "lost", "messages"):
        t.add_column(col, justify="right" if col not in ("IMAN",) else "left")
    for ir in active_interrupters(controller):
        iman = " ".join(n for n, v in (("IP", ir.ip), ("IE", ir.ie)) if v) or "-"
        t.add_row(str(ir.index), iman, f"{ir.imodi}/{ir.imodc}", str(ir.erstsz),
                  f"{ir.erstba:#x}", f"{ir.erdp:#x}{' EHB' if ir.ehb else ''}",
                  f"{ir.enqueue_pointer:#x}", str(ir.pcs), str(ir.posted), str(ir.lost),
                  str(msix_counts[ir.index]) if msix_counts is not None else "")
    if not t.row_count:
        t.caption = "no interrupter is set up"
    return t


def interrupters_data(controller: XhciController, msix_counts: Sequence[int] | None = None
                      ) -> list[Data]:
    """`interrupters --json`: the ones `interrupters` lists, every register and counter."""
    return [{"index": ir.index, "ip": ir.ip, "ie": ir.ie, "imodi": ir.imodi, "imodc": ir.imodc,
             "erstsz": ir.erstsz, "erstba": ir.erstba, "erdp": ir.erdp, "ehb": ir.ehb,
             "enqueue": ir.enqueue_pointer, "pcs": ir.pcs, "posted": ir.posted,
             "lost": ir.lost,
             "messages": msix_counts[ir.index] if msix_counts is not None else None}
            for ir in active_interrupters(controller)]


# ---- devices ----------------------------------------------------------------------------------
@dataclass
class DeviceSummary:
    """A plugged device with what the controller and the guest know of it."""

    port: int
    name: str
    description: str
    slot: int | None
    slot_state: str | None              # the controller's slot state
    guest_slot: int | None = None       # what the scripted guest enumerated
    guest_kind: str | None = None
    polling: list[int] | None = None    # interrupt IN endpoints the scripted guest polls


def device_summaries(session: Session, guest_devices: Mapping[int, GuestDevice] | None
                     ) -> list[DeviceSummary]:
    """`guest_devices`: the scripted guest's view (None when the guest is a real VM)."""
    out = []
    for port, dev in sorted(session.devices.items()):
        slot = slot_of_port(session.controller, port)
        row = DeviceSummary(port, dev.name, describe_device(dev), slot.id if slot else None,
                            SLOT_STATE_NAMES.get(slot.state, "?") if slot else None)
        gd = guest_devices.get(port) if guest_devices is not None else None
        if gd is not None:
            row.guest_slot, row.guest_kind, row.polling = gd.device.slot, gd.kind, gd.polling
        out.append(row)
    return out


def devices_view(session: Session, guest_devices: Mapping[int, GuestDevice] | None) -> Table:
    t = Table(title="devices", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("port", "device", "state (device side)", "slot", "guest"):
        t.add_column(col)
    for row in device_summaries(session, guest_devices):
        guest = ""
        if row.slot is not None and guest_devices is None:
            guest = f"slot {row.slot_state}"       # what the guest did
        if row.guest_kind is not None:
            guest = f"enumerated as slot {row.guest_slot}, {row.guest_kind}"
            if row.polling:
                guest += f", polling {', '.join(f'{a:#04x}' for a in row.polling)}"
        t.add_row(str(row.port), row.name, row.description,
                  "" if row.slot is None else str(row.slot), guest)
    if not session.devices:
        t.caption = "nothing is plugged in"
    return t


def devices_data(session: Session, guest_devices: Mapping[int, GuestDevice] | None
                 ) -> list[Data]:
    """`devices --json`."""
    return [asdict(row) for row in device_summaries(session, guest_devices)]


# ---- status line ------------------------------------------------------------------------------
def status_line(controller: XhciController) -> Text:
    sts = peek(controller, R.OP_BASE + R.USBSTS.offset)
    gate = controller.gate
    run = "running" if controller.running else "halted"
    pending = ", ".join(ring_key_name(k) for k in gate.pending)
    t = Text()
    t.append("PAUSED" if gate.paused else "RUNNING", style="bold red" if gate.paused
             else "bold green")
    t.append(f"  controller {run}, USBSTS{linux.decode_usbsts(sts)}")
    t.append(f"  slots {len(controller.slots)}  units run {gate.units}")
    if pending:
        t.append(f"  rings with work: {pending}", style="yellow")
    return t
