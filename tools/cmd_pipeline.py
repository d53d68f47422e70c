"""CLI: lresnet bench pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to `app` and its benchmarks to `bench`."""

    @bench.command("pipeline")
    def bench_pipeline(
        images: int = typer.Option(20000, help="Synthetic images to make and stream (at least one batch)."),
        batch_size: int = typer.Option(128, help="Batch size for the pipeline and the baseline."),
        rounds: int = typer.Option(3, help="Measure every configuration this many times, interleaved; keep the best."),
        work_dir: Optional[Path] = typer.Option(None, help="Where to make the temporary data (default: the system temp dir)."),
    ) -> None:
        """Input images/s per worker process: simplejpeg decode limit (a), this pipeline (b), map-style Dataset (c).

        Also images per CPU-second of the working processes, steadier than the wall clock on a shared machine.
        """
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        from lresnet.core.errors import InputError
        from lresnet.pipeline.bench import run_bench

        if images < batch_size * 2 or batch_size < 1 or rounds < 1:
            raise InputError("--images", f"got {images} images, batch size {batch_size}, {rounds} rounds; "
                             "expected images >= 2 x batch size, batch size >= 1, rounds >= 1")
        console = Console(stderr=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done)

            results = run_bench(images, work_dir=work_dir, batch_size=batch_size, rounds=rounds, progress=progress)
        limit = next(r for r in results if r.name.startswith("(a)"))
        peer = next(r for r in results if r.name.startswith("(c)"))
        table = Table(title=f"input pipeline, {images} synthetic 112x112 JPEGs, batch {batch_size}, "
                            f"best of {rounds} rounds")
        table.add_column("configuration", no_wrap=True)
        table.add_column("img/s per worker", justify="right")
        table.add_column("x (a)", justify="right")
        table.add_column("x (c)", justify="right")
        table.add_column("img per worker CPU-s", justify="right")
        table.add_column("x (a)", justify="right")
        table.add_column("x (c)", justify="right")
        for r in results:
            table.add_row(r.name, f"{r.rate:,.0f}", f"{r.rate / limit.rate:.2f}", f"{r.rate / peer.rate:.2f}",
                          f"{r.cpu_rate:,.0f}", f"{r.cpu_rate / limit.cpu_rate:.2f}",
                          f"{r.cpu_rate / peer.cpu_rate:.2f}")
        out = Console()
        if not out.is_terminal:
            out = Console(width=140)  # a pipe or a log file: do not wrap the rows at 80 columns
        out.print(table)
