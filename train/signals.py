"""Stop requests: SIGTERM and SIGINT (what SLURM, Kubernetes and a terminal send) end a run cleanly.

The first signal only sets a flag; the loop reads it at its next log interval, where the ranks
agree (a stop asked by any rank stops all of them at the same step), write one checkpoint and
end. A second signal stops at once (:class:`~lresnet.core.interrupt.Interrupted`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from lresnet.core.interrupt import STOP_SIGNALS, Interrupted, owner_only

log = logging.getLogger(__name__)

class StopRequest:
    """A flag set by a stop signal (or by :meth:`request`), agreed on by every rank."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "stop"

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # the second signal: stop now
            raise Interrupted(signum)
        self.signum = signum
        log.warning("%s received: finishing the step, writing a checkpoint at the next log interval "
                    "(send it again to stop at once)", signal.Signals(signum).name)

    def agreed(self, ctx) -> bool:
        """Whether any rank was asked to stop (a collective with several ranks: call it on all of them)."""
        if not ctx.distributed:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.int32,
                            device=ctx.device if ctx.backend != "gloo" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if self.signum is None and int(flag.item()):
            self.signum = int(flag.item())
        return self.signum is not None

    @classmethod
    @contextlib.contextmanager
    def on_signals(cls) -> Iterator["StopRequest"]:
        """Install the handlers for the block (main thread only; elsewhere the request is never set)."""
        stop = cls()
        if threading.current_thread() is not threading.main_thread():
            yield stop
            return
        previous = {s: signal.signal(s, owner_only(stop._handle)) for s in STOP_SIGNALS}
        try:
            yield stop
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
