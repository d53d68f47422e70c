"""Config: building from nested values and files, CLI overriding the file, validation messages."""

from __future__ import annotations

import json

import pytest

from lresnet.core.errors import InputError
from lresnet.train.config import (TrainConfig, build_config, load_config_file, merge, net_name, replace, save_config,
                                  to_dict)


def test_defaults_follow_the_reference():
    cfg = build_config({"data": {"shards": "x"}})
    assert cfg.model.net == "ir100e"
    assert cfg.head.name == "arcface" and cfg.head.s == 64.0
    assert cfg.optim.lr == 0.1 and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 5e-4
    assert cfg.schedule.epochs == 20 and cfg.schedule.milestones == (12.0, 15.0, 18.0)
    assert cfg.schedule.gamma == 0.1


def test_config_is_frozen():
    cfg = build_config({"data": {"shards": "x"}})
    with pytest.raises(Exception):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_toml_file_then_cli_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('out = "r"\n[optim]\nlr = 0.2\nweight_decay = 0.001\n[data]\nshards = "a"\nbatch_size = 64\n'
                    '[schedule]\nmilestones = [2, 4]\n[model.options]\nwidths = [8, 16, 32, 64]\n')
    cfg = build_config({"optim": {"lr": 0.05, "momentum": None}}, config_file=path)
    assert cfg.optim.lr == 0.05  # the flag wins
    assert cfg.optim.weight_decay == 0.001  # the file fills the rest
    assert cfg.optim.momentum == 0.9  # a None flag means "not given"
    assert cfg.data.batch_size == 64 and cfg.schedule.milestones == (2.0, 4.0)
    assert cfg.model.options == {"widths": [8, 16, 32, 64]}


def test_yaml_file(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  shards: s\nhead:\n  name: cosface\n  m: 0.35\n")
    cfg = build_config(config_file=path)
    assert cfg.head.name == "cosface" and cfg.head.m == 0.35


@pytest.mark.parametrize("values, key, fragment", [
    ({"head": {"name": "sphereface"}}, "head.name", "expected one of ['arcface', 'cosface', 'combined']"),
    ({"schedule": {"kind": "step"}}, "schedule.kind", "got 'step'"),
    ({"amp": {"dtype": "fp8"}}, "amp.dtype", "expected one of ['bf16', 'fp16']"),
    ({"dist": {"device": "tpu"}}, "dist.device", "expected one of ['cpu', 'cuda', 'npu']"),
    ({"data": {"batch_size": 0}}, "data.batch_size", "got 0, expected > 0"),
    ({"optim": {"lr": -1}}, "optim.lr", "got -1.0"),
    ({"optim": {"lr": "fast"}}, "optim.lr", "expected a number"),
    ({"schedule": {"milestones": [15, 12]}}, "schedule.milestones", "increasing"),
    ({"optim": {"l_r": 0.1}}, "optim.l_r", "unknown option"),
    ({"model": {"net": "resnet9000"}}, "model.net", "expected one of"),
    ({"head": {"sample_rate": 0.5}}, "head.sample_rate", "partial_fc"),
])
def test_validation_says_what_was_given_and_what_is_allowed(values, key, fragment):
    with pytest.raises(InputError) as err:
        build_config(merge({"data": {"shards": "x"}}, values))
    assert err.value.path == key
    assert fragment in str(err.value)


def test_missing_shards_is_an_error():
    with pytest.raises(InputError, match="data.shards"):
        build_config({})


def test_bad_config_files(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config_file(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1\n")
    with pytest.raises(InputError, match="cannot parse config"):
        load_config_file(bad)
    other = tmp_path / "x.ini"
    other.write_text("")
    with pytest.raises(InputError, match="expected one of"):
        load_config_file(other)


def test_saved_config_round_trips(tmp_path):
    cfg = build_config({"data": {"shards": "x"}, "schedule": {"milestones": [1, 2]}, "out": str(tmp_path)})
    path = save_config(cfg, tmp_path)
    again = build_config(json.loads(path.read_text()))
    assert again == cfg
    assert to_dict(replace(cfg, optim={"lr": 0.3}))["optim"]["lr"] == 0.3


def test_net_name_from_reference_mode_and_depth():
    assert net_name("ir_se", 100) == "irse100"
    assert net_name("ir", 50) == "ir50"
    with pytest.raises(InputError, match="--net-mode"):
        net_name("vgg", 16)


def test_train_config_has_every_section():
    assert set(to_dict(TrainConfig())) >= {"model", "head", "data", "optim", "schedule", "amp", "dist",
                                           "checkpoint", "eval", "log"}
