"""The shard manifest (``OUT/train/manifest.json``) and the resume record beside it.

``manifest.json`` is written once, atomically, when every shard is complete: its presence
means the conversion finished. Each finished shard is recorded at once in
``convert-state.json`` (same header, shards keyed by name, plus per-shard counters such as
skipped records); a rerun with the same settings skips the shards recorded there and ends
with the same ``manifest.json`` as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

from lresnet.core.errors import InputError
from lresnet.core.files import atomic_file

PathLike = Union[str, "os.PathLike[str]"]

FORMAT = "lresnet-shards/1"
STATE_FORMAT = "lresnet-convert-state/1"
MANIFEST_NAME = "manifest.json"
STATE_NAME = "convert-state.json"
TRAIN_DIR = "train"
VAL_DIR = "val"

# Header fields that must agree for a rerun to resume (or reuse) earlier output.
SETTINGS_KEYS = ("seed", "shuffle", "shard_size", "key_digits", "source")


def shard_stem(index: int) -> str:
    """``train-%06d`` for shard ``index``."""
    return f"train-{index:06d}"


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Write JSON under a temporary name, then rename it into place."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")


def manifest_path(path_or_dir: PathLike) -> Path:
    """Find the manifest from ``OUT``, ``OUT/train`` or the manifest file itself."""
    p = Path(path_or_dir)
    if p.is_dir():
        for cand in (p / TRAIN_DIR / MANIFEST_NAME, p / MANIFEST_NAME):
            if cand.is_file():
                return cand
        state = [c for c in (p / TRAIN_DIR / STATE_NAME, p / STATE_NAME) if c.is_file()]
        if state:
            raise InputError(state[0], "conversion is incomplete (no manifest.json yet); "
                                         "rerun convert-rec with the same arguments to finish it")
        raise InputError(p, f"no {TRAIN_DIR}/{MANIFEST_NAME} here; is this a convert-rec output folder?")
    return p


def read_manifest(path_or_dir: PathLike) -> Dict[str, Any]:
    """Load and check a shard manifest.

    Args:
        path_or_dir: the conversion output folder, its ``train/`` folder, or ``manifest.json``.
    Returns:
        the manifest dict (``format``, ``num_samples``, ``num_classes``, ``image_size``,
        ``seed``, ``source``, ``shards`` = list of ``{name, count, bytes, sha256}``, ...).
    Raises:
        InputError: missing, unreadable, or not a ``lresnet-shards/1`` manifest.
    """
    path = manifest_path(path_or_dir)
    data = _load_json(path)
    if data.get("format") != FORMAT:
        raise InputError(path, f"format is {data.get('format')!r}, expected {FORMAT!r}")
    shards = data.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and {"name", "count", "bytes", "sha256"} <= s.keys() for s in shards):
        raise InputError(path, "'shards' must be a list of {name, count, bytes, sha256}")
    for key in ("num_samples", "num_classes", "image_size"):
        if key not in data:
            raise InputError(path, f"missing field {key!r}")
    for i, shard in enumerate(shards):
        if not is_plain_name(shard["name"]):
            raise InputError(path, f"shard name {shard['name']!r} is not a plain file name "
                             "(shards are read from the manifest's own folder)", where=f"shards[{i}]")
    classes = data["num_classes"]
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise InputError(path, f"num_classes is {classes!r}, expected an integer >= 1")
    if sum(s["count"] for s in shards) != data["num_samples"]:
        raise InputError(path, "num_samples differs from the sum of the shard counts")
    return data


def is_plain_name(name: Any) -> bool:
    """True for a file name with no folder part: not empty, not ``.``/``..``, no slash or NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
            and os.path.basename(name) == name)


def _load_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot read JSON: {err}") from None
    if not isinstance(data, dict):
        raise InputError(path, "expected a JSON object")
    return data


def read_state(train_dir: PathLike) -> Optional[Dict[str, Any]]:
    """The per-shard record of a conversion (finished or not), or None if absent or unreadable."""
    path = Path(train_dir) / STATE_NAME
    if not path.is_file():
        return None
    try:
        data = _load_json(path)
    except InputError:
        return None  # a resume record is only a cache: an unreadable one means start over
    if data.get("format") != STATE_FORMAT or not isinstance(data.get("shards"), dict):
        return None
    return data


def settings_of(header: Dict[str, Any]) -> Dict[str, Any]:
    """The fields that decide the output bytes (compared before resuming)."""
    return {k: header.get(k) for k in SETTINGS_KEYS}


def describe_difference(old: Dict[str, Any], new: Dict[str, Any]) -> str:
    """``"seed 0 -> 1, shard_size 100 -> 50"`` for the settings that differ."""
    diffs = []
    for k in SETTINGS_KEYS:
        if old.get(k) != new.get(k):
            if isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
                for sk in sorted(set(old[k]) | set(new[k])):
                    if old[k].get(sk) != new[k].get(sk):
                        diffs.append(f"{k}.{sk} {old[k].get(sk)!r} -> {new[k].get(sk)!r}")
            else:
                diffs.append(f"{k} {old.get(k)!r} -> {new.get(k)!r}")
    return ", ".join(diffs)
