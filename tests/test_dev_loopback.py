"""The source/sink and loopback device (Gadget Zero's behaviour)."""
import time

import pytest

from xhcidbg.devices import DirectHost, EpType, LoopbackDevice, Speed, Status, UsbTransfer
from xhcidbg.devices.descriptors import DescriptorType


def mod63(length, max_packet):
    return bytes((i % max_packet) % 63 for i in range(length))


def test_identity_and_configurations():
    dev = LoopbackDevice()
    host = DirectHost(dev)
    enum = host.enumerate()
    assert (enum.device.idVendor, enum.device.idProduct) == (0x0525, 0xA4A0)
    assert enum.device.bNumConfigurations == 2
    second = host.get_descriptor(DescriptorType.CONFIGURATION, 1, 255)
    assert second[5] == 2                                  # bConfigurationValue
    assert dev.mode == "source/sink"
    assert "source/sink" in str(dev)
    with pytest.raises(ValueError):
        LoopbackDevice(pattern=7)


@pytest.mark.parametrize("speed,packet", [(Speed.SUPER, 1024), (Speed.HIGH, 512),
                                          (Speed.FULL, 64)])
def test_source_pattern_and_sink_check(speed, packet):
    dev = LoopbackDevice(speed=speed, pattern=1)
    host = DirectHost(dev)
    host.enumerate()
    for length in (1, 63, packet, 3 * packet + 7, 200_000):
        assert host.read(1, length) == mod63(length, packet)
        assert host.write(1, mod63(length, packet)) == length
    assert dev.pattern_errors == 0
    bad = bytearray(mod63(2 * packet, packet))
    bad[packet + 3] ^= 0xFF
    xfer = host.submit_out(1, bytes(bad))
    assert xfer.status == Status.STALL and dev.pattern_errors == 1
    assert host.submit_out(1, mod63(10, packet)).status == Status.STALL   # halted
    host.clear_halt(0x01)
    assert host.write(1, mod63(10, packet)) == 10
    # Interrupt endpoints: the same pattern at their own packet size.
    int_packet = {Speed.FULL: 64}.get(speed, 1024)
    assert host.read(2, 100) == mod63(100, int_packet)
    assert host.write(2, mod63(100, int_packet)) == 100


def test_zero_pattern_default_and_unchecked_sink():
    dev = LoopbackDevice()
    host = DirectHost(dev)
    host.enumerate()
    assert host.read(1, 5000) == bytes(5000)
    assert host.submit_out(1, b"\x01").status == Status.STALL          # not zeros
    unchecked = LoopbackDevice(pattern=None)
    uhost = DirectHost(unchecked)
    uhost.enumerate()
    assert uhost.write(1, b"anything") == 8 and unchecked.bytes_out == 8


def test_isochronous_in_alternate_setting_one():
    dev = LoopbackDevice(speed=Speed.HIGH, pattern=1)
    host = DirectHost(dev)
    host.enumerate()
    assert host.submit_in(3, 1024).status == Status.XACT_ERROR         # alt 0: no iso
    host.set_interface(0, 1)
    xfer = host.submit_in(3, 3000)
    assert xfer.status == Status.OK and xfer.actual == 1024            # one interval's worth
    assert host.write(3, mod63(1024, 1024)) == 1024


def test_loopback_configuration_echoes():
    dev = LoopbackDevice(speed=Speed.SUPER)
    host = DirectHost(dev)
    host.enumerate(configuration=2)
    assert dev.mode == "loopback"
    waiting = host.submit_in(1, 100)
    assert not waiting.done                                            # nothing looped yet
    host.write(1, b"hello")
    assert waiting.done and waiting.result == b"hello"
    host.write(1, b"abc")
    host.write(1, b"defgh")
    assert host.read(1, 4) == b"abcd"                                  # a byte stream
    assert host.read(1, 100) == b"efgh"
    host.write(2, b"interrupt")
    assert host.read(2, 64) == b"interrupt"
    host.set_interface(0, 1)
    assert host.submit_in(3, 1024).actual == 0                         # iso: empty, no wait
    host.write(3, b"iso")
    assert host.read(3, 1024) == b"iso"
    # The host's OUT buffer may be reused right after completion: the device kept a copy.
    buf = bytearray(b"original")
    xfer = UsbTransfer(0x01, EpType.BULK, len(buf), data=memoryview(buf))
    dev.submit(xfer)
    buf[:] = b"XXXXXXXX"
    assert host.read(1, 64) == b"original"
    # When the loop is full, OUT waits for IN to drain.
    big = bytes(1 << 20)
    for _ in range(4):
        host.write(1, big)
    parked = host.submit_out(1, big)
    assert not parked.done
    assert len(host.read(1, 1 << 20)) == 1 << 20
    assert parked.done and parked.status == Status.OK


def test_vendor_control_buffer():
    host = DirectHost(LoopbackDevice())
    host.enumerate()
    host.control_out(0x40, 0x5B, 0, 0, b"control data")
    assert host.control_in(0xC0, 0x5C, 0, 0, 12) == b"control data"
    assert host.control(0xC0, 0x5C, 0, 0, 5000).status == Status.STALL
    assert host.control(0x40, 0x5B, 1, 0, data=b"x").status == Status.STALL


def test_bulk_in_source_is_essentially_free():
    dev = LoopbackDevice(speed=Speed.SUPER)
    host = DirectHost(dev)
    host.enumerate()
    size = 1 << 20
    xfer = host.submit_in(1, size)
    assert isinstance(xfer.result, memoryview)                         # a slice, not a copy
    n = 2048                                                           # 2 GiB
    start = time.perf_counter()
    for _ in range(n):
        xfer = UsbTransfer(0x81, EpType.BULK, size)
        dev.submit(xfer)
    elapsed = time.perf_counter() - start
    assert xfer.actual == size and dev.bytes_in == (n + 1) * size
    assert n * size / elapsed > 1e9, f"{n * size / elapsed / 1e9:.2f} GB/s"
