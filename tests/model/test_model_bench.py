"""bench model: settings at several batch sizes, the bf16 matmul rate and MFU, torch.compile as a setting."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lresnet.core.errors import InputError
from lresnet.model import describe_backbone
from lresnet.model.bench import (BASELINE, BenchSetting, bench_model, bench_settings, compile_unavailable,
                                 default_settings, measure_matmul, model_macs, parse_batch_sizes)

# one MobileFaceNet bottleneck, 8 to 16 channels: convs, BN and PReLU at ~1.3 MMAC
TINY = {"bottlenecks": [[1, 8, 1, 2]], "stem_channels": 8, "head_channels": 16, "embedding_size": 16}


def test_batch_sizes_are_repeated_or_comma_separated():
    assert parse_batch_sizes(["128,256", "512"]) == [128, 256, 512]
    assert parse_batch_sizes([" 8 "]) == [8]
    for bad in (["0"], ["8,x"], ["8,,16"], ["-4"], []):
        with pytest.raises(InputError, match="--batch-size"):
            parse_batch_sizes(bad)


def test_default_settings_add_the_compiled_setting_last():
    assert [s.label for s in default_settings("bf16", True, compile=True)] == [
        "fp32 NCHW", "bf16 channels_last", "bf16 channels_last + compile"]
    assert [s.label for s in default_settings("fp32", False, compile=True, compile_mode="max-autotune")] == [
        "fp32 NCHW", "fp32 NCHW + compile (max-autotune)"]
    assert default_settings() == [BASELINE, BenchSetting("fp32", True)]


def test_macs_are_counted_without_weights():
    assert model_macs("ir100e") == describe_backbone("ir100e").macs
    assert model_macs("mobilefacenet", TINY) == describe_backbone("mobilefacenet", **TINY).macs


def test_matmul_rate_is_measured_on_the_device():
    rate = measure_matmul("cpu", size=128, reps=2)
    assert (rate.size, rate.dtype, rate.reps) == (128, "bf16", 2) and rate.tflops > 0
    assert measure_matmul("cpu", size=64, reps=1, warmup=0).size == 64
    with pytest.raises(InputError, match="--matmul-size"):
        measure_matmul("cpu", size=64, reps=0)


def test_report_has_every_setting_at_every_batch_size_with_mfu():
    settings = [BASELINE, BenchSetting("bf16", channels_last=False)]
    report = bench_model("mobilefacenet", settings, [2, 3], steps=1, warmup=0, threads=1, options=TINY,
                         matmul_size=128).as_dict()
    json.dumps(report)
    assert report["batch_sizes"] == [2, 3] and report["options"] == TINY
    assert report["macs_per_image"] == model_macs("mobilefacenet", TINY)
    assert report["model_flops_per_image"] == 6 * report["macs_per_image"]
    rows = report["results"]
    assert [(r["batch_size"], r["setting"]) for r in rows] == [
        (2, "fp32 NCHW (baseline)"), (2, "bf16 NCHW"), (3, "fp32 NCHW (baseline)"), (3, "bf16 NCHW")]
    for r in rows:
        assert r["tflops"] == pytest.approx(6 * report["macs_per_image"] * r["images_per_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / report["matmul"]["tflops"])
        assert r["first_step_s"] > 0 and r["ms_per_step"] == pytest.approx(1000 * r["batch_size"] / r["images_per_s"])
    # each batch size's ratios are against its own baseline
    assert rows[0]["ratio"] == rows[2]["ratio"] == 1.0
    assert rows[3]["ratio"] == pytest.approx(rows[3]["images_per_s"] / rows[2]["images_per_s"])


def test_report_without_mfu():
    report = bench_model("mobilefacenet", [BASELINE], 2, steps=1, warmup=0, options=TINY, mfu=False).as_dict()
    assert report["matmul"] is None and report["results"][0]["mfu"] is None
    assert report["results"][0]["tflops"] > 0


def test_bad_settings_and_options_are_input_errors():
    with pytest.raises(InputError, match="--compile-mode: got 'fastest'"):
        bench_settings("mobilefacenet", [BenchSetting(compile=True, compile_mode="fastest")])
    with pytest.raises(InputError, match="mobilefacenet: bad backbone option"):
        model_macs("mobilefacenet", {"widths": [8]})


def test_cli_measures_several_batch_sizes_and_prints_mfu():
    from lresnet.tools.cli import app

    flags = ["bench", "model", "mobilefacenet", "--batch-size", "2,3", "--batch-size", "4", "--steps", "1",
             "--warmup", "0", "--threads", "1", "--no-channels-last", "--dtype", "bf16", "--matmul-size", "128",
             "--net-option", "bottlenecks=[[1,8,1,2]]", "--net-option", "stem_channels=8",
             "--net-option", "head_channels=16"]
    result = CliRunner().invoke(app, flags + ["--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["batch_sizes"] == [2, 3, 4] and len(report["results"]) == 6
    assert report["matmul"]["size"] == 128 and all(r["mfu"] > 0 for r in report["results"])
    table = CliRunner().invoke(app, flags)
    assert table.exit_code == 0, table.output
    assert "MFU" in table.output and "128x128 bf16 matmul" in table.output
    bad = CliRunner().invoke(app, ["bench", "model", "mobilefacenet", "--batch-size", "2,zero"])
    assert bad.exit_code != 0 and "--batch-size: got 'zero'" in str(bad.exception)


@pytest.mark.slow
def test_compiled_setting_is_measured_beside_eager():
    reason = compile_unavailable("cpu")
    if reason:
        pytest.skip(f"torch.compile does not run on this CPU: {reason}")
    results = bench_settings("mobilefacenet", default_settings("fp32", False, compile=True), batch_size=2,
                             steps=2, warmup=1, options=TINY)
    assert [r.setting for r in results] == ["fp32 NCHW (baseline)", "fp32 NCHW + compile"]
    assert all(r.images_per_s > 0 for r in results)
