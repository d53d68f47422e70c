"""CLI: lresnet bench device, the one prepared accelerator check (``tools/device_check.sh`` runs it
after installing the project offline)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lresnet.tools.render import out_console

REPORT_NAME = "device_check.json"


def _names(items: Optional[list[str]]) -> Optional[tuple[str, ...]]:
    """Repeated and comma-separated names as a tuple (None when none were given)."""
    names = tuple(part.strip() for item in items or () for part in item.split(",") if part.strip())
    return names or None


def bench_device_cmd(
    device: str = typer.Option("cuda", "--device", help="cuda[:i], npu[:i] or cpu."),
    quick: bool = typer.Option(False, "--quick", help="Tiny networks and data, few steps, no torch.compile: "
                               "proves the whole check in under a minute on a CPU."),
    stages: Optional[list[str]] = typer.Option(None, "--stage", help="Stages to run (repeat or comma-separate): "
                                               "tests, model, train (default: all)."),
    net: Optional[str] = typer.Option(None, "--net", help="bench model's network (default ir100e)."),
    batch_size: Optional[list[str]] = typer.Option(None, "--batch-size", help="bench model's batch sizes "
                                                   "(repeat or comma-separate; default 128,256)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="Measure bf16 channels_last "
                                           "+ torch.compile in bench model (default: on, off with --quick)."),
    train_net: Optional[list[str]] = typer.Option(None, "--train-net", help="bench train's networks (repeat; "
                                                  "default ir100e, mobilefacenet)."),
    decoder: Optional[list[str]] = typer.Option(None, "--decoder", help="bench train's decoders (repeat; "
                                                "default simplejpeg, plus nvjpeg on cuda)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Loader workers of bench train (default 8)."),
    deadline: Optional[float] = typer.Option(None, "--deadline", help="Seconds for the whole check after the "
                                             "install (default 450; 120 with --quick)."),
    work: Path = typer.Option(Path("/tmp/lresnet-device-check"), "--work", help="Scratch folder (shards, runs)."),
    out: Optional[Path] = typer.Option(None, "--out", envvar="OUT", help=f"Folder for {REPORT_NAME} (default: "
                                       "$OUT when set), rewritten after every unit."),
    install_status: Optional[str] = typer.Option(None, "--install-status", hidden=True),
    install_seconds: Optional[float] = typer.Option(None, "--install-seconds", hidden=True),
    install_detail: Optional[str] = typer.Option(None, "--install-detail", hidden=True),
    install_log: Optional[Path] = typer.Option(None, "--install-log", hidden=True),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of the table."),
) -> None:
    """The one accelerator check: CUDA tests, bench model (MFU, compile) and bench train (decoders), in minutes."""
    from rich.console import Console

    from lresnet.core.files import make_out_dir
    from lresnet.model.bench import parse_batch_sizes
    from lresnet.train.device_check import check_settings, install_record, run_device_check, summary_line

    settings = check_settings(
        device, quick, stages=_names(stages), model_net=net, compile=compile, train_nets=_names(train_net),
        decoders=_names(decoder), workers=workers, deadline_s=deadline,
        batch_sizes=tuple(parse_batch_sizes(batch_size)) if batch_size else None)
    report_path = make_out_dir(out) / REPORT_NAME if out is not None else None

    def write(report: dict) -> None:
        if report_path is not None:
            tmp = report_path.with_name(f".{REPORT_NAME}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, report_path)

    console = Console(stderr=True)
    report = run_device_check(settings, work, install_record(install_status, install_seconds, install_detail,
                                                             install_log),
                              on_update=write, say=lambda msg: console.print(f"[bold]device check[/]: {msg}"))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        out_console().print(summary_table(report))
    typer.echo(f"device check: {summary_line(report)}" + (f"; report in {report_path}" if report_path else ""))


def summary_table(report: dict) -> Table:
    """The short table printed last."""
    env = report["environment"]
    title = (f"lresnet device check: {env.get('device_name') or report['settings']['device']}, torch {env['torch']}"
             + (", --quick" if report["settings"]["quick"] else ""))
    table = Table(title=title)
    for column in ("stage", "what", "images/s", "MFU", "data wait", "peak GiB", "status"):
        table.add_column(column, justify="right" if column in ("images/s", "MFU", "data wait", "peak GiB") else "left")
    for row in report.get("summary", []):
        table.add_row(row["stage"], row["what"],
                      "" if row["images_per_s"] is None else f"{row['images_per_s']:,.0f}",
                      "" if row["mfu"] is None else f"{row['mfu']:.1%}",
                      "" if row["data_wait"] is None else f"{row['data_wait']:.1%}",
                      "" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}", row["status"])
    return table


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's benchmark to `bench`."""
    bench.command("device")(bench_device_cmd)
