"""Stop signals as exceptions: SIGINT and SIGTERM become :class:`Interrupted` in the process that
installed the handlers, so ``finally`` blocks run (temporary files are removed, workers are told to
stop) and the CLI prints ``lresnet: interrupted`` and exits 130 (SIGINT) or 143 (SIGTERM).

Processes forked from it (DataLoader or conversion workers) inherit the handlers; there they keep
Python's default behaviour instead, so a worker never prints a traceback of its own for a stop
that its parent handles.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The user or the system asked this process to stop (not an error: no traceback is due)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def default_action(signum: int) -> None:
    """What the signal does without handlers: SIGINT raises KeyboardInterrupt, SIGTERM ends the process."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def owner_only(handler: Callable[[int, object], None]) -> Callable[[int, object], None]:
    """`handler` in the process that installs it; the default action in processes forked from it."""
    owner = os.getpid()

    def handle(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            default_action(signum)
            return
        handler(signum, frame)

    return handle


def _raise(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, owner_only(_raise)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
