"""Output folders, made in one place with one kind of error."""

from __future__ import annotations

from pathlib import Path

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
