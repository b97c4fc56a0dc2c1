"""Register-level behaviour of the controller, driven through BAR0 MMIO as a guest does."""
import struct

import pytest

from xhcidbg.emu import regs as R
from xhcidbg.emu.trb import CC, Trb
from xhcidbg.emu.trb import TrbType as T
from xhcidbg.transport.inproc import InProcessBus

OP = R.OP_BASE
RT = R.RT_BASE


@pytest.fixture
def bus():
    return InProcessBus(usb2_ports=2, usb3_ports=2, interrupters=4)


def walk_xecp(bus):
    hcc1 = bus.mmio_read(0x10, 4)
    off = (hcc1 >> 16) << 2
    caps = []
    for _ in range(32):
        d = bus.mmio_read(off, 4)
        caps.append((off, d & 0xFF, [bus.mmio_read(off + 4 * i, 4) for i in range(4)]))
        nxt = (d >> 8) & 0xFF
        if not nxt:
            break
        off += nxt * 4
    return caps


def test_capabilities_are_self_consistent(bus):
    caplength = bus.mmio_read(0, 1)
    assert caplength == R.CAP_LENGTH
    assert bus.mmio_read(2, 2) == 0x0120
    hcs1 = bus.mmio_read(4, 4)
    assert hcs1 & 0xFF == 64 and (hcs1 >> 8) & 0x7FF == 4 and hcs1 >> 24 == 4
    hcs2 = bus.mmio_read(8, 4)
    assert ((hcs2 >> 21) & 0x1F) << 5 | (hcs2 >> 27) == 4      # scratchpads
    hcc1 = bus.mmio_read(0x10, 4)
    assert hcc1 & 1 and not hcc1 & 4                           # AC64, 32-byte contexts
    dboff, rtsoff = bus.mmio_read(0x14, 4), bus.mmio_read(0x18, 4)
    assert dboff & 3 == 0 and rtsoff & 0x1F == 0
    assert max(dboff, rtsoff) < bus.controller.bar_size
    caps = walk_xecp(bus)
    assert [c[1] for c in caps] == [1, 2, 2]
    usb2, usb3 = caps[1][2], caps[2][2]
    assert usb2[0] >> 24 == 2 and usb3[0] >> 24 == 3
    assert usb2[1] == usb3[1] == 0x20425355                  # "USB "
    ranges = [(c[2] & 0xFF, (c[2] >> 8) & 0xFF) for c in (usb2, usb3)]
    assert ranges == [(1, 2), (3, 2)]


def test_64_byte_contexts_are_advertised():
    bus = InProcessBus(context_size=64)
    assert bus.mmio_read(0x10, 4) & 4


def test_reset_values_and_hcrst(bus):
    assert bus.mmio_read(OP + 4, 4) & 1                       # HCH
    assert bus.mmio_read(OP + 8, 4) == 1                      # 4 KiB pages
    bus.mmio_write(OP + 0x38, 4, 8)
    bus.mmio_write(OP + 0x30, 4, 0x10000)
    bus.mmio_write(RT + 0x20 + 4, 4, 0x1234)
    bus.mmio_write(OP, 4, 2)                                  # HCRST
    assert bus.mmio_read(OP, 4) == 0
    assert bus.mmio_read(OP + 0x38, 4) == 0
    assert bus.mmio_read(OP + 0x30, 4) == 0
    assert bus.mmio_read(RT + 0x20 + 4, 4) == 4000           # IMOD reset value


def test_usbsts_change_bits_are_rw1c(bus):
    c = bus.controller
    c.usbsts |= 0x18                                           # EINT | PCD
    bus.mmio_write(OP + 4, 4, 0x08)
    assert bus.mmio_read(OP + 4, 4) & 0x18 == 0x10
    bus.mmio_write(OP + 4, 4, 0)                               # writing 0 changes nothing
    assert bus.mmio_read(OP + 4, 4) & 0x10


def test_sub_dword_and_qword_access(bus):
    bus.mmio_write(OP + 0x30, 8, 0x1_2345_6780)
    assert bus.mmio_read(OP + 0x30, 8) == 0x1_2345_6780
    assert bus.mmio_read(OP + 0x31, 1) == 0x67
    bus.mmio_write(OP + 0x38, 1, 5)
    assert bus.mmio_read(OP + 0x38, 4) == 5


def test_any_offset_any_size_is_answered(bus):
    for off in range(0, bus.controller.bar_size, 0x3C4):
        for size in (1, 2, 3, 4, 8, 16):
            bus.mmio_read(off, size)
            bus.mmio_write(off, size, 0xFFFFFFFF)
    assert bus.controller.refusals > 0


def test_legacy_handoff(bus):
    off = walk_xecp(bus)[0][0]
    bus.mmio_write(off, 4, bus.mmio_read(off, 4) | (1 << 24))
    v = bus.mmio_read(off, 4)
    assert v & (1 << 24) and not v & (1 << 16)


def test_command_ring_noop_and_stop_produce_events(bus):
    mem = bus.mem
    bus.mmio_write(OP + 0x38, 4, 4)
    bus.mmio_write(OP + 0x30, 8, 0x10000)
    bus.mmio_write(OP + 0x18, 8, 0x20000 | 1)
    mem.write(0x30000, struct.pack("<QII", 0x31000, 16, 0))
    bus.mmio_write(RT + 0x28, 4, 1)
    bus.mmio_write(RT + 0x38, 8, 0x31000)
    bus.mmio_write(RT + 0x30, 8, 0x30000)
    bus.mmio_write(RT + 0x20, 4, 2)
    bus.mmio_write(OP, 4, 5)
    mem.write(0x20000, Trb.build(T.NOOP_COMMAND, cycle=1).pack())
    mem.write(0x20010, Trb.build(T.NORMAL, cycle=1).pack())     # not a command
    bus.mmio_write(R.DB_BASE, 4, 0)
    ev = [Trb.unpack(0, mem.read(0x31000 + 16 * i, 16)) for i in range(3)]
    assert ev[0].field("cc") == CC.SUCCESS and ev[0].param == 0x20000
    assert ev[1].field("cc") == CC.TRB_ERROR and ev[1].param == 0x20010
    assert bus.mmio_read(OP + 0x18, 4) & 8                       # CRR
    bus.mmio_write(OP + 0x18, 4, 2)                              # CS
    ev2 = Trb.unpack(0, mem.read(0x31020, 16))
    assert ev2.field("cc") == CC.COMMAND_RING_STOPPED and ev2.param == 0x20020
    assert not bus.mmio_read(OP + 0x18, 4) & 8
    assert bus.interrupts[0] == 1                                # EHB holds the rest back


def test_register_names_come_from_the_table(bus):
    c = bus.controller          # 4 ports, 4 interrupters
    names = {0x02: "CAPLENGTH", 0x10: "HCCPARAMS1", OP + 4: "USBSTS", OP + 0x31: "DCBAAP_LO",
             OP + 0x0C: "OP+0xc", R.PORT_BASE + 0x20: "PORTSC[3]",
             R.PORT_BASE + 0x34: "PORTPMSC[4]", R.PORT_BASE + 0x40: "BAR0+0x460",
             R.XECP_BASE + 0x10: "XECP+0x10", R.XECP_BASE + 1: "XECP+0x1", RT: "MFINDEX",
             RT + 8: "RT+0x8", RT + 0x20: "IMAN[0]", RT + 0x98: "ERDP_LO[3]",
             RT + 0x2C: "BAR0+0x202c", RT + 0xA0: "BAR0+0x20a0", R.DB_BASE + 8: "DOORBELL[2]",
             R.DB_BASE + 4 * 255: "DOORBELL[255]", R.DB_BASE + 0x400: "BAR0+0x3400",
             R.BAR_SIZE: "BAR0+0x10000"}
    assert {off: c.register_name(off) for off in names} == names


def test_partial_writes_leave_rw1c_bits_of_other_bytes_alone(bus):
    c = bus.controller
    c.usbsts |= R.USBSTS.mask("eint", "pcd")
    bus.mmio_write(OP + 5, 1, 0xFF)               # byte 1 has no RW1C bit here but SRE
    assert c.usbsts & R.USBSTS.mask("eint", "pcd") == R.USBSTS.mask("eint", "pcd")
    bus.mmio_write(OP + 4, 1, R.USBSTS.mask("pcd"))
    assert c.usbsts & R.USBSTS.mask("eint", "pcd") == R.USBSTS.mask("eint")
    bus.mmio_write(OP + 0x38, 2, 0x0304)          # CONFIG: MaxSlotsEn 4, U3E, CIE
    assert bus.mmio_read(OP + 0x38, 4) == 0x0304
    bus.mmio_write(OP + 0x39, 1, 0)
    assert bus.mmio_read(OP + 0x38, 4) == 4


def test_unaligned_qwords_are_refused(bus):
    c = bus.controller
    before = c.refusals
    bus.mmio_write(OP + 0x32, 8, 0x1_0000_0000)
    assert bus.mmio_read(OP + 0x32, 8) == 0 and c.refusals == before + 2
    assert bus.mmio_read(OP + 0x30, 8) == 0 and c.internal_errors == 0
