"""Fault injection on the command line: `--faults FILE`, `--fault-seed N` and `--fault-log FILE`
on every command that runs a controller, and the console's `fault` command words."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from .engine import Expectation, FaultEngine, Injection
from .rules import ACTIONS, KINDS, WHEN_KEYS, RuleError

SCENARIOS = Path(__file__).with_name("scenarios")


def add_fault_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--faults", metavar="FILE", action="append", default=[],
                   help="inject the faults of this scenario file (rules, `seed N`, comments; "
                        "a JSON-lines injection log replays); a shipped scenario by its name: "
                        + ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.faults"))))
    g.add_argument("--fault-seed", metavar="N", type=int,
                   help="the seed probabilities draw from (default: a new one, printed)")
    g.add_argument("--fault-log", metavar="FILE",
                   help="write every injection here as JSON lines (replayable with --faults)")


def scenario_path(name: str) -> Path:
    """A file, or a shipped scenario by name (`stall`, `hung-command.faults`)."""
    p = Path(name)
    if p.exists():
        return p
    shipped = SCENARIOS / (name if name.endswith(".faults") else f"{name}.faults")
    if shipped.exists():
        return shipped
    raise ValueError(f"no scenario file {name!r} (shipped: "
                     f"{', '.join(sorted(q.stem for q in SCENARIOS.glob('*.faults')))})")


def apply_fault_options(engine: FaultEngine, args: argparse.Namespace,
                        say: Callable[[str], None] | None = None) -> None:
    """Load the scenarios the options name into `engine`.  Raises ValueError with
    FILE:LINE:COLUMN for a bad rule."""
    for name in getattr(args, "faults", None) or []:
        path = scenario_path(name)
        try:
            rules = engine.load(path.read_text(), source=str(path))
        except RuleError as e:
            raise ValueError(f"fault scenario: {e}") from None
        if say:
            say(f"faults: {len(rules)} rule{'s' * (len(rules) != 1)} from {path}")
    if getattr(args, "fault_seed", None) is not None:     # the command line beats a file's seed
        engine.reseed(args.fault_seed)
    log_path = getattr(args, "fault_log", None)
    if log_path:
        f = open(log_path, "w")       # noqa: SIM115 -- line-buffered for as long as it runs

        def write(inj: Injection) -> None:
            f.write(inj.json() + "\n")
            f.flush()

        def decided(exp: Expectation) -> None:
            f.write(json.dumps(exp.data(), sort_keys=True) + "\n")
            f.flush()
        engine.listeners.append(write)
        engine.expect_listeners.append(decided)
    if say:
        engine.expect_listeners.append(lambda exp: say(f"faults: {exp.text()}"))
    if engine.rules and say:
        say(f"faults: seed {engine.seed} (the same run again: --fault-seed {engine.seed})")


FAULT_HELP = f"""\
fault add RULE          add a rule: WHERE [KEY=VALUE...] [WHEN...] do ACTION [ARG=V] [and ...]
fault list              the rules, their matches and injections
fault del N|NAME|all    delete rules
fault enable|disable N  switch a rule on or off
fault log [N]           the last N injections (all)
fault load FILE         add a scenario's rules
fault seed [N]          show or set the seed
fault expect            did the guest react as the rules' `expect ...` said?
  where: {', '.join(KINDS)} (and erdp)
  when:  {', '.join(WHEN_KEYS)}
  what:  {', '.join(ACTIONS)}
examples:
  fault add urb ep=0x81 nth=2 do stall
  fault add hung: command type=address nth=1 do withhold
  fault add urb dir=in probability=0.05 times=3 do xact-error
  fault add event type=port nth=1 do drop
  fault add urb ep=0x81 nth=1 do stall expect reset-endpoint then set-tr-dequeue within 1s
  fault add command type=no-op do hse expect hcrst within 5s"""
