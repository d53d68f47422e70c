"""Output folders and atomic file writes, done in one place with one kind of error."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Any, Iterator

from lresnet.core.errors import InputError, PathLike


def make_out_dir(path: PathLike) -> Path:
    """Create an output folder (and its parents) and return it.

    Raises:
        InputError: a file is in the way, or the folder cannot be made (no permission, a parent
            that is a file, a full disk), naming the folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "is a file, expected a folder (created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(path, f"cannot create the folder: {err.strerror or err}") from None
    return path


def temp_path_for(path: PathLike) -> Path:
    """The temporary name ``path`` is written under: hidden, per process, in the same folder
    (``.NAME.PID.tmp``, which writers of lresnet remove when the process that made it is gone)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "w", fsync: bool = False, **open_args: Any) -> Iterator[IO]:
    """Open a temporary file for writing `path`; on success it is renamed over `path`.

    On an exception or an interrupt the temporary file is removed and `path` is left as it was,
    so a reader never sees a half-written file under the final name.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, mode, **open_args) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_paths(*paths: PathLike) -> Iterator[list[Path]]:
    """Temporary paths to write `paths` under (by writers that want a path, not a file object).

    When the block succeeds they are renamed over `paths`, in order; on an exception or an
    interrupt they are removed and `paths` are left as they were.
    """
    final = [Path(p) for p in paths]
    tmps = [temp_path_for(p) for p in final]
    try:
        yield tmps
        for tmp, path in zip(tmps, final):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def errors_name(path: PathLike) -> Iterator[None]:
    """An OSError raised in the block without a file name (a write or close that failed: a full disk)
    gets `path` as its file name, so the one-line report says which file."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror or str(err), os.fspath(path)) from None
        raise
