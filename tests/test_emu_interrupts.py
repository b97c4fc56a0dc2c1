"""MFINDEX, MFINDEX wrap events, interrupt moderation and the INTx line, on the virtual clock."""
from xhcidbg.emu import regs as R
from xhcidbg.emu.trb import Trb, TrbType as T
from xhcidbg.guest.driver import XhciDriver
from xhcidbg.transport.inproc import InProcessBus

MS = 1_000_000


def test_mfindex_counts_microframes_while_running_and_freezes_when_halted(bus, drv):
    mf = lambda: bus.mmio_read(R.RT_BASE, 4)                      # noqa: E731
    a = mf()
    bus.scheduler.advance(10 * MS)                                 # 80 microframes
    assert (mf() - a) % 0x4000 == 80
    drv.halt()
    frozen = mf()
    bus.scheduler.advance(5 * MS)
    assert mf() == frozen


def test_mfindex_wrap_events_with_ewe(bus, drv):
    drv.op_write(R.USBCMD.offset, drv.op_read(R.USBCMD.offset) | R.USBCMD.mask("ewe"))
    before = len(drv.events)
    bus.scheduler.advance(2 * 2048 * MS + MS)                      # two wraps of 2.048 s
    drv.service()
    wraps = [e for e in list(drv.events)[before:] if e.type == T.MFINDEX_WRAP]
    assert len(wraps) == 2


def test_imod_holds_the_next_interrupt_for_the_moderation_interval():
    bus = InProcessBus()
    drv = XhciDriver(bus, imod_interval=4000).start()               # 4000 x 250 ns = 1 ms
    drv.queue_command(Trb.build(T.NOOP_COMMAND))
    assert bus.interrupts[0] == 1
    t1 = bus.scheduler.now_ns()
    drv.service()                                                    # consume, clear EHB
    drv.queue_command(Trb.build(T.NOOP_COMMAND))                     # a new event at once...
    assert bus.interrupts[0] == 1                                    # ...waits for IMODC
    bus.wait(lambda: bus.interrupts[0] == 2, 10 * MS)
    assert bus.interrupts[0] == 2
    assert bus.scheduler.now_ns() - t1 >= 1 * MS
    assert bus.mmio_read(R.RT_BASE + 0x24, 4) & 0xFFFF == 4000


def test_intx_line_follows_ip_and_ie():
    bus = InProcessBus(mode="intx")
    drv = XhciDriver(bus, poll=True).start()
    drv.queue_command(Trb.build(T.NOOP_COMMAND))
    assert bus.intx                                                  # IP=1, IE=1, INTE=1
    iman = R.RT_BASE + 0x20
    bus.mmio_write(iman, 4, 2 | 1)                                   # clear IP (RW1C), keep IE
    assert not bus.intx
    drv.queue_command(Trb.build(T.NOOP_COMMAND))
    drv.service()                                                    # consumes, clears EHB
    bus.mmio_write(iman, 4, 0)                                       # IE=0 masks the line
    drv.queue_command(Trb.build(T.NOOP_COMMAND))
    assert not bus.intx


def test_msi_clears_ip_once_the_message_is_sent(bus, drv):
    drv.no_op()
    assert bus.interrupts[0] >= 1
    assert bus.mmio_read(R.RT_BASE + 0x20, 4) & 1 == 0
