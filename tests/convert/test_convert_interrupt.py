"""Interrupting convert-rec: Ctrl-C to the whole process group (as a terminal sends it) while two
workers write shards ends within seconds with one line, leaves no temporary file, and a rerun
finishes the same conversion; a full disk is one line naming the shard."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lresnet.convert.synthetic import synthesize


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupt") / "faces"
    synthesize(root, identities=100, images_per_id=40, pairs=0, sets=(), seed=0)
    return root


def _convert(src: Path, out: Path, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lresnet.tools", "convert-rec", str(src), str(out), "--shard-size", "25",
           "--workers", "2", "--json"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_ends_promptly_and_a_rerun_finishes(faces, tmp_path):
    straight = tmp_path / "straight"
    assert _convert(faces, straight).wait(timeout=300) == 0
    expected = json.loads((straight / "train" / "manifest.json").read_text())
    for attempt in range(4):
        out = tmp_path / f"out{attempt}"
        proc = _convert(faces, out, start_new_session=True)  # its own process group, like a terminal job
        deadline = time.monotonic() + 120
        while not list((out / "train").glob("train-*.tar")) if (out / "train").is_dir() else True:
            assert proc.poll() is None and time.monotonic() < deadline, "conversion ended before a shard"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)  # no hang: the old code could wait forever here
        if proc.returncode == 0:  # finished before the signal arrived
            continue
        assert proc.returncode == 130, stderr
        assert stderr.strip().splitlines()[-1] == "lresnet: interrupted (SIGINT)", stderr
        assert not [p.name for p in (out / "train").iterdir() if p.name.endswith(".tmp")]
        assert _convert(faces, out).wait(timeout=300) == 0  # the rerun resumes
        assert json.loads((out / "train" / "manifest.json").read_text())["shards"] == expected["shards"]


def test_a_full_disk_is_one_line_naming_the_shard(faces, tmp_path):
    def small_files():  # every file this process writes is capped at 64 KiB: writes past it fail
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "full"
    proc = _convert(faces, out, preexec_fn=small_files)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"lresnet: error: {out / 'train'}/train-") and "File too large" in lines[0]
    assert not [p.name for p in (out / "train").iterdir() if p.name.endswith(".tmp")]
