"""The device check: its --quick CPU run end to end through tools/device_check.sh, and its parts
(time budgets, killed and refused units, the plan of commands, the closing table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lresnet.core.errors import InputError
from lresnet.train.device_check import (FORMAT, Unit, check_settings, plan_units, pytest_counts, run_device_check,
                                        run_unit, summary_rows)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_cpu_run_writes_the_report(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), WORK=str(work))
    proc = subprocess.run(["bash", str(ROOT / "tools" / "device_check.sh"), "--device", "cpu", "--quick"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "device_check.json").read_text())
    assert report["format"] == FORMAT and report["settings"]["quick"] and report["settings"]["device"] == "cpu"
    units = {u["name"]: u for u in report["units"]}
    assert [u["stage"] for u in report["units"]] == ["install", "train", "tests", "model", "train"]
    assert all(u["status"] == "ok" for u in report["units"]), [(u["name"], u["status"], u.get("error"))
                                                               for u in report["units"]]
    assert "lresnet already installed" in units["offline install"]["detail"]
    assert units["pytest -m cuda"]["result"].get("skipped", 0) >= 1  # no GPU here: every cuda test skips
    model = units["mobilefacenet batch 4"]["result"]
    assert [r["setting"] for r in model["results"]] == ["fp32 NCHW (baseline)", "bf16 channels_last"]
    assert model["matmul"]["tflops"] > 0 and all(0 < r["mfu"] for r in model["results"])
    train = units["mobilefacenet simplejpeg"]["result"]
    assert [r["source"] for r in train] == ["shards (1 workers)", "real batches from memory"]
    for row in train:
        assert row["images_per_s"] > 0 and 0 <= row["data_wait"] <= 1 and row["peak_memory_bytes"] > 0
    assert len(report["summary"]) == 3 + 2 + 2  # install, shards, tests; two settings; two sources
    # the table comes last, then the one-line summary; the log holds the whole output
    assert proc.stdout.rstrip().splitlines()[-1].startswith("device check: 5 ok in")
    assert "lresnet device check: cpu" in proc.stdout and "MFU" in proc.stdout
    assert "device check: install: ok" in (out / "device_check.log").read_text()


def test_a_unit_over_its_budget_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    start = time.perf_counter()
    record = run_unit(Unit("model", "sleeper", [sys.executable, "-c", code], 60), 3, tmp_path, dict(os.environ))
    assert time.perf_counter() - start < 30
    assert record["status"] == "timeout" and "killed" in record["error"]
    child = int(pid_file.read_text())
    for _ in range(50):  # killed with the group (a zombie until something reaps it counts as gone)
        if not _running(child):
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the unit's child process outlived the unit")


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_refused_failed_and_unreadable_units(tmp_path):
    env = dict(os.environ)
    refused = run_unit(Unit("model", "bad net", [sys.executable, "-m", "lresnet.tools", "bench", "model",
                                                 "resnet9000", "--json"], 60), 60, tmp_path, env)
    assert refused["status"] == "refused" and refused["returncode"] == 2
    assert refused["error"].startswith("lresnet: error: unknown backbone 'resnet9000'")
    failed = run_unit(Unit("train", "crash", [sys.executable, "-c", "raise SystemExit(3)"], 60), 60, tmp_path, env)
    assert failed["status"] == "failed" and failed["error"] == "exit code 3"
    garbled = run_unit(Unit("train", "text", [sys.executable, "-c", "print('not json')"], 60), 60, tmp_path, env)
    assert garbled["status"] == "failed" and garbled["error"].startswith("unreadable output")
    assert garbled["log_tail"] == ["not json"]


def test_pytest_counts_read_the_closing_line():
    text = "....F\n=== 1 failed, 4 passed, 10 skipped, 300 deselected, 2 errors in 3.2s ==="
    assert pytest_counts(text) == {"failed": 1, "passed": 4, "skipped": 10, "deselected": 300, "errors": 2}
    assert pytest_counts("10 skipped, 659 deselected in 8.61s") == {"skipped": 10, "deselected": 659}
    assert pytest_counts("") == {}


def test_defaults_per_device_and_quick():
    gpu = check_settings("cuda")
    assert (gpu.model_net, gpu.batch_sizes, gpu.compile, gpu.decoders) == ("ir100e", (128, 256), True,
                                                                         ("simplejpeg", "nvjpeg"))
    assert gpu.train_nets == ("ir100e", "mobilefacenet") and gpu.workers == 8 and gpu.deadline_s <= 450
    cpu = check_settings("cpu", quick=True)
    assert cpu.decoders == ("simplejpeg",) and not cpu.compile and cpu.threads == 1
    assert check_settings("cpu", quick=True, compile=True, workers=None).compile
    assert check_settings("npu").test_marker == "npu"
    for changes, flag in (({"stages": ("tests", "bench")}, "--stage"), ({"workers": -1}, "--workers"),
                          ({"batch_sizes": ()}, "--batch-size"), ({"device": "tpu"}, "--device")):
        with pytest.raises(InputError) as err:
            check_settings(**changes)
        assert err.value.path == flag


def test_plan_measures_what_the_issue_asks(tmp_path):
    units = plan_units(check_settings("cuda"), tmp_path, tmp_path / "shards", ROOT / "tests", python="py")
    names = [(u.stage, u.name) for u in units]
    assert names == [("tests", "pytest -m cuda"), ("model", "ir100e batch 128"), ("model", "ir100e batch 256"),
                     ("train", "ir100e simplejpeg"), ("train", "ir100e nvjpeg"),
                     ("train", "mobilefacenet simplejpeg"), ("train", "mobilefacenet nvjpeg")]
    model = units[1].command
    assert model[:5] == ["py", "-m", "lresnet.tools", "bench", "model"]
    assert {"--compile", "--channels-last", "--json"} <= set(model) and model[model.index("--dtype") + 1] == "bf16"
    cpu_decode, nvjpeg = units[3].command, units[4].command
    assert nvjpeg[nvjpeg.index("--decoder") + 1] == "nvjpeg" and "memory" not in nvjpeg
    assert cpu_decode.count("--source") == 2 and cpu_decode[cpu_decode.index("--workers") + 1] == "8"
    # no shards, no tests folder: those units are left out
    assert [u.stage for u in plan_units(check_settings("cuda"), tmp_path, None, None)] == ["model", "model"]


def test_the_check_goes_on_after_a_unit_fails_and_keeps_to_its_deadline(tmp_path):
    settings = check_settings("cpu", quick=True, stages=("model",), model_net="resnet9000", batch_sizes=(2, 3))
    updates = []
    report = run_device_check(settings, tmp_path, on_update=lambda r: updates.append(len(r["units"])))
    assert [(u["name"], u["status"]) for u in report["units"]] == [("resnet9000 batch 2", "refused"),
                                                                 ("resnet9000 batch 3", "refused")]
    assert updates[-1] == 2 and len(updates) >= 3  # published before, after each unit, and at the end
    assert [row["status"].split(":")[0] for row in report["summary"]] == ["refused", "refused"]
    late = run_device_check(check_settings("cpu", quick=True, stages=("model",), deadline_s=5), tmp_path)
    assert [u["status"] for u in late["units"]] == ["skipped"] and "out of time" in late["units"][0]["error"]


def test_summary_rows_of_each_kind():
    report = {"units": [
        {"stage": "install", "name": "offline install", "status": "ok", "seconds": 3.0, "detail": "present"},
        {"stage": "tests", "name": "pytest -m cuda", "status": "failed", "seconds": 9.0, "error": "pytest exit code 1",
         "result": {"failed": 1, "passed": 7}},
        {"stage": "model", "name": "ir100e batch 128", "status": "ok", "result": {"name": "ir100e", "results": [
            {"batch_size": 128, "setting": "bf16 channels_last + compile", "images_per_s": 2500.0, "mfu": 0.3,
             "ratio": 2.5, "first_step_s": 61.0}]}},
        {"stage": "train", "name": "ir100e nvjpeg", "status": "ok", "result": [
            {"net": "ir100e", "batch_size": 128, "source": "shards (nvjpeg, 8 workers)", "images_per_s": 2400.0,
             "images_per_s_step": 2420.0, "data_wait": 0.01, "peak_memory_bytes": 3 * 2**30}]},
        {"stage": "train", "name": "mobilefacenet nvjpeg", "status": "timeout", "seconds": 60.0,
         "error": "still running after 60 s: killed"}]}
    rows = summary_rows(report)
    assert [r["status"] for r in rows] == [
        "ok (3.0 s)", "failed: 1 failed, 7 passed: pytest exit code 1 (9.0 s)", "2.50x baseline, first step 61 s",
        "step only 2420 img/s", "timeout: still running after 60 s: killed (60.0 s)"]
    assert rows[2]["what"] == "ir100e batch 128 bf16 channels_last + compile" and rows[2]["mfu"] == 0.3
    assert rows[3]["peak_gib"] == 3.0 and rows[3]["data_wait"] == 0.01
