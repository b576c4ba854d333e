"""Progress bars with rate and ETA (rich), shared by every long-running loop.

On a terminal the bar redraws in place. Where the console is not a terminal (a pod's log read
with `kubectl logs`, output redirected to a file, CI), a redrawn bar would print nothing until
the end, so the same figures come as plain lines instead: one every `PEG_PROGRESS_EVERY`
seconds (default 30) and one when the loop ends.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

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
        return Text(_rate_text(speed, self.unit) if speed else f"? {self.unit}/s", style="progress.data.speed")


def _rate_text(rate: float, unit: str) -> str:
    """`17.1 passages/s`; below 0.1 a second, per minute (`1.8 items/min`), so slow LLM shards
    do not read as `0.0 items/s`."""
    return f"{rate:,.1f} {unit}/s" if rate >= 0.1 else f"{rate * 60:,.2g} {unit}/min"


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "it") -> Iterator[Callable[..., None]]:
    """Yield `advance(n, status=None)`; shows a bar with count, rate, ETA and the latest status on
    stderr when `enabled`.

    `unit="bytes"` shows sizes and transfer speed (kB, MB) instead of a count and a rate.
    """
    if not enabled:
        yield lambda n, status=None: None
        return
    if not console().is_terminal:
        with _progress_lines(total, description, unit) as advance:
            yield advance
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


def _amount(n: float, unit: str) -> str:
    if unit != "bytes":
        return f"{n:,.0f}"
    for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.1f} {name}"
    return f"{n:.0f} bytes"


@contextmanager
def _progress_lines(total: int, description: str, unit: str) -> Iterator[Callable[..., None]]:
    """`progress_bar` for a console that is not a terminal: a line per interval and at the end,
    e.g. `encode passages 1,200/5,183 23% 17.1 passages/s elapsed 0:01:10 ETA 0:03:52`."""
    every = float(os.environ.get("PEG_PROGRESS_EVERY", "30"))
    started = time.monotonic()
    state = {"done": 0, "status": "", "printed": started, "shown": None}  # shown: (done, status) of the last line

    def line(now: float) -> None:
        elapsed = now - started
        done = state["done"]
        rate = done / elapsed if elapsed > 0 else 0.0
        share = f" {100 * done / total:.0f}%" if total else ""
        speed = f"{_amount(rate, unit)}/s" if unit == "bytes" else _rate_text(rate, unit)
        eta = timedelta(seconds=round((total - done) / rate)) if rate > 0 and total >= done else "?"
        status = f" {state['status']}" if state["status"] else ""
        console().print(
            f"{description} {_amount(done, unit)}/{_amount(total, unit)}{share} {speed} "
            f"elapsed {timedelta(seconds=round(elapsed))} ETA {eta}{status}",
            highlight=False, markup=False,
        )

    def advance(n: int, status: str | None = None) -> None:
        state["done"] += n
        if status is not None:
            state["status"] = status
        now = time.monotonic()
        if now - state["printed"] >= every:
            state["printed"] = now
            line(now)
            state["shown"] = (state["done"], state["status"])

    yield advance
    if state["shown"] != (state["done"], state["status"]):  # the last line already says it
        line(time.monotonic())
