"""The one progress bar of the long commands (profile, eval, demo, drafts, check-harness, the
model download): rich's bar with the count done, the elapsed time and the time left, or bytes and
speed for a download. Off (`enabled=False`) when the output is JSON or not a terminal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal


class Bar:
    """One task of a shown bar. `advance` takes no argument, so it can be a `progress` callback."""

    def __init__(self, progress: Any, task: Any) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._task, n)

    def update(self, *, completed: float | None = None, description: str | None = None) -> None:
        self._progress.update(self._task, completed=completed, description=description)


@contextmanager
def progress_bar(description: str, total: float, *, completed: float = 0, enabled: bool = True,
                 unit: Literal["items", "bytes"] = "items") -> Iterator[Bar]:
    """A bar of `total` items (or bytes), `completed` of them done already (a resumed run)."""
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

    if unit == "bytes":
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, disable=not enabled) as progress:
        yield Bar(progress, progress.add_task(description, total=total, completed=completed))
