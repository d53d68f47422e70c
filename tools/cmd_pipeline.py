"""CLI: lresnet bench pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lresnet.core.errors import InputError
from lresnet.tools.render import StageProgress, out_console, print_json


def bench_pipeline_command(
    images: int = typer.Option(20000, help="Synthetic images to make and stream (at least one batch)."),
    batch_size: int = typer.Option(128, help="Batch size for the pipeline and the baseline."),
    rounds: int = typer.Option(3, help="Measure every configuration this many times, interleaved; keep the best."),
    work_dir: Optional[Path] = typer.Option(None, help="Where to make the temporary data (default: the system temp dir)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Input images/s per worker process: simplejpeg decode limit (a), this pipeline (b), map-style Dataset (c),
    and DALI's CPU pipeline (d) when NVIDIA DALI is installed.

    Also images per CPU-second of the working processes, steadier than the wall clock on a shared machine.
    """
    from lresnet.pipeline.bench import bench_report, run_bench

    if images < batch_size * 2 or batch_size < 1 or rounds < 1:
        raise InputError("--images", f"got {images} images, batch size {batch_size}, {rounds} rounds; "
                         "expected images >= 2 x batch size, batch size >= 1, rounds >= 1")
    with StageProgress(transient=True) as bar:
        results = run_bench(images, work_dir=work_dir, batch_size=batch_size, rounds=rounds, progress=bar.update)
    report = bench_report(results, images, batch_size, rounds)
    if as_json:
        print_json(report)
        return
    table = Table(title=f"input pipeline, {images} synthetic 112x112 JPEGs, batch {batch_size}, "
                        f"best of {rounds} rounds")
    table.add_column("configuration", no_wrap=True)
    for column in ("img/s per worker", "x (a)", "x (c)", "img per worker CPU-s", "x (a)", "x (c)"):
        table.add_column(column, justify="right")
    for r in report["results"]:
        table.add_row(r["name"], f"{r['rate']:,.0f}", f"{r['rate_vs_limit']:.2f}", f"{r['rate_vs_peer']:.2f}",
                      f"{r['cpu_rate']:,.0f}", f"{r['cpu_rate_vs_limit']:.2f}", f"{r['cpu_rate_vs_peer']:.2f}")
    console = out_console(width=140)  # a pipe or a log file: do not wrap the rows at 80 columns
    console.print(table)
    if "dali_vs_native" in report:
        console.print(f"DALI CPU (d) vs lresnet in-process (b), images per CPU-second: {report['dali_vs_native']:.2f}x")


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to `app` and its benchmarks to `bench`."""
    bench.command("pipeline")(bench_pipeline_command)
