"""Resolve a training source to a list of shards with their sample counts.

A source is a shard directory (with `manifest.json`, or `train/manifest.json` below it), a manifest
path, a brace pattern (`/data/train/train-{000000..000579}.tar`), a single shard, or a list of
shard paths / `pipe:` URLs. Counts come from the manifest (shared/DESIGN.md); local shards without
one are counted by reading their tar headers; remote shards without a manifest are refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from lresnet.convert.manifest import MANIFEST_NAME, STATE_NAME, TRAIN_DIR, manifest_path, read_manifest
from lresnet.convert.shards import TarReadError, read_samples
from lresnet.core.errors import InputError
from lresnet.pipeline.stages import open_shard

Source = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]


@dataclass(frozen=True)
class ShardSet:
    """Shard URLs with their sample counts, and what the manifest says about the data set."""

    urls: list[str]
    counts: list[int]
    num_classes: Optional[int]
    image_size: Optional[tuple[int, int]]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand `{000..012}` ranges (zero padding kept) and `{a,b}` lists, as webdataset does."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    head, tail = pattern[:match.start()], pattern[match.end():]
    if ".." in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()):
            raise InputError(pattern, f"brace range {{{body}}} must be digits..digits")
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [expanded for item in items for expanded in expand_braces(head + item + tail)]


def _is_remote(url: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url)) and not url.startswith("file:") and not os.path.exists(url)


def _from_manifest(path: Path) -> ShardSet:
    path = manifest_path(path)
    manifest = read_manifest(path)
    base = path.parent
    urls = [str(base / s["name"]) for s in manifest["shards"]]
    size = manifest.get("image_size")
    return ShardSet(urls, [int(s["count"]) for s in manifest["shards"]], manifest.get("num_classes"),
                    tuple(size) if size else None)


def _refuse_unfinished(folder: Path) -> None:
    """A conversion folder without a manifest but with its resume record is half-written: counting its
    tar files would silently train on part of the data set."""
    for where in (folder, folder / TRAIN_DIR):
        if (where / STATE_NAME).is_file():
            raise InputError(where, f"conversion not finished: no {MANIFEST_NAME} ({STATE_NAME} present); "
                                    "rerun convert-rec")


def count_shard(url: str) -> tuple[int, int]:
    """(samples, largest class id + 1) of a local shard, read from its headers and `.cls` members."""
    classes = 0
    count = 0
    with open_shard(url) as stream:
        try:
            for _, parts in read_samples(stream):
                count += 1
                if "cls" in parts:
                    classes = max(classes, int(parts["cls"]) + 1)
        except TarReadError as err:
            raise InputError(url, err.message, where=err.where) from err
        except ValueError as err:
            raise InputError(url, f"bad class member: {err}", where=f"sample {count}") from err
    return count, classes


def resolve_source(source: Source, manifest: Optional[Union[str, "os.PathLike[str]"]] = None) -> ShardSet:
    """Turn any accepted source form into a ShardSet.

    `manifest` gives the counts of a shard list (matched by file name; for `pipe:` URLs the name
    of the last word, e.g. `pipe:curl -s https://host/train-000000.tar`); without it a manifest.json
    beside a local shard of the list is used, and local shards missing from it are counted.

    Raises:
        InputError: nothing found, an unreadable manifest, or remote shards with no counts.
    """
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        path = Path(text)
        if path.is_dir():
            for candidate in (path / MANIFEST_NAME, path / TRAIN_DIR / MANIFEST_NAME):
                if candidate.is_file():
                    return _from_manifest(candidate)
            _refuse_unfinished(path)
            urls = sorted(str(p) for p in path.glob("*.tar"))
            if not urls:
                raise InputError(path, "no manifest.json and no .tar shards in this directory")
        elif text.endswith(".json"):
            return _from_manifest(path)
        else:
            urls = expand_braces(text)
    else:
        urls = [os.fspath(u) for u in source]
    if not urls:
        raise InputError(None, "the shard list is empty")
    # counts from the given manifest, else from one beside the first local shard; matched by file name
    if manifest is None:
        local = next((Path(u) for u in urls if not _is_remote(u)), None)
        if local is not None and (local.parent / "manifest.json").is_file():
            manifest = local.parent / "manifest.json"
    known: dict[str, int] = {}
    num_classes: Optional[int] = None
    image_size = None
    if manifest is not None:
        listed = _from_manifest(Path(manifest))
        known = {os.path.basename(u): c for u, c in zip(listed.urls, listed.counts)}
        num_classes, image_size = listed.num_classes, listed.image_size
    counts = []
    classes = 0
    for url in urls:
        name = os.path.basename(url.split()[-1]) if _is_remote(url) else os.path.basename(url)
        if name in known:
            counts.append(known[name])
        elif _is_remote(url):
            raise InputError(url, "remote shard with no sample count: pass its manifest.json (manifest=...)")
        elif not os.path.exists(url):
            raise InputError(url, "shard not found")
        else:
            count, top = count_shard(url)
            counts.append(count)
            classes = max(classes, top)
    if num_classes is None and classes:
        num_classes = classes
    return ShardSet(urls, counts, num_classes, image_size)
