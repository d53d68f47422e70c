"""``lresnet bench ijb``: scoring an IJB-C-sized protocol from precomputed embeddings.

A synthetic set of IJB-C's size (469,375 images, 23,124 templates, 19,557 positive and 15,638,932
negative pairs, 512-d float32 embeddings and their flipped twins) is written as meta files and
``.npy`` files (no images), then :func:`lresnet.eval.ijb.evaluate_ijb` scores it in a child
process, whose wall time per stage and peak RSS are reported. The baseline, measured in the same
run, is the reference's own way of pooling (one ``np.where`` over all images per template, then
per media) and scoring (pairs in blocks of 100,000), timed on a sample and scaled to the full set.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lresnet.core.errors import InputError, PathLike
from lresnet.eval.ijb import IJBOptions, evaluate_ijb, meta_file

IJBC_SIZE = {"images": 469_375, "templates": 23_124, "positive_pairs": 19_557, "negative_pairs": 15_638_932}
_CHUNK = 1 << 16


def _fixed_width_lines(columns: list[np.ndarray], widths: list[int]) -> bytes:
    """Lines of space-separated non-negative integers, each printed in exactly its column's width."""
    count = columns[0].size
    line = sum(widths) + len(widths)
    buf = np.full((count, line), ord(" "), dtype=np.uint8)
    buf[:, -1] = ord("\n")
    at = 0
    for values, width in zip(columns, widths):
        v = values.astype(np.int64).copy()
        for digit in range(width - 1, -1, -1):
            buf[:, at + digit] = 48 + v % 10
            v //= 10
        at += width + 1
    return buf.tobytes()


def write_synthetic_ijb(root: PathLike, images: int = IJBC_SIZE["images"], templates: int = IJBC_SIZE["templates"],
                        positive_pairs: int = IJBC_SIZE["positive_pairs"],
                        negative_pairs: int = IJBC_SIZE["negative_pairs"], dim: int = 512, seed: int = 0,
                        target: str = "IJBC") -> dict[str, Any]:
    """Meta files and embeddings (``emb.npy``, ``emb_flip.npy`` in ``ROOT``) of a synthetic IJB set, no images.

    Templates belong to identities of four; an image's embedding is its identity's centre plus
    noise, so the ROC is not trivial. Template ids have six digits; images are in a random order.
    """
    if templates < 8 or images < templates or positive_pairs < 1 or negative_pairs < 1:
        raise InputError("--images/--templates", f"got {images} images, {templates} templates, expected "
                                                 ">= 8 templates and at least one image per template")
    rng = np.random.default_rng(seed)
    folder = Path(root) / target
    (folder / "meta").mkdir(parents=True, exist_ok=True)
    identities = templates // 4
    owner = np.arange(templates) % identities
    ids = np.sort(rng.choice(np.arange(100_000, 1_000_000), templates, replace=False))
    template_of = rng.permutation(np.concatenate([np.arange(templates), rng.integers(0, templates, images - templates)]))
    media_of = template_of * 16 + rng.integers(0, 4, images)
    names = [f"{k + 1}.jpg" for k in range(images)]
    meta_file(folder, target, "face_tid_mid").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in zip(names, ids[template_of].tolist(), media_of.tolist())))
    points = "38.295 51.696 73.532 51.501 56.025 71.737 41.549 92.365 70.730 92.204"
    scores = rng.uniform(0.5, 1.0, images)
    meta_file(folder, target, "name_5pts_score").write_text(
        "".join(f"{n} {points} {s:.4f}\n" for n, s in zip(names, scores.tolist())))

    a = rng.integers(0, identities, positive_pairs)
    first, second = rng.integers(0, 4, positive_pairs), rng.integers(1, 4, positive_pairs)
    pos = np.stack([a + identities * first, a + identities * ((first + second) % 4)], axis=1)
    pos = pos[pos.max(axis=1) < templates]
    neg = rng.integers(0, templates, (negative_pairs, 2))
    same = owner[neg[:, 0]] == owner[neg[:, 1]]
    neg[same, 1] = (neg[same, 1] + 1) % templates
    pairs = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    order = rng.permutation(len(pairs))
    with open(meta_file(folder, target, "template_pair_label"), "wb") as fh:
        for start in range(0, len(order), 1 << 20):
            part = order[start:start + (1 << 20)]
            fh.write(_fixed_width_lines([ids[pairs[part, 0]], ids[pairs[part, 1]], labels[part]], [6, 6, 1]))

    centres = rng.standard_normal((identities, dim)).astype(np.float32)
    paths = {}
    for label, noise in (("emb", 0.0), ("emb_flip", 0.3)):
        out = np.lib.format.open_memmap(Path(root) / f"{label}.npy", mode="w+", dtype=np.float32, shape=(images, dim))
        local = np.random.default_rng([seed, len(label)])
        for start in range(0, images, _CHUNK):
            t = template_of[start:start + _CHUNK]
            block = centres[owner[t]] + local.standard_normal((t.size, dim), dtype=np.float32) * (12.0 + noise)
            out[start:start + t.size] = block * local.uniform(5, 30, (t.size, 1)).astype(np.float32)
        out.flush()
        paths[label] = str(Path(root) / f"{label}.npy")
        del out
    return {"images": images, "templates": templates, "pairs": int(len(pairs)), "positive_pairs": int(len(pos)),
            "negative_pairs": int(len(neg)), "dim": dim, **paths}


def _peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (getrusage's ru_maxrss would also count what the
    parent held when this process was forked before its exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _score_child(root: str, threads: int, queue) -> None:
    """Child process: score the written set, send back the report's numbers and this process's peak RSS."""
    start, cpu = time.perf_counter(), time.process_time()
    report = evaluate_ijb(root, "IJBC", embeddings=Path(root) / "emb.npy", flip_embeddings=Path(root) / "emb_flip.npy",
                          options=IJBOptions(), threads=threads, keep_scores=False)
    wall = time.perf_counter() - start
    queue.put({"wall_s": wall, "cpu_s": time.process_time() - cpu, "report": report.as_dict(),
               "peak_rss_mb": _peak_rss_mb()})


def _baseline(root: Path, sample_templates: int = 40, sample_pairs: int = 300_000) -> dict[str, float]:
    """The reference's pooling loop (a full scan of the image list per template) and its 100,000-pair
    scoring blocks, timed on samples and scaled to the whole set."""
    from lresnet.eval.ijb import read_ijb_meta

    meta = read_ijb_meta(root, "IJBC")
    emb = np.load(root / "emb.npy", mmap_mode="r")
    unique = np.unique(meta.templates)
    start = time.perf_counter()
    for t in unique[:sample_templates]:
        rows = np.where(meta.templates == t)[0]
        feats = np.asarray(emb[rows])
        for m in np.unique(meta.medias[rows]):
            np.mean(feats[meta.medias[rows] == m], axis=0, keepdims=True)
    pool = (time.perf_counter() - start) * unique.size / min(sample_templates, unique.size)
    feats = np.random.default_rng(0).standard_normal((unique.size, emb.shape[1]))
    pick = np.random.default_rng(1).integers(0, unique.size, (sample_pairs, 2))
    start = time.perf_counter()
    for s in range(0, sample_pairs, 100_000):
        block = pick[s:s + 100_000]
        np.sum(feats[block[:, 0]][:, None] * feats[block[:, 1]][:, None], -1)
    score = (time.perf_counter() - start) * meta.num_pairs / sample_pairs
    return {"pool_s": pool, "score_s": score}


def bench_ijb(images: int = IJBC_SIZE["images"], templates: int = IJBC_SIZE["templates"],
              positive_pairs: int = IJBC_SIZE["positive_pairs"], negative_pairs: int = IJBC_SIZE["negative_pairs"],
              dim: int = 512, threads: int = 2, work_dir: Optional[PathLike] = None, baseline: bool = True,
              seed: int = 0) -> dict[str, Any]:
    """Write a synthetic IJB set (in ``work_dir``, kept; else a temporary folder) and time its scoring.

    Returns:
        ``{"format", "set": {...}, "threads", "wall_s", "cpu_s" (the scoring process's user + system
        time), "load_average" (other work on the machine), "seconds": per stage, "peak_rss_mb",
        "baseline": {...} or None, "speedup": ..., "tpr_at_fpr"}``.
    """
    keep = work_dir is not None
    root = Path(work_dir) if keep else Path(tempfile.mkdtemp(prefix="lresnet-bench-ijb-"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        info = write_synthetic_ijb(root, images, templates, positive_pairs, negative_pairs, dim, seed)
        write_s = time.perf_counter() - start
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=_score_child, args=(str(root), threads, queue))
        child.start()
        result = queue.get()
        child.join()
        base = _baseline(root) if baseline else None
    except OSError as err:
        raise InputError(err.filename or root, f"cannot write the synthetic set: {err.strerror or err}") from None
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    report = result["report"]
    total_base = sum(base.values()) + report["seconds"]["read_meta"] + report["seconds"]["roc"] if base else None
    return {"format": "lresnet-bench-ijb/1", "set": info, "write_s": round(write_s, 2), "threads": threads,
            "cpus": os.cpu_count(), "wall_s": round(result["wall_s"], 2), "cpu_s": round(result["cpu_s"], 2),
            "load_average": [round(v, 2) for v in os.getloadavg()], "seconds": report["seconds"],
            "peak_rss_mb": round(result["peak_rss_mb"], 1),
            "baseline": {k: round(v, 3) for k, v in base.items()} if base else None,
            "speedup": round(total_base / result["wall_s"], 1) if base else None,
            "tpr_at_fpr": report["tpr_at_fpr"], "auc": report["auc"]}


__all__ = ["IJBC_SIZE", "bench_ijb", "write_synthetic_ijb"]
