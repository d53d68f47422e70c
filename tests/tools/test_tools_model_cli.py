"""CLI: lresnet model-info and lresnet bench model."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from typer.testing import CliRunner

from lresnet.model import create_backbone, describe_backbone
from lresnet.model.bench import bench_forward_backward
from lresnet.tools.cli import app
from lresnet.tools.cmd_model import DType

runner = CliRunner()




def test_model_info_ir100e_table():
    result = runner.invoke(app, ["model-info", "ir100e"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "IResNet-100" in out and "65,156,160" in out and "12.09 G" in out
    assert "paper" in out and "Linear(25088->512)" in out and "embedding size" in out


def test_model_info_json_sizes():
    result = runner.invoke(app, ["model-info", "ir50", "--json", "--embedding-size", "256"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["embedding_size"] == 256 and info["unit_style"] == "paper" and not info["se"]
    assert info["architecture"] == "IResNet-50"
    assert abs(info["macs"] / 1e9 - 6.3) < 0.05
    assert info["trainable_parameters"] == info["parameters"] - 256  # the E block's fixed gamma


def test_model_info_lists_every_backbone():
    result = runner.invoke(app, ["model-info", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert {"ir18", "ir100e", "irse100", "mobilefacenet"} <= set(rows)
    assert rows["irse100"]["unit_style"] == "treb1en" and rows["irse100"]["se"]
    assert rows["mobilefacenet"]["unit_style"] is None


def test_model_info_unit_style_override():
    assert describe_backbone("ir100", unit_style="treb1en").parameters == 65_129_792


def test_unknown_backbone_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "lresnet.tools", "model-info", "resnet9000"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lresnet: error: unknown backbone 'resnet9000'")
    assert "ir100e" in lines[0] and "mobilefacenet" in lines[0]


def test_bench_model_json_has_baseline_and_setting():
    result = runner.invoke(app, ["bench", "model", "mobilefacenet", "--batch-size", "2", "--steps", "1",
                                 "--warmup", "0", "--dtype", "bf16", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    settings = [r["setting"] for r in report["results"]]
    assert settings == ["fp32 NCHW (baseline)", "bf16 channels_last"]
    assert report["results"][0]["ratio"] == 1.0
    assert all(r["images_per_s"] > 0 for r in report["results"])


def test_bench_baseline_only_when_setting_is_the_baseline():
    results = bench_forward_backward("mobilefacenet", batch_size=2, dtype=DType.fp32, channels_last=False,
                                     steps=1, warmup=0)
    assert [r.setting for r in results] == ["fp32 NCHW (baseline)"]


def test_bench_rejects_bad_dtype():
    result = runner.invoke(app, ["bench", "model", "ir18", "--dtype", "fp8"])
    assert result.exit_code == 2 and "fp8" in result.output


def test_model_info_describes_a_weights_file(tmp_path):
    path = tmp_path / "irse18.pth"
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in create_backbone("irse18").state_dict().items()}
    torch.save({"model": {f"module.{k}": torch.zeros(s) for k, s in shapes.items()}}, path)
    result = runner.invoke(app, ["model-info", "--weights", str(path), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)
    assert (row["source"], row["backbone"], row["unit_style"], row["channel_order"]) == \
        ("lresnet", "irse18", "treb1en", "RGB")
    assert row["parameters"] == 24_104_576


def test_model_info_weights_errors(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1), "layer1.0.bn1.weight": torch.zeros(1)}, bad)
    result = runner.invoke(app, ["model-info", "--weights", str(bad)])
    assert result.exit_code != 0
    assert str(result.exception).startswith(f"{bad}: incomplete arcface_torch state dict: no 'fc.weight'")


def test_bench_settings_measures_every_setting_in_the_order_given():
    from lresnet.model.bench import BASELINE, BenchSetting, bench_settings

    results = bench_settings("mobilefacenet", [BASELINE, BenchSetting("fp32", True), BenchSetting("bf16")],
                             batch_size=2, steps=1, warmup=0)
    assert [r.setting for r in results] == ["fp32 NCHW (baseline)", "fp32 channels_last", "bf16 NCHW"]
    assert all(r.images_per_s > 0 and r.ms_per_step > 0 for r in results)


def test_bench_settings_refuses_an_unknown_dtype():
    import pytest

    from lresnet.core.errors import InputError
    from lresnet.model.bench import BenchSetting, bench_settings

    with pytest.raises(InputError, match="--dtype: got 'fp8', expected one of fp32, bf16"):
        bench_settings("mobilefacenet", [BenchSetting("fp8")])
