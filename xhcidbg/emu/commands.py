"""The command ring and every command (xHCI 1.2 sections 4.6 and 6.4.3)."""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Callable

from ..devices.base import EpType, Status, UsbTransfer
from .context import EP_CTX, SLOT_CTX, EpState, SlotState, XhciEpType
from .hooks import CommandResult
from .memory import DmaError
from .slots import DeviceSlot, Endpoint
from .transfers import stopped_event_trb
from .trb import CC, Trb, TrbType

if TYPE_CHECKING:
    from .controller import XhciController

T = TrbType
PORT_BANDWIDTH_FREE = 90       # percent of a port's bandwidth we report as available


class CommandError(Exception):
    """A command fails with completion code `cc`; the message says why, for the log."""

    def __init__(self, cc: int, why: str):
        super().__init__(why)
        self.cc = cc


class Commands:
    def __init__(self, hc: "XhciController"):
        self.hc = hc
        self.handlers: dict[int, Callable[[Trb], CommandResult | None]] = {
            T.NOOP_COMMAND: self.no_op,
            T.ENABLE_SLOT: self.enable_slot,
            T.DISABLE_SLOT: self.disable_slot,
            T.ADDRESS_DEVICE: self.address_device,
            T.CONFIGURE_ENDPOINT: self.configure_endpoint,
            T.EVALUATE_CONTEXT: self.evaluate_context,
            T.RESET_ENDPOINT: self.reset_endpoint,
            T.STOP_ENDPOINT: self.stop_endpoint,
            T.SET_TR_DEQUEUE: self.set_tr_dequeue,
            T.RESET_DEVICE: self.reset_device,
            T.NEGOTIATE_BANDWIDTH: self.negotiate_bandwidth,
            T.GET_PORT_BANDWIDTH: self.get_port_bandwidth,
            T.FORCE_HEADER: self.force_header,
            T.SET_LATENCY_TOLERANCE: self.no_op,
        }

    def execute(self, trb: Trb) -> CommandResult | None:
        """Run one command; None means it finishes later (it then calls hc.finish_command)."""
        handler = self.handlers.get(trb.type)
        if handler is None:
            self.hc.refuse(f"cmdtype{trb.type}", f"command ring: TRB type {trb.type} "
                           f"({trb!r}) is not a command this controller supports; TRB Error")
            return CommandResult(trb, CC.TRB_ERROR)
        try:
            return handler(trb)
        except CommandError as e:
            # Linux provokes state errors in normal operation (Reset Device on a slot in the
            # Default state, Stop Endpoint racing a halt) and handles them: info, not warning.
            level = "info" if e.cc == CC.CONTEXT_STATE_ERROR else "warning"
            self.hc.refuse(f"cmd{trb.type}:{e.cc}", f"{trb!r}: {e}", level)
            return CommandResult(trb, e.cc, slot=(trb.control >> 24) & 0xFF)
        except DmaError as e:
            self.hc.host_system_error(f"{trb!r}: context DMA failed ({e})")
            return None

    # ---- helpers -------------------------------------------------------------------------------------
    def _slot(self, trb: Trb) -> DeviceSlot:
        sid = (trb.control >> 24) & 0xFF
        slot = self.hc.slots.get(sid)
        if slot is None:
            raise CommandError(CC.SLOT_NOT_ENABLED, f"slot {sid} is not enabled")
        return slot

    def _endpoint(self, slot: DeviceSlot, trb: Trb) -> Endpoint:
        dci = (trb.control >> 16) & 0x1F
        if dci == 0:
            raise CommandError(CC.TRB_ERROR, "endpoint id 0 is not an endpoint")
        ep = slot.endpoints.get(dci)
        if ep is None:
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"slot {slot.id} endpoint {dci} is "
                               f"disabled")
        return ep

    def _input_context(self, trb: Trb) -> tuple[int, list[int], list[int]]:
        """(address, control context dwords, [drop, add]) of the Input Context."""
        addr = trb.param & ~0xF
        if addr == 0 or addr & 0x3F:
            raise CommandError(CC.TRB_ERROR, f"input context pointer {trb.param:#x} is null or "
                               f"not 64-byte aligned")
        ctrl = struct.unpack("<8I", self.hc.mem.read(addr, 32))
        return addr, list(ctrl), [ctrl[0], ctrl[1]]

    def _read_ctx(self, in_addr: int, index: int) -> list[int]:
        """Context `index` of an input context (0 control, 1 slot, 2.. endpoints DCI 1..)."""
        size = self.hc.context_size
        return list(struct.unpack("<8I", self.hc.mem.read(in_addr + index * size, 32)))

    # ---- commands ------------------------------------------------------------------------------------
    def no_op(self, trb: Trb) -> CommandResult:
        return CommandResult(trb, CC.SUCCESS)

    def enable_slot(self, trb: Trb) -> CommandResult:
        hc = self.hc
        slot_type = (trb.control >> 16) & 0x1F
        if slot_type != 0:
            raise CommandError(CC.TRB_ERROR, f"slot type {slot_type} is not one of ours (0: USB)")
        for sid in range(1, hc.max_slots_enabled + 1):
            if sid not in hc.slots:
                slot = DeviceSlot(hc, sid)
                hc.slots[sid] = slot
                for fn in hc.hooks.on_state:
                    fn("slot", str(sid), "disabled", "enabled")
                return CommandResult(trb, CC.SUCCESS, slot=sid)
        return CommandResult(trb, CC.NO_SLOTS_AVAILABLE)

    def disable_slot(self, trb: Trb) -> CommandResult:
        slot = self._slot(trb)
        self.hc.release_slot(slot)
        return CommandResult(trb, CC.SUCCESS, slot=slot.id)

    def address_device(self, trb: Trb) -> CommandResult | None:
        hc = self.hc
        slot = self._slot(trb)
        bsr = bool(trb.control & (1 << 9))
        state = slot.state
        if state not in (SlotState.DISABLED, SlotState.DEFAULT) or (
                state == SlotState.DEFAULT and bsr):
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"Address Device (BSR={int(bsr)}) on slot "
                               f"{slot.id} in state {SlotState(state).name.lower()}")
        in_addr, ctrl, (drop, add) = self._input_context(trb)
        if (add & 3) != 3 or drop:
            raise CommandError(CC.PARAMETER_ERROR, f"Address Device input control context: add "
                               f"{add:#x} (needs A0 and A1), drop {drop:#x} (needs 0)")
        sctx = self._read_ctx(in_addr, 1)
        ep0 = self._read_ctx(in_addr, 2)
        port_no = SLOT_CTX.get(sctx, "root_hub_port")
        port = hc.port(port_no)
        if port is None:
            raise CommandError(CC.PARAMETER_ERROR, f"slot context root hub port {port_no} does "
                               f"not exist (ports 1..{len(hc.ports)})")
        if SLOT_CTX.get(sctx, "route_string"):
            raise CommandError(CC.PARAMETER_ERROR, "route string set but no hubs exist here")
        if EP_CTX.get(ep0, "ep_type") != XhciEpType.CONTROL or EP_CTX.get(ep0, "max_packet") == 0:
            raise CommandError(CC.PARAMETER_ERROR, "endpoint 0 context is not a control endpoint "
                               "with a max packet size")
        out = hc.dcbaa_entry(slot.id)
        if out == 0 or out & 0x3F:
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"DCBAA entry for slot {slot.id} is "
                               f"{out:#x} (null or misaligned)")
        if not port.enabled:
            raise CommandError(CC.USB_TRANSACTION_ERROR, f"port {port_no} has no enabled device")
        for other in hc.slots.values():
            if other is not slot and other.port is port and other.state != SlotState.DISABLED:
                raise CommandError(CC.CONTEXT_STATE_ERROR,
                                   f"port {port_no} already belongs to slot {other.id}")
        slot.out_ctx = out
        slot.port = port
        # The slot context as software gave it, with the fields the xHC owns filled in.
        slot.ctx = sctx
        SLOT_CTX["context_entries"].set(slot.ctx, 1)
        ep0[0] &= ~7
        old = slot.endpoints.pop(1, None)
        if old is not None:
            hc.transfers.take_back(old)
        e = Endpoint(slot, 1, ep0)
        e.set_state(EpState.RUNNING)
        slot.endpoints[1] = e
        if bsr:
            slot.address = 0
            SLOT_CTX["usb_address"].set(slot.ctx, 0)
            slot.set_state(SlotState.DEFAULT)
            self._write_all(slot)
            return CommandResult(trb, CC.SUCCESS, slot=slot.id)
        address = slot.id        # one device per slot: the slot id is a unique address
        setup = struct.pack("<BBHHH", 0x00, 0x05, address, 0, 0)
        finished: list[CommandResult] = []      # filled by done(); empty while it is pending

        def done(x: UsbTransfer) -> None:
            for fn in hc.hooks.on_urb_complete:
                fn(x)
            if x.status != Status.OK:
                r = CommandResult(trb, CC.USB_TRANSACTION_ERROR, slot=slot.id,
                                  note=f"SET_ADDRESS {address} failed: {x.status.name}")
            else:
                slot.address = address
                SLOT_CTX["usb_address"].set(slot.ctx, address)
                slot.set_state(SlotState.ADDRESSED)
                r = CommandResult(trb, CC.SUCCESS, slot=slot.id)
            self._write_all(slot)
            if waiting:
                hc.finish_command(r)
            else:
                finished.append(r)

        waiting = False
        x = UsbTransfer(0, EpType.CONTROL, 0, setup=setup, on_complete=done)
        x.slot, x.dci, x.bus, x.devnum = slot.id, 1, 2 if port.usb3 else 1, 0
        x.submitted_ns = hc.scheduler.now_ns()
        for fn in hc.hooks.on_urb_submit:
            fn(x)
        try:
            port.device.submit(x)
        except Exception as exc:
            hc.refuse(f"devexc{slot.id}", f"device raised {exc!r} on SET_ADDRESS")
            x.complete(Status.XACT_ERROR)
        if finished:
            return finished[0]
        waiting = True
        return None

    def _write_all(self, slot: DeviceSlot) -> None:
        slot.update_context_entries()
        slot.write_slot_context()
        for ep in slot.endpoints.values():
            ep.write_back()

    def configure_endpoint(self, trb: Trb) -> CommandResult:
        slot = self._slot(trb)
        if slot.state not in (SlotState.ADDRESSED, SlotState.CONFIGURED):
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"Configure Endpoint on slot {slot.id} in "
                               f"state {SlotState(slot.state).name.lower()}")
        if trb.control & (1 << 9):          # Deconfigure
            for dci in [d for d in slot.endpoints if d != 1]:
                self._drop(slot, dci)
            slot.set_state(SlotState.ADDRESSED)
            self._write_all(slot)
            return CommandResult(trb, CC.SUCCESS, slot=slot.id)
        in_addr, ctrl, (drop, add) = self._input_context(trb)
        if drop & 3 or add & 2:
            raise CommandError(CC.TRB_ERROR, f"input control context drop {drop:#x} / add "
                               f"{add:#x}: D0, D1 and A1 must be 0")
        new: dict[int, list[int]] = {}
        for dci in range(2, 32):
            if add & (1 << dci):
                ctx = self._read_ctx(in_addr, dci + 1)
                why = self._check_ep_ctx(dci, ctx)
                if why:
                    raise CommandError(CC.PARAMETER_ERROR, f"slot {slot.id} endpoint {dci}: {why}")
                new[dci] = ctx
            elif not drop & (1 << dci) and dci not in slot.endpoints:
                continue
        for dci in range(2, 32):
            if drop & (1 << dci) and dci in slot.endpoints:
                self._drop(slot, dci)
        for dci, ctx in new.items():
            if dci in slot.endpoints:
                self._drop(slot, dci)
            ctx[0] &= ~7
            ep = Endpoint(slot, dci, ctx)
            slot.endpoints[dci] = ep
            ep.set_state(EpState.RUNNING)
        if add & 1:
            sctx = self._read_ctx(in_addr, 1)
            for name in ("hub", "mtt", "num_ports", "ttt", "max_exit_latency", "interrupter"):
                SLOT_CTX[name].set(slot.ctx, SLOT_CTX.get(sctx, name))
        slot.set_state(SlotState.CONFIGURED if len(slot.endpoints) > 1 else SlotState.ADDRESSED)
        self._write_all(slot)
        return CommandResult(trb, CC.SUCCESS, slot=slot.id)

    def _check_ep_ctx(self, dci: int, ctx: list[int]) -> str | None:
        t = EP_CTX.get(ctx, "ep_type")
        if t == XhciEpType.NOT_VALID:
            return "endpoint type 0 (not valid)"
        if t != XhciEpType.CONTROL and XhciEpType(t).is_in != bool(dci & 1):
            return f"type {XhciEpType(t).name} does not match the direction of DCI {dci}"
        if EP_CTX.get(ctx, "max_packet") == 0:
            return "max packet size 0"
        if EP_CTX.get(ctx, "max_pstreams"):
            return "streams requested but this controller has MaxPSASize 0 (no streams)"
        if EP_CTX.get(ctx, "interval") > 15:
            return f"interval {EP_CTX.get(ctx, 'interval')} out of range (0..15)"
        if (EP_CTX.get(ctx, "dequeue") << 4) == 0:
            return "TR dequeue pointer is null"
        return None

    def _drop(self, slot: DeviceSlot, dci: int) -> None:
        ep = slot.endpoints.pop(dci)
        self.hc.transfers.take_back(ep)
        ep.set_state(EpState.DISABLED)
        slot.write_context(dci, ep.ctx)

    def evaluate_context(self, trb: Trb) -> CommandResult:
        slot = self._slot(trb)
        if slot.state == SlotState.DISABLED:
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"Evaluate Context on slot {slot.id} "
                               f"before Address Device")
        in_addr, ctrl, (drop, add) = self._input_context(trb)
        if add & 1:
            sctx = self._read_ctx(in_addr, 1)
            for name in ("max_exit_latency", "interrupter"):
                SLOT_CTX[name].set(slot.ctx, SLOT_CTX.get(sctx, name))
            slot.write_slot_context()
        if add & 2:
            ctx = self._read_ctx(in_addr, 2)
            mps = EP_CTX.get(ctx, "max_packet")
            if mps == 0:
                raise CommandError(CC.PARAMETER_ERROR, "endpoint 0 max packet size 0")
            ep0 = slot.endpoints[1]
            EP_CTX["max_packet"].set(ep0.ctx, mps)
            ep0.write_back()
        return CommandResult(trb, CC.SUCCESS, slot=slot.id)

    def reset_endpoint(self, trb: Trb) -> CommandResult:
        slot = self._slot(trb)
        ep = self._endpoint(slot, trb)
        if ep.state != EpState.HALTED:
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"Reset Endpoint on {slot.id}/{ep.dci} "
                               f"which is {EpState(ep.state).name.lower()}, not halted")
        ep.set_state(EpState.STOPPED)
        return CommandResult(trb, CC.SUCCESS, slot=slot.id)

    def stop_endpoint(self, trb: Trb) -> CommandResult:
        hc = self.hc
        slot = self._slot(trb)
        ep = self._endpoint(slot, trb)
        if ep.state != EpState.RUNNING:
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"Stop Endpoint on {slot.id}/{ep.dci} "
                               f"which is {EpState(ep.state).name.lower()}")
        first = hc.transfers.take_back(ep)
        ep.set_state(EpState.STOPPED)
        if first is not None:
            t = stopped_event_trb(first)
            length = t.status & 0x1FFFF if t.type in (T.NORMAL, T.DATA_STAGE, T.ISOCH) else 0
            hc.post_transfer_event(ep, t, CC.STOPPED, length, 0, False, False)
        ep.write_back()
        return CommandResult(trb, CC.SUCCESS, slot=slot.id)

    def set_tr_dequeue(self, trb: Trb) -> CommandResult:
        slot = self._slot(trb)
        ep = self._endpoint(slot, trb)
        if ep.state not in (EpState.STOPPED, EpState.ERROR):
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"Set TR Dequeue Pointer on "
                               f"{slot.id}/{ep.dci} which is {EpState(ep.state).name.lower()}")
        stream = trb.status >> 16
        if stream:
            raise CommandError(CC.INVALID_STREAM_ID, f"stream {stream} on an endpoint without "
                               f"streams")
        ptr = trb.param & ~0xF
        if ptr == 0:
            raise CommandError(CC.PARAMETER_ERROR, "new TR dequeue pointer is null")
        hc = self.hc
        hc.transfers.take_back(ep, ptr, trb.param & 1)
        if ep.state == EpState.ERROR:
            ep.set_state(EpState.STOPPED)
        ep.write_back()
        return CommandResult(trb, CC.SUCCESS, slot=slot.id)

    def reset_device(self, trb: Trb) -> CommandResult:
        slot = self._slot(trb)
        if slot.state not in (SlotState.ADDRESSED, SlotState.CONFIGURED):
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"Reset Device on slot {slot.id} in state "
                               f"{SlotState(slot.state).name.lower()}")
        for dci in [d for d in slot.endpoints if d != 1]:
            self._drop(slot, dci)
        ep0 = slot.endpoints.get(1)
        if ep0 is not None:
            self.hc.transfers.take_back(ep0)
        slot.address = 0
        SLOT_CTX["usb_address"].set(slot.ctx, 0)
        slot.set_state(SlotState.DEFAULT)
        self._write_all(slot)
        return CommandResult(trb, CC.SUCCESS, slot=slot.id)

    def negotiate_bandwidth(self, trb: Trb) -> CommandResult:
        slot = self._slot(trb)
        return CommandResult(trb, CC.SUCCESS, slot=slot.id)

    def get_port_bandwidth(self, trb: Trb) -> CommandResult:
        hc = self.hc
        speed = (trb.control >> 16) & 0xF
        hub = (trb.control >> 24) & 0xFF
        if hub:
            raise CommandError(CC.PARAMETER_ERROR, f"hub slot {hub}: no hubs are emulated")
        if not 1 <= speed <= 5:
            raise CommandError(CC.PARAMETER_ERROR, f"device speed {speed} is not a speed id")
        addr = trb.param & ~0xF
        if addr == 0:
            raise CommandError(CC.PARAMETER_ERROR, "port bandwidth context pointer is null")
        ctx = bytearray(len(hc.ports) + 1)
        for p in hc.ports:
            used = 10 if p.device is not None else 0
            ctx[p.number] = PORT_BANDWIDTH_FREE + 10 - used if p.usb3 == (speed >= 4) else 0
        hc.mem.write(addr, bytes(ctx))
        return CommandResult(trb, CC.SUCCESS)

    def force_header(self, trb: Trb) -> CommandResult:
        port_no = (trb.control >> 24) & 0xFF
        port = self.hc.port(port_no)
        if port is None or not port.usb3:
            raise CommandError(CC.TRB_ERROR, f"Force Header to port {port_no}, which is not a "
                               f"USB 3 root port")
        return CommandResult(trb, CC.SUCCESS)
