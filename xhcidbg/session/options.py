"""The console-script options every command that runs a controller takes (`xhcidbg`, `vm`,
`serve`): commands from the command line or standard input instead of the prompt."""
from __future__ import annotations

import argparse


def add_script_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("-c", "--commands", metavar="'CMD; CMD'", action="append",
                   help="run these console commands, print their output, then end the session")
    g.add_argument("--batch", action="store_true",
                   help="read console commands from standard input (plain output, no prompt); "
                        "exit status 1 if one fails")
    g.add_argument("--echo", action="store_true",
                   help="batch: print each command before its output")
    g.add_argument("--width", type=int, help="console output width in columns")
