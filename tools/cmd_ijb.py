"""CLI: ``lresnet synth-ijb`` (a synthetic IJB-B/IJB-C folder) and ``lresnet bench ijb``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lresnet.core.errors import InputError
from lresnet.tools.render import StageProgress, key_value_table, out_console, print_json


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to `app` and its benchmarks to `bench`."""

    @app.command("synth-ijb")
    def synth_ijb_cmd(
        root: Path = typer.Argument(..., help="Folder to write ROOT/<TARGET>/{loose_crop,meta} into."),
        target: str = typer.Option("IJBC", "--target", help="IJBC or IJBB (file prefix ijbc_ / ijbb_)."),
        identities: int = typer.Option(12, "--identities", min=2, help="People."),
        templates_per_id: int = typer.Option(3, "--templates-per-id", min=2, help="Templates of each person."),
        seed: int = typer.Option(0, "--seed", help="Same seed, same files."),
        difficulty: float = typer.Option(1.0, "--difficulty", min=0.0, help="Pose/colour/noise scale."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Write a synthetic IJB folder (loose crops, landmarks, templates, pairs) for verify --ijb."""
        from lresnet.convert.synthetic import IJB_TARGETS, synthesize_ijb

        if target not in IJB_TARGETS:
            raise InputError("--target", f"got {target!r}, expected one of {', '.join(IJB_TARGETS)}")
        with StageProgress(transient=True) as bar:
            summary = synthesize_ijb(root, target, identities=identities, templates_per_id=templates_per_id,
                                     seed=seed, difficulty=difficulty,
                                     progress=lambda done, total: bar.update("synth", done, total))
        if as_json:
            print_json(summary)
            return
        out_console().print(key_value_table(f"synthetic {target} in {summary['folder']}",
                                            [(k.replace("_", " "), v) for k, v in summary.items() if k != "folder"]))

    @bench.command("ijb")
    def bench_ijb_cmd(
        images: int = typer.Option(469_375, "--images", min=8, help="Images (IJB-C: 469,375)."),
        templates: int = typer.Option(23_124, "--templates", min=8, help="Templates (IJB-C: 23,124)."),
        positive_pairs: int = typer.Option(19_557, "--positive-pairs", min=1, help="Same-person pairs."),
        negative_pairs: int = typer.Option(15_638_932, "--negative-pairs", min=1, help="Different-person pairs."),
        dim: int = typer.Option(512, "--dim", min=1, help="Embedding size."),
        threads: int = typer.Option(2, "--threads", min=1, help="Threads scoring pairs."),
        work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Keep the synthetic set here "
                                                                         "(default: a temporary folder)."),
        baseline: bool = typer.Option(True, "--baseline/--no-baseline",
                                      help="Also time the reference's pooling and scoring on samples."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Score an IJB-C-sized protocol from precomputed embeddings: wall time per stage and peak RSS."""
        from lresnet.eval.bench_ijb import bench_ijb

        result = bench_ijb(images=images, templates=templates, positive_pairs=positive_pairs,
                           negative_pairs=negative_pairs, dim=dim, threads=threads, work_dir=work_dir,
                           baseline=baseline)
        if as_json:
            print_json(result)
            return
        s = result["set"]
        rows = [("set", f"{s['images']:,} images, {s['templates']:,} templates, {s['pairs']:,} pairs "
                        f"({s['positive_pairs']:,} positive), {s['dim']}-d"),
                ("scoring wall time", f"{result['wall_s']:.1f} s on {result['threads']} threads "
                                      f"({result['cpus']} CPUs here, load {result['load_average'][0]})"),
                ("scoring CPU time", f"{result['cpu_s']:.1f} s"),
                *((f"  {stage}", f"{sec:.1f} s") for stage, sec in result["seconds"].items()),
                ("peak RSS of the scoring process", f"{result['peak_rss_mb']:,.0f} MB")]
        if result["baseline"]:
            rows += [("reference's pooling (scaled from a sample)", f"{result['baseline']['pool_s']:.1f} s"),
                     ("reference's scoring (scaled from a sample)", f"{result['baseline']['score_s']:.1f} s"),
                     ("speed-up over the reference", f"{result['speedup']}x")]
        rows += [("TPR@FPR=1e-4 (sanity)", f"{result['tpr_at_fpr']['1e-4']:.4f}")]
        out_console().print(key_value_table("bench ijb (synthetic IJB-C, embeddings only)", rows))
