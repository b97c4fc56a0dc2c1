"""Device slots and endpoints: their state machines and their contexts in guest memory
(xHCI 1.2 sections 4.5, 4.8, 6.2).

The controller keeps its own copy of each context and writes it back to the output device
context (the DCBAA entry) whenever the spec says the xHC updates it.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .context import EP_CTX, EP_STATE_NAMES, SLOT_CTX, SLOT_STATE_NAMES, XhciEpType
from ..devices.base import EpType
from .memory import DmaError
from .rings import Ring

if TYPE_CHECKING:
    from .controller import XhciController
    from .ports import RootPort


class Endpoint:
    def __init__(self, slot: "DeviceSlot", dci: int, ctx: list[int]):
        self.slot = slot
        self.dci = dci
        self.ctx = list(ctx[:8])
        hc = slot.hc
        self.ring = Ring(hc.mem, name=f"{slot.id}/{dci}", announce=hc.hooks.on_trb)
        self.ring.set_dequeue(EP_CTX.get(self.ctx, "dequeue") << 4, EP_CTX.get(self.ctx, "dcs"))
        self.inflight: deque = deque()       # TDs handed to the device, oldest first
        self.building = None                 # TD being assembled TRB by TRB (single-step)
        self.key = (slot.id, dci)            # the gate's name for this ring
        self.worker = None                   # the gate's callable, made once by the controller
        self.next_service_ns = 0             # isoch pacing
        self.isoch_timer = None
        # Fixed for the endpoint's lifetime (a new Configure Endpoint makes a new Endpoint):
        # kept as plain attributes because the transfer path reads them for every TD.
        self.ep_type = XhciEpType((self.ctx[1] >> 3) & 7)
        self.is_in = dci == 1 or bool(dci & 1)
        self.address = 0 if dci == 1 else (dci // 2) | (0x80 if dci & 1 else 0)
        self.transfer_type = EpType(self.ep_type.usb_type)
        self.is_isoch = self.ep_type in (XhciEpType.ISOCH_IN, XhciEpType.ISOCH_OUT)
        self.polled = self.ep_type in (XhciEpType.INTERRUPT_IN, XhciEpType.INTERRUPT_OUT,
                                       XhciEpType.CONTROL)

    # ---- fields from the context --------------------------------------------------------------
    @property
    def state(self) -> int:
        return self.ctx[0] & 7

    def set_state(self, state: int) -> None:
        old = self.state
        self.ctx[0] = (self.ctx[0] & ~7) | state
        if old != state:
            # Software reads the endpoint's state from the output context (6.2.3).
            if self.slot.endpoints.get(self.dci) is self:
                self.write_back()
            hooks = self.slot.hc.hooks.on_state
            for fn in hooks:
                fn("endpoint", f"{self.slot.id}/{self.dci}", EP_STATE_NAMES.get(old, "?"),
                   EP_STATE_NAMES.get(state, "?"))

    @property
    def max_packet(self) -> int:
        return self.ctx[1] >> 16

    @property
    def interval_ns(self) -> int:
        return (1 << min(((self.ctx[0] >> 16) & 0xFF), 15)) * 125_000

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
    def __init__(self, hc: "XhciController", slot_id: int):
        self.hc = hc
        self.id = slot_id
        self.ctx = [0] * 8
        self.out_ctx = 0                      # output device context (from the DCBAA)
        self.port: "RootPort | None" = None
        self.endpoints: dict[int, Endpoint] = {}
        self.address = 0

    @property
    def state(self) -> int:
        return self.ctx[3] >> 27

    def set_state(self, state: int) -> None:
        old = self.state
        self.ctx[3] = (self.ctx[3] & 0x07FFFFFF) | (state << 27)
        if old != state:
            for fn in self.hc.hooks.on_state:
                fn("slot", str(self.id), SLOT_STATE_NAMES.get(old, "?"),
                   SLOT_STATE_NAMES.get(state, "?"))

    @property
    def device(self):
        return self.port.device if self.port is not None else None

    def write_context(self, index: int, dwords: list[int]) -> None:
        """Write context `index` (0 slot, 1-31 endpoints) of the output device context."""
        if not self.out_ctx:
            return
        addr = self.out_ctx + index * self.hc.context_size
        try:
            self.hc.mem.write(addr, EP_CTX.pack(dwords[:8]))
        except DmaError as e:
            self.hc.host_system_error(f"slot {self.id}: output context write at {addr:#x} "
                                      f"failed ({e})")

    def write_slot_context(self) -> None:
        self.write_context(0, self.ctx)

    def update_context_entries(self) -> None:
        last = max(self.endpoints, default=1)
        SLOT_CTX["context_entries"].set(self.ctx, max(1, last))

