"""CLI: lresnet convert-rec, inspect, bench convert."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from lresnet.core.errors import InputError


class _RateColumn(ProgressColumn):
    """Images per second of a task."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- img/s" if speed is None else f"{speed:,.0f} img/s", style="progress.data.speed")


def _progress_bar(console: Console) -> Progress:
    """Images done, images/s, elapsed, ETA; drawn only on a terminal (logs and pipes stay clean)."""
    return Progress(TextColumn("[bold]{task.description:>12}"), BarColumn(), MofNCompleteColumn(),
                    _RateColumn(), TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, transient=False,
                    disable=not console.is_terminal)


def _summary_table(summary: Dict) -> Table:
    table = Table(title="convert-rec summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    h, w = summary["image_size"]
    rows = [
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
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table


def _parse_sets(sets: Optional[str]):
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
    seed: int = typer.Option(0, "--seed", help="seed of the global shuffle"),
    no_shuffle: bool = typer.Option(False, "--no-shuffle", help="keep the source record order"),
    sets: Optional[str] = typer.Option(None, "--sets", help="verification sets to convert, e.g. "
                                       "lfw,agedb_30 (default: every .bin found)"),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt", help="skip unreadable records, count them"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Convert faces_emore (MXNet RecordIO) into webdataset shards; a rerun resumes."""
    from lresnet.convert import convert_rec

    console = Console(stderr=True)
    bar = _progress_bar(console)
    tasks: Dict[str, int] = {}

    def progress(stage: str, advance: int, total: int) -> None:
        if not tasks:
            bar.start()  # lazily: an error before any work prints only its one line
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], advance=advance, total=total)

    try:
        summary = convert_rec(src_dir, out_dir, shard_size=shard_size, workers=workers, seed=seed,
                              shuffle=not no_shuffle, sets=_parse_sets(sets), skip_corrupt=skip_corrupt,
                              progress=progress)
    finally:
        if tasks:
            bar.stop()
    data = summary.as_dict()
    if as_json:
        sys.stdout.write(json.dumps(data, indent=1) + "\n")
        return
    Console().print(_summary_table(data))
    for w in summary.warnings:
        console.print(f"[yellow]warning:[/] {w}")


def inspect_command(
    out_dir: Path = typer.Argument(..., help="a convert-rec output folder (or its manifest.json)"),
    verify: bool = typer.Option(False, "--verify", help="check every shard's size and sha256"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Print a shard manifest's summary; --verify checks every shard's sha256 (exit 2 if bad)."""
    from lresnet.convert import read_manifest, summarize, verify_shards

    summary = summarize(read_manifest(out_dir))
    if verify:
        console = Console(stderr=True)
        total = summary["bytes"]
        with Progress(TextColumn("verify"), BarColumn(), TimeRemainingColumn(), console=console,
                      disable=not console.is_terminal) as bar:
            task = bar.add_task("verify", total=total)
            report = verify_shards(out_dir, progress=lambda n: bar.update(task, advance=n))
        summary["verified"] = {"shards": report.shards, "val_sets": report.val_sets, "bytes": report.bytes}
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=1) + "\n")
        return
    table = Table(title=f"{out_dir}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        if k == "val":
            v = ", ".join(f"{name} ({pairs} pairs)" for name, pairs in v.items()) or "none"
        elif k == "verified":
            v = f"OK: {v['shards']} shards + {v['val_sets']} val sets, sha256 match"
        table.add_row(k, str(v))
    Console().print(table)


# --------------------------------------------------------------------------- bench
# One conversion in a fresh interpreter. The main process's peak is VmHWM (ru_maxrss would
# include the forked bench parent's RSS, which Linux carries across exec); the workers' peak is
# RUSAGE_CHILDREN (they are forked from this small process).
_RSS_CHILD = """
import json, os, resource, sys, time
from lresnet.convert import convert_rec
src, out, workers, shard_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def cpu():
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
c, t = cpu(), time.perf_counter()
s = convert_rec(src, out, shard_size=shard_size, workers=workers, sets=[])
dt, cpu_s = time.perf_counter() - t, cpu() - c
hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if os.path.exists("/proc/self/status"):
    with open("/proc/self/status") as f:
        hwm = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), hwm)
print(json.dumps({"seconds": dt, "cpu_seconds": cpu_s, "images": s.num_samples, "bytes": s.bytes,
                  "rss_main_kb": hwm,
                  "rss_workers_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


# The per-record state of convert-rec's main process (record index + shuffle plan) at a size
# like faces_emore's 5.8M records, on an index-only set: tiny records with fake JPEG payloads.
_RSS_INDEX_CHILD = """
import json, resource, sys
from lresnet.convert.convert_rec import shuffle_plan
from lresnet.convert.recordio import FacesEmore
def hwm():
    with open("/proc/self/status") as f:
        return next((int(l.split()[1]) for l in f if l.startswith("VmHWM:")),
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
base = hwm()
fe = FacesEmore(sys.argv[1])
keys = fe.image_key_range if fe.image_key_range is not None else fe.image_key_array
plan = shuffle_plan(keys, 0)
print(json.dumps({"records": int(plan.size), "rss_kb": hwm(), "rss_imports_kb": base}))
"""


def _ensure_index_only(data_dir: Path, records: int) -> Path:
    """A faces_emore folder of ``records`` tiny image records (40-byte fake JPEGs), 68 per class,
    written with numpy in seconds; only the record index matters for what it measures."""
    marker = data_dir / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()).get("records") == records:
        return data_dir
    import struct

    import numpy as np

    from lresnet.convert.recordio import MAGIC, RecordWriter

    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    classes = max(1, records // 68)
    image = np.zeros((records, 72), dtype=np.uint8)  # part header + IRHeader + 40-byte payload
    image[:, 0:8] = np.frombuffer(struct.pack("<II", MAGIC, 64), dtype=np.uint8)
    image[:, 12:16] = (np.arange(records) % classes).astype("<f4").view(np.uint8).reshape(-1, 4)
    image[:, 32:34] = (0xFF, 0xD8)
    with RecordWriter(data_dir / "head.rec") as w:
        w.write(0, struct.pack("<IfQQ2f", 2, 0.0, 0, 0, records + 1, records + 1 + classes))
        head = w.tell()
        for c in range(classes):
            lo = 1 + c * 68
            w.write(0, struct.pack("<IfQQ2f", 2, 0.0, 0, 0, lo, min(records + 1, lo + 68)))
    raw = (data_dir / "head.rec").read_bytes()
    (data_dir / "head.rec").unlink()
    with open(data_dir / "train.rec", "wb") as f:
        f.write(raw[:head])
        f.write(image.data)
        f.write(raw[head:])
    ident = head + 72 * records + (len(raw) - head) // max(1, classes) * np.arange(classes)
    offsets = np.concatenate([[0], head + 72 * np.arange(records), ident])
    with open(data_dir / "train.idx", "w", encoding="ascii") as f:
        for lo in range(0, offsets.size, 1 << 20):
            part = offsets[lo:lo + (1 << 20)].tolist()
            f.write("".join(f"{lo + i}\t{o}\n" for i, o in enumerate(part)))
    (data_dir / "property").write_text(f"{classes},112,112\n")
    marker.write_text(json.dumps({"records": records}))
    return data_dir


def _index_rss(src: Path) -> Dict:
    proc = subprocess.run([sys.executable, "-c", _RSS_INDEX_CHILD, str(src)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench index RSS failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ensure_synth(data_dir: Path, images: int, seed: int) -> Path:
    """A synthetic faces_emore of about ``images`` images in ``data_dir`` (reused if already there)."""
    marker = data_dir / "bench.json"
    if marker.is_file() and (data_dir / "train.rec").is_file():
        if json.loads(marker.read_text()).get("images") == images:
            return data_dir
    from lresnet.convert.synthetic import synthesize

    per_id = 50 if images >= 500 else max(1, images // 5)
    identities = max(1, images // per_id)
    if data_dir.exists():
        shutil.rmtree(data_dir)
    synthesize(data_dir, identities=identities, images_per_id=per_id, pairs=0, seed=seed, sets=())
    marker.write_text(json.dumps({"images": images}))
    return data_dir


def _timed_copy(src: Path, dst: Path) -> Tuple[float, float]:
    """(wall seconds, CPU seconds) of ``shutil.copyfile``; the copy is deleted after."""
    c, t = time.process_time(), time.perf_counter()
    shutil.copyfile(src, dst)
    dt, cpu = time.perf_counter() - t, time.process_time() - c
    dst.unlink()
    return dt, cpu


def _convert_in_child(src: Path, out: Path, workers: int, shard_size: int) -> Dict:
    """Run one conversion in a fresh interpreter: its time and peak RSS (main + workers)."""
    if out.exists():
        shutil.rmtree(out)
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(src), str(out), str(workers),
                           str(shard_size)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench conversion failed: {proc.stderr.strip()[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out)
    return result


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
    console = Console(stderr=True)
    tmp_root = None
    if data_dir is None:
        tmp_root = Path(tempfile.mkdtemp(prefix="lresnet-bench-convert-"))
        data_dir = tmp_root
    data_dir = Path(data_dir)
    try:
        small_n = max(1, images // 4)
        console.print(f"synthesizing {images:,} + {small_n:,} images in {data_dir} (cached) ...")
        big = _ensure_synth(data_dir / f"synth-{images}", images, seed)
        small = _ensure_synth(data_dir / f"synth-{small_n}", small_n, seed + 1)
        rec = big / "train.rec"
        rec_bytes = rec.stat().st_size
        work = data_dir / "work"
        work.mkdir(exist_ok=True)
        # copy baseline, twice around the conversion; the faster copy is the baseline
        copy_s = [_timed_copy(rec, work / "copy.rec")]
        console.print("converting (large set) ...")
        conv_big = _convert_in_child(big, work / "out-big", workers, shard_size)
        copy_s.append(_timed_copy(rec, work / "copy.rec"))
        console.print("converting (small set) ...")
        conv_small = _convert_in_child(small, work / "out-small", workers, shard_size)
        index_rss = {}
        if index_records > 0:
            console.print(f"index-only set of {index_records:,} records (main-process state) ...")
            index_rss = _index_rss(_ensure_index_only(data_dir / f"index-{index_records}", index_records))
        copy_wall, copy_cpu = min(copy_s)
        copy_mb_s = rec_bytes / copy_wall / 1e6
        conv_mb_s = rec_bytes / conv_big["seconds"] / 1e6
        result = {
            "images": conv_big["images"], "workers": workers, "shard_size": shard_size,
            "rec_mb": rec_bytes / 1e6,
            "copy_seconds": copy_wall, "copy_cpu_seconds": copy_cpu, "copy_mb_s": copy_mb_s,
            "convert_seconds": conv_big["seconds"],
            "convert_images_s": conv_big["images"] / conv_big["seconds"],
            "convert_mb_s": conv_mb_s,
            "ratio_to_copy": conv_mb_s / copy_mb_s,
            # on a shared machine wall time depends on the neighbours; CPU time much less so
            "convert_cpu_seconds": conv_big["cpu_seconds"],
            "convert_cpu_us_per_image": conv_big["cpu_seconds"] / max(1, conv_big["images"]) * 1e6,
            "ratio_to_copy_cpu_normalized": (copy_cpu * workers / conv_big["cpu_seconds"]
                                             if conv_big["cpu_seconds"] > 0 and copy_cpu > 0 else None),
            "rss": {
                str(conv_small["images"]): {"main_mb": conv_small["rss_main_kb"] / 1024,
                                            "worker_mb": conv_small["rss_workers_kb"] / 1024},
                str(conv_big["images"]): {"main_mb": conv_big["rss_main_kb"] / 1024,
                                          "worker_mb": conv_big["rss_workers_kb"] / 1024},
            },
        }
        if index_rss:
            grown = index_rss["rss_kb"] - index_rss["rss_imports_kb"]
            result["index_rss"] = {"records": index_rss["records"], "main_mb": index_rss["rss_kb"] / 1024,
                                   "after_imports_mb": index_rss["rss_imports_kb"] / 1024,
                                   "bytes_per_record": grown * 1024 / max(1, index_rss["records"])}
    finally:
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
        return
    table = Table(title=f"bench convert: {result['images']:,} images, {workers} workers")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("plain copy of train.rec", f"{result['copy_mb_s']:,.0f} MB/s ({result['copy_seconds']:.2f} s)")
    table.add_row("convert-rec", f"{result['convert_images_s']:,.0f} img/s, {result['convert_mb_s']:,.0f} MB/s "
                  f"({result['convert_seconds']:.2f} s)")
    table.add_row("ratio to copy", f"{result['ratio_to_copy']:.2f}x (target >= 0.5x)")
    table.add_row("CPU per image (main + workers)", f"{result['convert_cpu_us_per_image']:.1f} µs")
    if result["ratio_to_copy_cpu_normalized"] is not None:
        table.add_row("ratio, CPU-normalized (a core per process)",
                      f"{result['ratio_to_copy_cpu_normalized']:.2f}x")
    for n, rss in result["rss"].items():
        table.add_row(f"peak RSS at {int(n):,} images", f"main {rss['main_mb']:.0f} MB, "
                      f"largest worker {rss['worker_mb']:.0f} MB")
    if "index_rss" in result:
        ir = result["index_rss"]
        table.add_row(f"index + plan of {ir['records']:,} records", f"main {ir['main_mb']:.0f} MB "
                      f"({ir['after_imports_mb']:.0f} MB after imports; {ir['bytes_per_record']:.0f} B/record)")
    Console().print(table)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to `app` and its benchmarks to `bench`."""
    app.command("convert-rec")(convert_rec_command)
    app.command("inspect")(inspect_command)
    bench.command("convert")(bench_convert_command)
