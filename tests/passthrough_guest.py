"""Runs inside the gadget VM (tests/test_passthrough.py starts it there with this machine's
venv Python): the scripted guest on an in-process controller, a session port mapper attaching
real Linux gadgets (dummy_hcd) through libusb, and one scenario per invocation.

    python tests/passthrough_guest.py SCENARIO [ARG...]

Prints progress lines (`@@ step`) the outer test may wait for, then one JSON line of results
(`@@result {...}`).  Nothing here asserts: the outer test reads the results and decides.
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from xhcidbg.session import DeviceChoice
from xhcidbg.ui.world import World, WorldOptions

ZERO = "0525:a4a0"


def say(text: str) -> None:
    print(f"@@ {text}", flush=True)


def mod63(length: int, max_packet: int) -> bytes:
    """Gadget Zero's mod63 pattern: byte i of every packet is i % 63."""
    packet = bytes(i % 63 for i in range(max_packet))
    return (packet * (length // max_packet + 1))[:length]


class Guest:
    """The world, its port mapper, and guest jobs awaited from here."""

    def __init__(self, devices: DeviceChoice | None = None) -> None:
        self.world = World(WorldOptions(
            devices=devices or DeviceChoice(tablet=False, keyboard=False)))

    async def __aenter__(self) -> Guest:
        await self.world.start()
        await self.world.settle(10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.world.stop()

    @property
    def mapper(self):
        return self.world.port_mapper()

    async def job(self, what: str, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        job = self.world.guest_job(what, fn)
        if not await self.world.wait_job(job, timeout):
            raise TimeoutError(f"guest job {what!r} did not finish in {timeout} s")
        if job.error is not None:
            raise job.error
        return job.result

    async def until(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not check():
            if time.monotonic() > end:
                w = self.world
                raise TimeoutError(f"{what} did not happen in {timeout} s; guest errors "
                                   f"{list(w.guest_errors)}, crashed {w.runner.crashed!r}, "
                                   f"ports {[hex(p.portsc) for p in w.controller.ports]}, "
                                   f"jobs {list(w.runner.jobs)} current {w.runner.current}")
            await asyncio.sleep(0.01)

    async def enumerated(self, port: int, timeout: float = 30.0):
        await self.until(lambda: port in self.world.guest_devices, f"enumeration on {port}",
                         timeout)
        return self.world.guest_devices[port].device

    async def gone(self, port: int, timeout: float = 30.0) -> None:
        await self.until(lambda: port not in self.world.guest_devices
                         and port not in self.world.devices, f"port {port} empty", timeout)


def describe(dev) -> dict[str, Any]:
    d = dev.device_desc
    return {"slot": dev.slot, "port": dev.port, "speed": int(dev.speed), "vid": d.vendor,
            "pid": d.product, "product": dev.product, "serial": dev.serial,
            "config": dev.config.value if dev.config else None,
            "endpoints": sorted(e.address for i in dev.config.active_interfaces(dev.alternates)
                                for e in i.endpoints) if dev.config else []}


def bulk_pair(dev) -> tuple[Any, Any]:
    """The (IN, OUT) bulk endpoints of the active setting, as the descriptors say."""
    eps = [e for i in dev.config.active_interfaces(dev.alternates) for e in i.endpoints
           if e.transfer_type == 2]
    ins = [e.address for e in eps if e.is_in]
    outs = [e.address for e in eps if not e.is_in]
    return dev.endpoint(ins[0]), dev.endpoint(outs[0])


# ---- scenarios ---------------------------------------------------------------------------------
async def enumerate_and_bulk(length: str = "65536") -> dict[str, Any]:
    n = int(length)
    async with Guest() as g:
        port = g.mapper.attach(ZERO)
        dev = await g.enumerated(port)
        in_ep, out_ep = bulk_pair(dev)
        sent = mod63(n, out_ep.max_packet)
        wrote = await g.job("bulk out", lambda: out_ep.submit(sent).wait())
        read = await g.job("bulk in", lambda: in_ep.submit(length=n).wait())
        got = bytes(read.data[:read.actual])
        return {"device": describe(dev), "out": [wrote.cc, wrote.actual],
                "in": [read.cc, read.actual], "in_ok": got == mod63(n, in_ep.max_packet),
                "host": g.mapper.attached[port].device.info.data()}


async def stall_and_clear() -> dict[str, Any]:
    """A wrong byte makes SourceSink halt its OUT endpoint (the data is taken, the halt comes
    after): the next OUT gets Stall Error; the guest recovers (Reset Endpoint, Set TR Dequeue,
    CLEAR_FEATURE(ENDPOINT_HALT), which goes through libusb's clear_halt) and OUT goes again."""
    async with Guest() as g:
        port = g.mapper.attach(ZERO)
        dev = await g.enumerated(port)
        ep = bulk_pair(dev)[1]
        # f_sourcesink checks a request when it is full (4096 bytes) or ends short
        good = mod63(4096, ep.max_packet)
        bad = bytearray(good)
        bad[5] ^= 0xFF
        taken = await g.job("bad out", lambda: ep.submit(bytes(bad)).wait())
        stalled = await g.job("next out", lambda: ep.submit(good).wait())
        state = int(ep.state)
        await g.job("recover", lambda: ep.recover(clear_halt=True))
        again = await g.job("good out", lambda: ep.submit(good * 2).wait())
        return {"taken": taken.cc, "stalled": stalled.cc, "state_after_stall": state,
                "again": [again.cc, again.actual]}


def _kernel_resets(devnum: int) -> int:
    """How often the host's kernel says it reset USB device `devnum` (its own log)."""
    import subprocess
    log = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in log.splitlines()
               if "reset" in line and f"USB device number {devnum} using" in line)


async def port_reset() -> dict[str, Any]:
    """The guest resets the port of a device it has addressed and configured, as Linux's
    usb_reset_device does (port reset, Reset Device, Address Device, the configuration again):
    the reset reaches the device through libusb; the resets of the first enumeration did not."""
    async with Guest() as g:
        port = g.mapper.attach(ZERO)
        host = g.mapper.attached[port].device
        devnum = host.info.address
        dev = await g.enumerated(port)
        first = {"forwarded": host.resets, "kernel": _kernel_resets(devnum)}

        def reset() -> list[int]:
            g.world.driver.reset_port(port)
            dev.reset_device().check()
            dev.address()
            dev.set_configuration(1)
            in_ep, out_ep = bulk_pair(dev)
            wrote = out_ep.submit(mod63(8192, out_ep.max_packet)).wait()
            read = in_ep.submit(length=8192).wait()
            return [wrote.cc, wrote.actual, read.cc, read.actual,
                    int(bytes(read.data[:read.actual]) == mod63(8192, in_ep.max_packet))]
        after = await g.job("reset", reset)
        return {"first": first, "forwarded": host.resets, "kernel": _kernel_resets(devnum),
                "after": after, "still": host.info.address == devnum}


async def unplug_mid_transfer() -> dict[str, Any]:
    """A read the gadget never answers (its IN is source... so ask the loopback: no data) is in
    flight when the outer test unbinds the gadget: the guest sees the port empty, the transfer
    completes, nothing hangs."""
    async with Guest() as g:
        port = g.mapper.attach(ZERO)
        dev = await g.enumerated(port)
        ep = bulk_pair(dev)[0]
        results: list[Any] = []

        def reader() -> None:
            while True:                               # stream until the device is gone
                t = ep.submit(length=1 << 16).wait(timeout_ns=30_000_000_000)
                results.append(t.cc)
                if not t.ok:
                    return
                if len(results) == 4:
                    print("@@ streaming", flush=True)

        job = g.world.guest_job("stream", reader)
        await g.until(lambda: job.done or len(results) >= 4, "streaming")
        await g.gone(port, 60)
        await g.until(lambda: job.done, "the reader to end", 30)
        return {"completions": len(results), "last": results[-1] if results else None,
                "mapper_attached": list(g.mapper.attached), "host_open": _open_usbfs()}


async def persist_comes_back() -> dict[str, Any]:
    async with Guest() as g:
        port = g.mapper.attach(f"{ZERO},persist")
        first = describe(await g.enumerated(port))
        say("attached")
        await g.gone(port, 60)
        say("gone")
        await g.until(lambda: bool(g.mapper.attached), "the device to come back", 60)
        port2 = next(iter(g.mapper.attached))
        second = describe(await g.enumerated(port2))
        ep = bulk_pair(g.world.guest_devices[port2].device)[0]
        read = await g.job("bulk in", lambda: ep.submit(length=4096).wait())
        return {"first": first, "second": second, "read": [read.cc, read.actual]}


async def several(count: str, beside: str = "") -> dict[str, Any]:
    """`count` gadgets at once (all Gadget Zero, told apart by bus), each with its own traffic;
    with `beside` = "virtual", next to the virtual tablet, keyboard and loopback device, whose
    bulk IN runs at the same time."""
    n = int(count)
    virtual = beside == "virtual"
    choice = DeviceChoice(tablet=True, keyboard=True, loopback=True) if virtual else None
    async with Guest(choice) as g:
        ports = [g.mapper.attach(f"{ZERO}#{i + 1}") for i in range(n)]
        devs = [await g.enumerated(p) for p in ports]
        others = {}
        if virtual:
            for kind in ("tablet", "keyboard", "loopback"):
                port, _ = g.world.find(kind)
                others[kind] = port
            loop = await g.enumerated(others["loopback"])

        def traffic() -> list[list[int]]:
            pending = []
            for d in devs:
                in_ep, out_ep = bulk_pair(d)
                pending.append(in_ep.submit(length=1 << 15))
                pending.append(out_ep.submit(mod63(1 << 15, out_ep.max_packet)))
            if virtual:
                pending.append(loop.endpoint(0x81).submit(length=1 << 15))
            return [[t.wait().cc, t.actual] for t in pending]
        done = await g.job("traffic", traffic)
        return {"ports": ports, "slots": [d.slot for d in devs],
                "buses": [g.mapper.attached[p].device.info.bus for p in ports], "done": done,
                "virtual": others, "enumerated": sorted(g.world.guest_devices)}


# what the port mapper and python-libusb1 allocate (the scripted guest keeps a log of every
# event it handled, which grows by design and is not what is measured)
PORT_MAPPER_CODE = [tracemalloc.Filter(True, pattern, all_frames=True)
                    for pattern in ("*/xhcidbg/passthrough/*", "*/usb1/*")]


def port_mapper_memory() -> tracemalloc.Snapshot:
    return tracemalloc.take_snapshot().filter_traces(PORT_MAPPER_CODE)


async def cycles(count: str) -> dict[str, Any]:
    """Attach, enumerate, read, detach, `count` times: what is left open afterwards."""
    n = int(count)
    async with Guest() as g:
        def fds() -> int:
            return len(os.listdir("/proc/self/fd"))
        warm = 5
        before_fds, moved = 0, 0
        before = None
        tracemalloc.start(12)
        for i in range(n):
            port = g.mapper.attach(ZERO)
            dev = await g.enumerated(port)
            ep = bulk_pair(dev)[0]
            t = await g.job("read", lambda ep=ep: ep.submit(length=4096).wait())
            moved += t.actual
            g.mapper.detach(port)
            await g.gone(port)
            if i + 1 == warm:
                gc.collect()
                before_fds, before = fds(), port_mapper_memory()
        gc.collect()
        after_fds, after = fds(), port_mapper_memory()
        grown = after.compare_to(before, "traceback") if before is not None else []
        top = [[d.size_diff, d.count_diff, d.traceback.format()[-8:]] for d in grown[:4]]
        before_mem = sum(t.size for t in before.traces) if before is not None else 0
        after_mem = sum(t.size for t in after.traces)
        import usb1

        from xhcidbg.passthrough.device import PassthroughDevice
        kinds = (PassthroughDevice, usb1.USBTransfer, usb1.USBDeviceHandle)
        alive = {k.__name__: sum(isinstance(o, k) for o in gc.get_objects()) for k in kinds}
        return {"cycles": n, "moved": moved, "fds": [before_fds, after_fds], "alive": alive,
                "port_mapper_bytes": [before_mem, after_mem], "pending_transfers": sum(
                    a.device.pending for a in g.mapper.attached.values()),
                "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "top": top}


STICK = "0525:a4a5"
KEYBOARD = "0525:a4ac"
AUDIO = "46f4:0002"          # QEMU's usb-audio, on a qemu-xhci of the gadget VM


async def hid_reports(count: str) -> dict[str, Any]:
    """A HID keyboard gadget: the guest's hub driver enumerates it and polls its interrupt IN
    (as usbhid does); the reports the outer test writes on the gadget side arrive."""
    want = int(count)
    async with Guest() as g:
        path = next(d for d in g.mapper.devices() if d.id == KEYBOARD).path
        before = interface_drivers(path)                 # the host's usbhid has it
        port = g.mapper.attach(f"{KEYBOARD},force")
        dev = await g.enumerated(port)
        kind = g.world.guest_devices[port].kind
        say("attached")

        def reports() -> list[str]:
            return [r.data.hex() for r in g.world.reports if r.data]
        await g.until(lambda: len(reports()) >= want, f"{want} reports", 60)
        got = reports()
        g.mapper.detach(port)
        await g.until(lambda: interface_drivers(path) == before, "usbhid again", 30)
        return {"device": describe(dev), "kind": kind, "reports": got,
                "drivers": [before, interface_drivers(path)]}


async def isochronous_out(packets: str) -> dict[str, Any]:
    """QEMU's usb-audio through libusb: alternate setting 1 of its streaming interface, then
    isochronous OUT TDs, one packet each, as an audio driver streams: full packets, half
    ones and zero-length ones in turn."""
    n = int(packets)
    async with Guest() as g:
        port = g.mapper.attach(AUDIO)
        dev = await g.enumerated(port)
        host = g.mapper.attached[port].device
        counted: list[int] = []

        def stream() -> tuple[list[list[int]], list[int]]:
            dev.set_interface(1, 1)
            [desc] = dev.chosen_config().interface(1, 1).endpoints
            ep = dev.endpoint(desc.address)
            sizes = [(desc.max_packet, desc.max_packet // 2, 0)[i % 3] for i in range(n)]
            counted.append(host.transfers)
            tds = [ep.submit(bytes(size), isoch={"sia": True}) for size in sizes]
            done = [[t.wait().cc, t.actual] for t in tds]
            counted.append(host.transfers)
            dev.set_interface(1, 0)
            return done, sizes
        done, sizes = await g.job("stream", stream)
        return {"device": describe(dev), "done": done, "sizes": sizes,
                "libusb_transfers": counted[1] - counted[0], "per_transfer": host.iso_packets}


async def isochronous_in(count: str, lengths: str) -> dict[str, Any]:
    """An isochronous IN source (the kit's IsoSource on vhci-hcd): alternate setting 1, then
    `count` IN TDs of one packet each, asking for the sizes `lengths` (comma separated) in
    turn; each TD's completion code, length and whether its bytes are the source's packet."""
    from xhcidbg.guestkit.vudc import ISO_SOURCE_IDS, iso_packet
    n, asks = int(count), [int(x) for x in lengths.split(",")]
    async with Guest() as g:
        port = g.mapper.attach("{:04x}:{:04x}".format(*ISO_SOURCE_IDS))
        dev = await g.enumerated(port)
        host = g.mapper.attached[port].device
        counted: list[int] = []

        def stream() -> list[list[int]]:
            dev.set_interface(0, 1)
            ep = dev.endpoint(0x81)
            counted.append(host.transfers)
            tds = [ep.submit(length=asks[k % len(asks)], isoch={"sia": True})
                   for k in range(n)]
            done = []
            for k, t in enumerate(tds):
                t.wait()
                got = bytes(t.data[:t.actual]) if t.data is not None else b""
                done.append([t.cc, t.actual, int(got == iso_packet(k, t.actual))])
            counted.append(host.transfers)
            dev.set_interface(0, 0)
            return done
        done = await g.job("stream", stream, timeout=120)
        return {"device": describe(dev), "done": done,
                "libusb_transfers": counted[1] - counted[0], "per_transfer": host.iso_packets}


async def uas(selection: str) -> dict[str, Any]:
    """A UAS-shaped disk (alt 0 Bulk-Only, alt 1 UAS): the settings the guest reads, the ones
    libusb sees on the host, what passthrough hid, and what selecting alt 1 gets."""
    async with Guest() as g:
        port = g.mapper.attach(selection)
        dev = await g.enumerated(port)
        host = g.mapper.attached[port].device
        on_host = [[s.getNumber(), s.getAlternateSetting(), s.getProtocol()]
                   for i in host.handle.getDevice()[0] for s in i]
        head = await g.job("first 9 bytes", lambda: dev.control(0x80, 6, 0x0200, 0, 9).data)
        total = int.from_bytes(bytes(head[2:4]), "little")
        chosen = await g.job("SET_INTERFACE 1", lambda: dev.control(
            0x01, 11, 1, 0, check=False).cc)
        return {"port": port, "speed": int(dev.speed), "total": total,
                "raw": len(dev.config.raw) if dev.config else None,
                "guest": [[i.number, i.alternate, i.interface_protocol]
                          for i in dev.config.interfaces] if dev.config else [],
                "host": on_host, "hidden": sorted(host.hidden), "set_alt_1": chosen}


def interface_drivers(path: str) -> list[str | None]:
    """The kernel driver of each interface of the device at sysfs `path` (1-1), in order."""
    out = []
    for entry in sorted(os.listdir(f"/sys/bus/usb/devices/{path}")):
        if entry.startswith(f"{path}:"):
            link = f"/sys/bus/usb/devices/{path}/{entry}/driver"
            out.append(os.path.basename(os.readlink(link)) if os.path.islink(link) else None)
    return out


async def kernel_driver(count: str = "3") -> dict[str, Any]:
    """A stick the host's usb-storage has: refused without `force`; with it, taken from the
    driver, read by the guest through its own Bulk-Only client, and given back on detach,
    `count` times."""
    from xhcidbg.guest.storage import MassStorage as Bot
    async with Guest() as g:
        info = next(d for d in g.mapper.devices() if d.id == STICK)
        path = info.path
        refused = ""
        try:
            g.mapper.attach(STICK)
        except PermissionError as e:
            refused = str(e)
        rounds = []
        for _ in range(int(count)):
            before = interface_drivers(path)
            port = g.mapper.attach(f"{STICK},force")
            dev = await g.enumerated(port)
            while_attached = interface_drivers(path)
            disk = Bot(dev)
            capacity = await g.job("capacity", disk.read_capacity)
            block0 = await g.job("read", lambda disk=disk: disk.read(0, 1))
            g.mapper.detach(port)
            await g.gone(port)
            await g.until(lambda b=before: interface_drivers(path) == b, "usb-storage again",
                          30)
            rounds.append({"before": before, "while": while_attached,
                           "after": interface_drivers(path), "capacity": list(capacity),
                           "block0": block0.hex()[:64]})
        return {"refused": refused, "rounds": rounds}


def _open_usbfs() -> list[str]:
    """usbfs nodes this process still has open."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/bus/usb/"):
            out.append(target)
    return out


SCENARIOS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "enumerate-and-bulk": enumerate_and_bulk, "stall-and-clear": stall_and_clear,
    "unplug-mid-transfer": unplug_mid_transfer, "persist": persist_comes_back,
    "several": several, "cycles": cycles, "kernel-driver": kernel_driver,
    "hid": hid_reports, "isochronous-out": isochronous_out, "port-reset": port_reset,
    "isochronous-in": isochronous_in, "uas": uas,
}


def main() -> int:
    name, *args = sys.argv[1:]
    result = asyncio.run(SCENARIOS[name](*args))
    print("@@result " + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
