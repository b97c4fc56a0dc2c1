"""The console's `fault` command: the session's fault rules (xhcidbg.faults) added, listed,
switched and deleted, their injections shown."""
from __future__ import annotations

from argparse import Namespace
from typing import TYPE_CHECKING

from rich.table import Table

from ..faults.cli import FAULT_HELP, scenario_path
from ..faults.rules import RuleError
from .registry import command, parser

if TYPE_CHECKING:
    from .console import Console

p = parser("fault", "Inject faults: rules on what the controller does (see `help fault`).",
           FAULT_HELP.split("examples:\n", 1)[1])
p.add_argument("action", nargs="?", default="list",
               choices=("add", "list", "del", "delete", "enable", "disable", "log", "load",
                        "seed", "expect", "help"))
p.add_argument("words", nargs="*")


_WORDS = ["add", "list", "del", "enable", "disable", "log", "load", "seed", "expect"]


@command(p, "execution", complete=lambda con, w: _WORDS if len(w) <= 1 else [])
def fault(con: Console, args: Namespace) -> None:
    engine = con.session.faults
    a, words = args.action, args.words
    if a == "help":
        con.out.print(FAULT_HELP)
    elif a == "add":
        try:
            rule = engine.add(" ".join(words), source="fault add")
        except RuleError as e:
            raise ValueError(f"{e.reason} (at column {e.column} of the rule)") from None
        con.data(rule.data())
        con.out.print(f"fault #{rule.number}: {rule.definition()}")
    elif a == "list":
        con.data({"seed": engine.seed, "rules": [r.data() for r in engine.rules],
                  "injected": len(engine.log),
                  "expectations": [e.data() for e in engine.expectations]})
        if not engine.rules:
            con.out.print(f"no fault rules (seed {engine.seed}); `fault add ...`, `help fault`")
            return
        t = Table(title=f"fault rules (seed {engine.seed})", show_edge=False)
        for col in ("#", "on", "rule", "matches", "fired"):
            t.add_column(col, justify="right" if col in ("#", "matches", "fired") else "left")
        for r in engine.rules:
            t.add_row(str(r.number), "yes" if r.enabled else "no", r.definition(),
                      str(r.seen), str(r.fired))
        con.out.print(t)
        for exp in engine.expectations:
            con.out.print(exp.text())
    elif a == "expect":
        con.data([exp.data() for exp in engine.expectations])
        for exp in engine.expectations:
            con.out.print(exp.text())
        if not engine.expectations:
            con.out.print("no expectations yet (a rule's `expect ...` starts one when it fires)")
    elif a in ("del", "delete"):
        if not words:
            raise ValueError("fault del N|NAME|all")
        n = sum(engine.delete(None if w == "all" else w) for w in words)
        con.out.print(f"{n} fault rule{'s' * (n != 1)} deleted")
    elif a in ("enable", "disable"):
        for w in words:
            r = engine.set_enabled(w, a == "enable")
            con.out.print(f"fault #{r.number} {a}d")
    elif a == "log":
        recs = engine.log[-int(words[0]):] if words else engine.log
        con.data([inj.__dict__ for inj in recs])
        for inj in recs:
            con.out.print(f"{inj.t_ms:10.3f} ms  {inj.text()}")
        if not recs:
            con.out.print("nothing injected yet")
    elif a == "load":
        for w in words:
            path = scenario_path(w)
            try:
                rules = engine.load(path.read_text(), source=str(path))
            except RuleError as e:
                raise ValueError(str(e)) from None
            con.out.print(f"{len(rules)} rules from {path}")
    elif a == "seed":
        if words:
            engine.reseed(int(words[0], 0))
        con.out.print(f"seed {engine.seed}")
