"""A vfio-user server presenting the xHCI controller as a PCI function to QEMU.

One asyncio loop runs everything: the listening socket, the client's connection (framing.py),
the controller's timers (the session's clock, xhcidbg.session.clock, started by whoever owns
the controller) and every controller call made by the command handlers (dispatch.py).  No
thread touches controller state.  The server owns the parts and their lifecycle: listening,
one client at a time, and what a disconnect releases.

    server = VfioUserServer(controller, "/tmp/xhci.sock", on_disconnect=stop)
    await server.start()
    print(server.device_arg)        # for QEMU: -device '<this>'
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable

from xhcidbg.emu.controller import XhciController

from .dispatch import Dispatcher
from .dma import DmaMaps
from .framing import Connection
from .irq import EventfdInterrupts
from .measurements import Measurements
from .pci import ConfigSpace, PciIdentity, xhci_function
from .protocol import MAX_DMA_MAPS
from .regions import FunctionRegions

log = logging.getLogger("xhcidbg.vfio_user")

# Busy-polling after a message (see VfioUserServer._readable): measured on a 2-core machine with
# bench/linux_figures.py, a Linux guest's dd from the storage stick (warm host page cache) went
# from ~430 to 580-700 MB/s (QEMU's own usb-storage: ~1220 MB/s) and a register read round trip
# from ~95 to ~42 us, at the price of one core spinning while the guest is busy with the device.
BUSY_POLL_US = 1000
BUSY_POLL_TURN_NS = 5_000_000      # return to the event loop at least this often

_DEFAULT_IDENTITY = PciIdentity()


def qemu_device_arg(socket_path: str) -> str:
    """The value of QEMU's -device option that connects a vfio-user-pci function to us."""
    return json.dumps({"driver": "vfio-user-pci",
                       "socket": {"path": os.path.abspath(socket_path), "type": "unix"}},
                      separators=(",", ":"))


class VfioUserServer:
    def __init__(self, controller: XhciController, socket_path: str, *,
                 on_disconnect: Callable[[], None] | None = None,
                 identity: PciIdentity = _DEFAULT_IDENTITY,
                 msix: bool = True, msi: bool = True,
                 busy_poll_us: int = BUSY_POLL_US):
        self.controller = controller
        # After a message, keep reading the socket for this long before sleeping in the event
        # loop: the VMM's next access then finds us awake instead of paying a wakeup.
        self.busy_poll_ns = busy_poll_us * 1000
        self.socket_path = os.path.abspath(str(socket_path))
        self.on_disconnect = on_disconnect
        self.layout = xhci_function(controller.bar_size, len(controller.interrupters), identity,
                                    msix=msix, msi=msi)
        self.config = ConfigSpace(self.layout)
        self.irq = EventfdInterrupts(self.config)
        controller.irq = self.irq
        self.dma = DmaMaps(controller.mem, MAX_DMA_MAPS)
        self.regions = FunctionRegions(controller, self.layout, self.config, self.irq)
        self.stats = Measurements()
        self.dispatcher = Dispatcher(controller, self.config, self.regions, self.irq, self.dma,
                                     self.stats)
        self.last_disconnect_reason = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._conn: Connection | None = None
        self._disconnected: asyncio.Event | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def device_arg(self) -> str:
        return qemu_device_arg(self.socket_path)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._disconnected = asyncio.Event()
        try:
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)       # a stale socket from an earlier run
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket_path)
        except OSError as e:
            listener.close()
            raise OSError(e.errno, f"cannot listen on {self.socket_path}: {e.strerror}") from None
        listener.listen(1)
        listener.setblocking(False)
        self._listener = listener
        loop.add_reader(listener.fileno(), self._accept)
        log.info("vfio-user server listening on %s", self.socket_path)

    async def wait_disconnected(self) -> str:
        """Wait until the current (or next) client goes away; returns why."""
        assert self._disconnected is not None, "start() first"
        await self._disconnected.wait()
        self._disconnected.clear()
        return self.last_disconnect_reason

    def close(self) -> None:
        if self._conn is not None:
            self._disconnect("server closed")
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)

    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None   # registered by start()
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("accept failed: %s", e)
            return
        if self._conn is not None:
            log.warning("a second client connected while one is being served; refused")
            sock.close()
            return
        conn = self._conn = Connection(sock, self._loop, self.dispatcher.deliver,
                                       self._disconnect)
        self.dispatcher.start_session(conn.send)
        self._loop.add_reader(conn.fileno(), self._readable)
        log.info("vfio-user client connected")

    def _disconnect(self, reason: str) -> None:
        conn = self._conn
        if conn is None or self._loop is None:
            return
        self._conn = None
        self._loop.remove_reader(conn.fileno())
        conn.close()
        self.dispatcher.end_session()
        # The client's memory and eventfds are gone with it; device state stays (spec:
        # "Client Disconnection").
        self.dma.close()
        self.irq.close()
        self.last_disconnect_reason = reason
        log.info("vfio-user client disconnected: %s", reason)
        if self._disconnected is not None:
            self._disconnected.set()
        if self.on_disconnect is not None:
            try:
                self.on_disconnect()
            except Exception:
                log.exception("on_disconnect callback failed")

    def _readable(self) -> None:
        conn = self._conn
        if conn is None or not conn.receive() or not self.busy_poll_ns:
            return
        # Busy-poll: a guest driver's register reads come in bursts (an interrupt handler reads
        # four), and waking a sleeping process costs more than the read itself.  Bounded so the
        # loop's other work (timers, the VM's console, hotplug) still runs every few ms.
        now = time.perf_counter_ns()
        deadline, give_back = now + self.busy_poll_ns, now + BUSY_POLL_TURN_NS
        while conn.open and now < deadline and now < give_back:
            if conn.receive():
                deadline = time.perf_counter_ns() + self.busy_poll_ns
                # timers that fell due meanwhile (the loop's own clock fires them only
                # once we give the loop back)
                self.controller.scheduler.run_due()
            else:
                os.sched_yield()     # a VMM thread sharing this core runs first
            now = time.perf_counter_ns()
