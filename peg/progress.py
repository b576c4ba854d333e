"""Progress bars with rate and ETA (rich), shared by every long-running loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from peg.console import console


class _RateColumn(TextColumn):
    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):  # noqa: D102 - rich API
        from rich.text import Text

        speed = task.finished_speed or task.speed
        if not speed and task.completed and task.elapsed:  # too few updates for rich's estimate: the mean
            speed = task.completed / task.elapsed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"? {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "it") -> Iterator[Callable[..., None]]:
    """Yield `advance(n, status=None)`; shows a bar with count, rate, ETA and the latest status on
    stderr when `enabled`.

    `unit="bytes"` shows sizes and transfer speed (kB, MB) instead of a count and a rate.
    """
    if not enabled:
        yield lambda n, status=None: None
        return
    counts = (DownloadColumn(), TaskProgressColumn(), TransferSpeedColumn()) if unit == "bytes" else (
        MofNCompleteColumn(), TaskProgressColumn(), _RateColumn(unit))
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        *counts,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    # redirect_*=False: other libraries' prints (Ray's worker logs, tqdm) stay out of the console
    with Progress(*columns, transient=False, console=console(), redirect_stdout=False, redirect_stderr=False) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int, status: str | None = None) -> None:
            progress.update(task, advance=n, **({"status": status} if status is not None else {}))

        yield advance
