"""CLI: lresnet train, demo, bench train."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from lresnet.core.errors import InputError


def _parse_options(items: Optional[list[str]], flag: str) -> Optional[dict[str, Any]]:
    """``["widths=[8,16,32,64]", "unit_style=paper"]`` -> dict (values read as JSON, else kept as text)."""
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(flag, f"got {item!r}, expected NAME=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


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
    console = Console()
    table = Table(title=f"lresnet train: {result.run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("steps", f"{result.start_step} -> {result.steps}")
    table.add_row("final loss", f"{result.final_loss:.4f}")
    table.add_row("skipped steps (non-finite)", str(result.skipped_steps))
    table.add_row("images/s end to end", f"{result.images_per_s:.1f}")
    table.add_row("images/s step only (reference)", f"{result.images_per_s_step:.1f}")
    table.add_row("data wait", f"{result.data_wait_fraction:.1%}")
    for name, res in result.verification.items():
        table.add_row(f"{name} accuracy", f"{res['accuracy']:.4f} ± {res['std']:.4f}")
    console.print(table)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to `app` and its benchmarks to `bench`."""

    @app.command("train")
    def train_cmd(
        shards: Optional[str] = typer.Option(None, "--shards", help="Shard dir, manifest.json, brace pattern "
                                             "(train-{000000..000579}.tar), or 'synthetic'."),
        manifest: Optional[str] = typer.Option(None, "--manifest", help="manifest.json giving the sample counts "
                                               "of remote shards (a 'pipe:...{000000..000579}.tar' pattern)."),
        out: Optional[str] = typer.Option(None, "--out", help="Run directory (checkpoints, metrics, config.json)."),
        config: Optional[Path] = typer.Option(None, "--config", help="TOML or YAML file; flags override it."),
        val: Optional[str] = typer.Option(None, "--val", help="Verification sets dir (OUT/val of convert-rec)."),
        val_set: Optional[list[str]] = typer.Option(None, "--val-set", help="Set to verify on (repeat); "
                                                    "default: all in --val."),
        net: Optional[str] = typer.Option(None, "--net", help="Backbone name (ir100e, irse100, ir50, "
                                          "mobilefacenet, ...)."),
        net_mode: Optional[str] = typer.Option(None, "--net-mode", help="Reference style: ir | ir_se "
                                               "(with --net-depth)."),
        net_depth: Optional[int] = typer.Option(None, "--net-depth", help="Reference style: 50 | 100 | 152."),
        net_option: Optional[list[str]] = typer.Option(None, "--net-option", help="Extra backbone kwarg "
                                                       "NAME=JSON (repeat), e.g. widths=[16,32,64,128]."),
        embedding_size: Optional[int] = typer.Option(None, "--embedding-size"),
        dropout: Optional[float] = typer.Option(None, "--dropout"),
        channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last"),
        head: Optional[str] = typer.Option(None, "--head", help="arcface | cosface | combined."),
        margin_s: Optional[float] = typer.Option(None, "--margin-s", help="Scale s (64)."),
        margin_m: Optional[float] = typer.Option(None, "--margin-m", help="Margin m (arcface 0.5, cosface 0.4)."),
        m1: Optional[float] = typer.Option(None, "--m1"),
        m2: Optional[float] = typer.Option(None, "--m2"),
        m3: Optional[float] = typer.Option(None, "--m3"),
        partial_fc: Optional[bool] = typer.Option(None, "--partial-fc/--no-partial-fc",
                                                  help="Shard class centres across ranks."),
        sample_rate: Optional[float] = typer.Option(None, "--sample-rate", help="Partial FC negative sampling."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size per device."),
        workers: Optional[int] = typer.Option(None, "--workers", help="Data loader processes per rank."),
        shuffle_buffer: Optional[int] = typer.Option(None, "--shuffle-buffer"),
        decoder: Optional[str] = typer.Option(None, "--decoder", help="simplejpeg | turbojpeg | pillow."),
        flip: Optional[bool] = typer.Option(None, "--flip/--no-flip"),
        augment: Optional[str] = typer.Option(None, "--augment", help="Extra augmentations, comma-separated: "
                                              "crop,color,blur,gray (default none)."),
        strict: Optional[bool] = typer.Option(None, "--strict/--no-strict",
                                              help="Fail on a corrupt sample instead of skipping it."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Base learning rate (0.1)."),
        momentum: Optional[float] = typer.Option(None, "--momentum"),
        weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
        decay_norm: Optional[bool] = typer.Option(None, "--decay-norm-and-bias/--no-decay-norm-and-bias"),
        scale_lr: Optional[bool] = typer.Option(None, "--scale-lr/--no-scale-lr",
                                                help="lr x global batch / --base-batch."),
        base_batch: Optional[int] = typer.Option(None, "--base-batch"),
        grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Max global grad norm (0 = off)."),
        schedule: Optional[str] = typer.Option(None, "--schedule", help="multistep | poly | cosine | constant."),
        epochs: Optional[int] = typer.Option(None, "--epochs"),
        start_epoch: Optional[int] = typer.Option(None, "--start-epoch"),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", "--max-iter", help="Stop after this many "
                                                "steps (0 = epochs x steps per epoch)."),
        warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs"),
        milestones: Optional[str] = typer.Option(None, "--milestones", help="Epochs, e.g. 12,15,18."),
        gamma: Optional[float] = typer.Option(None, "--gamma"),
        amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision."),
        amp_dtype: Optional[str] = typer.Option(None, "--amp-dtype", help="bf16 | fp16."),
        loss_scale: Optional[float] = typer.Option(None, "--loss-scale", help="fp16: initial loss scale."),
        dynamic_loss_scale: Optional[bool] = typer.Option(None, "--dynamic-loss-scale/--static-loss-scale"),
        device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | npu."),
        device_id: Optional[int] = typer.Option(None, "--device-id", help="Device index (default LOCAL_RANK)."),
        dist_backend: Optional[str] = typer.Option(None, "--dist-backend", help="auto | gloo | nccl | hccl."),
        ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every", help="Checkpoint every N steps."),
        keep_last: Optional[int] = typer.Option(None, "--keep-last"),
        resume: Optional[bool] = typer.Option(None, "--resume/--no-resume",
                                              help="Continue from the newest checkpoint in --out (default on)."),
        eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Verify every N steps "
                                                 "(and at epoch ends)."),
        eval_batch_size: Optional[int] = typer.Option(None, "--eval-batch-size"),
        log_every: Optional[int] = typer.Option(None, "--log-every"),
        tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard"),
        seed: Optional[int] = typer.Option(None, "--seed"),
        deterministic: Optional[bool] = typer.Option(None, "--deterministic/--no-deterministic"),
        max_nonfinite: Optional[int] = typer.Option(None, "--max-nonfinite", help="Abort after K non-finite "
                                                    "steps in a row."),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads per process "
                                              "(0 = default)."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ) -> None:
        """Train a backbone + margin head on shards. Distributed: launch under torchrun (one process per device)."""
        from lresnet.train.config import build_config, net_name
        from lresnet.train.loop import TrainingAborted, train

        if net and net_mode:
            raise InputError("--net", f"got both --net {net} and --net-mode {net_mode}, expected one")
        if net_mode:
            net = net_name(net_mode, net_depth or 100)
        values = {
            "out": out, "seed": seed, "deterministic": deterministic, "max_nonfinite": max_nonfinite,
            "threads": threads,
            "model": {"net": net, "embedding_size": embedding_size, "dropout": dropout,
                      "channels_last": channels_last, "options": _parse_options(net_option, "--net-option")},
            "head": {"name": head, "s": margin_s, "m": margin_m, "m1": m1, "m2": m2, "m3": m3,
                     "partial_fc": partial_fc, "sample_rate": sample_rate},
            "data": {"shards": shards, "manifest": manifest, "batch_size": batch_size, "workers": workers,
                     "shuffle_buffer": shuffle_buffer, "decoder": decoder, "flip": flip, "augment": augment,
                     "strict": strict},
            "optim": {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                      "decay_norm_and_bias": decay_norm, "scale_lr": scale_lr, "base_batch": base_batch,
                      "grad_clip": grad_clip},
            "schedule": {"kind": schedule, "epochs": epochs, "start_epoch": start_epoch, "max_steps": max_steps,
                         "warmup_epochs": warmup_epochs, "milestones": milestones, "gamma": gamma},
            "amp": {"enabled": amp, "dtype": amp_dtype, "loss_scale": loss_scale,
                    "dynamic_loss_scale": dynamic_loss_scale},
            "dist": {"device": device, "device_id": device_id, "backend": dist_backend},
            "checkpoint": {"every": ckpt_every, "keep_last": keep_last, "resume": resume},
            "eval": {"val": val, "sets": val_set or None, "every": eval_every, "batch_size": eval_batch_size},
            "log": {"every": log_every, "tensorboard": tensorboard},
        }
        cfg = build_config(values, config_file=config)
        is_main = int(os.environ.get("RANK", "0")) == 0
        callback, stop = (None, None)
        if is_main and not no_progress and not json_out:
            callback, stop = _progress_callback(cfg.schedule.max_steps)
        try:
            result = train(cfg, progress=callback)
        except TrainingAborted as err:
            if stop:
                stop()
            sys.stderr.write(f"lresnet: error: {err}\n")
            raise typer.Exit(1)
        if stop:
            stop()
        if is_main:
            _print_result(result, json_out)

    @app.command("demo")
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

    @bench.command("train")
    def bench_train_cmd(
        shards: Optional[str] = typer.Option(None, "--shards", help="Shards to read (default: synthesize "
                                             "and convert a small set first)."),
        net: str = typer.Option("mobilefacenet", "--net"),
        net_option: Optional[list[str]] = typer.Option(None, "--net-option"),
        batch_size: int = typer.Option(64, "--batch-size"),
        steps: int = typer.Option(30, "--steps"),
        workers: int = typer.Option(2, "--workers"),
        device: str = typer.Option("cpu", "--device"),
        amp: bool = typer.Option(False, "--amp/--no-amp"),
        amp_dtype: str = typer.Option("bf16", "--amp-dtype"),
        threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = default)."),
        rounds: int = typer.Option(2, "--rounds", help="Interleaved rounds per source; the best is shown."),
        work: Path = typer.Option(Path("bench-train"), "--work", help="Scratch directory."),
        json_out: bool = typer.Option(False, "--json"),
    ) -> None:
        """Train-step images/s: the real shard pipeline vs the same batches from memory vs SyntheticSource."""
        from rich.console import Console
        from rich.table import Table

        from lresnet.train.bench import bench_train

        rows = bench_train(work, shards=shards, net=net, net_options=_parse_options(net_option, "--net-option"),
                           batch_size=batch_size, steps=steps, workers=workers, device=device,
                           amp_dtype=amp_dtype if amp else None, threads=threads,
                           rounds=rounds)
        if json_out:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return
        table = Table(title=f"lresnet bench train: {net}, batch {batch_size}, {steps} steps, {device}")
        for col in ("source", "images/s end to end", "images/s step only", "data wait", "vs memory"):
            table.add_column(col, justify="right" if col != "source" else "left")
        for row in rows:
            table.add_row(row["source"], f"{row['images_per_s']:.1f}", f"{row['images_per_s_step']:.1f}",
                          f"{row['data_wait']:.1%}", f"{row['ratio_to_memory']:.2f}x")
        Console().print(table)
