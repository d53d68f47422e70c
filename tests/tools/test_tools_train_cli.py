"""`lresnet train`'s flags are generated from the config schema: every field has one flag, help and
default; the flags of the hand-written CLI they replaced still parse to the same config.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from lresnet.core.errors import InputError
from lresnet.core.schema import walk
from lresnet.tools.cli import app
from lresnet.tools.cmd_train import config_from_flags, train_app
from lresnet.tools.options import schema_parameters
from lresnet.train.config import TrainConfig, build_config, load_config_file, save_config, to_dict

FIXTURE = Path(__file__).parent / "fixtures" / "train_flags_before_schema.json"
PANELS = ("Model", "Head", "Data", "Optimiser", "Schedule", "Precision", "Distributed", "Checkpoints",
          "Verification", "Logging")


def parse(args: list[str]) -> TrainConfig:
    """The config a `lresnet train ARGS` command line resolves to (parsed by the generated command)."""
    command = typer.main.get_command(train_app())
    ctx = command.make_context("train", list(args))
    return config_from_flags(ctx.params)


def test_every_option_has_a_flag_help_panel_and_a_default_that_validates():
    options = list(walk(TrainConfig))
    assert len(options) > 60
    for opt in options:
        assert opt.flag.startswith("--") and opt.spec.help.strip(), opt.key
        assert opt.panel in PANELS, opt.key
    params = schema_parameters(TrainConfig)  # raises on a flag declared twice
    assert len(params) == len(options)
    TrainConfig()  # every default passes its own check


# One value per option, other than its default; the test below fails when an option is missing here.
SAMPLES = {
    "out": "runs/x", "seed": 7, "deterministic": True, "max_nonfinite": 3, "threads": 2,
    "model.net": "ir50", "model.embedding_size": 256, "model.dropout": 0.4, "model.channels_last": False,
    "model.options": {"widths": [8, 16, 32, 64]}, "model.compile": True, "model.compile_mode": "max-autotune",
    "head.name": "cosface", "head.s": 30.0, "head.m": 0.35, "head.m1": 0.9, "head.m2": 0.4, "head.m3": 0.1,
    "head.partial_fc": True, "head.sample_rate": 0.5,
    "data.shards": "some/shards", "data.manifest": "m.json", "data.batch_size": 32, "data.workers": 3,
    "data.shuffle_buffer": 500, "data.decoder": "pillow", "data.flip": False, "data.augment": ["crop", "gray"],
    "data.strict": True, "data.prefetch_factor": 4, "data.pin_memory": False, "data.synthetic_classes": 50,
    "data.loader": "dali", "data.pipe_timeout": 30.0,
    "optim.lr": 0.2, "optim.momentum": 0.8, "optim.nesterov": True, "optim.weight_decay": 1e-4,
    "optim.decay_norm_and_bias": True, "optim.decay_head": False, "optim.scale_lr": True, "optim.base_batch": 256,
    "optim.grad_clip": 5.0,
    "schedule.kind": "poly", "schedule.epochs": 30, "schedule.max_steps": 400, "schedule.start_epoch": 2,
    "schedule.warmup_epochs": 1.5, "schedule.milestones": [5.0, 9.0], "schedule.gamma": 0.5,
    "schedule.power": 1.5, "schedule.min_lr": 0.001,
    "amp.enabled": True, "amp.dtype": "fp16", "amp.loss_scale": 1024.0, "amp.dynamic_loss_scale": False,
    "dist.device": "cuda", "dist.device_id": 1, "dist.backend": "gloo", "dist.timeout": 60.0,
    "dist.bucket_mb": 50.0, "dist.bucket_view": False, "dist.static_graph": True,
    "checkpoint.every": 10, "checkpoint.keep_last": 2, "checkpoint.keep_best": False, "checkpoint.resume": False,
    "eval.val": "some/val", "eval.sets": ["lfw", "cfp_fp"], "eval.every": 100, "eval.at_epoch_end": False,
    "eval.batch_size": 16, "eval.flip": False,
    "log.every": 5, "log.tensorboard": False,
}


def _flags(opt, value) -> list[str]:
    if isinstance(value, bool):
        negative = opt.spec.negative or "--no-" + opt.flag[2:]
        return [opt.flag if value else negative]
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in (opt.flag, f"{k}={json.dumps(v)}")]
    if isinstance(value, list) and opt.spec.repeat:
        return [x for v in value for x in (opt.flag, str(v))]
    if isinstance(value, list):
        return [opt.flag, ",".join(str(v) for v in value)]
    return [opt.flag, str(value)]


def test_every_option_is_settable_by_its_flag_and_round_trips_through_config_files(tmp_path):
    options = {o.key: o for o in walk(TrainConfig)}
    assert set(SAMPLES) == set(options), "add a sample value for each new option"
    args = []
    for key, value in SAMPLES.items():
        assert value != options[key].default, key
        args += _flags(options[key], value)
    cfg = parse(args)
    plain = to_dict(cfg)
    for key, value in SAMPLES.items():
        node = plain
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    # JSON (config.json) and TOML give the same config back
    again = build_config(config_file=save_config(cfg, tmp_path))
    assert again == cfg
    toml = tmp_path / "run.toml"
    toml.write_text(_to_toml(plain))
    assert build_config(config_file=toml) == cfg
    assert load_config_file(toml) == json.loads(json.dumps(plain))


def _to_toml(data: dict, prefix: str = "") -> str:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) or k == "options"}
    lines = [f"[{prefix.rstrip('.')}]"] if prefix else []
    for key, value in scalars.items():
        if isinstance(value, dict):
            value = "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + "}"
            lines.append(f"{key} = {value}")
        elif value is not None:
            lines.append(f"{key} = {json.dumps(value)}")
    text = "\n".join(lines) + "\n"
    for key, value in data.items():
        if isinstance(value, dict) and key != "options":
            text += _to_toml(value, f"{prefix}{key}.")
    return text


# defaults changed on purpose since the fixture was written: (value then, value now)
CHANGED_DEFAULTS = {
    "amp.enabled": (False, None),  # None = on for cuda/npu, off on the CPU (what the old default did there)
}


@pytest.mark.parametrize("case", sorted(json.loads(FIXTURE.read_text())))
def test_the_flags_of_the_hand_written_cli_give_the_same_config(case, tmp_path):
    """config.json written by the CLI before the schema existed, for three command lines: the same
    values now, and options added since then hold their defaults."""
    before = json.loads(FIXTURE.read_text())[case]
    out = str(tmp_path / "run")
    now = to_dict(parse(before["args"] + ["--out", out]))
    expected = json.loads(json.dumps(before["config"]).replace("{out}", out))
    defaults = {o.key: o.default for o in walk(TrainConfig)}

    def compare(old: dict, new: dict, prefix: str = "") -> None:
        for key in new:
            if key not in old:  # an option added later: its default
                assert new[key] == to_plain_default(defaults[prefix + key]), prefix + key
            elif isinstance(new[key], dict) and key != "options":
                compare(old[key], new[key], f"{prefix}{key}.")
            elif prefix + key in CHANGED_DEFAULTS and old[key] == CHANGED_DEFAULTS[prefix + key][0]:
                assert new[key] == CHANGED_DEFAULTS[prefix + key][1], prefix + key
            else:
                assert new[key] == old[key], prefix + key
        assert set(old) <= set(new), f"options dropped: {set(old) - set(new)}"

    compare(expected, now)


def to_plain_default(value):
    return list(value) if isinstance(value, tuple) else value


def test_help_shows_the_panels():
    result = CliRunner().invoke(app, ["train", "--help"], terminal_width=120)
    assert result.exit_code == 0, result.output
    for panel in PANELS:
        assert f"─ {panel} " in result.output, panel
    assert "--max-iter" in result.output and "--net-mode" in result.output


@pytest.mark.parametrize("args, key, fragment", [
    (["--lr", "nan"], "optim.lr", "expected a finite number"),
    (["--margin-s", "-1"], "head.s", "expected > 0"),
    (["--m1", "-1", "--head", "combined"], "head.m1", "expected > 0"),
    (["--decoder", "opencv"], "data.decoder", "expected one of ['simplejpeg'"),
    (["--augment", "crop,spin"], "data.augment", "got 'spin'"),
    (["--milestones", "9,3"], "schedule.milestones", "increasing"),
    (["--net-option", "widths"], "--net-option", "expected NAME=VALUE"),
    (["--net-mode", "ir", "--net", "ir50"], "--net", "expected one"),
])
def test_bad_flags_name_the_option(args, key, fragment):
    with pytest.raises(InputError) as err:
        parse(["--shards", "x", *args])
    assert err.value.path == key and fragment in str(err.value)


def test_reference_aliases():
    cfg = parse(["--shards", "x", "--net-mode", "ir_se", "--net-depth", "100", "--max-iter", "9"])
    assert cfg.model.net == "irse100" and cfg.schedule.max_steps == 9
    assert math.isclose(parse(["--shards", "x", "--net-mode", "ir"]).optim.lr, 0.1)
    assert parse(["--shards", "x", "--net-mode", "ir"]).model.net == "ir100"
