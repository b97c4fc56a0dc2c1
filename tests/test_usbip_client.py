"""The USB/IP client without VMs: the scripted guest on an in-process controller imports a
virtual device that tests/usbip_server.py exports over real TCP, and drives it as a guest
driver would.  (The end-to-end chain with the kernel's usbip-host is in the kit tests.)"""
from __future__ import annotations

import asyncio
import logging

import pytest
from usbip_server import VirtualExport

from xhcidbg.devices.base import Speed, Status
from xhcidbg.devices.loopback import LoopbackDevice
from xhcidbg.session import DeviceChoice
from xhcidbg.ui.world import World, WorldOptions
from xhcidbg.usbip.client import UsbipAddress, UsbipError, list_exported
from xhcidbg.usbip.device import status_of
from xhcidbg.usbip.protocol import Errno


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(check, what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            raise TimeoutError(what)
        await asyncio.sleep(0.01)


class Imported:
    """A world with a tablet-free controller, and a server exporting a loopback device."""

    def __init__(self, **export):
        self.export = VirtualExport(LoopbackDevice(speed=Speed.HIGH, pattern=1), **export)
        self.world = World(WorldOptions(devices=DeviceChoice(tablet=False, keyboard=False)))
        self.said: list[str] = []

    async def __aenter__(self) -> Imported:
        self.port = await self.export.start()
        await self.world.start()
        await self.world.settle(5)
        self.world.say = self.said.append
        return self

    async def __aexit__(self, *exc) -> None:
        await self.world.stop()
        await self.export.stop()

    @property
    def url(self) -> str:
        return f"usbip://127.0.0.1:{self.port}/{self.export.busid}"

    async def attach(self, suffix: str = "") -> int:
        mapper = self.world.port_mapper()
        mapper.say = self.said.append
        mapper.remote.say = self.said.append
        assert mapper.attach(self.url + suffix) is None          # imported in the background
        await until(lambda: bool(mapper.remote.attached), f"the import ({self.said})")
        port = next(iter(mapper.remote.attached))
        await until(lambda: port in self.world.guest_devices, f"enumeration on {port}")
        return port

    async def job(self, what, fn, timeout: float = 30.0):
        job = self.world.guest_job(what, fn)
        assert await self.world.wait_job(job, timeout), what
        if job.error is not None:
            raise job.error
        return job.result


def test_addresses_parse_and_bad_ones_say_what_to_write():
    a = UsbipAddress.parse("usbip://10.0.0.5/1-1.2")
    assert (a.host, a.port, a.busid, str(a)) == ("10.0.0.5", 3240, "1-1.2",
                                                  "usbip://10.0.0.5:3240/1-1.2")
    assert UsbipAddress.parse("usbip://[::1]:4000/3-1").server == "[::1]:4000"
    for bad in ("usbip://host", "usb://h/1-1", "usbip://h:99999/1-1", "usbip://h/" + "1" * 40):
        with pytest.raises(ValueError, match=r"usbip://|port|bus ID"):
            UsbipAddress.parse(bad)


def test_linux_errno_statuses_become_bus_outcomes():
    assert status_of(0) == Status.OK and status_of(-Errno.EREMOTEIO) == Status.OK
    assert status_of(-Errno.EPIPE) == Status.STALL and status_of(-Errno.EOVERFLOW) == Status.BABBLE
    assert status_of(-Errno.ENODEV) == status_of(-Errno.ESHUTDOWN) == Status.NODEV
    for e in (Errno.EPROTO, Errno.EILSEQ, Errno.ETIME, Errno.ETIMEDOUT, 9999):
        assert status_of(-e) == Status.XACT_ERROR


def test_the_device_list_of_a_server():
    async def body():
        export = VirtualExport(LoopbackDevice(speed=Speed.HIGH), busid="3-1")
        port = await export.start()
        try:
            [dev] = await list_exported("127.0.0.1", port)
        finally:
            await export.stop()
        return dev.data()
    d = run(body())
    assert d["busid"] == "3-1" and d["id"] == "0525:a4a0" and d["speed"] == "high"
    assert d["interfaces"] == [[0xFF, 0, 0]]


def test_nobody_listening_says_so():
    with pytest.raises(UsbipError, match=r"cannot reach a USB/IP server at 127\.0\.0\.1:9"):
        run(list_exported("127.0.0.1", 9, timeout=5))


def test_an_imported_device_enumerates_and_moves_checked_bulk_data():
    async def body():
        async with Imported() as t:
            port = await t.attach()
            dev = t.world.guest_devices[port].device
            read = await t.job("in", lambda: dev.endpoint(0x81).submit(length=8192).wait())
            short = await t.job("short", lambda: dev.endpoint(0x81).submit(length=100).wait())
            wrote = await t.job("out", lambda: dev.endpoint(0x01).submit(
                bytes((i % 512) % 63 for i in range(4096))).wait())
            remote = t.world.port_mapper().remote.attached[port].device
            return (port, dev.device_desc.vendor, read.cc, read.actual, bytes(read.data[:512]),
                    short.cc, short.actual, wrote.cc, wrote.actual,
                    t.export.device.pattern_errors, remote.submitted, remote.pending)
    (port, vid, cc, n, first, short_cc, short_n, out_cc, out_n, errors, submitted,
     pending) = run(body())
    assert vid == 0x0525 and port <= 4                           # high speed: a USB 2 port
    assert (cc, n) == (1, 8192) and first == bytes(i % 63 for i in range(512))
    assert (short_cc, short_n) == (1, 100)
    assert (out_cc, out_n, errors) == (1, 4096, 0)
    assert submitted > 5 and pending == 0


def test_interrupt_transfers_go_over_usbip_too():
    async def body():
        async with Imported() as t:
            port = await t.attach()
            dev = t.world.guest_devices[port].device
            ep = dev.endpoint(0x82)                     # the loopback's interrupt IN
            reads = await t.job("interrupt", lambda: [ep.submit(length=64).wait()
                                                      for _ in range(3)])
            return [(r.cc, r.actual, bytes(r.data[:r.actual])) for r in reads], \
                t.export.device.transfers_in
    reads, served = run(body())
    packet = bytes(i % 63 for i in range(64))
    assert all(r == (1, 64, packet) for r in reads), reads
    assert served >= 3


def test_a_transfer_taken_back_is_unlinked_on_the_server():
    async def body():
        async with Imported() as t:
            port = await t.attach()
            dev = t.world.guest_devices[port].device
            # configuration 2 loops OUT back IN: an IN with nothing to loop back waits
            await t.job("loopback", lambda: dev.set_configuration(2))
            ep = dev.endpoint(0x81)
            ep.submit(length=512)
            await asyncio.sleep(0.3)
            await t.job("stop", lambda: ep.stop())
            await until(lambda: t.export.served.unlinks == 1, "the unlink")
            remote = t.world.port_mapper().remote.attached[port].device
            await until(lambda: remote.pending == 0, "the RET_UNLINK")
            status = await t.job("GET_STATUS", lambda: dev.control(0x80, 0, 0, 0, 2))
            return t.export.served.unlinked_in_time, status.cc, port in t.world.guest_devices
    in_time, cc, still = run(body())
    assert in_time == 1                     # RET_UNLINK -ECONNRESET: it had not finished
    assert cc == 1 and still                # and the device goes on


def test_isochronous_in_comes_in_batches_and_each_packet_keeps_its_own_bytes():
    async def body():
        async with Imported() as t:
            port = await t.attach()
            dev = t.world.guest_devices[port].device
            asks = (1024, 100, 1024, 7, 512)

            def stream():
                dev.set_interface(0, 1)
                ep = dev.endpoint(0x83)
                tds = [ep.submit(length=asks[k % len(asks)], isoch={"sia": True})
                       for k in range(40)]
                return [(t.wait().cc, t.actual, bytes(t.data[:t.actual])) for t in tds]
            before = t.export.served.submits
            done = await t.job("stream", stream)
            return done, t.export.served.submits - before, t.export.device.transfers_in
    done, urbs, served = run(body())
    asks = (1024, 100, 1024, 7, 512)
    for k, (cc, actual, data) in enumerate(done):
        want = min(asks[k % len(asks)], 1024)
        assert (cc, actual) == (1, want), (k, cc, actual)
        assert data == bytes((i % 1024) % 63 for i in range(want)), k      # its own bytes
    assert served == 40 and urbs <= 40 // 2, urbs      # several packets to one URB


@pytest.mark.parametrize("misbehave", ["long", "iso", "unknown", "iso-offset"])
def test_a_server_that_breaks_the_protocol_loses_the_device_and_nothing_else(misbehave, caplog):
    async def body():
        async with Imported(misbehave=misbehave) as t:
            port = await t.attach()
            dev = t.world.guest_devices[port].device

            def read():
                if misbehave != "iso-offset":
                    return dev.endpoint(0x81).submit(length=512).wait()
                dev.set_interface(0, 1)                 # an isochronous IN stream
                tds = [dev.endpoint(0x83).submit(length=256, isoch={"sia": True})
                       for _ in range(4)]
                waited = [t.wait() for t in tds]       # every one ends, none hangs
                return waited[0]
            read = await t.job("in", read)
            await until(lambda: port not in t.world.guest_devices, "the device to leave")
            return read.cc, list(t.world.port_mapper().remote.attached), t.said
    with caplog.at_level(logging.ERROR, logger="xhcidbg.usbip"):
        cc, attached, said = run(body())
    assert cc != 1 and attached == []
    assert any("broke the protocol" in r.message for r in caplog.records), caplog.text
    assert any("left port" in s for s in said), said


def test_a_server_going_away_unplugs_the_device_and_persist_brings_it_back():
    async def body():
        async with Imported() as t:
            port = await t.attach(",persist")
            first = t.export.served.imports
            await t.export.stop()
            await until(lambda: port not in t.world.guest_devices, "the device to leave")
            await t.export.start(t.port)                       # the server is back
            mapper = t.world.port_mapper()
            await until(lambda: bool(mapper.remote.attached), "the import again", 30)
            port2 = next(iter(mapper.remote.attached))
            await until(lambda: port2 in t.world.guest_devices, "enumeration again")
            dev = t.world.guest_devices[port2].device
            read = await t.job("in", lambda: dev.endpoint(0x81).submit(length=512).wait())
            mapper.remote.detach(port2)
            await until(lambda: port2 not in t.world.guest_devices, "detach")
            return first, t.export.served.imports, read.cc, t.said
    first, imports, cc, said = run(body(), 90)
    assert (first, imports, cc) == (1, 2, 1), said
    assert any("imported again when the server is back" in s for s in said), said


def test_devices_usbip_lists_a_servers_exports(capsys):
    import json
    import threading

    from xhcidbg.passthrough.cli import run_remote

    loop = asyncio.new_event_loop()
    export = VirtualExport(LoopbackDevice(speed=Speed.SUPER), busid="2-3")
    port = loop.run_until_complete(export.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        assert run_remote(f"127.0.0.1:{port}", as_json=True) == 0
        listed = json.loads(capsys.readouterr().out)
        assert run_remote(f"127.0.0.1:{port}", as_json=False) == 0
        text = capsys.readouterr().out
    finally:
        asyncio.run_coroutine_threadsafe(export.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    assert [(d["busid"], d["id"], d["speed"]) for d in listed] == [("2-3", "0525:a4a0", "super")]
    assert f"attach usbip://127.0.0.1:{port}/2-3" in text


def test_the_tracer_and_the_fault_engine_see_an_imported_device_as_any_other(tmp_path):
    import os
    import shutil
    import subprocess

    capture = tmp_path / "remote.pcapng"

    async def body():
        async with Imported() as t:
            t.world.trace.start(str(capture))
            port = await t.attach()
            dev = t.world.guest_devices[port].device
            assert len(t.world.faults.load(f"urb port={port} ep=0x81 nth=2 do stall")) == 1
            first = await t.job("in", lambda: dev.endpoint(0x81).submit(length=512).wait())
            second = await t.job("in", lambda: dev.endpoint(0x81).submit(length=512).wait())
            t.world.trace.stop()
            return first.cc, second.cc, len(t.world.faults.log)
    first, second, injected = run(body())
    assert (first, second, injected) == (1, 6, 1)          # the second IN stalled, as ruled
    tshark = shutil.which("tshark")
    assert tshark, "tshark is required: apt-get install -y tshark"
    out = subprocess.run(
        [tshark, "-r", str(capture), "-Y", "usb.idVendor == 0x0525", "-T", "fields",
         "-e", "usb.idProduct"], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, HOME=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert "0xa4a0" in out.stdout                     # its descriptors, decoded by Wireshark
    stalls = subprocess.run(
        [tshark, "-r", str(capture), "-Y", "usb.urb_status == -32", "-T", "fields",
         "-e", "usb.endpoint_address"], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, HOME=str(tmp_path)))
    assert "0x81" in stalls.stdout, stalls.stdout


def test_the_console_attaches_lists_and_detaches_an_imported_device():
    import threading

    from xhcidbg.ui import Console

    loop = asyncio.new_event_loop()
    export = VirtualExport(LoopbackDevice(speed=Speed.SUPER), busid="4-2")
    port = loop.run_until_complete(export.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    con = Console(WorldOptions(devices=DeviceChoice(tablet=False, keyboard=False)),
                  width=200).start()
    try:
        attached = con.execute(f"attach usbip://127.0.0.1:{port}/4-2,persist")
        listed = con.execute("attach")
        devices = con.execute("devices")
        ports = [r.port for r in con.world.port_mapper().remote.attached.values()]
        detached = con.execute(f"detach {ports[0]}")
        after = con.execute("attach")
        refused = con.execute("attach usbip://127.0.0.1:9/1-1")
    finally:
        con.close()
        asyncio.run_coroutine_threadsafe(export.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    url = f"usbip://127.0.0.1:{port}/4-2"
    assert ports and ports[0] > 4                             # SuperSpeed: a USB 3 port
    assert f"attached {url} (0525:a4a0, {Speed.SUPER.label}) on port {ports[0]}" in attached
    assert "cannot reach a USB/IP server at 127.0.0.1:9" in refused, refused
    assert f"imported over USB/IP: {url} on port {ports[0]} (persist)" in listed, listed
    assert "usbip 4-2 0525:a4a0" in devices, devices
    assert f"detached {url} from port {ports[0]}" in detached, detached
    assert "imported over USB/IP" not in after and "importing" not in after, after
