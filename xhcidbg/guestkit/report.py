"""What the kit tells the user while it fetches, builds and boots.

Everything goes to stderr through one rich console: progress bars on a terminal, one plain line
per step elsewhere (CI logs), so a slow download never looks like a hang.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

console = Console(stderr=True, highlight=False)


class KitError(RuntimeError):
    """A problem the user must fix (offline, missing tool, bad configuration): the message says what."""


class OfflineError(KitError):
    """Something the kit needs is neither cached nor downloadable (no network, mirror unreachable)."""


def say(text: str) -> None:
    console.print(f"[bold cyan]guestkit[/]: {text}", soft_wrap=True)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


class Transfer:
    """Progress of one download; `advance` takes the bytes just received."""

    def __init__(self, progress: Progress | None, task: int | None):
        self._progress = progress
        self._task = task

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)


@contextlib.contextmanager
def transfer(label: str, total: int | None) -> Iterator[Transfer]:
    if console.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            yield Transfer(progress, progress.add_task(label, total=total))
    else:
        size = f" ({human_size(total)})" if total else ""
        print(f"guestkit: downloading {label}{size}", file=sys.stderr, flush=True)
        yield Transfer(None, None)
