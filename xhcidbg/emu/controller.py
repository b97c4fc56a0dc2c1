"""The xHCI controller: registers in, rings processed, events and interrupts out.

`XhciController` is a deterministic state machine.  A transport (the in-process bus or the
vfio-user server) calls `mmio_read`/`mmio_write`; the controller does DMA through `mem`, signals
interrupts through `irq`, keeps time through `scheduler`, and announces everything on `hooks`.
No guest input raises out of `mmio_read`/`mmio_write`: bad input gets the completion code or the
controller error a real xHC reports, and one log line.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial

from ..devices.base import UsbDevice
from . import events
from . import regs as R
from .commands import Commands
from .context import EpState, SlotState
from .gate import Gate
from .hooks import (
    CommandResult,
    CommandStart,
    EventRecord,
    Hooks,
    InterruptSignal,
    MmioAccess,
)
from .interrupters import Interrupter, InterruptSink
from .layout import DWORD_MASK, hi32, lo32
from .memory import DmaError, GuestMemory
from .mmio import (
    Binding,
    RegisterMap,
    constant,
    ignore,
    offset_label,
    read_zero,
    with_hi32,
    with_lo32,
)
from .ports import RootPort
from .rings import Ring, RingError
from .slots import DeviceSlot, SlotEndpoint
from .timing import Scheduler, Timer
from .transfers import TransferEngine
from .trb import CC, Trb

log = logging.getLogger("xhcidbg.emu")

# Register bits and fields, derived from the declarations in regs.py
RS, HCRST, INTE, HSEE, EWE = (R.USBCMD.mask(n) for n in ("rs", "hcrst", "inte", "hsee", "ewe"))
USBCMD_RW = R.USBCMD.rw
HCH, HSE, EINT, PCD, HCE = (R.USBSTS.mask(n) for n in ("hch", "hse", "eint", "pcd", "hce"))
_CRR, _CS, _CA = (R.CRCR_LO.mask(n) for n in ("crr", "cs", "ca"))
_MAX_SLOTS_EN = R.CONFIG["max_slots_en"]
_CONFIG_FLAGS = R.CONFIG.mask("u3e", "cie")
_MFINDEX = R.MFINDEX["index"]
MFINDEX_WRAP_NS = (_MFINDEX.mask + 1) * R.MICROFRAME_NS
_DB_TARGET, _DB_STREAM = R.DOORBELL["target"], R.DOORBELL["stream"]
# A 4-byte access at an offset without these bits is a whole dword inside BAR0: the fast path.
assert R.BAR_SIZE & (R.BAR_SIZE - 1) == 0
_NOT_A_BAR_DWORD = ~(R.BAR_SIZE - 4)
MAX_REFUSAL_KEYS = 4096


class XhciController:
    def __init__(self, *, usb2_ports: int = 4, usb3_ports: int = 4, interrupters: int = 8,
                 max_slots: int = 64, context_size: int = 32, scheduler: Scheduler | None = None,
                 mem: GuestMemory | None = None, scratchpads: int = 4, erst_max: int = 4,
                 max_inflight: int = 8, name: str = "xhci"):
        if context_size not in (32, 64):
            raise ValueError("context_size must be 32 or 64 (HCCPARAMS1.CSZ)")
        if not 1 <= usb2_ports + usb3_ports <= R.MAX_PORTS:
            raise ValueError(f"between 1 and {R.MAX_PORTS} ports in all")
        if not 1 <= interrupters <= 64 or not 1 <= max_slots <= 255:
            raise ValueError("1..64 interrupters and 1..255 slots")
        self.name = name
        self.context_size = context_size
        self.max_slots = max_slots
        self.erst_max = erst_max
        self.scratchpads = scratchpads
        self.max_inflight = max_inflight
        self.port_power_control = True
        self.scheduler = scheduler or Scheduler()
        self._mem = mem or GuestMemory()
        self.irq: InterruptSink = InterruptSink()
        self.hooks = Hooks()
        self._mem.on_dma = self.hooks.on_dma     # the one list: attach/detach reach memory
        self.gate = Gate(self.scheduler)
        self.bar_size = R.BAR_SIZE
        self.usb2_ports = usb2_ports
        self.usb3_ports = usb3_ports
        self.ports = [RootPort(i + 1, i >= usb2_ports, scheduler=self.scheduler, hooks=self.hooks,
                               errors=self, listener=self, power_control=self.port_power_control)
                      for i in range(usb2_ports + usb3_ports)]
        self.full_event_rings = 0    # event rings that are full, as their interrupters report
        self.interrupters = [Interrupter(i, mem=self._mem, scheduler=self.scheduler,
                                         hooks=self.hooks, errors=self, router=self,
                                         erst_max=erst_max, on_full=self._event_ring_full,
                                         on_room=self.event_ring_has_room)
                             for i in range(interrupters)]
        self.slots: dict[int, DeviceSlot] = {}
        self.transfers = TransferEngine(self._mem, self.scheduler, self.hooks, self,
                                        self.post_event, self.gate, self.mfindex,
                                        self.kick_endpoint, max_inflight)
        self.commands = Commands(mem=self._mem, hooks=self.hooks, scheduler=self.scheduler,
                                 report=self, transfers=self.transfers, slots=self.slots,
                                 ports=self.ports, context_size=context_size,
                                 max_slots_enabled=lambda: self.max_slots_enabled,
                                 dcbaa_entry=self.dcbaa_entry, release_slot=self.release_slot,
                                 finish=self.finish_command)
        self._refused: set[str] = set()
        self.refusals = 0
        self.internal_errors = 0     # bugs of ours caught at the MMIO boundary (tests assert 0)
        self.legsup = 0          # USBLEGSUP ownership bits
        self.legctlsts = 0
        self._wrap_timer: Timer | None = None
        self.regs = self._register_map()
        self._readers, self._writers = self.regs.readers, self.regs.writers    # the hot path
        self._reset_state()

    # ---- state -----------------------------------------------------------------------------------
    @property
    def mem(self) -> GuestMemory:
        return self._mem

    @mem.setter
    def mem(self, mem: GuestMemory) -> None:
        """Guest memory for every DMA (the transport sets it once, then maps regions into it)."""
        self._mem = mem
        mem.on_dma = self.hooks.on_dma
        for ir in self.interrupters:
            ir.mem = mem
        self.cmd_ring.mem = mem
        self.transfers.mem = self.commands.mem = mem
        for slot in self.slots.values():
            slot.mem = mem
            for ep in slot.endpoints.values():
                ep.ring.mem = mem

    def _reset_state(self) -> None:
        for slot in self.slots.values():
            for ep in slot.endpoints.values():
                self.transfers.take_back(ep)
        self.slots.clear()
        self.usbcmd = 0
        self.usbsts = HCH
        self.dnctrl = 0
        self.crcr = 0
        self.crr = False
        self._crcr_hi_ignore = False
        self._crcr_set = False       # software wrote CRCR since the ring last stopped
        self.dcbaap = 0
        self.config = 0
        self.cmd_ring = Ring(self.mem, name="cmd", announce=self.hooks.on_trb)
        self.cmd_pending: Trb | None = None
        self.mfindex_frozen = 0
        self._mf_base = 0
        if self._wrap_timer is not None:
            self._wrap_timer.cancel()
        self._wrap_timer = None
        self.gate.work.clear()
        for i in self.interrupters:
            i.reset()
        for p in self.ports:
            p.power_on_reset()
        self.irq.set_level(False)

    def hardware_reset(self) -> None:
        """PCI-level reset: everything, including the legacy-support handshake."""
        self.legsup = self.legctlsts = 0
        self._reset_state()
        self._set_state("controller", "reset")

    @property
    def running(self) -> bool:
        return not (self.usbsts & HCH)

    @property
    def max_slots_enabled(self) -> int:
        return min(_MAX_SLOTS_EN.of(self.config), self.max_slots)

    def _set_state(self, kind: str, new: str, old: str = "") -> None:
        for fn in self.hooks.on_state:
            fn(kind, self.name, old, new)

    # ---- logging of refused guest input ---------------------------------------------------------
    def refuse(self, key: str, message: str, level: str = "warning") -> None:
        """Guest input we did not accept: log it once per kind, always count it.  `level` is
        "info" for refusals drivers provoke in normal operation (state errors they handle)."""
        self.refusals += 1
        if key in self._refused:
            return
        if len(self._refused) < MAX_REFUSAL_KEYS:
            self._refused.add(key)
        log.log(logging.INFO if level == "info" else logging.WARNING, "%s: %s", self.name, message)
        for fn in self.hooks.on_log:
            fn(level, message)

    def host_system_error(self, why: str) -> None:
        """A DMA the controller needed failed: HSE, halt, out-of-band signal if HSEE."""
        self.refuse(f"hse:{why[:40]}", f"Host System Error: {why}")
        self.usbsts |= HSE
        self._halt()
        if self.usbcmd & HSEE:
            self.irq.system_error()

    def host_controller_error(self, why: str) -> None:
        self.refuse(f"hce:{why[:40]}", f"Host Controller Error: {why}")
        self.usbsts |= HCE
        self._halt()

    # ---- register map ---------------------------------------------------------------------------
    def _register_map(self) -> RegisterMap:
        """BAR0 block by block, each placing its own registers (built once)."""
        m = RegisterMap(R.BAR_SIZE, self, self._write_reserved)
        for reg, value in self._capabilities():
            m.place(0, (reg, constant(value), partial(self._write_capability, reg.offset)))
        m.area(R.OP_BASE, R.PORT_BASE, label=offset_label("OP", R.OP_BASE),
               write_at=self._write_op_reserved)
        for binding in self._operational():
            m.place(R.OP_BASE, binding)
        for port in self.ports:
            base = R.PORT_BASE + R.PORT_STRIDE * (port.number - 1)
            for binding in port.registers():
                m.place(base, binding, f"{binding[0].name}[{port.number}]")
        xecp = offset_label("XECP", R.XECP_BASE)
        m.area(R.XECP_BASE, R.RT_BASE, label=xecp, write_at=self._write_xecp_reserved)
        for binding in self._legacy_support():
            m.place(R.XECP_BASE, binding, xecp)
        at = R.XECP_BASE + 4 * len(R.LEGACY_REGS)
        for dword in self._supported_protocols():
            m.area(at, at + 4, read=constant(dword))
            at += 4
        m.area(R.RT_BASE + 4, R.RT_BASE + R.IR_BASE, label=offset_label("RT", R.RT_BASE),
               write=ignore)
        m.place(R.RT_BASE, (R.MFINDEX, self.mfindex, ignore))         # MFINDEX is read-only
        sets = R.RT_BASE + R.IR_BASE                   # the interrupter register sets
        m.area(sets + R.IR_STRIDE * len(self.interrupters), R.DB_BASE,
               write_at=self._write_absent_interrupter)
        for ir in self.interrupters:
            base = sets + R.IR_STRIDE * ir.index
            m.area(base, base + R.IR_STRIDE, write=ignore)      # its reserved dwords
            for binding in ir.registers():
                m.place(base, binding, f"{binding[0].name}[{ir.index}]")
        for i in range(R.DB_COUNT):
            m.place(R.DB_BASE + 4 * i, (R.DOORBELL, read_zero, partial(self._doorbell, i)),
                    f"DOORBELL[{i}]")
        return m

    # ---- MMIO -----------------------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        try:
            if size == 4 and not offset & _NOT_A_BAR_DWORD:
                value = self._readers[offset >> 2]()
            else:
                value = self.regs.read(offset, size)
        except Exception as e:            # never let a read take the backend down
            self.internal_errors += 1
            log.exception("internal error on MMIO read at %#x", offset)
            self.host_controller_error(f"internal error reading {offset:#x}: {e!r}")
            value = 0
        if self.hooks.on_mmio:
            acc = MmioAccess(False, offset, size, value)
            for fn in self.hooks.on_mmio:
                fn(acc)
            value = acc.value
        return value

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if self.hooks.on_mmio:
            acc = MmioAccess(True, offset, size, value)
            for fn in self.hooks.on_mmio:
                fn(acc)
            if acc.drop:
                return
            value = acc.value
        try:
            if size == 4 and not offset & _NOT_A_BAR_DWORD:
                self._writers[offset >> 2](value & DWORD_MASK)
            else:
                self.regs.write(offset, size, value)
        except Exception as e:
            self.internal_errors += 1
            log.exception("internal error on MMIO write at %#x", offset)
            self.host_controller_error(f"internal error writing {offset:#x}: {e!r}")

    def peek(self, offset: int, size: int = 4) -> int:
        """Read a register as the guest would see it, without announcing an MMIO access
        (for the console and tracer: looking must not change what is traced)."""
        return self.regs.peek(offset, size)

    def register_name(self, offset: int) -> str:
        """The register at BAR0 `offset` as traces and the console show it ("USBSTS",
        "PORTSC[3]", "IMAN[0]", "DOORBELL[2]", "XECP+0x10"...)."""
        return self.regs.name(offset)

    def _write_reserved(self, off: int, v: int) -> None:
        # one log line per 256 bytes of reserved space
        self.refuse(f"resw{off >> 8}", f"write {v:#x} to reserved offset {off:#x} ignored")

    # ---- capability registers -------------------------------------------------------------------
    def _capabilities(self) -> tuple[tuple[R.Register, int], ...]:
        sp = self.scratchpads
        return (
            (R.CAPLENGTH, R.CAPLENGTH.encode(caplength=R.CAP_LENGTH, hciversion=R.HCI_VERSION)),
            (R.HCSPARAMS1, R.HCSPARAMS1.encode(max_slots=self.max_slots,
                                               max_intrs=len(self.interrupters),
                                               max_ports=len(self.ports))),
            # IST 1 microframe; the scratchpad count is split over two fields, low bits first
            (R.HCSPARAMS2, R.HCSPARAMS2.encode(
                ist=1, erst_max=self.erst_max, max_scratchpad_lo=sp,
                max_scratchpad_hi=sp >> R.HCSPARAMS2["max_scratchpad_lo"].width)),
            (R.HCSPARAMS3, R.HCSPARAMS3.encode(u1_exit_latency=10, u2_exit_latency=256)),  # us
            (R.HCCPARAMS1, R.HCCPARAMS1.encode(ac64=1, csz=int(self.context_size == 64),
                                               ppc=int(self.port_power_control), nss=1,
                                               xecp=R.XECP_BASE // 4)),     # in dwords
            (R.DBOFF, R.DBOFF.encode(dboff=R.DB_BASE)),
            (R.RTSOFF, R.RTSOFF.encode(rtsoff=R.RT_BASE)),
            (R.HCCPARAMS2, 0))

    def _write_capability(self, off: int, v: int) -> None:
        self.refuse(f"capw{off}", f"write {v:#x} to read-only capability register "
                    f"{self.register_name(off)} ignored")

    # ---- extended capabilities ------------------------------------------------------------------
    def _legacy_support(self) -> tuple[Binding, ...]:
        """USB Legacy Support (7.1): the BIOS/OS ownership handshake; nothing else happens."""
        first = R.USBLEGSUP.encode(cap_id=R.XCAP_LEGACY, next=len(R.LEGACY_REGS))
        return ((R.USBLEGSUP, lambda: first | self.legsup, self._write_legsup),
                (R.USBLEGCTLSTS, lambda: self.legctlsts, self._write_legctlsts))

    def _write_legsup(self, v: int) -> None:
        self.legsup = R.USBLEGSUP.merge(self.legsup, v)

    def _write_legctlsts(self, v: int) -> None:
        self.legctlsts = R.USBLEGCTLSTS.merge(self.legctlsts, v)

    def _supported_protocols(self) -> list[int]:
        """One Supported Protocol capability (7.2) per protocol that has ports, as dwords that
        follow the legacy support capability (next pointers in dwords)."""
        protos = []
        if self.usb2_ports:
            protos.append((2, 1, self.usb2_ports))
        if self.usb3_ports:
            protos.append((3, self.usb2_ports + 1, self.usb3_ports))
        out: list[int] = []
        for i, (major, first, count) in enumerate(protos):
            nxt = R.SUPPORTED_PROTOCOL.ndwords if i + 1 < len(protos) else 0
            out += R.SUPPORTED_PROTOCOL.encode(
                cap_id=R.XCAP_PROTOCOL, next=nxt, major=major, minor=0,
                name=R.PROTOCOL_NAME_USB, port_offset=first, port_count=count)
        return out

    def _write_xecp_reserved(self, off: int, v: int) -> None:
        rel = off - R.XECP_BASE
        self.refuse(f"xecpw{rel}", f"write {v:#x} to read-only extended capability "
                    f"offset {rel:#x} ignored")

    # ---- operational registers ------------------------------------------------------------------
    def _operational(self) -> tuple[Binding, ...]:
        return ((R.USBCMD, lambda: self.usbcmd, self._write_usbcmd),
                (R.USBSTS, lambda: self.usbsts, self._write_usbsts),
                (R.PAGESIZE, constant(R.PAGESIZE.encode(page_size=1)), ignore),   # 4 KiB pages
                (R.DNCTRL, lambda: self.dnctrl, self._write_dnctrl),
                (R.CRCR_LO, lambda: _CRR if self.crr else 0, self._write_crcr_lo),  # CRR only
                (R.CRCR_HI, read_zero, self._write_crcr_hi),
                (R.DCBAAP_LO, lambda: lo32(self.dcbaap), self._write_dcbaap_lo),
                (R.DCBAAP_HI, lambda: hi32(self.dcbaap), self._write_dcbaap_hi),
                (R.CONFIG, lambda: self.config, self._write_config))

    def _write_op_reserved(self, off: int, v: int) -> None:
        rel = off - R.OP_BASE
        self.refuse(f"opw{rel}", f"write {v:#x} to reserved operational offset {rel:#x}")

    def _write_usbsts(self, v: int) -> None:
        self.usbsts = R.USBSTS.merge(self.usbsts, v)

    def _write_dnctrl(self, v: int) -> None:
        self.dnctrl = R.DNCTRL.merge(self.dnctrl, v)

    def _write_crcr_hi(self, v: int) -> None:
        if self.crr or self._crcr_hi_ignore:
            self._crcr_hi_ignore = False
        else:
            self.crcr = with_hi32(self.crcr, v)
            self._crcr_set = True

    def _write_dcbaap_lo(self, v: int) -> None:
        self.dcbaap = with_lo32(self.dcbaap, v & R.DCBAAP_LO.rw)

    def _write_dcbaap_hi(self, v: int) -> None:
        self.dcbaap = with_hi32(self.dcbaap, v)

    def _write_config(self, v: int) -> None:
        n = _MAX_SLOTS_EN.of(v)
        if n > self.max_slots:
            self.refuse("maxslotsen", f"CONFIG.MaxSlotsEn {n} > MaxSlots {self.max_slots}; "
                        f"clamped")
            n = self.max_slots
        self.config = (v & _CONFIG_FLAGS) | _MAX_SLOTS_EN.put(n)

    def _write_usbcmd(self, v: int) -> None:
        if v & HCRST:
            self._set_state("controller", "HCRST")
            self._reset_state()
            return
        old = self.usbcmd
        # CSS/CRS (save/restore state) are strobes that complete at once: nothing volatile to
        # save, so they are simply not stored.
        self.usbcmd = v & USBCMD_RW
        if (v & RS) and not (old & RS):
            if self.usbsts & (HSE | HCE):
                self.refuse("rs-after-error", "R/S set after a Host System/Controller Error "
                            "without HCRST; staying halted")
                self.usbcmd &= ~RS
                return
            self._start()
        elif not (v & RS) and (old & RS):
            self._halt()
        if (v ^ old) & INTE:
            self.update_intx()
            if v & INTE:
                for i in self.interrupters:
                    if i.ip and i.ie:
                        self.deliver_interrupt(i)
        if (v ^ old) & EWE:
            self._arm_wrap()

    def _start(self) -> None:
        self.usbsts &= ~HCH
        self._mf_base = self.scheduler.now_ns() - self.mfindex_frozen * R.MICROFRAME_NS
        self._arm_wrap()
        self._set_state("controller", "running", "halted")
        for i in self.interrupters:
            i.try_fire()
        if self.crr:
            self.kick_commands()
        for slot in self.slots.values():
            for ep in slot.endpoints.values():
                self.kick_endpoint(ep)

    def _halt(self) -> None:
        if self.usbsts & HCH:
            return
        self.mfindex_frozen = self.mfindex()
        self.usbsts |= HCH
        self.usbcmd &= ~RS
        self.crr = False
        if self._wrap_timer is not None:
            self._wrap_timer.cancel()
            self._wrap_timer = None
        self._set_state("controller", "halted", "running")

    def _write_crcr_lo(self, v: int) -> None:
        if self.crr:
            if v & _CA:
                self._stop_command_ring(abort=True)
                self._crcr_hi_ignore = True
            elif v & _CS:
                self._stop_command_ring(abort=False)
                self._crcr_hi_ignore = True
            return
        self.crcr = with_lo32(self.crcr, v & R.CRCR_LO.rw)
        self._crcr_set = True

    def _stop_command_ring(self, abort: bool) -> None:
        if self.cmd_pending is not None and abort:
            trb = self.cmd_pending
            self.cmd_pending = None
            self._post_command(CommandResult(trb, CC.COMMAND_ABORTED))
        elif self.cmd_pending is not None:
            return    # stop waits for the running command; it completes, then the ring stops
        self.crr = False
        self.crcr = (self.cmd_ring.dequeue & ~0x3F) | self.cmd_ring.ccs
        # Restarting goes on from the stopped dequeue pointer (it need not be 64-byte
        # aligned) unless software points CRCR elsewhere first (4.6.1.1).
        self._crcr_set = False
        self.gate.forget("cmd")
        self.post_event(0, events.command_completion(self.cmd_ring.dequeue,
                                                     CC.COMMAND_RING_STOPPED))

    # ---- runtime registers ----------------------------------------------------------------------
    def mfindex(self) -> int:
        if not self.running:
            return self.mfindex_frozen
        return _MFINDEX.of((self.scheduler.now_ns() - self._mf_base) // R.MICROFRAME_NS)

    def _arm_wrap(self) -> None:
        if self._wrap_timer is not None:
            self._wrap_timer.cancel()
            self._wrap_timer = None
        if self.running and self.usbcmd & EWE:
            elapsed = (self.scheduler.now_ns() - self._mf_base) % MFINDEX_WRAP_NS
            self._wrap_timer = self.scheduler.call_later(MFINDEX_WRAP_NS - elapsed, self._wrap)

    def _wrap(self) -> None:
        self._wrap_timer = None
        if self.running and self.usbcmd & EWE:
            self.post_event(0, events.mfindex_wrap())
            self._wrap_timer = self.scheduler.call_later(MFINDEX_WRAP_NS, self._wrap)

    def _write_absent_interrupter(self, off: int, v: int) -> None:
        i = (off - R.RT_BASE - R.IR_BASE) // R.IR_STRIDE
        self.refuse(f"irw{i}", f"write to interrupter {i}, which does not exist "
                    f"(MaxIntrs {len(self.interrupters)})")

    # ---- doorbells ------------------------------------------------------------------------------
    def _doorbell(self, index: int, v: int) -> None:
        target, stream = _DB_TARGET.of(v), _DB_STREAM.of(v)
        for fn in self.hooks.on_doorbell:
            fn(index, target, stream)
        if index == 0:
            if target != 0:
                self.refuse("db0target", f"host controller doorbell target {target} is "
                            f"reserved (0 rings the command ring)")
                return
            if not self.running:
                return
            if not self.crr:
                self.crr = True
                if self._crcr_set:
                    self.cmd_ring.set_dequeue(self.crcr & ~0x3F, self.crcr & 1)
            self.cmd_ring.invalidate()
            self.kick_commands()
            return
        slot = self.slots.get(index)
        if slot is None:
            self.refuse(f"dbslot{index}", f"doorbell {index} rung for a slot that is not enabled")
            return
        ep = slot.endpoints.get(target)
        if ep is None:
            self.refuse(f"dbep{index}/{target}", f"doorbell for slot {index} endpoint {target}, "
                        f"which is not enabled (valid DCIs: {sorted(slot.endpoints)})")
            return
        if stream:
            self.refuse(f"dbstream{index}", f"doorbell with stream id {stream} for slot {index} "
                        f"endpoint {target}: no streams configured; ignored")
            return
        if ep.state == EpState.STOPPED:
            ep.set_state(EpState.RUNNING)
        ep.ring.invalidate()
        self.kick_endpoint(ep)

    # ---- ring workers ----------------------------------------------------------------------------
    def kick_commands(self) -> None:
        self.gate.kick("cmd", self._command_worker)

    def kick_endpoint(self, ep: SlotEndpoint) -> None:
        if not self.running or ep.state != EpState.RUNNING:
            return
        worker = ep.worker
        if worker is None:
            worker = ep.worker = lambda unit: self._endpoint_worker(ep, unit)
        self.gate.kick(ep.key, worker)

    def _endpoint_worker(self, ep: SlotEndpoint, unit: str) -> bool:
        if (self.usbsts & HCH or self.full_event_rings
                or ep.slot.endpoints.get(ep.dci) is not ep):
            return False
        return self.transfers.step(ep, unit)

    @property
    def events_full(self) -> bool:
        """An event ring is full: rings stop being processed until software catches up."""
        return self.full_event_rings > 0

    def event_ring_has_room(self) -> None:
        if self.crr:
            self.kick_commands()
        for slot in self.slots.values():
            for ep in slot.endpoints.values():
                self.kick_endpoint(ep)

    def _command_worker(self, unit: str) -> bool:
        if not self.running or not self.crr or self.cmd_pending is not None:
            return False
        if self.events_full:
            return False      # an event ring is full: wait for software to catch up (4.9.4)
        try:
            start = self._announce_command() if self.hooks.on_command_start else None
            if start is not None and start.hold and self.gate.paused:
                self.gate.hold()
                return False
            if not self.running or not self.crr:
                return False                 # an observer's doing: the controller halted
            trb = self.cmd_ring.fetch()
        except RingError as e:
            self.host_controller_error(f"command ring: {e}")
            return False
        except DmaError as e:
            self.host_system_error(f"command ring unreadable: {e}")
            return False
        if trb is None:
            return False
        self.cmd_pending = trb
        if start is not None and start.withhold and start.trb.addr == trb.addr:
            self.refuse(f"withheld{trb.addr:#x}", f"command {trb!r} withheld by an observer: it "
                        f"completes only if software aborts the command ring", level="info")
            return True
        result = self.commands.execute(trb)
        if result is not None and self.cmd_pending is trb:
            self.cmd_pending = None
            self._post_command(result)
        return True

    def _announce_command(self) -> CommandStart | None:
        """Announce the next command before it runs (None: the ring has none)."""
        trb = self.cmd_ring.peek()
        if trb is None:
            return None
        start = CommandStart(trb)
        for fn in self.hooks.on_command_start:
            fn(start)
        return start

    def finish_command(self, result: CommandResult) -> None:
        """An asynchronous command finished (unless it was aborted meanwhile)."""
        if self.cmd_pending is not result.trb:
            return
        self.cmd_pending = None
        self._post_command(result)
        self.kick_commands()

    def _post_command(self, r: CommandResult) -> None:
        for fn in self.hooks.on_command:
            fn(r)
        self.post_event(0, events.command_completion(r.trb.addr, int(r.cc), r.slot, r.param),
                        note=r.note)

    # ---- events ----------------------------------------------------------------------------------
    def post_event(self, interrupter: int, dwords: list[int], block: bool = False,
                   note: str = "") -> list[int] | None:
        """Post one event TRB (built by `events`); returns the dwords as they were written,
        after observers rewrote them, or None when an observer dropped it."""
        if interrupter >= len(self.interrupters):
            self.refuse(f"intr{interrupter}", f"interrupter target {interrupter} does not exist; "
                        f"event goes to interrupter 0")
            interrupter = 0
        ir = self.interrupters[interrupter]
        hooks = self.hooks
        if (not hooks.on_event and not hooks.on_event_posted and not note and ir.segments
                and not ir.full and ir.write_unobserved(dwords, block)):
            return dwords
        ev = EventRecord(interrupter, dwords, note=note)
        ir.post(ev, block)
        return None if ev.drop else ev.dwords

    def usbsts_eint(self) -> None:
        self.usbsts |= EINT

    def _event_ring_full(self, full: bool) -> None:
        # counted, so that the per-TD check of the transfer path is one comparison
        self.full_event_rings += 1 if full else -1

    def deliver_interrupt(self, ir: Interrupter) -> None:
        lost = False
        if self.hooks.on_interrupt:
            sig = InterruptSignal(ir.index)
            for fn in self.hooks.on_interrupt:
                fn(sig)
            lost = sig.lost
        if not (self.usbcmd & INTE) or not ir.ie:
            return
        if self.irq.message_signalled:
            ir.ip = 0          # cleared once the MSI write completes (5.5.2.1)
            if not lost:       # a lost message: the controller believes it was sent
                self.irq.signal(ir.index)
        elif not lost:         # INTx: the line rises at the next update instead
            self.update_intx()

    def update_intx(self) -> None:
        if self.irq.message_signalled:
            return
        level = bool(self.usbcmd & INTE) and any(i.ip and i.ie for i in self.interrupters)
        self.irq.set_level(level)

    # ---- ports -----------------------------------------------------------------------------------
    def port(self, number: int) -> RootPort | None:
        return self.ports[number - 1] if 1 <= number <= len(self.ports) else None

    def port_changed(self, port: RootPort) -> None:
        self.usbsts |= PCD
        if self.running:
            self.post_event(0, events.port_status_change(port.number))

    def _abort_port(self, port: RootPort) -> None:
        for slot in self.slots.values():
            if slot.port is port:
                for ep in slot.endpoints.values():
                    self.transfers.take_back(ep)
                    self.kick_endpoint(ep)

    def port_disabled(self, port: RootPort) -> None:
        self._abort_port(port)

    def device_gone(self, port: RootPort, device: UsbDevice) -> None:
        self._abort_port(port)

    def attach(self, device: UsbDevice, port: int | None = None) -> int:
        """Plug `device` into a root port (the first free one of its protocol by default)."""
        want_usb3 = device.speed.is_superspeed
        if port is None:
            free = [p for p in self.ports if p.device is None and p.usb3 == want_usb3]
            if not free:
                raise ValueError(f"no free {'USB 3' if want_usb3 else 'USB 2'} root port for "
                                 f"{device.name}")
            target = free[0]
        else:
            chosen = self.port(port)
            if chosen is None:
                raise ValueError(f"port {port} does not exist (1..{len(self.ports)})")
            target = chosen
            if target.device is not None:
                raise ValueError(f"port {port} already has {target.device.name}")
            if target.usb3 != want_usb3:
                raise ValueError(f"port {port} is a {target.protocol} port; {device.name} is "
                                 f"{device.speed.label}")
        target.plug(device)
        return target.number

    def detach(self, port: int) -> UsbDevice:
        p = self.port(port)
        if p is None or p.device is None:
            raise ValueError(f"nothing is plugged into port {port}")
        dev = p.device
        p.unplug()
        return dev

    # ---- slots -----------------------------------------------------------------------------------
    def dcbaa_entry(self, slot_id: int) -> int:
        if not self.dcbaap:
            return 0
        return self.mem.read_u64(self.dcbaap + 8 * slot_id)

    def release_slot(self, slot: DeviceSlot) -> None:
        for ep in list(slot.endpoints.values()):
            self.transfers.take_back(ep)
            self.gate.forget(ep.key)
        slot.endpoints.clear()
        slot.set_state(SlotState.DISABLED)
        del self.slots[slot.id]
        for fn in self.hooks.on_state:
            fn("slot", str(slot.id), "enabled", "disabled")

    def devices(self) -> Iterable[tuple[int, UsbDevice]]:
        return [(p.number, p.device) for p in self.ports if p.device is not None]

    def find_device(self, name: str) -> tuple[int, UsbDevice]:
        """(port, device) of the first plugged device called `name` ('tablet', 'storage'...)."""
        for number, device in self.devices():
            if device.name == name:
                return number, device
        raise LookupError(f"no {name} is plugged in")
