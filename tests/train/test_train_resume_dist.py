"""Through the CLI in subprocesses: kill -9 then resume reproduces the uninterrupted run; 2-rank torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lresnet.train.checkpoint import load_checkpoint

TINY = ["--net", "mobilefacenet", "--embedding-size", "32",
        "--net-option", "bottlenecks=[[2,16,1,2],[2,16,1,2],[2,32,1,2]]",
        "--net-option", "stem_channels=8", "--net-option", "head_channels=32",
        "--margin-s", "16", "--margin-m", "0.2", "--batch-size", "16", "--shuffle-buffer", "64",
        "--log-every", "1", "--no-tensorboard", "--threads", "1", "--no-progress", "--seed", "3"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _cmd(shards, out, *extra) -> list[str]:
    return [sys.executable, "-m", "lresnet.tools", "train", "--shards", str(shards), "--out", str(out), *TINY,
            *extra]


def _losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_the_uninterrupted_run(tiny_shards, tmp_path):
    shards = tiny_shards[0]
    # 8 steps per epoch; 20 steps cross two epoch boundaries; DataLoader workers on
    args = ("--max-steps", "20", "--ckpt-every", "6", "--workers", "2", "--lr", "0.2", "--warmup-epochs", "1",
            "--schedule", "cosine", "--dropout", "0.2")
    subprocess.run(_cmd(shards, tmp_path / "straight", *args), check=True, env=_env(), capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(shards, killed, *args), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "ckpt-00000006.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
            time.sleep(0.01)
        time.sleep(0.3)  # into the middle of the next steps
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "ckpt-00000020.pt").exists()

    rerun = subprocess.run(_cmd(shards, killed, *args, "--json"), check=True, env=_env(), capture_output=True,
                           text=True)
    summary = json.loads(rerun.stdout)
    # a resume from the last complete checkpoint, not a restart (runs are deterministic: equal
    # losses alone could not tell the two apart)
    assert (summary["start_step"], summary["steps"]) == (6, 20)

    straight, resumed = _losses(tmp_path / "straight"), _losses(killed)
    assert sorted(resumed) == list(range(1, 21))
    assert resumed == straight  # bit-identical losses at every step
    a = load_checkpoint(tmp_path / "straight" / "ckpt-00000020.pt")
    b = load_checkpoint(killed / "ckpt-00000020.pt")
    _assert_same_tensors(a["backbone"], b["backbone"])
    _assert_same_tensors(a["head"], b["head"])


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_on_gloo(tiny_shards, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lresnet.tools", "train", "--shards", str(tiny_shards[0]), "--out", str(out), *TINY,
           "--max-steps", "10", "--ckpt-every", "5", "--workers", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "ckpt-00000010.pt")
    assert ckpt["ranks"]["step"] == [10, 10]
    digests = ckpt["ranks"]["params_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # backbone and replicated head identical
    positions = [(s["epoch"], s["position"]) for s in ckpt["loader"]]
    assert positions[0] == positions[1]  # both ranks consumed the same number of batches
    assert sorted(_losses(out)) == list(range(1, 11))
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["batch_size"] == 16


@pytest.mark.slow
@pytest.mark.distributed
def test_partial_fc_run_on_two_ranks_resumes_on_one(tiny_shards, tmp_path):
    out = tmp_path / "pfc"
    common = ["--partial-fc", "--ckpt-every", "3", "--workers", "0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lresnet.tools", "train", "--shards", str(tiny_shards[0]), "--out", str(out), *TINY,
           "--max-steps", "3", *common]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = load_checkpoint(out / "ckpt-00000003.pt")
    assert two["head"]["weight"].shape == (16, 32)  # the full centre matrix, gathered from both shards
    proc = subprocess.run(_cmd(tiny_shards[0], out, "--max-steps", "5", *common), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_checkpoint(out / "ckpt-00000005.pt")
    assert one["ranks"]["step"] == [5] and one["head"]["weight"].shape == (16, 32)
    assert not torch.equal(one["head"]["weight"], two["head"]["weight"])  # it kept training the centres
