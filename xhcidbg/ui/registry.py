"""Console commands, registered the way pwndbg does it: each command is a function with an
argparse parser that carries its help and examples; the registry gives the console its
dispatch, `help` and completion."""
from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

    from .console import Console

# A command: `func(console, args)`, sync or async; its completer gives live argument values.
CommandFunc = Callable[["Console", argparse.Namespace], "Awaitable[None] | None"]
CompleteFunc = Callable[["Console", list[str]], Iterable[str]]
F = TypeVar("F", bound=CommandFunc)


class UsageError(Exception):
    """Bad arguments: the message already says how to call the command."""


class HelpShown(Exception):
    """`-h`: the help text is the message."""


class CommandParser(argparse.ArgumentParser):
    """argparse that reports instead of exiting, for use inside a console."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().rstrip()}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message or "")

    def print_help(self, file: SupportsWrite[str] | None = None) -> NoReturn:
        raise HelpShown(self.format_help())

    def parse(self, argv: list[str]) -> argparse.Namespace:
        try:
            return self.parse_args(argv)
        except argparse.ArgumentError as e:
            raise UsageError(f"{self.prog}: {e}\n{self.format_usage().rstrip()}") from None


@dataclass
class Command:
    name: str
    parser: CommandParser
    func: CommandFunc
    category: str
    aliases: tuple[str, ...] = ()
    complete: CompleteFunc | None = None      # dynamic argument values
    # The rest of the line is the argument, as typed: not split at `;`, quotes kept (`py`).
    raw: bool = False

    @property
    def summary(self) -> str:
        return (self.parser.description or "").strip().splitlines()[0]


@dataclass
class Registry:
    commands: dict[str, Command] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def add(self, cmd: Command) -> None:
        for name in (cmd.name, *cmd.aliases):
            if name in self.commands or name in self.aliases:
                raise ValueError(f"command {name!r} registered twice")
        self.commands[cmd.name] = cmd
        for a in cmd.aliases:
            self.aliases[a] = cmd.name

    def lookup(self, name: str) -> Command | None:
        return self.commands.get(self.aliases.get(name, name))

    def names(self) -> list[str]:
        return sorted([*self.commands, *self.aliases])


REGISTRY = Registry()


def parser(name: str, description: str, examples: str = "", **kwargs: Any) -> CommandParser:
    """A parser for command `name`; `examples` (one per line, `command  # what it does`) go into
    its help."""
    epilog = None
    if examples:
        lines = [ln.strip() for ln in examples.strip().splitlines()]
        epilog = "examples:\n" + "\n".join(f"  {ln}" for ln in lines)
    return CommandParser(prog=name, description=description, epilog=epilog, **kwargs)


def command(p: CommandParser, category: str, aliases: tuple[str, ...] = (),
            complete: CompleteFunc | None = None, raw: bool = False,
            registry: Registry = REGISTRY) -> Callable[[F], F]:
    """Register the decorated `func(console, args)` (sync or async) under `p.prog`.  `raw`:
    the command takes the rest of its line as typed, as its one positional argument."""
    def register(func: F) -> F:
        registry.add(Command(p.prog, p, func, category, tuple(aliases), complete, raw))
        return func
    return register
