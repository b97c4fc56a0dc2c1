"""Tab completion for the console.

The first word is a command or an alias.  After it, each command's argparse parser says what
comes next (sub-commands, positional choices, options, an option's value), the controller gives
the live values for arguments named after what they hold (slot, dci, port, interrupter, ring,
ep, trb), arguments that name a file complete file names, and conditions (`break`'s
KEY=VALUE with any of its operators, capture filters) complete their values: TRB type names
after `type=`, completion codes after `cc=`, registers after `reg=`, slots after `slot=`...
A line of `py` completes Python names.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

from ..conditions import parse_cc
from ..devices.base import Status
from ..emu.trb import CC_NAMES, TRB_NAMES
from ..trace import cli as trace_cli
from ..trace.filters import KINDS as TRACE_KINDS
from . import render
from .history import recent_trbs
from .registry import REGISTRY, Command

if TYPE_CHECKING:
    from .console import Console

_PY_WORD = re.compile(r"[\w.]+")       # a Python name or attribute chain
# KEY OP VALUE as breakpoint conditions and capture filters write them
_CONDITION = re.compile(r"([A-Za-z_]\w*)(!=|<=|>=|==|=|<|>)(.*)")
CONDITION_METAVARS = frozenset({"KEY=VALUE", "FILTER"})
JSON_OPTION = "--json"              # every command takes it (the console handles it)
PATH_DESTS = frozenset({"file", "path", "image", "folder", "script", "filename", "directory"})
PATH_METAVARS = frozenset({"FILE", "PATH", "DIR", "IMAGE", "SCRIPT"})
TRANSFER_TYPES = range(1, 9)        # Normal .. No-Op
COMMAND_TYPES = range(9, 26)        # Enable Slot .. Set Extended Property
EVENT_TYPES = range(32, 40)         # Transfer Event .. MFINDEX Wrap Event


# ---- names as conditions take them -----------------------------------------------------------
def _short_names(names: Iterable[str]) -> list[str]:
    """`Address Device Command` -> `address`: each name's first word where no other name
    shares it, else the whole name joined by dashes (`reset-endpoint`, `reset-device`).
    Conditions compare names case- and dash-blind by prefix, so each of these picks its own."""
    full = [n.lower().replace(" - ", " ").split() for n in names]
    firsts = [words[0] for words in full]
    out: dict[str, None] = {}
    for words in full:
        out.setdefault(words[0] if firsts.count(words[0]) == 1 else "-".join(words))
    return list(out)


def _trb_type_names(types: Iterable[int]) -> list[str]:
    def plain(t: int) -> str:            # "Address Device Command" -> "Address Device"
        name = TRB_NAMES[t]
        return name.removesuffix(" Event") if t in EVENT_TYPES else name.removesuffix(" Command")
    return _short_names(plain(t) for t in types if t in TRB_NAMES)


@functools.cache
def type_names(kind: str) -> tuple[str, ...]:
    """What `type=` takes for a breakpoint of `kind`: TRB types of that kind's records."""
    types = {"command": COMMAND_TYPES, "event": EVENT_TYPES,
             "trb": [*TRANSFER_TYPES, *COMMAND_TYPES]}.get(kind)
    if types is None:
        types = [*TRANSFER_TYPES, *COMMAND_TYPES, *EVENT_TYPES]
    return tuple(_trb_type_names(types))


@functools.cache
def cc_names() -> tuple[str, ...]:
    """What `cc=` takes: a name for each completion code (`success`, `stall`, `short-packet`,
    `bandwidth-error` where `bandwidth` would also name Bandwidth Overrun, `stopped`: a whole
    name picks that code alone), or its number where no name picks it alone."""
    out = []
    for cc, name in sorted(CC_NAMES.items()):
        if not cc:
            continue
        full = name.lower().replace(" - ", " ").replace(" ", "-")
        for candidate in (full.removesuffix("-error"), full, str(cc)):
            with contextlib.suppress(ValueError):
                if parse_cc(candidate) == cc:
                    out.append(candidate)
                    break
    return tuple(out)


# ---- live values -----------------------------------------------------------------------------
def _slots(con: Console) -> list[str]:
    return [str(s) for s in sorted(con.controller.slots)]


def _dcis(con: Console, slot: str | None) -> list[str]:
    slots = con.controller.slots
    chosen = ([slots[int(slot)]] if slot is not None and slot.isdigit() and int(slot) in slots
              else list(slots.values()))
    return [str(d) for d in sorted({d for s in chosen for d in s.endpoints})]


def _endpoint_addresses(con: Console) -> list[str]:
    out = {0}
    for s in con.controller.slots.values():
        for dci in s.endpoints:
            if dci > 1:
                out.add(dci // 2 | (0x80 if dci & 1 else 0))
    return [f"{a:#04x}" for a in sorted(out)]


def live_values(con: Console, name: str, given: dict[str, str]) -> list[str]:
    """Values the controller has now for an argument or condition called `name`."""
    c = con.controller
    if name == "slot":
        return _slots(con)
    if name in ("dci", "target"):
        return _dcis(con, given.get("slot"))
    if name == "port":
        return [str(p.number) for p in c.ports]
    if name == "interrupter":
        return [str(ir.index) for ir in render.active_interrupters(c)]
    if name == "ring":
        return render.ring_names(c)
    if name == "ep":
        return _endpoint_addresses(con)
    if name == "trb":
        return recent_trbs(con.activity)
    return []


def condition_values(con: Console, kind: str | None, key: str,
                     given: dict[str, str]) -> list[str] | None:
    """What a `KEY=VALUE` condition takes after `KEY=` (None: nothing known about the key)."""
    key = key.lower()
    if key == "type":
        return list(type_names(kind or ""))
    if key == "cc":
        return list(cc_names())
    if key == "phase":
        return ["submit", "done"]
    if key == "status":
        return [s.name for s in Status]
    if key == "at":
        return ["done", "start"]
    if key == "kind":
        return list(TRACE_KINDS)
    if key == "reg":
        return render.register_names()
    if key == "access":
        return ["read", "write"]
    values = live_values(con, key, given)
    return values or None


# ---- what the parser expects next ------------------------------------------------------------
@dataclass
class Expected:
    """Where a command's words have got to in its parser."""

    parser: argparse.ArgumentParser
    option: argparse.Action | None = None        # an option waiting for its value
    positional: argparse.Action | None = None    # the positional the next word fills
    given: dict[str, str] = field(default_factory=dict)   # dest -> word, so far
    first: str | None = None                      # the first positional word (a kind)


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _open_ended(action: argparse.Action) -> bool:
    return action.nargs in ("*", "+", argparse.REMAINDER)


def expected(parser: argparse.ArgumentParser, words: list[str],
             first: str | None = None) -> Expected:
    """Follow `words` (complete words after the command's name) through `parser`."""
    positionals = [a for a in parser._actions if not a.option_strings]
    options = {s: a for a in parser._actions for s in a.option_strings}
    given: dict[str, str] = {}
    index = 0
    waiting: argparse.Action | None = None
    for i, w in enumerate(words):
        if waiting is not None:
            given[waiting.dest] = w
            waiting = None
            continue
        if w.startswith("-") and w in options:
            if _takes_value(options[w]):
                waiting = options[w]
            continue
        if w.startswith("-") and (w == JSON_OPTION or "=" in w or not w[1:2].isdigit()):
            continue                              # --json, --opt=value, an unknown option
        if index >= len(positionals):
            continue
        action = positionals[index]
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(w)
            if sub is not None:
                found = expected(sub, words[i + 1:], first or w)
                found.given = {**given, **found.given}
                return found
            index += 1
            continue
        given[action.dest] = w
        if first is None:
            first = w
        if not _open_ended(action):
            index += 1
    positional = positionals[index] if index < len(positionals) else None
    return Expected(parser, waiting, positional, given, first)


def is_path(action: argparse.Action | None) -> bool:
    if action is None:
        return False
    metavar = action.metavar if isinstance(action.metavar, str) else ""
    return (action.dest in PATH_DESTS or metavar.upper() in PATH_METAVARS
            or action.type is Path)


def _takes_conditions(action: argparse.Action | None) -> bool:
    """The argument is a list of conditions (`break`'s KEY=VALUE, a capture FILTER)."""
    return action is not None and action.metavar in CONDITION_METAVARS


def _choices(action: argparse.Action) -> list[str]:
    return [str(c) for c in action.choices] if action.choices else []


@functools.cache
def _trace_parser() -> argparse.ArgumentParser:
    """`trace` hands its words to the capture command line: complete against that."""
    top = argparse.ArgumentParser(prog="xhcidbg", add_help=False)
    return trace_cli.add_trace_commands(top.add_subparsers(dest="command"))


def completion_parser(cmd: Command) -> argparse.ArgumentParser:
    return _trace_parser() if cmd.name == "trace" else cmd.parser


# ---- the line ----------------------------------------------------------------------------------
def last_command(text: str) -> str:
    """The command the cursor is in: after the last `;` outside quotes, unless a command that
    takes its line raw (`py`) started before it."""
    start, quote = 0, None
    at_start = True
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            start, at_start = i + 1, True
            continue
        elif at_start and not ch.isspace():
            words = text[i:].split(None, 1)
            cmd = REGISTRY.lookup(words[0]) if words and len(words) > 1 else None
            if cmd is not None and cmd.raw:
                return text[i:]
        if not ch.isspace():
            at_start = False
    return text[start:].lstrip()


def _paths(current: str) -> Iterator[Completion]:
    for c in PathCompleter(expanduser=True).get_completions(
            Document(current, len(current)), CompleteEvent(completion_requested=True)):
        path = current + c.text
        if os.path.isdir(os.path.expanduser(path)) and not path.endswith("/"):
            path += "/"                          # go on into the directory
        yield Completion(path, start_position=-len(current), display=c.display)


class CommandCompleter(Completer):
    def __init__(self, console: Console):
        self.console = console

    def get_completions(self, document: Document,
                        complete_event: CompleteEvent) -> Iterator[Completion]:
        text = last_command(document.text_before_cursor)
        name, _, rest = text.partition(" ")
        cmd = REGISTRY.lookup(name) if rest or text.endswith(" ") else None
        if cmd is not None and cmd.raw:
            yield from self._raw(cmd, rest)
            return
        try:
            words = shlex.split(text)
        except ValueError:
            return
        current = "" if not words or text[-1:].isspace() else words.pop()
        if not words:
            yield from _matching(REGISTRY.names(), current)
            return
        cmd = REGISTRY.lookup(words[0])
        if cmd is None:
            return
        with contextlib.suppress(Exception):      # a convenience: never break typing
            yield from self._arguments(cmd, words[1:], current)

    def _raw(self, cmd: Command, rest: str) -> Iterator[Completion]:
        if cmd.complete is None:
            return
        word = Document(rest).get_word_before_cursor(pattern=_PY_WORD)
        with contextlib.suppress(Exception):
            for c in cmd.complete(self.console, [word]):
                yield Completion(c, start_position=-len(word))

    def _arguments(self, cmd: Command, words: list[str], current: str) -> Iterator[Completion]:
        con = self.console
        state = expected(completion_parser(cmd), words)
        action = state.option or state.positional
        condition = _CONDITION.match(current) if _takes_conditions(action) else None
        if condition is not None:
            key, _, value = condition.groups()
            # conditions given before this one narrow it (`slot=1 dci=` offers slot 1's)
            given = {**state.given, **{m[1].lower(): m[3] for m in map(_CONDITION.match, words)
                                       if m is not None}}
            values = condition_values(con, state.first, key, given)
            if values is not None:
                yield from _matching(values, value)
                return
        if is_path(action):
            yield from _paths(current)
            if state.option is not None:
                return
        candidates: list[str] = []
        if action is not None and not isinstance(action, argparse._SubParsersAction):
            candidates += live_values(con, action.dest, state.given)
            if state.first == "reg" and _open_ended(action):   # `watch reg NAME`
                candidates += render.register_names()
        if cmd.complete is not None and not candidates:
            # the command's own values, where the argument's name says nothing
            candidates += cmd.complete(con, [*words, current])
        if action is not None:
            candidates += _choices(action)
        if state.option is None:
            options = [s for a in state.parser._actions for s in a.option_strings]
            candidates += [s for s in options if s.startswith("--")] + [JSON_OPTION]
            if current.startswith("-") and not current.startswith("--"):
                candidates += [s for s in options if not s.startswith("--")]
        yield from _matching(candidates, current)


def _matching(candidates: Iterable[str], current: str) -> Iterator[Completion]:
    seen: set[str] = set()
    low = current.lower()
    for c in candidates:
        if c.lower().startswith(low) and c not in seen:
            seen.add(c)
            yield Completion(c, start_position=-len(current))


__all__ = ["CommandCompleter", "cc_names", "condition_values", "expected", "last_command",
           "type_names"]
