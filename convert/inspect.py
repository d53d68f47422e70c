"""Check a conversion's output: the manifest summary and every shard's sha256."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

from lresnet.core.errors import InputError
from lresnet.convert.manifest import VAL_DIR, read_manifest, manifest_path
from lresnet.convert.shards import file_sha256

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify_shards`: files checked and bytes hashed."""

    shards: int
    val_sets: int
    bytes: int


def summarize(manifest: Dict[str, Any]) -> Dict[str, Any]:
    """The manifest's headline numbers (what ``lresnet inspect`` prints)."""
    shards = manifest["shards"]
    counts = [s["count"] for s in shards] or [0]
    return {
        "format": manifest["format"],
        "num_samples": manifest["num_samples"],
        "num_classes": manifest["num_classes"],
        "image_size": manifest["image_size"],
        "num_shards": len(shards),
        "shard_images_min": min(counts),
        "shard_images_max": max(counts),
        "bytes": sum(s["bytes"] for s in shards),
        "seed": manifest.get("seed"),
        "shuffle": manifest.get("shuffle"),
        "skipped_corrupt": manifest.get("skipped_corrupt", 0),
        "val": {v["set"]: v["pairs"] for v in manifest.get("val", [])},
    }


def verify_shards(out_dir: PathLike, progress: Optional[Callable[[int], None]] = None) -> VerifyReport:
    """Check that every shard (and val set) in the manifest exists with its size and sha256.

    Args:
        out_dir: the conversion output folder (or its ``train/`` folder, or the manifest).
        progress: called with the bytes of each file once it is hashed.
    Raises:
        InputError: naming every shard that is missing, has another size or another sha256 (one line).
    """
    path = manifest_path(out_dir)
    manifest = read_manifest(path)
    train_dir = path.parent
    val_dir = train_dir.parent / VAL_DIR
    files: List[tuple] = [(train_dir / s["name"], s) for s in manifest["shards"]]
    files += [(val_dir / v["name"], v) for v in manifest.get("val", [])]
    total = 0
    problems: List[str] = []
    for file, entry in files:
        problem = _check_file(file, entry)
        if problem is not None:
            problems.append(f"{file.name}: {problem}")
            continue
        total += entry["bytes"]
        if progress is not None:
            progress(entry["bytes"])
    if problems:
        raise InputError(train_dir, f"{len(problems)} of {len(files)} files do not match the manifest: "
                                    + "; ".join(problems))
    return VerifyReport(len(manifest["shards"]), len(manifest.get("val", [])), total)


def _check_file(file, entry: Dict[str, Any]) -> Optional[str]:
    """What is wrong with one listed file (None: its size and sha256 match)."""
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        return "listed in the manifest, missing"
    if size != entry["bytes"]:
        return f"size {size} bytes, the manifest says {entry['bytes']}"
    digest = file_sha256(file)
    if digest != entry["sha256"]:
        return f"sha256 {digest[:16]}... differs from the manifest's {entry['sha256'][:16]}... (damaged)"
    return None
