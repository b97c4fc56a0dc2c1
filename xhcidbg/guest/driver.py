"""A small, complete xHCI host driver, written from the xHCI 1.2 specification.

It talks to a controller only through a bus: MMIO reads and writes of BAR0, guest RAM it
allocates itself (every structure the controller reads by DMA lives there), per-interrupter
interrupt counts, and `bus.wait(until, timeout_ns)` to let time pass.  It never looks inside
the controller: if something works here, it works the way a guest OS would see it.

    drv = XhciDriver(bus).start()
    dev = drv.enumerate(drv.wait_for_connect())
    dev.control(0x80, 6, 0x0100, 0, 18).data

Layout of the package: `regs` (register map), `alloc` (guest RAM bookkeeping), `rings`
(producer and event rings), this module (bring-up, interrupters, events, commands, ports),
`device` (slots, endpoints, transfers, enumeration), `descriptors`, and class helpers.
"""
from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypedDict, Unpack, cast

from ..devices.base import Speed
from ..emu.trb import CC, TrbType, cc_name, trb_name
from . import regs as R
from . import trb as T
from .alloc import GuestAllocator, GuestRam
from .errors import CommandFailed, ControllerError, NoDevice, XhciError, XhciTimeout
from .fields import address_field, field_mask, flag, placed, read, shift_mask
from .rings import Block, EventRing, ProducerRing

if TYPE_CHECKING:
    from .device import Device, EnumerateOptions, Transfer

MS = 1_000_000
DEFAULT_TIMEOUT_NS = 2000 * MS

# Event fields the interrupt handler reads for every event, precomputed (6.4.2)
_TRANSFER_EVENT = T.LAYOUTS[TrbType.TRANSFER_EVENT]
_CC_SHIFT, _CC_MASK = shift_mask(T.CC, 2)
_LENGTH_SHIFT, _LENGTH_MASK = shift_mask(_TRANSFER_EVENT["length"], 2)
_SLOT_SHIFT, _SLOT_MASK = shift_mask(T.SLOT, 3)
_TYPE_SHIFT, _TYPE_MASK = shift_mask(T.TYPE, 3)
_EP_SHIFT, _EP_MASK = shift_mask(T.ENDPOINT, 3)
_ED = flag(_TRANSFER_EVENT["ed"])
_PORT_SHIFT, _PORT_MASK = shift_mask(T.LAYOUTS[TrbType.PORT_STATUS_CHANGE]["port"], 0)
_CYCLE = flag(T.CYCLE)
_TRB_ADDRESS = ~(T.TRB_SIZE - 1)     # TRBs are 16-byte aligned: pointer bits 3:0 are reserved
_SET_TR_DEQUEUE_POINTER = T.LAYOUTS[TrbType.SET_TR_DEQUEUE]["pointer"]
_FORCE_HEADER_LO = T.LAYOUTS[TrbType.FORCE_HEADER]["header_lo"]


# ---- what the driver needs of its bus -----------------------------------------------------------
class RamRegion(Protocol):
    """One mapped range of guest RAM."""

    @property
    def end(self) -> int: ...


class BusRam(GuestRam, Protocol):
    """The bus's guest RAM: what the guest reads and writes, and where it ends."""

    @property
    def regions(self) -> Sequence[RamRegion]: ...


class GuestBus(Protocol):
    """All the driver reaches the controller through: BAR0 MMIO, guest RAM, how many
    interrupt messages each interrupter has sent, and a way to let time pass."""

    @property
    def mem(self) -> BusRam: ...

    @property
    def interrupts(self) -> Sequence[int]: ...

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...

    def wait(self, until: Callable[[], bool], timeout_ns: int) -> bool: ...


class IntxLine(Protocol):
    """A bus in INTx mode (`mode == "intx"`) also carries the level of its shared line."""

    @property
    def intx(self) -> bool: ...


# ---- what the controller told us at start-up ----------------------------------------------------
@dataclass
class SupportedProtocol:
    """One xHCI Supported Protocol capability (7.2): which root ports speak which USB."""

    major: int
    minor: int
    name: str
    port_offset: int           # first port (1-based)
    port_count: int
    slot_type: int
    psi: list[int] = field(default_factory=list)

    @property
    def ports(self) -> range:
        return range(self.port_offset, self.port_offset + self.port_count)

    def __str__(self) -> str:
        return (f"{self.name.strip()} {self.major}.{self.minor:x}: ports "
                f"{self.port_offset}-{self.port_offset + self.port_count - 1} "
                f"slot type {self.slot_type}")


@dataclass
class Capabilities:
    caplength: int
    hciversion: int
    max_slots: int
    max_interrupters: int
    max_ports: int
    ist: int
    erst_max: int              # the ERST may have up to 2**erst_max entries
    max_scratchpads: int
    scratchpad_restore: bool
    u1_exit_latency: int
    u2_exit_latency: int
    hccparams1: int
    hccparams2: int
    dboff: int
    rtsoff: int
    xecp: int                  # byte offset of the first extended capability (0: none)
    page_size: int = 4096
    extended: list[tuple[int, int]] = field(default_factory=list)   # (capability id, offset)
    protocols: list[SupportedProtocol] = field(default_factory=list)

    @property
    def ac64(self) -> bool:
        return bool(self.hccparams1 & R.HCC1_AC64)

    @property
    def context_size(self) -> int:
        return 64 if self.hccparams1 & R.HCC1_CSZ else 32

    @property
    def port_power_control(self) -> bool:
        return bool(self.hccparams1 & R.HCC1_PPC)

    @property
    def max_psa_size(self) -> int:
        return read(R.HCC1_MAX_PSA_SIZE, self.hccparams1)


# ---- events ----------------------------------------------------------------------------------
class Event:
    """One event TRB as the driver consumed it."""

    __slots__ = ("addr", "control", "interrupter", "param", "status")

    def __init__(self, interrupter: int, addr: int, param: int, status: int, control: int):
        self.interrupter = interrupter
        self.addr = addr
        self.param = param
        self.status = status
        self.control = control

    @property
    def type(self) -> int:
        return (self.control >> _TYPE_SHIFT) & _TYPE_MASK

    @property
    def cc(self) -> int:
        return (self.status >> _CC_SHIFT) & _CC_MASK

    @property
    def slot(self) -> int:
        return (self.control >> _SLOT_SHIFT) & _SLOT_MASK

    @property
    def ep(self) -> int:
        """Endpoint ID (DCI) of a transfer event."""
        return (self.control >> _EP_SHIFT) & _EP_MASK

    @property
    def length(self) -> int:
        """Transfer length (residue) of a transfer event, the parameter of a command
        completion: the same 24 bits of the status dword."""
        return (self.status >> _LENGTH_SHIFT) & _LENGTH_MASK

    @property
    def event_data(self) -> bool:
        return bool(self.control & _ED)

    @property
    def port(self) -> int:
        """Port ID of a port status change event."""
        return (self.param >> _PORT_SHIFT) & _PORT_MASK

    @property
    def trb(self) -> T.GuestTrb:
        return T.GuestTrb(self.addr, self.param, self.status, self.control)

    def decode(self) -> dict[str, int]:
        return self.trb.decode()

    def __repr__(self) -> str:
        t = self.type
        head = f"Event(intr {self.interrupter} @{self.addr:#x} {trb_name(t)}"
        if t == TrbType.TRANSFER_EVENT:
            return (f"{head} ptr {self.param:#x} cc '{cc_name(self.cc)}' len {self.length} "
                    f"slot {self.slot} ep {self.ep}{' ED' if self.event_data else ''})")
        if t == TrbType.COMMAND_COMPLETION:
            return (f"{head} cmd {self.param:#x} cc '{cc_name(self.cc)}' slot {self.slot} "
                    f"param {self.length:#x})")
        if t == TrbType.PORT_STATUS_CHANGE:
            return f"{head} port {self.port} cc '{cc_name(self.cc)}')"
        return f"{head} p={self.param:#x} s={self.status:#x} c={self.control:#x})"


@dataclass
class CommandCompletion:
    command: T.GuestTrb        # the command TRB as queued (addr = where it sat on the ring)
    cc: int
    slot: int
    param: int                 # Command Completion Parameter
    event: Event

    @property
    def ok(self) -> bool:
        return self.cc == CC.SUCCESS

    @property
    def name(self) -> str:
        return trb_name(self.command.type)

    def check(self) -> CommandCompletion:
        if self.cc != CC.SUCCESS:
            raise CommandFailed(self)
        return self

    def __repr__(self) -> str:
        return (f"CommandCompletion({self.name} @{self.command.addr:#x}: cc {self.cc} "
                f"'{cc_name(self.cc)}' slot {self.slot} param {self.param:#x})")


class PendingCommand:
    __slots__ = ("completion", "seq", "trb")

    def __init__(self, trb: T.GuestTrb, seq: int):
        self.trb = trb
        self.seq = seq
        self.completion: CommandCompletion | None = None

    @property
    def done(self) -> bool:
        return self.completion is not None


@dataclass(frozen=True)
class PortStatus:
    port: int
    raw: int

    @property
    def connected(self) -> bool:
        return bool(self.raw & R.PORT_CCS)

    @property
    def enabled(self) -> bool:
        return bool(self.raw & R.PORT_PED)

    @property
    def powered(self) -> bool:
        return bool(self.raw & R.PORT_PP)

    @property
    def in_reset(self) -> bool:
        return bool(self.raw & R.PORT_PR)

    @property
    def over_current(self) -> bool:
        return bool(self.raw & R.PORT_OCA)

    @property
    def link_state(self) -> int:
        return read(R.PORT_PLS, self.raw)

    @property
    def speed_id(self) -> int:
        return read(R.PORT_SPEED, self.raw)

    @property
    def changes(self) -> int:
        return self.raw & R.PORT_CHANGE_BITS

    @property
    def speed(self) -> Speed | None:
        try:
            return Speed(self.speed_id)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"port {self.port}: {R.describe_portsc(self.raw)}"


class Interrupter:
    """One interrupter as the driver set it up: its register set and event ring."""

    def __init__(self, index: int, regs: int, ring: EventRing, poll: bool):
        self.index = index
        self.regs = regs          # BAR offset of IMAN
        self.ring = ring
        self.poll = poll          # consume by looking at the ring rather than waiting for MSI-X
        self.seen = 0             # interrupt messages already handled
        self.events = 0           # events consumed


class _StartOptions(TypedDict):
    """The constructor's options that `start()` applies."""

    max_slots: int | None
    interrupters: int
    event_ring_segments: int
    event_ring_trbs: int
    command_ring_trbs: int
    command_ring_segments: int
    imod_interval: int
    poll: bool
    hsee: bool


# ---- the driver ------------------------------------------------------------------------------
class XhciDriver:
    """Host driver for one xHCI controller on `bus`.

    Options worth knowing:
      interrupters / event_ring_segments / event_ring_trbs: how many event rings and their shape
        (several small segments make the consumer cross ERST entries often);
      command_ring_trbs / command_ring_segments, transfer_ring_trbs / transfer_ring_segments;
      imod_interval: IMOD.IMODI in 250 ns units (0: no moderation);
      poll: consume events by watching the rings instead of waiting for interrupts;
      split_qwords: write 64-bit registers as two dword writes, low then high (like Linux), or
        as one 8-byte access;
      toggle_every_link: put Toggle Cycle on every producer Link TRB (unusual, legal).
    """

    def __init__(self, bus: GuestBus, *, max_slots: int | None = None, interrupters: int = 1,
                 event_ring_segments: int = 1, event_ring_trbs: int = 256,
                 command_ring_trbs: int = 64, command_ring_segments: int = 1,
                 transfer_ring_trbs: int = 256, transfer_ring_segments: int = 1,
                 imod_interval: int = 0, poll: bool = False, split_qwords: bool = True,
                 toggle_every_link: bool = False, hsee: bool = True,
                 auto_ack_port_changes: bool = True, event_log_size: int = 4096,
                 timeout_ns: int = DEFAULT_TIMEOUT_NS, ram_start: int = 0x10000,
                 ram_end: int | None = None):
        self.bus = bus
        self.mem = bus.mem
        # INTx instead of MSI-X when the bus says so (the in-process bus has both modes); such a
        # bus also has the level of its shared line, read only then (other buses have none).
        self.intx = getattr(bus, "mode", "msix") == "intx"
        self._line = cast(IntxLine, bus)
        self.opts = _StartOptions(max_slots=max_slots, interrupters=interrupters,
                                  event_ring_segments=event_ring_segments,
                                  event_ring_trbs=event_ring_trbs,
                                  command_ring_trbs=command_ring_trbs,
                                  command_ring_segments=command_ring_segments,
                                  imod_interval=imod_interval, poll=poll, hsee=hsee)
        self.transfer_ring_trbs = transfer_ring_trbs
        self.transfer_ring_segments = transfer_ring_segments
        self.split_qwords = split_qwords
        self.toggle_every_link = toggle_every_link
        self.auto_ack_port_changes = auto_ack_port_changes
        self.timeout_ns = timeout_ns
        if ram_end is None:
            ram_end = max(r.end for r in self.mem.regions)
        self.alloc = GuestAllocator(self.mem, ram_start, ram_end)

        self.caps: Capabilities | None = None
        self.op = 0
        self.rt = 0
        self.db = 0
        self.max_slots_enabled = 0
        self.dcbaa: Block | None = None
        self.scratchpad_array: Block | None = None
        self.scratchpads: list[int] = []
        self.cmd_ring: ProducerRing | None = None
        self.interrupters: list[Interrupter] = []

        self.events: deque[Event] = deque(maxlen=event_log_size)
        self.unmatched: deque[Event] = deque(maxlen=256)   # events no request explains
        self.completions: deque[CommandCompletion] = deque(maxlen=1024)
        self.port_changes: deque[tuple[int, int]] = deque(maxlen=1024)   # (port, PORTSC)
        self.port_listeners: list[Callable[[int, int], None]] = []
        self.event_listeners: list[Callable[[Event], None]] = []
        self.devices: dict[int, Device] = {}    # slot id -> its device
        self.fatal: int = 0                     # USBSTS with HSE/HCE once seen
        self.command_ring_stopped: Event | None = None
        self._pending_cmds: dict[int, PendingCommand] = {}
        self._deferred_doorbells: set[tuple[int, int, int]] | None = None   # (slot, DCI, stream)

    @property
    def capabilities(self) -> Capabilities:
        """The capability registers as `start()` (or `read_capabilities()`) read them."""
        if self.caps is None:
            raise ControllerError("the capabilities are not read yet: start() the driver first")
        return self.caps

    # ---- MMIO --------------------------------------------------------------------------------
    def r32(self, off: int) -> int:
        return self.bus.mmio_read(off, 4)

    def w32(self, off: int, value: int) -> None:
        self.bus.mmio_write(off, 4, value & 0xFFFFFFFF)

    def r64(self, off: int) -> int:
        if self.split_qwords:
            return self.bus.mmio_read(off, 4) | (self.bus.mmio_read(off + 4, 4) << 32)
        return self.bus.mmio_read(off, 8)

    def w64(self, off: int, value: int) -> None:
        if self.split_qwords:
            self.bus.mmio_write(off, 4, value & 0xFFFFFFFF)
            self.bus.mmio_write(off + 4, 4, (value >> 32) & 0xFFFFFFFF)
        else:
            self.bus.mmio_write(off, 8, value & 0xFFFFFFFFFFFFFFFF)

    def op_read(self, reg: int) -> int:
        return self.r32(self.op + reg)

    def op_write(self, reg: int, value: int) -> None:
        self.w32(self.op + reg, value)

    @property
    def usbcmd(self) -> int:
        return self.r32(self.op + R.USBCMD)

    @property
    def usbsts(self) -> int:
        return self.r32(self.op + R.USBSTS)

    def describe_usbsts(self, sts: int | None = None) -> str:
        sts = self.usbsts if sts is None else sts
        names = [n for bit, n in ((R.STS_HCH, "HCHalted"), (R.STS_HSE, "HSE"),
                                  (R.STS_EINT, "EINT"), (R.STS_PCD, "PCD"), (R.STS_SSS, "SSS"),
                                  (R.STS_RSS, "RSS"), (R.STS_SRE, "SRE"), (R.STS_CNR, "CNR"),
                                  (R.STS_HCE, "HCE")) if sts & bit]
        return f"USBSTS {sts:#010x} {' '.join(names)}".rstrip()

    # ---- waiting -----------------------------------------------------------------------------
    def wait_register(self, what: str, until: Callable[[], bool],
                      timeout_ns: int | None = None) -> None:
        if not until() and not self.bus.wait(until, timeout_ns or self.timeout_ns):
            raise XhciTimeout(f"timed out waiting for {what} ({self.describe_usbsts()})")

    def has_news(self) -> bool:
        """True when an interrupter has something for us: a new MSI-X message, or (polled
        interrupters) a valid TRB at its dequeue pointer."""
        counts = self.bus.interrupts
        intx = self.intx and self._line.intx
        for it in self.interrupters:
            if it.poll:
                if it.ring.has_event():
                    return True
            elif intx or counts[it.index] != it.seen:
                return True
        return False

    _news = has_news

    def wait_for(self, done: Callable[[], bool], what: str | Callable[[], str],
                 timeout_ns: int | None = None) -> None:
        """Service events until `done()`; raise XhciTimeout (saying `what`) if it takes longer
        than the timeout, ControllerError if the controller reports HSE/HCE."""
        timeout_ns = timeout_ns or self.timeout_ns
        self.service()
        while not done():
            if self.fatal:
                raise ControllerError(f"controller error while waiting for {_text(what)}: "
                                      f"{self.describe_usbsts(self.fatal)}")
            if not self.bus.wait(self.has_news, timeout_ns):
                self.service()
                if done():
                    return
                hint = ""
                if any(it.ring.has_event() for it in self.interrupters if not it.poll):
                    hint = " (events are waiting on an event ring but no interrupt came)"
                raise XhciTimeout(f"timed out waiting for {_text(what)}{hint}; "
                                  f"{self.describe_usbsts()}")
            self.service()

    # ---- bring-up (4.2) ----------------------------------------------------------------------
    def read_capabilities(self) -> Capabilities:
        r = self.r32
        cap0 = r(R.CAPLENGTH)
        p1, p2, p3 = r(R.HCSPARAMS1), r(R.HCSPARAMS2), r(R.HCSPARAMS3)
        c1 = r(R.HCCPARAMS1)
        scratchpads_lo = R.HCS2_SCRATCHPADS_LO
        caps = Capabilities(
            caplength=read(R.CAP_CAPLENGTH, cap0), hciversion=read(R.CAP_HCIVERSION, cap0),
            max_slots=read(R.HCS1_MAX_SLOTS, p1), max_interrupters=read(R.HCS1_MAX_INTRS, p1),
            max_ports=read(R.HCS1_MAX_PORTS, p1),
            ist=read(R.HCS2_IST, p2), erst_max=read(R.HCS2_ERST_MAX, p2),
            max_scratchpads=(read(R.HCS2_SCRATCHPADS_HI, p2) << scratchpads_lo.width)
            | read(scratchpads_lo, p2),
            scratchpad_restore=bool(p2 & R.HCS2_SPR),
            u1_exit_latency=read(R.HCS3_U1_EXIT_LATENCY, p3),
            u2_exit_latency=read(R.HCS3_U2_EXIT_LATENCY, p3),
            hccparams1=c1, hccparams2=r(R.HCCPARAMS2),
            dboff=r(R.DBOFF) & field_mask(R.DBOFF_OFFSET),
            rtsoff=r(R.RTSOFF) & field_mask(R.RTSOFF_OFFSET),
            xecp=read(R.HCC1_XECP, c1) * 4)
        if caps.caplength < 0x20:
            raise ControllerError(f"CAPLENGTH {caps.caplength:#x} is smaller than the "
                                  f"capability registers (0x20)")
        self.op = caps.caplength
        self.rt = caps.rtsoff
        self.db = caps.dboff
        pagesize = read(R.PAGESIZE_BITS, self.op_read(R.PAGESIZE))
        if pagesize:
            caps.page_size = 1 << (12 + (pagesize & -pagesize).bit_length() - 1)
        self._walk_extended_capabilities(caps)
        self.caps = caps
        return caps

    def _walk_extended_capabilities(self, caps: Capabilities) -> None:
        off = caps.xecp
        seen: set[int] = set()
        while off and off not in seen and off < 0x10000 and len(seen) < 256:
            seen.add(off)
            v = self.r32(off)
            cap_id, nxt = read(R.XCAP_ID, v), read(R.XCAP_NEXT, v)
            caps.extended.append((cap_id, off))
            if cap_id == R.XCAP_PROTOCOL:
                caps.protocols.append(self._read_protocol(off, v))
            if not nxt:
                break
            off += nxt * 4

    def _read_protocol(self, off: int, dw0: int) -> SupportedProtocol:
        name = self.r32(off + 4)
        dw2 = self.r32(off + 8)
        psic = read(R.PROTOCOL_PSIC, dw2)
        return SupportedProtocol(
            major=read(R.PROTOCOL_MAJOR, dw0), minor=read(R.PROTOCOL_MINOR, dw0),
            name=name.to_bytes(4, "little").decode("latin-1"),
            port_offset=read(R.PROTOCOL_PORT_OFFSET, dw2),
            port_count=read(R.PROTOCOL_PORT_COUNT, dw2),
            slot_type=read(R.PROTOCOL_SLOT_TYPE, self.r32(off + 12)),
            psi=[self.r32(off + 16 + 4 * i) for i in range(psic)])

    def take_ownership(self, timeout_ns: int = 1000 * MS) -> bool:
        """USB Legacy Support (7.1): ask the BIOS to let go.  Returns False when there is no
        such capability.  Like Linux, a BIOS that never lets go is overruled."""
        legacy = [off for cap_id, off in self.capabilities.extended if cap_id == R.XCAP_LEGACY]
        if not legacy:
            return False
        off = legacy[0]
        self.w32(off, self.r32(off) | R.LEGSUP_OS_OWNED)
        if not self.bus.wait(lambda: not self.r32(off) & R.LEGSUP_BIOS_OWNED, timeout_ns):
            self.w32(off, (self.r32(off) & ~R.LEGSUP_BIOS_OWNED) | R.LEGSUP_OS_OWNED)
        ctl = self.r32(off + R.LEGCTLSTS)
        self.w32(off + R.LEGCTLSTS, (ctl & ~R.LEGCTLSTS_SMI_ENABLES) | R.LEGCTLSTS_SMI_EVENTS)
        return True

    def halt(self) -> None:
        cmd = self.usbcmd
        if cmd & R.CMD_RS:
            self.op_write(R.USBCMD, cmd & ~R.CMD_RS)
        self.wait_register("HCHalted", lambda: bool(self.usbsts & R.STS_HCH))

    def reset(self) -> None:
        """HCRST (4.22.1): halt first, then reset and wait for HCRST and CNR to clear."""
        self.halt()
        self.op_write(R.USBCMD, R.CMD_HCRST)
        self.wait_register("HCRST to clear",
                           lambda: not self.usbcmd & R.CMD_HCRST
                           and not self.usbsts & R.STS_CNR)

    def start(self) -> XhciDriver:
        """Bring the controller up the way 4.2 describes; returns self."""
        o = self.opts
        caps = self.read_capabilities()
        self.take_ownership()
        self.wait_register("Controller Not Ready to clear", lambda: not self.usbsts & R.STS_CNR)
        self.reset()
        self._free_structures()

        slots = caps.max_slots if o["max_slots"] is None else min(o["max_slots"], caps.max_slots)
        self.max_slots_enabled = slots
        config = self.op_read(R.CONFIG) & ~field_mask(R.CONFIG_MAX_SLOTS_EN)
        self.op_write(R.CONFIG, config | slots)

        # DCBAA: 64-byte aligned, within one page (table 6-1); entry 0 = scratchpad array.
        page = caps.page_size
        self.dcbaa = Block(self.mem, self.alloc.alloc(8 * (slots + 1), 64, page), 8 * (slots + 1))
        if caps.max_scratchpads:
            n = caps.max_scratchpads
            self.scratchpad_array = Block(self.mem, self.alloc.alloc(8 * n, 64, page), 8 * n)
            self.scratchpads = [self.alloc.alloc(page, page, page) for _ in range(n)]
            self.scratchpad_array.write(0, struct.pack(f"<{n}Q", *self.scratchpads))
            self.dcbaa.pack(struct.Struct("<Q"), 0, self.scratchpad_array.addr)
        self.w64(self.op + R.DCBAAP, self.dcbaa.addr)

        self.cmd_ring = ProducerRing(self.mem, self.alloc, o["command_ring_trbs"],
                                     o["command_ring_segments"], "cmd", self.toggle_every_link)
        self.w64(self.op + R.CRCR, self.cmd_ring.base | R.CRCR_RCS)

        n_intr = max(1, min(o["interrupters"], caps.max_interrupters or 1))
        max_segs = 1 << caps.erst_max
        if o["event_ring_segments"] > max_segs:
            raise XhciError(f"the controller allows {max_segs} event ring segments "
                            f"(HCSPARAMS2.ERST Max {caps.erst_max}); asked for "
                            f"{o['event_ring_segments']}")
        for i in range(n_intr):
            ring = EventRing(self.mem, self.alloc, o["event_ring_segments"], o["event_ring_trbs"])
            it = Interrupter(i, self.rt + R.IR_BASE + R.IR_STRIDE * i, ring, o["poll"])
            self.interrupters.append(it)
            self._program_interrupter(it)

        cmd = R.CMD_RS | R.CMD_INTE | (R.CMD_HSEE if o["hsee"] else 0)
        self.op_write(R.USBCMD, (self.usbcmd & ~R.CMD_HCRST) | cmd)
        self.wait_register("HCHalted to clear after Run", lambda: not self.usbsts & R.STS_HCH)
        if caps.port_power_control:
            for port in range(1, caps.max_ports + 1):
                if not self.portsc(port) & R.PORT_PP:
                    self.power_port(port, True)
        return self

    def _program_interrupter(self, it: Interrupter) -> None:
        """4.2 step 8: ERSTSZ, ERDP, then ERSTBA (writing ERSTBA arms the event ring), IMOD,
        and finally IMAN.IE."""
        base = it.regs
        ring = it.ring
        ring.reset()
        erstsz = self.r32(base + R.ERSTSZ) & ~field_mask(R.ERSTSZ_SIZE)
        self.w32(base + R.ERSTSZ, erstsz | placed(R.ERSTSZ_SIZE, len(ring.blocks)))
        self.w64(base + R.ERDP, ring.dequeue_pointer)
        self.w64(base + R.ERSTBA, ring.erst.addr)
        self.w32(base + R.IMOD, placed(R.IMOD_INTERVAL, self.opts["imod_interval"]))
        it.seen = self.bus.interrupts[it.index]
        self.w32(base + R.IMAN, R.IMAN_IE | R.IMAN_IP)

    def _free_structures(self) -> None:
        for dev in list(self.devices.values()):
            dev._forget()
        self.devices.clear()
        self._pending_cmds.clear()
        for it in self.interrupters:
            it.ring.free_memory()
        self.interrupters = []
        if self.cmd_ring is not None:
            self.cmd_ring.free_memory()
            self.cmd_ring = None
        for a in self.scratchpads:
            self.alloc.free(a)
        self.scratchpads = []
        for b in (self.scratchpad_array, self.dcbaa):
            if b is not None:
                self.alloc.free(b.addr)
        self.scratchpad_array = self.dcbaa = None
        self.fatal = 0

    def stop(self) -> None:
        """Clear Run/Stop and wait for the controller to halt."""
        self.halt()

    def set_dcbaa_entry(self, slot: int, addr: int) -> None:
        if self.dcbaa is None:
            raise ControllerError("there is no DCBAA yet: start() the driver first")
        self.dcbaa.pack(struct.Struct("<Q"), 8 * slot, addr)

    # ---- interrupters and events (4.9.4, 4.17) -----------------------------------------------
    def interrupter_regs(self, index: int) -> dict[str, int]:
        base = self.rt + R.IR_BASE + R.IR_STRIDE * index
        return {"IMAN": self.r32(base + R.IMAN), "IMOD": self.r32(base + R.IMOD),
                "ERSTSZ": self.r32(base + R.ERSTSZ), "ERSTBA": self.r64(base + R.ERSTBA),
                "ERDP": self.r64(base + R.ERDP)}

    def service(self) -> int:
        """The interrupt handler: for each interrupter with news, acknowledge the interrupt,
        consume every valid event and hand the new dequeue pointer back (ERDP, EHB cleared).
        Returns how many events were consumed."""
        total = 0
        counts = self.bus.interrupts
        intx = self.intx and self._line.intx
        for it in self.interrupters:
            if it.poll:
                interrupted = False
            elif intx:
                # One shared level-triggered line: IMAN.IP says which interrupter raised it.
                interrupted = bool(self.r32(it.regs + R.IMAN) & R.IMAN_IP)
            else:
                interrupted = counts[it.index] != it.seen
            if interrupted:
                it.seen = counts[it.index]
                sts = self.usbsts
                if sts & (R.STS_HSE | R.STS_HCE):
                    self.fatal = sts
                # EINT and IMAN.IP are RW1C; with MSI-X IP clears itself, clearing it again is
                # what Linux does and is harmless.
                self.op_write(R.USBSTS, R.STS_EINT)
                self.w32(it.regs + R.IMAN, R.IMAN_IE | R.IMAN_IP)
            n = self._drain(it)
            if n or interrupted:
                ring = it.ring
                self.w64(it.regs + R.ERDP,
                         ring.dequeue_pointer | placed(R.ERDP_DESI, ring.seg) | R.ERDP_EHB)
            total += n
        return total

    def _drain(self, it: Interrupter) -> int:
        ring = it.ring
        n = 0
        pop = ring.pop
        while (raw := pop()) is not None:
            addr, param, status, control = raw
            ev = Event(it.index, addr, param, status, control)
            self.events.append(ev)
            n += 1
            self._dispatch(ev)
        it.events += n
        return n

    def _dispatch(self, ev: Event) -> None:
        t = ev.type
        if t == TrbType.TRANSFER_EVENT:
            dev = self.devices.get(ev.slot)
            if dev is None or not dev._on_transfer_event(ev):
                self.unmatched.append(ev)
        elif t == TrbType.COMMAND_COMPLETION:
            self._on_command_completion(ev)
        elif t == TrbType.PORT_STATUS_CHANGE:
            self._on_port_change(ev)
        else:
            if t == TrbType.HOST_CONTROLLER_EVENT and ev.cc != CC.EVENT_RING_FULL:
                sts = self.usbsts
                if sts & (R.STS_HSE | R.STS_HCE):
                    self.fatal = sts
            self.unmatched.append(ev)
        for fn in self.event_listeners:
            fn(ev)

    # ---- command ring (4.6) ------------------------------------------------------------------
    def ring_doorbell(self, slot: int, target: int, stream: int = 0) -> None:
        """Doorbell `slot` (0: the command ring, target 0) with a target (DCI) and stream ID.
        Inside `batch()`, device doorbells are collected and rung once at the end."""
        if self._deferred_doorbells is not None and slot:
            self._deferred_doorbells.add((slot, target, stream))
            return
        self._write_doorbell(slot, target, stream)

    def _write_doorbell(self, slot: int, target: int, stream: int) -> None:
        self.w32(self.db + R.DB_STRIDE * slot,
                 placed(R.DB_TARGET, target) | placed(R.DB_STREAM, stream))

    def queue_command(self, trb: T.TrbWords, *, ring: bool = True,
                      timeout_ns: int | None = None) -> PendingCommand:
        """Put a command TRB on the command ring (its cycle bit is ours to set; every other
        bit is sent as given, so tests can send malformed commands) and ring doorbell 0."""
        cr = self.cmd_ring
        if cr is None:
            raise ControllerError("there is no command ring yet: start() the driver first")
        if cr.space == 0:
            self.wait_for(lambda: cr.space > 0, "room on the command ring", timeout_ns)
        seq = cr.enq_seq
        control = trb.control & ~_CYCLE
        addr = cr.put(trb.param, trb.status, control)
        queued = T.GuestTrb(addr, trb.param, trb.status,
                            control | placed(T.CYCLE, cr.cycle_of(seq)))
        pc = PendingCommand(queued, seq)
        self._pending_cmds[addr] = pc
        if ring:
            self.ring_doorbell(0, 0)
        return pc

    def wait_command(self, pc: PendingCommand, timeout_ns: int | None = None) -> CommandCompletion:
        self.wait_for(lambda: pc.completion is not None,
                      lambda: f"completion of {trb_name(pc.trb.type)} at {pc.trb.addr:#x}",
                      timeout_ns)
        assert pc.completion is not None, "wait_for returns only once the completion is in"
        return pc.completion

    def command(self, trb_type: int, timeout_ns: int | None = None,
                **fields: int) -> CommandCompletion:
        """Queue one command built from its declared layout and wait for its completion."""
        return self.wait_command(self.queue_command(T.GuestTrb.build(trb_type, **fields)),
                                 timeout_ns)

    def raw_command(self, param: int, status: int, control: int,
                    timeout_ns: int | None = None) -> CommandCompletion:
        """Queue any 16 bytes as a command (cycle bit supplied by the ring) and wait."""
        return self.wait_command(self.queue_command(T.GuestTrb(0, param, status, control)),
                                 timeout_ns)

    def _on_command_completion(self, ev: Event) -> None:
        cc = ev.cc
        if cc == CC.COMMAND_RING_STOPPED:
            # Points at the command the ring stopped in front of; that command is still owed.
            self.command_ring_stopped = ev
            return
        pc = self._pending_cmds.pop(ev.param & _TRB_ADDRESS, None)
        if pc is None:
            self.unmatched.append(ev)
            return
        pc.completion = CommandCompletion(pc.trb, cc, ev.slot, ev.length, ev)
        self.completions.append(pc.completion)
        assert self.cmd_ring is not None, "pending commands go when their ring goes"
        self.cmd_ring.consumed_through(pc.seq + 1)

    def abort_command_ring(self, timeout_ns: int | None = None) -> Event | None:
        """Command Abort (4.6.1.2): set CRCR.CA and wait for CRR to clear."""
        self.command_ring_stopped = None
        self.w64(self.op + R.CRCR, R.CRCR_CA)
        self.wait_register("CRCR.CRR to clear after abort",
                           lambda: not self.r32(self.op + R.CRCR) & R.CRCR_CRR, timeout_ns)
        self.service()
        return self.command_ring_stopped

    @property
    def pending_commands(self) -> list[PendingCommand]:
        return list(self._pending_cmds.values())

    # The commands (6.4.3), one method each.  Any further keyword is a TRB field, sent as given.
    def no_op(self, *, timeout_ns: int | None = None, **fields: int) -> CommandCompletion:
        return self.command(TrbType.NOOP_COMMAND, timeout_ns, **fields)

    def enable_slot(self, slot_type: int = 0, *, timeout_ns: int | None = None,
                    **fields: int) -> CommandCompletion:
        return self.command(TrbType.ENABLE_SLOT, timeout_ns, slot_type=slot_type, **fields)

    def disable_slot(self, slot: int, *, timeout_ns: int | None = None,
                     **fields: int) -> CommandCompletion:
        return self.command(TrbType.DISABLE_SLOT, timeout_ns, slot=slot, **fields)

    def address_device(self, slot: int, input_ctx: int, bsr: bool = False, *,
                       timeout_ns: int | None = None, **fields: int) -> CommandCompletion:
        return self.command(TrbType.ADDRESS_DEVICE, timeout_ns, slot=slot, pointer=input_ctx,
                            bsr=int(bsr), **fields)

    def configure_endpoint(self, slot: int, input_ctx: int, deconfigure: bool = False, *,
                           timeout_ns: int | None = None, **fields: int) -> CommandCompletion:
        return self.command(TrbType.CONFIGURE_ENDPOINT, timeout_ns, slot=slot, pointer=input_ctx,
                            dc=int(deconfigure), **fields)

    def evaluate_context(self, slot: int, input_ctx: int, *, timeout_ns: int | None = None,
                         **fields: int) -> CommandCompletion:
        return self.command(TrbType.EVALUATE_CONTEXT, timeout_ns, slot=slot, pointer=input_ctx,
                            **fields)

    def reset_endpoint(self, slot: int, dci: int, tsp: bool = False, *,
                       timeout_ns: int | None = None, **fields: int) -> CommandCompletion:
        return self.command(TrbType.RESET_ENDPOINT, timeout_ns, slot=slot, ep=dci, tsp=int(tsp),
                            **fields)

    def stop_endpoint(self, slot: int, dci: int, suspend: bool = False, *,
                      timeout_ns: int | None = None, **fields: int) -> CommandCompletion:
        return self.command(TrbType.STOP_ENDPOINT, timeout_ns, slot=slot, ep=dci,
                            sp=int(suspend), **fields)

    def set_tr_dequeue(self, slot: int, dci: int, pointer: int, dcs: int, stream: int = 0,
                       sct: int = 0, *, timeout_ns: int | None = None,
                       **fields: int) -> CommandCompletion:
        return self.command(TrbType.SET_TR_DEQUEUE, timeout_ns, slot=slot, ep=dci,
                            pointer=address_field(_SET_TR_DEQUEUE_POINTER, pointer), dcs=dcs,
                            stream=stream, sct=sct, **fields)

    def reset_device(self, slot: int, *, timeout_ns: int | None = None,
                     **fields: int) -> CommandCompletion:
        return self.command(TrbType.RESET_DEVICE, timeout_ns, slot=slot, **fields)

    def negotiate_bandwidth(self, slot: int, *, timeout_ns: int | None = None,
                            **fields: int) -> CommandCompletion:
        return self.command(TrbType.NEGOTIATE_BANDWIDTH, timeout_ns, slot=slot, **fields)

    def set_latency_tolerance(self, belt: int, *, timeout_ns: int | None = None,
                              **fields: int) -> CommandCompletion:
        return self.command(TrbType.SET_LATENCY_TOLERANCE, timeout_ns, belt=belt, **fields)

    def get_port_bandwidth(self, speed: int, hub_slot: int = 0, *, timeout_ns: int | None = None,
                           **fields: int) -> tuple[CommandCompletion, bytes]:
        """Returns the completion and the Port Bandwidth Context (one byte per root port,
        byte 0 reserved)."""
        n = self.capabilities.max_ports + 1
        size = (n + 3) & ~3
        addr = self.alloc.alloc(max(size, 16), 16)
        try:
            c = self.command(TrbType.GET_PORT_BANDWIDTH, timeout_ns, pointer=addr, speed=speed,
                             hub_slot=hub_slot, **fields)
            return c, self.mem.read(addr, n)
        finally:
            self.alloc.free(addr)

    def force_header(self, port: int, packet_type: int, header: tuple[int, int, int] = (0, 0, 0),
                     *, timeout_ns: int | None = None, **fields: int) -> CommandCompletion:
        lo, mid, hi = header
        return self.command(TrbType.FORCE_HEADER, timeout_ns, port=port, packet_type=packet_type,
                            header_lo=lo >> _FORCE_HEADER_LO.lo, header_mid=mid, header_hi=hi,
                            **fields)

    # ---- ports (4.19, 5.4.8) -----------------------------------------------------------------
    def _port_reg(self, port: int, reg: int = R.PORTSC) -> int:
        max_ports = self.capabilities.max_ports
        if not 1 <= port <= max_ports:
            raise ValueError(f"port {port} does not exist (1-{max_ports})")
        return self.op + R.PORT_BASE + R.PORT_STRIDE * (port - 1) + reg

    def portsc(self, port: int) -> int:
        return self.r32(self._port_reg(port))

    def port_status(self, port: int) -> PortStatus:
        return PortStatus(port, self.portsc(port))

    def ports(self) -> list[PortStatus]:
        return [self.port_status(p) for p in range(1, self.capabilities.max_ports + 1)]

    def protocol_of(self, port: int) -> SupportedProtocol | None:
        for p in self.capabilities.protocols:
            if port in p.ports:
                return p
        return None

    def is_usb3(self, port: int) -> bool:
        p = self.protocol_of(port)
        return p is not None and p.major >= 3

    def write_portsc(self, port: int, set_bits: int = 0, clear_changes: int = 0) -> None:
        """Read-modify-write PORTSC the way drivers must: carry the sticky RW bits, write 0 to
        PED (1 would disable the port), to the change bits we do not mean to clear and to
        PR/WPR/LWS unless asked."""
        reg = self._port_reg(port)
        v = self.r32(reg)
        self.w32(reg, (v & R.PORT_PRESERVE) | set_bits | (clear_changes & R.PORT_CHANGE_BITS))

    def clear_port_changes(self, port: int, bits: int = R.PORT_CHANGE_BITS) -> int:
        """Acknowledge change bits (RW1C); returns the PORTSC value seen before."""
        v = self.portsc(port)
        if v & bits & R.PORT_CHANGE_BITS:
            self.write_portsc(port, clear_changes=v & bits)
        return v

    def power_port(self, port: int, on: bool = True) -> None:
        reg = self._port_reg(port)
        v = self.r32(reg) & R.PORT_PRESERVE
        self.w32(reg, (v | R.PORT_PP) if on else (v & ~R.PORT_PP))

    def disable_port(self, port: int) -> None:
        """Writing 1 to PED disables a USB2 port (USB3 ports ignore it, 5.4.8)."""
        self.write_portsc(port, R.PORT_PED)

    def set_link_state(self, port: int, pls: int) -> None:
        self.write_portsc(port, R.PORT_LWS | placed(R.PORT_PLS, pls))

    def wait_port(self, port: int, until: Callable[[PortStatus], bool], what: str,
                  timeout_ns: int | None = None) -> PortStatus:
        reg = self._port_reg(port)
        self.wait_register(f"port {port}: {what}",
                           lambda: until(PortStatus(port, self.r32(reg))), timeout_ns)
        self.service()
        return self.port_status(port)

    def reset_port(self, port: int, warm: bool = False,
                   timeout_ns: int | None = None) -> PortStatus:
        """Port reset (4.19.5): PR (a USB2 reset, or a USB3 hot reset) or, with `warm`, WPR on
        a USB3 port; wait for PRC (and WRC), acknowledge them and return the new status."""
        self.clear_port_changes(port, R.PORT_PRC | R.PORT_WRC)
        self.write_portsc(port, R.PORT_WPR if warm else R.PORT_PR)
        want = R.PORT_PRC | (R.PORT_WRC if warm else 0)
        self.wait_port(port, lambda s: s.raw & want == want and not s.raw & R.PORT_PR,
                       "warm reset to complete (WRC, PRC)" if warm else "reset to complete (PRC)",
                       timeout_ns)
        self.clear_port_changes(port, R.PORT_PRC | R.PORT_WRC)
        return self.port_status(port)

    def connected_ports(self) -> list[int]:
        return [s.port for s in self.ports() if s.connected]

    def wait_for_connect(self, port: int | None = None,
                         timeout_ns: int | None = None) -> int:
        """Wait until a device is connected (on `port`, or any port); return the port."""
        candidates = ([port] if port is not None
                      else list(range(1, self.capabilities.max_ports + 1)))
        found: list[int] = []

        def connected() -> bool:
            for p in candidates:
                if self.portsc(p) & R.PORT_CCS:
                    found.append(p)
                    return True
            return False

        self.wait_for(connected, "a device to connect" if port is None
                      else f"a device on port {port}", timeout_ns)
        return found[0]

    def _on_port_change(self, ev: Event) -> None:
        port = ev.port
        if not 1 <= port <= self.capabilities.max_ports:
            self.unmatched.append(ev)
            return
        v = self.portsc(port)
        self.port_changes.append((port, v))
        if self.auto_ack_port_changes:
            # Connect/enable/over-current/link/config changes are acknowledged here (a hub
            # driver's job); reset changes are left to whoever started the reset.
            ack = v & (R.PORT_CSC | R.PORT_PEC | R.PORT_OCC | R.PORT_PLC | R.PORT_CEC)
            if ack:
                self.write_portsc(port, clear_changes=ack)
        if not v & R.PORT_CCS:
            for dev in self.devices.values():
                if dev.port == port:
                    dev.connected = False
        for fn in self.port_listeners:
            fn(port, v)

    # ---- devices -----------------------------------------------------------------------------
    def enumerate(self, port: int, **options: Unpack[EnumerateOptions]) -> Device:
        """Reset the port if needed, give the device a slot and an address, read its
        descriptors and configure it.  Returns a `Device`; see `Device.enumerate` for options."""
        from .device import Device
        st = self.port_status(port)
        if not st.connected:
            raise NoDevice(f"nothing is connected to port {port} ({st})")
        return Device.enumerate(self, port, **options)

    def batch(self) -> _Batch:
        """`with drv.batch(): ...` queues transfers without ringing doorbells, then rings each
        touched doorbell once at the end."""
        return _Batch(self)

    def wait_all(self, transfers: Iterable[Transfer],
                 timeout_ns: int | None = None) -> list[Transfer]:
        """Ring deferred doorbells, then service events until every transfer is done."""
        transfers = list(transfers)
        self.flush_doorbells()
        idx = 0

        def all_done() -> bool:
            nonlocal idx
            while idx < len(transfers) and transfers[idx].done:
                idx += 1
            return idx == len(transfers)

        self.wait_for(all_done, lambda: f"{sum(not t.done for t in transfers)} of "
                                        f"{len(transfers)} transfers to complete", timeout_ns)
        return transfers

    def flush_doorbells(self) -> None:
        pending = self._deferred_doorbells
        if pending:
            todo = sorted(pending)
            pending.clear()
            for slot, target, stream in todo:
                self._write_doorbell(slot, target, stream)

    def __repr__(self) -> str:
        if self.caps is None:
            return "XhciDriver(not started)"
        return (f"XhciDriver({self.caps.max_ports} ports, {len(self.devices)} devices, "
                f"{self.describe_usbsts()})")


class _Batch:
    def __init__(self, drv: XhciDriver):
        self.drv = drv
        self.outer: set[tuple[int, int, int]] | None = None

    def __enter__(self) -> XhciDriver:
        self.outer = self.drv._deferred_doorbells
        if self.outer is None:
            self.drv._deferred_doorbells = set()
        return self.drv

    def __exit__(self, *exc: object) -> None:
        if self.outer is None:
            self.drv.flush_doorbells()
            self.drv._deferred_doorbells = None


def _text(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


__all__ = [
    "Capabilities",
    "CommandCompletion",
    "Event",
    "Interrupter",
    "PendingCommand",
    "PortStatus",
    "SupportedProtocol",
    "XhciDriver",
]
