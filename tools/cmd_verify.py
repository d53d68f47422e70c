"""CLI: ``lresnet verify`` (the standard verification protocol) and ``lresnet bench verify``."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from lresnet.core.errors import InputError
from lresnet.tools.options import AMP, BATCH_SIZE, BGR, CHECKPOINT, DEVICE, NET, WEIGHTS
from lresnet.tools.render import StageProgress, out_console, print_json


def verify_command(
    set_names: List[str] = typer.Option([], "--set", "-s", help="Set name (repeatable): lfw, agedb_30, cfp_fp, ..."),
    all_sets: bool = typer.Option(False, "--all", help="Every set found in --data."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder with <set>.tar (OUT/val) or <set>.bin files."),
    bins: List[Path] = typer.Option([], "--bin", help="An original InsightFace .bin file (repeatable); "
                                                     "the set is named after the file."),
    checkpoint: Optional[Path] = CHECKPOINT,
    weights: Optional[Path] = WEIGHTS,
    net: Optional[str] = NET,
    embeddings: Optional[Path] = typer.Option(None, "--embeddings",
                                              help="Precomputed embeddings .npy [2N, D], rows 2k/2k+1 = pair k "
                                                   "(L2-normalised before scoring)."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Flip test-time augmentation."),
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    amp: str = AMP,
    bgr: Optional[bool] = BGR,
    folds: int = typer.Option(10, "--folds", min=1, help="Cross-validation folds."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    roc: Optional[Path] = typer.Option(None, "--roc", help="Write ROC curves to this PNG (needs matplotlib)."),
    save_embeddings: Optional[Path] = typer.Option(
        None, "--save-embeddings", help="Folder to write <set>.npy: the flip-summed embeddings before "
                                        "normalisation; --embeddings on them reproduces the numbers exactly."),
    ijb: Optional[IJBTarget] = typer.Option(None, "--ijb", help="Score IJB-C or IJB-B (templates, TPR@FPR) "
                                                                "from --data ROOT, as arcface_torch's eval_ijbc.py."),
    flip_embeddings: Optional[Path] = typer.Option(None, "--flip-embeddings", help="--ijb with --embeddings: the "
                                                   "embeddings of the mirrored aligned crops (one row per image)."),
    norm_score: bool = typer.Option(True, "--norm-score/--no-norm-score", help="--ijb: keep each image "
                                    "feature's norm as its weight (the reference's setting)."),
    detector_score: bool = typer.Option(True, "--detector-score/--no-detector-score", help="--ijb: weight each "
                                        "image feature by its face detector score (the reference's setting)."),
    save_aligned: Optional[Path] = typer.Option(None, "--save-aligned", help="--ijb: write the aligned crops "
                                                "(uint8 N x 112 x 112 x 3 RGB, file order) to this .npy."),
) -> None:
    """Score a backbone (or precomputed embeddings) on verification sets, InsightFace's protocol;
    with --ijb, on IJB-C/IJB-B as arcface_torch scores them."""
    from lresnet.eval.verify import VerifyRequest, run_verify

    request = VerifyRequest(sets=tuple(set_names), all_sets=all_sets, data=data, bins=tuple(bins),
                            checkpoint=checkpoint, weights=weights, net=net, embeddings=embeddings, flip=flip,
                            batch_size=batch_size, device=device, amp=amp, bgr=bgr, folds=folds,
                            save_embeddings=save_embeddings, ijb=None if ijb is None else ijb.value,
                            flip_embeddings=flip_embeddings, norm_score=norm_score, detector_score=detector_score,
                            save_aligned=save_aligned)
    with StageProgress(transient=True) as bar:
        report = run_verify(request, progress=bar.update if ijb is not None else
                            lambda name, done, total: bar.update(f"{name}: embedding", done, total))
    curves = [(report.ijb.target, report.ijb)] if report.ijb is not None else [(s.name, s.result)
                                                                                for s in report.sets]
    if roc is not None:
        write_roc(roc, curves)
    if as_json:
        print_json(report.as_dict())
        return
    console = Console()
    if report.ijb is not None:
        console.print(ijb_table(report.ijb))
    for s in report.sets:
        console.print(result_table(s.name, s.source, s.result))
    if roc is not None:
        console.print(f"ROC curves written to {roc}")


class IJBTarget(str, Enum):
    IJBC = "IJBC"
    IJBB = "IJBB"


def ijb_table(report: Any) -> Table:
    """TPR at each FPR of an IJB target, the reference's table, plus the ROC AUC."""
    table = Table(title=f"{report.target}  ({report.templates:,} templates, {report.pairs:,} pairs, "
                        f"{report.images:,} images)", title_justify="left")
    table.add_column("FPR", style="bold")
    for key in report.tpr_at_fpr:
        table.add_column(key, justify="right")
    table.add_column("AUC", justify="right")
    table.add_row("TPR (%)", *[f"{100 * v:.2f}" for v in report.tpr_at_fpr.values()], f"{report.auc:.5f}")
    table.caption = (f"flip {'on' if report.options.flip else 'off'}, norm score "
                     f"{'on' if report.options.norm_score else 'off'}, detector score "
                     f"{'on' if report.options.detector_score else 'off'}")
    return table


def _fmt(value: Optional[float], digits: int = 5) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def result_table(name: str, source: str, result: Any) -> Table:
    """A rich table of one set's numbers (the per-fold lists are in --json)."""
    import numpy as np

    table = Table(title=f"{name}  ({result.num_pairs} pairs, {source})", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right", no_wrap=True)
    thresholds = np.asarray(result.fold_thresholds)
    table.add_row(f"accuracy ({result.num_folds}-fold)", f"{_fmt(result.accuracy)} ± {_fmt(result.std)}")
    table.add_row("best threshold (all pairs)", _fmt(result.best_threshold, 2))
    table.add_row("fold thresholds (min/median/max)",
                  f"{thresholds.min():.2f} / {np.median(thresholds):.2f} / {thresholds.max():.2f}")
    table.add_row(f"VR@FAR={result.far_target:g}", f"{_fmt(result.val)} ± {_fmt(result.val_std)}")
    table.add_row("FAR at those thresholds", _fmt(result.far))
    table.add_row("ROC AUC", _fmt(result.auc))
    table.add_row("EER", _fmt(result.eer))
    table.add_row("XNorm", _fmt(result.xnorm, 4))
    if any(isinstance(v, float) and math.isnan(v) for v in (result.val, result.far, result.auc, result.eer)):
        table.caption = "-: undefined (a test fold, or the set, lacks same or different pairs)"
    return table


def write_roc(path: Path, curves: List[tuple[str, Any]]) -> None:
    """ROC curves (TAR against FAR, log FAR axis) of every set into one PNG."""
    try:
        import matplotlib
    except ImportError:
        raise InputError(path, "writing a ROC curve needs matplotlib: pip install 'lresnet[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    for name, result in curves:
        keep = result.roc_far > 0
        ax.plot(result.roc_far[keep], result.roc_tar[keep], label=f"{name} (AUC {result.auc:.4f})")
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("verification ROC")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as err:
        raise InputError(path, f"cannot write: {err.strerror or err}") from None
    finally:
        plt.close(fig)


def bench_verify_command(
    net: str = typer.Option("mobilefacenet", "--net", help="Backbone name."),
    images: int = typer.Option(256, "--images", min=1, help="Images per measurement."),
    batch_size: int = BATCH_SIZE,
    device: str = DEVICE,
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per variant (best is kept)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Embedding extraction images/s: variants against a no-flip fp32 baseline in the same run."""
    from lresnet.eval.bench import bench_extraction

    report = bench_extraction(net, images, batch_size, device, repeats)
    if as_json:
        print_json(report)
        return
    table = Table(title=f"embedding extraction, {net} on {report['device']} (batch {batch_size}, "
                        f"{report['threads']} threads, best of {repeats})", title_justify="left")
    for col in ("variant", "images", "images/s", "x baseline"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for row in report["results"]:
        table.add_row(row["variant"], str(row["images"]), f"{row['images_per_s']:.1f}",
                      f"{row['ratio_to_baseline']:.2f}")
    out_console().print(table)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to `app` and its benchmarks to `bench`."""
    app.command("verify")(verify_command)
    bench.command("verify")(bench_verify_command)
