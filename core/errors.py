"""The one exception type for bad input, shared by every layer.

It has no third-party imports, so any layer (even one imported in a light CLI
process or a DataLoader worker) can raise it without pulling in torch, numpy or a
JPEG library. The CLI turns it into one line, ``lresnet: error: FILE: PLACE: what``,
and exit code 2.
"""

from __future__ import annotations

import errno
import os
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class InputError(ValueError):
    """Bad input data, arguments or environment, reported as ``FILE[: PLACE]: WHAT``.

    A subclass of ValueError (it is a bad value), but never raised for a bug: code that
    means "this input is wrong" raises it, and the CLI reports only it as bad input.

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

    def __reduce__(self):  # picklable with its parts (DataLoader workers and spawn children send it)
        return (type(self), (self.path, self.message, self.where))


# OSErrors that say something about the machine, not about lresnet's code: the CLI reports them
# as bad input (one line naming the file, exit 2) instead of as a bug.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
                                errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOENT, errno.ENOTDIR,
                                errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST, errno.EXDEV})
