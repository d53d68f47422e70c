"""MXNet RecordIO in pure Python + numpy: the ``.rec/.idx`` files of InsightFace's faces_emore.

File layout (dmlc-core ``recordio.h``, little endian): every record is

    magic 0xCED7230A (uint32) | lrec = cflag << 29 | length (uint32) | payload | zero pad to 4 bytes

A payload that contains the magic number at a 4-byte-aligned position is split there: the magic
is dropped and the pieces are written as parts with cflag 1 (first), 2 (middle), 3 (last); a
reader joins them, putting the magic back between the parts. An ``.idx`` file holds one
``key\\toffset`` line per record (offset of its first part).

Inside a record, MXNet's ``IRHeader`` (struct ``'IfQQ'``: flag, label, id, id2) comes first; when
``flag > 0``, ``flag`` float32 labels follow it and the scalar label field is unused.

A faces_emore folder holds ``property`` (``classes,height,width``), ``train.rec``/``train.idx`` and
``<set>.bin`` verification pairs. One header record (usually key 0; flag > 0, label =
[first identity record, end]) points at one identity record per class (label = [start, end) of
that class's image keys); every other record is an image whose class is its (first) label.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from lresnet.core.errors import InputError, PathLike
from lresnet.core.files import errors_name

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LREC = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
IR_SIZE = _IR.size  # 24
_MAX_LENGTH = (1 << 29) - 1
# A record this small (part header + IRHeader + a few floats) cannot hold an image.
_SMALL_RECORD = _LREC.size + IR_SIZE + 4 * 16

Label = Union[float, Tuple[float, ...]]


@dataclass(frozen=True)
class IRHeader:
    """MXNet's image-record header. ``label`` is a float, or a tuple of floats when ``flag > 0``."""

    flag: int
    label: Label
    id: int
    id2: int


def pack(header: IRHeader, payload: bytes) -> bytes:
    """Serialise ``header`` + ``payload`` like ``mxnet.recordio.pack``.

    A scalar label is stored in the header with flag 0; a sequence label is stored as
    ``len(label)`` float32 values after the header, with flag = its length and label field 0.
    """
    label = header.label
    if isinstance(label, (int, float, np.integer, np.floating)):
        head = _IR.pack(0, float(label), header.id, header.id2)
        return head + bytes(payload)
    values = np.asarray(label, dtype="<f4").ravel()
    head = _IR.pack(values.size, 0.0, header.id, header.id2)
    return head + values.tobytes() + bytes(payload)


def unpack(buf: bytes, path: Optional[PathLike] = None, where: Optional[str] = None
           ) -> Tuple[IRHeader, bytes]:
    """Split a record into its :class:`IRHeader` and the payload after it (the image bytes).

    Raises:
        InputError: the record is too short for its header or its ``flag`` labels
            (``path``/``where`` name the place in the message).
    """
    if len(buf) < IR_SIZE:
        raise InputError(path, f"record of {len(buf)} bytes is shorter than an IRHeader "
                               f"({IR_SIZE} bytes)", where)
    flag, label, rid, rid2 = _IR.unpack_from(buf, 0)
    if flag > 0:
        end = IR_SIZE + 4 * flag
        if end > len(buf):
            raise InputError(path, f"IRHeader flag {flag} announces {flag} float labels but the "
                                   f"record has only {len(buf) - IR_SIZE} bytes after its header",
                             where)
        values = np.frombuffer(buf, dtype="<f4", count=flag, offset=IR_SIZE)
        return IRHeader(flag, tuple(float(v) for v in values), rid, rid2), bytes(buf[end:])
    return IRHeader(flag, float(label), rid, rid2), bytes(buf[IR_SIZE:])


def first_label(header: IRHeader) -> float:
    """The class label of a record: the scalar label, or the first of a multi-float label."""
    if isinstance(header.label, tuple):
        return header.label[0] if header.label else float("nan")
    return header.label


def _split_positions(record: bytes) -> List[int]:
    """Offsets where the magic number occurs 4-byte aligned in ``record`` (what dmlc splits on)."""
    positions = []
    start = record.find(_MAGIC_BYTES)
    limit = (len(record) >> 2) << 2
    while 0 <= start and start + 4 <= limit:
        if start % 4 == 0:
            positions.append(start)
            start = record.find(_MAGIC_BYTES, start + 4)
        else:
            start = record.find(_MAGIC_BYTES, start + 1)
    return positions


def encode_record(record: bytes) -> bytes:
    """The bytes dmlc's ``RecordIOWriter::WriteRecord`` writes for one record (all its parts)."""
    size = len(record)
    if size > _MAX_LENGTH:
        raise ValueError(f"RecordIO records must be shorter than 2**29 bytes, got {size}")
    out = bytearray()
    done = 0
    if _MAGIC_BYTES in record:
        for pos in _split_positions(record):
            out += _LREC.pack(MAGIC, ((1 if done == 0 else 2) << 29) | (pos - done))
            out += record[done:pos]
            done = pos + 4
    out += _LREC.pack(MAGIC, ((3 if done else 0) << 29) | (size - done))
    out += record[done:]
    out += b"\0" * (-size % 4)
    return bytes(out)


class RecordWriter:
    """Writes a ``.rec`` (and optionally its ``.idx``) byte-identical to MXNet's indexed writer.

    Use as a context manager; :meth:`write` returns the record's offset (what the ``.idx`` holds).
    """

    def __init__(self, rec_path: PathLike, idx_path: Optional[PathLike] = None):
        self.rec_path = Path(rec_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        self._rec: Optional[BinaryIO] = open(self.rec_path, "wb")
        self._idx = None if self.idx_path is None else open(self.idx_path, "w", encoding="ascii")
        self._offset = 0

    def tell(self) -> int:
        """Offset the next record will be written at."""
        return self._offset

    def write(self, key: int, record: bytes) -> int:
        """Append one record under ``key``; returns its offset in the ``.rec``."""
        if self._rec is None:
            raise ValueError(f"{self.rec_path}: writer is closed")
        offset = self._offset
        data = encode_record(record)
        with errors_name(self.rec_path):
            self._rec.write(data)
        self._offset += len(data)
        if self._idx is not None:
            with errors_name(self.idx_path):
                self._idx.write(f"{int(key)}\t{offset}\n")
        return offset

    def close(self) -> None:
        """Flush and close both files."""
        rec, idx, self._rec, self._idx = self._rec, self._idx, None, None
        try:
            if rec is not None:
                with errors_name(self.rec_path):
                    rec.close()
        finally:
            if idx is not None:
                with errors_name(self.idx_path):
                    idx.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RecordReader:
    """Random and sequential access to a RecordIO file, without mxnet.

    ``idx_path`` (``key\\toffset`` lines) gives keyed random access; without it the keys are the
    record ordinals found by a sequential scan. File handles are opened lazily and reopened
    after a fork, and the reader pickles without its handle, so it can be passed to workers.

    Every error is an :class:`InputError` naming the file and the record key and/or offset.
    """

    def __init__(self, rec_path: PathLike, idx_path: Optional[PathLike] = None):
        self.rec_path = Path(rec_path)
        self.idx_path = None if idx_path is None else Path(idx_path)
        if not self.rec_path.is_file():
            raise InputError(self.rec_path, "no such file")
        if self.idx_path is not None and not self.idx_path.is_file():
            raise InputError(self.idx_path, "no such file")
        self.size = self.rec_path.stat().st_size
        self._fh: Optional[BinaryIO] = None
        self._pid = -1
        # keys ascending (int64) and their offsets; spans = bytes per record, computed on demand
        self._key_arr: Optional[np.ndarray] = None
        self._key_first: Optional[int] = None  # keys are first .. first + n - 1: no key array
        self._off_arr: Optional[np.ndarray] = None
        self._span_arr: Optional[np.ndarray] = None
        self._ascending: Optional[bool] = None  # offsets in file order (set on first use)
        if self.idx_path is not None:
            self._load_idx()

    # -- keys -------------------------------------------------------------------------------
    _IDX_CHUNK = 1 << 18  # bytes of .idx parsed at a time: transient memory stays under ~8 MB

    def _load_idx(self) -> None:
        """Parse the ``.idx`` in chunks into two int64 arrays, never holding it as text or lines.

        A first pass counts the lines so the arrays are allocated once at their final size;
        peak memory is those arrays (16 bytes a record) plus one chunk.
        """
        with open(self.idx_path, "rb", buffering=0) as fh:
            lines = 1
            while True:
                chunk = fh.read(self._IDX_CHUNK)
                if not chunk:
                    break
                lines += chunk.count(b"\n")
            keys = np.empty(lines, dtype=np.int64)
            offsets = np.empty(lines, dtype=np.int64)
            fh.seek(0)
            n = 0
            lineno = 1  # of the first line in `chunk`
            tail = b""
            while True:
                block = fh.read(self._IDX_CHUNK)
                chunk = tail + block
                if block:
                    cut = chunk.rfind(b"\n") + 1
                    chunk, tail = chunk[:cut], chunk[cut:]
                    if not chunk:
                        continue
                elif not chunk:
                    break
                parsed = self._parse_idx_fast(chunk)
                if parsed is None:
                    parsed = self._parse_idx_lines(chunk, lineno)
                m = parsed[0].size
                if n + m > keys.size:  # lone CR line ends: more lines than newlines counted
                    keys = np.concatenate([keys[:n], np.empty(n + m, dtype=np.int64)])
                    offsets = np.concatenate([offsets[:n], np.empty(n + m, dtype=np.int64)])
                keys[n:n + m], offsets[n:n + m] = parsed
                n += m
                lineno += chunk.count(b"\n")
                if not block:
                    break
        keys, offsets = keys[:n], offsets[:n]
        if n > 1 and not np.all(keys[1:] > keys[:-1]):  # a writer's .idx is ascending already
            order = np.argsort(keys, kind="stable")
            keys, offsets = keys[order], offsets[order]
            dup = np.flatnonzero(keys[1:] == keys[:-1])
            if dup.size:
                raise InputError(self.idx_path, f"duplicate key {int(keys[dup[0]])}")
        self._set_index(keys, offsets)

    def _parse_idx_fast(self, text: bytes) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """Vectorised parse of well-formed ``.idx`` lines (``digits TAB digits NEWLINE``), with no
        Python object per line; None means: parse line by line for the error."""
        if not text.endswith(b"\n"):
            return None
        buf = np.frombuffer(text, dtype=np.uint8)
        is_sep = (buf == 9) | (buf == 10)
        ends = np.flatnonzero(is_sep)            # one past each token
        seps = buf[ends]                         # must alternate TAB, NEWLINE: one of each per line
        if seps.size % 2 or not (np.all(seps[0::2] == 9) and np.all(seps[1::2] == 10)):
            return None
        if np.any(buf[~is_sep] - np.uint8(48) > 9):  # only digits between them (uint8 wraps below '0')
            return None
        starts = np.empty_like(ends)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        lengths = ends - starts
        if lengths.min() < 1 or lengths.max() > 18:  # empty, or might not fit in int64
            return None
        width = int(lengths.max())
        at = ends[:, None] - width + np.arange(width)      # the last `width` bytes of each token
        digits = np.where(at >= starts[:, None], buf[np.maximum(at, 0)] - np.uint8(48), np.uint8(0))
        values = digits.astype(np.int64) @ (10 ** np.arange(width - 1, -1, -1, dtype=np.int64))
        keys, offsets = values[0::2].copy(), values[1::2].copy()
        if offsets.size and offsets.max() + _LREC.size > self.size:
            return None
        return keys, offsets

    def _parse_idx_lines(self, text: bytes, first_lineno: int = 1) -> Tuple[np.ndarray, np.ndarray]:
        lines = text.splitlines()
        keys = np.empty(len(lines), dtype=np.int64)
        offsets = np.empty(len(lines), dtype=np.int64)
        n = 0
        for lineno, line in enumerate(lines, first_lineno):
            parts = line.split()
            if not parts:
                continue
            try:
                if len(parts) != 2:
                    raise ValueError
                keys[n], offsets[n] = int(parts[0]), int(parts[1])
            except (ValueError, OverflowError):
                raise InputError(self.idx_path, f"expected 'key<TAB>offset', got {line[:60]!r}",
                                 f"line {lineno}") from None
            if offsets[n] < 0 or offsets[n] + _LREC.size > self.size:
                raise InputError(self.idx_path, f"offset {offsets[n]} of record {keys[n]} is past the "
                                                f"end of {self.rec_path.name} ({self.size} bytes)",
                                 f"line {lineno}")
            n += 1
        return keys[:n], offsets[:n]

    def _scan_keys(self) -> None:
        """Index a file without ``.idx``: walk the part headers, skipping over payloads."""
        offsets = array("q")  # 8 bytes a record, not a Python int object each
        spans = array("q")
        with open(self.rec_path, "rb") as fh:
            pos = 0
            key = 0
            while pos < self.size:
                start = pos
                cflag = None
                while cflag not in (0, 3):
                    fh.seek(pos)
                    cflag, length = self._part_header(fh.read(_LREC.size), pos, start, key,
                                                      first=pos == start)
                    pos += _LREC.size + length + (-length % 4)
                    if pos > self.size:
                        raise InputError(self.rec_path, f"truncated record: needs {pos - start} bytes, "
                                                        f"the file ends after {self.size - start}",
                                         f"record {key} at offset {start}")
                offsets.append(start)
                spans.append(pos - start)
                key += 1
        self._key_first = 0
        self._off_arr = np.frombuffer(offsets, dtype=np.int64).copy()
        self._span_arr = np.frombuffer(spans, dtype=np.int64).copy()

    def _set_index(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        n = keys.size
        if n and int(keys[-1]) - int(keys[0]) == n - 1:  # ascending and unique: consecutive
            self._key_first, self._key_arr = int(keys[0]), None
        else:
            self._key_first, self._key_arr = None, keys
        self._off_arr = offsets

    def _offsets(self) -> np.ndarray:
        if self._off_arr is None:
            self._scan_keys()
        return self._off_arr

    @property
    def key_range(self) -> Optional[range]:
        """The keys as a ``range`` when they are consecutive (the usual case), else None."""
        n = self._offsets().size
        return None if self._key_first is None else range(self._key_first, self._key_first + n)

    @property
    def key_array(self) -> np.ndarray:
        """All record keys, ascending, as int64 (from the ``.idx``, or record ordinals from a scan).

        A new array when the keys are consecutive (only offsets are kept then).
        """
        r = self.key_range
        return self._key_arr if r is None else np.arange(r.start, r.stop, dtype=np.int64)

    @property
    def keys(self) -> List[int]:
        """All record keys, ascending, as a new list (use :attr:`key_array` on large files)."""
        return self.key_array.tolist()

    def _positions(self, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(found, index positions)`` of ``keys`` (positions 0 where not found)."""
        n = self._offsets().size
        if self._key_first is not None:
            pos = keys - self._key_first
            found = (pos >= 0) & (pos < n)
        else:
            all_keys = self._key_arr
            pos = np.searchsorted(all_keys, keys)
            found = pos < n
            found[found] = all_keys[pos[found]] == keys[found]
        return found, np.where(found, pos, 0)

    def locate(self, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised :meth:`offset`/:meth:`span`: ``(found, offsets, spans)`` for int64 ``keys``.

        ``offsets``/``spans`` are 0 where ``found`` is False (no record with that key).
        """
        keys = np.asarray(keys, dtype=np.int64)
        all_offsets = self._offsets()
        found, pos = self._positions(keys)
        if not all_offsets.size:
            zeros = np.zeros(keys.shape, dtype=np.int64)
            return found, zeros, zeros.copy()
        return found, np.where(found, all_offsets[pos], 0), np.where(found, self._spans_at(pos), 0)

    def _offsets_ascending(self) -> bool:
        if self._ascending is None:
            offsets = self._offsets()
            self._ascending = bool(offsets.size < 2 or np.all(offsets[1:] >= offsets[:-1]))
        return self._ascending

    def _spans_at(self, pos: np.ndarray) -> np.ndarray:
        """Spans of the records at index positions ``pos``, without a span array when the
        offsets are in file order (the usual case): the next record's offset minus this one's."""
        if self._span_arr is not None or not self._offsets_ascending():
            return self.spans()[pos]
        offsets = self._offsets()
        nxt = pos + 1
        ends = np.where(nxt < offsets.size, offsets[np.minimum(nxt, offsets.size - 1)], self.size)
        return ends - offsets[pos]

    def _position(self, key: int) -> int:
        found, pos = self._positions(np.array([int(key)], dtype=np.int64))
        if found[0]:
            return int(pos[0])
        where = self.idx_path if self.idx_path is not None else self.rec_path
        raise InputError(where, f"no record with key {key}")

    def offset(self, key: int) -> int:
        """Byte offset of record ``key``."""
        return int(self._offsets()[self._position(key)])

    def span(self, key: int) -> int:
        """Bytes record ``key`` occupies in the ``.rec`` (all parts and padding)."""
        return int(self._spans_at(np.array([self._position(key)]))[0])

    def spans(self) -> np.ndarray:
        """Bytes each record occupies (parts and padding), aligned with :attr:`keys`.

        With an ``.idx`` a record's span runs to the next offset in the file: cheap, no payload read.
        (8 bytes a record, kept once computed: :meth:`locate` and :meth:`span` do without it.)
        """
        if self._span_arr is None:
            offsets = self._offsets()
            if self._offsets_ascending():
                self._span_arr = np.diff(offsets, append=self.size)
            else:
                order = np.argsort(offsets, kind="stable")
                ends = np.append(offsets[order][1:], self.size)
                spans = np.empty_like(offsets)
                spans[order] = ends - offsets[order]
                self._span_arr = spans
        return self._span_arr

    def __len__(self) -> int:
        return int(self._offsets().size)

    # -- reading ----------------------------------------------------------------------------
    def _file(self) -> BinaryIO:
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._fh

    def _part_header(self, head: bytes, pos: int, start: int, key: Optional[int], first: bool
                     ) -> Tuple[int, int]:
        where = self._where(key, start)
        if len(head) < _LREC.size:
            raise InputError(self.rec_path, f"truncated record header at offset {pos}: "
                                            f"{len(head)} of {_LREC.size} bytes", where)
        magic, lrec = _LREC.unpack(head)
        if magic != MAGIC:
            raise InputError(self.rec_path, f"bad magic 0x{magic:08x} at offset {pos} "
                                            f"(expected 0x{MAGIC:08x})", where)
        cflag, length = lrec >> 29, lrec & _MAX_LENGTH
        if first and cflag not in (0, 1):
            raise InputError(self.rec_path, f"record starts with a continuation part (cflag {cflag}) "
                                            f"at offset {pos}", where)
        if not first and cflag not in (2, 3):
            raise InputError(self.rec_path, f"split record continues with cflag {cflag} at offset "
                                            f"{pos} (expected 2 or 3)", where)
        return cflag, length

    @staticmethod
    def _where(key: Optional[int], offset: int) -> str:
        return f"offset {offset}" if key is None else f"record {key} at offset {offset}"

    def _read_from(self, fh: BinaryIO, offset: int, key: Optional[int]) -> Tuple[bytes, int]:
        """Read the record whose first part is at ``offset`` (``fh`` positioned there)."""
        pos = offset
        chunks: List[bytes] = []
        first = True
        while True:
            cflag, length = self._part_header(fh.read(_LREC.size), pos, offset, key, first)
            padded = length + (-length % 4)
            data = fh.read(padded)
            if len(data) < padded:
                raise InputError(self.rec_path, f"truncated record: part at offset {pos} needs "
                                                f"{padded} bytes, the file has {len(data)} left",
                                 self._where(key, offset))
            pos += _LREC.size + padded
            if cflag == 0:
                return data[:length] if padded != length else data, pos
            chunks.append(data[:length])
            if cflag == 3:
                return _MAGIC_BYTES.join(chunks), pos
            first = False

    def read_at(self, offset: int, key: Optional[int] = None) -> bytes:
        """The record (parts joined) whose first part starts at byte ``offset``."""
        if offset < 0 or offset >= self.size:
            raise InputError(self.rec_path, f"offset {offset} is past the end of the file "
                                            f"({self.size} bytes)", self._where(key, offset))
        fh = self._file()
        fh.seek(offset)
        return self._read_from(fh, offset, key)[0]

    def read(self, key: int) -> bytes:
        """The record stored under ``key``."""
        return self.read_at(self.offset(key), key)

    def scan(self) -> Iterator[Tuple[int, bytes]]:
        """Every record in file order as ``(offset, record)``; one sequential pass, no ``.idx``."""
        with open(self.rec_path, "rb", buffering=1 << 20) as fh:
            pos = 0
            while pos < self.size:
                record, end = self._read_from(fh, pos, None)
                yield pos, record
                pos = end

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close the file handle (reading again reopens it)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RecordReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fh"] = None
        state["_pid"] = -1
        return state


def jpeg_sof(data: bytes) -> Optional[Tuple[int, int, int, int]]:
    """``(offset, marker, height, width)`` of a JPEG's SOF segment, or None if there is none.

    ``offset`` is where its ``0xFF`` marker byte is; ``height``/``width`` are big-endian uint16
    at ``offset + 5`` and ``offset + 7``.
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        seglen = (data[pos + 2] << 8) | data[pos + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return pos, marker, height, width
        pos += 2 + seglen
    return None


def jpeg_size(data: bytes) -> Optional[Tuple[int, int]]:
    """``(height, width)`` from a JPEG's SOF marker, or None if ``data`` is not a readable JPEG."""
    sof = jpeg_sof(data)
    return None if sof is None else (sof[2], sof[3])


class FacesEmore:
    """A faces_emore folder: ``property``, ``train.rec`` (+ ``train.idx``), ``<set>.bin``.

    Attributes:
        num_classes, image_size (h, w): from ``property``.
        image_key_array: keys of the image records (int64), from the header record wherever
            it is (or, without one, every record that holds an image); ``image_keys`` is the
            same as a new list.
        image_key_range: the same keys as a ``range`` when they are consecutive (faces_emore:
            1 .. first identity - 1), else None; then nothing per image is kept.
        header_key: key of the header record, or None.
        identity_keys: ``range`` of the identity records (empty without a header).

    Raises:
        InputError: missing files, a malformed ``property``, or data that disagrees with it.
    """

    def __init__(self, src_dir: PathLike):
        self.root = Path(src_dir)
        if not self.root.is_dir():
            raise InputError(self.root, "no such directory")
        self.property_path = self.root / "property"
        self.rec_path = self.root / "train.rec"
        idx = self.root / "train.idx"
        self.num_classes, self.image_size = self._read_property()
        if not self.rec_path.is_file():
            raise InputError(self.rec_path, "no such file")
        # what a caller may want to report once the source is known to be good (not logged here: an
        # error found later must stay the one line the user sees)
        self.notes: List[str] = []
        if idx.is_file():
            self.idx_path: Optional[Path] = idx
        else:
            self.idx_path = None
            self.notes.append(f"{self.root}: no train.idx, train.rec was indexed by a sequential scan")
        self.reader = RecordReader(self.rec_path, self.idx_path)
        self.header_key: Optional[int] = None
        self.identity_keys: range = range(0)
        keys = self._find_images()
        self.image_key_range: Optional[range] = None
        self._image_key_arr: Optional[np.ndarray] = None
        if isinstance(keys, range):
            self.image_key_range = keys
        elif keys.size and int(keys[-1]) - int(keys[0]) == keys.size - 1:
            self.image_key_range = range(int(keys[0]), int(keys[-1]) + 1)
        else:
            self._image_key_arr = keys
        del keys
        self._check_image_size()

    def _read_property(self) -> Tuple[int, Tuple[int, int]]:
        if not self.property_path.is_file():
            raise InputError(self.property_path, "no such file (expected 'classes,height,width')")
        text = self.property_path.read_text(encoding="ascii", errors="replace").strip()
        try:
            classes, height, width = (int(v) for v in text.split(","))
        except ValueError:
            raise InputError(self.property_path, f"expected 'classes,height,width', got {text[:60]!r}") \
                from None
        if classes <= 0 or height <= 0 or width <= 0:
            raise InputError(self.property_path, f"expected positive 'classes,height,width', got {text!r}")
        return classes, (height, width)

    def _record_header(self, key: int) -> Tuple[IRHeader, bytes]:
        return unpack(self.reader.read(key), self.rec_path, f"record {key}")

    def _header_at(self, key: int) -> Optional[Tuple[int, int]]:
        """``(start, end)`` if record ``key`` is the faces_emore header, else None.

        The header and the identity records look alike (flag >= 2, no image, label = a key
        range); the header's range starts at a record without an image, an identity's at one with.
        """
        header, payload = self._record_header(key)
        if header.flag < 2 or payload:
            return None
        start, end = header.label[0], header.label[1]
        if not (math.isfinite(start) and math.isfinite(end)) or start != int(start) or end != int(end):
            return None
        start, end = int(start), int(end)
        if end <= start or start == key:
            return None
        try:
            first, first_payload = self._record_header(start)
        except InputError:
            return None
        if first.flag < 2 or first_payload:
            return None
        return start, end

    def _find_images(self) -> Union[range, np.ndarray]:
        n = len(self.reader)
        if not n:
            raise InputError(self.rec_path, "no records")
        keys = self.reader.key_range
        key_arr = self.reader.key_array if keys is None else None
        ends = (keys[0], keys[-1]) if keys is not None else (int(key_arr[0]), int(key_arr[-1]))
        found = None
        # Usually key 0; some writers put it last. Only then look at every small record.
        for key in dict.fromkeys(ends):
            if self.reader.span(key) <= _SMALL_RECORD:
                found = self._header_at(key)
                if found is not None:
                    break
        small = self.reader.spans() <= _SMALL_RECORD if found is None else None
        if found is None and key_arr is None:
            key_arr = self.reader.key_array
        if found is None:
            for key in key_arr[small].tolist():
                found = self._header_at(key)
                if found is not None:
                    break
        if found is None:
            self.notes.append(f"{self.rec_path}: no faces_emore header record; every record that holds an "
                              "image was used")
            holds_image = ~small
            for i in np.flatnonzero(small).tolist():
                holds_image[i] = bool(self._record_header(int(key_arr[i]))[1])
            return key_arr[holds_image]
        start, end = found
        self.header_key = key
        self.identity_keys = range(start, end)
        if end - start != self.num_classes:
            raise InputError(self.property_path,
                             f"property says {self.num_classes} classes but the header record "
                             f"(key {key}) of {self.rec_path.name} lists {end - start} identities")
        if keys is not None:  # consecutive keys: the images are a range unless the header splits it
            lo, hi = keys.start, min(start, keys.stop)
            if key == lo:
                return range(lo + 1, max(lo + 1, hi))
            if not lo < key < hi:
                return range(lo, max(lo, hi))
            key_arr = self.reader.key_array
        return key_arr[(key_arr < start) & (key_arr != key)]

    def _check_image_size(self) -> None:
        if not self.num_images:
            raise InputError(self.rec_path, "no image records")
        key = int(self.image_key_array[0])
        _, jpeg = self.read_image(key)
        size = jpeg_size(jpeg)
        if size is not None and size != tuple(self.image_size):
            raise InputError(self.property_path,
                             f"property says {self.image_size[0]}x{self.image_size[1]} images but "
                             f"record {key} of {self.rec_path.name} is {size[0]}x{size[1]}")

    @property
    def image_key_array(self) -> np.ndarray:
        """Keys of the image records, ascending (int64; a new array when they are a range)."""
        if self._image_key_arr is not None:
            return self._image_key_arr
        r = self.image_key_range
        return np.arange(r.start, r.stop, dtype=np.int64)

    @property
    def image_keys(self) -> List[int]:
        """Keys of the image records as a new list (use :attr:`image_key_array` on large sets)."""
        return self.image_key_array.tolist()

    @property
    def num_images(self) -> int:
        """Number of image records."""
        if self.image_key_range is not None:
            return len(self.image_key_range)
        return int(self._image_key_arr.size)

    def decode_image_record(self, key: int, record: bytes) -> Tuple[int, bytes]:
        """``(class id, JPEG bytes)`` from a raw record (validated like :meth:`read_image`)."""
        header, payload = unpack(record, self.rec_path, f"record {key}")
        return self.check_image(key, first_label(header), payload)

    def check_image(self, key: int, value: float, payload: bytes) -> Tuple[int, bytes]:
        """``(class id, JPEG bytes)`` of image record ``key`` whose first label is ``value``.

        Raises:
            InputError: a label that is not a class id of ``property``, or a payload that is not a JPEG.
        """
        where = f"record {key}"
        if not math.isfinite(value):
            raise InputError(self.rec_path, f"label {value} is not a number", where)
        label = int(value)
        if not 0 <= label < self.num_classes:
            raise InputError(self.rec_path, f"label {label} out of range [0, {self.num_classes}) "
                                            f"(property)", where)
        if payload[:2] != b"\xff\xd8":
            raise InputError(self.rec_path, "image payload is not a JPEG "
                                            f"({len(payload)} bytes, starts {payload[:4].hex() or 'empty'})",
                             where)
        return label, payload

    def read_image(self, key: int) -> Tuple[int, bytes]:
        """``(class id, JPEG bytes)`` of image record ``key``; class id = int(first label float)."""
        if key == self.header_key or key in self.identity_keys:
            kind = "the faces_emore header" if key == self.header_key else "an identity record"
            raise InputError(self.rec_path, f"{kind}, not an image", f"record {key}")
        return self.decode_image_record(key, self.reader.read(key))

    def bin_files(self) -> Dict[str, Path]:
        """Verification sets in the folder: ``{set name: path of <set>.bin}``, sorted by name."""
        return {p.stem: p for p in sorted(self.root.glob("*.bin")) if p.is_file()}

    def close(self) -> None:
        """Close the underlying reader."""
        self.reader.close()

    def __enter__(self) -> "FacesEmore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MXNetRecords:
    """Image records of a faces_emore folder read through MXNet's own reader (``--reader mxnet``):
    ``mxnet.recordio.MXIndexedRecordIO`` and ``mxnet.recordio.unpack``, checked like
    :meth:`FacesEmore.read_image`. A cross-check of the pure reader; mxnet is imported on use.
    ``reader``, ``rec_path`` and ``num_classes`` are the folder's (the record index stays the
    pure reader's).

    Raises:
        InputError: mxnet missing or not importable, or no ``train.idx`` (MXNet's reader needs it).
    """

    def __init__(self, source: FacesEmore):
        self.source = source
        self.reader, self.rec_path, self.num_classes = source.reader, source.rec_path, source.num_classes
        self._recordio = self.check_available(source)
        from mxnet.base import MXNetError  # importable once mxnet.recordio is

        # what MXNet's reader raises for a damaged record, a short header, a key not in the .idx
        self._errors = (MXNetError, struct.error, ValueError, KeyError)
        try:
            self._rec = self._recordio.MXIndexedRecordIO(str(source.idx_path), str(source.rec_path), "r")
        except self._errors as err:
            raise InputError(source.idx_path, f"mxnet cannot open the index ({err})") from None

    @staticmethod
    def check_available(source: FacesEmore):
        """The ``mxnet.recordio`` module, if MXNet can read ``source``; else the InputError saying why."""
        recordio = import_mxnet_recordio()
        if source.idx_path is None:
            raise InputError(source.root / "train.idx", "no such file; --reader mxnet needs the index "
                                                        "(--reader pure scans train.rec without one)")
        return recordio

    def read_image(self, key: int) -> Tuple[int, bytes]:
        """``(class id, JPEG bytes)`` of image record ``key``."""
        try:
            header, payload = self._recordio.unpack(self._rec.read_idx(key))
        except self._errors as err:
            detail = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
            raise InputError(self.source.rec_path, f"mxnet cannot read the record ({detail})",
                             f"record {key}") from None
        label = header.label
        value = float(label) if np.ndim(label) == 0 else (float(label[0]) if len(label) else math.nan)
        return self.source.check_image(key, value, bytes(payload))

    def close(self) -> None:
        self._rec.close()


def import_mxnet_recordio():
    """The ``mxnet.recordio`` module, or the InputError that says how to get it."""
    try:
        import mxnet.recordio as recordio
    except ImportError:
        raise InputError("--reader", "got 'mxnet', but mxnet is not installed: pip install 'lresnet[mxnet]' "
                                     "(MXNet 1.9.1 needs numpy < 1.24), or use --reader pure") from None
    except AttributeError as err:  # MXNet 1.9.1 uses numpy aliases that numpy 1.24 removed
        raise InputError("--reader", f"got 'mxnet', but mxnet cannot be imported ({err}): MXNet 1.9.1 needs "
                                     "numpy < 1.24; use --reader pure") from None
    return recordio


def open_faces_emore(src_dir: PathLike) -> FacesEmore:
    """Open a faces_emore folder (see :class:`FacesEmore`)."""
    return FacesEmore(src_dir)


__all__ = ["MAGIC", "IR_SIZE", "IRHeader", "pack", "unpack", "first_label", "encode_record",
           "RecordWriter", "RecordReader", "FacesEmore", "MXNetRecords", "import_mxnet_recordio",
           "open_faces_emore", "jpeg_size", "jpeg_sof"]

