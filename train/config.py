"""Training configuration: frozen dataclasses, built once, validated in one place.

A run is described by one :class:`TrainConfig` made of small sections (model, head,
data, optim, schedule, amp, dist, checkpoint, eval, log). It is built from a plain
nested mapping — a ``--config`` TOML/YAML file, with CLI flags laid over it — by
:func:`build_config`, which coerces types, rejects unknown keys and runs
:func:`validate`. Nothing writes back into a config: derived values (steps per
epoch, the scaled learning rate, the device) are computed where they are used.
The resolved config is saved beside each run as ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from lresnet.core.errors import InputError

HEADS = ("arcface", "cosface", "combined")
SCHEDULES = ("multistep", "poly", "cosine", "constant")
AMP_DTYPES = ("bf16", "fp16")
DEVICES = ("cpu", "cuda", "npu")
BACKENDS = ("auto", "gloo", "nccl", "hccl")
DECODERS = ("simplejpeg", "turbojpeg", "pillow")
AUGMENTATIONS = ("crop", "color", "blur", "gray")
NET_MODES = {"ir": "ir", "ir_se": "irse", "irse": "irse"}


@dataclass(frozen=True)
class ModelConfig:
    """Backbone: a registry name (``lresnet model-info`` lists them)."""

    net: str = "ir100e"
    embedding_size: int = 512
    dropout: float = 0.0
    channels_last: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # extra backbone kwargs, e.g. widths = [16, 32, 64, 128]


@dataclass(frozen=True)
class HeadConfig:
    """Margin head. ``partial_fc`` shards the class centres across ranks."""

    name: str = "arcface"
    s: float = 64.0
    m: Optional[float] = None  # arcface: 0.5, cosface: 0.4
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    partial_fc: bool = False
    sample_rate: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    """Training data: a shard directory, manifest, brace pattern, or ``synthetic``."""

    shards: str = ""
    manifest: str = ""  # sample counts for remote (pipe:) shards; local shards find theirs
    batch_size: int = 128  # per device
    workers: int = 2
    shuffle_buffer: int = 2000
    decoder: str = "simplejpeg"
    flip: bool = True
    augment: tuple[str, ...] = ()  # extra augmentations: crop, color, blur, gray (off by default)
    strict: bool = False
    synthetic_classes: int = 1000  # only for shards = "synthetic"


@dataclass(frozen=True)
class OptimConfig:
    """SGD. Weight decay on conv/linear weights and head centres; none on BN/PReLU/bias."""

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False
    decay_head: bool = True
    scale_lr: bool = False  # lr * global_batch / base_batch
    base_batch: int = 512
    grad_clip: float = 0.0  # max global grad norm; 0 = off


@dataclass(frozen=True)
class ScheduleConfig:
    """LR as a function of the step; milestones and warmup are given in epochs."""

    kind: str = "multistep"
    epochs: int = 20
    max_steps: int = 0  # 0: epochs * steps per epoch
    start_epoch: int = 0
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (12.0, 15.0, 18.0)
    gamma: float = 0.1
    power: float = 2.0
    min_lr: float = 0.0


@dataclass(frozen=True)
class AmpConfig:
    """One AMP path: bf16 autocast, or fp16 autocast + GradScaler."""

    enabled: bool = False
    dtype: str = "bf16"
    loss_scale: float = 65536.0  # fp16: initial scale
    dynamic_loss_scale: bool = True  # False: the scale never grows (it still backs off on overflow)


@dataclass(frozen=True)
class DistConfig:
    """Device and process group. Rank/world come from torchrun's environment."""

    device: str = "cpu"
    device_id: int = -1  # -1: LOCAL_RANK under torchrun, else 0
    backend: str = "auto"


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints in RUN_DIR: every N steps and at the end; last K kept plus the best."""

    every: int = 1000
    keep_last: int = 3
    keep_best: bool = True
    resume: bool = True  # continue from the newest checkpoint in RUN_DIR


@dataclass(frozen=True)
class EvalConfig:
    """In-run verification on rank 0 (through lresnet.eval)."""

    val: Optional[str] = None  # directory with <set>.tar / <set>.bin
    sets: tuple[str, ...] = ()  # empty: every set found in `val`
    every: int = 2000  # steps; 0: only at epoch ends
    at_epoch_end: bool = True
    batch_size: int = 128
    flip: bool = True


@dataclass(frozen=True)
class LogConfig:
    """Metrics: JSONL always, TensorBoard when installed."""

    every: int = 50
    tensorboard: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs."""

    out: str = "runs/lresnet"
    seed: int = 0
    deterministic: bool = False
    max_nonfinite: int = 10  # consecutive non-finite steps before aborting
    threads: int = 0  # torch CPU threads per process; 0 = torch's default
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    amp: AmpConfig = field(default_factory=AmpConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)
                             if f.default_factory is not dataclasses.MISSING}


def net_name(mode: str, depth: int) -> str:
    """The registry name for the reference's ``--net_mode``/``--net_depth`` pair (``ir_se``, 100 → ``irse100``)."""
    if mode not in NET_MODES:
        raise InputError("--net-mode", f"got {mode!r}, expected one of {sorted(NET_MODES)}")
    return f"{NET_MODES[mode]}{depth}"


# ----------------------------------------------------------------------------- building

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a TOML/YAML/JSON value to the field type `tp`, or raise InputError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise InputError(key, f"got {value!r}, expected a table of name = value")
        return {str(k): v for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise InputError(key, f"got {value!r}, expected a list")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, key) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise InputError(key, f"got {value!r}, expected true or false")
    if tp in (int, float):
        kind, accepted = ("an integer", (int, str)) if tp is int else ("a number", (int, float, str))
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise InputError(key, f"got {value!r}, expected {kind}")
        try:
            return tp(value)
        except ValueError:
            raise InputError(key, f"got {value!r}, expected {kind}") from None
    if tp is str:
        if not isinstance(value, (str, os.PathLike)):
            raise InputError(key, f"got {value!r}, expected a string")
        return os.fspath(value)
    raise InputError(key, f"unsupported field type {tp!r}")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"{prefix}{unknown[0]}", f"unknown option, expected one of {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name in SECTIONS and cls is TrainConfig:
            if not isinstance(value, Mapping):
                raise InputError(key, f"got {value!r}, expected a table of options")
            kwargs[name] = _build(SECTIONS[name], value, f"{key}.")
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two nested mappings; `override` wins, ``None`` values in it are ignored."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and key in SECTIONS:
            base_section = out.get(key)
            out[key] = merge(base_section if isinstance(base_section, Mapping) else {}, value)
        else:
            out[key] = value
    return out


def load_config_file(path: Union[str, Path]) -> dict[str, Any]:
    """Read a ``.toml`` (tomllib) or ``.yaml``/``.yml`` (needs pyyaml) config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise InputError(path, "YAML configs need pyyaml (pip install pyyaml), or use TOML") from None
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        elif suffix == ".json":
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        else:
            raise InputError(path, f"got suffix {suffix!r}, expected one of ['.json', '.toml', '.yaml', '.yml']")
    except InputError:
        raise
    except Exception as err:  # tomllib/yaml/json syntax errors carry a line number in the message
        raise InputError(path, f"cannot parse config: {err}") from None
    if not isinstance(data, Mapping):
        raise InputError(path, "expected a table of options at the top level")
    return dict(data)


def build_config(values: Mapping[str, Any] | None = None, config_file: Union[str, Path, None] = None) -> TrainConfig:
    """Build and validate a :class:`TrainConfig`.

    Args:
        values: nested overrides (e.g. from CLI flags: ``{"optim": {"lr": 0.1}}``); ``None`` entries are skipped.
        config_file: optional TOML/YAML/JSON file; `values` override it.
    Raises:
        InputError: an unknown option, a wrong type or a value out of range.
    """
    data: dict[str, Any] = load_config_file(config_file) if config_file else {}
    data = merge(data, values or {})
    cfg = _build(TrainConfig, data, "")
    validate(cfg)
    return cfg


def replace(cfg: TrainConfig, **sections: Mapping[str, Any]) -> TrainConfig:
    """A copy of `cfg` with some section fields changed, validated again: ``replace(cfg, optim={"lr": 0.01})``."""
    return build_config(merge(to_dict(cfg), sections))


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg: TrainConfig, run_dir: Union[str, Path]) -> Path:
    """Write the resolved config to ``RUN_DIR/config.json`` (atomically) and return the path."""
    path = Path(run_dir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".config.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- validation

def _choice(key: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise InputError(key, f"got {value!r}, expected one of {allowed}")


def _check(key: str, ok: bool, value: Any, expected: str) -> None:
    if not ok:
        raise InputError(key, f"got {value!r}, expected {expected}")


def _known_backbones() -> list[str] | None:
    try:
        from lresnet.model import list_backbones
    except ImportError:
        return None
    return list(list_backbones())


def validate(cfg: TrainConfig) -> None:
    """Check every choice and range of `cfg`; raise InputError ("got X, expected Y") on the first bad one."""
    nets = _known_backbones()
    if nets is not None:
        _choice("model.net", cfg.model.net, nets)
    _check("model.embedding_size", cfg.model.embedding_size > 0, cfg.model.embedding_size, "> 0")
    _check("model.dropout", 0.0 <= cfg.model.dropout < 1.0, cfg.model.dropout, "in [0, 1)")

    _choice("head.name", cfg.head.name, HEADS)
    _check("head.s", cfg.head.s > 0, cfg.head.s, "> 0")
    _check("head.m", cfg.head.m is None or 0 <= cfg.head.m < math.pi, cfg.head.m, "in [0, pi)")
    _check("head.sample_rate", 0.0 < cfg.head.sample_rate <= 1.0, cfg.head.sample_rate, "in (0, 1]")
    if cfg.head.sample_rate < 1.0 and not cfg.head.partial_fc:
        raise InputError("head.sample_rate", f"got {cfg.head.sample_rate}, expected 1.0 unless head.partial_fc is on")

    _check("data.shards", bool(cfg.data.shards), cfg.data.shards, "a shard directory, manifest, pattern or 'synthetic'")
    _check("data.batch_size", cfg.data.batch_size > 0, cfg.data.batch_size, "> 0")
    _check("data.workers", cfg.data.workers >= 0, cfg.data.workers, ">= 0")
    _check("data.shuffle_buffer", cfg.data.shuffle_buffer >= 0, cfg.data.shuffle_buffer, ">= 0")
    _choice("data.decoder", cfg.data.decoder, DECODERS)
    for name in cfg.data.augment:
        _choice("data.augment", name, AUGMENTATIONS)
    _check("data.synthetic_classes", cfg.data.synthetic_classes > 1, cfg.data.synthetic_classes, "> 1")

    o = cfg.optim
    _check("optim.lr", o.lr > 0 and math.isfinite(o.lr), o.lr, "a positive number")
    _check("optim.momentum", 0.0 <= o.momentum < 1.0, o.momentum, "in [0, 1)")
    _check("optim.weight_decay", o.weight_decay >= 0, o.weight_decay, ">= 0")
    _check("optim.base_batch", o.base_batch > 0, o.base_batch, "> 0")
    _check("optim.grad_clip", o.grad_clip >= 0, o.grad_clip, ">= 0 (0 = off)")

    s = cfg.schedule
    _choice("schedule.kind", s.kind, SCHEDULES)
    _check("schedule.epochs", s.epochs > 0, s.epochs, "> 0")
    _check("schedule.max_steps", s.max_steps >= 0, s.max_steps, ">= 0 (0 = epochs x steps per epoch)")
    _check("schedule.start_epoch", 0 <= s.start_epoch < s.epochs, s.start_epoch, f"in [0, {s.epochs})")
    _check("schedule.warmup_epochs", 0 <= s.warmup_epochs < s.epochs, s.warmup_epochs, f"in [0, {s.epochs})")
    _check("schedule.milestones", list(s.milestones) == sorted(s.milestones) and all(m > 0 for m in s.milestones),
           list(s.milestones), "increasing positive epochs")
    _check("schedule.gamma", 0 < s.gamma <= 1, s.gamma, "in (0, 1]")
    _check("schedule.power", s.power > 0, s.power, "> 0")
    _check("schedule.min_lr", 0 <= s.min_lr <= o.lr, s.min_lr, f"in [0, optim.lr={o.lr}]")

    _choice("amp.dtype", cfg.amp.dtype, AMP_DTYPES)
    _check("amp.loss_scale", cfg.amp.loss_scale > 0, cfg.amp.loss_scale, "> 0")

    _choice("dist.device", cfg.dist.device, DEVICES)
    _choice("dist.backend", cfg.dist.backend, BACKENDS)
    _check("dist.device_id", cfg.dist.device_id >= -1, cfg.dist.device_id, ">= 0, or -1 for LOCAL_RANK")

    _check("checkpoint.every", cfg.checkpoint.every >= 0, cfg.checkpoint.every, ">= 0 (0 = only at the end)")
    _check("checkpoint.keep_last", cfg.checkpoint.keep_last >= 1, cfg.checkpoint.keep_last, ">= 1")

    _check("eval.every", cfg.eval.every >= 0, cfg.eval.every, ">= 0 (0 = only at epoch ends)")
    _check("eval.batch_size", cfg.eval.batch_size > 0, cfg.eval.batch_size, "> 0")
    if cfg.eval.sets and not cfg.eval.val:
        raise InputError("eval.sets", f"got {list(cfg.eval.sets)}, expected --val DIR to read them from")

    _check("log.every", cfg.log.every >= 1, cfg.log.every, ">= 1")
    _check("threads", cfg.threads >= 0, cfg.threads, ">= 0 (0 = torch's default)")
    _check("max_nonfinite", cfg.max_nonfinite >= 1, cfg.max_nonfinite, ">= 1")
    _check("out", bool(cfg.out), cfg.out, "a run directory")
