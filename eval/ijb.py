"""IJB-B / IJB-C template-based 1:1 verification, number for number as arcface_torch's ``eval_ijbc.py``.

    >>> from lresnet.eval.ijb import IJBOptions, evaluate_ijb
    >>> report = evaluate_ijb("data", "IJBC", embeddings="e.npy", flip_embeddings="f.npy")
    >>> report.tpr_at_fpr["1e-4"], report.auc, report.as_dict()

Layout (``ROOT/IJBC``, or ``ROOT/IJBB`` with ``ijbb_`` files)::

    meta/ijbc_face_tid_mid.txt        image template_id media_id        (one line per image)
    meta/ijbc_name_5pts_score.txt     image x1 y1 ... x5 y5 detector_score   (same images, same order)
    meta/ijbc_template_pair_label.txt template_1 template_2 label       (1 = same person)
    loose_crop/<image>

What is computed (deepinsight/insightface ``recognition/arcface_torch/eval_ijbc.py`` at
7fadd420c2351d0ffa8cac403421c1a3ed733365, read for what its code does where its comments say
otherwise):

1. every loose crop is aligned to the ArcFace template (:mod:`lresnet.eval.align`), fed as
   ``(x / 255 - 0.5) / 0.5`` RGB, and its mirror too: per image an embedding ``e`` and a
   flipped one ``f`` (float32);
2. image feature: ``e + f`` with flip, else ``e`` (its settings comment calls the flip mode "F1",
   which a later comment names "concat"; the code runs "F2", the sum); without norm-score it is
   divided by its L2 norm, with norm-score
   (the default) it is left as is, so the norm weights the image; with detector-score it is
   multiplied by the detector score. All in float32, as the reference;
3. media pooling: the images of one template from the same media are averaged (``np.mean``, in
   file order), then a template is the sum of its media (in increasing media id) in float32,
   stored as float64 and L2-normalised by sklearn's ``normalize`` (norms below ``10 * eps``
   count as 0). The image and media features are *not* normalised, whatever the comments say;
4. a pair's score is the cosine of its two templates, ``np.sum(a * b, -1)`` in float64;
5. the ROC is sklearn's ``roc_curve(labels, scores)`` with ``drop_intermediate=True`` (only its
   corner points), the AUC ``auc(fpr, tpr)``; the TPR "at" FPR 1e-6 ... 1e-1 is the TPR of the
   ROC point whose FPR is *nearest* to the target (above or below it; among equal FPRs the
   highest TPR), not the TPR at FPR <= target.

Every step reproduces the reference's floating-point operations in the same order (checked in the
tests against a literal transcription of it and against scikit-learn), so the numbers are the
same to the last bit, while scoring IJB-C's 15.7 M pairs from embeddings takes well under a minute
in bounded memory: embedding rows are read from the ``.npy`` files a chunk of templates at a time,
pairs are scored in cache-sized tiles, the ROC comes from sorted scores. Where the reference
silently mis-scores (a pair naming a template no image has: it falls back to template row 0, or
crashes past the largest id; the two image lists in different orders; degenerate landmarks, for
which scikit-image returns NaNs), lresnet raises :class:`InputError`.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from lresnet.core.errors import InputError, PathLike
from lresnet.eval.align import ALIGNED_SIZE, WARP_OPENCV4, WARPS, align_face, decode_image

if TYPE_CHECKING:
    from lresnet.eval.embed import Encoder


TARGETS = ("IJBC", "IJBB")
# the reference's x_labels, 10 ** -6 ... 10 ** -1, and the keys reports use for them
FPR_TARGETS = tuple(10 ** -k for k in range(6, 0, -1))
FPR_KEYS = tuple(f"1e-{k}" for k in range(6, 0, -1))
LANDMARK_VALUES = 10

# progress(stage, done, total); stages "embed", "pool", "score"
IJBProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class IJBOptions:
    """The reference's three switches, its settings by default.

    Attributes:
        flip: image feature = embedding + embedding of the mirrored crop (else the embedding alone).
        norm_score: keep the feature norm as a weight (else L2-normalise each image feature).
        detector_score: multiply each image feature by its face detector score.
    """

    flip: bool = True
    norm_score: bool = True
    detector_score: bool = True


@dataclass(frozen=True, eq=False)
class IJBMeta:
    """The three meta files of one target, parsed and cross-checked.

    Attributes:
        target: ``"IJBC"`` or ``"IJBB"``.
        folder: ``ROOT/<target>``.
        names: image file names (relative to ``loose_crop/``), in file order.
        templates, medias: int64 ``[N]`` template and media id of each image.
        landmarks: float32 ``[N, 5, 2]``; detector_scores: float32 ``[N]``.
        template_ids: int64 ``[T]``, the sorted distinct template ids (the reference's ``unique_templates``).
        pairs: int32 ``[P, 2]``, each pair's two rows of ``template_ids``; labels: int8 ``[P]`` (1 = same).
    """

    target: str
    folder: Path
    names: Sequence[str] = field(repr=False)
    templates: np.ndarray = field(repr=False)
    medias: np.ndarray = field(repr=False)
    landmarks: np.ndarray = field(repr=False)
    detector_scores: np.ndarray = field(repr=False)
    template_ids: np.ndarray = field(repr=False)
    pairs: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)

    @property
    def num_images(self) -> int:
        return int(self.templates.size)

    @property
    def num_pairs(self) -> int:
        return int(self.labels.size)

    @property
    def crop_dir(self) -> Path:
        return self.folder / "loose_crop"

    def meta_file(self, kind: str) -> Path:
        """``meta/<target>_<kind>.txt`` (kind: ``face_tid_mid``, ``name_5pts_score``, ``template_pair_label``)."""
        return meta_file(self.folder, self.target, kind)


@dataclass(frozen=True, eq=False)
class IJBReport:
    """The numbers of one IJB target (what ``verify --ijb`` prints).

    Attributes:
        tpr_at_fpr: ``{"1e-6": tpr, ..., "1e-1": tpr}``, fractions in [0, 1], read as the reference.
        fpr_of_point: the FPR of the ROC point each TPR was read at (the nearest to the target).
        auc: the ROC AUC (``sklearn.metrics.auc`` of the ROC above).
        roc_fpr, roc_tpr: the ROC points; scores: the score of every pair, in pair-file order.
        seconds: wall time of each stage.
    """

    target: str
    folder: str
    images: int
    templates: int
    pairs: int
    positive_pairs: int
    negative_pairs: int
    tpr_at_fpr: dict[str, float]
    fpr_of_point: dict[str, float]
    auc: float
    embedding_size: int
    options: IJBOptions
    source: str
    seconds: dict[str, float] = field(default_factory=dict)
    roc_fpr: Optional[np.ndarray] = field(default=None, repr=False)
    roc_tpr: Optional[np.ndarray] = field(default=None, repr=False)
    scores: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def roc_far(self) -> Optional[np.ndarray]:
        """The ROC's false positive rates under the name pair-set results use (so the ROC plot of
        ``verify`` draws an IJB report as it draws a set)."""
        return self.roc_fpr

    @property
    def roc_tar(self) -> Optional[np.ndarray]:
        """The ROC's true positive rates (see :attr:`roc_far`)."""
        return self.roc_tpr

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the ``ijb`` object of ``verify --ijb --json``."""
        return {
            "target": self.target, "data": self.folder, "source": self.source,
            "images": self.images, "templates": self.templates, "pairs": self.pairs,
            "positive_pairs": self.positive_pairs, "negative_pairs": self.negative_pairs,
            "flip": self.options.flip, "norm_score": self.options.norm_score,
            "detector_score": self.options.detector_score, "embedding_size": self.embedding_size,
            "tpr_at_fpr": dict(self.tpr_at_fpr), "fpr_of_point": dict(self.fpr_of_point),
            "auc": self.auc, "roc_points": int(self.roc_fpr.size) if self.roc_fpr is not None else None,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


# --------------------------------------------------------------------------- meta files
def meta_file(folder: PathLike, target: str, kind: str) -> Path:
    """``FOLDER/meta/<target>_<kind>.txt``, e.g. ``IJBC/meta/ijbc_face_tid_mid.txt``."""
    return Path(folder) / "meta" / f"{target.lower()}_{kind}.txt"


def ijb_folder(root: PathLike, target: str) -> Path:
    """``ROOT/<target>`` (or ROOT itself when it is that folder).

    Raises:
        InputError: unknown target, or no such folder.
    """
    if target not in TARGETS:
        raise InputError("--ijb", f"got {target!r}, expected one of {', '.join(TARGETS)}")
    root = Path(root)
    for folder in (root / target, root):
        if (folder / "meta").is_dir() and (folder is not root or root.name.upper() == target):
            return folder
    raise InputError(root, f"no {target}/meta folder here (expected ROOT/{target}/meta/"
                           f"{target.lower()}_face_tid_mid.txt ...)")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(path, "no such file (an IJB meta file)")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read: {getattr(err, 'strerror', None) or err}") from None


def _split_names(path: Path, text: str) -> tuple[list[str], list[str]]:
    """``(first field of each line, the rest of it)``; blank lines at the end are ignored."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise InputError(path, "empty file")
    names, rests = [], []
    for line in lines:
        name, _, rest = line.strip().partition(" ")
        names.append(name)
        rests.append(rest)
    return names, rests


def _numbers(path: Path, rows: Sequence[str], per_row: int, dtype: type, what: str,
             lines: Optional[Sequence[int]] = None) -> np.ndarray:
    """``[len(rows), per_row]`` numbers from whitespace-separated text rows (``lines``: their line
    numbers, default 1, 2, ...).

    One C-level parse of all rows (Python's own float/int rounding); on any problem each row is
    parsed alone, so the error names its line.
    """
    values = None
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # numpy's "could not be read to its end"
        try:
            values = np.fromstring(" ".join(rows), dtype=dtype, sep=" ")
        except (DeprecationWarning, ValueError):
            values = None
    if values is not None and values.size == len(rows) * per_row:
        return values.reshape(len(rows), per_row)
    for number, row in zip(lines or range(1, len(rows) + 1), rows):
        parts = row.split()
        if len(parts) != per_row:
            raise InputError(path, f"got {len(parts)} values, expected {per_row} ({what})", where=f"line {number}")
        try:
            [(int if dtype is np.int64 else float)(v) for v in parts]
        except (ValueError, OverflowError):
            raise InputError(path, f"got {row.strip()[:60]!r}, expected numbers ({what})", where=f"line {number}") from None
    raise InputError(path, f"cannot parse ({what})")  # pragma: no cover - every row parsed alone


def _read_face_tid_mid(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, rests = _split_names(path, _read_text(path))
    ids = _numbers(path, rests, 2, np.int64, "image template_id media_id")
    return names, ids[:, 0].copy(), ids[:, 1].copy()


def _read_name_5pts_score(path: Path, names: Sequence[str], names_file: Path) -> tuple[np.ndarray, np.ndarray]:
    own, rests = _split_names(path, _read_text(path))
    if len(own) != len(names):
        raise InputError(path, f"got {len(own)} images, expected {len(names)} (one per line of {names_file.name})")
    if own != list(names):
        line = next(k for k, (a, b) in enumerate(zip(own, names)) if a != b)
        raise InputError(path, f"image {own[line]!r}, but line {line + 1} of {names_file.name} is {names[line]!r} "
                               "(both files must list the same images in the same order)", where=f"line {line + 1}")
    values = _numbers(path, rests, LANDMARK_VALUES + 1, np.float64, "image, 5 x/y landmark points, detector score")
    # the reference parses landmarks with float() and scores with a str -> float32 cast: both round the
    # decimal to the nearest float64 first, so float32 of the float64 value is what it gets
    landmarks = values[:, :LANDMARK_VALUES].astype(np.float32).reshape(-1, 5, 2)
    detector = values[:, LANDMARK_VALUES].astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(landmarks).all(axis=(1, 2)) | ~np.isfinite(detector))
    if bad.size:
        raise InputError(path, "landmarks and detector score must be finite", where=f"line {bad[0] + 1}")
    return landmarks, detector


def _read_pairs(path: Path, template_ids: np.ndarray, tid_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """int32 ``[P, 2]`` rows into ``template_ids`` and int8 labels, parsed 32 MB at a time."""
    if not path.is_file():
        raise InputError(path, "no such file (an IJB meta file)")
    rows_of = _TemplateRows(template_ids, path, tid_file)
    pairs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    line = 1
    try:
        with open(path, "rb") as fh:
            carry = b""
            while True:
                block = fh.read(1 << 25)
                data = carry + block
                cut = len(data) if not block else data.rfind(b"\n") + 1
                data, carry = data[:cut], data[cut:]
                count = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
                table = _fast_ints(data, 3 * count)
                numbers = np.arange(line, line + count)
                if table is None:  # a blank or a bad line in this block: line by line, skipping blank ones
                    rows = data.decode("ascii", errors="replace").splitlines()
                    kept = [k for k, r in enumerate(rows) if r.strip()]
                    numbers = numbers[kept]
                    table = _numbers(path, [rows[k] for k in kept], 3, np.int64, "template_1 template_2 label",
                                     lines=numbers.tolist())
                table = table.reshape(-1, 3)
                if table.size:
                    pairs.append(rows_of(table[:, :2], numbers))
                    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
                    if bad.size:
                        raise InputError(path, f"got label {table[bad[0], 2]}, expected 1 (same person) or 0",
                                         where=f"line {numbers[bad[0]]}")
                    labels.append(table[:, 2].astype(np.int8))
                line += count
                if not block:
                    break
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror or err}") from None
    if not pairs:
        raise InputError(path, "no pairs")
    return np.concatenate(pairs), np.concatenate(labels)


def _fast_ints(data: bytes, expected: int) -> Optional[np.ndarray]:
    """The whitespace-separated integers of ``data`` if there are exactly ``expected`` of them, else None."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # numpy's "could not be read to its end"
        try:
            values = np.fromstring(data, dtype=np.int64, sep=" ")
        except (DeprecationWarning, ValueError):
            return None
    return values if values.size == expected else None


class _TemplateRows:
    """Template ids -> rows of the sorted ``template_ids`` (a lookup table when the ids are small);
    a template no image has is an error (the reference scores it as row 0, or crashes past the
    largest id)."""

    def __init__(self, template_ids: np.ndarray, pair_file: Path, tid_file: Path):
        self.template_ids, self.pair_file, self.tid_file = template_ids, pair_file, tid_file
        self.table: Optional[np.ndarray] = None
        if template_ids.size and 0 <= template_ids[0] and template_ids[-1] < (1 << 26):
            self.table = np.full(int(template_ids[-1]) + 2, -1, dtype=np.int32)
            self.table[template_ids] = np.arange(template_ids.size, dtype=np.int32)

    def __call__(self, ids: np.ndarray, lines: np.ndarray) -> np.ndarray:
        if self.table is not None:
            index = self.table[np.clip(ids, -1, self.table.size - 1)]  # -1 and past-the-end hit the -1 slot
            found = index >= 0
        else:
            index = np.searchsorted(self.template_ids, ids)
            found = index < self.template_ids.size
            found[found] = self.template_ids[index[found]] == ids[found]
        if not found.all():
            row, column = divmod(int(np.flatnonzero(~found.reshape(-1))[0]), 2)
            raise InputError(self.pair_file, f"template {ids[row, column]} has no image in {self.tid_file.name}",
                             where=f"line {lines[row]}")
        return index.astype(np.int32, copy=False)


def read_ijb_meta(root: PathLike, target: str = "IJBC") -> IJBMeta:
    """Read and cross-check ``ROOT/<target>/meta``.

    Raises:
        InputError: a missing meta file, a line with the wrong number of fields (e.g. a landmark
            line without 10 values), non-numbers, the two image lists disagreeing, a pair naming
            a template no image has, a label other than 0/1, no positive or no negative pair.
    """
    folder = ijb_folder(root, target)
    tid_file = meta_file(folder, target, "face_tid_mid")
    names, templates, medias = _read_face_tid_mid(tid_file)
    landmarks, detector = _read_name_5pts_score(meta_file(folder, target, "name_5pts_score"), names, tid_file)
    template_ids = np.unique(templates)
    pair_file = meta_file(folder, target, "template_pair_label")
    pairs, labels = _read_pairs(pair_file, template_ids, tid_file)
    positives = int(labels.sum(dtype=np.int64))
    if positives == 0 or positives == labels.size:
        raise InputError(pair_file, f"{positives} positive and {labels.size - positives} negative pairs; "
                                    "the ROC needs both")
    return IJBMeta(target, folder, names, templates, medias, landmarks, detector, template_ids, pairs, labels)


# --------------------------------------------------------------------------- image features
class EmbeddingRows:
    """Rows of a float ``[N, D]`` ``.npy`` file read on demand with positional reads (no memory map:
    the kernel maps pages around every touched one, so random rows would soon map the whole file
    into the process), or of an array.

    Raises:
        InputError: missing or unreadable file, not 2-D floats, a row count other than ``rows``,
            a width other than ``dim``.
    """

    def __init__(self, source: Union[PathLike, np.ndarray], rows: int, option: str = "--embeddings",
                 dim: Optional[int] = None):
        self.option = option
        self.path: Optional[Path] = None
        if isinstance(source, np.ndarray):
            self._array: Optional[np.ndarray] = source
            shape, dtype = source.shape, source.dtype
        else:
            self.path, self._array = Path(source), None
            shape, dtype, self._offset = self._header()
        where = self.path or option
        if len(shape) != 2 or not np.issubdtype(dtype, np.floating):
            raise InputError(where, f"got {dtype} {tuple(shape)}, expected float32 [images, D] ({option})")
        if shape[0] != rows:
            raise InputError(where, f"got {shape[0]} rows, expected {rows} (one per line of the face_tid_mid "
                                    "file, in its order)")
        if dim is not None and shape[1] != dim:
            raise InputError(where, f"got rows of {shape[1]} values, expected {dim} (as the other embeddings)")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def _header(self) -> tuple[tuple, np.dtype, int]:
        assert self.path is not None
        if not self.path.is_file():
            raise InputError(self.path, "no such file")
        try:
            with open(self.path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(fh)
                offset = fh.tell()
            size = self.path.stat().st_size
        except (ValueError, OSError, EOFError) as err:
            raise InputError(self.path, f"not a readable .npy array ({err})") from None
        if fortran and len(shape) == 2 and shape[0] > 1 and shape[1] > 1:
            raise InputError(self.path, "rows are not contiguous (Fortran order); save with np.save(np.ascontiguousarray(a))")
        if dtype.hasobject or size < offset + int(np.prod(shape)) * dtype.itemsize:
            raise InputError(self.path, f"not a readable .npy array (truncated, or {dtype} objects)")
        return shape, dtype, offset

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 rows, read in the order given (ascending is fastest); NaN or infinity is an error
        naming the row."""
        if self._array is not None:
            block = np.asarray(self._array[rows], dtype=np.float32)
        else:
            block = self._read(rows).astype(np.float32, copy=False)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            raise InputError(self.path or self.option, "NaN or infinite values",
                             where=f"row {rows[np.flatnonzero(~finite)[0]]}")
        return block

    def _read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((rows.size, self.shape[1]), dtype=self.dtype)
        width = self.shape[1] * self.dtype.itemsize
        view = memoryview(out.reshape(-1).view(np.uint8))
        runs = np.flatnonzero(np.diff(rows) != 1) + 1  # consecutive rows are read together
        starts = np.concatenate([[0], runs]).tolist()
        stops = np.concatenate([runs, [rows.size]]).tolist()
        try:
            with open(self.path, "rb", buffering=0) as fh:
                fd = fh.fileno()
                for lo, hi in zip(starts, stops):
                    got = os.preadv(fd, [view[lo * width:hi * width]], self._offset + int(rows[lo]) * width)
                    if got != (hi - lo) * width:
                        raise InputError(self.path, "file ended early", where=f"row {rows[lo]}")
        except OSError as err:
            raise InputError(self.path, f"cannot read: {err.strerror or err}") from None
        return out


class _ImageFeatures:
    """Image features for rows of the image list: embedding (+ flipped), norm and detector weighting,
    with exactly the reference's float32 operations."""

    def __init__(self, embeddings: EmbeddingRows, flipped: Optional[EmbeddingRows], detector: np.ndarray,
                 options: IJBOptions):
        self.embeddings = embeddings
        self.flipped = flipped if options.flip else None
        self.detector = detector
        self.options = options

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        perm = np.argsort(rows, kind="stable")
        ascending = rows[perm]
        feats = self.embeddings.take(ascending)
        if self.flipped is not None:
            feats = feats + self.flipped.take(ascending)
        if not self.options.norm_score:
            feats = feats / np.sqrt(np.sum(feats ** 2, -1, keepdims=True))
        if self.options.detector_score:
            feats = feats * self.detector[ascending][:, np.newaxis]
        out = np.empty_like(feats)
        out[perm] = feats
        return out


def segment_sums(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Row sums of consecutive segments, each added up one row after the other in order.

    ``values[starts[i]:starts[i] + counts[i]]`` is segment i; the result's row i is
    ``((v0 + v1) + v2) + ...`` in ``values``' dtype: the order ``np.sum(axis=0)`` and
    ``np.mean(axis=0)`` use for a ``[k, D]`` block, which the reference's pooling relies on.
    """
    out = values[starts].copy()
    if counts.size == 0:
        return out
    by_size = np.argsort(-counts, kind="stable")
    sizes = counts[by_size]
    first = starts[by_size]
    for k in range(1, int(sizes[0])):
        active = int(np.searchsorted(-sizes, -k, side="left"))  # segments longer than k: a prefix
        out[by_size[:active]] += values[first[:active] + k]
    return out


def _group_starts(*keys: np.ndarray) -> np.ndarray:
    """Start index of every run of equal ``keys`` (sorted arrays of one length)."""
    change = np.zeros(keys[0].size, dtype=bool)
    change[0] = True
    for key in keys:
        change[1:] |= key[1:] != key[:-1]
    return np.flatnonzero(change)


def normalise_like_sklearn(rows: np.ndarray) -> np.ndarray:
    """``sklearn.preprocessing.normalize(rows)`` (L2): norms below ``10 * eps`` are taken as 1."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0
    return rows / norms[:, np.newaxis]


def template_features(features: Callable[[np.ndarray], np.ndarray], templates: np.ndarray, medias: np.ndarray,
                      chunk_images: int = 16384, progress: Optional[IJBProgress] = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Media-then-template pooling: ``(sorted unique template ids, float64 unit template features)``.

    Args:
        features: rows -> float32 ``[len(rows), D]`` image features of those images.
        templates, medias: ids of each image.
        chunk_images: images per chunk (whole templates per chunk; bounds the memory).
    """
    count = templates.size
    order = np.lexsort((np.arange(count), medias, templates))  # template, media, file order
    t_sorted, m_sorted = templates[order], medias[order]
    template_starts = _group_starts(t_sorted)
    unique_templates = t_sorted[template_starts]
    template_ends = np.append(template_starts[1:], count)
    pooled: Optional[np.ndarray] = None
    first = 0
    while first < unique_templates.size:
        lo = template_starts[first]
        last = int(np.searchsorted(template_ends, lo + chunk_images, side="right"))
        last = max(last, first + 1)
        hi = template_ends[last - 1]
        feats = features(order[lo:hi])
        if pooled is None:
            pooled = np.empty((unique_templates.size, feats.shape[1]), dtype=np.float64)
        media_starts = _group_starts(t_sorted[lo:hi], m_sorted[lo:hi])
        media_counts = np.diff(np.append(media_starts, hi - lo))
        media = segment_sums(feats, media_starts, media_counts)
        np.true_divide(media, media_counts[:, np.newaxis], out=media, casting="unsafe")  # np.mean's division
        owner = _group_starts(t_sorted[lo:hi][media_starts])  # first media of each template
        pooled[first:last] = segment_sums(media, owner, np.diff(np.append(owner, media_starts.size)))
        if progress is not None:
            progress("pool", int(hi), count)
        first = last
    assert pooled is not None
    return unique_templates, normalise_like_sklearn(pooled)


# --------------------------------------------------------------------------- scores and ROC
def pair_scores(template_feats: np.ndarray, pairs: np.ndarray, threads: Optional[int] = None,
                chunk: int = 256, tile: int = 256, progress: Optional[IJBProgress] = None) -> np.ndarray:
    """float64 cosine score of each pair: ``np.sum(f[a] * f[b], -1)`` as the reference, bit for bit.

    Pairs are visited grouped by (a // tile, b // tile), so the template rows in use stay in the
    cache, in chunks small enough to stay there too, split over ``threads`` (numpy releases the GIL);
    each score is the same numpy operation on the same two rows, so the order changes no bit.
    """
    tiles = -(-template_feats.shape[0] // tile)
    key_type = np.int32 if tiles * tiles < (1 << 31) else np.int64
    key = (pairs[:, 0] // tile).astype(key_type) * tiles + pairs[:, 1] // tile
    order = np.argsort(key, kind="stable")  # a radix sort
    del key
    ranked = _scores_in_order(template_feats, pairs[order], threads, chunk, progress)
    scores = np.empty_like(ranked)
    scores[order] = ranked
    if progress is not None:
        progress("score", scores.size, scores.size)
    return scores


def _scores_in_order(template_feats: np.ndarray, visit: np.ndarray, threads: Optional[int], chunk: int,
                     progress: Optional[IJBProgress]) -> np.ndarray:
    total = visit.shape[0]
    ranked = np.empty(total, dtype=np.float64)
    threads = max(1, threads or min(os.cpu_count() or 1, 8))
    bounds = np.linspace(0, total, threads + 1).astype(np.int64)
    done = [0] * threads

    def work(part: int) -> None:
        a = np.empty((chunk, template_feats.shape[1]))
        b = np.empty_like(a)
        lo, hi = int(bounds[part]), int(bounds[part + 1])
        for start in range(lo, hi, chunk):
            stop = min(start + chunk, hi)
            n = stop - start
            np.take(template_feats, visit[start:stop, 0], axis=0, out=a[:n], mode="clip")
            np.take(template_feats, visit[start:stop, 1], axis=0, out=b[:n], mode="clip")
            np.multiply(a[:n], b[:n], out=a[:n])
            np.sum(a[:n], axis=-1, out=ranked[start:stop])
            done[part] = stop - lo
            if progress is not None and part == 0 and (start // chunk) % 512 == 0:
                progress("score", sum(done), total)

    if threads == 1:
        work(0)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(threads)))
    return ranked


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` of ``sklearn.metrics.roc_curve(labels, scores)`` (drop_intermediate=True).

    A point at every distinct score from the highest down, with (0, 0) first; points on a straight
    segment between two others are dropped, as scikit-learn does by default. Counted from sorted
    scores (a sort, no argsort: several times faster on 15 M pairs): at a score ``v`` the true
    positives are the positive pairs scoring ``>= v``, the false positives all others that do.
    """
    count = np.int64 if scores.size >= (1 << 31) else np.int32
    ranked = np.sort(scores)
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # first index of each distinct value
    values = ranked[starts]
    del ranked
    at_least = (scores.size - starts).astype(count)  # scores >= each value
    del starts
    positives = np.sort(scores[labels == 1])
    tps = (positives.size - np.searchsorted(positives, values, side="left")).astype(count)[::-1]  # highest first
    del values
    fps = at_least[::-1] - tps
    del at_least
    if fps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps = fps[keep], tps[keep]
    fps = np.r_[0, fps]
    tps = np.r_[0, tps]
    return fps / fps[-1], tps / tps[-1]


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """``sklearn.metrics.auc(fpr, tpr)``: the trapezoidal area under the ROC."""
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz
    return float(trapezoid(tpr, fpr))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, targets: Sequence[float] = FPR_TARGETS
               ) -> list[tuple[float, float]]:
    """``[(tpr, fpr of that point), ...]``: for each target, the ROC point with the FPR nearest to it.

    The reference flips the ROC (highest FPR first) and takes the first point of least
    ``|fpr - target|``: of equal FPRs the one with the highest TPR, of two equally near FPRs the
    larger one.
    """
    fpr_desc, tpr_desc = fpr[::-1], tpr[::-1]
    picks = []
    for target in targets:
        at = int(np.argmin(np.abs(fpr_desc - target)))
        picks.append((float(tpr_desc[at]), float(fpr_desc[at])))
    return picks


# --------------------------------------------------------------------------- embeddings
def _aligned_crops(meta: IJBMeta, rows: range, warp: str, pool: Optional[ThreadPoolExecutor]) -> np.ndarray:
    def one(row: int) -> np.ndarray:
        path = meta.crop_dir / meta.names[row]
        try:
            data = path.read_bytes()
        except OSError as err:
            raise InputError(path, f"cannot read: {err.strerror or err}") from None
        try:
            image = decode_image(data)
        except ValueError as err:
            raise InputError(path, f"image does not decode ({err})") from None
        try:
            return align_face(image, meta.landmarks[row], method=warp)
        except ValueError as err:
            raise InputError(meta.meta_file("name_5pts_score"), str(err), where=f"line {row + 1}") from None

    crops = list(pool.map(one, rows)) if pool is not None else [one(r) for r in rows]
    return np.stack(crops)


def ijb_aligned_batches(meta: IJBMeta, batch_size: int = 128, warp: str = WARP_OPENCV4, workers: int = 4
                        ) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, uint8 [B, 112, 112, 3] RGB)`` aligned crops of every image, in file order.

    Raises:
        InputError: an image is missing or does not decode, or its landmarks are degenerate.
    """
    if warp not in WARPS:
        raise InputError("--warp", f"got {warp!r}, expected one of {', '.join(WARPS)}")
    with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for start in range(0, meta.num_images, batch_size):
            yield start, _aligned_crops(meta, range(start, min(start + batch_size, meta.num_images)), warp, pool)


def _open_npy(path: Path, shape: tuple[int, ...], dtype) -> np.ndarray:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    except OSError as err:
        raise InputError(path, f"cannot write: {err.strerror or err}") from None


def extract_ijb_embeddings(meta: IJBMeta, encoder: "Encoder", flip: bool = True, batch_size: int = 128,
                           warp: str = WARP_OPENCV4, workers: int = 4, save_aligned: Optional[PathLike] = None,
                           save_embeddings: Optional[PathLike] = None,
                           progress: Optional[IJBProgress] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Embed every loose crop (aligned) and, with ``flip`` or ``save_embeddings``, its mirror.

    Args:
        encoder: uint8 RGB ``[B, 112, 112, 3]`` -> float32 ``[B, D]`` (:mod:`lresnet.eval.embed`;
            :func:`ijb_encoder` gives a backbone the reference's ``(x / 255 - 0.5) / 0.5`` input).
        save_aligned: write the aligned crops here (uint8 ``[N, 112, 112, 3]`` RGB, file order).
        save_embeddings: folder for ``<target>.npy`` and ``<target>.flip.npy``: scoring them with
            ``embeddings=``/``flip_embeddings=`` reproduces the numbers exactly.

    Returns:
        ``(embeddings, flipped or None)``, float32 ``[N, D]`` (memory-mapped when saved).
    """
    count = meta.num_images
    flip = flip or save_embeddings is not None
    aligned = None
    aligned_tmp = None
    if save_aligned is not None:
        aligned_tmp = Path(f"{save_aligned}.tmp.npy")
        aligned = _open_npy(aligned_tmp, (count, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8)
    emb: Optional[np.ndarray] = None
    flipped: Optional[np.ndarray] = None
    for start, crops in ijb_aligned_batches(meta, batch_size, warp, workers):
        stop = start + crops.shape[0]
        if aligned is not None:
            aligned[start:stop] = crops
        out = np.asarray(encoder(crops), dtype=np.float32)
        if emb is None:
            shape = (count, out.shape[1])
            if save_embeddings is not None:
                folder = Path(save_embeddings)
                emb = _open_npy(folder / f"{meta.target.lower()}.npy", shape, np.float32)
                flipped = _open_npy(folder / f"{meta.target.lower()}.flip.npy", shape, np.float32)
            else:
                emb = np.empty(shape, dtype=np.float32)
                flipped = np.empty(shape, dtype=np.float32) if flip else None
        emb[start:stop] = out
        if flipped is not None:
            flipped[start:stop] = encoder(np.ascontiguousarray(crops[:, :, ::-1]))
        if progress is not None:
            progress("embed", stop, count)
    if aligned is not None:
        aligned.flush()
        del aligned
        os.replace(aligned_tmp, save_aligned)
    for arr in (emb, flipped):
        if isinstance(arr, np.memmap):
            arr.flush()
    assert emb is not None
    return emb, flipped


def ijb_encoder(backbone, device="cpu", amp=None, bgr: bool = False) -> "Encoder":
    """A backbone as an encoder fed the way the reference feeds it: ``(x / 255 - 0.5) / 0.5``, RGB
    (BGR when ``bgr``), float32 input, eval mode."""
    from lresnet.eval.embed import NORM_REFERENCE_IJB, TorchEncoder

    return TorchEncoder(backbone, device=device, amp=amp, bgr=bgr, normalization=NORM_REFERENCE_IJB)


# --------------------------------------------------------------------------- the protocol
def score_ijb(meta: IJBMeta, embeddings: np.ndarray, flipped: Optional[np.ndarray],
              options: IJBOptions = IJBOptions(), threads: Optional[int] = None, keep_scores: bool = True,
              source: str = "embeddings", progress: Optional[IJBProgress] = None,
              seconds: Optional[dict[str, float]] = None) -> IJBReport:
    """Pool, score and read the ROC (steps 2-5 of the module docstring) from per-image embeddings.

    Raises:
        InputError: flip without flipped embeddings, or a pair naming an unknown template.
    """
    if options.flip and flipped is None:
        raise InputError("--flip-embeddings", "flip needs the embeddings of the mirrored crops "
                                               "(--flip-embeddings F.npy), or pass --no-flip")
    seconds = dict(seconds or {})
    t0 = time.perf_counter()
    emb = embeddings if isinstance(embeddings, EmbeddingRows) else EmbeddingRows(embeddings, meta.num_images)
    if flipped is not None and not isinstance(flipped, EmbeddingRows):
        flipped = EmbeddingRows(flipped, meta.num_images, "--flip-embeddings", emb.shape[1])
    features = _ImageFeatures(emb, flipped, meta.detector_scores, options)
    unique_templates, feats = template_features(features, meta.templates, meta.medias, progress=progress)
    t1 = time.perf_counter()
    scores = pair_scores(feats, meta.pairs, threads=threads, progress=progress)
    t2 = time.perf_counter()
    fpr, tpr = roc_curve(meta.labels, scores)
    picks = tpr_at_fpr(fpr, tpr)
    auc = roc_auc(fpr, tpr)
    t3 = time.perf_counter()
    seconds.update(pool=t1 - t0, score=t2 - t1, roc=t3 - t2)
    positives = int(meta.labels.sum())
    return IJBReport(
        target=meta.target, folder=str(meta.folder), images=meta.num_images, templates=int(unique_templates.size),
        pairs=meta.num_pairs, positive_pairs=positives, negative_pairs=meta.num_pairs - positives,
        tpr_at_fpr={k: t for k, (t, _) in zip(FPR_KEYS, picks)},
        fpr_of_point={k: f for k, (_, f) in zip(FPR_KEYS, picks)},
        auc=auc, embedding_size=int(emb.shape[1]), options=options, source=source, seconds=seconds,
        roc_fpr=fpr, roc_tpr=tpr, scores=scores if keep_scores else None)


def evaluate_ijb(root: PathLike, target: str = "IJBC", *, embeddings: Union[None, PathLike, np.ndarray] = None,
                 flip_embeddings: Union[None, PathLike, np.ndarray] = None, encoder: Optional["Encoder"] = None,
                 options: IJBOptions = IJBOptions(), batch_size: int = 128, warp: str = WARP_OPENCV4,
                 workers: int = 4, threads: Optional[int] = None, save_aligned: Optional[PathLike] = None,
                 save_embeddings: Optional[PathLike] = None, keep_scores: bool = True,
                 progress: Optional[IJBProgress] = None) -> IJBReport:
    """Score one IJB target: from precomputed embeddings, or by embedding its loose crops.

    Args:
        root: the folder holding ``<target>/`` (or that folder itself).
        target: ``"IJBC"`` or ``"IJBB"``.
        embeddings, flip_embeddings: ``.npy`` paths (or arrays), float ``[N, D]``, one row per line
            of the face_tid_mid file in its order; the second holds the mirrored crops'
            embeddings (needed with ``options.flip``).
        encoder: instead of embeddings: uint8 RGB crops -> float32 embeddings
            (:func:`ijb_encoder` for a backbone, :class:`lresnet.eval.embed.OnnxEncoder`).
        options: flip / norm-score / detector-score (the reference's settings by default).
        batch_size, warp, workers: extraction: images per forward, the warp (``opencv4``:
            bit-exact with OpenCV 4.x as the reference ran; ``opencv5``), decode/align threads.
        threads: threads scoring pairs (default: the CPU count, at most 8).
        save_aligned: ``.npy`` for the aligned crops (uint8 ``[N, 112, 112, 3]`` RGB, file order).
        save_embeddings: folder for the extracted ``<target>.npy`` / ``<target>.flip.npy``.
        keep_scores: keep every pair's score in the report.
        progress: ``progress(stage, done, total)``.

    Raises:
        InputError: bad meta files or embeddings, an image that does not decode, a pair naming an
            unknown template, neither or both of embeddings and encoder.
    """
    if (embeddings is None) == (encoder is None):
        raise InputError("--embeddings", "give exactly one of a model or precomputed --embeddings")
    start = time.perf_counter()
    meta = read_ijb_meta(root, target)
    seconds = {"read_meta": time.perf_counter() - start}
    if encoder is not None:
        start = time.perf_counter()
        emb, flipped = extract_ijb_embeddings(meta, encoder, flip=options.flip, batch_size=batch_size, warp=warp,
                                              workers=workers, save_aligned=save_aligned,
                                              save_embeddings=save_embeddings, progress=progress)
        seconds["embed"] = time.perf_counter() - start
        source = "model"
    else:
        if save_aligned is not None or save_embeddings is not None:
            raise InputError("--save-aligned", "saving crops or embeddings needs a model, not --embeddings")
        emb = EmbeddingRows(embeddings, meta.num_images, "--embeddings")
        flipped = None
        if options.flip:
            if flip_embeddings is None:
                raise InputError("--flip-embeddings", "flip needs the embeddings of the mirrored crops "
                                                       "(--flip-embeddings F.npy), or pass --no-flip")
            flipped = EmbeddingRows(flip_embeddings, meta.num_images, "--flip-embeddings", emb.shape[1])
        source = "embeddings"
    return score_ijb(meta, emb, flipped, options, threads=threads, keep_scores=keep_scores, source=source,
                     progress=progress, seconds=seconds)


# --------------------------------------------------------------------------- tables
def format_percent(value: float) -> str:
    """A TPR as the reference's table prints it: ``'%.2f' % (tpr * 100)``."""
    return "-" if value is None or math.isnan(value) else f"{value * 100:.2f}"


__all__ = ["EmbeddingRows", "FPR_KEYS", "FPR_TARGETS", "IJBMeta", "IJBOptions", "IJBReport", "TARGETS",
           "evaluate_ijb", "extract_ijb_embeddings", "format_percent", "ijb_aligned_batches", "ijb_encoder",
           "ijb_folder", "meta_file", "normalise_like_sklearn", "pair_scores", "read_ijb_meta", "roc_auc",
           "roc_curve", "score_ijb", "segment_sums", "template_features", "tpr_at_fpr"]
