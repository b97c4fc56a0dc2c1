"""The streams policy: which UAS settings passthrough keeps from the guest (no VM needed).

The configurations are built from the project's descriptor declarations the way a UAS disk
lays them out: interface 0, alternate 0 Bulk-Only, alternate 1 UAS with four pipes."""
from __future__ import annotations

import struct

from xhcidbg.devices.descriptors import (
    ConfigurationDescriptor,
    EndpointDescriptor,
    InterfaceDescriptor,
    SuperSpeedEndpointCompanionDescriptor,
    parse_descriptors,
)
from xhcidbg.passthrough.uas import BULK_ONLY, UAS, without_uas

PIPE_USAGE = 0x24


def interface(alternate: int, protocol: int, endpoints: list[tuple[int, int]],
              number: int = 0) -> bytes:
    """An interface with bulk endpoints (address, UAS pipe id or 0) and their companions."""
    out = InterfaceDescriptor.build({
        "bInterfaceNumber": number, "bAlternateSetting": alternate,
        "bNumEndpoints": len(endpoints), "bInterfaceClass": 8, "bInterfaceSubclass": 6,
        "bInterfaceProtocol": protocol})
    for address, pipe in endpoints:
        out += EndpointDescriptor.build({"bEndpointAddress": address, "bmAttributes": 2,
                                         "wMaxPacketSize": 1024})
        out += SuperSpeedEndpointCompanionDescriptor.build(
            {"bMaxBurst": 15, "bmAttributes": 5 if pipe in (2, 3, 4) else 0})   # 2**5 streams
        if pipe:
            out += bytes([4, PIPE_USAGE, pipe, 0])
    return out


def configuration(*interfaces: bytes, count: int = 1) -> bytes:
    body = b"".join(interfaces)
    head = ConfigurationDescriptor.build({"wTotalLength": 9 + len(body),
                                          "bNumInterfaces": count, "bConfigurationValue": 1})
    return head + body


BOT = interface(0, BULK_ONLY, [(0x81, 0), (0x02, 0)])
UAS_PIPES = interface(1, UAS, [(0x04, 1), (0x83, 2), (0x85, 3), (0x06, 4)])


def alternates(config: bytes) -> list[tuple[int, int, int]]:
    return [(d.bInterfaceNumber, d.bAlternateSetting, d.bInterfaceProtocol)
            for name, d in parse_descriptors(config) if name == "INTERFACE"]


def test_a_uas_disk_shows_the_guest_its_bulk_only_setting_alone():
    config = configuration(BOT, UAS_PIPES)
    out, hidden = without_uas(config)
    assert hidden == {(0, 1)}
    assert alternates(out) == [(0, 0, BULK_ONLY)]
    assert out == configuration(BOT)                 # wTotalLength follows; nothing else moves
    assert struct.unpack_from("<H", out, 2)[0] == len(out) == 9 + len(BOT)


def test_other_interfaces_and_their_class_descriptors_stay_in_order():
    hid = InterfaceDescriptor.build({"bInterfaceNumber": 1, "bNumEndpoints": 0,
                                     "bInterfaceClass": 3}) + bytes([9, 0x21, 0x11, 1, 0, 1,
                                                                     0x22, 63, 0])
    config = configuration(BOT, UAS_PIPES, hid, count=2)
    out, hidden = without_uas(config)
    assert hidden == {(0, 1)} and out == configuration(BOT, hid, count=2)


def test_a_uas_only_interface_or_uas_as_the_default_setting_is_left_alone():
    uas_only = configuration(interface(0, UAS, [(0x04, 1), (0x83, 2), (0x85, 3), (0x06, 4)]))
    assert without_uas(uas_only) == (uas_only, set())
    uas_first = configuration(interface(0, UAS, [(0x04, 1)]), interface(1, BULK_ONLY,
                                                                        [(0x81, 0)]))
    assert without_uas(uas_first) == (uas_first, set())
    plain = configuration(BOT)
    assert without_uas(plain) == (plain, set())


def test_a_malformed_configuration_comes_back_as_the_device_sent_it():
    config = configuration(BOT, UAS_PIPES)
    for broken in (config[:-3], config[:9] + b"\x00\x04" + config[11:], b"", b"\x09\x04",
                   bytes([3, 2, 0])):
        assert without_uas(broken) == (broken, set())
