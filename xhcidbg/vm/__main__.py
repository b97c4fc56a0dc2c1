"""`python -m xhcidbg.vm serve|vm ...`: the two commands without the rest of the CLI."""
import argparse
import sys
from collections.abc import Callable

from .cli import add_vm_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xhcidbg.vm",
                                     description="xhcidbg's `serve` and `vm` commands")
    add_vm_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.func
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
