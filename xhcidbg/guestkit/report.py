"""What the kit tells the user while it fetches, builds and boots.

Everything goes to stderr through one rich console: progress bars on a terminal, one plain line
per step elsewhere (CI logs), so a slow download never looks like a hang.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

console = Console(stderr=True, highlight=False)


class KitError(RuntimeError):
    """A problem the user must fix (offline, missing tool, bad configuration): the message says
    what."""


class OfflineError(KitError):
    """Something the kit needs is neither cached nor downloadable (no network, mirror
    unreachable)."""


def say(text: str) -> None:
    console.print(f"[bold cyan]guestkit[/]: {text}", soft_wrap=True)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


class Transfer:
    """Progress of one download; `advance` takes the bytes just received."""

    def __init__(self, bar: tuple[Progress, TaskID] | None):
        self._bar = bar         # None: no terminal to draw on

    def advance(self, n: int) -> None:
        if self._bar is not None:
            progress, task = self._bar
            progress.advance(task, n)


@contextlib.contextmanager
def transfer(label: str, total: int | None) -> Iterator[Transfer]:
    if console.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            yield Transfer((progress, progress.add_task(label, total=total)))
    else:
        size = f" ({human_size(total)})" if total else ""
        print(f"guestkit: downloading {label}{size}", file=sys.stderr, flush=True)
        yield Transfer(None)
