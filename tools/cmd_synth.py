"""CLI: lresnet synth (synthetic faces_emore)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from lresnet.core.errors import InputError
from lresnet.tools.render import StageProgress, out_console, print_json

# Caps on what one synth run may ask for: the largest standard pair set (CFP-FP) has 7,000 pairs
# and faces_emore 5.8M images; a pair set is held in memory as JPEGs (~10 KB a pair) before it is
# written, so the pair cap keeps that near 1 GB.
MAX_PAIRS = 100_000
MAX_IMAGES = 10_000_000
LABEL_FORMATS = ("float", "multi")
HEADER_PLACES = ("start", "end")


def synth_command(
    out_dir: Path = typer.Argument(..., help="Folder to write (created if missing)."),
    identities: int = typer.Option(100, "--identities", "-n", help="Training classes."),
    images_per_id: int = typer.Option(10, "--images-per-id", "-m", help="Images per class "
                                      f"(identities x images at most {MAX_IMAGES:,})."),
    pairs: int = typer.Option(600, "--pairs", "-p", help=f"Pairs per verification set (at most {MAX_PAIRS:,})."),
    seed: int = typer.Option(0, "--seed", help="Seed: same seed, same bytes."),
    sets: str = typer.Option("lfw,agedb_30,cfp_fp", "--sets", help="Comma-separated pair-set names."),
    difficulty: float = typer.Option(1.0, "--difficulty", help="Jitter/colour/noise scale (0 = canonical)."),
    label_format: str = typer.Option("float", "--label-format", help="float | multi (flag-2 labels)."),
    header_at: str = typer.Option("start", "--header-at", help="start (key 0) | end (written last)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Write a synthetic faces_emore folder: train.rec/.idx, property, <set>.bin."""
    from lresnet.core.files import make_out_dir
    from lresnet.convert.synthetic import synthesize

    for name, value, allowed in (("--label-format", label_format, LABEL_FORMATS),
                                 ("--header-at", header_at, HEADER_PLACES)):
        if value not in allowed:
            raise InputError(name, f"got {value!r}, expected one of {', '.join(allowed)}")
    if identities < 1 or images_per_id < 1 or pairs < 0:
        raise InputError("--identities/--images-per-id/--pairs",
                         f"got {identities}/{images_per_id}/{pairs}, expected >= 1/>= 1/>= 0")
    if identities * images_per_id > MAX_IMAGES:
        raise InputError("--identities/--images-per-id", f"got {identities:,} x {images_per_id:,} images, "
                                                         f"expected at most {MAX_IMAGES:,}")
    if pairs > MAX_PAIRS:
        raise InputError("--pairs", f"got {pairs:,}, expected at most {MAX_PAIRS:,} pairs per set")
    if not math.isfinite(difficulty) or difficulty < 0:
        raise InputError("--difficulty", f"got {difficulty}, expected a finite number >= 0")
    set_names = [s.strip() for s in sets.split(",") if s.strip()]
    bad = [s for s in set_names if not s.replace("_", "").replace("-", "").isalnum()]
    if bad:
        raise InputError("--sets", f"got {bad[0]!r}, expected names like lfw,agedb_30,cfp_fp")
    make_out_dir(out_dir)

    with StageProgress() as bar:
        summary = synthesize(out_dir, identities=identities, images_per_id=images_per_id, pairs=pairs,
                             seed=seed, sets=set_names, difficulty=difficulty, label_format=label_format,
                             header_at=header_at, progress=lambda done, total: bar.update("synth", done, total))
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"synthetic faces_emore in {summary['out_dir']}")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("classes", str(summary["identities"]))
    table.add_row("train images", str(summary["images"]))
    table.add_row("train.rec bytes", f"{summary['train_rec_bytes']:,}")
    for name, count in summary["pairs"].items():
        table.add_row(f"{name}.bin pairs", str(count))
    table.add_row("seconds", f"{summary['seconds']:.1f}")
    table.add_row("images/s", str(summary["images_per_s"]))
    out_console().print(table)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to `app` and its benchmarks to `bench`."""
    app.command("synth")(synth_command)
