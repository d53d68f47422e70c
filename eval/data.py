"""Verification pair sets: converted ``<set>.tar`` shards or original InsightFace ``.bin`` files.

A ``<set>.tar`` holds one sample per pair in the original order: ``KEY.a.jpg``,
``KEY.b.jpg`` and ``KEY.same`` (``1`` or ``0``), read by the shard reader of
:mod:`lresnet.convert.shards`. A ``.bin`` is read through the safe
loader :func:`lresnet.convert.pairs.load_bin`. Both give the same :class:`PairSet`.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from lresnet.convert.shards import read_shard, split_member_name
from lresnet.core.errors import InputError

PathLike = Union[str, "os.PathLike[str]"]
IMAGE_SIZE = (112, 112)
_MEMBERS = ("a.jpg", "b.jpg", "same")


@dataclass(frozen=True, eq=False)
class PairSet:
    """A verification set in memory.

    Attributes:
        name: the set's name (``lfw``, ``agedb_30``, ...).
        images: uint8 ``[2N, H, W, 3]`` RGB; images ``2k`` and ``2k+1`` are pair ``k``.
        issame: bool ``[N]``.
        source: the file it was read from.
    """

    name: str
    images: np.ndarray = field(repr=False)
    issame: np.ndarray = field(repr=False)
    source: str = ""

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)


def available_sets(data_dir: PathLike) -> list[str]:
    """Names of the sets in ``data_dir`` (``<name>.tar`` or ``<name>.bin`` files), sorted."""
    folder = Path(data_dir)
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.iterdir() if p.suffix in (".tar", ".bin") and p.is_file()})


def find_set_file(name: str, data_dir: PathLike) -> Path:
    """The file holding set ``name`` in ``data_dir``: ``<name>.tar``, else ``<name>.bin``.

    Raises:
        InputError: no such folder, or no such set (the message lists the available ones).
    """
    folder = Path(data_dir)
    if not folder.is_dir():
        raise InputError(folder, "no such directory (expected the converted val/ folder "
                                 "with <set>.tar files, or a folder of <set>.bin files)")
    for suffix in (".tar", ".bin"):
        candidate = folder / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    sets = available_sets(folder)
    listed = ", ".join(sets) if sets else "none (no .tar or .bin files here)"
    hint = ""
    if not sets and available_sets(folder / "val"):
        hint = f" (the converted sets are in {folder / 'val'})"
    raise InputError(folder, f"unknown verification set {name!r}; available: {listed}{hint}")


def load_pair_set(name: str, data_dir: Optional[PathLike] = None, bin_path: Optional[PathLike] = None,
                  image_size: Optional[tuple[int, int]] = IMAGE_SIZE) -> PairSet:
    """Read and decode a verification set.

    Args:
        name: the set's name; with ``data_dir`` it selects ``<data_dir>/<name>.tar`` (or ``.bin``).
        data_dir: folder of converted pair tars (``OUT/val``) or of ``.bin`` files.
        bin_path: an original ``.bin`` file (takes precedence over ``data_dir``).
        image_size: required ``(height, width)``; None accepts any size shared by all images.

    Raises:
        InputError: missing file or set, damaged archive, missing pair member, undecodable or
            wrongly sized image, image count that is not two per pair.
    """
    if bin_path is not None:
        path = Path(bin_path)
    elif data_dir is not None:
        path = find_set_file(name, data_dir)
    else:
        raise InputError(None, f"set {name!r}: give a data directory or a .bin path")
    images, issame = _read_encoded(path)
    decoded = decode_images(images, path, image_size)
    return PairSet(name=name, images=decoded, issame=np.asarray(issame, dtype=bool), source=str(path))


def load_pair_labels(name: str, data_dir: Optional[PathLike] = None,
                     bin_path: Optional[PathLike] = None) -> tuple[np.ndarray, str]:
    """Only the ``issame`` flags of a set (no decoding) and the file they came from.

    Raises:
        InputError: as :func:`load_pair_set`, less the image checks.
    """
    path = Path(bin_path) if bin_path is not None else find_set_file(name, data_dir or ".")
    _, issame = _read_encoded(path)
    return np.asarray(issame, dtype=bool), str(path)


def _read_encoded(path: Path) -> tuple[list[bytes], list[bool]]:
    if not path.is_file():
        raise InputError(path, "no such file")
    if path.suffix == ".bin":
        return _read_bin(path)
    return _read_tar(path)


def _read_bin(path: Path) -> tuple[list[bytes], list[bool]]:
    from lresnet.convert.pairs import load_bin

    pairs = load_bin(path)
    if len(pairs.images) != 2 * len(pairs.issame):
        raise InputError(path, f"{len(pairs.images)} images for {len(pairs.issame)} pairs "
                               "(expected 2 per pair)")
    return list(pairs.images), list(pairs.issame)


def _is_pair_member(name: str) -> bool:
    return split_member_name(name)[1] in _MEMBERS


def _read_tar(path: Path) -> tuple[list[bytes], list[bool]]:
    """Pairs in archive order; every key needs a.jpg, b.jpg and same (other members are passed over)."""
    samples: dict[str, dict[str, bytes]] = {}
    for key, parts in read_shard(path, select=_is_pair_member):
        if not parts:
            continue
        sample = samples.setdefault(key, {})
        for ext in parts:  # a key met again after other samples: its members merge, none twice
            if ext in sample:
                raise InputError(path, f"duplicate member {key}.{ext}", where=f"key {key}")
        sample.update(parts)
    if not samples:
        raise InputError(path, "no pairs (expected samples KEY.a.jpg, KEY.b.jpg, KEY.same)")
    images: list[bytes] = []
    issame: list[bool] = []
    for index, (key, sample) in enumerate(samples.items()):
        missing = [m for m in _MEMBERS if m not in sample]
        if missing:
            raise InputError(path, f"pair lacks {', '.join(key + '.' + m for m in missing)} "
                                   "(odd number of images: every pair needs .a.jpg and .b.jpg)",
                             where=f"sample {index} (key {key})")
        flag = sample["same"].strip()
        if flag not in (b"0", b"1"):
            raise InputError(path, f"{key}.same is {flag[:20]!r}, expected 1 or 0",
                             where=f"sample {index}")
        images += [sample["a.jpg"], sample["b.jpg"]]
        issame.append(flag == b"1")
    return images, issame


def decode_images(encoded: Sequence[bytes], path: PathLike,
                  image_size: Optional[tuple[int, int]] = IMAGE_SIZE) -> np.ndarray:
    """Decode JPEGs (simplejpeg; other formats through Pillow) into uint8 ``[n, H, W, 3]`` RGB.

    Raises:
        InputError: an image does not decode, or its size differs from ``image_size``
            (or, when that is None, from the first image's).
    """
    import simplejpeg

    if len(encoded) == 0:
        raise InputError(path, "no images")
    out: Optional[np.ndarray] = None
    for i, data in enumerate(encoded):
        try:
            if data[:2] == b"\xff\xd8":
                img = simplejpeg.decode_jpeg(data, colorspace="RGB")
            else:
                img = _decode_other(data)
        except (ValueError, OSError) as err:
            raise InputError(path, f"image does not decode ({err})", where=f"image {i}") from None
        if out is None:
            want = tuple(image_size) if image_size is not None else img.shape[:2]
            out = np.empty((len(encoded), want[0], want[1], 3), dtype=np.uint8)
        if img.shape != out.shape[1:]:
            raise InputError(path, f"image is {img.shape[0]}x{img.shape[1]}, expected "
                                   f"{out.shape[1]}x{out.shape[2]}", where=f"image {i}")
        out[i] = img
    assert out is not None
    return out


def _decode_other(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError as err:
        raise ValueError(str(err)) from None


def load_embeddings(path: PathLike, num_pairs: int, expected_dim: Optional[int] = None) -> np.ndarray:
    """Read precomputed embeddings (``.npy``, rows in pair order ``2k, 2k+1``) for ``num_pairs`` pairs.

    Raises:
        InputError: missing or unreadable file, not a 2-D float array (wrong embedding
            dimension), an odd row count, a row count other than ``2 * num_pairs``, a width
            other than ``expected_dim``, or NaN/inf values.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        emb = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(path, f"not a readable .npy array ({err})") from None
    if not isinstance(emb, np.ndarray):
        raise InputError(path, "expected a .npy array, got an archive of arrays")
    if emb.ndim != 2 or emb.shape[1] < 1:
        raise InputError(path, f"wrong embedding dimension: expected a 2-D array [2N, D], "
                               f"got shape {tuple(emb.shape)}")
    if expected_dim is not None and emb.shape[1] != expected_dim:
        raise InputError(path, f"wrong embedding dimension: rows have {emb.shape[1]} values, "
                               f"expected {expected_dim}")
    if not (np.issubdtype(emb.dtype, np.floating) or np.issubdtype(emb.dtype, np.integer)):
        raise InputError(path, f"embeddings must be numbers, got dtype {emb.dtype}")
    if emb.shape[0] % 2:
        raise InputError(path, f"odd number of embeddings ({emb.shape[0]}): rows 2k and 2k+1 form pair k")
    if emb.shape[0] != 2 * num_pairs:
        raise InputError(path, f"embedding count mismatch: {emb.shape[0]} rows, the set has "
                               f"{num_pairs} pairs (expected {2 * num_pairs} rows)")
    if not np.all(np.isfinite(emb)):
        raise InputError(path, "embeddings contain NaN or infinite values")
    return emb
