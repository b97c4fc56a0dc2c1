"""HID devices: report descriptors checked item by item, tablet and keyboard reports, class
requests, idle repeats on a virtual clock."""
import pytest

from xhcidbg.devices import DirectHost, Keyboard, PortLink, Speed, Status, Tablet
from xhcidbg.devices.descriptors import DescriptorType, HidDescriptor
from xhcidbg.devices.hid import (
    ItemType,
    format_report_descriptor,
    parse_report_descriptor,
    report_sizes,
)
from xhcidbg.devices.hid_device import HidRequest
from xhcidbg.devices.keyboard import KEYS, US_LAYOUT, Leds
from xhcidbg.devices.keyboard import REPORT_DESCRIPTOR as KEYBOARD_REPORT
from xhcidbg.devices.tablet import REPORT_DESCRIPTOR as TABLET_REPORT
from xhcidbg.emu.timing import Scheduler

GET_REPORT, GET_IDLE, GET_PROTOCOL = 0x01, 0x02, 0x03
SET_REPORT, SET_IDLE, SET_PROTOCOL = 0x09, 0x0A, 0x0B


class Port(PortLink):
    """A root port as a device sees it: a clock, and somewhere to signal wakeup."""

    def __init__(self):
        self.scheduler = Scheduler(virtual=True)
        self.wakeups = 0

    def remote_wakeup(self):
        self.wakeups += 1

    def unplug(self):
        pass


def configured(device):
    port = Port()
    device.attached(port)
    host = DirectHost(device)
    host.enumerate()
    return host, port


def hid_parse(descriptor: bytes):
    """The checks a host HID parser (Linux hid-core) applies, item by item: prefix bytes encode
    tag/type/size per HID 1.11 6.2.2.2, collections nest and close, main items sit inside an
    application collection with a usage page, minimum <= maximum, sizes within limits."""
    depth = 0
    in_application = False
    usage_page = None
    logical = [0, 0]
    report_size = report_count = 0
    for item in parse_report_descriptor(descriptor):
        assert item.kind is not None, f"unknown item at {item.offset}: {item.raw.hex()}"
        prefix = item.raw[0]
        size_code = {0: 0, 1: 1, 2: 2, 4: 3}[len(item.raw) - 1]
        assert prefix == item.kind.tag << 4 | item.kind.type << 2 | size_code
        name = item.kind.name
        if name == "Collection":
            if depth == 0:
                assert item.value == 1, "top level collection must be an application"
                in_application = True
            depth += 1
        elif name == "End Collection":
            depth -= 1
            assert depth >= 0, "End Collection without Collection"
        elif name == "Usage Page":
            usage_page = item.value
        elif name in ("Usage", "Usage Minimum", "Usage Maximum"):
            assert usage_page is not None or len(item.raw) == 5
        elif name == "Logical Minimum":
            logical[0] = item.value
        elif name == "Logical Maximum":
            logical[1] = item.value
        elif name == "Report Size":
            report_size = item.value
            assert 0 < report_size <= 256
        elif name == "Report Count":
            report_count = item.value
            assert 0 < report_count <= 12288
        elif name in ("Input", "Output", "Feature"):
            assert in_application and depth > 0
            assert report_size and report_count
            assert item.value & 1 or logical[0] <= logical[1], (logical, item)
        if item.kind.type == ItemType.MAIN:
            assert len(item.raw) <= 2
    assert depth == 0


def test_report_descriptors_item_by_item():
    hid_parse(TABLET_REPORT)
    hid_parse(KEYBOARD_REPORT)
    assert report_sizes(TABLET_REPORT) == {("Input", 0): 48}
    assert report_sizes(KEYBOARD_REPORT) == {("Input", 0): 64, ("Output", 0): 8}
    listing = format_report_descriptor(TABLET_REPORT)
    assert "Logical Maximum (32767)" in listing and "Usage (Wheel)" in listing
    assert "Input (Data, Variable, Relative)" in listing
    # Logical Maximum 32767 needs two bytes, -127 one signed byte (a parser reads them signed).
    assert bytes.fromhex("26ff7f") in TABLET_REPORT and bytes.fromhex("1581") in TABLET_REPORT


def test_keyboard_descriptor_is_the_hid_boot_keyboard():
    # HID 1.11 Appendix E.6, the example boot keyboard report descriptor.
    spec = bytes.fromhex(
        "05010906a101050719e029e715002501750195088102950175088101950575010508190129059102"
        "950175039101950675081500256505071900296581 00c0".replace(" ", ""))
    assert spec == KEYBOARD_REPORT


def test_hid_descriptors_in_configuration_and_on_interface():
    for dev, report in ((Tablet(), TABLET_REPORT), (Keyboard(), KEYBOARD_REPORT)):
        host, _ = configured(dev)
        hid = host.get_descriptor(DescriptorType.HID, length=9, recipient=1)
        parsed = HidDescriptor.parse(hid)
        assert parsed.bcdHID == 1.11 and parsed.wClassDescriptorLength == len(report)
        assert hid in dev.configuration_descriptor(0)
        assert host.get_descriptor(DescriptorType.REPORT, length=len(report) + 64,
                                   recipient=1) == report
        # Interface 1 does not exist; class descriptors are not device descriptors.
        assert host.control(0x81, 6, DescriptorType.REPORT << 8, 1, 64).status == Status.STALL
        assert host.control(0x80, 6, DescriptorType.REPORT << 8, 0, 64).status == Status.STALL


def test_tablet_report_waits_for_a_change():
    tablet = Tablet()
    host, port = configured(tablet)
    xfer = host.submit_in(1, 8)
    assert not xfer.done                       # NAK: nothing new to report
    port.scheduler.advance(1_000_000_000)
    assert not xfer.done                       # idle rate 0: no repeats either
    tablet.move(16384, 100)
    assert xfer.done and xfer.status == Status.OK
    assert xfer.result == bytes([0, 0x00, 0x40, 100, 0, 0])
    # Nothing pending: motion is queued and coalesced, clicks are kept in order.
    tablet.move(1, 2)
    tablet.move(3, 4)
    tablet.click("left")
    tablet.move(40000, -5)                     # clamped to the axis range
    reports = [host.read(1, 8) for _ in range(tablet.queued_reports)]
    assert reports == [bytes([0, 3, 0, 4, 0, 0]), bytes([1, 3, 0, 4, 0, 0]),
                       bytes([0, 3, 0, 4, 0, 0]), bytes([0, 0xFF, 0x7F, 0, 0, 0])]
    tablet.scroll(-300)
    wheel = [int.from_bytes(host.read(1, 8)[5:], "little", signed=True) for _ in range(3)]
    assert wheel == [-127, -127, -46]
    tablet.press("right")
    tablet.press(3)
    assert host.read(1, 8)[0] == 0b010 and host.read(1, 8)[0] == 0b110
    with pytest.raises(ValueError):
        tablet.press("sideways")


def test_tablet_class_requests():
    tablet = Tablet(speed=Speed.HIGH)
    host, _ = configured(tablet)
    tablet.move(10, 20)
    assert host.control_in(0xA1, GET_REPORT, 0x0100, 0, 6) == bytes([0, 10, 0, 20, 0, 0])
    assert host.control(0xA1, GET_REPORT, 0x0300, 0, 6).status == Status.STALL   # no feature
    assert host.control(0xA1, GET_REPORT, 0x0100, 1, 6).status == Status.STALL   # interface 1
    assert host.control_in(0xA1, GET_IDLE, 0, 0, 1) == b"\x00"
    host.control_out(0x21, SET_IDLE, 0x0A00)
    assert host.control_in(0xA1, GET_IDLE, 0, 0, 1) == b"\x0a"
    assert host.control_in(0xA1, GET_PROTOCOL, 0, 0, 1) == b"\x01"
    host.control_out(0x21, SET_PROTOCOL, 0)
    assert host.control_in(0xA1, GET_PROTOCOL, 0, 0, 1) == b"\x00"
    assert host.control(0x21, SET_PROTOCOL, 7).status == Status.STALL
    tablet.bus_reset()                         # back to report protocol, idle 0
    host.enumerate()
    assert host.control_in(0xA1, GET_PROTOCOL, 0, 0, 1) == b"\x01"
    assert host.control_in(0xA1, GET_IDLE, 0, 0, 1) == b"\x00"


def test_idle_rate_repeats_the_current_report():
    tablet = Tablet()
    host, port = configured(tablet)
    host.control_out(0x21, SET_IDLE, 25 << 8)  # 25 x 4 ms = 100 ms
    tablet.move(5, 6)
    assert host.read(1, 8) == bytes([0, 5, 0, 6, 0, 0])
    xfer = host.submit_in(1, 8)
    port.scheduler.advance(99_000_000)
    assert not xfer.done
    port.scheduler.advance(2_000_000)
    assert xfer.done and xfer.result == bytes([0, 5, 0, 6, 0, 0])
    # A change restarts the period.
    xfer = host.submit_in(1, 8)
    port.scheduler.advance(50_000_000)
    tablet.move(7, 8)
    assert xfer.done
    xfer = host.submit_in(1, 8)
    port.scheduler.advance(60_000_000)
    assert not xfer.done
    port.scheduler.advance(50_000_000)
    assert xfer.done and xfer.result == bytes([0, 7, 0, 8, 0, 0])
    host.control_out(0x21, SET_IDLE, 0)        # back to "only on change"
    xfer = host.submit_in(1, 8)
    port.scheduler.advance(10_000_000_000)
    assert not xfer.done


def test_remote_wakeup_when_enabled_and_not_polled():
    tablet = Tablet()
    host, port = configured(tablet)
    tablet.move(1, 1)
    assert port.wakeups == 0                   # the host did not enable remote wakeup
    host.control_out(0x00, 3, 1)               # SET_FEATURE(DEVICE_REMOTE_WAKEUP)
    tablet.move(2, 2)
    assert port.wakeups == 1
    host.read(1, 8)
    xfer = host.submit_in(1, 8)
    tablet.move(3, 3)                          # the host is polling: no wakeup needed
    assert xfer.done and port.wakeups == 1


def test_nothing_is_queued_before_configuration():
    tablet = Tablet()
    tablet.move(100, 100)
    assert tablet.queued_reports == 0
    host, _ = configured(tablet)
    assert host.control_in(0xA1, GET_REPORT, 0x0100, 0, 6)[1] == 100   # state is kept


def decode_keyboard(reports):
    """What a host makes of a stream of boot reports: the characters typed, US layout."""
    char_of = {v: k for k, v in US_LAYOUT.items()}
    text, previous = [], set()
    for r in reports:
        assert len(r) == 8 and r[1] == 0
        keys = {k for k in r[2:] if k}
        shift = bool(r[0] & 0x22)
        for k in keys - previous:
            text.append(char_of[(k, shift)])
        previous = keys
    return "".join(text)


def test_keyboard_types_text():
    kb = Keyboard()
    host, _ = configured(kb)
    xfer = host.submit_in(1, 8)
    assert not xfer.done
    kb.type("Hi!")
    assert xfer.done and xfer.result == bytes([0x02, 0, 0x0B, 0, 0, 0, 0, 0])    # shift + h
    reports = [host.read(1, 8) for _ in range(kb.queued_reports)]
    assert reports == [bytes(8),
                       bytes([0, 0, 0x0C, 0, 0, 0, 0, 0]), bytes(8),           # i
                       bytes([0x02, 0, 0x1E, 0, 0, 0, 0, 0]), bytes(8)]        # shift + 1
    text = "The quick brown fox jumps over the lazy dog 0123456789\n\t" \
           "`~!@#$%^&*()-_=+[{]}\\|;:'\",<.>/? THE END\b"
    kb.type(text)
    reports = [host.read(1, 8) for _ in range(kb.queued_reports)]
    assert len(reports) == 2 * len(text)
    assert decode_keyboard(reports) == text
    assert all(r == bytes(8) for r in reports[1::2])      # every key released again


def test_keyboard_keys_modifiers_and_rollover():
    kb = Keyboard()
    host, _ = configured(kb)
    kb.key_down("ctrl")
    kb.key_down("alt")
    kb.key_down("delete")
    assert host.read(1, 8) == bytes([0x01, 0, 0, 0, 0, 0, 0, 0])
    assert host.read(1, 8) == bytes([0x05, 0, 0, 0, 0, 0, 0, 0])
    assert host.read(1, 8) == bytes([0x05, 0, 0x4C, 0, 0, 0, 0, 0])
    kb.key_up("delete")
    kb.key_up("alt")
    kb.key_up("left_ctrl")
    assert [host.read(1, 8)[0] for _ in range(3)] == [0x05, 0x01, 0x00]
    for key in "abcdefg":
        kb.key_down(key)
    reports = [host.read(1, 8) for _ in range(7)]
    assert reports[5] == bytes([0, 0, 4, 5, 6, 7, 8, 9])
    assert reports[6] == bytes([0, 0] + [1] * 6)          # ErrorRollOver with seven keys down
    kb.key_up("g")
    assert host.read(1, 8) == bytes([0, 0, 4, 5, 6, 7, 8, 9])
    for key in "abcdef":
        kb.key_up(key)
    assert [host.read(1, 8) for _ in range(6)][-1] == bytes(8)
    kb.tap("f1")
    assert host.read(1, 8)[2:].count(KEYS["f1"]) == 1
    with pytest.raises(ValueError):
        kb.key_down("hyper")
    with pytest.raises(ValueError):
        kb.key_down(0x90)
    with pytest.raises(ValueError):
        kb.type("é")


def test_keyboard_leds_and_boot_protocol():
    kb = Keyboard(speed=Speed.HIGH)
    host, _ = configured(kb)
    assert kb.leds == Leds(0)
    host.control_out(0x21, SET_REPORT, 0x0200, 0, bytes([Leds.CAPS_LOCK | Leds.NUM_LOCK]))
    assert kb.leds == Leds.CAPS_LOCK | Leds.NUM_LOCK
    assert host.control_in(0xA1, GET_REPORT, 0x0200, 0, 1) == b"\x03"
    assert host.control(0x21, SET_REPORT, 0x0300, 0, data=b"\x01").status == Status.STALL
    # Boot protocol: the same 8-byte report.
    host.control_out(0x21, SET_PROTOCOL, 0)
    kb.type("a")
    assert host.read(1, 8) == bytes([0, 0, 4, 0, 0, 0, 0, 0])
    assert host.control_in(0xA1, GET_IDLE, 0, 0, 1) == bytes([125])   # 500 ms boot default
    kb.bus_reset()
    assert kb.leds == Leds(0)
    # Boot keyboards also run at low speed: 8-byte EP0 and interrupt packets.
    low = Keyboard(speed=Speed.LOW)
    lhost, _ = configured(low)
    assert lhost.get_descriptor(DescriptorType.DEVICE, length=18)[7] == 8
    low.type("x")
    assert lhost.read(1, 8)[2] == KEYS["x"]


def test_hid_request_numbers():
    assert [int(r) for r in HidRequest] == [1, 2, 3, 9, 10, 11]
