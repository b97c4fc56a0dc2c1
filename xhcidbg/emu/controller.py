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

from ..devices.base import UsbDevice
from . import events
from . import regs as R
from .commands import Commands
from .context import EpState, SlotState
from .gate import Gate
from .hooks import CommandResult, EventRecord, Hooks, MmioAccess
from .interrupters import Interrupter, InterruptSink
from .memory import DmaError, GuestMemory
from .ports import RootPort
from .rings import Ring, RingError
from .slots import DeviceSlot, SlotEndpoint
from .timing import Scheduler
from .transfers import TransferEngine
from .trb import CC, Trb

log = logging.getLogger("xhcidbg.emu")

# USBCMD / USBSTS bits, derived from the declarations in regs.py
RS, HCRST, INTE, HSEE, EWE = (R.USBCMD.mask(n) for n in ("rs", "hcrst", "inte", "hsee", "ewe"))
USBCMD_RW = R.USBCMD.mask("rs", "inte", "hsee", "ewe", "eu3s", "cme", "ete")
HCH, HSE, EINT, PCD, HCE = (R.USBSTS.mask(n) for n in ("hch", "hse", "eint", "pcd", "hce"))
MFINDEX_WRAP_NS = 0x4000 * 125_000
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
        self.gate = Gate(self.scheduler)
        self.bar_size = R.BAR_SIZE
        self.usb2_ports = usb2_ports
        self.usb3_ports = usb3_ports
        self.ports = [RootPort(self, i + 1, i >= usb2_ports) for i in range(usb2_ports + usb3_ports)]
        self.full_event_rings = 0
        self.interrupters = [Interrupter(self, i) for i in range(interrupters)]
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
        self.full_event_rings = 0    # kept by the interrupters
        self._refused: set[str] = set()
        self.refusals = 0
        self.internal_errors = 0     # bugs of ours caught at the MMIO boundary (tests assert 0)
        self.legsup = 0          # USBLEGSUP ownership bits
        self.legctlsts = 0
        self._cap = self._capabilities()
        self._reset_state()

    # ---- state -----------------------------------------------------------------------------------
    @property
    def mem(self) -> GuestMemory:
        return self._mem

    @mem.setter
    def mem(self, mem: GuestMemory) -> None:
        """Guest memory for every DMA (the transport sets it once, then maps regions into it)."""
        self._mem = mem
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
        self.dcbaap = 0
        self.config = 0
        self.cmd_ring = Ring(self.mem, name="cmd", announce=self.hooks.on_trb)
        self.cmd_pending: Trb | None = None
        self.mfindex_frozen = 0
        self._mf_base = 0
        if getattr(self, "_wrap_timer", None) is not None:
            self._wrap_timer.cancel()
        self._wrap_timer = None
        self.gate.work.clear()
        for i in self.interrupters:
            i.cancel_timers()
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
        return min(self.config & 0xFF, self.max_slots)

    def _set_state(self, kind: str, new: str, old: str = "") -> None:
        for fn in self.hooks.on_state:
            fn(kind, self.name, old, new)

    # ---- logging of refused guest input ------------------------------------------------------------
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

    # ---- capability registers ----------------------------------------------------------------------
    def _capabilities(self) -> dict[int, int]:
        n_ports = len(self.ports)
        sp = self.scratchpads
        hcsparams1 = self.max_slots | (len(self.interrupters) << 8) | (n_ports << 24)
        hcsparams2 = 1 | (self.erst_max << 4) | ((sp >> 5) << 21) | ((sp & 0x1F) << 27)
        hcsparams3 = 10 | (256 << 16)                 # U1 10 us, U2 256 us exit latency
        hccparams1 = (1 | (1 << 3) | (1 << 7) | ((self.context_size == 64) << 2)
                      | ((R.XECP_BASE >> 2) << 16))   # AC64, PPC, NSS, CSZ, xECP
        return {0x00: R.CAP_LENGTH | (R.HCI_VERSION << 16), 0x04: hcsparams1,
                0x08: hcsparams2, 0x0C: hcsparams3, 0x10: hccparams1, 0x14: R.DB_BASE,
                0x18: R.RT_BASE, 0x1C: 0}

    def _xecp(self) -> list[int]:
        """Extended capabilities as dwords from XECP_BASE: legacy support, then one Supported
        Protocol capability per protocol (next pointers in dwords)."""
        name = 0x20425355            # "USB "
        n2, n3 = self.usb2_ports, self.usb3_ports
        out = [R.XCAP_LEGACY | (2 << 8) | self.legsup, self.legctlsts]
        protos = []
        if n2:
            protos.append((2, 0x00, 1, n2))
        if n3:
            protos.append((3, 0x00, n2 + 1, n3))
        for i, (major, minor, first, count) in enumerate(protos):
            nxt = 4 if i + 1 < len(protos) else 0
            out += [R.XCAP_PROTOCOL | (nxt << 8) | (minor << 16) | (major << 24), name,
                    first | (count << 8), 0]
        return out

    # ---- MMIO ---------------------------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        try:
            if size == 8:
                value = self._read32(offset) | (self._read32(offset + 4) << 32)
            elif size in (1, 2, 4):
                base = offset & ~3
                shift = (offset & 3) * 8
                value = (self._read32(base) >> shift) & ((1 << (size * 8)) - 1)
            else:
                self.refuse(f"rsize{size}", f"MMIO read of size {size} at {offset:#x}; reads as 0")
                value = 0
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
        try:
            if size == 8:
                self._write32(offset, value & 0xFFFFFFFF)
                self._write32(offset + 4, (value >> 32) & 0xFFFFFFFF)
            elif size == 4:
                self._write32(offset, value & 0xFFFFFFFF)
            elif size in (1, 2):
                base = offset & ~3
                shift = (offset & 3) * 8
                mask = ((1 << (size * 8)) - 1) << shift
                # Bytes not written keep their value, except write-1-to-clear/set bits there.
                cur = self._read32(base) & ~self._strobe_mask(base)
                self._write32(base, (cur & ~mask) | ((value << shift) & mask))
            else:
                self.refuse(f"wsize{size}", f"MMIO write of size {size} at {offset:#x} ignored")
        except Exception as e:
            self.internal_errors += 1
            log.exception("internal error on MMIO write at %#x", offset)
            self.host_controller_error(f"internal error writing {offset:#x}: {e!r}")

    def peek(self, offset: int, size: int = 4) -> int:
        """Read a register as the guest would see it, without announcing an MMIO access
        (for the console and tracer: looking must not change what is traced)."""
        if size == 8:
            return self._read32(offset) | (self._read32(offset + 4) << 32)
        return (self._read32(offset & ~3) >> ((offset & 3) * 8)) & ((1 << (size * 8)) - 1)

    def register_name(self, offset: int) -> str:
        """The name of the register at BAR0 `offset`, for observers ("USBSTS", "PORTSC[3]")."""
        return R.reg_name(offset, len(self.ports), len(self.interrupters))

    def _strobe_mask(self, base: int) -> int:
        if R.PORT_BASE <= base < R.PORT_BASE + 0x10 * len(self.ports) and base % 0x10 == 0:
            return R.PORTSC.rw1c | R.PORTSC.rw1s
        if base == R.OP_BASE + 4:
            return R.USBSTS.rw1c
        if base == R.OP_BASE + 0x18:
            return R.CRCR_LO.rw1s
        if R.RT_BASE + R.IR_BASE <= base < R.RT_BASE + 0x1000:
            rel = (base - R.RT_BASE - R.IR_BASE) % R.IR_STRIDE
            return {0: R.IMAN.rw1c, 0x18: R.ERDP_LO.rw1c}.get(rel, 0)
        if base == R.XECP_BASE + 4:
            return R.USBLEGCTLSTS.rw1c
        return 0

    def _read32(self, off: int) -> int:
        if off < R.CAP_LENGTH:
            return self._cap.get(off, 0)
        if off < R.PORT_BASE:
            return self._read_op(off - R.OP_BASE)
        if off < R.PORT_BASE + 0x10 * len(self.ports):
            rel = off - R.PORT_BASE
            return self.ports[rel // 0x10].read((rel % 0x10) // 4)
        if R.XECP_BASE <= off < R.RT_BASE:
            caps = self._xecp()
            i = (off - R.XECP_BASE) // 4
            return caps[i] if i < len(caps) else 0
        if R.RT_BASE <= off < R.DB_BASE:
            return self._read_rt(off - R.RT_BASE)
        return 0    # doorbells read 0; everything else is reserved

    def _write32(self, off: int, v: int) -> None:
        if off < R.CAP_LENGTH:
            self.refuse(f"capw{off}", f"write {v:#x} to read-only capability register "
                        f"{self.register_name(off)} ignored")
        elif off < R.PORT_BASE:
            self._write_op(off - R.OP_BASE, v)
        elif off < R.PORT_BASE + 0x10 * len(self.ports):
            rel = off - R.PORT_BASE
            self.ports[rel // 0x10].write((rel % 0x10) // 4, v)
        elif R.XECP_BASE <= off < R.RT_BASE:
            self._write_xecp(off - R.XECP_BASE, v)
        elif R.RT_BASE <= off < R.DB_BASE:
            self._write_rt(off - R.RT_BASE, v)
        elif R.DB_BASE <= off < R.DB_BASE + 4 * 256:
            self._doorbell((off - R.DB_BASE) // 4, v)
        else:
            self.refuse(f"resw{off >> 8}", f"write {v:#x} to reserved offset {off:#x} ignored")

    # ---- operational registers --------------------------------------------------------------------
    def _read_op(self, rel: int) -> int:
        if rel == 0x00:
            return self.usbcmd
        if rel == 0x04:
            return self.usbsts
        if rel == 0x08:
            return 1                          # 4 KiB pages
        if rel == 0x14:
            return self.dnctrl
        if rel == 0x18:
            return 8 if self.crr else 0       # only CRR reads back
        if rel == 0x30:
            return self.dcbaap & 0xFFFFFFFF
        if rel == 0x34:
            return self.dcbaap >> 32
        if rel == 0x38:
            return self.config
        return 0

    def _write_op(self, rel: int, v: int) -> None:
        if rel == 0x00:
            self._write_usbcmd(v)
        elif rel == 0x04:
            self.usbsts &= ~(v & R.USBSTS.rw1c)
        elif rel == 0x14:
            self.dnctrl = v & 0xFFFF
        elif rel == 0x18:
            self._write_crcr_lo(v)
        elif rel == 0x1C:
            if self.crr or self._crcr_hi_ignore:
                self._crcr_hi_ignore = False
            else:
                self.crcr = (self.crcr & 0xFFFFFFFF) | (v << 32)
        elif rel == 0x30:
            self.dcbaap = (self.dcbaap & ~0xFFFFFFFF) | (v & 0xFFFFFFC0)
        elif rel == 0x34:
            self.dcbaap = (self.dcbaap & 0xFFFFFFFF) | (v << 32)
        elif rel == 0x38:
            n = v & 0xFF
            if n > self.max_slots:
                self.refuse("maxslotsen", f"CONFIG.MaxSlotsEn {n} > MaxSlots {self.max_slots}; "
                            f"clamped")
                n = self.max_slots
            self.config = (v & 0x300) | n
        elif rel == 0x08:
            pass    # PAGESIZE is read-only
        else:
            self.refuse(f"opw{rel}", f"write {v:#x} to reserved operational offset {rel:#x}")

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
        self._mf_base = self.scheduler.now_ns() - self.mfindex_frozen * 125_000
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
            if v & 0x4:
                self._stop_command_ring(abort=True)
                self._crcr_hi_ignore = True
            elif v & 0x2:
                self._stop_command_ring(abort=False)
                self._crcr_hi_ignore = True
            return
        self.crcr = (self.crcr & ~0xFFFFFFFF) | (v & 0xFFFFFFC1)

    def _stop_command_ring(self, abort: bool) -> None:
        if self.cmd_pending is not None and abort:
            trb = self.cmd_pending
            self.cmd_pending = None
            self._post_command(CommandResult(trb, CC.COMMAND_ABORTED))
        elif self.cmd_pending is not None:
            return    # stop waits for the running command; it completes, then the ring stops
        self.crr = False
        self.crcr = (self.cmd_ring.dequeue & ~0x3F) | self.cmd_ring.ccs
        self.gate.forget("cmd")
        self.post_event(0, events.command_completion(self.cmd_ring.dequeue,
                                                     CC.COMMAND_RING_STOPPED))

    # ---- runtime registers --------------------------------------------------------------------------
    def mfindex(self) -> int:
        if not self.running:
            return self.mfindex_frozen
        return ((self.scheduler.now_ns() - self._mf_base) // 125_000) & 0x3FFF

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

    def _read_rt(self, rel: int) -> int:
        if rel == 0:
            return self.mfindex()
        if rel < R.IR_BASE:
            return 0
        i, reg = divmod(rel - R.IR_BASE, R.IR_STRIDE)
        if i >= len(self.interrupters):
            return 0
        ir = self.interrupters[i]
        if reg == 0x00:
            return ir.ip | (ir.ie << 1)
        if reg == 0x04:
            return ir.imodi | (ir.imodc << 16)
        if reg == 0x08:
            return ir.erstsz
        if reg == 0x10:
            return ir.erstba & 0xFFFFFFFF
        if reg == 0x14:
            return ir.erstba >> 32
        if reg == 0x18:
            return (ir.erdp & 0xFFFFFFF0) | (ir.ehb << 3) | ir.desi
        if reg == 0x1C:
            return ir.erdp >> 32
        return 0

    def _write_rt(self, rel: int, v: int) -> None:
        if rel < R.IR_BASE:
            return      # MFINDEX is read-only
        i, reg = divmod(rel - R.IR_BASE, R.IR_STRIDE)
        if i >= len(self.interrupters):
            self.refuse(f"irw{i}", f"write to interrupter {i}, which does not exist "
                        f"(MaxIntrs {len(self.interrupters)})")
            return
        ir = self.interrupters[i]
        if reg == 0x00:
            was_ie = ir.ie
            if v & 1:
                ir.ip = 0
            ir.ie = (v >> 1) & 1
            if ir.ie and not was_ie and ir.ip:
                self.deliver_interrupt(ir)
            self.update_intx()
        elif reg == 0x04:
            ir.imodi = v & 0xFFFF
            ir.imodc = v >> 16
        elif reg == 0x08:
            ir.erstsz = v & 0xFFFF
        elif reg == 0x10:
            ir.erstba = (ir.erstba & ~0xFFFFFFFF) | (v & 0xFFFFFFC0)
        elif reg == 0x14:
            ir.erstba = (ir.erstba & 0xFFFFFFFF) | (v << 32)
            ir.setup_ring()
        elif reg == 0x18:
            ir.write_erdp(lo=v)
        elif reg == 0x1C:
            ir.write_erdp(hi=v)

    def _write_xecp(self, rel: int, v: int) -> None:
        if rel == 0:
            self.legsup = v & ((1 << 16) | (1 << 24))
        elif rel == 4:
            self.legctlsts = (self.legctlsts & ~(v & R.USBLEGCTLSTS.rw1c) & ~0xE011) | (v & 0xE011)
        else:
            self.refuse(f"xecpw{rel}", f"write {v:#x} to read-only extended capability "
                        f"offset {rel:#x} ignored")

    # ---- doorbells ------------------------------------------------------------------------------------
    def _doorbell(self, index: int, v: int) -> None:
        target, stream = v & 0xFF, v >> 16
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

    # ---- ring workers ----------------------------------------------------------------------------------
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
        result = self.commands.execute(trb)
        if result is not None and self.cmd_pending is trb:
            self.cmd_pending = None
            self._post_command(result)
        return True

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

    # ---- events -------------------------------------------------------------------------------------------
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

    def deliver_interrupt(self, ir: Interrupter) -> None:
        for fn in self.hooks.on_interrupt:
            fn(ir.index)
        if not (self.usbcmd & INTE) or not ir.ie:
            return
        if self.irq.message_signalled:
            ir.ip = 0          # cleared once the MSI write completes (5.5.2.1)
            self.irq.signal(ir.index)
        else:
            self.update_intx()

    def update_intx(self) -> None:
        if self.irq.message_signalled:
            return
        level = bool(self.usbcmd & INTE) and any(i.ip and i.ie for i in self.interrupters)
        self.irq.set_level(level)

    # ---- ports ------------------------------------------------------------------------------------------------
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

    # ---- slots ------------------------------------------------------------------------------------------------
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
