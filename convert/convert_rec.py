"""faces_emore (MXNet RecordIO + ``.bin`` pairs) -> webdataset shards + manifest.

The plan is a seeded permutation of the image record keys (one int64 each: the only
per-sample state the main process keeps). Shard ``i`` holds plan entries
``[i*shard_size, (i+1)*shard_size)``; its bytes depend only on the source and the
settings, never on which process wrote it or when, so ``--workers N`` output equals
``--workers 1`` and a rerun after a kill ends with the same manifest.

A worker writes its shard a batch of :data:`BATCH` samples at a time: it reads the batch's
records in file order (one ``preadv`` per record, or per run of nearby records) into one
buffer, checks them all at once with numpy (:class:`RecordFetcher`), lays out their tar
members with numpy (:func:`~lresnet.convert.shards.pack_jpg_cls`) and appends them to the
shard (:meth:`~lresnet.convert.shards.TarShardWriter.add_packed`: hashed and written in
1 MiB pieces under a temporary name, renamed when complete). A worker holds one batch,
never a shard or the dataset. Finished shards are recorded in ``convert-state.json``;
``manifest.json`` appears only when every shard is done.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import simplejpeg

from lresnet.convert import manifest as mf
from lresnet.core.errors import ENVIRONMENT_ERRNOS, InputError
from lresnet.core.files import make_out_dir
from lresnet.convert.pairs import load_bin
from lresnet.convert.recordio import IR_SIZE, MAGIC, FacesEmore, MXNetRecords, jpeg_sof
from lresnet.convert.shards import (
    ShardInfo,
    TarShardWriter,
    file_sha256,
    iter_members,
    pack_jpg_cls,
    remove_stale_temp_files,
)

log = logging.getLogger(__name__)

_LREC = struct.Struct("<II")  # RecordIO part header: magic, cflag << 29 | length
_LENGTH_MASK = (1 << 29) - 1

PathLike = Union[str, "os.PathLike[str]"]
# progress(stage, advance, total): stage is "train" or "val <set>"; advance = samples done since the last call
ProgressFn = Callable[[str, int, int], None]

KEY_DIGITS_MIN = 9
READERS = ("pure", "mxnet")  # how image records are fetched: see open_fetcher
BATCH = 512  # samples read, checked and packed at a time (~4 MB: stays in cache)


@dataclass
class ConvertSummary:
    """What a conversion produced (``as_dict()`` is what ``--json`` prints)."""

    out_dir: str
    num_samples: int
    num_classes: int
    classes_with_images: int
    image_size: Tuple[int, int]
    num_shards: int
    shards_written: int
    shards_reused: int
    bytes: int
    skipped_corrupt: int
    image_size_mismatches: int
    val: Dict[str, int] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    seconds: float = 0.0
    images_written: int = 0
    images_per_s: float = 0.0
    mb_per_s: float = 0.0

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


# --------------------------------------------------------------------------- plan
def shuffle_plan(keys: Union[Sequence[int], np.ndarray, range], seed: int, shuffle: bool = True
                 ) -> np.ndarray:
    """The order samples are written in: a seeded permutation of ``keys`` (int64)."""
    if isinstance(keys, range):
        plan = np.arange(keys.start, keys.stop, keys.step, dtype=np.int64)
    else:
        plan = np.array(keys, dtype=np.int64)  # a copy
    if shuffle:
        # in place: the same order as plan[rng.permutation(n)] (same swaps), without an index array
        np.random.Generator(np.random.PCG64(seed)).shuffle(plan)
    return plan


def shard_slices(n: int, shard_size: int) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]`` of each shard over a plan of ``n`` entries."""
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def key_width(max_key: int) -> int:
    """Digits of the zero-padded sample KEY (at least 9, so keys sort as numbers)."""
    return max(KEY_DIGITS_MIN, len(str(max(0, int(max_key)))))


# --------------------------------------------------------------------------- source
def _open_source(src_dir: PathLike) -> FacesEmore:
    """Open faces_emore through the RecordIO reader (workers reuse it with their own descriptor)."""
    return FacesEmore(src_dir)


def source_fingerprint(src_dir: Path) -> Dict[str, Any]:
    """What identifies the input for resuming: sizes, the property line, the idx hash."""
    rec = src_dir / "train.rec"
    idx = src_dir / "train.idx"
    prop = src_dir / "property"
    fp: Dict[str, Any] = {"rec": rec.name}
    try:
        fp["rec_bytes"] = rec.stat().st_size
    except FileNotFoundError:
        raise InputError(rec, "file not found") from None
    fp["idx_sha256"] = file_sha256(idx) if idx.is_file() else None
    try:
        fp["property"] = prop.read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        raise InputError(prop, "file not found (expected 'classes,height,width')") from None
    return fp


def _jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(height, width) from the JPEG header, or None if it is not a readable JPEG."""
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, TypeError):
        return None
    return int(h), int(w)


@dataclass
class ImageBatch:
    """A batch of checked images: JPEGs in one buffer, per-sample arrays in plan order."""

    keys: np.ndarray      # int64, the kept keys in plan order
    labels: np.ndarray    # int64 class ids
    starts: np.ndarray    # int64 offset of each JPEG in ``buf``
    sizes: np.ndarray     # int64 JPEG sizes
    buf: np.ndarray       # uint8
    skipped: int = 0
    size_mismatch: int = 0


class RecordFetcher:
    """Reads and checks batches of image records with few syscalls and no per-record objects.

    Records are read in file order, one ``preadv`` per run of records that lie within
    :attr:`GAP` bytes of each other (one per record for a shuffled shard, a few large reads
    for ``--no-shuffle``), straight into one buffer. Their part headers, IRHeaders, labels
    and JPEG markers are then checked with numpy for all records at once. A record that is
    not a plain one-part image record with a valid label and JPEG start (a split record,
    damage) goes through :meth:`FacesEmore.read_image`, which joins parts or raises the
    reader's precise :class:`InputError`.

    JPEG headers: the first image is parsed in full (simplejpeg); every image whose SOF
    marker and size sit at the same place is accepted with that size (a vectorised check of
    6 bytes); any other image is parsed in full. So the size check is exact for every image.
    """

    # Larger spans (an .idx that skips records, huge images) take the slow path, one record at a
    # time: a batch's read buffer stays under BATCH * 256 KiB whatever the .idx says.
    _MAX_SPAN = 1 << 18
    GAP = 4096            # bytes between two records below which one read takes both
    _TEMPLATES = 4        # JPEG header layouts learned per batch before parsing one by one

    def __init__(self, source):
        self.source = source
        self.reader = source.reader
        self._fd = os.open(source.rec_path, os.O_RDONLY)
        self._read_buf = np.empty(0, dtype=np.uint8)  # reused for every batch: no fresh pages
        self.out_buf: Optional[np.ndarray] = None     # the archive buffer, reused the same way

    def read_batch(self, keys: np.ndarray, image_size: Tuple[int, int], skip_corrupt: bool
                   ) -> ImageBatch:
        """Read and check the records ``keys`` (plan order); see the class docstring.

        Raises:
            InputError: a bad record (unless ``skip_corrupt``: then it is counted and left out).
        """
        keys = np.asarray(keys, dtype=np.int64)
        n = keys.size
        found, offsets, spans = self.reader.locate(keys)
        fast = found & (spans >= _LREC.size + IR_SIZE) & (spans <= self._MAX_SPAN)
        cand = np.flatnonzero(fast)
        cand = cand[np.argsort(offsets[cand], kind="stable")]
        buf, rec_pos, read_ok = self._read_runs(offsets[cand], spans[cand])
        pos = np.full(n, -1, dtype=np.int64)
        pos[cand[read_ok]] = rec_pos[read_ok]

        good, labels, starts, sizes = self._parse(buf, pos, spans)
        dropped = np.zeros(n, dtype=bool)
        skipped = 0
        mismatch = 0
        extras: List[bytes] = []
        extra_at: List[int] = []
        want = tuple(image_size)
        # the slow path, in key order (so the first bad key is the one reported)
        slow = np.flatnonzero(~good)
        for i in slow[np.argsort(keys[slow], kind="stable")].tolist():
            key = int(keys[i])
            try:
                label, jpeg = self.source.read_image(key)
                size = _jpeg_size(jpeg)
                if size is None:
                    raise InputError(self.source.rec_path, "image is not a readable JPEG",
                                     where=f"record {key}")
            except InputError:
                if not skip_corrupt:
                    raise
                skipped += 1
                dropped[i] = True
                continue
            mismatch += size != want
            labels[i], sizes[i] = label, len(jpeg)
            extras.append(jpeg)
            extra_at.append(i)
        jpeg_skipped, jpeg_mismatch = self._check_jpegs(buf, keys, np.flatnonzero(good), starts,
                                                       sizes, want, skip_corrupt, dropped)
        skipped += jpeg_skipped
        mismatch += jpeg_mismatch
        if extras:
            lengths = np.fromiter((len(x) for x in extras), dtype=np.int64, count=len(extras))
            starts[extra_at] = buf.size + np.cumsum(lengths) - lengths
            buf = np.concatenate([buf, np.frombuffer(b"".join(extras), dtype=np.uint8)])
        kept = ~dropped
        return ImageBatch(keys[kept], labels[kept], starts[kept], sizes[kept], buf, skipped, mismatch)

    def _read_runs(self, offsets: np.ndarray, spans: np.ndarray
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read records (sorted by offset) into one buffer: ``(buf, position of each, read in full)``."""
        m = offsets.size
        if not m:
            return np.empty(0, dtype=np.uint8), offsets, np.zeros(0, dtype=bool)
        ends = offsets + spans
        brk = np.ones(m, dtype=bool)
        brk[1:] = (offsets[1:] > ends[:-1] + self.GAP) | (offsets[1:] < ends[:-1])
        run_of = np.cumsum(brk) - 1
        first = np.flatnonzero(brk)
        run_off = offsets[first]
        run_len = np.maximum.reduceat(ends, first) - run_off
        run_dst = np.cumsum(run_len) - run_len
        total = int(run_len.sum())
        if self._read_buf.size < total:
            self._read_buf = np.empty(max(total, 2 * self._read_buf.size), dtype=np.uint8)
        buf = self._read_buf[:total]
        view = memoryview(buf)
        fd, preadv = self._fd, os.preadv
        got = [preadv(fd, [view[dst:dst + length]], off)
               for dst, length, off in zip(run_dst.tolist(), run_len.tolist(), run_off.tolist())]
        rel = offsets - run_off[run_of]
        return buf, run_dst[run_of] + rel, rel + spans <= np.asarray(got, dtype=np.int64)[run_of]

    def _parse(self, buf: np.ndarray, pos: np.ndarray, spans: np.ndarray
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Check every read record at once: one part (cflag 0), an IRHeader and its labels, a label
        in ``[0, classes)``, a payload starting with the JPEG SOI marker.

        Returns ``(good, labels, jpeg starts, jpeg sizes)`` over all samples (pos < 0: not read).
        """
        n = pos.size
        good = np.zeros(n, dtype=bool)
        labels = np.zeros(n, dtype=np.int64)
        starts = np.zeros(n, dtype=np.int64)
        sizes = np.zeros(n, dtype=np.int64)
        idx = np.flatnonzero(pos >= 0)
        if not idx.size:
            return good, labels, starts, sizes
        p = pos[idx]
        head = buf[p[:, None] + np.arange(16)].view("<u4")  # magic, lrec, IRHeader flag, label
        magic, lrec, flag = head[:, 0], head[:, 1], head[:, 2].astype(np.int64)
        length = (lrec & _LENGTH_MASK).astype(np.int64)
        ok = ((magic == MAGIC) & (lrec >> 29 == 0) & (_LREC.size + length <= spans[idx])
              & (IR_SIZE + 4 * flag <= length))
        jstart = p + _LREC.size + IR_SIZE + 4 * flag
        jsize = p + _LREC.size + length - jstart
        ok &= jsize >= 2
        value = head[:, 3].view("<f4").astype(np.float64)
        multi = ok & (flag > 0)  # the class id is the first of the float labels after the header
        if multi.any():
            at = p[multi, None] + (_LREC.size + IR_SIZE) + np.arange(4)
            value[multi] = buf[at].view("<f4")[:, 0]
        with np.errstate(invalid="ignore"):
            value = np.trunc(value)
            ok &= np.isfinite(value) & (value >= 0) & (value < self.source.num_classes)
        j = np.where(ok, jstart, 0)
        ok &= (buf[j] == 0xFF) & (buf[j + 1] == 0xD8)
        good[idx] = ok
        labels[idx] = np.where(ok, value, 0).astype(np.int64)
        starts[idx] = jstart
        sizes[idx] = jsize
        return good, labels, starts, sizes

    def _check_jpegs(self, buf: np.ndarray, keys: np.ndarray, idx: np.ndarray, starts: np.ndarray,
                     sizes: np.ndarray, want: Tuple[int, int], skip_corrupt: bool,
                     dropped: np.ndarray) -> Tuple[int, int]:
        """Check the JPEG headers of samples ``idx``; returns (skipped, size mismatches)."""
        mismatch = 0
        pending = idx
        for _ in range(self._TEMPLATES):
            if not pending.size:
                break
            i0 = int(pending[0])
            data = buf[starts[i0]:starts[i0] + sizes[i0]].tobytes()
            size, sof = _jpeg_size(data), jpeg_sof(data)
            if size is None or sof is None or size != (sof[2], sof[3]):
                break  # parsed one by one below (and reported if unreadable)
            at, marker, h, w = sof
            s, z = starts[pending], sizes[pending]
            match = z >= at + 9
            b = np.where(match, s + at, 0)[:, None] + np.array([0, 1, 5, 6, 7, 8])
            expect = np.array([0xFF, marker, h >> 8, h & 255, w >> 8, w & 255], dtype=np.uint8)
            match &= (buf[b] == expect).all(axis=1)
            if (h, w) != want:
                mismatch += int(match.sum())
            pending = pending[~match]
        skipped = 0
        for i in pending[np.argsort(keys[pending], kind="stable")].tolist():
            size = _jpeg_size(buf[starts[i]:starts[i] + sizes[i]].tobytes())
            if size is None:
                if not skip_corrupt:
                    raise InputError(self.source.rec_path, "image is not a readable JPEG",
                                     where=f"record {int(keys[i])}")
                skipped += 1
                dropped[i] = True
                continue
            mismatch += size != want
        return skipped, mismatch

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class MXNetFetcher(RecordFetcher):
    """``--reader mxnet``: every record takes :class:`RecordFetcher`'s one-by-one path, where
    :class:`~lresnet.convert.recordio.MXNetRecords` reads it with ``MXIndexedRecordIO`` and
    ``mxnet.recordio.unpack``; checks, batches and shard bytes are the pure reader's."""

    def __init__(self, source: FacesEmore):
        super().__init__(MXNetRecords(source))

    def _read_runs(self, offsets: np.ndarray, spans: np.ndarray
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.empty(0, dtype=np.uint8), offsets, np.zeros(offsets.size, dtype=bool)  # nothing read here

    def close(self) -> None:
        super().close()
        self.source.close()


def open_fetcher(source: FacesEmore, reader: str = "pure") -> RecordFetcher:
    """The one place that picks how image records are fetched: ``pure`` (this package's reader)
    or ``mxnet`` (MXNet's, a cross-check; the output is byte-identical)."""
    return MXNetFetcher(source) if reader == "mxnet" else RecordFetcher(source)


# --------------------------------------------------------------------------- workers
_STATE: Dict[str, Any] = {}


def _init_worker(source: FacesEmore, reader: str, abort_event, progress_queue) -> None:
    """Per-process setup. ``source`` comes from the parent (inherited by fork, pickled by
    spawn) with its file handle closed; the fetcher opens this process's own descriptor."""
    if "fd" in _LOCK:  # forked: only the parent may hold the output folder's lock
        os.close(_LOCK.pop("fd"))
    # Ctrl-C reaches the whole process group: the parent handles it (it sets `abort_event`, and
    # each worker drops its shard at its next batch); a worker interrupted on its own could die
    # while its queue's feeder thread still holds unsent progress, and the parent would wait for
    # it forever. Progress still unsent when a worker exits is dropped, not waited for.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    progress_queue.cancel_join_thread()
    _STATE.clear()
    _STATE.update(source=source, reader=reader, abort=abort_event, queue=progress_queue, ppid=os.getppid(),
                  fetcher=None)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(ppid: int) -> None:
    """A worker whose parent was killed (kill -9) would wait on the task queue forever: exit.

    Its half-written shard keeps its temporary name, which the next run deletes.
    """
    while os.getppid() == ppid:
        time.sleep(0.5)
    os._exit(3)


def _worker_source() -> RecordFetcher:
    if _STATE.get("fetcher") is None:
        _STATE["fetcher"] = open_fetcher(_STATE["source"], _STATE["reader"])
    return _STATE["fetcher"]


class _Aborted(Exception):
    """The parent asked to stop (or died): drop the shard in progress."""


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its index, the keys in write order and where it goes."""

    index: int
    keys: np.ndarray
    train_dir: str
    key_digits: int
    image_size: Tuple[int, int]
    skip_corrupt: bool


def write_train_shard(job: ShardJob, source: Optional[RecordFetcher] = None,
                      report: Optional[Callable[[int], None]] = None) -> Dict[str, Any]:
    """Write shard ``job.index``: read its records (in key order), write them in plan order.

    Returns ``{"info": ShardInfo dict, "skipped", "size_mismatch", "labels"}`` or, on bad
    input in a worker process, ``{"error": (path, message, where)}`` (InputError does not
    survive pickling with its fields).
    """
    in_worker = source is None
    try:
        if in_worker:
            source = _worker_source()
            report = _queue_reporter()
        return _write_train_shard(job, source, report)
    except InputError as err:
        if not in_worker:
            raise
        return {"error": (err.path, err.message, err.where)}
    except _Aborted:
        return {"aborted": True}


def _queue_reporter() -> Callable[[int], None]:
    q = _STATE["queue"]
    abort = _STATE["abort"]
    ppid = _STATE["ppid"]

    def report(n: int) -> None:
        if abort.is_set() or os.getppid() != ppid:
            raise _Aborted()
        q.put(n)

    return report


def _write_train_shard(job: ShardJob, source: RecordFetcher,
                       report: Optional[Callable[[int], None]]) -> Dict[str, Any]:
    """Read, check and write the shard a batch of :data:`BATCH` samples (plan order) at a time:
    the batch's reads, its JPEGs and its tar bytes stay in cache, and memory does not grow
    with the shard size."""
    stem = mf.shard_stem(job.index)
    train_dir = Path(job.train_dir)
    keys = np.asarray(job.keys, dtype=np.int64)
    path = train_dir / f"{stem}.tar"
    try:
        return _write_shard_file(path, job, keys, source, report)
    except OSError as err:  # the writer removed its temporary file; earlier shards are complete
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise InputError(path, f"cannot write shard: {err.strerror or err}") from None


def _write_shard_file(path: Path, job: ShardJob, keys: np.ndarray, source: RecordFetcher,
                      report: Optional[Callable[[int], None]]) -> Dict[str, Any]:
    skipped = mismatch = 0
    labels: List[np.ndarray] = []
    with TarShardWriter(path, path.with_suffix(".idx")) as writer:
        for start in range(0, keys.size, BATCH):
            images = source.read_batch(keys[start:start + BATCH], job.image_size, job.skip_corrupt)
            skipped += images.skipped
            mismatch += images.size_mismatch
            labels.append(np.unique(images.labels))
            if images.keys.size and images.keys.min() < 0:  # KEY "-0001": the per-sample path
                _add_pairs(writer, images, job.key_digits)
            else:
                data, index = pack_jpg_cls(images.keys, job.key_digits, images.labels, images.buf,
                                           images.starts, images.sizes, writer.tell(), source.out_buf)
                source.out_buf = data.base if data.base is not None else data
                writer.add_packed(data, index, int(images.keys.size))
            if report is not None:
                report(int(images.keys.size))
        info = writer.close()
    return {"info": info.as_dict(), "skipped": skipped, "size_mismatch": mismatch,
            "labels": np.unique(np.concatenate(labels)) if labels else np.zeros(0, dtype=np.int64)}


def _add_pairs(writer: TarShardWriter, images: ImageBatch, digits: int) -> None:
    buf = images.buf
    for key, label, start, size in zip(images.keys.tolist(), images.labels.tolist(),
                                       images.starts.tolist(), images.sizes.tolist()):
        writer.add_pair(str(key).zfill(digits), "jpg", buf[start:start + size].tobytes(),
                        "cls", str(label).encode("ascii"))


# --------------------------------------------------------------------------- val sets
def write_val_set(name: str, bin_path: PathLike, val_dir: Path,
                  image_size: Tuple[int, int]) -> Tuple[ShardInfo, int, int]:
    """``<set>.bin`` -> ``val/<set>.tar``: one sample per pair, original order.

    Returns (shard info, pairs, images whose JPEG size differs from ``image_size``).
    """
    pairs = load_bin(bin_path)
    images, issame = pairs.images, pairs.issame  # load_bin checked 2 images per pair
    digits = max(6, len(str(max(0, len(issame) - 1))))
    mismatch = 0
    with TarShardWriter(val_dir / f"{name}.tar") as writer:
        for k, same in enumerate(issame):
            a, b = images[2 * k], images[2 * k + 1]
            for img, which in ((a, 2 * k), (b, 2 * k + 1)):
                size = _jpeg_size(img)
                if size is None:
                    raise InputError(bin_path, "image is not a readable JPEG", where=f"image {which}")
                mismatch += size != tuple(image_size)
            key = str(k).zfill(digits)
            writer.add(f"{key}.a.jpg", bytes(a))
            writer.add(f"{key}.b.jpg", bytes(b))
            writer.add(f"{key}.same", b"1" if same else b"0")
        info = writer.close()
    return info, len(issame), mismatch


# --------------------------------------------------------------------------- resume
def _reusable(path: Path, recorded: Optional[Dict[str, Any]], need_index: bool) -> bool:
    """A recorded shard is reused only if it is on disk with the recorded size and sha256."""
    if not recorded:
        return False
    try:
        if path.stat().st_size != recorded["bytes"]:
            return False
    except FileNotFoundError:
        return False
    if need_index and not path.with_suffix(".idx").is_file():
        return False
    return file_sha256(path) == recorded["sha256"]


def _labels_in_shard(path: Path) -> np.ndarray:
    """Class ids stored in a finished shard (its ``.cls`` members), for the class-count check."""
    labels = [int(data) for _, _, _, data in iter_members(path, with_data=(".cls",)) if data is not None]
    return np.unique(np.asarray(labels, dtype=np.int64))


# --------------------------------------------------------------------------- main entry
def convert_rec(src_dir: PathLike, out_dir: PathLike, shard_size: int = 10000, workers: int = 1,
                seed: int = 0, shuffle: bool = True, sets: Optional[Iterable[str]] = None,
                skip_corrupt: bool = False, progress: Optional[ProgressFn] = None,
                reader: str = "pure") -> ConvertSummary:
    """Convert a faces_emore folder into ``OUT/train/*.tar`` + manifest and ``OUT/val/<set>.tar``.

    Args:
        src_dir: folder with ``train.rec`` (+ ``train.idx``), ``property`` and ``<set>.bin``.
        out_dir: output folder; a rerun with the same arguments resumes (or reuses) it.
        shard_size: images per train shard.
        workers: processes writing shards in parallel (output is identical for any value).
        seed: seed of the global shuffle.
        shuffle: False keeps the source record order.
        sets: verification sets to convert (None: every ``.bin`` found).
        skip_corrupt: skip unreadable records (counted) instead of failing.
        progress: called as ``progress(stage, advance, total)``.
        reader: ``"pure"`` (default) or ``"mxnet"``: how image records are read (:func:`open_fetcher`).
    Returns:
        a :class:`ConvertSummary`.
    Raises:
        InputError: bad input (names the file and record/offset), bad settings (a negative seed,
            a set name with a path in it, an output folder that is a file or cannot be created,
            mxnet not importable), or ``out_dir`` holding a conversion made with other settings.
    """
    t0 = time.perf_counter()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if shard_size < 1:
        raise InputError("--shard-size", f"got {shard_size}, expected a positive number of images")
    if workers < 1:
        raise InputError("--workers", f"got {workers}, expected at least 1")
    if seed < 0:
        raise InputError("--seed", f"got {seed}, expected a non-negative integer")
    if reader not in READERS:
        raise InputError("--reader", f"got {reader!r}, expected one of {', '.join(READERS)}")
    if out_dir.exists() and not out_dir.is_dir():  # before any work; make_out_dir creates it later
        raise InputError(out_dir, "is a file, expected a folder (created if missing)")
    if not src_dir.is_dir():
        raise InputError(src_dir, "source folder not found")
    fingerprint = source_fingerprint(src_dir)

    source = _open_source(src_dir)
    try:
        if reader == "mxnet":
            MXNetRecords.check_available(source)
        num_classes = int(source.num_classes)
        image_size = (int(source.image_size[0]), int(source.image_size[1]))
        keys = source.image_key_range if source.image_key_range is not None else source.image_key_array
        bins = {k: Path(v) for k, v in source.bin_files().items()}
    except BaseException:
        source.close()
        raise
    try:
        wanted = _select_sets(sets, bins, src_dir)
        plan = shuffle_plan(keys, seed, shuffle)
        del keys
        header = {
            "format": mf.FORMAT,
            "num_samples": 0,
            "num_classes": num_classes,
            "image_size": list(image_size),
            "seed": int(seed),
            "shuffle": bool(shuffle),
            "shard_size": int(shard_size),
            "key_digits": key_width(int(plan.max()) if plan.size else 0),
            "source": fingerprint,
        }
        train_dir, val_dir = out_dir / mf.TRAIN_DIR, out_dir / mf.VAL_DIR
        make_out_dir(train_dir)
        with _exclusive(train_dir):
            recorded = _previous_record(out_dir, train_dir, header, _rec_mtime(src_dir))
            remove_stale_temp_files(train_dir)
            if wanted:
                make_out_dir(val_dir)
                remove_stale_temp_files(val_dir)
            state = _RunState(header=header, recorded=recorded, train_dir=train_dir,
                              num_classes=num_classes, source_mtime_ns=_rec_mtime(src_dir))
            val_mismatch = _convert_val_sets(wanted, bins, val_dir, image_size, state, progress)
            written = _convert_train(plan, source, state, image_size, shard_size, workers,
                                     skip_corrupt, progress, reader)
            shards = [state.shards[mf.shard_stem(i)] for i in range(len(shard_slices(plan.size, shard_size)))]
            manifest = _write_manifest(header, shards, state, train_dir)
    finally:
        source.close()

    seconds = time.perf_counter() - t0
    present = int(state.seen.sum())
    summary = ConvertSummary(
        out_dir=str(out_dir),
        num_samples=manifest["num_samples"],
        num_classes=num_classes,
        classes_with_images=present,
        image_size=image_size,
        num_shards=len(shards),
        shards_written=written,
        shards_reused=len(shards) - written,
        bytes=sum(s["bytes"] for s in shards),
        skipped_corrupt=manifest["skipped_corrupt"],
        image_size_mismatches=sum(s["size_mismatch"] for s in shards) + val_mismatch,
        val={v["set"]: v["pairs"] for v in manifest["val"]},
        seconds=seconds,
        images_written=state.images_written,
        images_per_s=state.images_written / seconds if seconds > 0 else 0.0,
        mb_per_s=state.bytes_written / seconds / 1e6 if seconds > 0 else 0.0,
    )
    summary.warnings.extend(source.notes + _property_warnings(src_dir, summary))
    for w in summary.warnings:
        log.warning("%s", w)
    return summary


def _write_manifest(header: Dict[str, Any], shards: List[Dict[str, Any]], state: "_RunState",
                    train_dir: Path) -> Dict[str, Any]:
    """``manifest.json`` (atomically): the header, totals, the shards in order, the val sets."""
    manifest = dict(header)
    manifest["num_samples"] = sum(s["count"] for s in shards)
    manifest["skipped_corrupt"] = sum(s["skipped"] for s in shards)
    manifest["shards"] = [{k: s[k] for k in ("name", "count", "bytes", "sha256")} for s in shards]
    manifest["val"] = [{k: state.val[name][k] for k in ("set", "name", "pairs", "bytes", "sha256")}
                       for name in sorted(state.val)]
    mf.write_json_atomic(train_dir / mf.MANIFEST_NAME, manifest)
    return manifest


_LOCK: Dict[str, int] = {}


@contextlib.contextmanager
def _exclusive(train_dir: Path) -> Iterator[None]:
    """Hold ``train/.convert.lock`` (flock) so two conversions never write one folder.

    The kernel drops the lock when the process dies (kill -9 included); forked workers close
    their copy of the descriptor so a killed converter's lock does not outlive it.
    """
    fd = os.open(train_dir / ".convert.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(train_dir, "another convert-rec is writing here; wait for it to finish "
                                    "or choose another OUT_DIR") from None
    _LOCK["fd"] = fd
    try:
        yield
    finally:
        _LOCK.pop("fd", None)
        os.close(fd)


def _select_sets(sets: Optional[Iterable[str]], bins: Dict[str, Path], src_dir: Path) -> List[str]:
    if sets is None:
        return sorted(bins)
    wanted = [s.strip() for s in sets if s.strip()]
    for name in wanted:
        if name in (".", "..") or Path(name).name != name or "\\" in name:
            raise InputError("--sets", f"got {name!r}, expected plain set names like lfw,agedb_30 (file "
                                       "names in the source folder, without a path)")
        if name not in bins:
            raise InputError(src_dir / f"{name}.bin", "file not found (asked for by --sets; found: "
                             + (", ".join(sorted(bins)) or "none") + ")")
    return wanted


def _rec_mtime(src_dir: Path) -> int:
    return (src_dir / "train.rec").stat().st_mtime_ns


def _previous_record(out_dir: Path, train_dir: Path, header: Dict[str, Any], mtime_ns: int
                     ) -> Dict[str, Any]:
    """Shards (and val sets) recorded by an earlier run with the same settings and source.

    Raises InputError if ``out_dir`` holds a conversion made with different settings, or from
    a ``train.rec`` modified since (same size but other content): its complete shards are never
    overwritten with different content, nor reused for a changed source.
    """
    want = mf.settings_of(header)
    final = train_dir / mf.MANIFEST_NAME
    state = mf.read_state(train_dir)
    if final.is_file():
        old = mf.read_manifest(final)
        if mf.settings_of(old) != want:
            raise InputError(final, "holds a conversion made with other settings ("
                             + mf.describe_difference(old, header)
                             + "); choose another OUT_DIR or delete this one")
        if state is None or mf.settings_of(state.get("header", {})) != want:
            raise InputError(train_dir / mf.STATE_NAME, "missing or from other settings; cannot "
                             "tell which shards are complete: choose another OUT_DIR or delete this one")
    elif state is not None and mf.settings_of(state.get("header", {})) != want:
        raise InputError(train_dir / mf.STATE_NAME, "an unfinished conversion with other settings ("
                         + mf.describe_difference(state.get("header", {}), header)
                         + ") is here; choose another OUT_DIR or delete this one")
    if state is not None:
        if state.get("source_mtime_ns") != mtime_ns:
            raise InputError(train_dir / mf.STATE_NAME, "was made from a train.rec with another "
                             "modification time (the source changed?); choose another OUT_DIR or delete this one")
        return {"shards": state["shards"], "val": state.get("val", {})}
    if train_dir.is_dir() and any(train_dir.glob("train-*.tar")):
        raise InputError(train_dir, "holds shards but no convert-state.json; choose another OUT_DIR "
                         "or delete this one")
    return {"shards": {}, "val": {}}


@dataclass
class _RunState:
    """Book-keeping of one run: finished shards (persisted after each), classes seen, counters."""

    header: Dict[str, Any]
    recorded: Dict[str, Any]
    train_dir: Path
    num_classes: int
    source_mtime_ns: int
    shards: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    val: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    images_written: int = 0
    bytes_written: int = 0
    seen: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.seen = np.zeros(max(self.num_classes, 1), dtype=bool)

    def mark_labels(self, labels: np.ndarray) -> None:
        labels = labels[(labels >= 0) & (labels < self.seen.shape[0])]
        self.seen[labels] = True

    def save(self) -> None:
        mf.write_json_atomic(self.train_dir / mf.STATE_NAME, {
            "format": mf.STATE_FORMAT, "header": self.header, "source_mtime_ns": self.source_mtime_ns,
            "shards": {k: self.shards[k] for k in sorted(self.shards)},
            "val": {k: self.val[k] for k in sorted(self.val)}})


def _convert_val_sets(wanted: List[str], bins: Dict[str, Path], val_dir: Path,
                      image_size: Tuple[int, int], state: _RunState,
                      progress: Optional[ProgressFn]) -> int:
    mismatch = 0
    for name in wanted:
        rec = state.recorded["val"].get(name)
        if rec is not None and _reusable(val_dir / rec["name"], rec, need_index=False):
            state.val[name] = rec
            mismatch += rec.get("size_mismatch", 0)
            continue
        info, pairs, mm = write_val_set(name, bins[name], val_dir, image_size)
        mismatch += mm
        state.val[name] = dict(info.as_dict(), set=name, pairs=pairs, size_mismatch=mm)
        state.bytes_written += info.bytes
        if progress is not None:
            progress(f"val {name}", pairs, pairs)
    return mismatch


def _convert_train(plan: np.ndarray, source: FacesEmore, state: _RunState,
                   image_size: Tuple[int, int], shard_size: int, workers: int, skip_corrupt: bool,
                   progress: Optional[ProgressFn], reader: str) -> int:
    """Write every shard not reusable from an earlier run; returns how many were written."""
    jobs: List[ShardJob] = []
    for i, (start, stop) in enumerate(shard_slices(plan.size, shard_size)):
        stem = mf.shard_stem(i)
        rec = state.recorded["shards"].get(stem)
        path = state.train_dir / f"{stem}.tar"
        if rec is not None and _reusable(path, rec, need_index=True):
            state.shards[stem] = rec
            state.mark_labels(_labels_in_shard(path))
            continue
        jobs.append(ShardJob(i, plan[start:stop], str(state.train_dir), state.header["key_digits"],
                             image_size, skip_corrupt))
    if state.shards:
        log.info("resuming: %d of %d shards already complete", len(state.shards),
                 len(state.shards) + len(jobs))
    state.save()
    total = int(sum(j.keys.size for j in jobs))
    if progress is not None:
        progress("train", 0, total)

    def finished(result: Dict[str, Any]) -> None:
        info = result["info"]
        stem = info["name"].rsplit(".", 1)[0]
        state.shards[stem] = dict(info, skipped=result["skipped"], size_mismatch=result["size_mismatch"])
        state.mark_labels(result["labels"])
        state.images_written += info["count"]
        state.bytes_written += info["bytes"]
        state.save()

    if workers == 1 or len(jobs) <= 1:
        fetcher = open_fetcher(source, reader)
        report = None if progress is None else (lambda n: progress("train", n, total))
        try:
            for job in jobs:
                finished(write_train_shard(job, source=fetcher, report=report))
        finally:
            fetcher.close()
        return len(jobs)
    _run_parallel(jobs, source, workers, finished, progress, total, reader)
    return len(jobs)


def _run_parallel(jobs: List[ShardJob], source: FacesEmore, workers: int,
                  finished: Callable[[Dict[str, Any]], None], progress: Optional[ProgressFn],
                  total: int, reader: str) -> None:
    """Write ``jobs`` in ``workers`` processes, at most 2 per worker in flight."""
    # fork: workers start in milliseconds, need no importable __main__, and share the parent's
    # record index (copy-on-write) instead of each re-reading the .idx. The reader's file
    # handle is closed first; each worker opens its own on first read.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    source.close()
    abort = ctx.Event()
    progress_queue = ctx.Queue()
    todo = list(reversed(jobs))
    error: Optional[Tuple[Any, ...]] = None
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                initializer=_init_worker,
                                initargs=(source, reader, abort, progress_queue)) as pool:
        running = set()
        try:
            while todo or running:
                while todo and len(running) < 2 * workers and error is None:
                    running.add(pool.submit(write_train_shard, todo.pop()))
                done, running = cf.wait(running, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                _drain(progress_queue, progress, total)
                for fut in done:
                    result = fut.result()
                    if "error" in result:
                        if error is None:
                            error = result["error"]
                            abort.set()
                    elif "info" in result and error is None:
                        finished(result)
                if error is not None:
                    todo.clear()
        except BaseException:
            abort.set()
            for fut in running:
                fut.cancel()
            raise
        finally:
            _drain(progress_queue, progress, total)
    _drain(progress_queue, progress, total)  # what the workers flushed while exiting
    if error is not None:
        raise InputError(*error)


def _drain(q, progress: Optional[ProgressFn], total: int) -> None:
    n = 0
    while True:
        try:
            n += q.get_nowait()
        except queue_mod.Empty:
            break
    if n and progress is not None:
        progress("train", n, total)


def _property_warnings(src_dir: Path, summary: ConvertSummary) -> List[str]:
    """Mismatches between the data and ``property`` (reported, not fatal)."""
    out = []
    prop = src_dir / "property"
    if summary.classes_with_images != summary.num_classes:
        out.append(f"{prop}: says {summary.num_classes} classes, images found for "
                   f"{summary.classes_with_images}")
    if summary.image_size_mismatches:
        h, w = summary.image_size
        out.append(f"{prop}: says images are {h}x{w}, {summary.image_size_mismatches} images differ")
    if summary.skipped_corrupt:
        out.append(f"{src_dir / 'train.rec'}: skipped {summary.skipped_corrupt} corrupt records")
    return out
