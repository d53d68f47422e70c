"""DataLoader workers that die: one line saying which, how, and that rerunning resumes.

A worker killed by the out-of-memory killer (SIGKILL) or by a full /dev/shm (SIGBUS) surfaces in
torch as a RuntimeError raised from its SIGCHLD handler wherever the main thread is, or from the
next batch, or as the broken connection to the dead process while a batch was being handed over.
Each becomes :func:`worker_death`'s InputError; a run goes on from its last checkpoint when the
same command is run again.
"""

from __future__ import annotations

import re
import signal
import threading
from typing import Any, Iterable, Iterator, Optional

from lresnet.core.errors import InputError

_WORKER_DEATH = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ?([\d, ]+)\) (?:is killed by signal: ([^.]+)"
                           r"|exited unexpectedly(?: with exit code (-?\d+))?)")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def worker_death(err: BaseException, workers: Iterable[Any] = ()) -> Optional[InputError]:
    """The one-line error for a DataLoader worker that died (the OOM killer, a SIGKILL), or None when
    `err` is something else.

    `workers` (the DataLoader's worker processes) say which one died and how; without a dead one,
    torch's own RuntimeError text is read. The run can go on from its last checkpoint: rerunning resumes.
    """
    dead = [(w.pid, w.exitcode) for w in workers if w.exitcode not in (None, 0)]
    if dead:
        pids = ", ".join(str(pid) for pid, _ in dead)
        code = dead[0][1]
        signal_name = _signal_name(-code) if code < 0 else None
    else:
        match = _WORKER_DEATH.search(str(err)) if isinstance(err, RuntimeError) else None
        if match is None:
            return None
        pids, described, status = match.groups()
        code = int(status) if status else None
        # torch writes strsignal's words ("Killed"): name the signal as a user looks it up
        names = {signal.strsignal(s): s.name for s in signal.Signals if signal.strsignal(s)}
        signal_name = names.get(described.strip(), described.strip()) if described else None
    if signal_name:
        what = f"was killed by {signal_name}"
        if signal_name == "SIGKILL":
            what += " (the out-of-memory killer sends it: fewer --workers or a smaller --batch-size use less memory)"
        elif signal_name == "SIGBUS":
            what += " (out of shared memory: a larger /dev/shm or a smaller --prefetch-factor)"
    elif code is not None:
        what = f"exited with status {code}"
    else:
        what = "exited unexpectedly"
    return InputError(None, f"a DataLoader worker (pid {pids.strip()}) {what}; rerun the same command to resume "
                      "from the last checkpoint")


def convert_worker_signals() -> None:
    """Make torch's SIGCHLD check raise worker_death's InputError rather than its RuntimeError.

    The DataLoader installs a SIGCHLD handler that raises RuntimeError wherever the main thread is
    (usually inside a training step, outside the loader) when a worker dies; this wraps it, once.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGCHLD)
    if not callable(previous) or getattr(previous, "lresnet_worker_death", False):
        return

    def handler(signum: int, frame: Any) -> None:
        try:
            previous(signum, frame)
        except RuntimeError as err:
            death = worker_death(err)
            if death is None:
                raise
            raise death from None

    handler.lresnet_worker_death = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGCHLD, handler)


def guard_workers(batches: Iterable) -> Iterator:
    """Iterate a DataLoader; a worker that died becomes :func:`worker_death`'s one-line InputError.

    A dead worker shows up as torch's RuntimeError, or, when the batch in flight was being handed over
    through shared memory, as the broken connection to the dead process (EOFError, ConnectionError).
    """
    it = iter(batches)
    convert_worker_signals()
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except (RuntimeError, EOFError, ConnectionError) as err:
            workers = list(getattr(it, "_workers", ()))  # torch's worker processes, to read their exit codes
            for worker in workers:
                worker.join(timeout=0.0 if worker.exitcode is not None else 0.2)
            death = worker_death(err, workers)
            if death is None:
                raise
            raise death from None
        yield item
