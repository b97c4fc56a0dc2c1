"""Root hub ports (xHCI 1.2 sections 4.19 and 5.4.8).

Ports come in pairs: pair i has a USB 2.0 port (numbers 1..n2) and a USB 3.x port (n2+1..n2+n3),
as one physical connector would.  A SuperSpeed device appears on the USB 3 port of its pair, any
slower device on the USB 2 port.

PORTSC state machines, simplified to what a driver can observe:

    USB 2:  Disconnected (RxDetect) -connect-> Disabled (Polling) -PR-> Resetting -> Enabled (U0)
    USB 3:  Disconnected (RxDetect) -connect-> Enabled (U0), link trained without software;
            PR = hot reset, WPR = warm reset, both back to Enabled (U0)
    both:   Enabled -LWS U3-> suspended; -LWS U0 / Resume-> U0 with PLC
"""
from __future__ import annotations

from typing import Protocol

from ..devices.base import PortLink, Speed, UsbDevice
from . import regs as R
from .hooks import Hooks
from .mmio import Binding, ErrorReporter, ignore
from .timing import Scheduler, Timer

USB2_RESET_NS = 10_000_000      # a root port reset lasts at least 10 ms on USB 2
USB3_RESET_NS = 1_000_000

# PORTSC bits, derived from the one declaration in regs.py
_P = R.PORTSC
CCS, PED, PR, PP, LWS, WPR = (_P.mask(n) for n in ("ccs", "ped", "pr", "pp", "lws", "wpr"))
PLS_SHIFT, PLS_MASK = _P.shift("pls"), _P.mask("pls")
SPEED_SHIFT, SPEED_MASK = _P.shift("speed"), _P.mask("speed")
CSC, PEC, WRC, PRC, PLC = (_P.mask(n) for n in ("csc", "pec", "wrc", "prc", "plc"))
OCA, OCC = _P.mask("oca"), _P.mask("occ")
_WARM_ONLY = (R.PLS_INACTIVE, R.PLS_COMPLIANCE)     # link states only a warm reset leaves
CHANGE_BITS = R.PORTSC_CHANGE_BITS


class PortListener(Protocol):
    """The controller as a root port sees it: told when a port raises a change bit, stops
    carrying traffic (disabled, reset, powered off) or loses its device."""

    def port_changed(self, port: RootPort) -> None: ...

    def port_disabled(self, port: RootPort) -> None: ...

    def device_gone(self, port: RootPort, device: UsbDevice) -> None: ...


class RootPort(PortLink):
    """One root hub port: its register set, its PORTSC state machine and the device in it.

    `power_control` is HCCPARAMS1.PPC: whether software may switch port power off."""

    scheduler: Scheduler          # a root port always lends its devices the controller's clock

    def __init__(self, number: int, usb3: bool, *, scheduler: Scheduler, hooks: Hooks,
                 errors: ErrorReporter, listener: PortListener, power_control: bool = True):
        self.number = number            # 1-based port id
        self.usb3 = usb3
        self.scheduler = scheduler      # also the clock of devices that act on time (HID idle)
        self.hooks = hooks
        self.errors = errors
        self.listener = listener
        self.power_control = power_control
        self._pmsc_reg = R.PORTPMSC_USB3 if usb3 else R.PORTPMSC_USB2
        self.device: UsbDevice | None = None
        self.portsc = 0
        self.pmsc = 0
        self.li = 0
        self.hlpmc = 0
        self._reset_timer: Timer | None = None
        self.fail_resets = 0        # the next N port resets end without enabling the port
        self.power_on_reset()

    # ---- registers ------------------------------------------------------------------------------
    def registers(self) -> tuple[Binding, ...]:
        """This port's register set (5.4.8-5.4.11), with the handlers that answer it."""
        return ((R.PORTSC, lambda: self.portsc, self.write_portsc),
                (R.PORTPMSC, lambda: self.pmsc, self.write_pmsc),
                (R.PORTLI, lambda: self.li, ignore),             # read-only
                (R.PORTHLPMC, lambda: self.hlpmc, self.write_hlpmc))

    def write_pmsc(self, value: int) -> None:
        self.pmsc = self._pmsc_reg.merge(self.pmsc, value)

    def write_hlpmc(self, value: int) -> None:
        self.hlpmc = R.PORTHLPMC.merge(self.hlpmc, value)

    @property
    def protocol(self) -> str:
        return "USB3" if self.usb3 else "USB2"

    # ---- state helpers --------------------------------------------------------------------------
    @property
    def pls(self) -> int:
        return (self.portsc & PLS_MASK) >> PLS_SHIFT

    def _set(self, *, ccs: bool | None = None, ped: bool | None = None, pr: bool | None = None,
             pls: int | None = None, speed: int | None = None) -> None:
        v = self.portsc
        if ccs is not None:
            v = (v | CCS) if ccs else (v & ~CCS)
        if ped is not None:
            v = (v | PED) if ped else (v & ~PED)
        if pr is not None:
            v = (v | PR) if pr else (v & ~PR)
        if pls is not None:
            v = (v & ~PLS_MASK) | (pls << PLS_SHIFT)
        if speed is not None:
            v = (v & ~SPEED_MASK) | (speed << SPEED_SHIFT)
        self._update(v)

    def _update(self, new: int, changes: int = 0) -> None:
        """Apply a new PORTSC value; newly set change bits raise a Port Status Change event."""
        old = self.portsc
        newly = changes & ~old & CHANGE_BITS
        new |= changes
        self.portsc = new
        if new != old:
            for fn in self.hooks.on_port:
                fn(self.number, old, new)
        if newly:
            self.listener.port_changed(self)

    def _change(self, bits: int) -> None:
        self._update(self.portsc, bits)

    # ---- reset / power --------------------------------------------------------------------------
    def power_on_reset(self) -> None:
        """Controller reset: powered, no change bits; an attached device shows as a fresh
        connect."""
        if self._reset_timer is not None:
            self._reset_timer.cancel()
            self._reset_timer = None
        self.portsc = PP | (R.PLS_RXDETECT << PLS_SHIFT)
        self.pmsc = self.li = self.hlpmc = 0
        if self.device is not None:
            self._connect(notify=True, quiet=True)

    def _connect(self, notify: bool, quiet: bool = False) -> None:
        dev = self.device
        if dev is None:
            return
        v = self.portsc & ~(PED | PR | PLS_MASK | SPEED_MASK) | CCS | int(dev.speed) << SPEED_SHIFT
        if self.usb3:
            v |= PED | (R.PLS_U0 << PLS_SHIFT)
        else:
            v |= R.PLS_POLLING << PLS_SHIFT
        if not (v & PP):
            return
        if quiet:
            self.portsc = v | CSC
        else:
            self._update(v, CSC if notify else 0)

    # ---- attach / detach ------------------------------------------------------------------------
    def plug(self, device: UsbDevice) -> None:
        self.device = device
        device.attached(self)
        if self.portsc & PP:
            self._connect(notify=True)

    def unplug(self) -> None:
        """PortLink: the device left (also used by the controller's detach)."""
        dev = self.device
        if dev is None:
            return
        self.device = None
        if self._reset_timer is not None:
            self._reset_timer.cancel()
            self._reset_timer = None
        self.listener.device_gone(self, dev)
        dev.detached()
        v = self.portsc & ~(CCS | PED | PR | PLS_MASK | SPEED_MASK)
        v |= R.PLS_RXDETECT << PLS_SHIFT
        changes = CSC | (PEC if (self.portsc & PED) and not self.usb3 else 0)
        self._update(v, changes)

    def remote_wakeup(self) -> None:
        if self.pls == R.PLS_U3 and self.portsc & PED:
            self._update((self.portsc & ~PLS_MASK) | (R.PLS_RESUME << PLS_SHIFT), PLC)

    # ---- PORTSC writes --------------------------------------------------------------------------
    def write_portsc(self, value: int) -> None:
        v = self.portsc
        # RW1C change bits
        v &= ~(value & CHANGE_BITS)
        # RW bits: PIC, wake enables
        v = (v & ~_P.rw) | (value & _P.rw)
        self._update(v)
        # Port power
        if not (value & PP) and (self.portsc & PP) and self.power_control:
            self._power_off()
            return
        if (value & PP) and not (self.portsc & PP):
            self._update(self.portsc | PP | (R.PLS_RXDETECT << PLS_SHIFT))
            if self.device is not None:
                self._connect(notify=True)
        if not (self.portsc & PP):
            return
        # PED: writing 1 disables a USB2 port
        if (value & PED) and (self.portsc & PED) and not self.usb3:
            self._set(ped=False, pls=R.PLS_DISABLED)
            self.listener.port_disabled(self)
        if value & WPR and self.usb3:
            self._begin_reset(warm=True)
        elif value & PR:
            self._begin_reset(warm=False)
        elif value & LWS:
            self._link_state_write((value & PLS_MASK) >> PLS_SHIFT)

    def _power_off(self) -> None:
        if self._reset_timer is not None:
            self._reset_timer.cancel()
            self._reset_timer = None
        self._update(self.portsc & ~(PP | CCS | PED | PR | PLS_MASK | SPEED_MASK)
                     | (R.PLS_DISABLED << PLS_SHIFT))
        self.listener.port_disabled(self)

    # ---- failures a real port has (the fault engine calls these) -------------------------------
    def over_current(self, active: bool = True) -> None:
        """Over-current: OCA follows it, OCC reports each change; an over-current port is
        disabled."""
        v = (self.portsc | OCA) & ~PED if active else self.portsc & ~OCA
        self._update(v, OCC)
        if active:
            self.listener.port_disabled(self)

    def link_error(self, pls: int = R.PLS_INACTIVE) -> None:
        """A USB 3 link that failed into SS.Inactive (or Compliance Mode): disabled until a
        warm reset."""
        if not self.usb3 or not self.portsc & CCS:
            return
        self._update((self.portsc & ~(PED | PLS_MASK)) | (pls << PLS_SHIFT), PLC)
        self.listener.port_disabled(self)

    def _begin_reset(self, warm: bool) -> None:
        if self._reset_timer is not None:
            return
        if not warm and self.usb3 and self.pls in _WARM_ONLY:
            self._change(PRC)        # a hot reset does not leave SS.Inactive / Compliance
            return
        if not (self.portsc & CCS):
            # A reset on an empty port completes at once without enabling it.
            self._change(PRC | (WRC if warm else 0))
            return
        self._set(pr=True, ped=False, pls=R.PLS_HOT_RESET if self.usb3 and not warm else None)
        if warm:
            self.portsc |= WPR
        self.listener.port_disabled(self)
        delay = USB3_RESET_NS if self.usb3 else USB2_RESET_NS
        self._reset_timer = self.scheduler.call_later(delay, self._end_reset, warm)

    def _end_reset(self, warm: bool) -> None:
        self._reset_timer = None
        dev = self.device
        if dev is None:
            self._update(self.portsc & ~(PR | WPR), PRC | (WRC if warm else 0))
            return
        if self.fail_resets > 0:
            self.fail_resets -= 1
            self._update(self.portsc & ~(PR | WPR | PED), PRC | (WRC if warm else 0))
            return
        dev.bus_reset()
        v = (self.portsc & ~(PR | WPR | PLS_MASK | SPEED_MASK)) | PED | CCS
        v |= (R.PLS_U0 << PLS_SHIFT) | (int(dev.speed) << SPEED_SHIFT)
        self._update(v, PRC | (WRC if warm else 0))

    def _link_state_write(self, pls: int) -> None:
        cur = self.pls
        enabled = bool(self.portsc & PED)
        if pls == R.PLS_U3 and enabled and cur in (R.PLS_U0, R.PLS_U1, R.PLS_U2):
            self._set(pls=R.PLS_U3)                # suspend: no PLC when software asked
        elif pls in (R.PLS_U0, R.PLS_RESUME) and enabled and cur in (R.PLS_U3, R.PLS_RESUME):
            if pls == R.PLS_RESUME and not self.usb3:
                self._set(pls=R.PLS_RESUME)        # USB2: software drives resume, then U0
            else:
                self._update((self.portsc & ~PLS_MASK) | (R.PLS_U0 << PLS_SHIFT), PLC)
        elif pls in (R.PLS_U1, R.PLS_U2, R.PLS_U0) and enabled and self.usb3:
            self._set(pls=pls)
        elif pls == R.PLS_DISABLED and self.usb3:
            self._set(ped=False, pls=R.PLS_DISABLED)
            self.listener.port_disabled(self)
        elif pls == R.PLS_RXDETECT and self.usb3 and cur == R.PLS_DISABLED:
            self._set(pls=R.PLS_RXDETECT)
            if self.device is not None:
                self._connect(notify=True)
        elif pls == R.PLS_COMPLIANCE and self.usb3 and cur == R.PLS_RXDETECT:
            self._set(pls=R.PLS_COMPLIANCE)
        else:
            self.errors.refuse(f"lws{self.number}{pls}", f"port {self.number}: link state "
                               f"write {R.PLS_NAMES.get(pls, pls)} from "
                               f"{R.PLS_NAMES.get(cur, cur)} ignored (not a transition software "
                               f"may request)")

    @property
    def enabled(self) -> bool:
        return bool(self.portsc & PED) and self.device is not None

    @property
    def speed(self) -> Speed | None:
        s = (self.portsc & SPEED_MASK) >> SPEED_SHIFT
        return Speed(s) if s in Speed._value2member_map_ else None
