"""The shard tar format, in one module: the writers, the DALI index, and the one fast reader.

A shard is a POSIX tar archive (ustar headers; GNU tar, ``tarfile`` and webdataset read it) of
samples: consecutive members sharing a key, the member name up to the first dot of its basename
(webdataset's rule, :func:`split_member_name`). A train sample is ``KEY.jpg`` + ``KEY.cls``, a
verification pair ``KEY.a.jpg`` + ``KEY.b.jpg`` + ``KEY.same``. Each train shard has a DALI
index (``.idx``) beside it. Shards are written under a temporary name and renamed when complete.

Why not ``tarfile`` or webdataset: they spend tens of microseconds of Python per member, while
training reads every member every epoch and a 112x112 JPEG decodes in ~100 us, so that overhead
would cut the input rate by a third or more. A ustar header is 512 fixed bytes: the writer
builds it from a template and the reader parses it with one ``struct`` unpack, a few
microseconds per sample.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from lresnet.core.errors import InputError
from lresnet.core.files import atomic_file, temp_path_for

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
    """The 512-byte POSIX ustar header of a regular file ``name`` (ASCII).

    Names up to 100 bytes go into the name field; longer ones (up to 256 bytes) are cut at a
    ``/`` into ustar's 155-byte prefix field and the name field.
    """
    if len(name) > 100:
        return _prefixed_ustar_header(name, size)
    if not 0 <= size <= _MAX_SIZE:
        raise ValueError(f"tar member size out of ustar range: {size}")
    size_field = b"%011o\0" % size
    chksum = _TEMPLATE_SUM + sum(name) + sum(size_field)
    # one join of constant slices: ~2x faster than filling a bytearray template
    return b"".join((name.ljust(100, b"\0"), _MODE_UID_GID, size_field, _MTIME,
                     b"%06o\0 " % chksum, _AFTER_CHKSUM))


def _prefixed_ustar_header(name: bytes, size: int) -> bytes:
    cut = name.rfind(b"/", 0, 156)  # the longest prefix that fits leaves the shortest name
    if cut <= 0 or not 0 < len(name) - cut - 1 <= 100:
        raise ValueError(f"tar member name does not fit ustar's 155-byte prefix and 100-byte name: "
                         f"{name[:40]!r}... ({len(name)} bytes)")
    prefix = name[:cut]
    head = ustar_header(name[cut + 1:], size)
    chksum = int(head[148:154], 8) + sum(prefix)
    return b"".join((head[:148], b"%06o\0 " % chksum, head[156:345], prefix.ljust(155, b"\0"), head[500:]))


def split_member_name(name: str) -> Tuple[str, str]:
    """``"dir/000123.a.jpg"`` -> ``("dir/000123", "a.jpg")``: the sample key and the extension.

    The key is the name up to the first dot of its basename (webdataset's and DALI's rule);
    a name without a dot there is all key, with the extension ``""``.
    """
    if "/" in name:
        dot = name.find(".", name.rfind("/") + 1)
        return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])
    key, _, ext = name.partition(".")
    return key, ext


@dataclass(frozen=True)
class ShardInfo:
    """What a closed shard holds: file name, samples, bytes on disk, sha256 of the tar."""

    name: str
    count: int
    bytes: int
    sha256: str

    def as_dict(self) -> dict:
        return {"name": self.name, "count": self.count, "bytes": self.bytes, "sha256": self.sha256}


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

    The format is what DALI's ``wds2idx`` writes and ``fn.readers.webdataset(index_paths=...)``
    reads: a line ``v1.2 <samples>``, then one line per sample of ``<ext> <data offset> <size>
    <member name>`` groups, one group per member; offsets are of the member *data* (header + 512).
    ``count`` (samples) is needed only when an entry of ``sample_lines`` holds several lines.
    """
    with atomic_file(path, "w", encoding="ascii", newline="\n") as f:
        f.write(f"{DALI_INDEX_VERSION} {len(sample_lines) if count is None else count}\n")
        for line in sample_lines:
            f.write(line)
            f.write("\n")


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




# --------------------------------------------------------------------------- the reader
# Reads ustar headers (and the pax / GNU long-name headers other writers add) straight from a
# buffered stream. This is the training input's hot path: every member of every shard once per
# epoch, so the loop below is kept flat (no per-member generator or object).
_REGULAR = (b"0", b"\0", b"7")
# name, size, checksum, type flag, magic, prefix: the fields of a ustar header the reader needs
_FIELDS = struct.Struct("100s24x12s12x8s1s100x5s83x155s12x")


class TarReadError(Exception):
    """The archive is cut short or garbled; ``offset`` is the byte offset, ``key`` the sample being read."""

    def __init__(self, message: str, offset: int, key: Optional[str]):
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.key = key

    @property
    def where(self) -> str:
        """Place in the shard, for error messages."""
        return f"offset {self.offset}" + (f", key {self.key}" if self.key else "")


def _field_number(field: bytes) -> int:
    """A header's octal number field (or GNU base-256, for sizes of 8 GiB and more)."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> Dict[str, str]:
    """The ``LENGTH key=value\\n`` records of a pax extended header (ValueError when garbled)."""
    records: Dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos:
            raise ValueError(f"pax record length {length}")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return records


def _checksum_field(field: bytes) -> int:
    """What the low half of adler32 over a header must be, given the header's checksum field.

    The checksum is the byte sum of the header with its 8-byte field counted as spaces; adler32's low
    half is 1 + the byte sum mod 65521, computed at C speed. The field's value repeats from header to
    header, so read_samples remembers this per field (a dict lookup instead of int() and sum() each time).
    A field that does not parse gives -1, which never matches.
    """
    try:
        stored = _field_number(field)
    except ValueError:
        return -1
    return (1 + stored - 256 + sum(field)) % 65521


def _skip(stream: BinaryIO, nbytes: int, seekable: bool) -> int:
    """Move past ``nbytes``; returns how many were actually available."""
    if seekable:
        stream.seek(nbytes, 1)
        return nbytes
    remaining = nbytes
    while remaining:
        chunk = stream.read(min(remaining, 1 << 20))
        if not chunk:
            break
        remaining -= len(chunk)
    return nbytes - remaining


def read_samples(stream: BinaryIO, skip: int = 0, limit: Optional[int] = None,
                 size_hint: Optional[int] = None, select: Optional[Callable[[str], bool]] = None,
                 members: Optional[list] = None) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """Yield ``(key, {extension: payload})`` for consecutive samples of a tar stream.

    Members are grouped by :func:`split_member_name`, as webdataset groups them; directories,
    links and other non-file members are passed over.

    Args:
        stream: a binary stream positioned at the start of the archive (a buffered file or a pipe).
        skip: samples to pass over first; their payloads are seeked over (read and dropped on pipes).
        limit: stop after yielding this many samples.
        size_hint: the file size, when known, to detect truncation without reading past the end.
        select: a test on each member name; payloads it refuses are passed over like skipped
            ones and left out of their sample (which may then be empty).
        members: a list that receives ``(name, data offset, size)`` of every file member, selected
            or not, by the time the sample holding it is yielded.

    Raises:
        TarReadError: a header or payload is cut short, a header checksum is wrong, or a sample
            holds the same extension twice.
    """
    read = stream.read
    try:
        seekable = bool(stream.seekable())
    except (AttributeError, OSError):
        seekable = False
    offset = 0
    index = 0  # index of the sample `key` belongs to
    yielded = 0
    key: Optional[str] = None
    parts: Dict[str, bytes] = {}
    long_name: Optional[str] = None
    pax: Dict[str, str] = {}
    known_sums: Dict[bytes, int] = {}  # header checksum field -> what adler32's low half must be
    if limit is not None and limit <= 0:
        return
    while True:
        header = read(BLOCK)
        if len(header) < BLOCK:
            if header:
                raise TarReadError(f"tar header cut short ({len(header)} of {BLOCK} bytes)", offset, key)
            break  # end of file without the end-of-archive blocks: accepted, as GNU tar does
        if header[0] == 0 and header == _ZEROS[:BLOCK]:
            break
        name, size_field, field, kind, magic, prefix = _FIELDS.unpack(header)
        expected = known_sums.get(field)
        if expected is None:
            expected = known_sums[field] = _checksum_field(field)
        if (zlib.adler32(header) & 0xFFFF) != expected:
            raise TarReadError("tar header checksum mismatch (not a tar file, or garbled)", offset, key)
        try:
            size = int(size_field[:11], 8) if size_field[11] in (0, 32) else _field_number(size_field)
        except ValueError:
            raise TarReadError("tar header has a bad size field", offset, key) from None
        offset += BLOCK
        padded = (size + BLOCK - 1) & ~(BLOCK - 1)
        if kind in (b"x", b"L", b"g"):
            data = read(padded)
            if len(data) < padded:
                raise TarReadError("tar extended header cut short", offset, key)
            offset += padded
            if kind == b"x":
                try:
                    pax = _pax_records(data[:size])
                except ValueError:
                    raise TarReadError("bad pax extended header", offset - padded, key) from None
            elif kind == b"L":
                long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        name = name.partition(b"\0")[0].decode("utf-8", "surrogateescape")
        if prefix[0] and magic == b"ustar":
            name = prefix.partition(b"\0")[0].decode("utf-8", "surrogateescape") + "/" + name
        if pax or long_name is not None:  # extended headers override the name and size
            if "size" in pax:
                size = int(pax["size"])
                padded = (size + BLOCK - 1) & ~(BLOCK - 1)
            name = long_name if long_name is not None else pax.get("path") or name
            long_name = None
            pax = {}
        if kind not in _REGULAR:
            offset += _skip(stream, padded, seekable)
            continue
        member_key, ext = split_member_name(name)
        if member_key != key:
            if key is not None:
                if index >= skip:
                    yield key, parts
                    yielded += 1
                    if limit is not None and yielded >= limit:
                        return
                index += 1
            key = member_key
            parts = {}
        if members is not None:
            members.append((name, offset, size))
        if index < skip or (select is not None and not select(name)):
            if size_hint is not None and offset + padded > size_hint:
                raise TarReadError(f"tar member {name} cut short", offset, key)
            offset += _skip(stream, padded, seekable)
            continue
        if ext in parts:
            raise TarReadError(f"duplicate member {name}", offset, key)
        data = read(size)
        if len(data) < size or (padded != size and len(read(padded - size)) < padded - size):
            raise TarReadError(f"tar member {name} cut short", offset, key)
        offset += padded
        parts[ext] = data
    if key is not None and index >= skip:
        yield key, parts


def read_shard(path: PathLike, select: Optional[Callable[[str], bool]] = None,
               members: Optional[list] = None) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """:func:`read_samples` over a local file, whose damage becomes an :class:`InputError`.

    Raises:
        InputError: the file cannot be read, or is cut short or garbled (naming the offset and key).
    """
    path = Path(path)
    try:
        with open(path, "rb", buffering=1 << 20) as stream:
            yield from read_samples(stream, size_hint=os.fstat(stream.fileno()).st_size, select=select,
                                    members=members)
    except TarReadError as err:
        raise InputError(path, err.message, where=err.where) from None
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror or err}") from None


def iter_members(path: PathLike, with_data: Union[bool, Tuple[str, ...]] = False
                 ) -> Iterator[Tuple[str, int, int, Optional[bytes]]]:
    """The file members of a shard, in order, as ``(name, data_offset, size, data)``.

    ``data`` is read when ``with_data`` is True or the name ends with one of the given suffixes
    (``(".cls",)``), else None (the payload is seeked over).

    Raises:
        InputError: as :func:`read_shard`.
    """
    if with_data is True:
        select = None
    else:
        suffixes = tuple(with_data or ())
        select = lambda name: name.endswith(suffixes)  # noqa: E731
    layout: List[Tuple[str, int, int]] = []
    for _, parts in read_shard(path, select=select, members=layout):
        for name, offset, size in layout:
            yield name, offset, size, parts.get(split_member_name(name)[1])
        layout.clear()
