"""A hostile USB/IP server.  Generated replies after an import: the client's device never
raises, never leaves a transfer hanging, and ends the import with a reason (it reads a real
asyncio stream fed here).  Crafted device lists and import replies over a real socket: each
is refused with what was wrong."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xhcidbg.devices.base import EpType, Status, UsbTransfer
from xhcidbg.usbip.client import UsbipAddress, UsbipError, import_device, list_exported
from xhcidbg.usbip.device import UsbipDevice
from xhcidbg.usbip.protocol import (
    ISO_PACKET,
    RET_SUBMIT,
    RET_UNLINK,
    URB_HEADER,
    Command,
    OpHeader,
    UsbDeviceInfo,
)

INFO = UsbDeviceInfo.parse(UsbDeviceInfo.build({
    "path": "/sys/x", "busid": "1-1", "busnum": 1, "devnum": 2, "speed": 3, "idVendor": 0x0525,
    "idProduct": 0xA4A0, "bcdDevice": 0, "bDeviceClass": 0, "bDeviceSubClass": 0,
    "bDeviceProtocol": 0, "bConfigurationValue": 1, "bNumConfigurations": 1,
    "bNumInterfaces": 1}))


class Sink:
    """The device's writer: what it sends is kept, nothing goes anywhere."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True


def ret_submit(seqnum, status, actual, packets, payload, iso):
    return URB_HEADER.build({"command": Command.RET_SUBMIT, "seqnum": seqnum, "devid": 0,
                             "direction": 0, "ep": 0, "body": RET_SUBMIT.build({
                                 "status": status, "actual_length": actual, "start_frame": 0,
                                 "number_of_packets": packets, "error_count": 0})}) \
        + payload + b"".join(ISO_PACKET.build(p) for p in iso)


replies = st.one_of(
    st.builds(ret_submit, st.integers(0, 12), st.sampled_from([0, -32, -75, -71, -2, 5, -999]),
              st.integers(-5, 5000), st.integers(-2, 4), st.binary(max_size=600),
              st.lists(st.fixed_dictionaries({
                  "offset": st.integers(0, 2000), "length": st.integers(0, 2000),
                  "actual_length": st.integers(0, 2000), "status": st.integers(-80, 0)}),
                  max_size=4)),
    st.builds(lambda seq, status: URB_HEADER.build({
        "command": Command.RET_UNLINK, "seqnum": seq, "devid": 0, "direction": 0, "ep": 0,
        "body": RET_UNLINK.build({"status": status})}), st.integers(0, 12),
        st.sampled_from([0, -104, -2])),
    st.binary(min_size=1, max_size=100),                      # plain garbage
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(replies, max_size=6), st.booleans())
def test_no_reply_breaks_the_client(messages, hang_up):
    async def body():
        reader = asyncio.StreamReader()
        sink = Sink()
        gone: list[str] = []
        dev = UsbipDevice(reader, sink, INFO, on_gone=lambda d, why: gone.append(why)).start()
        xfers = [UsbTransfer(0x81, EpType.BULK, 512), UsbTransfer(0x02, EpType.BULK, 64,
                                                                   data=bytes(64)),
                 UsbTransfer(0, EpType.CONTROL, 18, setup=bytes([0x80, 6, 0, 1, 0, 0, 18, 0])),
                 UsbTransfer(0x83, EpType.ISOCHRONOUS, 256)]
        for x in xfers:
            dev.submit(x)
        dev.cancel(xfers[1])                                   # one unlink in flight
        dev._iso.flush_all()
        for m in messages:
            reader.feed_data(m)
            await asyncio.sleep(0)
        if hang_up:
            reader.feed_eof()
        for _ in range(20):
            await asyncio.sleep(0)
        if not hang_up and dev.ended is None:
            dev.close()                                        # we end it: still no hang
            for _ in range(5):
                await asyncio.sleep(0)
        return dev, xfers, gone, sink
    dev, xfers, gone, sink = asyncio.run(body())
    assert dev.ended is not None and gone == [dev.ended] and sink.closed
    # every transfer the controller still owned was completed; the cancelled one never is
    for x in (xfers[0], xfers[2], xfers[3]):
        assert x.done and x.status in set(Status), x
    assert not xfers[1].done              # taken back: the device never completes it


def _serve_bytes(reply: bytes):
    """A server that answers any request with `reply` and hangs up; its port."""
    async def client(reader, writer):
        await reader.read(8)
        writer.write(reply)
        await writer.drain()
        writer.close()
    return asyncio.start_server(client, "127.0.0.1", 0)


DEVICE = UsbDeviceInfo.build({
    "path": "/sys/x", "busid": "9-9", "busnum": 9, "devnum": 9, "speed": 3, "idVendor": 1,
    "idProduct": 2, "bcdDevice": 0, "bDeviceClass": 0, "bDeviceSubClass": 0,
    "bDeviceProtocol": 0, "bConfigurationValue": 1, "bNumConfigurations": 1,
    "bNumInterfaces": 40})


def op(code: int, status: int = 0, version: int = 0x0111) -> bytes:
    return OpHeader.build({"version": version, "code": code, "status": status})


@pytest.mark.parametrize("reply, says", [
    (op(0x0005) + (5000).to_bytes(4, "big"), "exports 5000 devices: not believed"),
    (op(0x0005) + (1).to_bytes(4, "big") + DEVICE, "40 interfaces"),
    (op(0x0005, version=0x0106), "speaks USB/IP 0x0106"),
    (op(0x0003), "answered with operation 0x0003"),
    (op(0x0005) + (2).to_bytes(4, "big") + DEVICE[:100], "closed the connection in the middle"),
])
def test_a_device_list_that_does_not_add_up_is_refused_with_the_reason(reply, says):
    async def body():
        server = await _serve_bytes(reply)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(UsbipError, match=says):
                await list_exported("127.0.0.1", port, timeout=5)
        finally:
            server.close()
    asyncio.run(body())


@pytest.mark.parametrize("reply, says", [
    (op(0x0003, status=1), "refused the import"),
    (op(0x0003) + DEVICE, "imported '9-9' instead"),
    (op(0x0003) + DEVICE[:40], "closed the connection in the middle"),
])
def test_an_import_reply_that_does_not_add_up_is_refused_with_the_reason(reply, says):
    async def body():
        server = await _serve_bytes(reply)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(UsbipError, match=says):
                await import_device(UsbipAddress("127.0.0.1", port, "1-1"), timeout=5)
        finally:
            server.close()
    asyncio.run(body())
