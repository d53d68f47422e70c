"""The one exception type for bad input, shared by every stage.

It lives in ``convert`` because that is the lowest layer (no torch); every other
stage may import it. The CLI turns it into a one-line message and exit code 2.
"""

from __future__ import annotations

import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class InputError(Exception):
    """Bad input data or arguments, reported as ``FILE[: PLACE]: WHAT``.

    Args:
        path: the file (or directory, or option) that is wrong.
        message: what is wrong, ideally with what was expected.
        where: the place inside the file: a record number, byte offset, key...
    """

    def __init__(self, path: Optional[PathLike], message: str, where: Optional[str] = None):
        self.path = None if path is None else os.fspath(path)
        self.message = message
        self.where = where
        parts = [p for p in (self.path, where, message) if p]
        super().__init__(": ".join(parts))
