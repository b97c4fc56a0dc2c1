"""Rich views of the controller: registers, ports, slots and contexts, rings, events.

Every field shown here comes from the one `Layout` declaration of its register, TRB or context
(xhcidbg.emu.regs, .trb, .context); the one-line summaries are Linux's own decoders
(xhcidbg.decode.xhci), the text a driver author already reads in tracepoints and debugfs.
Nothing here changes controller state or announces anything on its hooks.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..decode import xhci as linux  # Linux's decoders: the text driver authors read
from ..devices import UsbDevice
from ..devices.standard import StandardDevice
from ..emu import regs as R
from ..emu.context import EP_CTX, EP_STATE_NAMES, EP_TYPE_NAMES, SLOT_CTX, SLOT_STATE_NAMES
from ..emu.controller import XhciController
from ..emu.interrupters import Interrupter
from ..emu.layout import Field, Layout
from ..emu.memory import DmaError, GuestMemory
from ..emu.rings import Ring
from ..emu.slots import DeviceSlot
from ..emu.trb import TRB_SIZE, Trb, TrbType, cc_name, layout_of, trb_name


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


def layout_table(title: str, layout: Layout, dw: Sequence[int], note: str = ""
                 ) -> Table | Group:
    """Every field of `layout` over `dw`: bits, value and what it means; `note` (a one-line
    decode) goes underneath."""
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("field", style="cyan")
    t.add_column("bits", justify="right", style="dim")
    t.add_column("value", justify="right")
    t.add_column("meaning", style="dim")
    for f in layout.fields:
        v = f.get(dw)
        t.add_row(f.name, bits(f), Text(fmt_value(f, v), style="bold" if v else "dim"),
                  _meaning(layout, f, v) or f.doc)
    return Group(t, Text(note, style="italic")) if note else t


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


def regs_view(controller: XhciController) -> Group:
    parts = []
    for section, base, regs in register_blocks(controller):
        t = Table(title=f"{section} registers", box=box.SIMPLE_HEAD, title_justify="left")
        t.add_column("register", style="cyan")
        t.add_column("offset", justify="right", style="dim")
        t.add_column("value", justify="right")
        t.add_column("fields")
        for r in regs:
            off = base + r.offset
            v = peek(controller, off)
            extra = ""
            if r is R.USBSTS and linux is not None:
                extra = f"  [{linux.decode_usbsts(v).strip()}]"
            t.add_row(r.name, f"{off:#06x}", f"{v:#010x}", fields_inline(r.layout, [v]) + extra)
        parts.append(t)
    return Group(*parts)


def register_view(controller: XhciController, name: str, index: int | None = None
                  ) -> Table | Group:
    r, off, label = find_register(controller, name, index)
    v = peek(controller, off)
    return layout_table(f"{label} @ BAR0+{off:#06x} = {v:#010x}", r.layout, [v], r.doc)


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


def slots_view(controller: XhciController) -> Table:
    t = Table(title="device slots", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("slot", "port", "state", "address", "speed", "device", "endpoints"):
        t.add_column(col, justify="right" if col in ("slot", "port", "address") else "left")
    for sid in sorted(controller.slots):
        s = controller.slots[sid]
        ctx = s.ctx
        eps = " ".join(f"{ep_name(d)}:{EP_STATE_NAMES.get(e.state, '?')}"
                       for d, e in sorted(s.endpoints.items()))
        dev = s.device
        t.add_row(str(sid), str(s.port.number) if s.port else "-",
                  SLOT_STATE_NAMES.get(s.state, "?"), str(SLOT_CTX.get(ctx, "usb_address")),
                  _speed(SLOT_CTX.get(ctx, "speed")), dev.name if dev else "", eps)
    if not controller.slots:
        t.caption = "no slot is enabled"
    return t


def _speed(v: int) -> str:
    return {1: "full", 2: "low", 3: "high", 4: "super", 5: "super+"}.get(v, "-")


def slot_view(controller: XhciController, slot_id: int, dci: int | None = None) -> Group:
    s = controller.slots.get(slot_id)
    if s is None:
        raise ValueError(f"slot {slot_id} is not enabled (enabled: "
                         f"{', '.join(map(str, sorted(controller.slots))) or 'none'})")
    if dci is not None:
        ep = s.endpoints.get(dci)
        if ep is None:
            raise ValueError(f"slot {slot_id} has no endpoint with DCI {dci} "
                             f"(has {sorted(s.endpoints)})")
        dw = list(ep.ctx)
        EP_CTX["dequeue"].set(dw, ep.ring.dequeue >> 4)    # live, not last written back
        EP_CTX["dcs"].set(dw, ep.ring.ccs)
        line = linux.decode_ep_context(dw[0], dw[1], dw[2] | (dw[3] << 32), dw[4])
        return Group(layout_table(f"slot {slot_id} {ep_name(dci)} (DCI {dci}) endpoint context",
                                  EP_CTX, dw, line),
                     Text(f"in flight: {len(ep.inflight)} TD(s)"
                          f"{', assembling one' if ep.building else ''}"))
    ctx = s.ctx
    line = linux.decode_slot_context(*ctx[:4])
    parts = [layout_table(f"slot {slot_id} slot context", SLOT_CTX, ctx, line)]
    t = Table(title=f"slot {slot_id} endpoints", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("dci", "ep", "type", "state", "maxp", "interval", "dequeue", "ccs", "in flight"):
        t.add_column(col)
    for d, ep in sorted(s.endpoints.items()):
        c = ep.ctx
        t.add_row(str(d), ep_name(d), EP_TYPE_NAMES.get(EP_CTX.get(c, "ep_type"), "?"),
                  EP_STATE_NAMES.get(ep.state, "?"), str(EP_CTX.get(c, "max_packet")),
                  str(EP_CTX.get(c, "interval")), f"{ep.ring.dequeue:#x}", str(ep.ring.ccs),
                  str(len(ep.inflight)))
    parts.append(t)
    return Group(*parts)


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


def ring_view(controller: XhciController, name: str, before: int = 4, after: int = 8) -> Table:
    ring, kind = ring_of(controller, name)
    mem = controller.mem
    t = Table(title=f"{kind} ring {name}: dequeue {ring.dequeue:#x}, cycle state {ring.ccs}",
              box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("", width=2)
    t.add_column("address", justify="right", style="dim")
    t.add_column("C", justify="right")
    t.add_column("TRB (Linux xhci_decode_trb)")
    for i in range(before, 0, -1):
        addr = ring.dequeue - i * TRB_SIZE
        trb = read_trb(mem, addr) if addr >= 0 else None
        if trb is not None and (trb.param or trb.status or trb.control):
            t.add_row("", f"{addr:#x}", str(trb.cycle), Text(trb_text(trb), style="dim"))
    addr, ccs = ring.dequeue, ring.ccs
    for i in range(after):
        trb = read_trb(mem, addr)
        if trb is None:
            t.add_row("", f"{addr:#x}", "", Text("(not readable guest memory)", style="red"))
            break
        owned = trb.cycle == ccs
        mark = "->" if i == 0 else ""
        style = "bold" if owned else "dim"
        if not (trb.param or trb.status or trb.control):
            label = "(empty: nothing queued here yet)"
        else:
            label = trb_text(trb) + ("" if owned else "   [software's: cycle bit not ours]")
        t.add_row(mark, f"{addr:#x}", str(trb.cycle), Text(label, style=style))
        if not owned:
            break
        if trb.type == TrbType.LINK:
            if trb.control & 2:
                ccs ^= 1
            addr = trb.param & ~0xF
        else:
            addr += TRB_SIZE
    return t


def trb_view(controller: XhciController, addr: int) -> Table | Group:
    trb = read_trb(controller.mem, addr)
    if trb is None:
        raise ValueError(f"guest address {addr:#x} is not readable")
    lay = layout_of(trb.type)
    return layout_table(f"TRB @ {addr:#x}: {trb_name(trb.type)}", lay, trb.dwords, trb_text(trb))


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


def events_view(controller: XhciController, interrupter: int = 0, count: int = 8) -> Table:
    if not 0 <= interrupter < len(controller.interrupters):
        raise ValueError(f"interrupter {interrupter} does not exist "
                         f"(0..{len(controller.interrupters) - 1})")
    ir = controller.interrupters[interrupter]
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


def interrupters_view(controller: XhciController, msix_counts: Sequence[int] | None = None
                      ) -> Table:
    t = Table(title="interrupters", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("#", "IMAN", "IMOD", "ERSTSZ", "ERSTBA", "ERDP", "enqueue", "PCS", "posted",
                "lost", "messages"):
        t.add_column(col, justify="right" if col not in ("IMAN",) else "left")
    for ir in controller.interrupters:
        if not (ir.segments or ir.ie or ir.ip or ir.posted):
            continue
        iman = " ".join(n for n, v in (("IP", ir.ip), ("IE", ir.ie)) if v) or "-"
        t.add_row(str(ir.index), iman, f"{ir.imodi}/{ir.imodc}", str(ir.erstsz),
                  f"{ir.erstba:#x}", f"{ir.erdp:#x}{' EHB' if ir.ehb else ''}",
                  f"{ir.enqueue_pointer:#x}", str(ir.pcs), str(ir.posted), str(ir.lost),
                  str(msix_counts[ir.index]) if msix_counts is not None else "")
    if not t.row_count:
        t.caption = "no interrupter is set up"
    return t


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
