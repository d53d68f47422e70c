"""CLI: lresnet convert-rec, inspect, bench convert."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import typer
from rich.console import Console

from lresnet.core.errors import InputError
from lresnet.tools.render import StageProgress, key_value_table, out_console, print_json


def _parse_sets(sets: Optional[str]) -> Optional[List[str]]:
    if sets is None:
        return None
    names = [s.strip() for s in sets.split(",") if s.strip()]
    if not names:
        raise InputError("--sets", f"got {sets!r}, expected comma-separated set names like lfw,agedb_30")
    return names


def convert_rec_command(
    src_dir: Path = typer.Argument(..., help="faces_emore folder: train.rec, train.idx, property, *.bin"),
    out_dir: Path = typer.Argument(..., help="output folder (train/ shards + manifest, val/ pair sets)"),
    shard_size: int = typer.Option(10000, "--shard-size", help="images per train shard"),
    workers: int = typer.Option(1, "--workers", help="processes writing shards (output is identical)"),
    seed: int = typer.Option(0, "--seed", help="seed of the global shuffle (>= 0)"),
    no_shuffle: bool = typer.Option(False, "--no-shuffle", help="keep the source record order"),
    sets: Optional[str] = typer.Option(None, "--sets", help="verification sets to convert, e.g. "
                                       "lfw,agedb_30 (default: every .bin found)"),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt", help="skip unreadable records, count them"),
    reader: str = typer.Option("pure", "--reader", help="pure (this package's RecordIO reader) or mxnet "
                               "(MXNet's own, a cross-check; needs mxnet, same output)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Convert faces_emore (MXNet RecordIO) into webdataset shards; a rerun resumes."""
    from lresnet.convert import convert_rec

    with StageProgress(rate=True) as bar:
        summary = convert_rec(src_dir, out_dir, shard_size=shard_size, workers=workers, seed=seed,
                              shuffle=not no_shuffle, sets=_parse_sets(sets), skip_corrupt=skip_corrupt,
                              progress=bar.advance, reader=reader)
    data = summary.as_dict()
    if as_json:
        print_json(data)
        return
    out_console().print(_summary_table(data))
    for w in summary.warnings:
        Console(stderr=True).print(f"[yellow]warning:[/] {w}")


def _summary_table(summary: Dict[str, Any]):
    h, w = summary["image_size"]
    return key_value_table("convert-rec summary", [
        ("output", summary["out_dir"]),
        ("images", f"{summary['num_samples']:,}"),
        ("classes (with images)", f"{summary['num_classes']:,} ({summary['classes_with_images']:,})"),
        ("image size", f"{h}x{w}"),
        ("shards (written / reused)",
         f"{summary['num_shards']} ({summary['shards_written']} / {summary['shards_reused']})"),
        ("train bytes", f"{summary['bytes'] / 1e6:,.1f} MB"),
        ("skipped corrupt", f"{summary['skipped_corrupt']:,}"),
        ("image size mismatches", f"{summary['image_size_mismatches']:,}"),
        ("val sets (pairs)", ", ".join(f"{k} ({v})" for k, v in summary["val"].items()) or "none"),
        ("time", f"{summary['seconds']:.1f} s"),
        ("throughput", f"{summary['images_per_s']:,.0f} img/s, {summary['mb_per_s']:,.1f} MB/s written"),
    ])


def inspect_command(
    out_dir: Path = typer.Argument(..., help="a convert-rec output folder (or its manifest.json)"),
    verify: bool = typer.Option(False, "--verify", help="check every shard's size and sha256"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Print a shard manifest's summary; --verify checks every shard's sha256 (exit 2 if bad)."""
    from lresnet.convert import read_manifest, summarize, verify_shards

    summary = summarize(read_manifest(out_dir))
    if verify:
        with StageProgress() as bar:
            report = verify_shards(out_dir, progress=lambda n: bar.advance("verify", n, summary["bytes"]))
        summary["verified"] = {"shards": report.shards, "val_sets": report.val_sets, "bytes": report.bytes}
    if as_json:
        print_json(summary)
        return
    rows = []
    for k, v in summary.items():
        if k == "val":
            v = ", ".join(f"{name} ({pairs} pairs)" for name, pairs in v.items()) or "none"
        elif k == "verified":
            v = f"OK: {v['shards']} shards + {v['val_sets']} val sets, sha256 match"
        rows.append((k, v))
    out_console().print(key_value_table(f"{out_dir}", rows))


def bench_convert_command(
    images: int = typer.Option(50000, "--images", help="images in the synthetic set"),
    workers: int = typer.Option(2, "--workers", help="conversion processes"),
    shard_size: int = typer.Option(5000, "--shard-size", help="images per shard (smaller than "
                                   "convert-rec's default so a 50k set has enough shards to keep every "
                                   "worker busy, as faces_emore's ~580 shards do)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="cache folder for the synthetic "
                                            "sets (reused when present); default: a temp folder"),
    seed: int = typer.Option(0, "--seed", help="synthesis seed"),
    index_records: int = typer.Option(5_800_000, "--index-records", help="also measure the main "
                                      "process's per-record state (record index + shuffle plan) on an "
                                      "index-only set of this many tiny records (faces_emore: 5.8M); "
                                      "0 skips it"),
    as_json: bool = typer.Option(False, "--json", help="print the results as JSON"),
) -> None:
    """Conversion throughput vs a plain copy of the same .rec, and peak RSS at two dataset sizes."""
    from lresnet.convert.bench import bench_convert

    r = bench_convert(images, workers, shard_size, data_dir, seed, index_records)
    if as_json:
        print_json(r)
        return
    rows = [
        ("plain copy of train.rec", f"{r['copy_mb_s']:,.0f} MB/s ({r['copy_seconds']:.2f} s)"),
        ("convert-rec", f"{r['convert_images_s']:,.0f} img/s, {r['convert_mb_s']:,.0f} MB/s "
                        f"({r['convert_seconds']:.2f} s)"),
        ("ratio to copy", f"{r['ratio_to_copy']:.2f}x (target >= 0.5x)"),
        ("CPU per image (main + workers)", f"{r['convert_cpu_us_per_image']:.1f} µs"),
    ]
    if r["ratio_to_copy_cpu_normalized"] is not None:
        rows.append(("ratio, CPU-normalized (a core per process)", f"{r['ratio_to_copy_cpu_normalized']:.2f}x"))
    for n, rss in r["rss"].items():
        rows.append((f"peak RSS at {int(n):,} images",
                     f"main {rss['main_mb']:.0f} MB, largest worker {rss['worker_mb']:.0f} MB"))
    if "index_rss" in r:
        ir = r["index_rss"]
        rows.append((f"index + plan of {ir['records']:,} records", f"main {ir['main_mb']:.0f} MB "
                     f"({ir['after_imports_mb']:.0f} MB after imports; {ir['bytes_per_record']:.0f} B/record)"))
    out_console().print(key_value_table(f"bench convert: {r['images']:,} images, {workers} workers", rows))


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to `app` and its benchmarks to `bench`."""
    app.command("convert-rec")(convert_rec_command)
    app.command("inspect")(inspect_command)
    bench.command("convert")(bench_convert_command)
