"""Device slots and endpoints: their state machines and their contexts in guest memory
(xHCI 1.2 sections 4.5, 4.8, 6.2).

The controller keeps its own copy of each context and writes it back to the output device
context (the DCBAA entry) whenever the spec says the xHC updates it.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from ..devices.base import EpType, UsbDevice, UsbTransfer
from .context import EP_CTX, EP_STATE_NAMES, SLOT_CTX, SLOT_STATE_NAMES, XhciEpType
from .gate import Worker
from .hooks import Hooks
from .interfaces import ErrorReporter
from .memory import DmaError, GuestMemory
from .rings import Ring
from .timing import Timer

if TYPE_CHECKING:
    from .ports import RootPort
    from .transfers import Td

CONTEXT_DWORDS = 8               # the dwords that carry fields, in 32- and 64-byte contexts
EP0_DCI = 1
MAX_INTERVAL_EXPONENT = 15
MICROFRAME_NS = 125_000
_STATE = EP_CTX["ep_state"]
_STATE_DW, _STATE_AT, _STATE_MASK = _STATE.dword, _STATE.lo, _STATE.mask   # read per TD
_SLOT_STATE = SLOT_CTX["slot_state"]


def endpoint_address(dci: int) -> int:
    """USB endpoint address of Device Context Index `dci` (4.5.1): DCI = 2 * number + IN."""
    if dci == EP0_DCI:
        return 0
    return (dci // 2) | (0x80 if dci & 1 else 0)


class SlotEndpoint:
    """One enabled endpoint of a device slot: its context, its transfer ring and the TDs it
    has in flight."""

    def __init__(self, slot: DeviceSlot, dci: int, ctx: list[int]):
        self.slot = slot
        self.dci = dci
        self.ctx = list(ctx[:CONTEXT_DWORDS])
        self.ring = Ring(slot.mem, name=f"{slot.id}/{dci}", announce=slot.hooks.on_trb)
        self.ring.set_dequeue(EP_CTX.get(self.ctx, "dequeue") << 4, EP_CTX.get(self.ctx, "dcs"))
        self.inflight: deque[Td] = deque()   # TDs handed to the device, oldest first
        self.building: Td | None = None      # TD being assembled TRB by TRB (single-step)
        self.key = (slot.id, dci)            # the gate's name for this ring
        self.worker: Worker | None = None    # the gate's callable, made once by the controller
        self.next_service_ns = 0             # isoch pacing
        self.isoch_timer: Timer | None = None
        # (TD start, the device's transfer) of a TD the device finished but an observer failed
        # (TransferRecord.force_cc): run again from the same TRB (a soft retry: Reset
        # Endpoint with TSP), it completes with that answer instead of asking the device twice
        self.replay: tuple[int, UsbTransfer] | None = None
        # Fixed for the endpoint's lifetime (a new Configure Endpoint makes a new endpoint):
        # kept as plain attributes because the transfer path reads them for every TD.
        self.ep_type = XhciEpType(EP_CTX.get(self.ctx, "ep_type"))
        self.is_in = dci == EP0_DCI or bool(dci & 1)
        self.address = endpoint_address(dci)
        self.interval = EP_CTX.get(self.ctx, "interval")
        self.transfer_type = EpType(self.ep_type.usb_type)
        self.is_isoch = self.ep_type in (XhciEpType.ISOCH_IN, XhciEpType.ISOCH_OUT)
        self.polled = self.ep_type in (XhciEpType.INTERRUPT_IN, XhciEpType.INTERRUPT_OUT,
                                       XhciEpType.CONTROL)

    # ---- fields from the context --------------------------------------------------------------
    @property
    def state(self) -> int:
        return (self.ctx[_STATE_DW] >> _STATE_AT) & _STATE_MASK

    def set_state(self, state: int) -> None:
        old = self.state
        _STATE.set(self.ctx, state)
        if old != state:
            # Software reads the endpoint's state from the output context (6.2.3).
            if self.slot.endpoints.get(self.dci) is self:
                self.write_back()
            for fn in self.slot.hooks.on_state:
                fn("endpoint", f"{self.slot.id}/{self.dci}", EP_STATE_NAMES.get(old, "?"),
                   EP_STATE_NAMES.get(state, "?"))

    @property
    def max_packet(self) -> int:
        return EP_CTX.get(self.ctx, "max_packet")

    @property
    def interval_ns(self) -> int:
        return (1 << min(self.interval, MAX_INTERVAL_EXPONENT)) * MICROFRAME_NS

    def sync_dequeue(self) -> None:
        """Copy the ring's dequeue pointer and cycle state into the context."""
        EP_CTX["dequeue"].set(self.ctx, self.ring.dequeue >> 4)
        EP_CTX["dcs"].set(self.ctx, self.ring.ccs)

    def write_back(self) -> None:
        self.sync_dequeue()
        self.slot.write_context(self.dci, self.ctx)

    def cancel_timers(self) -> None:
        if self.isoch_timer is not None:
            self.isoch_timer.cancel()
            self.isoch_timer = None


class DeviceSlot:
    """A device slot: its slot context, the port it is bound to and its endpoints.  The
    controller keeps the contexts and writes them to the output device context in guest
    memory whenever the spec says the xHC updates it."""

    def __init__(self, slot_id: int, mem: GuestMemory, hooks: Hooks, report: ErrorReporter,
                 context_size: int):
        self.id = slot_id
        self.mem = mem
        self.hooks = hooks
        self.report = report
        self.context_size = context_size
        self.ctx = [0] * CONTEXT_DWORDS
        self.out_ctx = 0                      # output device context (from the DCBAA)
        # The input context of the last command that read one (Address Device, Configure
        # Endpoint, Evaluate Context) and that command's TRB type: kept for debuggers only.
        self.input_ctx = 0
        self.input_command = 0
        self.port: RootPort | None = None
        self.endpoints: dict[int, SlotEndpoint] = {}
        self.address = 0

    @property
    def state(self) -> int:
        return _SLOT_STATE.of(self.ctx[_SLOT_STATE.dword])

    def set_state(self, state: int) -> None:
        old = self.state
        _SLOT_STATE.set(self.ctx, state)
        if old != state:
            for fn in self.hooks.on_state:
                fn("slot", str(self.id), SLOT_STATE_NAMES.get(old, "?"),
                   SLOT_STATE_NAMES.get(state, "?"))

    @property
    def device(self) -> UsbDevice | None:
        return self.port.device if self.port is not None else None

    def write_context(self, index: int, dwords: list[int]) -> None:
        """Write context `index` (0 slot, 1-31 endpoints) of the output device context."""
        if not self.out_ctx:
            return
        addr = self.out_ctx + index * self.context_size
        try:
            self.mem.write(addr, EP_CTX.pack(dwords[:CONTEXT_DWORDS]))
        except DmaError as e:
            self.report.host_system_error(f"slot {self.id}: output context write at {addr:#x} "
                                          f"failed ({e})")

    def write_slot_context(self) -> None:
        self.write_context(0, self.ctx)

    def update_context_entries(self) -> None:
        last = max(self.endpoints, default=EP0_DCI)
        SLOT_CTX["context_entries"].set(self.ctx, max(EP0_DCI, last))

