"""A small direct reader of POSIX (ustar/pax/GNU) tar members over a buffered binary stream.

The training hot path reads every member of every shard once per epoch; going through
`tarfile` or webdataset costs more per sample than decoding the JPEG does on a fast core
(shared/DESIGN.md), so this reads 512-byte headers straight from the stream. It groups
consecutive members into samples the way webdataset does: the key is the member name up
to the first dot of its basename, the extension is the rest (`000123.jpg` -> `000123`, `jpg`).
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO, Iterator, Optional

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
# name, size, checksum, type flag, magic, prefix: the fields of a ustar header the reader needs
_FIELDS = struct.Struct("100s24x12s12x8s1s100x5s83x155s12x")


class TarReadError(Exception):
    """The shard is cut short or garbled; `offset` is the byte offset and `key` the sample being read."""

    def __init__(self, message: str, offset: int, key: Optional[str]):
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.key = key

    @property
    def where(self) -> str:
        """Place in the shard, for error messages."""
        return f"offset {self.offset}" + (f", key {self.key}" if self.key else "")


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        value = int.from_bytes(field[1:], "big")
        return value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return records


def _header_name(name: bytes, magic: bytes, prefix: bytes) -> str:
    end = name.find(0)
    text = (name if end < 0 else name[:end]).decode("utf-8")
    if prefix[0] and magic == b"ustar":
        return prefix.split(b"\0", 1)[0].decode("utf-8") + "/" + text
    return text


def _checksum_field(field: bytes) -> int:
    """What the low half of adler32 over a header must be, given the header's checksum field.

    The checksum is the byte sum of the header with its 8-byte field counted as spaces; adler32's low
    half is 1 + the byte sum mod 65521, computed at C speed. The field's value repeats from header to
    header, so read_samples remembers this per field (a dict lookup instead of int() and sum() each time).
    A field that does not parse gives -1, which never matches.
    """
    try:
        stored = _octal(field)
    except ValueError:
        return -1
    return (1 + stored - 256 + sum(field)) % 65521


def _skip(stream: BinaryIO, nbytes: int, seekable: bool) -> int:
    """Move past `nbytes`; returns how many were actually available."""
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
                 size_hint: Optional[int] = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield `(key, {extension: payload})` for consecutive samples of a tar stream.

    Args:
        stream: a binary stream positioned at the start of the archive (a buffered file or a pipe).
        skip: samples to pass over first; their payloads are seeked over (read and dropped on pipes).
        limit: stop after yielding this many samples.
        size_hint: the file size, when known, to detect truncation without reading past the end.

    Raises:
        TarReadError: a header or payload is cut short, or a header checksum is wrong.
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
    parts: dict[str, bytes] = {}
    long_name: Optional[str] = None
    pax: dict[str, str] = {}
    known_sums: dict[bytes, int] = {}  # header checksum field -> what adler32's low half must be
    if limit is not None and limit <= 0:
        return
    while True:
        header = read(BLOCK)
        if len(header) < BLOCK:
            if header:
                raise TarReadError(f"tar header cut short ({len(header)} of {BLOCK} bytes)", offset, key)
            break  # end of file without the end-of-archive blocks: accepted, as GNU tar does
        if header[0] == 0 and header == _ZERO_BLOCK:
            break
        name, size_field, field, kind, magic, prefix = _FIELDS.unpack(header)
        expected = known_sums.get(field)
        if expected is None:
            expected = known_sums[field] = _checksum_field(field)
        if (zlib.adler32(header) & 0xFFFF) != expected:
            raise TarReadError("tar header checksum mismatch (not a tar file, or garbled)", offset, key)
        try:
            size = int(size_field[:11], 8) if size_field[11] in (0, 32) else _octal(size_field)
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
                pax = _pax_records(data[:size])
            elif kind == b"L":
                long_name = data[:size].split(b"\0", 1)[0].decode("utf-8")
            continue
        if pax or long_name is not None:  # extended headers override the name and size
            if "size" in pax:
                size = int(pax["size"])
                padded = (size + BLOCK - 1) & ~(BLOCK - 1)
            name = long_name if long_name is not None else pax.get("path") or _header_name(name, magic, prefix)
            long_name = None
            pax = {}
        else:
            name = _header_name(name, magic, prefix)
        if kind not in _REGULAR:
            got = _skip(stream, padded, seekable)
            offset += got
            continue
        if "/" in name:
            dot = name.find(".", name.rfind("/") + 1)
            member_key, ext = (name, "") if dot < 0 else (name[:dot], name[dot + 1:])
        else:
            member_key, _, ext = name.partition(".")
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
        if index < skip:
            if size_hint is not None and offset + padded > size_hint:
                raise TarReadError("tar member cut short", offset, key)
            offset += _skip(stream, padded, seekable)
            continue
        data = read(size)
        if len(data) < size or (padded != size and len(read(padded - size)) < padded - size):
            raise TarReadError(f"tar member {name} cut short", offset, key)
        offset += padded
        parts[ext] = data
    if key is not None and index >= skip:
        yield key, parts
