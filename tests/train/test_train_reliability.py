"""Runs survive what clusters do to them: stop signals, killed workers, full disks, damaged checkpoints;
non-finite steps are skipped on the device on every rank alike; a step reads nothing on the host."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lresnet.core.errors import InputError
from lresnet.train.checkpoint import load_checkpoint
from lresnet.train.config import save_config
from lresnet.train.loop import Trainer, TrainingInterrupted, train

WORKER = Path(__file__).with_name("torchrun_worker.py")


def _same_weights(run_a: Path, run_b: Path, step: int) -> None:
    a = load_checkpoint(run_a / f"ckpt-{step:08d}.pt")
    b = load_checkpoint(run_b / f"ckpt-{step:08d}.pt")
    for part in ("backbone", "head"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def _signal_at(step: int, *signums: int):
    def progress(record: dict) -> None:
        if record["step"] == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
    return progress


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_and_the_rerun_is_bit_identical(tiny_config, tmp_path, signum):
    straight = train(tiny_config(out=str(tmp_path / "straight"), schedule={"max_steps": 12},
                                 data={"workers": 1}))
    cfg = tiny_config(out=str(tmp_path / "stopped"), schedule={"max_steps": 12}, data={"workers": 1})
    with pytest.raises(TrainingInterrupted) as err:
        train(cfg, progress=_signal_at(5, signum))
    assert err.value.step == 5 and err.value.checkpoint == tmp_path / "stopped" / "ckpt-00000005.pt"
    assert "run the same command again to resume" in str(err.value)
    resumed = train(cfg)
    assert (resumed.start_step, resumed.steps) == (5, 12)  # a resume, not a restart from step 0
    assert straight.steps == 12
    _same_weights(tmp_path / "straight", tmp_path / "stopped", 12)


def test_a_second_signal_stops_at_once(tiny_config, tmp_path):
    from lresnet.core.interrupt import Interrupted

    with pytest.raises(Interrupted) as err:
        train(tiny_config(schedule={"max_steps": 12}), progress=_signal_at(3, signal.SIGTERM, signal.SIGTERM))
    assert err.value.exit_code == 128 + signal.SIGTERM
    with pytest.raises(Interrupted, match="SIGINT"):
        train(tiny_config(schedule={"max_steps": 12}, checkpoint={"resume": False}, out=str(tmp_path / "second")),
              progress=_signal_at(3, signal.SIGINT, signal.SIGINT))


def test_the_cli_says_how_to_resume_and_exits_143(tiny_shards, tmp_path):
    import time

    from lresnet.train.checkpoint import CheckpointManager

    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "lresnet.tools", "train", "--shards", str(tiny_shards[0]), "--out", str(out),
           "--net", "mobilefacenet", "--embedding-size", "16", "--net-option", "stem_channels=8",
           "--net-option", "head_channels=16", "--net-option", "bottlenecks=[[1,8,1,2]]", "--batch-size", "8",
           "--workers", "0", "--log-every", "1", "--max-steps", "100000", "--no-progress", "--threads", "1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("lresnet: interrupted (SIGTERM at step ") and last.endswith("to resume)"), stderr
    latest = CheckpointManager(out).latest()
    assert latest is not None and str(latest) in last


def test_a_checkpoint_that_cannot_be_written_names_the_file_and_keeps_the_earlier_ones(tiny_config, tmp_path,
                                                                                        monkeypatch):
    import lresnet.train.checkpoint as checkpoint

    real_save, calls = checkpoint.torch.save, []

    def save(obj, fh):
        calls.append(1)
        if len(calls) == 2:
            fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, fh)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(InputError) as err:
        train(tiny_config(schedule={"max_steps": 8}, checkpoint={"every": 4}))
    run = tmp_path / "run"
    message = str(err.value)
    assert message.startswith(str(run / "ckpt-00000008.pt")) and "No space left on device" in message
    assert "MiB" in message and "earlier checkpoints are intact" in message
    assert load_checkpoint(run / "ckpt-00000004.pt")["step"] == 4
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tiny_config, tmp_path, caplog):
    cfg = tiny_config(schedule={"max_steps": 8}, checkpoint={"every": 4, "keep_last": 3})
    train(tiny_config(out=str(tmp_path / "straight"), schedule={"max_steps": 8}, checkpoint={"every": 4}))
    train(tiny_config(schedule={"max_steps": 6}, checkpoint={"every": 4}))  # checkpoints at 4 and 6
    newest = tmp_path / "run" / "ckpt-00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short
    with caplog.at_level("WARNING"):
        result = train(cfg)
    assert "does not load" in caplog.text
    assert (result.start_step, result.steps) == (4, 8)
    _same_weights(tmp_path / "straight", tmp_path / "run", 8)


def test_resuming_into_a_run_of_another_model_says_what_differs(tiny_config, tmp_path):
    train(tiny_config(schedule={"max_steps": 2}))
    other = tiny_config(schedule={"max_steps": 4}, model={"embedding_size": 16})
    with pytest.raises(InputError) as err:
        train(other)
    assert err.value.path == str(tmp_path / "run")
    assert "model.embedding_size: 32 -> 16" in str(err.value) and "another --out" in str(err.value)


def test_a_training_step_reads_nothing_on_the_host(tiny_config, monkeypatch):
    reads = {"in_step": False, "count": 0}
    real_step = Trainer.train_step

    def step(self, images, labels):
        reads["in_step"] = True
        try:
            real_step(self, images, labels)
        finally:
            reads["in_step"] = False

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if reads["in_step"]:
                reads["count"] += 1
            return real(self, *args, **kwargs)
        return wrapper

    import lresnet.model.heads as heads

    real_check = heads.check_labels

    def check_labels(labels, num_classes):  # reads on the CPU only; an async device assert elsewhere
        reads["in_step"] = False
        try:
            real_check(labels, num_classes)
        finally:
            reads["in_step"] = True

    monkeypatch.setattr(heads, "check_labels", check_labels)
    monkeypatch.setattr(Trainer, "train_step", step)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    result = train(tiny_config(schedule={"max_steps": 6}, log={"every": 3, "tensorboard": False}))
    assert result.steps == 6
    assert reads["count"] == 0


# ----------------------------------------------------------------------------- two ranks (torchrun, gloo)

def _torchrun(config, result_dir: Path, faults: dict, *extra: str, check: bool = True):
    result_dir.mkdir(parents=True, exist_ok=True)
    config_path = save_config(config, result_dir / "given")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *extra,
           str(WORKER), str(config_path), str(result_dir), json.dumps(faults)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, [json.loads((result_dir / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture
def two_rank_config(tiny_config, tmp_path):
    def make(name: str, **sections):
        base = {"out": str(tmp_path / name), "data": {"workers": 0}, "checkpoint": {"every": 2},
                "schedule": {"max_steps": 10}}
        for key, value in sections.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        return tiny_config(**base)
    return make


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_stop_together_and_resume_bit_identically(two_rank_config, tmp_path):
    _torchrun(two_rank_config("straight"), tmp_path / "r-straight", {})
    stopped = two_rank_config("stopped")
    proc, results = _torchrun(stopped, tmp_path / "r-stop", {"sigterm_at": 3}, check=False)
    assert proc.returncode != 0
    # only rank 0 got the signal; both ranks stopped at the same step, after one checkpoint
    assert [r["error"] for r in results] == ["TrainingInterrupted"] * 2
    assert all("SIGTERM at step 3" in r["message"] for r in results)
    ckpt = load_checkpoint(tmp_path / "stopped" / "ckpt-00000003.pt")
    assert ckpt["ranks"]["step"] == [3, 3]
    _, results = _torchrun(stopped, tmp_path / "r-resume", {})
    assert [(r["start_step"], r["steps"]) for r in results] == [(3, 10)] * 2
    _same_weights(tmp_path / "straight", tmp_path / "stopped", 10)


@pytest.mark.slow
@pytest.mark.distributed
def test_an_elastic_restart_after_a_killed_worker_ends_with_the_same_weights(two_rank_config, tmp_path):
    _torchrun(two_rank_config("straight"), tmp_path / "r-straight", {})
    _, results = _torchrun(two_rank_config("elastic"), tmp_path / "r-elastic", {"kill_at": 5},
                           "--max-restarts", "1")
    assert [(r["start_step"], r["steps"]) for r in results] == [(4, 10)] * 2  # restarted from ckpt 4
    _same_weights(tmp_path / "straight", tmp_path / "elastic", 10)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_both(two_rank_config, tmp_path):
    _, results = _torchrun(two_rank_config("nan"), tmp_path / "r-nan", {"nan_rank": 1, "nan_steps": [3, 4]})
    assert [r["skipped_steps"] for r in results] == [2, 2]
    ckpt = load_checkpoint(tmp_path / "nan" / "ckpt-00000010.pt")
    digests = ckpt["ranks"]["params_sha256"]
    assert digests[0] == digests[1]  # both skipped the same steps
    assert all(torch.isfinite(v).all() for v in ckpt["backbone"].values() if v.is_floating_point())
    proc, results = _torchrun(two_rank_config("nan-always", max_nonfinite=3), tmp_path / "r-abort",
                              {"nan_rank": 1, "nan_steps": "all"}, check=False)
    assert proc.returncode != 0
    assert [r["error"] for r in results] == ["TrainingAborted"] * 2
    assert all("not finite for 3 steps in a row" in r["message"] for r in results)
