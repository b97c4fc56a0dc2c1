"""Read captures back: `xhcidbg trace show` (Linux-format text) and `xhcidbg trace stats`.

Reads xhcidbg's own files and any usbmon capture in pcap or pcapng (tcpdump or dumpcap on
usbmonN, QEMU's `pcap=` property, VirtualBox).  What it cannot show (other link types, damaged
records, a file cut short) it counts and says.
"""
from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, TextIO, cast

from xhcidbg.decode import usbmon as um
from xhcidbg.decode import xhci as lx
from xhcidbg.emu import regs
from xhcidbg.emu.context import EP_CTX, SLOT_CTX
from xhcidbg.emu.layout import Field
from xhcidbg.emu.trb import GENERIC, TrbType, layout_of

from . import records
from .filters import CaptureFilter, dci_of_address
from .pcapng import (
    LINKTYPE_USB_LINUX,
    LINKTYPE_USB_LINUX_MMAPPED,
    Capture,
    CaptureError,
    read_capture,
)
from .records import CTX_INPUT_CONTROL, CTX_SLOT, Kind

if TYPE_CHECKING:
    from rich.console import Console

READABLE = {LINKTYPE_USB_LINUX_MMAPPED: "usbmon", LINKTYPE_USB_LINUX: "usbmon (48-byte)",
            records.LINKTYPE: "xhcidbg xHCI records"}
KIND_NAMES = {Kind.MMIO: "mmio", Kind.DOORBELL: "doorbell", Kind.TRB: "trb", Kind.EVENT: "event",
              Kind.COMMAND: "command", Kind.PORT: "port", Kind.INTERRUPT: "interrupt",
              Kind.CONTEXT: "context", Kind.STATE: "state", Kind.LOG: "log", Kind.URB: "xurb",
              Kind.FAULT: "fault"}

# Linux tracepoint names for the contexts read after each command: (command TRB type, context)
_CTX_EVENTS: dict[tuple[int, str], str] = {
    (TrbType.ADDRESS_DEVICE, "slot"): "xhci_handle_cmd_addr_dev",
    (TrbType.ADDRESS_DEVICE, "ep"): "xhci_add_endpoint",
    (TrbType.ADDRESS_DEVICE, "ctrl"): "xhci_address_ctrl_ctx",
    (TrbType.CONFIGURE_ENDPOINT, "slot"): "xhci_configure_endpoint",
    (TrbType.CONFIGURE_ENDPOINT, "ep"): "xhci_handle_cmd_config_ep",
    (TrbType.CONFIGURE_ENDPOINT, "ctrl"): "xhci_configure_endpoint_ctrl_ctx",
    (TrbType.EVALUATE_CONTEXT, "slot"): "xhci_handle_cmd_evaluate_ctx",
    (TrbType.EVALUATE_CONTEXT, "ep"): "xhci_handle_cmd_evaluate_ctx_ep",
    (TrbType.EVALUATE_CONTEXT, "ctrl"): "xhci_evaluate_ctrl_ctx",
    (TrbType.RESET_ENDPOINT, "ep"): "xhci_handle_cmd_reset_ep",
    (TrbType.STOP_ENDPOINT, "ep"): "xhci_handle_cmd_stop_ep",
    (TrbType.SET_TR_DEQUEUE, "slot"): "xhci_handle_cmd_set_deq",
    (TrbType.SET_TR_DEQUEUE, "ep"): "xhci_handle_cmd_set_deq_ep",
    (TrbType.RESET_DEVICE, "slot"): "xhci_handle_cmd_reset_dev",
}


def trb_type(trb: Sequence[int]) -> int:
    """The TRB Type of a captured TRB (its four dwords)."""
    return GENERIC.get(trb, "type")


def trb_field(trb: Sequence[int], name: str) -> int:
    """Field `name` of a captured TRB, as the controller declares its type; 0 when that type has
    no such field (the bits are reserved there, and the controller writes them 0)."""
    f: Field | None = layout_of(trb_type(trb)).by_name.get(name)
    return 0 if f is None else f.get(trb)


@dataclass
class Entry:
    ts_ns: int
    interface: int
    kind: str                      # a filters.KINDS name ('urb' for usbmon)
    record: records.Record | um.UsbmonRecord
    comment: str = ""
    slot: int = 0
    dci: int = 0
    bus: int | None = None
    port: int | None = None


@dataclass
class Problems:
    """What could not be shown, for the closing summary."""

    skipped: Counter[int] = field(default_factory=Counter)  # interface -> packets
    damaged: Counter[str] = field(default_factory=Counter)  # reason -> packets
    truncated: bool = False

    def lines(self, cap: Capture) -> list[str]:
        out = []
        for idx, n in sorted(self.skipped.items()):
            i = cap.interfaces[idx]
            out.append(f"interface {idx} ({i.name or 'unnamed'}, link type {i.linktype}): {n} "
                       f"packets not shown -- xhcidbg reads usbmon (link types 220, 189) and "
                       f"its own xHCI records ({records.LINKTYPE})")
        for why, n in sorted(self.damaged.items()):
            out.append(f"{n} packets could not be decoded: {why}")
        if self.truncated:
            out.append("the file ends in the middle of a block (the capture was cut short); "
                       "everything before that point was read")
        return out


class Reader:
    """Decode a capture into `Entry`s, keeping what it learns (slot -> port, endpoint types)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.problems = Problems()
        self.capture: Capture | None = None
        self.slot_port: dict[int, int] = {}
        self.ep_type: dict[tuple[int, int], int] = {}

    def entries(self) -> Iterator[Entry]:
        with self._open() as f:
            cap, packets = read_capture(f)
            self.capture = cap
            for pkt in packets:
                iface = cap.interfaces[pkt.interface]
                try:
                    if iface.linktype == records.LINKTYPE:
                        entry = self._xhci(pkt.data)
                    elif iface.linktype in (LINKTYPE_USB_LINUX_MMAPPED, LINKTYPE_USB_LINUX):
                        rec = um.UsbmonRecord.parse(pkt.data, iface.byteorder)
                        entry = Entry(0, 0, "urb", rec, bus=rec.busnum,
                                      dci=dci_of_address(rec.epnum))
                    else:
                        self.problems.skipped[pkt.interface] += 1
                        continue
                except (ValueError, IndexError) as e:
                    self.problems.damaged[str(e)] += 1
                    continue
                entry.ts_ns, entry.interface, entry.comment = pkt.ts_ns, pkt.interface, pkt.comment
                if entry.slot and entry.port is None:
                    entry.port = self.slot_port.get(entry.slot)
                yield entry
            self.problems.truncated = cap.truncated

    def _open(self) -> BinaryIO:
        try:
            return open(self.path, "rb")
        except OSError as e:
            raise CaptureError(f"cannot open {self.path}: {e.strerror}") from None

    def _xhci(self, data: bytes) -> Entry:
        rec = records.parse(data)
        f = rec.fields
        e = Entry(0, 0, KIND_NAMES[Kind(rec.kind)], rec)
        k = rec.kind
        if k == Kind.URB:
            usb = um.UsbmonRecord.parse(rec.tail)
            e.record, e.kind, e.bus = usb, "xurb", usb.busnum
            e.slot, e.dci = f["slot"], f["dci"]
        elif k == Kind.TRB:
            e.slot, e.dci = f["slot"], f["dci"]
            if f["ring"] == records.Ring.COMMAND:
                e.slot = trb_field(rec.dwords[4:8], "slot")    # the slot the command is about
        elif k == Kind.DOORBELL:
            e.slot, e.dci = f["db"], f["target"] if f["db"] else 0
        elif k == Kind.EVENT:
            trb = rec.dwords[4:8]
            t = trb_type(trb)
            e.slot = trb_field(trb, "slot")
            if t == TrbType.TRANSFER_EVENT:
                e.dci = trb_field(trb, "ep")
            elif t == TrbType.PORT_STATUS_CHANGE:
                e.port = trb_field(trb, "port")
        elif k == Kind.COMMAND:
            e.slot = f["slot"]
        elif k == Kind.PORT:
            e.port = f["port"]
        elif k == Kind.MMIO and rec.text.startswith("PORT") and rec.text.endswith("]"):
            e.port = int(rec.text[rec.text.index("[") + 1:-1])
        elif k == Kind.CONTEXT:
            e.slot, dci = f["slot"], f["dci"]
            ctx = rec.dwords[4:12]
            if dci == CTX_SLOT and SLOT_CTX.get(ctx, "root_hub_port"):
                self.slot_port[e.slot] = SLOT_CTX.get(ctx, "root_hub_port")
            elif 1 <= dci <= 31:
                e.dci = dci
                self.ep_type[(e.slot, dci)] = EP_CTX.get(ctx, "ep_type")
        return e


def matches(flt: CaptureFilter, e: Entry) -> bool:
    if e.kind not in flt.kinds and not (e.kind == "xurb" and "urb" in flt.kinds):
        return False
    if flt.buses is not None and e.bus is not None and e.bus not in flt.buses:
        return False
    if flt.ports is not None and e.port is not None and e.port not in flt.ports:
        return False
    if flt.slots is not None and e.slot and e.slot not in flt.slots:
        return False
    if flt.dcis is not None and e.dci and e.dci not in flt.dcis:
        return False
    # a usbmon record has no slot: it cannot be shown as one's
    return not (e.kind == "urb" and flt.slots is not None)


# ---- show ----------------------------------------------------------------------------------------
def format_entry(e: Entry, reader: Reader, t0: int, dma: bool = True) -> str:
    ts = f"{(e.ts_ns - t0) / 1e9:12.6f}"
    rec = e.record
    if isinstance(rec, um.UsbmonRecord):
        line = f"{ts}: usbmon: {um.text_line(rec)}"
    else:
        line = f"{ts}: {_xhci_text(rec, reader, dma)}"
    if e.comment:
        line += "".join(f"\n{'':14}# {c}" for c in e.comment.splitlines())
    return line


def _xhci_text(rec: records.Record, reader: Reader, dma: bool) -> str:
    k, f, dw = rec.kind, rec.fields, rec.dwords

    def at(address: int) -> int | None:
        return address if dma else None

    if k == Kind.TRB:
        trb = dw[4:8]
        if f["ring"] == records.Ring.COMMAND:
            ring = "CMD"
        else:
            ring = lx.ring_type_of(trb_type(trb), reader.ep_type.get((f["slot"], f["dci"])),
                                   f["stream"])
        return "xhci_fetch_trb: " + _trb_line(ring, trb, at(f["address"]))
    if k == Kind.EVENT:
        drop = " [dropped]" if f["dropped"] else ""
        return "xhci_handle_event: " + _trb_line("EVENT", dw[4:8], at(f["address"])) + drop
    if k == Kind.COMMAND:
        return "xhci_handle_command: " + _trb_line("CMD", dw[4:8], at(f["address"]))
    if k == Kind.CONTEXT:
        dci, reason, ctx = f["dci"], f["reason"], dw[4:12]
        if dci == CTX_SLOT:
            name = _CTX_EVENTS.get((reason, "slot"), "xhci_slot_ctx")
            return f"{name}: " + lx.decode_slot_context(*ctx[:4])
        if dci == CTX_INPUT_CONTROL:
            name = _CTX_EVENTS.get((reason, "ctrl"), "xhci_ctrl_ctx")
            return f"{name}: " + lx.decode_ctrl_ctx(ctx[0], ctx[1])
        name = _CTX_EVENTS.get((reason, "ep"), "xhci_ep_ctx")
        return f"{name}: " + lx.decode_ep_context(ctx[0], ctx[1], ctx[2] | ctx[3] << 32, ctx[4])
    if k == Kind.PORT:
        return f"xhci_handle_port_status: port-{f['port']}: {lx.decode_portsc(f['new'])}"
    if k == Kind.DOORBELL:
        doorbell = regs.DOORBELL.layout.encode(target=f["target"], stream=f["stream"])[0]
        return "xhci_ring_ep_doorbell: Ring doorbell for " + lx.decode_doorbell(f["db"], doorbell)
    if k == Kind.MMIO:
        name, value, size = rec.text, f["value"], f["size"]
        text = (f"mmio: {'write' if f['write'] else 'read '} {name} "
                f"{'=' if f['write'] else '->'} 0x{value:0{2 * max(1, min(size, 8))}x}")
        base = name.split("[")[0]
        if base == "PORTSC":
            text += f" ({lx.decode_portsc(value & 0xFFFFFFFF).rstrip()})"
        elif base == "USBSTS":
            text += f" ({lx.decode_usbsts(value & 0xFFFFFFFF).strip()})"
        return text
    if k == Kind.INTERRUPT:
        return f"irq: interrupter {f['interrupter']}"
    if k == Kind.STATE:
        parts = (rec.tail.split(b"\0") + [b""] * 4)[:4]
        kind, ident, old, new = (p.decode("utf-8", "replace") for p in parts)
        return f"state: {kind} {ident}: {old} -> {new}"
    if k == Kind.LOG:
        lv = records.LOG_LEVELS[f["level"]] if f["level"] < len(records.LOG_LEVELS) else "?"
        return f"log: [{lv}] {rec.text}"
    if k == Kind.FAULT:
        return rec.text
    return f"record kind {k}"


def _trb_line(ring: str, trb: Sequence[int], dma: int | None) -> str:
    f0, f1, f2, f3 = trb
    return lx.trb_line(ring, f0, f1, f2, f3, dma=dma)


def show(path: str | Path, flt: CaptureFilter | None = None, out: TextIO | None = None,
         dma: bool = True, limit: int | None = None) -> Reader:
    import sys
    out = out or sys.stdout
    flt = flt or CaptureFilter(kinds=frozenset(KIND_NAMES.values()) | {"urb"})
    reader = Reader(path)
    t0 = None
    shown = 0
    for e in reader.entries():
        if t0 is None:
            t0 = e.ts_ns
        if not matches(flt, e):
            continue
        out.write(format_entry(e, reader, t0, dma) + "\n")
        shown += 1
        if limit is not None and shown >= limit:
            break
    return reader


# ---- stats ---------------------------------------------------------------------------------------
@dataclass
class EndpointStats:
    transfers: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ns: list[int] = field(default_factory=list)


INTERFACE_CLASSES = {1: "audio", 2: "CDC", 3: "HID", 6: "image", 7: "printer",
                     8: "mass storage", 9: "hub", 0x0A: "CDC data", 0x0E: "video",
                     0xE0: "wireless", 0xEF: "misc", 0xFF: "vendor"}
_GET_DESCRIPTOR, _SET_CONFIGURATION = 6, 9


@dataclass
class DeviceInfo:
    """A USB device as its enumeration shows it: what the host read from it (usbmon) and,
    in xhcidbg's own captures, the slot, root port and speed the controller gave it."""

    bus: int
    address: int
    vendor: int | None = None
    product_id: int | None = None
    usb_version: str = ""
    strings: dict[int, str] = field(default_factory=dict)
    string_index: dict[str, int] = field(default_factory=dict)   # manufacturer/product/serial
    interfaces: list[int] = field(default_factory=list)          # bInterfaceClass, in order
    configuration: int | None = None                             # SET_CONFIGURATION value
    slot: int | None = None
    port: int | None = None
    speed: str = ""
    session: int = 1          # which host enumerated it: a controller reset starts the next

    def string(self, which: str) -> str:
        return self.strings.get(self.string_index.get(which, 0), "")

    @property
    def interface_classes(self) -> str:
        return ", ".join(INTERFACE_CLASSES.get(c, f"class 0x{c:02x}") for c in self.interfaces)


class _DeviceDescriptor(Protocol):
    """The fields of a parsed device descriptor this module reads."""

    idVendor: int
    idProduct: int
    bcdUSB: float
    iManufacturer: int
    iProduct: int
    iSerialNumber: int


class _InterfaceDescriptor(Protocol):
    bInterfaceClass: int
    bAlternateSetting: int


def _learn_descriptor(dev: DeviceInfo, setup: bytes, data: bytes) -> None:
    """Fill `dev` from a GET_DESCRIPTOR answer (partial answers count as far as they go)."""
    from xhcidbg.devices.descriptors import parse_descriptors
    kind, index = setup[3], setup[2]
    parsed = parse_descriptors(data)
    if kind == 1 and parsed and hasattr(parsed[0][1], "idVendor"):
        # A construct Container (construct has no types): having idVendor, it is a device
        # descriptor, and has all the fields of one.
        d = cast(_DeviceDescriptor, parsed[0][1])
        dev.vendor, dev.product_id = d.idVendor, d.idProduct
        dev.usb_version = f"{d.bcdUSB:.2f}"
        dev.string_index = {"manufacturer": d.iManufacturer, "product": d.iProduct,
                            "serial": d.iSerialNumber}
    elif kind == 2 and len(parsed) > 1:          # the whole configuration, not its head
        # Containers again: one with bInterfaceClass is an interface descriptor.
        interfaces = [cast(_InterfaceDescriptor, p) for name, p in parsed
                      if name == "INTERFACE" and hasattr(p, "bInterfaceClass")]
        dev.interfaces = [i.bInterfaceClass for i in interfaces if i.bAlternateSetting == 0]
    elif kind == 3 and index and parsed and hasattr(parsed[0][1], "bString"):
        dev.strings[index] = parsed[0][1].bString


@dataclass
class CaptureStats:
    """What `collect_stats` counted in a capture."""

    reader: Reader
    usb: dict[tuple[int, int, int], EndpointStats]   # (bus, device, endpoint) -> transfers
    xhci_cc: dict[tuple[int, int], Counter[str]]     # (slot, DCI) -> completion codes
    kinds: Counter[str]                              # record kind -> records
    devices: list[DeviceInfo]


def collect_stats(path: str | Path, flt: CaptureFilter | None = None) -> CaptureStats:
    flt = flt or CaptureFilter(kinds=frozenset(KIND_NAMES.values()) | {"urb"})
    reader = Reader(path)
    usb: dict[tuple[int, int, int], EndpointStats] = defaultdict(EndpointStats)
    xhci_cc: dict[tuple[int, int], Counter[str]] = defaultdict(Counter)
    kinds: Counter[str] = Counter()
    pending: dict[tuple[int, int], int] = {}
    setups: dict[tuple[int, int], bytes] = {}        # control requests waiting for an answer
    devices: dict[tuple[int, int], DeviceInfo] = {}
    slots: dict[int, tuple[int, int, int]] = {}      # slot -> (address, root port, speed)
    done: list[DeviceInfo] = []                      # devices of the hosts before a reset
    session = 1
    for e in reader.entries():
        if not matches(flt, e):
            continue
        kinds[e.kind] += 1
        rec = e.record
        if isinstance(rec, um.UsbmonRecord):
            if e.kind == "xurb" and _has_usbmon(reader):
                continue            # the usbmon interfaces carry the same transfers
            key = (rec.busnum, rec.devnum, rec.epnum)
            st = usb[key]
            if rec.type == "S":
                pending[(rec.busnum, rec.id)] = e.ts_ns
                if rec.xfer_type == um.XFER_CONTROL and rec.flag_setup == um.FLAG_PRESENT:
                    setups[(rec.busnum, rec.id)] = rec.setup
            else:
                st.transfers += 1
                if rec.status not in (0, -115):
                    st.errors[um.errno_name(rec.status)] += 1
                elif rec.type == "C":
                    if rec.is_in:
                        st.bytes_in += rec.length
                    else:
                        st.bytes_out += rec.length
                start = pending.pop((rec.busnum, rec.id), None)
                if start is not None:
                    st.latencies_ns.append(e.ts_ns - start)
                setup = setups.pop((rec.busnum, rec.id), None)
                if setup is not None and rec.type == "C" and rec.status == 0 and rec.devnum:
                    dev = devices.get((rec.busnum, rec.devnum))
                    if dev is None:
                        dev = devices[(rec.busnum, rec.devnum)] = DeviceInfo(
                            rec.busnum, rec.devnum, session=session)
                    if setup[0] == 0x80 and setup[1] == _GET_DESCRIPTOR and rec.data:
                        _learn_descriptor(dev, setup, rec.data)
                    elif setup[0] == 0x00 and setup[1] == _SET_CONFIGURATION:
                        dev.configuration = setup[2]
        elif rec.kind == Kind.EVENT and trb_type(rec.dwords[4:8]) == TrbType.TRANSFER_EVENT:
            xhci_cc[(e.slot, e.dci)][lx.cc_string(trb_field(rec.dwords[4:8], "cc"))] += 1
        elif rec.kind == Kind.CONTEXT and rec.fields["dci"] == CTX_SLOT:
            ctx = SLOT_CTX.decode(rec.dwords[4:12])
            if ctx["usb_address"]:                   # addressed: the address is the xHC's
                slots[e.slot] = (ctx["usb_address"], ctx["root_hub_port"], ctx["speed"])
        elif rec.kind == Kind.STATE and rec.tail.startswith(b"controller\0") \
                and rec.tail.endswith(b"\0HCRST"):
            # a reset: what follows is another host's enumeration (firmware, then the OS)
            if devices:
                done += _resolve(devices, slots)
                session += 1
            devices, slots, setups = {}, {}, {}
    return CaptureStats(reader=reader, usb=usb, xhci_cc=xhci_cc, kinds=kinds,
                        devices=done + _resolve(devices, slots))


def _has_usbmon(reader: Reader) -> bool:
    """Whether the capture has usbmon interfaces (besides xhcidbg's own records)."""
    cap = reader.capture
    assert cap is not None, "Reader.entries reads the file's header before its first entry"
    return any(i.linktype in (LINKTYPE_USB_LINUX_MMAPPED, LINKTYPE_USB_LINUX)
               for i in cap.interfaces)


def _resolve(devices: dict[tuple[int, int], DeviceInfo],
             slots: dict[int, tuple[int, int, int]]) -> list[DeviceInfo]:
    """Devices in (bus, address) order, with the slot the controller addressed them in (our
    controller's addresses are unique per controller, so the address finds the slot)."""
    by_address = {address: (slot, port, speed) for slot, (address, port, speed) in slots.items()}
    for dev in devices.values():
        if dev.address in by_address:
            dev.slot, dev.port, speed = by_address[dev.address]
            dev.speed = lx.SPEEDS.get(speed, "")
    return [devices[k] for k in sorted(devices)]


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.3f}"


def stats(path: str | Path, flt: CaptureFilter | None = None,
          console: Console | None = None) -> Reader:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    st = collect_stats(path, flt)
    reader, usb, xhci_cc, kinds = st.reader, st.usb, st.xhci_cc, st.kinds
    cap = reader.capture
    assert cap is not None, "collect_stats read the whole capture"
    console.print(f"[bold]{path}[/]: {cap.format}, {len(cap.interfaces)} interfaces, "
                  f"{sum(kinds.values())} records "
                  f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})")
    if st.devices:
        sessions = len({d.session for d in st.devices}) > 1
        t = Table(title="USB devices (as their enumeration shows them"
                  + ("; the host changes at each controller reset)" if sessions else ")"))
        if sessions:
            t.add_column("host", justify="right")
        for col in ("bus", "device", "ID", "USB", "interfaces", "config", "manufacturer",
                    "product", "slot", "port", "speed"):
            t.add_column(col, justify="right" if col in ("bus", "device", "config", "slot",
                                                         "port") else "left")
        for d in st.devices:
            t.add_row(*([str(d.session)] if sessions else []), str(d.bus), str(d.address),
                      f"{d.vendor:04x}:{d.product_id:04x}" if d.vendor is not None else "-",
                      d.usb_version or "-", d.interface_classes or "-",
                      "-" if d.configuration is None else str(d.configuration),
                      d.string("manufacturer") or "-", d.string("product") or "-",
                      "-" if d.slot is None else str(d.slot),
                      "-" if d.port is None else str(d.port), d.speed or "-")
        console.print(t)
    if usb:
        t = Table(title="USB transfers by device and endpoint (usbmon)")
        for col in ("bus", "device", "endpoint", "transfers", "bytes in", "bytes out", "errors",
                    "latency ms min/avg/max"):
            t.add_column(col, justify="right" if col not in ("errors", "endpoint") else "left")
        for (bus, dev, ep), es in sorted(usb.items()):
            lat = es.latencies_ns
            t.add_row(str(bus), str(dev), f"{ep & 0x7F} {'in' if ep & 0x80 else 'out'}",
                      str(es.transfers), str(es.bytes_in), str(es.bytes_out),
                      ", ".join(f"{n} x{c}" for n, c in es.errors.most_common()) or "-",
                      f"{_ms(min(lat))}/{_ms(statistics.fmean(lat))}/{_ms(max(lat))}"
                      if lat else "-")
        console.print(t)
    if xhci_cc:
        t = Table(title="Transfer events by slot and endpoint (completion codes)")
        for col in ("slot", "DCI", "events", "completion codes"):
            t.add_column(col, justify="left" if col == "completion codes" else "right")
        for (slot, dci), cc in sorted(xhci_cc.items()):
            t.add_row(str(slot), str(dci), str(sum(cc.values())),
                      ", ".join(f"{n} x{c}" for n, c in cc.most_common()))
        console.print(t)
    for line in reader.problems.lines(cap):
        console.print(f"[yellow]note:[/] {line}")
    return reader
