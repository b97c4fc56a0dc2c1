"""The command ring and every command (xHCI 1.2 sections 4.6 and 6.4.3)."""
from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from ..devices.base import EpType, Status, UsbTransfer
from .context import EP_CTX, INPUT_CTRL_CTX, SLOT_CTX, EpState, SlotState, XhciEpType
from .hooks import CommandResult, Hooks, TransferRecord
from .interfaces import ErrorReporter
from .memory import DmaError, GuestMemory
from .ports import RootPort
from .slots import CONTEXT_DWORDS, EP0_DCI, DeviceSlot, SlotEndpoint
from .timing import Scheduler
from .transfers import TransferEngine
from .trb import (
    BSR,
    CC,
    DC,
    DCS,
    DEV_SPEED,
    EP_ID,
    HEADER_PORT,
    HUB_SLOT,
    POINTER,
    SLOT_ID,
    SLOT_TYPE,
    STREAM_ID,
    TR_DEQUEUE,
    Trb,
    TrbType,
)

T = TrbType
PORT_BANDWIDTH_FREE = 90       # percent of a port's bandwidth we report as available
PORT_BANDWIDTH_USED = 10       # ...and what a plugged device takes of it
CONTEXT_ALIGN = 64             # input and output contexts are 64-byte aligned (6.2.1)
POINTER_ALIGN = 16             # TRB pointer fields ignore their low 4 bits
SLOT_TYPE_USB = 0              # the Protocol Slot Type of both our Supported Protocols
SET_ADDRESS = 0x05
USB_SPEED_IDS = range(1, 6)    # full, low, high, super, super-plus
SUPERSPEED_ID = 4
ENDPOINT_DCIS = range(EP0_DCI + 1, 32)    # DCI 2..31: every endpoint but the default one
MAX_INTERVAL_EXPONENT = 15
# Input control context flags: A0/D0 the slot context, A1/D1 endpoint 0 (6.2.5.1)
SLOT_FLAG, EP0_FLAG = 1 << 0, 1 << EP0_DCI
_CTX_STRUCT = struct.Struct(f"<{CONTEXT_DWORDS}I")
_SETUP = struct.Struct("<BBHHH")


class CommandError(Exception):
    """A command fails with completion code `cc`; the message says why, for the log."""

    def __init__(self, cc: int, why: str):
        super().__init__(why)
        self.cc = cc


class Commands:
    """Executes command TRBs.  It is given what commands act on: guest memory, the hooks and
    the clock, the error reporter, the transfer engine (to take TDs back), the slot table and
    the root ports, the DCBAA and MaxSlotsEn readers, and `finish` for commands that
    complete later (Address Device waiting for the device's SET_ADDRESS)."""

    def __init__(self, *, mem: GuestMemory, hooks: Hooks, scheduler: Scheduler,
                 report: ErrorReporter, transfers: TransferEngine,
                 slots: dict[int, DeviceSlot], ports: Sequence[RootPort], context_size: int,
                 max_slots_enabled: Callable[[], int], dcbaa_entry: Callable[[int], int],
                 release_slot: Callable[[DeviceSlot], None],
                 finish: Callable[[CommandResult], None]):
        self.mem = mem
        self.hooks = hooks
        self.scheduler = scheduler
        self.report = report
        self.transfers = transfers
        self.slots = slots
        self.ports = ports
        self.context_size = context_size
        self.max_slots_enabled = max_slots_enabled
        self.dcbaa_entry = dcbaa_entry
        self.release_slot = release_slot
        self.finish = finish
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

    def port(self, number: int) -> RootPort | None:
        return self.ports[number - 1] if 1 <= number <= len(self.ports) else None

    def execute(self, trb: Trb) -> CommandResult | None:
        """Run one command; None means it finishes later (it then calls `finish`)."""
        handler = self.handlers.get(trb.type)
        if handler is None:
            self.report.refuse(f"cmdtype{trb.type}", f"command ring: TRB type {trb.type} "
                           f"({trb!r}) is not a command this controller supports; TRB Error")
            return CommandResult(trb, CC.TRB_ERROR)
        try:
            return handler(trb)
        except CommandError as e:
            # Linux provokes state errors in normal operation (Reset Device on a slot in the
            # Default state, Stop Endpoint racing a halt) and handles them: info, not warning.
            level = "info" if e.cc == CC.CONTEXT_STATE_ERROR else "warning"
            self.report.refuse(f"cmd{trb.type}:{e.cc}", f"{trb!r}: {e}", level)
            return CommandResult(trb, e.cc, slot=SLOT_ID.of(trb.control))
        except DmaError as e:
            self.report.host_system_error(f"{trb!r}: context DMA failed ({e})")
            return None

    # ---- helpers ---------------------------------------------------------------------------------
    def _slot(self, trb: Trb) -> DeviceSlot:
        sid = SLOT_ID.of(trb.control)
        slot = self.slots.get(sid)
        if slot is None:
            raise CommandError(CC.SLOT_NOT_ENABLED, f"slot {sid} is not enabled")
        return slot

    def _endpoint(self, slot: DeviceSlot, trb: Trb) -> SlotEndpoint:
        dci = EP_ID.of(trb.control)
        if dci == 0:
            raise CommandError(CC.TRB_ERROR, "endpoint id 0 is not an endpoint")
        ep = slot.endpoints.get(dci)
        if ep is None:
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"slot {slot.id} endpoint {dci} is "
                               f"disabled")
        return ep

    def _input_context(self, trb: Trb, slot: DeviceSlot) -> tuple[int, int, int]:
        """(address, drop flags, add flags) of the Input Context; the slot remembers it."""
        addr = trb.param & ~(POINTER_ALIGN - 1)
        if addr == 0 or addr % CONTEXT_ALIGN:
            raise CommandError(CC.TRB_ERROR, f"input context pointer {trb.param:#x} is null or "
                               f"not 64-byte aligned")
        ctrl = list(_CTX_STRUCT.unpack(self.mem.read(addr, _CTX_STRUCT.size)))
        slot.input_ctx, slot.input_command = addr, trb.type
        return addr, INPUT_CTRL_CTX.get(ctrl, "drop"), INPUT_CTRL_CTX.get(ctrl, "add")

    def _read_ctx(self, in_addr: int, index: int) -> list[int]:
        """Context `index` of an input context (0 control, 1 slot, 2.. endpoints DCI 1..)."""
        addr = in_addr + index * self.context_size
        return list(_CTX_STRUCT.unpack(self.mem.read(addr, _CTX_STRUCT.size)))

    # ---- commands --------------------------------------------------------------------------------
    def no_op(self, trb: Trb) -> CommandResult:
        return CommandResult(trb, CC.SUCCESS)

    def enable_slot(self, trb: Trb) -> CommandResult:
        slot_type = SLOT_TYPE.of(trb.control)
        if slot_type != SLOT_TYPE_USB:
            raise CommandError(CC.TRB_ERROR, f"slot type {slot_type} is not one of ours (0: USB)")
        for sid in range(1, self.max_slots_enabled() + 1):
            if sid not in self.slots:
                slot = DeviceSlot(sid, self.mem, self.hooks, self.report, self.context_size)
                self.slots[sid] = slot
                for fn in self.hooks.on_state:
                    fn("slot", str(sid), "disabled", "enabled")
                return CommandResult(trb, CC.SUCCESS, slot=sid)
        return CommandResult(trb, CC.NO_SLOTS_AVAILABLE)

    def disable_slot(self, trb: Trb) -> CommandResult:
        slot = self._slot(trb)
        self.release_slot(slot)
        return CommandResult(trb, CC.SUCCESS, slot=slot.id)

    def address_device(self, trb: Trb) -> CommandResult | None:
        slot = self._slot(trb)
        bsr = bool(trb.control & BSR.bits)
        state = slot.state
        if state not in (SlotState.DISABLED, SlotState.DEFAULT) or (
                state == SlotState.DEFAULT and bsr):
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"Address Device (BSR={int(bsr)}) on slot "
                               f"{slot.id} in state {SlotState(state).name.lower()}")
        in_addr, drop, add = self._input_context(trb, slot)
        if (add & (SLOT_FLAG | EP0_FLAG)) != SLOT_FLAG | EP0_FLAG or drop:
            raise CommandError(CC.PARAMETER_ERROR, f"Address Device input control context: add "
                               f"{add:#x} (needs A0 and A1), drop {drop:#x} (needs 0)")
        sctx = self._read_ctx(in_addr, 1)
        ep0 = self._read_ctx(in_addr, 2)
        port_no = SLOT_CTX.get(sctx, "root_hub_port")
        port = self.port(port_no)
        if port is None:
            raise CommandError(CC.PARAMETER_ERROR, f"slot context root hub port {port_no} does "
                               f"not exist (ports 1..{len(self.ports)})")
        if SLOT_CTX.get(sctx, "route_string"):
            raise CommandError(CC.PARAMETER_ERROR, "route string set but no hubs exist here")
        if EP_CTX.get(ep0, "ep_type") != XhciEpType.CONTROL or EP_CTX.get(ep0, "max_packet") == 0:
            raise CommandError(CC.PARAMETER_ERROR, "endpoint 0 context is not a control endpoint "
                               "with a max packet size")
        out = self.dcbaa_entry(slot.id)
        if out == 0 or out % CONTEXT_ALIGN:
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"DCBAA entry for slot {slot.id} is "
                               f"{out:#x} (null or misaligned)")
        if not port.enabled:
            raise CommandError(CC.USB_TRANSACTION_ERROR, f"port {port_no} has no enabled device")
        for other in self.slots.values():
            if other is not slot and other.port is port and other.state != SlotState.DISABLED:
                raise CommandError(CC.CONTEXT_STATE_ERROR,
                                   f"port {port_no} already belongs to slot {other.id}")
        slot.out_ctx = out
        slot.port = port
        # The slot context as software gave it, with the fields the xHC owns filled in.
        slot.ctx = sctx
        SLOT_CTX["context_entries"].set(slot.ctx, EP0_DCI)
        EP_CTX["ep_state"].set(ep0, EpState.DISABLED)
        old = slot.endpoints.pop(EP0_DCI, None)
        if old is not None:
            self.transfers.take_back(old)
        e = SlotEndpoint(slot, EP0_DCI, ep0)
        e.set_state(EpState.RUNNING)
        slot.endpoints[EP0_DCI] = e
        if bsr:
            slot.address = 0
            SLOT_CTX["usb_address"].set(slot.ctx, 0)
            slot.set_state(SlotState.DEFAULT)
            self._write_all(slot)
            return CommandResult(trb, CC.SUCCESS, slot=slot.id)
        address = slot.id        # one device per slot: the slot id is a unique address
        setup = _SETUP.pack(0x00, SET_ADDRESS, address, 0, 0)
        finished: list[CommandResult] = []      # filled by done(); empty while it is pending
        hooks = self.hooks
        record: TransferRecord | None = None

        def done(x: UsbTransfer) -> None:
            nonlocal record
            if hooks.on_urb_complete or hooks.on_urb_retired:
                record = record or self._set_address_record(x, slot, port)
                record.completed_ns = self.scheduler.now_ns()
                for fn in hooks.on_urb_complete:
                    fn(record)
            if x.status != Status.OK:
                status = x.status.name if x.status is not None else "?"
                r = CommandResult(trb, CC.USB_TRANSACTION_ERROR, slot=slot.id,
                                  note=f"SET_ADDRESS {address} failed: {status}")
            else:
                slot.address = address
                SLOT_CTX["usb_address"].set(slot.ctx, address)
                slot.set_state(SlotState.ADDRESSED)
                r = CommandResult(trb, CC.SUCCESS, slot=slot.id)
            if record is not None:
                record.cc = CC.SUCCESS if x.status == Status.OK else CC.USB_TRANSACTION_ERROR
                for fn in hooks.on_urb_retired:
                    fn(record)
            self._write_all(slot)
            if waiting:
                self.finish(r)
            else:
                finished.append(r)

        waiting = False
        x = UsbTransfer(0, EpType.CONTROL, 0, setup=setup, on_complete=done)
        if hooks.on_urb_submit:
            record = self._set_address_record(x, slot, port)
            record.submitted_ns = self.scheduler.now_ns()
            for fn in hooks.on_urb_submit:
                fn(record)
        device = port.device
        try:
            if device is None:
                raise RuntimeError("the port has no device")
            device.submit(x)
        except Exception as exc:
            self.report.refuse(f"devexc{slot.id}", f"device raised {exc!r} on SET_ADDRESS")
            x.complete(Status.XACT_ERROR)
        if finished:
            return finished[0]
        waiting = True
        return None

    @staticmethod
    def _set_address_record(x: UsbTransfer, slot: DeviceSlot, port: RootPort) -> TransferRecord:
        return TransferRecord(x, slot.id, EP0_DCI, port.number, 2 if port.usb3 else 1, 0,
                              internal=True)

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
        if trb.control & DC.bits:          # Deconfigure
            for dci in [d for d in slot.endpoints if d != EP0_DCI]:
                self._drop(slot, dci)
            slot.set_state(SlotState.ADDRESSED)
            self._write_all(slot)
            return CommandResult(trb, CC.SUCCESS, slot=slot.id)
        in_addr, drop, add = self._input_context(trb, slot)
        if drop & (SLOT_FLAG | EP0_FLAG) or add & EP0_FLAG:
            raise CommandError(CC.TRB_ERROR, f"input control context drop {drop:#x} / add "
                               f"{add:#x}: D0, D1 and A1 must be 0")
        new: dict[int, list[int]] = {}
        for dci in ENDPOINT_DCIS:
            if add & (1 << dci):
                ctx = self._read_ctx(in_addr, dci + 1)
                why = self._check_ep_ctx(dci, ctx)
                if why:
                    raise CommandError(CC.PARAMETER_ERROR, f"slot {slot.id} endpoint {dci}: {why}")
                new[dci] = ctx
        for dci in ENDPOINT_DCIS:
            if drop & (1 << dci) and dci in slot.endpoints:
                self._drop(slot, dci)
        for dci, ctx in new.items():
            if dci in slot.endpoints:
                self._drop(slot, dci)
            EP_CTX["ep_state"].set(ctx, EpState.DISABLED)
            ep = SlotEndpoint(slot, dci, ctx)
            slot.endpoints[dci] = ep
            ep.set_state(EpState.RUNNING)
        if add & SLOT_FLAG:
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
        if EP_CTX.get(ctx, "interval") > MAX_INTERVAL_EXPONENT:
            return f"interval {EP_CTX.get(ctx, 'interval')} out of range (0..15)"
        if EP_CTX.get(ctx, "dequeue") == 0:
            return "TR dequeue pointer is null"
        return None

    def _drop(self, slot: DeviceSlot, dci: int) -> None:
        ep = slot.endpoints.pop(dci)
        self.transfers.take_back(ep)
        ep.set_state(EpState.DISABLED)
        slot.write_context(dci, ep.ctx)

    def evaluate_context(self, trb: Trb) -> CommandResult:
        slot = self._slot(trb)
        if slot.state == SlotState.DISABLED:
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"Evaluate Context on slot {slot.id} "
                               f"before Address Device")
        in_addr, _drop, add = self._input_context(trb, slot)
        if add & SLOT_FLAG:
            sctx = self._read_ctx(in_addr, 1)
            for name in ("max_exit_latency", "interrupter"):
                SLOT_CTX[name].set(slot.ctx, SLOT_CTX.get(sctx, name))
            slot.write_slot_context()
        if add & EP0_FLAG:
            ctx = self._read_ctx(in_addr, 2)
            mps = EP_CTX.get(ctx, "max_packet")
            if mps == 0:
                raise CommandError(CC.PARAMETER_ERROR, "endpoint 0 max packet size 0")
            ep0 = slot.endpoints[EP0_DCI]
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
        slot = self._slot(trb)
        ep = self._endpoint(slot, trb)
        if ep.state != EpState.RUNNING:
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"Stop Endpoint on {slot.id}/{ep.dci} "
                               f"which is {EpState(ep.state).name.lower()}")
        first = self.transfers.take_back(ep)
        ep.set_state(EpState.STOPPED)
        if first is not None:
            self.transfers.stopped(ep, first)
        ep.write_back()
        return CommandResult(trb, CC.SUCCESS, slot=slot.id)

    def set_tr_dequeue(self, trb: Trb) -> CommandResult:
        slot = self._slot(trb)
        ep = self._endpoint(slot, trb)
        if ep.state not in (EpState.STOPPED, EpState.ERROR):
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"Set TR Dequeue Pointer on "
                               f"{slot.id}/{ep.dci} which is {EpState(ep.state).name.lower()}")
        stream = STREAM_ID.of(trb.status)
        if stream:
            raise CommandError(CC.INVALID_STREAM_ID, f"stream {stream} on an endpoint without "
                               f"streams")
        ptr = TR_DEQUEUE.put(TR_DEQUEUE.of(trb.param))
        if ptr == 0:
            raise CommandError(CC.PARAMETER_ERROR, "new TR dequeue pointer is null")
        self.transfers.take_back(ep, ptr, DCS.of(trb.param))
        if ep.state == EpState.ERROR:
            ep.set_state(EpState.STOPPED)
        ep.write_back()
        return CommandResult(trb, CC.SUCCESS, slot=slot.id)

    def reset_device(self, trb: Trb) -> CommandResult:
        slot = self._slot(trb)
        if slot.state not in (SlotState.ADDRESSED, SlotState.CONFIGURED):
            raise CommandError(CC.CONTEXT_STATE_ERROR, f"Reset Device on slot {slot.id} in state "
                               f"{SlotState(slot.state).name.lower()}")
        for dci in [d for d in slot.endpoints if d != EP0_DCI]:
            self._drop(slot, dci)
        ep0 = slot.endpoints.get(EP0_DCI)
        if ep0 is not None:
            self.transfers.take_back(ep0)
        slot.address = 0
        SLOT_CTX["usb_address"].set(slot.ctx, 0)
        slot.set_state(SlotState.DEFAULT)
        self._write_all(slot)
        return CommandResult(trb, CC.SUCCESS, slot=slot.id)

    def negotiate_bandwidth(self, trb: Trb) -> CommandResult:
        slot = self._slot(trb)
        return CommandResult(trb, CC.SUCCESS, slot=slot.id)

    def get_port_bandwidth(self, trb: Trb) -> CommandResult:
        speed = DEV_SPEED.of(trb.control)
        hub = HUB_SLOT.of(trb.control)
        if hub:
            raise CommandError(CC.PARAMETER_ERROR, f"hub slot {hub}: no hubs are emulated")
        if speed not in USB_SPEED_IDS:
            raise CommandError(CC.PARAMETER_ERROR, f"device speed {speed} is not a speed id")
        addr = POINTER.of(trb.param) & ~(POINTER_ALIGN - 1)
        if addr == 0:
            raise CommandError(CC.PARAMETER_ERROR, "port bandwidth context pointer is null")
        ctx = bytearray(len(self.ports) + 1)     # one byte per port; byte 0 is reserved
        for p in self.ports:
            used = PORT_BANDWIDTH_USED if p.device is not None else 0
            ctx[p.number] = (PORT_BANDWIDTH_FREE + PORT_BANDWIDTH_USED - used
                             if p.usb3 == (speed >= SUPERSPEED_ID) else 0)
        self.mem.write(addr, bytes(ctx))
        return CommandResult(trb, CC.SUCCESS)

    def force_header(self, trb: Trb) -> CommandResult:
        port_no = HEADER_PORT.of(trb.control)
        port = self.port(port_no)
        if port is None or not port.usb3:
            raise CommandError(CC.TRB_ERROR, f"Force Header to port {port_no}, which is not a "
                               f"USB 3 root port")
        return CommandResult(trb, CC.SUCCESS)
