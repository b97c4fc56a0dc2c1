"""One session: a controller, the devices on its root ports, the session's capture and its
clock, on one asyncio loop.  A transport gives a guest the controller: the console's world adds
the in-process bus and the scripted guest (`xhcidbg.ui.world.World`), `xhcidbg serve` and
`xhcidbg vm` add the vfio-user server (`xhcidbg.vm.Backend`).

    session = Session(make_devices(DeviceChoice()))
    await session.start()            # the controller's timers run from this loop
    port = session.plug(Keyboard())  # hotplug, on the loop
    session.unplug(port)
    session.close()
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..devices import UsbDevice
from ..emu.controller import XhciController
from ..emu.hooks import InterruptSignal
from ..emu.timing import Scheduler
from ..faults import FaultEngine, Injection
from ..trace.cli import SessionTrace
from .clock import LoopClock
from .devices import close_devices
from .vmm import Vmm, VmmError

if TYPE_CHECKING:
    from ..guestkit.launch import SerialConsole
    from ..passthrough.mapper import PortMapper

log = logging.getLogger("xhcidbg.session")


class InterruptCount:
    """Hooks observer: interrupts signalled per interrupter, whatever the transport."""

    def __init__(self, interrupters: int):
        self.counts = [0] * interrupters

    def on_interrupt(self, sig: InterruptSignal) -> None:
        if 0 <= sig.interrupter < len(self.counts):
            self.counts[sig.interrupter] += 1


class GuestFreeze:
    """While the controller's gate is paused (a breakpoint, `pause`, a step), the guest's vCPUs
    are stopped through the VMM, so the guest driver's timeouts do not run out; when the gate
    resumes, the guest runs again.  Only a freeze this class made is thawed by it."""

    def __init__(self, session: Session, vmm: Vmm):
        self.session = session
        self.vmm = vmm
        self.enabled = True
        self.ours = False                   # the guest is frozen because we froze it
        self.error = ""                     # why the last freeze or thaw failed
        self._pending: asyncio.Task[None] | None = None
        session.controller.gate.on_change.append(self._gate_changed)

    def _gate_changed(self, paused: bool) -> None:
        if paused and not self.enabled:
            return
        self._pending = asyncio.get_running_loop().create_task(self._apply(paused))

    async def _apply(self, paused: bool) -> None:
        previous = self._pending
        if previous is not None and previous is not asyncio.current_task():
            await asyncio.wait([previous])          # freeze and thaw in the order asked
        try:
            if paused and not self.vmm.frozen:
                self.ours = await self.vmm.freeze()
            elif not paused and self.ours:
                self.ours = False
                await self.vmm.thaw()
            self.error = ""
        except (VmmError, OSError) as e:
            self.error = str(e)
            log.warning("guest freeze: %s", e)

    async def settled(self) -> None:
        """Wait until the last freeze or thaw asked for has reached the VMM."""
        if self._pending is not None:
            await asyncio.wait([self._pending])

    def close(self) -> None:
        gate = self.session.controller.gate
        if self._gate_changed in gate.on_change:
            gate.on_change.remove(self._gate_changed)


class Session:
    """The controller and its devices.  Everything runs on the loop that called `start`;
    `plug` and `unplug` must be called there too, never from another thread."""

    # A real operating system drives the controller (its timers run on their own unless the
    # session can freeze it); the console's scripted guest waits for a paused controller.
    live_guest = False
    kind = "session"

    def __init__(self, devices: Iterable[UsbDevice] = (), *, usb2_ports: int = 4,
                 usb3_ports: int = 4, say: Callable[[str], None] | None = None):
        self.scheduler = Scheduler(virtual=False)
        self.controller = XhciController(usb2_ports=usb2_ports, usb3_ports=usb3_ports,
                                         scheduler=self.scheduler)
        self.trace = SessionTrace(self.controller)      # the session's capture, if any
        # the session's fault rules: with none, it listens to nothing and costs nothing
        self.faults = FaultEngine(self.controller).attach()
        self.faults.listeners.append(self._injected)
        self.devices: dict[int, UsbDevice] = {}          # root port -> device
        self.clock: LoopClock | None = None
        self.say = say
        self.interrupts = self.controller.hooks.attach(
            InterruptCount(len(self.controller.interrupters)))
        self.vmm: Vmm | None = None              # the VMM's monitor, when the session has one
        self.shell: SerialConsole | None = None  # the guest's serial shell, when we booted it
        self.freeze: GuestFreeze | None = None
        # told True/False whenever the guest is frozen or thawed (by anyone), and once with its
        # state when a VMM's monitor becomes known
        self.on_guest: list[Callable[[bool], None]] = []
        self.host_usb: PortMapper | None = None  # host devices passed through, at first use
        self.plug_all(devices)

    async def start(self) -> None:
        """Run the controller's timers from the running loop."""
        self.clock = LoopClock(self.scheduler, asyncio.get_running_loop(), self.changed)

    def changed(self) -> None:
        """Something happened that whoever drives the controller may be waiting for (timers
        ran, a device was plugged or pulled); a session with a guest to wake overrides this."""

    def use_vmm(self, vmm: Vmm) -> None:
        """The VMM's monitor: stops of the controller freeze the guest from now on."""
        self.vmm = vmm
        if self.freeze is not None:
            self.freeze.close()
        self.freeze = GuestFreeze(self, vmm)
        vmm.on_change.append(self._guest_changed)
        self._guest_changed(vmm.frozen)

    def drop_vmm(self) -> None:
        """The VMM's monitor went away: stops no longer freeze anything."""
        if self.freeze is not None:
            self.freeze.close()
            self.freeze = None
        self.vmm = None

    def _injected(self, inj: Injection) -> None:
        """Each injection goes into the capture as a comment and into the log."""
        text = inj.text()
        log.info("%s", text)
        tracer = self.trace.tracer
        if self.trace.running and tracer is not None:
            tracer.fault(inj.rule, inj.match, text)

    def _guest_changed(self, frozen: bool) -> None:
        for fn in list(self.on_guest):
            try:
                fn(frozen)
            except Exception:
                log.exception("a guest state listener failed")

    # ---- quiescence --------------------------------------------------------------------------
    def quiet(self) -> bool:
        """Nothing is about to happen in the controller: no ring has work it may run, no timer
        fires within 20 ms."""
        gate = self.controller.gate
        if gate.work and not gate.paused:
            return False
        nxt = self.scheduler.next_deadline()
        return nxt is None or nxt - self.scheduler.now_ns() >= 20_000_000

    async def settle(self, timeout: float = 5.0) -> bool:
        """Let the session run until it is quiet; False if it is still busy after `timeout`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        quiet_since = None
        while loop.time() < end:
            await asyncio.sleep(0.001)
            if self.quiet():
                # quiet twice in a row, a few ms apart: callbacks in flight have landed
                if quiet_since is not None and loop.time() - quiet_since > 0.003:
                    return True
                quiet_since = quiet_since or loop.time()
            else:
                quiet_since = None
        return False

    # ---- devices -----------------------------------------------------------------------------
    def plug(self, device: UsbDevice, port: int | None = None) -> int:
        """Attach `device` (to the first free root port of its speed unless `port` is given)."""
        number = self.controller.attach(device, port)
        self.devices[number] = device
        if self.say is not None:
            self.say(f"port {number}: {device.name} plugged in ({device.speed.label})")
        self.changed()
        return number

    def plug_all(self, devices: Iterable[UsbDevice]) -> None:
        """Plug each device in; if one does not fit, close them all and raise ValueError."""
        devices = list(devices)
        try:
            for device in devices:
                self.plug(device)
        except ValueError:
            close_devices(devices)
            raise

    def port_mapper(self) -> PortMapper:
        """The session's port mapper (host USB devices through libusb), made at first use on
        the running loop."""
        if self.host_usb is None:
            from ..passthrough.mapper import PortMapper
            self.host_usb = PortMapper(self.controller, asyncio.get_running_loop(),
                                       say=self.say or (lambda text: log.info("%s", text)),
                                       plug=self.plug, unplug=self.unplug)
        return self.host_usb

    def attach_all(self, selections: Iterable[str]) -> None:
        """`--attach SEL`: each host device on a root port.  ValueError (what to do) if one
        cannot be."""
        for text in selections:
            try:
                self.port_mapper().attach(text)
            except (ValueError, PermissionError, RuntimeError) as e:
                raise ValueError(f"--attach {text}: {e}") from None

    def unplug(self, port: int) -> UsbDevice:
        """Detach whatever is on root port `port`; the device object stays usable for `plug`."""
        device = self.controller.detach(port)
        self.devices.pop(port, None)
        if self.say is not None:
            self.say(f"port {port}: {device.name} unplugged")
        self.changed()
        return device

    def find(self, name: str) -> tuple[int, UsbDevice]:
        """(port, device) of the first plugged device called `name` (tablet, keyboard, ...)."""
        try:
            return self.controller.find_device(name)
        except LookupError:
            raise LookupError(f"no {name} is plugged in (see `devices`; `plug {name}` adds "
                              f"one)") from None

    # ---- the end -----------------------------------------------------------------------------
    async def stop(self) -> None:
        """End the session from its loop (a session with a guest ends that first)."""
        self.close()

    def close(self) -> None:
        """Stop the clock, end a capture still running, release the devices' files.  Safe to
        call twice."""
        if self.freeze is not None:
            self.freeze.close()
            self.freeze = None
        self.faults.detach()
        if self.clock is not None:
            self.clock.close()
            self.clock = None
        if self.trace.running:           # a capture started here ends with the session
            try:
                self.trace.stop()
            except Exception as e:       # the file is gone, the disk is full: still close
                log.debug("stopping the trace: %s", e)
        if self.host_usb is not None:     # host devices back to the host and its drivers
            self.host_usb.close()
            self.host_usb = None
        close_devices(self.devices.values())
