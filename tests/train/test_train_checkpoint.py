"""Checkpoint files: atomic writes, weights_only loading, last-K + best, RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lresnet.core.errors import InputError
from lresnet.train.checkpoint import (CheckpointManager, load_checkpoint, rng_state, save_atomic,
                                      set_rng_state)


def _state(value: float) -> dict:
    return {"backbone": {"w": torch.full((3,), value)}, "step": int(value), "config": {"a": [1, 2]}}


def test_keep_last_k_and_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(_state(1), 1, metric=0.7)
    mgr.save(_state(2), 2, metric=0.9)
    mgr.save(_state(3), 3, metric=0.8)
    mgr.save(_state(4), 4)
    assert [p.name for p in mgr.checkpoints()] == ["ckpt-00000003.pt", "ckpt-00000004.pt"]
    assert mgr.latest().name == "ckpt-00000004.pt"
    best = load_checkpoint(mgr.best_path)
    assert best["step"] == 2 and mgr.best_metric() == 0.9  # pruning step 2 kept best.pt intact
    assert torch.equal(best["backbone"]["w"], torch.full((3,), 2.0))


def test_truncate_after_drops_newer_files(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for s in (1, 2, 3):
        mgr.save(_state(s), s)
    mgr.truncate_after(1)
    assert [p.name for p in mgr.checkpoints()] == ["ckpt-00000001.pt"]


def test_atomic_write_leaves_no_temporary(tmp_path):
    save_atomic(_state(1), tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_a_half_written_temp_is_not_a_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(_state(1), 1)
    (tmp_path / ".ckpt-00000002.pt.tmp-123").write_bytes(b"partial")
    assert mgr.latest().name == "ckpt-00000001.pt"


def test_load_refuses_foreign_and_code_carrying_files(tmp_path):
    foreign = tmp_path / "f.pt"
    torch.save({"x": 1}, foreign)
    with pytest.raises(InputError, match="not an lresnet checkpoint"):
        load_checkpoint(foreign)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "lresnet-checkpoint/1", "obj": _Evil()}, evil)
    with pytest.raises(InputError, match="cannot read checkpoint") as err:
        load_checkpoint(evil)
    message = str(err.value)
    assert "Unsupported global: GLOBAL print" in message  # the reason: a global the safe loader refuses
    # torch's advice to load it anyway (weights_only=False would run the file's code) is left out
    assert "can still be loaded" not in message and "Re-running" not in message
    with pytest.raises(InputError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), np.random.randn(), torch.rand(1)
    save_atomic({"format": "lresnet-checkpoint/1", "rng": rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])
