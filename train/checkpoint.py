"""Checkpoints: one file, a dict of plain tensors and numbers, written atomically.

A checkpoint holds everything a continued run needs to reproduce the
uninterrupted one: backbone, head (the full centre matrix, also for Partial FC),
optimizer, loss scaler, the resolved schedule, the step, every rank's loader
position and RNG states, and the resolved config. Files are ``ckpt-%08d.pt`` in
the run directory; the last K are kept, plus ``best.pt`` (highest verification
accuracy). Loading uses ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from lresnet.core.errors import InputError
from lresnet.core.files import atomic_file, temp_path_for

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^ckpt-(\d{8})\.pt$")
FORMAT = "lresnet-checkpoint/1"


# ----------------------------------------------------------------------------- RNG states as tensors

def rng_state(device: Optional[torch.device] = None) -> dict[str, Any]:
    """Python, numpy and torch (CPU + the accelerator's) RNG states as tensors and numbers."""
    version, py_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type != "cpu":
        state["device"] = getattr(torch, device.type).get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: Optional[torch.device] = None) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"])
    if device is not None and device.type != "cpu" and "device" in state:
        getattr(torch, device.type).set_rng_state(state["device"], device)


# ----------------------------------------------------------------------------- files

def save_atomic(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save`` to a temporary name in the same directory, fsync, then rename over `path`.

    Raises:
        InputError: the file cannot be written (a full disk, no permission...): names the file, the
            reason and, for a full disk, how much space it needed. Nothing at `path` changed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb", fsync=True) as fh:
            recording = _WriteErrors(fh)
            try:
                torch.save(obj, recording)
            except RuntimeError:  # torch's zip writer reports a failed write as a RuntimeError
                if recording.error is None:
                    raise
                raise recording.error from None
    except OSError as err:
        raise InputError(path, f"cannot write checkpoint: {err.strerror or err}{_space_note(err, path, obj)}; "
                               "the earlier checkpoints are intact") from None
    return path


class _WriteErrors:
    """A file wrapper that remembers the OSError a write raised."""

    def __init__(self, fh: Any):
        self.fh, self.error = fh, None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.fh.flush()


def _space_note(err: OSError, path: Path, obj: Any) -> str:
    """For a full disk: the bytes the checkpoint needs and what is free."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ""
    need = _tensor_bytes(obj)
    try:
        usage = shutil.disk_usage(path.parent)
    except OSError:
        return f" (it needs about {need / 2**20:,.0f} MiB)"
    return f" (it needs about {need / 2**20:,.0f} MiB, {usage.free / 2**20:,.0f} MiB are free there)"


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no pickled code runs); InputError if it is not one of ours."""
    from lresnet.model.weights import read_torch_file

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    ckpt = read_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(path, f"not an lresnet checkpoint (expected format {FORMAT!r})")
    if str(map_location) != "cpu":
        ckpt = _to_device(ckpt, torch.device(map_location))
    return ckpt


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def checkpoint_step(path: Union[str, Path]) -> Optional[int]:
    """The step in a ``ckpt-%08d.pt`` file name, or None."""
    match = CKPT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


class CheckpointManager:
    """Writes ``ckpt-%08d.pt`` files into `run_dir`, keeps the last `keep_last` and ``best.pt``.

    The best score seen so far is kept in ``best.json`` (step and metric), so it
    survives a resume.
    """

    def __init__(self, run_dir: Union[str, Path], keep_last: int = 3, keep_best: bool = True):
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.keep_best = keep_best

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint files, oldest first."""
        if not self.run_dir.is_dir():
            return []
        found = [(checkpoint_step(p), p) for p in self.run_dir.iterdir()]
        return [p for step, p in sorted((s, p) for s, p in found if s is not None)]

    def latest(self) -> Optional[Path]:
        """The newest checkpoint file, or None."""
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def load_latest(self, map_location: Union[str, torch.device] = "cpu") -> Optional[tuple[Path, dict[str, Any]]]:
        """The newest checkpoint that loads, as ``(path, checkpoint)``; None when there is none.

        A newest file that does not load (cut short by a crash during the rename's fsync, damaged on
        disk) is skipped with a warning, and the one before it is used.

        Raises:
            InputError: checkpoint files exist but none of them loads.
        """
        ckpts = self.checkpoints()
        errors = []
        for path in reversed(ckpts):
            try:
                return path, load_checkpoint(path, map_location)
            except InputError as err:
                errors.append(str(err))
                log.warning("skipping a checkpoint that does not load: %s", err)
        if errors:
            raise InputError(self.run_dir, f"none of its {len(ckpts)} checkpoints loads (newest: {errors[0]})")
        return None

    def best_metric(self) -> Optional[float]:
        path = self.run_dir / "best.json"
        if not path.is_file():
            return None
        return float(json.loads(path.read_text(encoding="utf-8"))["metric"])

    def save(self, state: dict[str, Any], step: int, metric: Optional[float] = None) -> Path:
        """Write the checkpoint for `step`; also ``best.pt`` when `metric` beats the best so far."""
        state = {"format": FORMAT, **state}
        path = save_atomic(state, self.run_dir / f"ckpt-{step:08d}.pt")
        if self.keep_best and metric is not None:
            best = self.best_metric()
            if best is None or metric > best:
                self._link_best(path)
                with atomic_file(self.run_dir / "best.json", "w", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": step, "metric": metric}) + "\n")
                log.info("new best verification accuracy %.4f at step %d", metric, step)
        self._prune()
        return path

    def _link_best(self, path: Path) -> None:
        tmp = temp_path_for(self.best_path)
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(path, tmp)  # a hard link: no copy, and pruning `path` later keeps best.pt intact
        except OSError:
            save_atomic(torch.load(path, map_location="cpu", weights_only=True), tmp)
        os.replace(tmp, self.best_path)

    def _prune(self) -> None:
        ckpts = self.checkpoints()
        for old in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            old.unlink()

    def truncate_after(self, step: int) -> None:
        """Remove checkpoints newer than `step` (left by a run that is being restarted from `step`)."""
        for path in self.checkpoints():
            s = checkpoint_step(path)
            if s is not None and s > step:
                path.unlink()
