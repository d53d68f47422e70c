"""InsightFace verification ``.bin`` files: a pickled ``(list of image bytes, list of bool)``.

Pair ``k`` is images ``2k`` and ``2k + 1``; ``issame[k]`` says whether they show one person.
The files were written by Python 2 (``str`` images, protocol 2) or Python 3 (``bytes``). A pickle
can run arbitrary code when loaded, so :func:`load_bin` uses an unpickler that resolves no
global at all (the only exception: Python 3's protocol-2 spelling of ``bytes``,
``_codecs.encode(text, 'latin1')``, served by a stand-in that does only that), and then checks
the structure. Anything else is refused with an :class:`InputError` and nothing in it runs.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Iterable, List, NamedTuple, Sequence

from lresnet.core.errors import InputError, PathLike


class PairBin(NamedTuple):
    """Decoded ``.bin``: ``images[2k], images[2k+1]`` form pair ``k``; ``issame[k]`` its truth."""

    images: List[bytes]
    issame: List[bool]


def _latin1_encode(text: object, encoding: object = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode`` that only turns a str back into the bytes it came from."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is admitted only as encode(str, 'latin1')")
    return text.encode("latin1")


class _PairUnpickler(pickle.Unpickler):
    """Admits no class or function; only the opcodes for lists, tuples, bytes/str and bools."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle hook
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(
            f"refused global {module}.{name}: a .bin holds only lists of bytes and bools")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id: a .bin holds only lists of bytes and bools")


def load_bin(path: PathLike) -> PairBin:
    """Load a verification ``.bin`` safely (Python 2 or 3 pickles).

    Raises:
        InputError: the file is missing, is not a pickle, uses anything beyond
            lists/tuples of bytes and bools, or its counts disagree (2 images per pair).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    with open(path, "rb") as fh:
        data = fh.read()
    stream = io.BytesIO(data)
    try:
        obj = _PairUnpickler(stream, encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise InputError(path, f"not a verification .bin: {err}", f"byte {stream.tell()}") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error,
            OverflowError, MemoryError, RecursionError) as err:
        raise InputError(path, f"not a verification .bin (malformed pickle: "
                               f"{type(err).__name__}: {err})", f"byte {stream.tell()}") from None
    return _check_structure(path, obj)


def _check_structure(path: Path, obj: object) -> PairBin:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise InputError(path, f"expected a pickled (images, issame) pair, got {type(obj).__name__}")
    images, issame = obj
    if isinstance(issame, (list, tuple)) and not issame:
        raise InputError(path, "holds no pairs (an empty verification set)")
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise InputError(path, f"expected (list of bytes, list of bool), got "
                               f"({type(images).__name__}, {type(issame).__name__})")
    for i, img in enumerate(images):
        if not isinstance(img, (bytes, bytearray)):
            raise InputError(path, f"image {i} is {type(img).__name__}, expected bytes")
    flags = []
    for k, same in enumerate(issame):
        if isinstance(same, bool) or (isinstance(same, int) and same in (0, 1)):
            flags.append(bool(same))
        else:
            raise InputError(path, f"issame[{k}] is {type(same).__name__} {same!r}, expected a bool")
    if len(images) != 2 * len(flags):
        raise InputError(path, f"{len(images)} images for {len(flags)} pairs (expected 2 per pair)")
    return PairBin([bytes(img) for img in images], flags)


def _py2_pickle(images: Sequence[bytes], issame: Sequence[bool]) -> bytes:
    """What Python 2's ``cPickle.dump((images, issame), f, 2)`` writes for ``str`` images."""
    out = bytearray(b"\x80\x02")  # PROTO 2
    memo = 0

    def put() -> None:
        nonlocal memo
        out.extend(b"q" + bytes([memo]) if memo < 256 else b"r" + struct.pack("<I", memo))
        memo += 1

    def save_list(items: list, save_item) -> None:
        out.extend(b"]")  # EMPTY_LIST
        put()
        for start in range(0, len(items), 1000):  # pickle's batch size
            chunk = items[start:start + 1000]
            if len(chunk) == 1:
                save_item(chunk[0])
                out.extend(b"a")  # APPEND
            else:
                out.extend(b"(")  # MARK
                for item in chunk:
                    save_item(item)
                out.extend(b"e")  # APPENDS

    def save_str(value: bytes) -> None:
        if len(value) < 256:
            out.extend(b"U" + bytes([len(value)]))  # SHORT_BINSTRING
        else:
            out.extend(b"T" + struct.pack("<I", len(value)))  # BINSTRING
        out.extend(value)
        put()

    def save_bool(value: bool) -> None:
        out.extend(b"\x88" if value else b"\x89")  # NEWTRUE / NEWFALSE

    save_list(list(images), save_str)
    save_list(list(issame), save_bool)
    out.extend(b"\x86")  # TUPLE2
    put()
    out.extend(b".")  # STOP
    return bytes(out)


def write_bin(path: PathLike, images: Iterable[bytes], issame: Iterable[bool], protocol: int = 4) -> None:
    """Write a verification ``.bin``.

    ``protocol=2`` writes what Python 2 wrote for InsightFace's released sets (``str`` opcodes,
    no globals); 3 and above write a Python 3 pickle of ``bytes``.
    """
    images = [bytes(img) for img in images]
    issame = [bool(s) for s in issame]
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (expected 2 per pair)")
    if protocol == 2:
        data = _py2_pickle(images, issame)
    elif protocol >= 3:
        data = pickle.dumps((images, issame), protocol=protocol)
    else:
        raise ValueError(f"protocol must be 2 (Python 2 style) or >= 3, got {protocol}")
    Path(path).write_bytes(data)


__all__ = ["PairBin", "load_bin", "write_bin"]
