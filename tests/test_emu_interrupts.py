"""MFINDEX, MFINDEX wrap events, interrupt moderation and the INTx line, on the virtual clock;
one interrupter on its own."""
from types import SimpleNamespace

from xhcidbg.emu import events
from xhcidbg.emu import regs as R
from xhcidbg.emu.hooks import EventRecord, Hooks
from xhcidbg.emu.interrupters import ERST_ENTRY, Interrupter
from xhcidbg.emu.memory import RamMemory
from xhcidbg.emu.timing import Scheduler
from xhcidbg.emu.trb import CC, Trb
from xhcidbg.emu.trb import TrbType as T
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


# ---- one Interrupter alone: real memory, clock and hooks; fakes only for who it reports to ------
class Reporter:
    def __init__(self):
        self.refused, self.system_errors = [], []

    def refuse(self, key, message, level="warning"):
        self.refused.append(key)

    def host_system_error(self, why):
        self.system_errors.append(why)


class Router:
    running = True

    def __init__(self):
        self.eint, self.delivered, self.intx_updates = 0, [], 0

    def usbsts_eint(self):
        self.eint += 1

    def deliver_interrupt(self, ir):
        self.delivered.append(ir.index)

    def update_intx(self):
        self.intx_updates += 1


ERST, SEGMENT, SEGMENT_TRBS = 0x1000, 0x2000, 16


def lone_interrupter(imod=0):
    mem = RamMemory(1 << 16)
    router, reporter, full, room = Router(), Reporter(), [], []
    ir = Interrupter(2, mem=mem, scheduler=Scheduler(virtual=True), hooks=Hooks(),
                     errors=reporter, router=router, erst_max=4, on_full=full.append,
                     on_room=lambda: room.append(True))
    regs = {reg.name: (read, write) for reg, read, write in ir.registers()}
    mem.write(ERST, ERST_ENTRY.pack(SEGMENT, SEGMENT_TRBS, 0))
    for name, value in (("IMOD", imod), ("ERSTSZ", 1), ("ERSTBA_LO", ERST), ("ERSTBA_HI", 0),
                        ("ERDP_LO", SEGMENT), ("ERDP_HI", 0), ("IMAN", R.IMAN.mask("ie"))):
        regs[name][1](value)
    return SimpleNamespace(ir=ir, regs=regs, mem=mem, router=router, reporter=reporter,
                           full=full, room=room)


def test_an_interrupter_alone_writes_the_event_and_signals_it():
    t = lone_interrupter()
    ir, regs, mem, router = t.ir, t.regs, t.mem, t.router
    ir.post(EventRecord(2, events.command_completion(0x5000, CC.SUCCESS, slot=3)))
    ev = Trb.unpack(SEGMENT, mem.read(SEGMENT, 16))
    assert ev.type == T.COMMAND_COMPLETION and ev.param == 0x5000 and ev.cycle == 1
    assert ev.field("cc") == CC.SUCCESS and ev.field("slot") == 3
    assert router.eint == 1 and router.delivered == [2]
    assert regs["IMAN"][0]() == R.IMAN.mask("ip", "ie")
    assert regs["ERDP_LO"][0]() == SEGMENT | R.ERDP_LO.mask("ehb")     # EHB holds the next one
    ir.post(EventRecord(2, events.port_status_change(1)))
    assert router.delivered == [2]
    regs["ERDP_LO"][1](SEGMENT + 32 | R.ERDP_LO.mask("ehb"))          # consumed both
    assert router.delivered == [2] and not t.reporter.refused


def test_an_interrupter_alone_reports_its_ring_full_and_free_again():
    t = lone_interrupter()
    ir, regs, mem, full, room = t.ir, t.regs, t.mem, t.full, t.room
    for i in range(SEGMENT_TRBS):
        ir.post(EventRecord(2, events.command_completion(0x5000 + 16 * i, CC.SUCCESS)))
    last = Trb.unpack(0, mem.read(SEGMENT + 16 * (SEGMENT_TRBS - 1), 16))     # the last TRB
    assert last.type == T.HOST_CONTROLLER_EVENT and last.field("cc") == CC.EVENT_RING_FULL
    assert full == [True] and ir.full and len(ir.backlog) == 1 and not room
    regs["ERDP_LO"][1](SEGMENT + 16 * 8 | R.ERDP_LO.mask("ehb"))      # software caught up
    assert full == [True, False] and room == [True] and not ir.backlog
    held = Trb.unpack(0, mem.read(SEGMENT, 16))                          # wrapped: cycle 0
    assert held.param == 0x5000 + 16 * (SEGMENT_TRBS - 1) and held.cycle == 0


def test_an_interrupter_alone_refuses_an_oversized_erst():
    t = lone_interrupter()
    ir, regs, reporter = t.ir, t.regs, t.reporter
    regs["ERSTSZ"][1](100)
    regs["ERSTBA_HI"][1](0)
    assert reporter.refused[0] == "erstsz2"                      # clamped to ERST Max: 16 entries
    assert set(reporter.refused[1:]) == {"erstseg2"}             # 15 empty ones skipped
    assert len(ir.segments) == 1
