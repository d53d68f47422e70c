"""CLI: lresnet train, demo, bench train.

``lresnet train``'s flags are generated from the training config schema
(:class:`lresnet.train.config.TrainConfig`): one flag per config field, grouped in help
panels. The command is built when it is invoked, so the other commands of the CLI start
without importing the training stack.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from lresnet.core.errors import InputError

TRAIN_HELP = ("Train a backbone + margin head on shards. Distributed: launch under torchrun "
              "(one process per device). Every option can also be set in a --config file.")

# Flags that are not config fields: they choose how the command runs or spell a field another way.
_CLI_PARAMETERS = [
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, "--config", help="TOML, YAML or JSON file of options (the keys of config.json); flags override it.")),
    inspect.Parameter("net_mode", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Option(
        None, "--net-mode", rich_help_panel="Model", help="The reference's spelling of --net: ir | ir_se "
                                                           "(with --net-depth).")),
    inspect.Parameter("net_depth", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[int], default=typer.Option(
        None, "--net-depth", rich_help_panel="Model", help="With --net-mode: 18, 34, 50, 100, 152, 200 "
                                                            "(default: 100)")),
    inspect.Parameter("json_out", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--json", rich_help_panel="Logging", help="Print the summary as JSON.")),
    inspect.Parameter("no_progress", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--no-progress", rich_help_panel="Logging", help="No progress bar.")),
]


def config_from_flags(flags: dict[str, Any]):
    """The resolved :class:`TrainConfig` of a ``lresnet train`` command line's parsed flags."""
    from lresnet.tools.options import values_from_flags
    from lresnet.train.config import TrainConfig, build_config, net_name

    values = values_from_flags(TrainConfig, flags)
    if flags.get("net_mode"):
        if values.get("model", {}).get("net"):
            raise InputError("--net", f"got both --net {values['model']['net']} and --net-mode "
                                      f"{flags['net_mode']}, expected one")
        values.setdefault("model", {})["net"] = net_name(flags["net_mode"], flags.get("net_depth") or 100)
    elif flags.get("net_depth") is not None:
        raise InputError("--net-depth", "goes with --net-mode ir | ir_se")
    return build_config(values, config_file=flags.get("config"))


def _progress_callback(total_hint: int):
    """A rich progress bar driven by the loop's log records (rank 0 only); returns (callback, stop)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.3g}  {task.fields[ips]:.0f} img/s  "
                   "wait {task.fields[wait]:.0%}"),
        TimeRemainingColumn(), transient=False,
    )
    task = progress.add_task("train", total=total_hint or None, loss=float("nan"), lr=0.0, ips=0.0, wait=0.0)
    progress.start()

    def update(record: dict[str, Any]) -> None:
        progress.update(task, completed=record["step"], total=record["total_steps"], loss=record["loss"],
                        lr=record["lr"], ips=record["images_per_s"], wait=record["data_wait"])

    return update, progress.stop


def _print_result(result, json_out: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    if json_out:
        sys.stdout.write(json.dumps(result.__dict__, indent=2, default=float) + "\n")
        return
    table = Table(title=f"lresnet train: {result.run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("steps", f"{result.start_step} -> {result.steps}")
    table.add_row("final loss", f"{result.final_loss:.4f}")
    table.add_row("skipped steps (non-finite)", str(result.skipped_steps))
    table.add_row("corrupt samples skipped", str(result.corrupt_samples))
    table.add_row("images/s end to end", f"{result.images_per_s:.1f}")
    table.add_row("images/s step only (reference)", f"{result.images_per_s_step:.1f}")
    table.add_row("data wait", f"{result.data_wait_fraction:.1%}")
    for name, res in result.verification.items():
        table.add_row(f"{name} accuracy", f"{res['accuracy']:.4f} ± {res['std']:.4f}")
    Console().print(table)


def run_train(**flags: Any) -> None:
    """``lresnet train`` once its flags are parsed: build the config, train, print the summary."""
    from lresnet.train.loop import TrainingAborted, train

    cfg = config_from_flags(flags)
    is_main = int(os.environ.get("RANK", "0")) == 0
    callback, stop = (None, None)
    if is_main and not flags["no_progress"] and not flags["json_out"]:
        callback, stop = _progress_callback(cfg.schedule.max_steps)
    try:
        result = train(cfg, progress=callback)
    except TrainingAborted as err:
        sys.stderr.write(f"lresnet: error: {err}\n")
        raise typer.Exit(1)
    finally:
        if stop:
            stop()
    if is_main:
        _print_result(result, flags["json_out"])


def train_app() -> typer.Typer:
    """A one-command app whose flags are the training schema's, grouped in help panels."""
    from lresnet.tools.options import schema_parameters
    from lresnet.train.config import TrainConfig

    def command(**flags: Any) -> None:
        run_train(**flags)

    command.__signature__ = inspect.Signature(schema_parameters(TrainConfig) + _CLI_PARAMETERS)  # type: ignore
    command.__doc__ = TRAIN_HELP
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    return app


def train_cmd(ctx: typer.Context) -> None:
    """Train a backbone + margin head on shards (lresnet train --help lists every option)."""
    code = typer.main.get_command(train_app()).main(list(ctx.args), prog_name="lresnet train",
                                                    standalone_mode=False)
    if isinstance(code, int) and code:
        raise typer.Exit(code)


def demo_cmd(
    out: Path = typer.Option(Path("demo"), "--out", help="Work directory (data, shards, run)."),
    identities: int = typer.Option(0, "--identities", help="Training identities (0 = the demo default)."),
    minutes: float = typer.Option(0.0, "--minutes", help="Training time budget (0 = the demo default)."),
    net: str = typer.Option("", "--net", help="Backbone (default: a MobileFaceNet cut to ~17 MMAC)."),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Synthesize identities, convert, train a small backbone on CPU, verify on held-out identities."""
    from rich.console import Console
    from rich.table import Table

    from lresnet.train.demo import DemoSettings, run_demo

    settings = DemoSettings(seed=seed)
    overrides = {k: v for k, v in (("identities", identities), ("minutes", minutes), ("net", net)) if v}
    if overrides:
        settings = settings.replace(**overrides)
    console = Console(stderr=True)
    report = run_demo(out, settings, say=lambda msg: console.print(f"[bold]demo[/]: {msg}"))
    if json_out:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    table = Table(title="lresnet demo: verification on held-out identities (10-fold accuracy)")
    table.add_column("set")
    for col in ("raw pixels", "untrained net", "trained net"):
        table.add_column(col, justify="right")
    table.add_column("error vs pixels", justify="right")
    for name, row in report["sets"].items():
        table.add_row(name, f"{row['raw_pixels']:.4f}", f"{row['untrained']:.4f}", f"{row['trained']:.4f}",
                      f"{row['error_ratio']:.1f}x lower")
    Console().print(table)
    Console().print(f"trained {report['steps']} steps in {report['train_seconds']:.0f} s "
                    f"({report['images_per_s']:.0f} img/s); total {report['total_seconds']:.0f} s")


def bench_train_cmd(
    shards: Optional[str] = typer.Option(None, "--shards", help="Shards to read (default: synthesize "
                                         "and convert a small set first)."),
    net: str = typer.Option("mobilefacenet", "--net"),
    net_option: Optional[list[str]] = typer.Option(None, "--net-option", help="Extra backbone kwarg NAME=JSON."),
    batch_size: int = typer.Option(64, "--batch-size"),
    steps: int = typer.Option(30, "--steps"),
    log_every: int = typer.Option(5, "--log-every", help="Steps per measured window (the first is left out)."),
    workers: int = typer.Option(2, "--workers", help="Loader worker processes."),
    decoder: Optional[str] = typer.Option(None, "--decoder", help="JPEG decoder of the shard source "
                                          "(simplejpeg, nvjpeg, ...; default: the training default)."),
    loader: Optional[str] = typer.Option(None, "--loader", help="Input pipeline of the shard source: native or "
                                         "dali (default: native)."),
    source: Optional[list[str]] = typer.Option(None, "--source", help="What to train from (repeat): shards, "
                                               "memory, synthetic (default: all three)."),
    device: str = typer.Option("cpu", "--device"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Autocast (default: on for cuda and npu)."),
    amp_dtype: str = typer.Option("bf16", "--amp-dtype"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the backbone (its first window, "
                                 "which compiles, is left out)."),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = default)."),
    rounds: int = typer.Option(2, "--rounds", help="Interleaved rounds per source; the best is shown."),
    work: Path = typer.Option(Path("bench-train"), "--work", help="Scratch directory."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Train-step images/s, data wait and peak memory: the real shard pipeline vs the same batches from
    memory vs SyntheticSource."""
    from rich.table import Table

    from lresnet.core.device import device_kind
    from lresnet.tools.options import parse_pairs
    from lresnet.tools.render import out_console
    from lresnet.train.bench import SOURCES, bench_train

    use_amp = amp if amp is not None else device_kind(device) != "cpu"
    rows = bench_train(work, shards=shards, net=net, net_options=parse_pairs(net_option or [], "--net-option"),
                       batch_size=batch_size, steps=steps, workers=workers, device=device,
                       amp_dtype=amp_dtype if use_amp else None, log_every=log_every, threads=threads,
                       rounds=rounds, decoder=decoder, loader=loader, compile=compile,
                       sources=source or SOURCES)
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    precision = f"{amp_dtype} autocast" if use_amp else "fp32"
    table = Table(title=f"lresnet bench train: {net}, batch {batch_size}, {steps} steps, {device}, {precision}"
                        + (", compiled" if compile else ""), caption=f"peak memory: {rows[0]['peak_memory']}")
    for col in ("source", "images/s end to end", "images/s step only", "data wait", "vs memory", "peak MiB"):
        table.add_column(col, justify="right" if col != "source" else "left")
    for row in rows:
        ratio = row["ratio_to_memory"]
        table.add_row(row["source"], f"{row['images_per_s']:.1f}", f"{row['images_per_s_step']:.1f}",
                      f"{row['data_wait']:.1%}", "-" if ratio is None else f"{ratio:.2f}x",
                      f"{row['peak_memory_bytes'] / 2**20:,.0f}")
    out_console().print(table)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to `app` and its benchmarks to `bench`."""
    app.command("train", help=TRAIN_HELP, add_help_option=False,
                context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(train_cmd)
    app.command("demo")(demo_cmd)
    bench.command("train")(bench_train_cmd)
