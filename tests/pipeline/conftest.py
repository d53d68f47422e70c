"""Tiny shards for the pipeline tests, made by the project's own writers (synth -> convert_rec).

One image per identity, so every label names exactly one sample: tests can check which samples
a rank or an epoch saw from the labels alone.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

SAMPLES = 240
SHARD_SIZE = 37  # 6 shards of 37 and one of 18


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    """A converted synthetic data set: OUT/train/train-00000{0..6}.tar + manifest.json."""
    from lresnet.convert.synthetic import synthetic_shards

    root = tmp_path_factory.mktemp("pipeline-data")
    synthetic_shards(root, identities=SAMPLES, images_per_id=1, seed=3, shard_size=SHARD_SIZE)
    return root / "shards"


def read_members(path: Path) -> list[tuple[str, bytes]]:
    """(name, payload) of every member of a tar, read with the standard library."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write members with the standard library's tarfile (ustar)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _corrupt_one_jpeg(shard: Path) -> str:
    members = read_members(shard)
    name = next(n for n, _ in members if n.endswith(".jpg"))
    write_tar(shard, [(n, d[:200] + b"\0" * 300 if n == name else d) for n, d in members])
    return name.rsplit(".", 1)[0]


def _corrupt_jpegs(shard: Path, count: int) -> dict[str, int]:
    """Overwrite the first `count` JPEGs of a shard with garbage; returns {key: its class}."""
    members = read_members(shard)
    keys = [n.rsplit(".", 1)[0] for n, _ in members if n.endswith(".jpg")][:count]
    classes = {n.rsplit(".", 1)[0]: int(d) for n, d in members if n.endswith(".cls")}
    bad = {k + ".jpg" for k in keys}
    write_tar(shard, [(n, d[:200] + b"\0" * 300 if n in bad else d) for n, d in members])
    return {k: classes[k] for k in keys}


@pytest.fixture
def corrupted_copy(tmp_path, synth_shards):
    """`corrupted_copy(count)` -> (copy of the shard set, {key: class} of its `count` garbled JPEGs),
    all in train-000002.tar (37 samples)."""

    def make(count: int):
        dst = tmp_path / f"corrupted-{count}"
        shutil.copytree(synth_shards, dst)
        return dst, _corrupt_jpegs(dst / "train" / "train-000002.tar", count)

    return make


def _truncate(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[: 512 * 21 + 100])  # inside the 6th sample


@pytest.fixture
def damaged_shards(tmp_path, synth_shards):
    """`damaged_shards("corrupt" | "truncated")` -> (copy of the shard set, damaged key or None).

    Shard train-000002.tar of the copy gets one JPEG overwritten with garbage (rewritten with the
    standard library's tarfile), or is cut short in the middle of a member.
    """

    def make(kind: str):
        dst = tmp_path / f"damaged-{kind}"
        shutil.copytree(synth_shards, dst)
        shard = dst / "train" / "train-000002.tar"
        key = _corrupt_one_jpeg(shard) if kind == "corrupt" else _truncate(shard)
        return dst, key

    return make


UNEVEN = [53, 17, 41, 30, 44, 29, 26]  # 240 samples in 7 shards of different sizes


@pytest.fixture(scope="session")
def uneven_shards(synth_shards, tmp_path_factory) -> list[str]:
    """The same 240 converted samples re-packed (with tarfile) into 7 shards of different sizes, no manifest."""
    members = [m for shard in sorted((synth_shards / "train").glob("train-*.tar")) for m in read_members(shard)]
    root = tmp_path_factory.mktemp("uneven")
    paths, start = [], 0
    for i, count in enumerate(UNEVEN):
        paths.append(str(write_tar(root / f"part-{i}.tar", members[2 * start:2 * (start + count)])))
        start += count
    return paths
