"""How the CLI shows results: JSON on stdout, rich tables, one progress bar style.

Shared by the ``tools/cmd_*.py`` modules, so every command prints the same way.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, Optional, Tuple

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text


def print_json(doc: Any) -> None:
    """``doc`` as indented JSON on stdout (what ``--json`` prints)."""
    typer.echo(json.dumps(doc, indent=2))


def out_console(width: int = 120) -> Console:
    """The stdout console; a pipe or a log file gets ``width`` columns instead of wrapping at 80."""
    console = Console()
    return console if console.is_terminal else Console(width=width)


def key_value_table(title: str, rows: Iterable[Tuple[str, Any]]) -> Table:
    """A two-column table without a header: what, value."""
    table = Table(title=title, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, str(value))
    return table


class _RateColumn(ProgressColumn):
    """Items per second of a task."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- img/s" if speed is None else f"{speed:,.0f} img/s", style="progress.data.speed")


class StageProgress:
    """A progress bar with one task per stage, drawn on stderr only when it is a terminal (logs and
    pipes stay clean). It starts on the first update, so an error before any work prints only its
    one line. Use as a context manager; :meth:`advance` and :meth:`update` are the callbacks the
    library functions take."""

    def __init__(self, rate: bool = False, transient: bool = False):
        console = Console(stderr=True)
        columns = [TextColumn("[bold]{task.description:>12}"), BarColumn(), MofNCompleteColumn()]
        if rate:
            columns += [_RateColumn(), TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn()]
        else:
            columns += [TimeElapsedColumn(), TimeRemainingColumn()]
        self._bar = Progress(*columns, console=console, transient=transient, disable=not console.is_terminal)
        self._tasks: Dict[str, TaskID] = {}

    def _task(self, stage: str, total: Optional[int]) -> TaskID:
        if not self._tasks:
            self._bar.start()
        if stage not in self._tasks:
            self._tasks[stage] = self._bar.add_task(stage, total=total)
        return self._tasks[stage]

    def advance(self, stage: str, advance: int, total: Optional[int]) -> None:
        """``advance`` more items of ``stage`` are done."""
        self._bar.update(self._task(stage, total), advance=advance, total=total)

    def update(self, stage: str, done: int, total: Optional[int]) -> None:
        """``done`` items of ``stage`` are done."""
        self._bar.update(self._task(stage, total), completed=done, total=total)

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self._tasks:
            self._bar.stop()
