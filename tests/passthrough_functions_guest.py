"""Runs inside the gadget VM (tests/test_passthrough_functions.py starts it there with this
machine's venv Python): the scripted guest on an in-process controller, with a Loopback or a
serial gadget attached through the port mapper, driven as a guest's own driver would drive it.

    python tests/passthrough_functions_guest.py SCENARIO [ARG...]

Like passthrough_guest.py (whose helpers it uses): progress lines (`@@ step`) the outer test
waits for, then one JSON line of results (`@@result {...}`).  Nothing here asserts.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from passthrough_guest import Guest, describe, interface_drivers, say

from xhcidbg.guest.errors import XhciTimeout

MS = 1_000_000
LOOPBACK = "0525:a4a0"
KINDS = {"gser": "0525:a4a6", "acm": "0525:a4a7"}
# CDC ACM class requests (CDC PSTN 6.3) and the SERIAL_STATE notification (6.5.4)
SET_LINE_CODING, GET_LINE_CODING, SET_CONTROL_LINE_STATE = 0x20, 0x21, 0x22
SERIAL_STATE = 0x20
DCD, DSR = 0x01, 0x02           # bRxCarrier, bTxCarrier of the SERIAL_STATE bitmap
OUT_CLASS_INTERFACE, IN_CLASS_INTERFACE = 0x21, 0xA1
COMM_CLASS, DATA_CLASS = 0x02, 0x0A


def pattern(seed: int, n: int) -> bytes:
    """n bytes no packet boundary can hide a loss, a doubling or a shift in (LCG bytes)."""
    out = bytearray(n)
    x = seed & 0xFFFFFFFF
    for i in range(n):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        out[i] = x >> 16 & 0xFF
    return bytes(out)


def first_difference(a: bytes, b: bytes) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def bulk_endpoints(dev, interface_class: int | None = None) -> tuple[Any, Any]:
    """The (IN, OUT) bulk endpoints of the active setting (of the interface of that class)."""
    eps = [e for i in dev.config.active_interfaces(dev.alternates)
           if interface_class is None or i.interface_class == interface_class
           for e in i.endpoints if e.transfer_type == 2]
    return (dev.endpoint(next(e.address for e in eps if e.is_in)),
            dev.endpoint(next(e.address for e in eps if not e.is_in)))


def finish(td, timeout_ms: int):
    """Wait for `td`; on a timeout take it back (Stop Endpoint) so the ring stays usable."""
    try:
        td.wait(timeout_ms * MS)
    except XhciTimeout:
        td.ep.cancel_all()
    return td


def outcome(td) -> list[Any]:
    """[completion code, bytes moved]; a TD that had to be taken back: ["timeout", bytes]."""
    return [td.cc if td.done and not td.cancelled else "timeout", td.actual]


def interfaces(dev) -> list[list[int]]:
    return [[i.number, i.interface_class, i.interface_subclass, i.interface_protocol]
            for i in dev.config.active_interfaces(dev.alternates)]


def endpoint_types(dev) -> list[list[int]]:
    return sorted([e.address, e.transfer_type, e.max_packet]
                  for i in dev.config.active_interfaces(dev.alternates) for e in i.endpoints)


# ---- loopback ----------------------------------------------------------------------------------
async def loopback(buflen: str, qlen: str) -> dict[str, Any]:
    """f_loopback queues `qlen` OUT requests of `buflen` bytes; an OUT request that completes
    (full, or ended by a short or zero-length packet) is queued IN as it is, with a zero-length
    packet after it when it ended short (`in_req->zero = actual < length`), and goes back to
    OUT once the host has read it.  The cases below write OUT, then read IN with room for more
    than was written, so that what ends the IN transfer shows."""
    size, queue = int(buflen), int(qlen)
    async with Guest() as g:
        path = next(d for d in g.mapper.devices() if d.id == LOOPBACK).path
        drivers = interface_drivers(path)
        port = g.mapper.attach(LOOPBACK)
        dev = await g.enumerated(port)
        in_ep, out_ep = bulk_endpoints(dev)
        mps = in_ep.max_packet
        cases: dict[str, Any] = {}

        def echo(name: str, writes: list[bytes], read: int) -> None:
            # the read goes first, as a driver keeps one queued: with a small qlen the gadget
            # takes no more OUT data than its requests hold until IN has emptied some
            back = in_ep.submit(length=read)
            outs = [finish(out_ep.submit(w), 5000) for w in writes]
            finish(back, 5000)
            sent = b"".join(writes)
            got = bytes(back.data[:back.actual])
            cases[name] = {"out": [outcome(t) for t in outs], "in": outcome(back),
                           "same": got == sent, "differs_at": first_difference(got, sent)}

        def run() -> None:
            # one byte, and a short final packet: the short packet ends both requests
            echo("one byte", [pattern(1, 1)], 1 + size)
            echo("short final packet", [pattern(2, 2 * mps + 100)], 2 * mps + 100 + size)
            # exact multiples of the packet size below buflen: the OUT request completes only
            # on the zero-length packet the guest sends after them, and IN ends on the one
            # f_loopback sends after them
            echo("one packet and a zero-length packet", [pattern(3, mps), b""], mps + size)
            echo("three packets and a zero-length packet", [pattern(4, 3 * mps), b""],
                 3 * mps + size)
            # exactly buflen fills the request: it comes back without a zero-length packet, so
            # the IN read asks for exactly that much
            echo("exactly buflen", [pattern(5, size)], size)
            # several requests' worth, in one OUT TD, read back in one IN TD
            echo("three requests and a short one", [pattern(6, 3 * size + 100)], 4 * size)
            # a packet short of buflen, without a zero-length packet, stays in the OUT
            # request: nothing comes back until more data ends it, then both come back as one
            held = pattern(7, size - mps)
            more = pattern(8, 100)
            first = finish(out_ep.submit(held), 5000)
            back = in_ep.submit(length=2 * size)
            with contextlib.suppress(XhciTimeout):
                back.wait(1000 * MS)
            waiting = not back.done
            tail = finish(out_ep.submit(more), 5000)
            finish(back, 5000)
            got = bytes(back.data[:back.actual])
            cases["a packet short of buflen held until more data"] = {
                "waiting": waiting, "out": [outcome(first), outcome(tail)], "in": outcome(back),
                "same": got == held + more, "differs_at": first_difference(got, held + more)}
            # more than the qlen requests hold: OUT and IN in flight together, the gadget
            # taking OUT only as IN empties its requests
            total = (queue + 4) * size + 7
            stream = pattern(9, total)
            reading = in_ep.submit(length=total + size)
            writing = out_ep.submit(stream)
            finish(writing, 20_000)
            finish(reading, 20_000)
            got = bytes(reading.data[:reading.actual])
            cases["more than the queue holds"] = {
                "out": [outcome(writing)], "in": outcome(reading),
                "same": got == stream, "differs_at": first_difference(got, stream),
                "total": total}
        await g.job("loopback", run, 120)
        return {"device": describe(dev), "drivers": drivers, "max_packet": mps,
                "interfaces": interfaces(dev), "endpoints": endpoint_types(dev),
                "cases": cases, "libusb_transfers": g.mapper.attached[port].device.transfers}


# ---- serial ------------------------------------------------------------------------------------
def line_coding(rate: int, stop: int, parity: int, bits: int) -> bytes:
    return struct.pack("<IBBB", rate, stop, parity, bits)


def notifications(ep, until: int, timeout_s: float) -> list[list[Any]]:
    """Read the notification endpoint (one max-packet TD at a time, as cdc-acm does) until a
    SERIAL_STATE with the state `until` comes, or none for `timeout_s`: [cc, bytes] each."""
    seen: list[list[Any]] = []
    while True:
        t = finish(ep.submit(length=ep.max_packet), int(timeout_s * 1000))
        if t.cancelled:
            return seen
        data = bytes(t.data[:t.actual])
        seen.append([t.cc, data.hex()])
        if not t.ok or (len(data) == 10 and data[1] == SERIAL_STATE and data[8] == until):
            return seen


async def serial(kind: str, out_file: str, in_length: str) -> dict[str, Any]:
    """A serial gadget (`gser`: the generic bulk pair of g_serial; `acm`: CDC ACM) whose
    /dev/ttyGS<N> the outer test holds open in raw mode: the guest writes the bytes of
    `out_file` OUT (in two TDs, the first an exact multiple of the packet size), says `wrote`,
    then reads IN, one max-packet TD at a time as a serial driver does, until `in_length` bytes
    have come (the outer test writes them to the tty).  ACM also: the SERIAL_STATE notification
    of the open tty on the interrupt endpoint, line coding and control line state requests,
    two requests f_acm refuses (a stall on ep0), and, after `read`, the notification of the tty
    closing."""
    want = int(in_length)
    selection = KINDS[kind]
    with open(out_file, "rb") as f:
        sent = f.read()
    async with Guest() as g:
        path = next(d for d in g.mapper.devices() if d.id == selection).path
        drivers = interface_drivers(path)
        refused = None
        try:
            port = g.mapper.attach(selection)
        except PermissionError as e:                  # a host driver has it: take it
            refused = str(e)
            port = g.mapper.attach(f"{selection},force")
        dev = await g.enumerated(port)
        drivers_while = interface_drivers(path)
        in_ep, out_ep = bulk_endpoints(dev, DATA_CLASS if kind == "acm" else None)
        mps = out_ep.max_packet
        result: dict[str, Any] = {"device": describe(dev), "drivers": drivers,
                                  "drivers_while": drivers_while, "refused": refused,
                                  "interfaces": interfaces(dev), "endpoints": endpoint_types(dev),
                                  "kind": g.world.guest_devices[port].kind}
        notify = None
        if kind == "acm":
            comm = next(i for i in dev.config.active_interfaces(dev.alternates)
                        if i.interface_class == COMM_CLASS)
            data_iface = next(i for i in dev.config.active_interfaces(dev.alternates)
                              if i.interface_class == DATA_CLASS)
            notify = dev.endpoint(next(e.address for e in comm.endpoints
                                       if e.is_in and e.transfer_type == 3))
            result["notify_max_packet"] = notify.max_packet

            def control() -> dict[str, Any]:
                def get() -> str:
                    t = dev.control(IN_CLASS_INTERFACE, GET_LINE_CODING, 0, comm.number, 7)
                    return bytes(t.data[:t.actual]).hex()

                def setting(coding: bytes) -> int:
                    return dev.control(OUT_CLASS_INTERFACE, SET_LINE_CODING, 0, comm.number,
                                       coding, check=False).cc
                seen: dict[str, Any] = {"opened": notifications(notify, DCD | DSR, 10),
                                        "initial": get(),
                    "set_115200_8n1": setting(line_coding(115200, 0, 0, 8))}
                seen["after_115200_8n1"] = get()
                seen["set_2400_7e2"] = setting(line_coding(2400, 2, 2, 7))
                seen["after_2400_7e2"] = get()
                seen["dtr_rts"] = dev.control(OUT_CLASS_INTERFACE, SET_CONTROL_LINE_STATE,
                                              0x0003, comm.number, check=False).cc
                # f_acm stalls a request for another interface, and a line coding that is not
                # 7 bytes; ep0 is recovered and the next request goes through
                seen["to_the_data_interface"] = dev.control(
                    OUT_CLASS_INTERFACE, SET_CONTROL_LINE_STATE, 0x0003, data_iface.number,
                    check=False).cc
                seen["six_byte_coding"] = setting(line_coding(9600, 0, 0, 8)[:6])
                seen["after_stalls"] = get()
                return seen
            result["acm"] = await g.job("acm control", control, 60)

        def write() -> list[list[int]]:
            cut = len(sent) // mps * mps if len(sent) % mps else len(sent) - mps
            return [[t.cc, t.actual] for t in
                    (out_ep.submit(part).wait(10_000 * MS) for part in (sent[:cut], sent[cut:]))]
        result["out"] = await g.job("write", write, 60)
        say("wrote")

        def read() -> dict[str, Any]:
            got = bytearray()
            sizes: list[int] = []
            end = time.monotonic() + 60
            while len(got) < want and time.monotonic() < end:
                t = in_ep.submit(length=in_ep.max_packet)
                try:
                    t.wait(30_000 * MS)
                except XhciTimeout:
                    in_ep.cancel_all()
                    break
                if not t.ok:
                    return {"failed": t.cc, "bytes": bytes(got).hex(), "sizes": sizes}
                got += t.data[:t.actual]
                sizes.append(t.actual)
            return {"bytes": bytes(got).hex(), "sizes": sizes}
        result["in"] = await g.job("read", read, 120)
        say("read")
        if notify is not None:
            result["closed"] = await g.job("hang-up", lambda: notifications(notify, 0, 60), 120)
        g.mapper.detach(port)
        await g.gone(port)
        result["drivers_after"] = interface_drivers(path)
        return result


SCENARIOS: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "loopback": loopback, "serial": serial,
}


def main() -> int:
    name, *args = sys.argv[1:]
    result = asyncio.run(SCENARIOS[name](*args))
    print("@@result " + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
