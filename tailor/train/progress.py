"""The live progress display: a Rich bar with loss, learning rate, tokens/s and ETA.

A context manager, so the training loop only calls `update`; on non-main processes and when
output is not wanted it does nothing.
"""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self.progress, self.task = progress, task
        self.fields = {"loss": "-", "lr": "-", "tps": "-", "val": ""}

    def update(self, step: int, **fields) -> None:
        if self.progress is None:
            return
        for k, v in fields.items():
            if v is not None:
                self.fields[k] = v
        self.progress.update(self.task, completed=step, **self.fields)

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)


@contextmanager
def progress_bar(total: int, start: int, enabled: bool, console: Console | None = None):
    if not enabled:
        yield _Bar(None, None)
        return
    progress = Progress(
        TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss [cyan]{task.fields[loss]}[/] lr {task.fields[lr]} {task.fields[tps]} tok/s{task.fields[val]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console or Console(stderr=True), transient=False,
    )
    with progress:
        task = progress.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-", val="")
        yield _Bar(progress, task)
