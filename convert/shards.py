"""Shard files: a small direct POSIX ustar writer/reader and the DALI index beside each shard.

Why not ``tarfile`` or ``webdataset.TarWriter``: converting writes millions of tiny members,
and both spend tens of microseconds of Python per member (``TarInfo`` objects, header
encoding, per-call flushes). A ustar header is 512 fixed bytes; building it from a
template costs a couple of microseconds, so the writer here keeps up with the disk.
The output is a plain POSIX ustar archive (no pax/GNU extensions, fixed mtime/owner, so
the bytes depend only on the members), which GNU tar, ``tarfile`` and webdataset read.

Shards are written under a temporary name in the target folder and renamed once closed,
so an interrupted writer never leaves a file that looks complete.

The DALI index (``.idx``) is the text format NVIDIA DALI's ``wds2idx`` tool writes and
``fn.readers.webdataset(index_paths=...)`` reads (version ``v1.2``)::

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> [<ext> <data offset> <size> <member name> ...]

one line per sample (consecutive members sharing a basename), offsets of the member
*data* (header offset + 512), so every offset is a multiple of 512.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from lresnet.core.errors import InputError

PathLike = Union[str, "os.PathLike[str]"]

BLOCK = 512
RECORD = 10240  # GNU tar / tarfile default record size (blocking factor 20): archives end on it
DALI_INDEX_VERSION = "v1.2"
_ZEROS = bytes(RECORD)
_WRITE_CHUNK = 1 << 20  # bytes hashed then written while in cache


def _ustar_template() -> Tuple[bytes, int]:
    """Header bytes with every constant field filled, and their checksum contribution."""
    h = bytearray(BLOCK)
    h[100:108] = b"0000644\0"          # mode
    h[108:116] = b"0000000\0"          # uid
    h[116:124] = b"0000000\0"          # gid
    h[136:148] = b"00000000000\0"      # mtime: fixed, so output bytes depend only on content
    h[148:156] = b"        "           # chksum field counts as spaces
    h[156:157] = b"0"                  # typeflag: regular file
    h[257:263] = b"ustar\0"            # POSIX magic
    h[263:265] = b"00"                 # version
    h[329:337] = b"0000000\0"          # devmajor
    h[337:345] = b"0000000\0"          # devminor
    return bytes(h), sum(h)


_TEMPLATE, _TEMPLATE_SUM = _ustar_template()
_MODE_UID_GID = _TEMPLATE[100:124]
_MTIME = _TEMPLATE[136:148]
_AFTER_CHKSUM = _TEMPLATE[156:]
_MAX_SIZE = 8 ** 11 - 1  # 11 octal digits: 8 GiB - 1


def ustar_header(name: bytes, size: int) -> bytes:
    """The 512-byte POSIX ustar header of a regular file ``name`` (ASCII, <= 100 bytes)."""
    if len(name) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name[:40]!r}...")
    if not 0 <= size <= _MAX_SIZE:
        raise ValueError(f"tar member size out of ustar range: {size}")
    size_field = b"%011o\0" % size
    chksum = _TEMPLATE_SUM + sum(name) + sum(size_field)
    # one join of constant slices: ~2x faster than filling a bytearray template
    return b"".join((name.ljust(100, b"\0"), _MODE_UID_GID, size_field, _MTIME,
                     b"%06o\0 " % chksum, _AFTER_CHKSUM))


def split_member_name(name: str) -> Tuple[str, str]:
    """``"dir/000123.a.jpg"`` -> ``("dir/000123", "a.jpg")``: webdataset's/DALI's key split."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


@dataclass(frozen=True)
class ShardInfo:
    """What a closed shard holds: file name, samples, bytes on disk, sha256 of the tar."""

    name: str
    count: int
    bytes: int
    sha256: str

    def as_dict(self) -> dict:
        return {"name": self.name, "count": self.count, "bytes": self.bytes, "sha256": self.sha256}


def temp_path_for(path: Path) -> Path:
    """Temporary name used while ``path`` is written: hidden, per process, in the same folder."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temp_files(folder: PathLike) -> int:
    """Delete ``.*.tmp`` files left by writers that no longer run. Returns how many."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.glob(".*.tmp"):
        parts = p.name.rsplit(".", 2)
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else -1
        if pid > 0 and pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            p.unlink()
            removed += 1
        except FileNotFoundError:
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TarShardWriter:
    """Write a ustar shard (and optionally its DALI index) atomically.

    Members go into a buffer that is hashed and written in ~1 MiB chunks; nothing
    appears under ``path`` until :meth:`close` renames the finished file into place.
    Used as a context manager, an exception aborts (deletes the temporary file).

    Args:
        path: final ``.tar`` path.
        index_path: where to write the DALI ``v1.2`` index, or None for no index.
        buffer_size: bytes buffered between writes.
    """

    def __init__(self, path: PathLike, index_path: Optional[PathLike] = None,
                 buffer_size: int = 1 << 20):
        self.path = Path(path)
        self.index_path = None if index_path is None else Path(index_path)
        self._tmp = temp_path_for(self.path)
        self._file = open(self._tmp, "wb", buffering=0)
        self._buf = bytearray()
        self._buffer_size = buffer_size
        self._sha = hashlib.sha256()
        self._pos = 0                      # bytes written so far (file + buffer)
        self._index_lines: List[str] = []  # one line per sample (DALI format)
        self._last_key: Optional[str] = None
        self._count = 0
        self._closed = False

    # -- writing -------------------------------------------------------------------
    def _append(self, name: str, data: bytes) -> int:
        """Header + data + padding into the buffer; returns the data offset."""
        size = len(data)
        buf = self._buf
        buf += ustar_header(name.encode("ascii"), size)
        offset = self._pos + BLOCK
        buf += data
        pad = -size % BLOCK
        if pad:
            buf += _ZEROS[:pad]
        self._pos = offset + size + pad
        return offset

    def _index(self, key: str, entry: str) -> None:
        if key == self._last_key:
            self._index_lines[-1] += " " + entry
        else:
            self._index_lines.append(entry)
            self._last_key = key
            self._count += 1
        if len(self._buf) >= self._buffer_size:
            self._flush()

    def add(self, name: str, data: bytes) -> int:
        """Append one member; returns the offset of its data in the archive.

        Consecutive members with the same key (name up to the first dot) form one sample.
        """
        offset = self._append(name, data)
        key, ext = split_member_name(name)
        self._index(key, f"{ext} {offset} {len(data)} {name}")
        return offset

    def add_pair(self, key: str, ext1: str, data1: bytes, ext2: str, data2: bytes) -> None:
        """Append the two-member sample ``key.ext1``, ``key.ext2`` (the converter's hot path).

        Same bytes as two :meth:`add` calls, with the per-member bookkeeping inlined.
        """
        n1, n2 = f"{key}.{ext1}", f"{key}.{ext2}"
        s1, s2 = len(data1), len(data2)
        p1, p2 = -s1 % BLOCK, -s2 % BLOCK
        o1 = self._pos + BLOCK
        o2 = o1 + s1 + p1 + BLOCK
        buf = self._buf
        buf += ustar_header(n1.encode("ascii"), s1)
        buf += data1
        buf += _ZEROS[:p1]
        buf += ustar_header(n2.encode("ascii"), s2)
        buf += data2
        buf += _ZEROS[:p2]
        self._pos = o2 + s2 + p2
        self._index(key, f"{ext1} {o1} {s1} {n1} {ext2} {o2} {s2} {n2}")

    def tell(self) -> int:
        """Bytes in the archive so far: where the next member's header goes."""
        return self._pos

    def add_packed(self, data, index_text: str, samples: int) -> None:
        """Append members laid out by :func:`pack_jpg_cls` at :meth:`tell` (the converter's path).

        ``data`` (any buffer, a multiple of 512 bytes) is hashed and written in 1 MiB pieces
        without being copied; ``index_text`` holds its ``samples`` DALI index lines.
        """
        view = memoryview(data).cast("B")
        if len(view) % BLOCK:
            raise ValueError(f"packed members must fill whole 512-byte blocks, got {len(view)} bytes")
        self._flush()
        for i in range(0, len(view), _WRITE_CHUNK):
            piece = view[i:i + _WRITE_CHUNK]
            self._sha.update(piece)
            while piece:
                piece = piece[self._file.write(piece):]
        self._pos += len(view)
        if samples:
            self._index_lines.append(index_text[:-1] if index_text.endswith("\n") else index_text)
            self._count += samples
            self._last_key = None

    def write_sample(self, key: str, members: Sequence[Tuple[str, bytes]]) -> None:
        """Append one sample: ``members`` = ``[(ext, data), ...]`` written as ``key.ext``."""
        for ext, data in members:
            self.add(f"{key}.{ext}", data)

    def _flush(self) -> None:
        if self._buf:
            view = memoryview(self._buf)
            self._sha.update(view)
            self._file.write(view)
            view.release()
            self._buf = bytearray()

    # -- finishing -----------------------------------------------------------------
    def close(self) -> ShardInfo:
        """Finish the archive (end blocks, pad to a 10 KiB record), rename it into place."""
        if self._closed:
            raise ValueError(f"{self.path}: shard already closed")
        end = self._pos + 2 * BLOCK
        end += -end % RECORD
        self._buf += bytes(end - self._pos)
        self._pos = end
        self._flush()
        self._file.close()
        self._closed = True
        if self.index_path is not None:
            write_dali_index(self.index_path, self._index_lines, self._count)
        os.replace(self._tmp, self.path)
        return ShardInfo(self.path.name, self._count, self._pos, self._sha.hexdigest())

    def abort(self) -> None:
        """Drop the partial archive; the final path is left untouched."""
        if not self._closed:
            self._closed = True
            self._file.close()
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            return

    @property
    def count(self) -> int:
        """Samples written so far."""
        return self._count

    def __enter__(self) -> "TarShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def write_dali_index(path: PathLike, sample_lines: Sequence[str], count: Optional[int] = None) -> None:
    """Write a DALI ``v1.2`` index from per-sample lines, atomically (temp + rename).

    ``count`` (samples) is needed only when an entry of ``sample_lines`` holds several lines.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        f.write(f"{DALI_INDEX_VERSION} {len(sample_lines) if count is None else count}\n")
        for line in sample_lines:
            f.write(line)
            f.write("\n")
    os.replace(tmp, path)


def read_dali_index(path: PathLike) -> List[List[Tuple[str, int, int, str]]]:
    """Parse a DALI ``v1.2`` index: per sample, a list of ``(ext, offset, size, name)``."""
    path = Path(path)
    with open(path, "r", encoding="ascii") as f:
        head = f.readline().split()
        if len(head) != 2 or head[0] != DALI_INDEX_VERSION or not head[1].isdigit():
            raise InputError(path, f"not a DALI {DALI_INDEX_VERSION} index header: {' '.join(head)!r}",
                             where="line 1")
        samples = []
        for lineno, line in enumerate(f, start=2):
            fields = line.split()
            if not fields or len(fields) % 4:
                raise InputError(path, "expected groups of '<ext> <offset> <size> <name>'",
                                 where=f"line {lineno}")
            samples.append([(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                            for i in range(0, len(fields), 4)])
    if len(samples) != int(head[1]):
        raise InputError(path, f"header says {head[1]} samples, found {len(samples)}")
    return samples


def iter_members(path: PathLike, with_data: Union[bool, Tuple[str, ...]] = False
                 ) -> Iterator[Tuple[str, int, int, Optional[bytes]]]:
    """Iterate a ustar archive's regular files straight from its headers.

    Yields ``(name, data_offset, size, data)``; ``data`` is read when ``with_data`` is True
    or the name ends with one of the given suffixes, else None (the data is skipped by seek).
    Raises :class:`InputError` naming the file and offset on a damaged header.
    """
    path = Path(path)
    with open(path, "rb") as f:
        offset = 0
        while True:
            header = f.read(BLOCK)
            if len(header) < BLOCK:
                raise InputError(path, "archive ends without its end-of-archive blocks",
                                 where=f"offset {offset}")
            if header == _ZEROS[:BLOCK]:
                return
            stored = header[148:156].split(b"\0", 1)[0].strip()
            actual = sum(header[:148]) + 256 + sum(header[156:])
            try:
                size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
                ok = int(stored, 8) == actual
            except ValueError:
                ok = False
            if not ok:
                raise InputError(path, "bad tar header checksum", where=f"offset {offset}")
            name = header[0:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            full = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
            typeflag = header[156:157]
            data_offset = offset + BLOCK
            padded = size + (-size % BLOCK)
            data = None
            if typeflag in (b"0", b"\0"):
                want = with_data is True or (isinstance(with_data, tuple) and full.endswith(with_data))
                if want:
                    data = f.read(size)
                    if len(data) < size:
                        raise InputError(path, f"member {full} truncated", where=f"offset {data_offset}")
                    f.seek(padded - size, os.SEEK_CUR)
                else:
                    f.seek(padded, os.SEEK_CUR)
                yield full, data_offset, size, data
            else:
                f.seek(padded, os.SEEK_CUR)
            offset = data_offset + padded


def file_sha256(path: PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


# --------------------------------------------------------------------------- whole shards at once
# The converter knows a shard's every member before writing it, so it builds the archive with
# numpy: all headers at once from the template, member data copied into one buffer, hashed and
# written in large chunks. Same bytes as TarShardWriter.add_pair per sample (tested).
_TEMPLATE_ARR = np.frombuffer(_TEMPLATE, dtype=np.uint8)
_POW10 = 10 ** np.arange(19, dtype=np.int64)


def _decimal(values: np.ndarray, width: int) -> np.ndarray:
    """``(n, width)`` ASCII digits of non-negative int64 ``values``, zero-padded on the left."""
    return (values[:, None] // _POW10[width - 1::-1] % 10 + 48).astype(np.uint8)


def _octal(values: np.ndarray, width: int) -> np.ndarray:
    """``(n, width)`` ASCII octal digits of non-negative int64 ``values``, zero-padded."""
    return ((values[:, None] >> np.arange(3 * (width - 1), -1, -3)) & 7).astype(np.uint8) + 48


def ustar_headers(names: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``(n, 512)`` ustar headers, row i = ``ustar_header(names[i], sizes[i])``.

    Args:
        names: ``(n, L)`` uint8 ASCII member names (L <= 100; zero bytes pad short names).
        sizes: ``(n,)`` int64 member sizes.
    """
    if names.shape[1] > 100:
        raise ValueError(f"tar member names longer than 100 bytes: {names.shape[1]}")
    if sizes.size and (sizes.min() < 0 or sizes.max() > _MAX_SIZE):
        raise ValueError("tar member size out of ustar range")
    rows = np.empty((sizes.size, BLOCK), dtype=np.uint8)
    rows[:] = _TEMPLATE_ARR
    rows[:, :names.shape[1]] = names
    size_field = _octal(sizes, 11)
    rows[:, 124:135] = size_field
    # the template's sum (chksum field = 8 spaces) plus what differs: name and size
    checksum = (_TEMPLATE_SUM + names.sum(axis=1, dtype=np.int64)
                + size_field.sum(axis=1, dtype=np.int64))
    rows[:, 148:154] = _octal(checksum, 6)
    rows[:, 154] = 0
    return rows


def pack_jpg_cls(keys: np.ndarray, key_digits: int, labels: np.ndarray, src, starts: np.ndarray,
                 sizes: np.ndarray, offset: int = 0, out: Optional[np.ndarray] = None
                 ) -> Tuple[np.ndarray, str]:
    """Lay out a batch of train samples: ``KEY.jpg`` (bytes ``src[starts[i]:starts[i]+sizes[i]]``)
    and ``KEY.cls`` (``labels[i]`` in ASCII decimal), KEY = ``keys[i]`` zero-padded to ``key_digits``.

    Returns the members' bytes (a uint8 array, whole 512-byte blocks) and their DALI index
    lines, for an archive where they start at byte ``offset``: what
    :meth:`TarShardWriter.add_pair` writes for each sample (tested byte for byte). The bytes
    are a view of ``out`` when that buffer is large enough (reuse it: no fresh pages), else
    of a new array.
    """
    keys = np.asarray(keys, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    n = keys.size
    if offset % BLOCK:
        raise ValueError(f"members start on a 512-byte block, got offset {offset}")
    if not n:
        return np.zeros(0, dtype=np.uint8), ""
    digits = key_digits
    if keys.min() < 0 or labels.min() < 0 or keys.max() >= 10 ** digits:
        raise ValueError(f"pack_jpg_cls takes keys in [0, 10**{digits}) and labels >= 0")
    names = np.zeros((n, digits + 4), dtype=np.uint8)
    names[:, :digits] = _decimal(keys, digits)
    label_digits = np.searchsorted(_POW10[1:], labels, side="right") + 1
    width = int(label_digits.max())
    # left-aligned decimal of each label: digit j is the one of 10**(label_digits-1-j)
    exps = label_digits[:, None] - 1 - np.arange(width)
    label_chars = (labels[:, None] // _POW10[np.maximum(exps, 0)] % 10 + 48).astype(np.uint8)
    label_chars[exps < 0] = 0

    data_blocks = (sizes + BLOCK - 1) // BLOCK
    first = np.zeros(n + 1, dtype=np.int64)        # block of each sample's .jpg header
    np.cumsum(data_blocks + 3, out=first[1:])
    end = int(first[-1]) * BLOCK
    if out is None or out.size < end:
        out = np.empty(end, dtype=np.uint8)
    out = out[:end]
    blocks = out.reshape(-1, BLOCK)
    first = first[:-1]
    cls_block = first + 1 + data_blocks
    # every byte is written below: zero the JPEGs' last blocks (their padding) and the .cls data
    blocks[first + data_blocks] = 0
    blocks[cls_block + 1] = 0
    names[:, digits:] = np.frombuffer(b".jpg", dtype=np.uint8)
    blocks[first] = ustar_headers(names, sizes)
    names[:, digits:] = np.frombuffer(b".cls", dtype=np.uint8)
    blocks[cls_block] = ustar_headers(names, label_digits)
    blocks[cls_block + 1, :width] = label_chars

    jpg_at = (first + 1) * BLOCK
    dst = memoryview(out)
    view = memoryview(src).cast("B")
    for d, a, s in zip(jpg_at.tolist(), starts.tolist(), sizes.tolist()):
        dst[d:d + s] = view[a:a + s]

    line = f"jpg %d %d %0{digits}d.jpg cls %d %d %0{digits}d.cls\n"
    values = np.stack([offset + jpg_at, sizes, keys, offset + (cls_block + 1) * BLOCK, label_digits,
                       keys], axis=1)
    return out, (line * n) % tuple(values.ravel().tolist())


