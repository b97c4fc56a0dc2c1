"""Interrupt delivery to QEMU: the controller's InterruptSink over vfio-user eventfds.

QEMU hands one eventfd per vector with DEVICE_SET_IRQS; writing 1 to it raises the interrupt in
the guest.  Which path is live follows configuration space as QEMU forwards the guest's writes:
MSI-X (vector n = interrupter n) when MSI-X is enabled, else MSI (interrupter n on vector
n mod the enabled vector count), else the INTx line unless the command register disables it.

INTx is level triggered and automasked: after a trigger the line stays masked until QEMU sends
UNMASK at the guest's end of interrupt; if the controller still holds the line up then, it fires
again.  An MSI or MSI-X message that cannot be sent yet (no eventfd assigned, or the MSI-X function
masked) stays pending and goes out when it can, as a real function's pending bits do.
"""
from __future__ import annotations

import contextlib
import logging
import os

from xhcidbg.emu.interrupters import InterruptSink

from .pci import ConfigSpace
from .protocol import IrqInfoFlags, PciIrq

log = logging.getLogger("xhcidbg.vfio_user")

_ONE = (1).to_bytes(8, "little")


class EventfdInterrupts(InterruptSink):
    def __init__(self, config: ConfigSpace):
        self.config = config
        layout = config.layout
        self.counts: dict[int, int] = {
            PciIrq.INTX: 1,
            PciIrq.MSI: layout.msi_vectors,
            PciIrq.MSIX: layout.msix.vectors if layout.msix else 0,
            PciIrq.ERR: 1,
            PciIrq.REQ: 1,
        }
        self.fds: dict[int, list[int | None]] = {i: [None] * n for i, n in self.counts.items()}
        self.intx_level = False
        self.intx_masked = False
        self.msix_pending = 0        # bit n: vector n waits for an eventfd or the function unmask
        self.msi_pending = 0
        config.on_write = self._config_written

    # ---- what QEMU asks about --------------------------------------------------------------
    def info(self, index: int) -> tuple[int, int]:
        """(flags, count) for DEVICE_GET_IRQ_INFO."""
        count = self.counts[index]
        if index == PciIrq.INTX:
            return IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED, count
        if index in (PciIrq.MSI, PciIrq.MSIX):
            return IrqInfoFlags.EVENTFD | IrqInfoFlags.NORESIZE, count
        return IrqInfoFlags.EVENTFD, count

    # ---- InterruptSink ---------------------------------------------------------------------
    @property
    def message_signalled(self) -> bool:
        c = self.config
        return c.msix_enabled or c.msi_enabled

    def signal(self, interrupter: int) -> None:
        c = self.config
        if c.msix_enabled:
            if not 0 <= interrupter < len(self.fds[PciIrq.MSIX]):
                log.warning("interrupter %d has no MSI-X vector; interrupt dropped", interrupter)
                return
            fd = self.fds[PciIrq.MSIX][interrupter]
            if fd is None or c.msix_masked:
                self.msix_pending |= 1 << interrupter
                return
            self._fire(fd)
        elif c.msi_enabled:
            vector = interrupter % c.msi_vectors
            fd = self.fds[PciIrq.MSI][vector]
            if fd is None:
                self.msi_pending |= 1 << vector
                return
            self._fire(fd)
        else:
            log.debug("interrupter %d signalled with MSI and MSI-X disabled", interrupter)

    def set_level(self, asserted: bool) -> None:
        self.intx_level = asserted
        self.config.set_interrupt_status(asserted)
        if asserted:
            self._raise_intx()

    def system_error(self) -> None:
        # No vfio-user path carries SERR# (the ERR eventfd would stop the VM): record it in the
        # status register like a function that signalled SERR#, and say so.
        if self.config.data[0x05] & 1:       # CMD.SERR (bit 8)
            self.config.signal_system_error()
        log.warning("controller signalled a host system error")

    # ---- DEVICE_SET_IRQS --------------------------------------------------------------------
    def assign(self, index: int, start: int, fds: list[int | None]) -> None:
        """Install eventfds (None: unassign) for vectors start..start+len(fds)-1."""
        table = self.fds[index]
        for i, fd in enumerate(fds):
            old = table[start + i]
            if old is not None and old != fd:
                _close(old)
            if fd is not None:
                # A full eventfd (or whatever the client passed instead) must never block the
                # loop: such an interrupt is dropped with a log line.
                with contextlib.suppress(OSError):
                    os.set_blocking(fd, False)
            table[start + i] = fd
        self._flush_pending()
        if index == PciIrq.INTX:
            self.intx_masked = False         # (re)enabling INTx starts unmasked, as in VFIO
            if self.intx_level:
                self._raise_intx()

    def disable(self, index: int) -> None:
        """count 0 with DATA_NONE|TRIGGER: drop every eventfd of the index."""
        self.assign(index, 0, [None] * self.counts[index])
        if index == PciIrq.MSIX:
            self.msix_pending = 0
        elif index == PciIrq.MSI:
            self.msi_pending = 0

    def mask(self, index: int, vectors: list[int]) -> None:
        if index == PciIrq.INTX:
            self.intx_masked = True

    def unmask(self, index: int, vectors: list[int]) -> None:
        if index == PciIrq.INTX:
            self.intx_masked = False
            if self.intx_level:
                self._raise_intx()

    def trigger(self, index: int, vectors: list[int]) -> None:
        """The client asks the device to fire these vectors itself (DATA_NONE/BOOL|TRIGGER)."""
        for v in vectors:
            fd = self.fds[index][v]
            if fd is not None:
                self._fire(fd)

    def reset(self) -> None:
        """DEVICE_RESET: the line low and unmasked, nothing pending; the eventfds stay."""
        self.intx_level = False
        self.intx_masked = False
        self.msix_pending = self.msi_pending = 0

    def close(self) -> None:
        """The client went away: its eventfds are no longer ours to hold."""
        for table in self.fds.values():
            for i, fd in enumerate(table):
                if fd is not None:
                    _close(fd)
                    table[i] = None
        self.intx_masked = False

    @property
    def open_fds(self) -> list[int]:
        return [fd for table in self.fds.values() for fd in table if fd is not None]

    # ---- internals --------------------------------------------------------------------------
    def _raise_intx(self) -> None:
        c = self.config
        if self.intx_masked or c.intx_disabled or c.msix_enabled or c.msi_enabled:
            return
        fd = self.fds[PciIrq.INTX][0]
        if fd is None:
            return
        self.intx_masked = True          # automasked until QEMU's UNMASK at end of interrupt
        self._fire(fd)

    @staticmethod
    def _fire(fd: int) -> None:
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            log.warning("interrupt eventfd %d is full; interrupt dropped", fd)
        except OSError as e:
            log.warning("writing interrupt eventfd %d failed: %s", fd, e)

    def _flush_pending(self) -> None:
        c = self.config
        if self.msix_pending and c.msix_enabled and not c.msix_masked:
            pending, self.msix_pending = self.msix_pending, 0
            for v in range(pending.bit_length()):
                if pending >> v & 1:
                    self.signal(v)
        if self.msi_pending and c.msi_enabled:
            pending, self.msi_pending = self.msi_pending, 0
            for v in range(pending.bit_length()):
                if pending >> v & 1:
                    self.signal(v)

    def _config_written(self, offset: int, size: int) -> None:
        self._flush_pending()
        if self.intx_level:
            self._raise_intx()

    def pba(self, offset: int, size: int) -> bytes:
        """The MSI-X pending bits as the PBA shows them."""
        msix = self.config.layout.msix
        whole = self.msix_pending.to_bytes(msix.pba_size if msix else 8, "little")
        return whole[offset:offset + size].ljust(size, b"\0")


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
