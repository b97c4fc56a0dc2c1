"""The `xhcidbg` command line.

    xhcidbg                         the console on an in-process guest (tablet, keyboard, storage)
    xhcidbg console [options]       the same, with options
    xhcidbg trace ...               capture, view and summarise pcapng traces
    xhcidbg serve ... / vm ...      serve the controller to QEMU / boot a VM against it
    xhcidbg devices [--json]        the host's USB devices, for --attach

Every command that runs a controller builds the same session (`xhcidbg.session`) and takes the
same device options.  The other sub-commands come from their own packages: each provides a
function `add_<name>_commands(subparsers)` that adds its parsers and sets `func(args) -> int`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from .faults.cli import add_fault_options
from .passthrough.cli import add_devices_command
from .session import add_device_options, device_choice
from .session.options import add_script_options
from .trace.cli import add_trace_commands, add_trace_option
from .trace.cli import run as run_trace
from .vm import add_vm_commands

CONSOLE_EXAMPLES = """examples:
  xhcidbg                                  interactive console, three devices plugged in
  xhcidbg console --storage disk.img       the stick serves disk.img
  xhcidbg console --no-tablet --no-storage just the keyboard
  xhcidbg -c 'ports; tablet move 100 200; reports'
  echo 'pause; tablet move 1 2; step td' | xhcidbg --batch
  xhcidbg console --trace /tmp/usb.pcapng  capture everything from the first MMIO access
"""


def add_console_options(p: argparse.ArgumentParser) -> None:
    add_device_options(p, scratch_stick=True)
    g = p.add_argument_group("running")
    g.add_argument("--no-guest", action="store_true",
                   help="no scripted guest: the controller stays in reset until you drive it")
    add_script_options(g)      # batch is also the default when standard input is no terminal
    add_trace_option(g)
    add_fault_options(p.add_argument_group("faults"))
    g.add_argument("-v", "--verbose", action="store_true", help="log what the controller "
                                                                "refuses")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xhcidbg", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="An xHCI (USB 3) host controller emulator that is also its own debugger.",
        epilog="With no sub-command, `console` runs.\n\n" + CONSOLE_EXAMPLES)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("console", help="the debugger console on an in-process guest (default)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="The debugger console: a controller with a tablet, a "
                                   "keyboard and a storage stick, driven by the built-in "
                                   "scripted guest.", epilog=CONSOLE_EXAMPLES)
    add_console_options(c)
    c.set_defaults(func=run_console)
    add_trace_commands(sub).set_defaults(run_trace=run_trace)
    add_vm_commands(sub)                       # `serve` and `vm`
    add_devices_command(sub)
    return parser


def run_console(args: argparse.Namespace) -> int:
    from .ui.console import Console
    from .ui.world import WorldOptions

    options = WorldOptions(devices=device_choice(args), guest=not args.no_guest,
                           trace=args.trace, trace_filter=args.trace_filter.split(),
                           faults=args)
    batch = args.batch or args.commands or not sys.stdin.isatty()
    try:
        console = Console(options, width=args.width).start()
    except (ValueError, RuntimeError, OSError) as e:
        print(f"xhcidbg: {e}", file=sys.stderr)
        return 2
    try:
        if not batch:
            console.interact()
            return 0
        lines = list(args.commands or [])
        if args.batch or not args.commands:
            lines += sys.stdin.read().splitlines()
        failed = console.run_script(lines, echo=args.echo)
        return 1 if failed else 0
    finally:
        console.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    # `xhcidbg [console options]`: the console is the default sub-command
    if not argv or (argv[0] not in sub.choices and argv[0] not in ("-h", "--help")):
        argv.insert(0, "console")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "verbose", False)
                        else logging.ERROR, format="%(name)s: %(message)s")
    run_trace: Callable[[argparse.Namespace, None], int] | None = getattr(args, "run_trace", None)
    if run_trace is not None:          # `trace ...` outside a session: show, stats, install
        return run_trace(args, None)
    run: Callable[[argparse.Namespace], int] = args.func
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
