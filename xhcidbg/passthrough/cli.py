"""`xhcidbg devices`: the host's USB devices as a tree, and whether each can be attached.

    xhcidbg devices                 a tree: bus, port path, address, speed, IDs, names, drivers
    xhcidbg devices --json          the same for scripts
    xhcidbg devices --usbip HOST    what a USB/IP server exports (attach: usbip://HOST/BUSID)
"""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console as RichConsole
from rich.text import Text
from rich.tree import Tree

from .host import HostDevice, SelectionError, host_devices
from .library import LibusbMissing

EXAMPLES = """examples:
  xhcidbg devices
  xhcidbg devices --json | jq '.[] | select(.vid == 1317)'
  xhcidbg vm --attach 0525:a4a0                 pass the Gadget Zero through
  xhcidbg vm --attach bus=1,devaddr=5,persist   again whenever it comes back
  xhcidbg vm --attach 1-2.3,force               take it from its kernel driver
  xhcidbg devices --usbip 10.0.0.5              what that USB/IP server exports
  xhcidbg vm --attach usbip://10.0.0.5/1-1.2,persist   import one of them
"""


def add_devices_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("devices", help="list the host's USB devices (for --attach)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="The host's USB devices as libusb and sysfs see them: "
                                   "where each is, what it is, which kernel driver has each "
                                   "interface, and whether xhcidbg can attach it.",
                       epilog=EXAMPLES)
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p.add_argument("--usbip", metavar="HOST[:PORT]",
                   help="list what the USB/IP server there exports (port 3240 by default)")
    p.set_defaults(func=run_devices)
    return p


def state(dev: HostDevice) -> tuple[str, str]:
    """(what --attach would meet, its colour)."""
    if dev.root_hub:
        return "root hub", "dim"
    if dev.access != "ok":
        return dev.access, "red"
    if dev.drivers:
        return f"bound to {', '.join(dev.drivers)}: attach with `force`", "yellow"
    return "free: can be attached", "green"


def tree(devices: list[HostDevice]) -> Tree:
    root = Tree(Text("host USB", style="bold"))
    nodes: dict[tuple[int, tuple[int, ...]], Tree] = {}
    for dev in devices:
        parent = nodes.get((dev.bus, dev.ports[:-1])) if dev.ports else None
        what, colour = state(dev)
        label = Text()
        label.append(f"{dev.path:<10}", style="bold cyan")
        label.append(f" {dev.id} ")
        label.append(dev.speed.label if dev.speed else "unknown speed", style="magenta")
        label.append(f"  addr {dev.address}  ")
        label.append(" ".join(p for p in (dev.manufacturer, dev.product) if p) or "(no name)")
        if dev.serial:
            label.append(f"  serial {dev.serial}", style="dim")
        label.append(f"  [{what}]", style=colour)
        node = (parent or root).add(label)
        for i in dev.interfaces:
            node.add(Text(f"interface {i.number} class {i.class_code:#04x}: "
                          f"{i.driver or 'no driver'}", style="dim"))
        nodes[(dev.bus, dev.ports)] = node
    return root


def run_remote(server: str, as_json: bool) -> int:
    import asyncio

    from ..usbip.client import UsbipError, list_exported, parse_server
    try:
        host, port = parse_server(server)
        exported = asyncio.run(list_exported(host, port))
    except (ValueError, UsbipError) as e:
        print(f"xhcidbg: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps([d.data() for d in exported], indent=2))
        return 0
    out = RichConsole()
    if not exported:
        out.print(f"{server} exports no devices (bind one there: usbip bind -b BUSID)")
        return 0
    root = Tree(Text(f"usbip://{host}:{port}", style="bold"))
    for d in exported:
        data = d.data()
        node = root.add(Text(f"{data['busid']}  {data['id']} {data['speed']}  "
                             f"(attach usbip://{host}:{port}/{data['busid']})"))
        for cls, sub, proto in d.interfaces:
            node.add(Text(f"interface class {cls:02x}/{sub:02x}/{proto:02x}", style="dim"))
    out.print(root)
    return 0


def run_devices(args: argparse.Namespace) -> int:
    if args.usbip:
        return run_remote(args.usbip, args.json)
    try:
        devices = host_devices()
    except (LibusbMissing, SelectionError) as e:
        print(f"xhcidbg: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([d.data() for d in devices], indent=2))
        return 0
    out = RichConsole()
    if not devices:
        out.print("no USB devices on this host (libusb sees no bus: no USB controller, or "
                  "/dev/bus/usb is not there)")
        return 0
    out.print(tree(devices))
    return 0
