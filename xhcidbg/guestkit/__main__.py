"""python -m xhcidbg.guestkit fetch | shell: fetch the guest kit, or boot a guest and use its
shell."""
from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time

from . import ensure_initramfs, ensure_kernel, ensure_qemu
from .kernel import fetch_kernel
from .qemu import build_private_qemu
from .report import KitError, console
from .usbip import build_usbip_tools, ensure_usbip_tools


def fetch(refresh: bool) -> None:
    started = time.monotonic()
    if refresh:
        build_private_qemu()
        fetch_kernel()
        build_usbip_tools()
    qemu = ensure_qemu()
    kernel = ensure_kernel()
    initrd = ensure_initramfs()
    usbip = ensure_usbip_tools()
    where = f"private prefix {qemu.prefix}" if qemu.prefix else qemu.argv_prefix[0]
    console.print(f"QEMU {qemu.version}: {where}\nkernel: {kernel}\ninitramfs: {initrd}\n"
                  f"USB/IP tools {usbip.version}: {usbip.prefix}\n"
                  f"(ready in {time.monotonic() - started:.1f} s)", soft_wrap=True)


async def shell(qemu_args: list[str], commands: list[str], host_root: bool = False) -> int:
    from .launch import Vm
    vm = await Vm.start(extra_args=qemu_args, host_root=host_root)
    run = vm.host.run if host_root else vm.console.run
    try:
        if commands:
            status = 0
            for command in commands:
                result = await run(command, timeout=600)
                sys.stdout.write(result.output)
                status = result.status
            return status
        console.print("guest shell ready; end with Ctrl-D", soft_wrap=True)
        while True:
            try:
                line = await asyncio.to_thread(input, "guest# ")
            except EOFError:
                return 0
            if line.strip():
                result = await run(line, timeout=600)
                sys.stdout.write(result.output)
                if not result.ok:
                    console.print(f"[yellow](status {result.status})[/]")
    finally:
        await vm.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xhcidbg.guestkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch",
                             help="download and build QEMU, the guest kernel and initramfs,"
                                  " and the guest's USB/IP tools")
    p_fetch.add_argument("--refresh", action="store_true",
                         help="fetch the newest packages even if a kit is cached")
    p_shell = sub.add_parser("shell", help="boot the guest and run commands in its shell")
    p_shell.add_argument("-c", "--command", action="append", default=[],
                         help="run this command and exit (repeatable); interactive without")
    p_shell.add_argument("--qemu", default="", help="extra QEMU options, e.g. '-device qemu-xhci'")
    p_shell.add_argument("--host-root", action="store_true",
                         help="mount this machine's / in the guest and run the commands"
                              " chrooted there (this project's venv included)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            fetch(args.refresh)
            return 0
        return asyncio.run(shell(shlex.split(args.qemu), args.command, args.host_root))
    except KitError as e:
        console.print(f"[red]error:[/] {e}", soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
