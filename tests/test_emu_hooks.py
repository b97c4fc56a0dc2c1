"""The observer interface: announcements arrive, and observers can rewrite or veto outcomes
(how the fault engine will inject errors)."""
import pytest

from xhcidbg.devices.base import Speed, Status
from xhcidbg.devices.loopback import LoopbackDevice
from xhcidbg.emu.context import EpState
from xhcidbg.emu.hooks import ANNOUNCEMENTS
from xhcidbg.emu.trb import CC, TRB_SIZE
from xhcidbg.emu.trb import TrbType as T
from xhcidbg.guest.device import Device


@pytest.fixture
def dev(bus, drv):
    bus.controller.attach(LoopbackDevice(speed=Speed.SUPER, pattern=None))
    return Device.enumerate(drv, 3)


def test_every_announcement_is_made_during_an_ordinary_session(bus, drv):
    seen = set()

    class All:
        pass

    for name in ANNOUNCEMENTS:
        setattr(All, f"on_{name}", lambda self, *a, _n=name: seen.add(_n))
    bus.controller.hooks.attach(All())
    bus.controller.attach(LoopbackDevice(speed=Speed.SUPER, pattern=None))
    d = Device.enumerate(drv, 3)
    d.endpoint(0x81).submit(length=64).wait()
    drv.disable_slot(99)                                   # a refusal: 'log'
    assert seen == set(ANNOUNCEMENTS)


def test_an_observer_turns_a_transfer_into_a_stall(bus, drv, dev):
    class Stall:
        def on_urb_complete(self, rec):
            if rec.xfer.endpoint == 0x81:
                rec.xfer.status = Status.STALL
                rec.note = "injected stall"

    bus.controller.hooks.attach(Stall(), first=True)
    t = dev.endpoint(0x81).submit(length=64)
    assert t.wait().cc == CC.STALL_ERROR
    assert dev.ep_context(dev.endpoint(0x81).dci)["ep_state"] == EpState.HALTED


def test_an_observer_rewrites_a_command_completion(bus, drv):
    class Refuse:
        def on_command(self, result):
            if result.trb.type == T.ENABLE_SLOT:
                result.cc = CC.NO_SLOTS_AVAILABLE
                result.slot = 0

    bus.controller.hooks.attach(Refuse())
    assert drv.enable_slot().cc == CC.NO_SLOTS_AVAILABLE
    assert drv.no_op().cc == CC.SUCCESS


def test_an_observer_drops_an_event(bus, drv):
    dropped = []

    class Drop:
        def on_event(self, ev):
            if (ev.dwords[3] >> 10) & 0x3F == T.COMMAND_COMPLETION and not dropped:
                ev.drop = True
                dropped.append(ev)

    bus.controller.hooks.attach(Drop())
    from xhcidbg.guest.errors import XhciTimeout
    with pytest.raises(XhciTimeout):
        drv.no_op(timeout_ns=5_000_000)                     # its completion never arrives
    assert len(dropped) == 1
    assert drv.no_op().cc == CC.SUCCESS


def test_detached_observers_hear_nothing(bus, drv):
    heard = []

    class Ear:
        def on_doorbell(self, *a):
            heard.append(a)

    ear = bus.controller.hooks.attach(Ear())
    drv.no_op()
    n = len(heard)
    bus.controller.hooks.detach(ear)
    drv.no_op()
    assert n >= 1 and len(heard) == n


def test_attach_refuses_objects_that_listen_to_nothing(bus):
    with pytest.raises(TypeError, match="no on_<announcement>"):
        bus.controller.hooks.attach(object())


def test_the_trace_shows_the_completion_code_an_observer_wrote(bus, drv, dev, tmp_path):
    """A rule rewrites the Transfer Event the guest gets; the usbmon completion in the capture
    carries the errno of the code actually posted, not of the device's own outcome."""
    from xhcidbg.decode.usbmon import UsbmonRecord
    from xhcidbg.trace.pcapng import LINKTYPE_USB_LINUX_MMAPPED, read_capture
    from xhcidbg.trace.tracer import Tracer

    class StallTheEvent:
        def on_event(self, ev):
            d = ev.dwords
            if (d[3] >> 10) & 0x3F == T.TRANSFER_EVENT and (d[3] >> 16) & 0x1F == 3:
                ev.dwords = [d[0], d[1], (CC.STALL_ERROR << 24) | (d[2] & 0xFFFFFF), d[3]]

    bus.controller.hooks.attach(StallTheEvent(), first=True)
    path = tmp_path / "rewritten.pcapng"
    with Tracer(bus.controller, path, "kind=urb"):
        t = dev.endpoint(0x81).submit(length=64)
        assert t.wait().cc == CC.STALL_ERROR            # what the guest was told
    with open(path, "rb") as f:
        cap, packets = read_capture(f)
        usbmon = [UsbmonRecord.parse(p.data) for p in packets
                  if cap.interfaces[p.interface].linktype == LINKTYPE_USB_LINUX_MMAPPED]
    done = [r for r in usbmon if r.type == "C" and r.epnum == 0x81]
    assert [r.status for r in done] == [-32]                  # -EPIPE: Stall Error


def test_a_transfer_record_names_the_trbs_of_its_td(bus, drv, dev):
    """A control TD is Setup, Data and Status Stage: the record lists the three TRBs the
    controller fetched for it, in ring order."""
    fetched, records = [], []

    class Watch:
        def on_trb(self, ring, trb):
            fetched.append((ring, trb.addr, trb.type))

        def on_urb_submit(self, rec):
            records.append(rec)

    bus.controller.hooks.attach(Watch())
    dev.control(0x80, 6, 0x0100, 0, 18)                  # GET_DESCRIPTOR(device)
    [rec] = [r for r in records if r.xfer.setup]
    ring = f"{rec.slot}/{rec.dci}"
    stages = [(addr, t) for r, addr, t in fetched if r == ring and t != T.LINK]
    assert [t for _, t in stages] == [T.SETUP_STAGE, T.DATA_STAGE, T.STATUS_STAGE]
    assert rec.trbs == tuple(addr for addr, _ in stages)


def test_dma_announces_the_controllers_accesses_and_only_those(bus, drv, dev):
    c = bus.controller
    seen: list[tuple[bool, int, int, bytes]] = []

    class Dma:
        def on_dma(self, write, addr, length, data):
            seen.append((write, addr, length, bytes(data)))

    def touched(write: bool, addr: int, n: int) -> bool:
        return any(w == write and a < addr + n and addr < a + ln for w, a, ln, _ in seen)

    ep = dev.endpoint(0x81)
    assert c.mem.view(0x1000, 16) is not None           # nobody listens: zero-copy views
    watcher = c.hooks.attach(Dma())
    assert c.mem.view(0x1000, 16) is None               # listened to: every write goes by write()
    event_at = c.interrupters[0].enqueue_pointer
    td = ep.submit(length=64).wait()
    assert td.ok
    trbs = td.trb_addrs()
    assert all(touched(False, a, TRB_SIZE) for a in trbs)          # the controller read them
    assert not any(touched(True, a, TRB_SIZE) for a in trbs)       # the guest wrote them: unseen
    assert touched(True, td.buf, 64)                               # IN data, by the controller
    assert touched(True, event_at, TRB_SIZE)                       # its Transfer Event
    # a write is announced before its bytes land, with the bytes it writes
    data_writes = [d for w, a, n, d in seen if w and a == td.buf]
    assert data_writes and data_writes[-1][:64] == bus.mem.read(td.buf, 64)
    count = len(seen)
    c.mem.peek(td.buf, 64)
    c.mem.poke(td.buf, b"x")
    bus.mem.read(td.buf, 64)                            # the guest's own memory object
    assert len(seen) == count
    c.hooks.detach(watcher)
    assert c.hooks.on_dma == [] and c.mem.view(0x1000, 16) is not None
