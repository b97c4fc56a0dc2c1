"""The console's `attach` and `detach`: host USB devices on the controller's root ports, at any
time, any number of times (the session's port mapper)."""
from __future__ import annotations

import asyncio
import contextlib
import json
from argparse import Namespace
from typing import TYPE_CHECKING

from ..passthrough.cli import tree
from .registry import UsageError, command, parser

if TYPE_CHECKING:
    from .console import Console

DEVICES = "devices"
IMPORT_WAIT_S = 10.0

p = parser("attach", "Pass a host USB device through to the guest (no argument: list them).",
           """attach                       # the host's devices, and which can be attached
              attach 0525:a4a0             # by VID:PID (#2 for the second of two)
              attach bus=1,devaddr=5 port 2
              attach 1-2.3,persist         # by port path; again whenever it comes back
              attach serial=ABC123,force   # take it from its kernel driver
              attach usbip://10.0.0.5/1-1  # a device another machine exports (USB/IP)""")
p.add_argument("selection", nargs="?", help="bus=B,devaddr=D | VID:PID[#N] | 1-2.3 | serial=S"
                                            " [,persist] [,force] [,depth=N] | "
                                            "usbip://HOST[:PORT]/BUSID [,persist]")
p.add_argument("port", nargs="*", metavar="[port] N",
               help="the root port (default: the first free one of the device's speed)")
p.add_argument("--json", action="store_true", help="the list as JSON")


@command(p, DEVICES)
async def attach(con: Console, args: Namespace) -> None:
    mapper = con.session.port_mapper()
    if args.selection is None:
        devices = mapper.devices()
        if args.json:
            con.out.print_json(json.dumps([d.data() for d in devices]))
        elif not devices:
            con.out.print("the host has no USB devices libusb can see")
        else:
            con.out.print(tree(devices))
        waiting = [s.text for s in mapper.waiting]
        if waiting:
            con.out.print(f"waiting to come back: {', '.join(waiting)}")
        for r in sorted(mapper.remote.attached.values(), key=lambda r: r.port):
            con.out.print(f"imported over USB/IP: {r.address} on port {r.port}"
                          + (" (persist)" if r.persist else ""))
        for address in mapper.remote.importing:
            con.out.print(f"importing over USB/IP: {address}")
        return
    words = [w for w in args.port if w != "port"]
    if len(words) > 1 or (words and not words[0].isdigit()):
        raise UsageError("attach SEL [port N]")
    since = con.activity.seq
    if args.selection.strip().startswith("usbip://"):
        await _import(con, args.selection, int(words[0]) if words else None)
        con.show_activity(since, limit=12)
        return
    number = mapper.attach(args.selection, int(words[0]) if words else None)
    if number is None:
        con.out.print(f"{args.selection}: not on the host now; attached when it comes")
        return
    dev = mapper.attached[number].device
    con.out.print(f"attached {dev.info.label()} ({dev.speed.label}) on port {number}")
    await con.session.settle(3.0)
    con.show_activity(since, limit=12)


async def _import(con: Console, selection: str, port: int | None) -> None:
    """Import a USB/IP device and say how it went (waiting a while for the server)."""
    remote = con.session.port_mapper().remote
    address = remote.attach(selection, port)
    task = remote.importing.get(address)
    if task is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), IMPORT_WAIT_S)
    found = remote.find(str(address))
    if found is not None:
        dev = found.device
        con.out.print(f"attached {address} ({dev.info.idVendor:04x}:{dev.info.idProduct:04x}, "
                      f"{dev.speed.label}) on port {found.port}")
        await con.session.settle(3.0)
    elif address in remote.importing:
        con.out.print(f"{address}: still trying ({remote.failed.get(address, 'no answer yet')})"
                      "; attached when the server answers")
    else:
        con.out.print(f"{address}: {remote.failed.get(address, 'not imported')}")


p = parser("detach", "Give a passed-through device back to the host (by port or selection).",
           """detach 5
              detach 0525:a4a0""")
p.add_argument("what", help="root port number, or the selection it was attached with")


@command(p, DEVICES, complete=lambda con, w: [str(n) for n in (
    con.session.host_usb.attached if con.session.host_usb is not None else ())])
async def detach(con: Console, args: Namespace) -> None:
    since = con.activity.seq
    mapper = con.session.port_mapper()
    if mapper.remote.find(args.what) is not None:
        r = mapper.remote.detach(args.what)
        con.out.print(f"detached {r.address} from port {r.port}")
        await con.session.settle(3.0)
        con.show_activity(since, limit=12)
        return
    port = mapper.find(args.what).port
    info = mapper.detach(args.what)
    con.out.print(f"detached {info.label()} from port {port}: back to the host")
    await con.session.settle(3.0)
    con.show_activity(since, limit=12)
