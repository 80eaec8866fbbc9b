"""Progress for every long step (data, features, training, generation).

On a terminal, rich bars. Off a terminal (a cluster job, `nohup`, CI: output to a file), one
plain line when a step starts and one when it ends, with its time, so a log shows progress
instead of nothing for twenty minutes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Under a multi-process launch (torchrun / accelerate launch set RANK) only the main process speaks.
console = Console(stderr=True, quiet=os.environ.get("RANK", "0") != "0")


class ProgressTask:
    """A handle on one step: advance it, and show a status text such as the running loss."""

    def __init__(self, progress: Progress | None = None, task_id: int = 0) -> None:
        self._progress = progress
        self._task_id = task_id
        self.done = 0
        self.status = ""

    def advance(self, amount: int = 1, status: str | None = None) -> None:
        """Move the step on by `amount`; replace the status text when given."""
        self.done += amount
        if status is not None:
            self.status = status
        if self._progress is None:
            return
        if status is None:
            self._progress.advance(self._task_id, amount)
        else:
            self._progress.update(self._task_id, advance=amount, status=status)


def _plain_line(text: str) -> None:
    console.print(escape(text), highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[ProgressTask]:
    """Show progress on `total` units of work while the block runs."""
    if not console.is_terminal:
        start = time.perf_counter()
        _plain_line(f"{description}: started ({total} to do)")
        task = ProgressTask()
        yield task
        status = f", {task.status}" if task.status else ""
        _plain_line(f"{description}: {task.done}/{total} done in {time.perf_counter() - start:.1f} s{status}")
        return
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


def stage_line(stage: str, seconds: float, next_stage: str | None = None) -> None:
    """Off a terminal, one line per finished stage with its time and what comes next."""
    if not console.is_terminal:
        _plain_line(f"== {stage} finished in {seconds:.1f} s" + (f"; next: {next_stage}" if next_stage else ""))
