"""``lresnet bench convert``: conversion throughput against a plain copy of the same ``.rec``, and memory.

    >>> from lresnet.convert.bench import bench_convert
    >>> bench_convert(images=50_000, workers=2)     # {"convert_mb_s", "ratio_to_copy", "rss", ...}

Each conversion runs in a fresh interpreter (``python -m lresnet.convert.bench convert SRC OUT
WORKERS SHARD_SIZE``), so its peak RSS is its own: the main process's peak is VmHWM (ru_maxrss
would include the forked bench parent's RSS, which Linux carries across exec), the workers'
is RUSAGE_CHILDREN (they are forked from that small process). The main process's per-record
state (record index + shuffle plan) is measured on an index-only set the size of faces_emore
(``python -m lresnet.convert.bench index SRC``): tiny records with fake JPEG payloads, written
with the project's own :class:`~lresnet.convert.recordio.RecordWriter`. Each child prints one
JSON line.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from lresnet.core.errors import InputError

log = logging.getLogger(__name__)

PER_CLASS = 68  # images per class in the index-only set (faces_emore: 5.8M images, 85,742 classes)


def ensure_synthetic(data_dir: Path, images: int, seed: int) -> Path:
    """A synthetic faces_emore of about ``images`` images in ``data_dir`` (reused if already there)."""
    from lresnet.convert.synthetic import synthesize

    if _cached(data_dir, {"images": images}) and (data_dir / "train.rec").is_file():
        return data_dir
    per_id = 50 if images >= 500 else max(1, images // 5)
    if data_dir.exists():
        shutil.rmtree(data_dir)
    synthesize(data_dir, identities=max(1, images // per_id), images_per_id=per_id, pairs=0, seed=seed, sets=())
    (data_dir / "bench.json").write_text(json.dumps({"images": images}))
    return data_dir


def ensure_index_only(data_dir: Path, records: int) -> Path:
    """A faces_emore folder of ``records`` tiny image records (40-byte fake JPEGs), ``PER_CLASS`` per
    class, a header record and one identity record per class (reused if already there)."""
    from lresnet.convert.recordio import IRHeader, RecordWriter, pack

    if _cached(data_dir, {"records": records}):
        return data_dir
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    classes = max(1, -(-records // PER_CLASS))
    first_identity = records + 1
    payload = b"\xff\xd8" + bytes(38)
    with RecordWriter(data_dir / "train.rec", data_dir / "train.idx") as writer:
        write = writer.write
        write(0, pack(IRHeader(2, (float(first_identity), float(first_identity + classes)), 0, 0), b""))
        # one record per class, written PER_CLASS times: only the record index matters here
        for c in range(classes):
            record = pack(IRHeader(0, float(c), 0, 0), payload)
            lo = 1 + c * PER_CLASS
            for key in range(lo, min(first_identity, lo + PER_CLASS)):
                write(key, record)
        for c in range(classes):
            lo = 1 + c * PER_CLASS
            write(first_identity + c, pack(IRHeader(2, (float(lo), float(min(first_identity, lo + PER_CLASS))),
                                                    0, 0), b""))
    (data_dir / "property").write_text(f"{classes},112,112\n")
    (data_dir / "bench.json").write_text(json.dumps({"records": records}))
    return data_dir


def _cached(data_dir: Path, marker: Dict[str, int]) -> bool:
    path = data_dir / "bench.json"
    return path.is_file() and json.loads(path.read_text()) == marker


def timed_copy(src: Path, dst: Path) -> Tuple[float, float]:
    """(wall seconds, CPU seconds) of ``shutil.copyfile``; the copy is deleted after."""
    cpu, start = time.process_time(), time.perf_counter()
    shutil.copyfile(src, dst)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    dst.unlink()
    return wall, cpu


# --------------------------------------------------------------------------- the fresh-interpreter side
def _peak_rss_kb() -> int:
    """This process's own peak RSS (VmHWM), in KiB."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure_conversion(src: str, out: str, workers: int, shard_size: int) -> Dict[str, Any]:
    """One conversion in this process: time, CPU time (with the workers), peak RSS of main and workers."""
    from lresnet.convert.convert_rec import convert_rec

    cpu, start = _cpu_seconds(), time.perf_counter()
    summary = convert_rec(src, out, shard_size=shard_size, workers=workers, sets=[])
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "images": summary.num_samples, "bytes": summary.bytes,
            "rss_main_kb": _peak_rss_kb(),
            "rss_workers_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}


def measure_index(src: str) -> Dict[str, Any]:
    """Peak RSS of convert-rec's per-record state (record index + shuffle plan) in this process."""
    from lresnet.convert.convert_rec import shuffle_plan
    from lresnet.convert.recordio import FacesEmore

    base = _peak_rss_kb()
    with FacesEmore(src) as fe:
        keys = fe.image_key_range if fe.image_key_range is not None else fe.image_key_array
        plan = shuffle_plan(keys, 0)
    return {"records": int(plan.size), "rss_kb": _peak_rss_kb(), "rss_imports_kb": base}


def _in_fresh_interpreter(*args: str) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "lresnet.convert.bench", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {args[0]} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> None:
    """``convert SRC OUT WORKERS SHARD_SIZE`` or ``index SRC``: measure, print one JSON line."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["convert"] and len(args) == 5:
        result = measure_conversion(args[1], args[2], int(args[3]), int(args[4]))
    elif args[:1] == ["index"] and len(args) == 2:
        result = measure_index(args[1])
    else:
        raise SystemExit("usage: python -m lresnet.convert.bench convert SRC OUT WORKERS SHARD_SIZE | index SRC")
    sys.stdout.write(json.dumps(result) + "\n")


# --------------------------------------------------------------------------- the benchmark
def _convert_in_child(src: Path, out: Path, workers: int, shard_size: int) -> Dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    result = _in_fresh_interpreter("convert", str(src), str(out), str(workers), str(shard_size))
    shutil.rmtree(out)
    return result


def bench_convert(images: int = 50000, workers: int = 2, shard_size: int = 5000, data_dir: Optional[Path] = None,
                  seed: int = 0, index_records: int = 5_800_000) -> Dict[str, Any]:
    """Conversion throughput vs a plain copy of the same ``train.rec``, and peak RSS at two sizes.

    Args:
        images: images in the large synthetic set (the small one has a quarter of them).
        data_dir: cache folder for the synthetic sets (reused when present); None: a temporary
            folder, removed afterwards.
        index_records: records of the index-only set (faces_emore: 5.8M); 0 skips it.

    Returns:
        ``{"images", "workers", "shard_size", "rec_mb", "copy_seconds", "copy_cpu_seconds",
        "copy_mb_s", "convert_seconds", "convert_images_s", "convert_mb_s", "ratio_to_copy",
        "convert_cpu_seconds", "convert_cpu_us_per_image", "ratio_to_copy_cpu_normalized",
        "rss": {images: {"main_mb", "worker_mb"}}, "index_rss": {...}}``.

    Raises:
        InputError: counts below 1 (``index_records`` below 0).
    """
    if images < 1 or workers < 1 or shard_size < 1 or index_records < 0:
        raise InputError("--images/--workers/--shard-size/--index-records",
                         f"got {images}/{workers}/{shard_size}/{index_records}, expected >= 1/>= 1/>= 1/>= 0")
    tmp_root = None
    if data_dir is None:
        tmp_root = data_dir = Path(tempfile.mkdtemp(prefix="lresnet-bench-convert-"))
    data_dir = Path(data_dir)
    try:
        small_n = max(1, images // 4)
        log.info("synthesizing %d + %d images in %s (cached)", images, small_n, data_dir)
        big = ensure_synthetic(data_dir / f"synth-{images}", images, seed)
        small = ensure_synthetic(data_dir / f"synth-{small_n}", small_n, seed + 1)
        rec = big / "train.rec"
        rec_bytes = rec.stat().st_size
        work = data_dir / "work"
        work.mkdir(exist_ok=True)
        # the copy baseline, before and after the conversion; the faster copy is the baseline
        copies = [timed_copy(rec, work / "copy.rec")]
        log.info("converting (large set)")
        conv_big = _convert_in_child(big, work / "out-big", workers, shard_size)
        copies.append(timed_copy(rec, work / "copy.rec"))
        log.info("converting (small set)")
        conv_small = _convert_in_child(small, work / "out-small", workers, shard_size)
        index_rss: Dict[str, Any] = {}
        if index_records > 0:
            log.info("index-only set of %d records (main-process state)", index_records)
            index_rss = _in_fresh_interpreter("index", str(ensure_index_only(data_dir / f"index-{index_records}",
                                                                             index_records)))
    finally:
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)
    copy_wall, copy_cpu = min(copies)
    copy_mb_s = rec_bytes / copy_wall / 1e6
    conv_mb_s = rec_bytes / conv_big["seconds"] / 1e6
    result: Dict[str, Any] = {
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
        "rss": {str(c["images"]): {"main_mb": c["rss_main_kb"] / 1024, "worker_mb": c["rss_workers_kb"] / 1024}
                for c in (conv_small, conv_big)},
    }
    if index_rss:
        grown = index_rss["rss_kb"] - index_rss["rss_imports_kb"]
        result["index_rss"] = {"records": index_rss["records"], "main_mb": index_rss["rss_kb"] / 1024,
                               "after_imports_mb": index_rss["rss_imports_kb"] / 1024,
                               "bytes_per_record": grown * 1024 / max(1, index_rss["records"])}
    return result


if __name__ == "__main__":
    main()
