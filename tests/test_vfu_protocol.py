"""vfio-user server protocol tests: a real client over a real UNIX socket with SCM_RIGHTS.

The controller behind the server here has its registers replaced by a plain 64 KiB register file
(the server does not care what BAR0 holds), so BAR tests see exactly what they wrote; the xHCI
controller itself is served to a real QEMU in test_vfu_qemu.py.
"""
from __future__ import annotations

import asyncio
import errno
import mmap
import os
import socket
import threading
import time

import pytest

from xhcidbg.emu.controller import XhciController
from xhcidbg.emu.memory import DmaError
from xhcidbg.emu.timing import Scheduler
from xhcidbg.vfio_user import VfioUserServer, framing
from xhcidbg.vfio_user.client import Client, VfuError
from xhcidbg.vfio_user.protocol import (
    DEVICE_INFO,
    DMA_MAP,
    DMA_UNMAP,
    HEADER,
    IRQ_INFO,
    IRQ_SET,
    REGION_ACCESS,
    REGION_INFO,
    VERSION,
    WRITE_MULTI,
    WRITE_ONE,
    Command,
    DeviceInfo,
    DmaUnmap,
    HeaderFlags,
    IrqSetFlags,
    PciIrq,
    PciRegion,
    RegionFlags,
    RegionInfo,
)

INTERRUPTERS = 8


class RegisterFile(XhciController):
    """A controller whose BAR0 is plain read/write bytes, logging every access."""

    def __init__(self):
        super().__init__(interrupters=INTERRUPTERS, scheduler=Scheduler())
        self.regs = bytearray(self.bar_size)
        self.resets = 0
        self.accesses: list[tuple] = []

    def mmio_read(self, offset, size):
        self.accesses.append(("r", offset, size))
        return int.from_bytes(self.regs[offset:offset + size], "little")

    def mmio_write(self, offset, size, value):
        self.accesses.append(("w", offset, size, value))
        self.regs[offset:offset + size] = value.to_bytes(size, "little")

    def hardware_reset(self):
        self.regs[:] = bytes(self.bar_size)
        self.resets += 1


class Served:
    """The server on its own asyncio loop in a background thread; the test is the client."""

    def __init__(self, path):
        self.device = RegisterFile()
        self.disconnects = 0
        self.loop = asyncio.new_event_loop()
        self.server = VfioUserServer(self.device, str(path), on_disconnect=self._gone)
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(5)

    def _gone(self):
        self.disconnects += 1

    def call(self, fn, *args):
        """Run fn on the server's loop (the only thread that may touch device state)."""
        fut = asyncio.run_coroutine_threadsafe(_call(fn, *args), self.loop)
        return fut.result(5)

    def stop(self):
        self.call(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def _call(fn, *args):
    return fn(*args)


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return False


def open_fds():
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path / "xhci.sock")
    yield s
    s.stop()


@pytest.fixture
def client(served):
    c = Client(served.server.socket_path)
    c.version()
    yield c
    c.close()


def region_read(c, region, offset, count):
    body = c.call(Command.REGION_READ, REGION_ACCESS.pack_values(offset, region, count))
    assert REGION_ACCESS.unpack_from(body) == (offset, region, count)
    return body[REGION_ACCESS.size:]


def region_write(c, region, offset, data):
    body = c.call(Command.REGION_WRITE,
                  REGION_ACCESS.pack_values(offset, region, len(data)) + data)
    assert body == REGION_ACCESS.pack_values(offset, region, len(data))


def cfg_read(c, offset, size):
    return int.from_bytes(region_read(c, PciRegion.CONFIG, offset, size), "little")


def cfg_write(c, offset, size, value):
    region_write(c, PciRegion.CONFIG, offset, value.to_bytes(size, "little"))


# ---- handshake and discovery ------------------------------------------------------------------
def test_version_reply_lists_our_limits(served):
    c = Client(served.server.socket_path)
    reply = c.version()
    caps = reply["capabilities"]
    assert caps["max_msg_fds"] == 16 and caps["pgsizes"] == 4096
    assert caps["max_data_xfer_size"] == 1 << 20 and caps["max_dma_maps"] == 65535
    assert caps["write_multiple"] is True
    c.close()


def test_write_multiple_is_not_offered_when_the_client_does_not_offer_it(served):
    c = Client(served.server.socket_path)
    caps = c.version({"capabilities": {"max_msg_fds": 8}})["capabilities"]
    assert caps["write_multiple"] is False
    c.close()


def test_commands_before_version_are_refused(served):
    c = Client(served.server.socket_path)
    with pytest.raises(VfuError) as e:
        c.call(Command.DEVICE_GET_INFO, DEVICE_INFO.pack_values(16, 0, 0, 0))
    assert e.value.errno == errno.EINVAL
    c.version()
    c.close()


def test_device_info(client):
    body = client.call(Command.DEVICE_GET_INFO, DEVICE_INFO.pack_values(16, 0, 0, 0))
    assert DEVICE_INFO.unpack(body) == DeviceInfo(16, 3, 9, 5)


def test_region_info(client):
    def info(i):
        return REGION_INFO.unpack(client.call(
            Command.DEVICE_GET_REGION_INFO, REGION_INFO.pack_values(32, 0, i, 0, 0, 0)))

    rw = RegionFlags.READ | RegionFlags.WRITE
    assert info(0) == RegionInfo(32, rw, 0, 0, 0x10000, 0)
    assert info(2) == RegionInfo(32, rw, 2, 0, 0x2000, 0)
    assert info(7) == RegionInfo(32, rw, 7, 0, 256, 0)
    for unused in (1, 3, 4, 5, 6, 8):
        assert info(unused).size == 0 and info(unused).flags == 0
    with pytest.raises(VfuError):
        info(9)


def test_irq_info(client):
    def info(i):
        return IRQ_INFO.unpack(client.call(Command.DEVICE_GET_IRQ_INFO,
                                           IRQ_INFO.pack_values(16, 0, i, 0)))

    assert info(PciIrq.INTX).count == 1 and info(PciIrq.INTX).flags == 0b0111
    assert info(PciIrq.MSI).count == 8 and info(PciIrq.MSI).flags == 0b1001
    assert info(PciIrq.MSIX).count == INTERRUPTERS and info(PciIrq.MSIX).flags == 0b1001
    assert info(PciIrq.ERR).count == 1 and info(PciIrq.REQ).count == 1
    with pytest.raises(VfuError):
        info(5)


def test_unknown_command_gets_enosys(client):
    with pytest.raises(VfuError) as e:
        client.call(Command.DEVICE_FEATURE, bytes(8))
    assert e.value.errno == errno.ENOSYS
    with pytest.raises(VfuError) as e:
        client.call(99)
    assert e.value.errno == errno.ENOSYS


# ---- configuration space ----------------------------------------------------------------------
def test_config_identity_and_xhci_registers(client):
    assert cfg_read(client, 0x00, 2) == 0x1EF3
    assert cfg_read(client, 0x02, 2) == 0x0330
    assert cfg_read(client, 0x08, 4) >> 8 == 0x0C0330
    assert cfg_read(client, 0x3D, 1) == 1                  # INTA#
    assert cfg_read(client, 0x60, 1) == 0x30               # SBRN
    assert cfg_read(client, 0x61, 1) == 0x20               # FLADJ
    cfg_write(client, 0x61, 1, 0xFF)
    assert cfg_read(client, 0x61, 1) == 0x3F               # only bits 5:0 are writable
    cfg_write(client, 0x09, 3, 0)
    assert cfg_read(client, 0x08, 4) >> 8 == 0x0C0330      # class is read-only


def test_config_bar_sizing_and_rom(client):
    cfg_write(client, 0x10, 4, 0xFFFFFFFF)
    assert cfg_read(client, 0x10, 4) == 0xFFFF0004          # 64 KiB, 64-bit memory
    cfg_write(client, 0x14, 4, 0xFFFFFFFF)
    assert cfg_read(client, 0x14, 4) == 0xFFFFFFFF
    cfg_write(client, 0x18, 4, 0xFFFFFFFF)
    assert cfg_read(client, 0x18, 4) == 0xFFFFE000          # BAR2: 8 KiB MSI-X
    for unused in (0x1C, 0x20, 0x24):
        cfg_write(client, unused, 4, 0xFFFFFFFF)
        assert cfg_read(client, unused, 4) == 0
    cfg_write(client, 0x30, 4, 0xFFFFFFFF)
    assert cfg_read(client, 0x30, 4) == 0                   # no expansion ROM
    cfg_write(client, 0x10, 4, 0xFEBF0000)
    assert cfg_read(client, 0x10, 4) == 0xFEBF0004


def test_config_command_and_status(client):
    cfg_write(client, 0x04, 2, 0xFFFF)
    assert cfg_read(client, 0x04, 2) == 0x0546             # memory, master, parity, SERR, INTx dis
    status = cfg_read(client, 0x06, 2)
    assert status & 0x10                                   # capability list
    cfg_write(client, 0x06, 2, 0xFFFF)                     # RW1C error bits: nothing set, stays
    assert cfg_read(client, 0x06, 2) == status


def test_config_capability_list(client):
    caps = {}
    ptr = cfg_read(client, 0x34, 1)
    while ptr:
        cap_id, nxt = cfg_read(client, ptr, 1), cfg_read(client, ptr + 1, 1)
        caps[cap_id] = ptr
        ptr = nxt
    assert set(caps) == {0x01, 0x05, 0x11}                 # PM, MSI, MSI-X
    msix = caps[0x11]
    assert cfg_read(client, msix + 2, 2) & 0x7FF == INTERRUPTERS - 1
    assert cfg_read(client, msix + 4, 4) == 0x0000 | 2     # table at BAR2 + 0
    assert cfg_read(client, msix + 8, 4) == 0x1000 | 2     # PBA at BAR2 + 0x1000
    msi = caps[0x05]
    assert cfg_read(client, msi + 2, 2) & 0x80             # 64-bit
    pm = caps[0x01]
    cfg_write(client, pm + 4, 2, 3)                        # D3hot
    assert cfg_read(client, pm + 4, 2) & 3 == 3
    cfg_write(client, pm + 4, 2, 1)                        # D1 unsupported: ignored
    assert cfg_read(client, pm + 4, 2) & 3 == 3


# ---- BAR access ----------------------------------------------------------------------------------
def test_bar0_reaches_the_device(served, client):
    region_write(client, 0, 0x20, (0x12345678).to_bytes(4, "little"))
    assert region_read(client, 0, 0x20, 4) == (0x12345678).to_bytes(4, "little")
    assert region_read(client, 0, 0x21, 1) == b"\x56"
    assert region_read(client, 0, 0x20, 8) == (0x12345678).to_bytes(8, "little")
    # an odd-sized access is split into naturally aligned pieces
    region_read(client, 0, 0x23, 3)
    assert served.device.accesses[-2:] == [("r", 0x23, 1), ("r", 0x24, 2)]
    with pytest.raises(VfuError):
        region_read(client, 0, 0xFFFE, 4)                  # past the end of BAR0
    with pytest.raises(VfuError):
        region_read(client, 1, 0, 4)                       # an unused BAR


def test_posted_write_gets_no_reply(served, client):
    posted = client.send(Command.REGION_WRITE,
                         REGION_ACCESS.pack_values(0x40, 0, 4) + b"\xaa\xbb\xcc\xdd",
                         flags=HeaderFlags.NO_REPLY)
    bad = client.send(Command.REGION_WRITE,                # a failing posted write: still silent
                      REGION_ACCESS.pack_values(0x20000, 0, 4) + bytes(4),
                      flags=HeaderFlags.NO_REPLY)
    read = client.send(Command.REGION_READ, REGION_ACCESS.pack_values(0x40, 0, 4))
    hdr, body = client.recv()
    assert hdr.id == read and hdr.id not in (posted, bad)
    assert body[REGION_ACCESS.size:] == b"\xaa\xbb\xcc\xdd"


def test_write_multi(served, client):
    entries = [(0x100, 4, (0x11223344).to_bytes(4, "little")), (0x108, 8, bytes(range(8))),
               (0x110, 1, b"\x7f")]
    payload = WRITE_MULTI.pack_values(len(entries)) + b"".join(
        WRITE_ONE.pack_values(off, 0, n, data.ljust(8, b"\0")) for off, n, data in entries)
    client.send(Command.REGION_WRITE_MULTI, payload, flags=HeaderFlags.NO_REPLY)
    assert region_read(client, 0, 0x100, 4) == (0x11223344).to_bytes(4, "little")
    assert region_read(client, 0, 0x108, 8) == bytes(range(8))
    assert region_read(client, 0, 0x110, 1) == b"\x7f"


def test_region_write_with_wrong_data_length_is_refused(client):
    with pytest.raises(VfuError):
        client.call(Command.REGION_WRITE, REGION_ACCESS.pack_values(0, 0, 4) + b"\1\2")


def test_device_reset(served, client):
    region_write(client, 0, 0, b"\1\2\3\4")
    cfg_write(client, 0x04, 2, 0x6)
    client.call(Command.DEVICE_RESET)
    assert served.device.resets == 1
    assert region_read(client, 0, 0, 4) == bytes(4)
    assert cfg_read(client, 0x04, 2) == 0


# ---- DMA ----------------------------------------------------------------------------------------
def memfd(size):
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, size)
    return fd


def dma_map(c, iova, size, offset=0, fd=None, flags=3):
    c.call(Command.DMA_MAP, DMA_MAP.pack_values(32, flags, offset, iova, size),
           [fd] if fd is not None else [])


def test_dma_map_shares_guest_memory(served, client):
    fd = memfd(0x20000)
    guest = mmap.mmap(fd, 0x20000)
    dma_map(client, 0x100000, 0x10000, offset=0x10000, fd=fd)
    mem = served.device.mem
    guest[0x10000:0x10004] = b"RAM!"
    assert served.call(mem.read, 0x100000, 4) == b"RAM!"
    served.call(mem.write, 0x10FFFC, b"\x01\x02\x03\x04")
    assert guest[0x1FFFC:0x20000] == b"\x01\x02\x03\x04"
    with pytest.raises(DmaError):
        served.call(mem.read, 0x10FFFE, 4)                 # runs off the end of the mapping
    body = client.call(Command.DMA_UNMAP, DMA_UNMAP.pack_values(24, 0, 0x100000, 0x10000))
    assert DMA_UNMAP.unpack(body) == DmaUnmap(24, 0, 0x100000, 0x10000)
    assert served.device.mem.regions == [] and served.server.dma.open_mmaps == 0
    with pytest.raises(DmaError):
        served.call(mem.read, 0x100000, 4)
    guest.close()
    os.close(fd)


def test_dma_map_errors(served, client):
    fd = memfd(0x10000)
    dma_map(client, 0, 0x10000, fd=os.dup(fd))
    with pytest.raises(VfuError) as e:
        dma_map(client, 0x8000, 0x10000, fd=os.dup(fd))    # overlaps
    assert e.value.errno == errno.EEXIST
    with pytest.raises(VfuError) as e:
        dma_map(client, 0x100000, 0x20000, fd=os.dup(fd))  # past the end of the file
    assert e.value.errno == errno.EINVAL
    with pytest.raises(VfuError) as e:
        client.call(Command.DMA_UNMAP, DMA_UNMAP.pack_values(24, 0, 0x400000, 0x1000))
    assert e.value.errno == errno.ENOENT
    read_only = memfd(0x1000)
    dma_map(client, 0x200000, 0x1000, fd=read_only, flags=1)
    with pytest.raises(DmaError):
        served.call(served.device.mem.write, 0x200000, b"x")
    os.close(fd)


def test_dma_map_without_fd_refuses_dma_with_a_reason(served, client):
    dma_map(client, 0xFFFC0000, 0x40000)
    with pytest.raises(DmaError, match="without a file descriptor"):
        served.call(served.device.mem.read, 0xFFFC0000, 4)
    client.call(Command.DMA_UNMAP, DMA_UNMAP.pack_values(24, 0, 0xFFFC0000, 0x40000))


def test_dma_unmap_all(served, client):
    fd = memfd(0x2000)
    dma_map(client, 0, 0x1000, fd=os.dup(fd))
    dma_map(client, 0x1000, 0x1000, offset=0x1000, fd=os.dup(fd))
    client.call(Command.DMA_UNMAP, DMA_UNMAP.pack_values(24, 2, 0, 0))
    assert served.device.mem.regions == []
    os.close(fd)


# ---- interrupts ----------------------------------------------------------------------------------
def eventfds(n):
    return [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(n)]


def fired(fd):
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def set_irqs(c, index, start, count, flags, fds=(), data=b""):
    c.call(Command.DEVICE_SET_IRQS,
           IRQ_SET.pack_values(IRQ_SET.size + len(data), flags, index, start, count) + data, fds)


EVENTFD_TRIGGER = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER


def test_msix_vector_n_is_interrupter_n(served, client):
    fds = eventfds(INTERRUPTERS)
    set_irqs(client, PciIrq.MSIX, 0, INTERRUPTERS, EVENTFD_TRIGGER, fds)
    msix_ctrl = 0x72
    cfg_write(client, msix_ctrl, 2, 0x8000)                # MSI-X enable
    irq = served.server.irq
    assert irq.message_signalled
    served.call(irq.signal, 3)
    assert [fired(fd) for fd in fds] == [0, 0, 0, 1, 0, 0, 0, 0]
    # function mask: held pending (PBA shows it), sent on unmask
    cfg_write(client, msix_ctrl, 2, 0xC000)
    served.call(irq.signal, 5)
    assert fired(fds[5]) == 0
    assert region_read(client, 2, 0x1000, 1) == b"\x20"
    cfg_write(client, msix_ctrl, 2, 0x8000)
    assert fired(fds[5]) == 1
    # vectors without an eventfd (QEMU unassigns while enabling) keep theirs pending too
    set_irqs(client, PciIrq.MSIX, 0, 2, EVENTFD_TRIGGER)
    served.call(irq.signal, 1)
    late = eventfds(1)
    set_irqs(client, PciIrq.MSIX, 1, 1, EVENTFD_TRIGGER, late)
    assert fired(late[0]) == 1
    # disable all: every eventfd of the index is dropped
    set_irqs(client, PciIrq.MSIX, 0, 0, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER)
    assert irq.fds[PciIrq.MSIX] == [None] * INTERRUPTERS
    for fd in fds + late:
        os.close(fd)


def test_msi_uses_enabled_vector_count(served, client):
    fds = eventfds(2)
    set_irqs(client, PciIrq.MSI, 0, 2, EVENTFD_TRIGGER, fds)
    cfg_write(client, 0x52, 2, 0x0001 | 1 << 4)            # enable, 2 vectors
    served.call(served.server.irq.signal, 3)               # interrupter 3 -> vector 1
    assert (fired(fds[0]), fired(fds[1])) == (0, 1)
    cfg_write(client, 0x52, 2, 0x0001)                     # 1 vector: everything on vector 0
    served.call(served.server.irq.signal, 3)
    assert (fired(fds[0]), fired(fds[1])) == (1, 0)
    for fd in fds:
        os.close(fd)


def test_intx_level_automask_and_unmask(served, client):
    (fd,) = eventfds(1)
    set_irqs(client, PciIrq.INTX, 0, 1, EVENTFD_TRIGGER, [fd])
    irq = served.server.irq
    assert not irq.message_signalled
    served.call(irq.set_level, True)
    assert fired(fd) == 1
    assert cfg_read(client, 0x06, 2) & 0x08                # status: interrupt pending
    served.call(irq.set_level, True)                       # automasked: no second edge
    assert fired(fd) == 0
    unmask = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK
    set_irqs(client, PciIrq.INTX, 0, 1, unmask)            # EOI with the line still up
    assert fired(fd) == 1
    served.call(irq.set_level, False)
    set_irqs(client, PciIrq.INTX, 0, 1, unmask)
    assert fired(fd) == 0
    assert not cfg_read(client, 0x06, 2) & 0x08
    cfg_write(client, 0x04, 2, 0x0400)                     # INTx disable
    served.call(irq.set_level, True)
    assert fired(fd) == 0
    cfg_write(client, 0x04, 2, 0x0000)                     # re-enabled with the line up
    assert fired(fd) == 1
    os.close(fd)


def test_interrupt_into_a_full_pipe_does_not_block(served, client):
    r, w = os.pipe()
    os.set_blocking(w, False)
    while True:                                            # fill the pipe
        try:
            os.write(w, bytes(65536))
        except BlockingIOError:
            break
    os.set_blocking(w, True)                               # as a hostile client would leave it
    set_irqs(client, PciIrq.MSIX, 0, 1, EVENTFD_TRIGGER, [w])
    cfg_write(client, 0x72, 2, 0x8000)
    served.call(served.server.irq.signal, 0)              # returns: dropped with a log line
    client.version()
    os.close(r)
    os.close(w)


def test_set_irqs_validation(served, client):
    fds = eventfds(3)
    before = open_fds()
    with pytest.raises(VfuError):                          # 3 fds for 2 vectors
        set_irqs(client, PciIrq.MSIX, 0, 2, EVENTFD_TRIGGER, fds)
    with pytest.raises(VfuError):                          # beyond the vector count
        set_irqs(client, PciIrq.MSIX, 7, 2, EVENTFD_TRIGGER, fds[:2])
    with pytest.raises(VfuError):                          # two actions at once
        set_irqs(client, PciIrq.MSIX, 0, 1,
                 IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK | IrqSetFlags.ACTION_UNMASK)
    with pytest.raises(VfuError):
        set_irqs(client, 7, 0, 1, EVENTFD_TRIGGER, fds[:1])
    # the refused descriptors were closed by the server: its copies are gone again
    assert wait_for(lambda: open_fds() <= before)
    for fd in fds:
        os.close(fd)


def test_unexpected_fds_are_closed_and_refused(served, client):
    (fd,) = eventfds(1)
    before = open_fds()
    with pytest.raises(VfuError) as e:
        client.call(Command.REGION_READ, REGION_ACCESS.pack_values(0, 0, 4), [fd])
    assert e.value.errno == errno.EINVAL
    assert wait_for(lambda: open_fds() <= before)
    os.close(fd)


# ---- sessions ------------------------------------------------------------------------------------
def test_disconnect_releases_everything_and_a_new_client_can_connect(served):
    baseline = open_fds()
    c = Client(served.server.socket_path)
    c.version()
    ram = memfd(0x4000)
    dma_map(c, 0, 0x4000, fd=ram)
    fds = eventfds(INTERRUPTERS)
    set_irqs(c, PciIrq.MSIX, 0, INTERRUPTERS, EVENTFD_TRIGGER, fds)
    c.close()
    for fd in [*fds, ram]:
        os.close(fd)
    assert wait_for(lambda: served.disconnects == 1)
    assert served.server.last_disconnect_reason == "client closed the connection"
    assert served.device.mem.regions == [] and served.server.irq.open_fds == []
    assert wait_for(lambda: open_fds() <= baseline)
    c2 = Client(served.server.socket_path)
    c2.version()
    c2.close()


def test_oversized_message_ends_the_session(served, client):
    client.send(Command.REGION_WRITE, b"", size=64 << 20)
    assert wait_for(lambda: served.disconnects == 1)
    assert "claims" in served.server.last_disconnect_reason
    with pytest.raises((ConnectionError, OSError)):
        client.recv()


def test_client_that_never_reads_replies_is_cut_off(served, client, monkeypatch):
    monkeypatch.setattr(framing, "MAX_QUEUED_REPLIES", 1 << 20)
    client.sock.settimeout(None)
    try:
        for _ in range(200):
            client.send(Command.REGION_READ, REGION_ACCESS.pack_values(0, 0, 0x10000))
    except OSError:
        pass                                               # the server hung up on us: fine
    assert wait_for(lambda: served.disconnects == 1)
    assert "unread" in served.server.last_disconnect_reason


def test_too_many_fds_end_the_session_and_are_closed(served, client):
    fds = eventfds(70)
    before = open_fds()
    client.send(Command.REGION_READ, REGION_ACCESS.pack_values(0, 0, 4), fds)
    assert wait_for(lambda: served.disconnects == 1)
    assert "file descriptors" in served.server.last_disconnect_reason
    assert wait_for(lambda: open_fds() <= before)
    for fd in fds:
        os.close(fd)


def test_version_with_other_major_ends_the_session(served):
    c = Client(served.server.socket_path)
    c.send(Command.VERSION, VERSION.pack_values(1, 0) + b"{}\0")
    assert wait_for(lambda: served.disconnects == 1)
    assert "1.0" in served.server.last_disconnect_reason
    c.close()


def test_version_with_unreadable_capabilities_uses_defaults(served):
    c = Client(served.server.socket_path)
    body = c.call(Command.VERSION, VERSION.pack_values(0, 3) + b"{not json\0")
    assert VERSION.unpack_from(body) == (0, 0)             # minor: at most what was proposed
    c.close()


def test_truncated_message_then_close_is_clean(served, client):
    client.sock.sendall(HEADER.pack_values(1, Command.REGION_READ, 32, 0, 0) + b"\0\0")
    client.close()
    assert wait_for(lambda: served.disconnects == 1)


def test_second_client_is_refused_while_one_is_served(served, client):
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.connect(served.server.socket_path)
    other.settimeout(5)
    assert other.recv(1) == b""                            # closed by the server
    other.close()
    client.version()                                       # the first one is unaffected


def test_many_messages_in_one_read_and_split_messages(served, client):
    # 200 posted writes and a read in one send, then a read split across two sends
    batch = b"".join(
        HEADER.pack_values(i, Command.REGION_WRITE, 36, HeaderFlags.NO_REPLY, 0)
        + REGION_ACCESS.pack_values(4 * i, 0, 4) + i.to_bytes(4, "little") for i in range(200))
    batch += HEADER.pack_values(500, Command.REGION_READ, 32, 0, 0) + \
        REGION_ACCESS.pack_values(4 * 199, 0, 4)
    client.sock.sendall(batch)
    hdr, body = client.recv()
    assert hdr.id == 500 and body[16:] == (199).to_bytes(4, "little")
    msg = HEADER.pack_values(501, Command.REGION_READ, 32, 0, 0) + \
        REGION_ACCESS.pack_values(8, 0, 4)
    client.sock.sendall(msg[:10])
    time.sleep(0.02)
    client.sock.sendall(msg[10:])
    hdr, body = client.recv()
    assert hdr.id == 501 and body[16:] == (2).to_bytes(4, "little")


def test_fds_follow_their_message_in_a_batch(served, client):
    # a posted write and a DMA_MAP with an fd back to back: the fd belongs to the DMA_MAP
    fd = memfd(0x1000)
    client.send(Command.REGION_WRITE, REGION_ACCESS.pack_values(0, 0, 4) + bytes(4),
                flags=HeaderFlags.NO_REPLY)
    msg_id = client.send(Command.DMA_MAP, DMA_MAP.pack_values(32, 3, 0, 0x5000, 0x1000), [fd])
    hdr, _ = client.recv()
    assert hdr.id == msg_id and not hdr.flags & HeaderFlags.ERROR
    os.close(fd)


# ---- measurements --------------------------------------------------------------------------------
def test_measure_region_read_round_trip(served, client, capsys):
    n = 2000
    msg = REGION_ACCESS.pack_values(0x20, 0, 4)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        client.call(Command.REGION_READ, msg)
    rtt_us = (time.perf_counter_ns() - t0) / n / 1000
    summary = served.server.stats.summary()["BAR0_READ"]
    with capsys.disabled():
        print(f"\nvfio-user REGION_READ from a Python client: {rtt_us:.1f} us per round trip; "
              f"server handling median {summary['median_us']:.1f} us, "
              f"p90 {summary['p90_us']:.1f} us")
    assert summary["median_us"] < 200
