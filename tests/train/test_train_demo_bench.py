"""The demo and the train benchmark, at toy sizes (plumbing and the numbers' definitions)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lresnet.train.bench import bench_train, summarize_windows
from lresnet.eval import evaluate
from lresnet.train.demo import DemoSettings, raw_pixel_embeddings, run_demo


def test_raw_pixel_baseline_is_flip_invariant_and_normalised():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    emb = raw_pixel_embeddings(images)
    assert emb.shape == (4, 112 * 112 * 3)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.allclose(emb, raw_pixel_embeddings(images[:, :, ::-1, :].copy()), atol=1e-6)
    # scored by the same protocol as the networks: same pairs identical, others apart
    pairs = np.stack([images[0], images[0], images[1], images[2]] * 5)
    result = evaluate(raw_pixel_embeddings(pairs), [True, False] * 5, nrof_folds=5)
    assert result.accuracy == 1.0


def test_summarize_windows_weighs_by_time_not_by_rate():
    records = [{"step": 5, "images_per_s": 1.0, "images_per_s_step": 1.0},  # warm-up, ignored
               {"step": 10, "images_per_s": 10.0, "images_per_s_step": 20.0},
               {"step": 20, "images_per_s": 40.0, "images_per_s_step": 40.0}]
    out = summarize_windows(records, global_batch=2)
    # 10 images in 1 s (0.5 s stepping) + 20 images in 0.5 s -> 30 images in 1.5 s wall, 1.0 s stepping
    assert out["images_per_s"] == pytest.approx(20.0)
    assert out["images_per_s_step"] == pytest.approx(30.0)
    assert out["data_wait"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        summarize_windows(records[:1], 2)


@pytest.mark.slow
def test_demo_runs_end_to_end_at_toy_size(tmp_path):
    settings = DemoSettings(identities=8, images_per_id=4, pairs=20, sets=("lfw",), net="mobilefacenet",
                            net_options={"bottlenecks": [[2, 16, 1, 2], [2, 16, 1, 2], [2, 32, 1, 2]],
                                         "stem_channels": 8, "head_channels": 32},
                            embedding_size=32, batch_size=8, max_steps=30, threads=1)
    messages = []
    report = run_demo(tmp_path, settings, say=messages.append)
    row = report["sets"]["lfw"]
    assert set(row) == {"raw_pixels", "untrained", "trained", "error_ratio"}
    assert all(0.0 <= row[k] <= 1.0 for k in ("raw_pixels", "untrained", "trained"))
    assert report["steps"] == 30 and report["train_seconds"] > 0
    # it learns: the loss at the end is well below the first logged one (8 identities are too few to
    # show the held-out gain that the full demo reports; that claim is the demo's own output)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 3 and losses[-1] < 0.7 * losses[0], losses
    json.dumps(report)  # the --json output
    assert any("training" in m for m in messages)
    again = run_demo(tmp_path, settings, say=messages.append)  # a rerun in the same directory
    assert again["sets"]["lfw"]["raw_pixels"] == row["raw_pixels"]


@pytest.mark.slow
def test_bench_train_compares_shards_memory_and_synthetic(tiny_shards, tmp_path):
    rows = bench_train(tmp_path, shards=str(tiny_shards[0]), net="mobilefacenet",
                       net_options={"bottlenecks": [[2, 16, 1, 2], [2, 16, 1, 2], [2, 32, 1, 2]],
                                    "stem_channels": 8, "head_channels": 32},
                       batch_size=8, steps=6, workers=0, log_every=2, rounds=1)
    assert [r["source"] for r in rows] == ["shards (0 workers)", "real batches from memory",
                                           "SyntheticSource (random pixels)"]
    for row in rows:
        assert row["images_per_s"] > 0 and row["images_per_s_step"] >= row["images_per_s"]
        assert 0.0 <= row["data_wait"] <= 1.0
    assert rows[1]["ratio_to_memory"] == 1.0


def test_cli_reports_a_bad_option_in_one_line_with_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lresnet.tools", "train", "--shards", str(tmp_path),
                           "--head", "sphereface", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "lresnet: error: head.name: got 'sphereface', expected one of ['arcface', 'cosface', 'combined']"]


def test_cli_missing_shards_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lresnet.tools", "train", "--shards", str(tmp_path / "none"),
                           "--net", "mobilefacenet", "--out", str(tmp_path / "r"), "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("lresnet: error:")]
    assert len(lines) == 1 and "none" in lines[0]


def test_demo_never_deletes_what_it_did_not_make(tmp_path):
    from lresnet.core.errors import InputError
    from lresnet.train.demo import claim_work_dir

    user = tmp_path / "faces"
    user.mkdir()
    (user / "my-data.txt").write_text("precious")
    with pytest.raises(InputError) as err:
        run_demo(tmp_path, DemoSettings())
    assert err.value.path == str(user) and "not made by lresnet demo" in str(err.value)
    assert (user / "my-data.txt").read_text() == "precious"
    assert not (tmp_path / "shards").exists() and not (tmp_path / "run").exists()

    claim_work_dir(tmp_path / "demo")  # its own folders: replaced on every run
    (tmp_path / "demo" / "run" / "old.txt").write_text("from the last demo")
    claim_work_dir(tmp_path / "demo")
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["faces", "run", "shards"]
    assert not (tmp_path / "demo" / "run" / "old.txt").exists()

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        claim_work_dir(tmp_path / "a-file")


@pytest.mark.parametrize("changes, flag", [({"minutes": -1.0}, "--minutes"), ({"minutes": float("nan")}, "--minutes"),
                                           ({"identities": 1}, "--identities"), ({"seed": -3}, "--seed")])
def test_demo_settings_are_checked(changes, flag):
    from lresnet.core.errors import InputError

    with pytest.raises(InputError) as err:
        DemoSettings().replace(**changes)
    assert err.value.path == flag
