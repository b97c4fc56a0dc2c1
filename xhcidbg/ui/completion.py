"""Tab completion for the console: command names, then each command's arguments as its parser
declares them (sub-commands, choices, options), then live values (ports, slots, rings)."""
from __future__ import annotations

import argparse
import contextlib
import shlex
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from .registry import REGISTRY

if TYPE_CHECKING:
    from .console import Console


def _parser_words(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """Candidates for the next word after `words`, from the parser's declaration."""
    out: list[str] = []
    positionals = [a for a in parser._actions if not a.option_strings]
    for a in positionals:
        if isinstance(a, argparse._SubParsersAction):
            if words and words[0] in a.choices:
                return _parser_words(a.choices[words[0]], words[1:])
            return list(a.choices)
    for a in parser._actions:
        out.extend(s for s in a.option_strings if s.startswith("--"))
    taken = [w for w in words if not w.startswith("-")]
    if len(taken) < len(positionals):
        action = positionals[len(taken)]
        if action.choices:
            out = [str(c) for c in action.choices] + out
    return out


class CommandCompleter(Completer):
    def __init__(self, console: Console):
        self.console = console

    def get_completions(self, document: Document,
                        complete_event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        try:
            words = shlex.split(text)
        except ValueError:
            return
        current = "" if text.endswith(" ") or not words else words.pop()
        if ";" in text:
            return
        if not words:
            candidates = REGISTRY.names()
        else:
            cmd = REGISTRY.lookup(words[0])
            if cmd is None:
                return
            candidates = _parser_words(cmd.parser, words[1:])
            if cmd.complete is not None:
                # live values are a convenience; never break typing
                with contextlib.suppress(Exception):
                    candidates = [*cmd.complete(self.console, [*words[1:], current]),
                                  *candidates]
        seen = set()
        for c in candidates:
            if c.lower().startswith(current.lower()) and c not in seen:
                seen.add(c)
                yield Completion(c, start_position=-len(current))
