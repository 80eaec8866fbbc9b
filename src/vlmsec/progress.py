"""Rich progress bars for every long step (data, features, training, generation)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Under a multi-process launch (torchrun / accelerate launch set RANK) only the main process speaks.
console = Console(stderr=True, quiet=os.environ.get("RANK", "0") != "0")


class ProgressTask:
    """A handle on one bar: advance it, and show a status text such as the running loss."""

    def __init__(self, progress: Progress, task_id: int) -> None:
        self._progress = progress
        self._task_id = task_id

    def advance(self, amount: int = 1, status: str | None = None) -> None:
        """Move the bar on by `amount`; replace the status text when given."""
        if status is None:
            self._progress.advance(self._task_id, amount)
        else:
            self._progress.update(self._task_id, advance=amount, status=status)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[ProgressTask]:
    """Show a bar for `total` units of work while the block runs."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    ) as progress:
        yield ProgressTask(progress, progress.add_task(description, total=total, status=""))
