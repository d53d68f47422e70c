"""Training configuration: one frozen :class:`TrainConfig` composed of each layer's own section.

The model layer owns ``model`` and ``head`` (:mod:`lresnet.model.config`), the pipeline owns
``data`` (:class:`lresnet.pipeline.PipelineConfig`, handed to the loader as it is), and this
module owns the training sections (optim, schedule, amp, dist, checkpoint, eval, log). Every
field is declared once with :func:`lresnet.core.schema.option`: its default, help, flag, allowed
values and range. The CLI flags, the config-file keys and the checks are generated from those
declarations, so adding an option is adding one field.

:func:`build_config` lays CLI flags over a ``--config`` TOML/YAML/JSON file; nothing writes back
into a config: derived values (steps per epoch, the scaled learning rate, the device) are
computed where they are used. The resolved config is saved beside each run as ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from lresnet.core.device import AMP_DTYPES, DEVICE_KINDS
from lresnet.core.errors import InputError
from lresnet.core.files import atomic_file, make_out_dir
from lresnet.core.schema import Section, at_least, between, build, greater, merge, option, to_plain
from lresnet.model.config import HeadConfig, ModelConfig
from lresnet.pipeline.config import PipelineConfig

NET_MODES = {"ir": "ir", "ir_se": "irse", "irse": "irse"}


def schedule_kinds() -> tuple[str, ...]:
    from lresnet.train.schedule import SCHEDULE_KINDS

    return SCHEDULE_KINDS


def dist_backends() -> tuple[str, ...]:
    from lresnet.train.dist import BACKENDS

    return BACKENDS


@dataclass(frozen=True)
class OptimConfig(Section):
    """SGD. Weight decay on conv/linear weights and head centres; none on BN/PReLU/bias."""

    PANEL = "Optimiser"

    lr: float = option(0.1, help="Base learning rate.", check=greater(0))
    momentum: float = option(0.9, help="SGD momentum.", check=between(0, 1))
    nesterov: bool = option(False, help="Nesterov momentum.")
    weight_decay: float = option(5e-4, help="Weight decay of conv/linear weights (and the head's centres).",
                                 check=at_least(0))
    decay_norm_and_bias: bool = option(False, help="Also decay BatchNorm, PReLU and bias parameters.")
    decay_head: bool = option(True, help="Decay the head's class centres.")
    scale_lr: bool = option(False, help="Scale the rate with the batch: lr x global batch / --base-batch.")
    base_batch: int = option(512, help="The global batch --lr is meant for, with --scale-lr.", check=greater(0))
    grad_clip: float = option(0.0, help="Max global gradient norm (0 = off).", check=at_least(0))


@dataclass(frozen=True)
class ScheduleConfig(Section):
    """LR as a function of the step; milestones and warmup are given in epochs."""

    PANEL = "Schedule"

    kind: str = option("multistep", flag="--schedule", help="LR schedule.", choices=schedule_kinds)
    epochs: int = option(20, help="Epochs of the run.", check=greater(0))
    max_steps: int = option(0, aliases=("--max-iter",), help="Stop after this many steps (0 = epochs x steps "
                            "per epoch).", check=at_least(0))
    start_epoch: int = option(0, help="Start at this epoch (a fresh run skips the schedule ahead).",
                              check=at_least(0))
    warmup_epochs: float = option(0.0, help="Linear warmup, in epochs.", check=at_least(0))
    milestones: tuple[float, ...] = option((12.0, 15.0, 18.0), help="multistep: epochs at which the rate drops, "
                                           "comma-separated.", check=greater(0), metavar="EPOCHS")
    gamma: float = option(0.1, help="multistep: factor at each milestone.", check=between(0, 1, lo_open=True,
                                                                                          hi_open=False))
    power: float = option(2.0, help="poly: the exponent.", check=greater(0))
    min_lr: float = option(0.0, help="poly/cosine: the final rate.", check=at_least(0))

    def check(self) -> None:
        if self.start_epoch >= self.epochs:
            raise InputError("start_epoch", f"got {self.start_epoch}, expected in [0, {self.epochs})")
        if self.warmup_epochs >= self.epochs:
            raise InputError("warmup_epochs", f"got {self.warmup_epochs}, expected in [0, {self.epochs})")
        if list(self.milestones) != sorted(self.milestones):
            raise InputError("milestones", f"got {list(self.milestones)}, expected increasing positive epochs")


@dataclass(frozen=True)
class AmpConfig(Section):
    """One AMP path: bf16 autocast, or fp16 autocast + GradScaler."""

    PANEL = "Precision"

    enabled: Optional[bool] = option(None, flag="--amp", help="Mixed precision (autocast); default: on for cuda "
                                     "and npu, off on the CPU.")
    dtype: str = option("bf16", flag="--amp-dtype", help="Autocast dtype.", choices=AMP_DTYPES)
    loss_scale: float = option(65536.0, help="fp16: initial loss scale.", check=greater(0))
    dynamic_loss_scale: bool = option(True, negative="--static-loss-scale",
                                      help="fp16: let the scale grow (a static one still backs off on overflow).")


@dataclass(frozen=True)
class DistConfig(Section):
    """Device and process group. Rank/world come from torchrun's environment."""

    PANEL = "Distributed"

    device: str = option("cpu", help="Device type.", choices=DEVICE_KINDS)
    device_id: int = option(-1, help="Device index (-1: LOCAL_RANK under torchrun, else 0).", check=at_least(-1))
    backend: str = option("auto", flag="--dist-backend", help="Process-group backend (auto: gloo on cpu, nccl on "
                          "cuda, hccl on npu).", choices=dist_backends)
    timeout: float = option(1800.0, flag="--dist-timeout", help="Seconds a collective may wait for the other "
                            "ranks before the run fails.", check=greater(0))
    bucket_mb: float = option(25.0, flag="--ddp-bucket-mb", help="DDP gradient bucket size in MB.",
                              check=greater(0))
    bucket_view: bool = option(True, flag="--ddp-bucket-view", help="DDP gradient_as_bucket_view: gradients live "
                               "in the all-reduce buckets (saves a copy and the memory of one).")
    static_graph: bool = option(False, flag="--ddp-static-graph", help="DDP static_graph: the same parameters get "
                                "gradients every step (true for lresnet's backbones), which lets DDP skip "
                                "per-step bookkeeping.")


@dataclass(frozen=True)
class CheckpointConfig(Section):
    """Checkpoints in RUN_DIR: every N steps and at the end; last K kept plus the best."""

    PANEL = "Checkpoints"

    every: int = option(1000, flag="--ckpt-every", help="Checkpoint every N steps (0 = only at the end).",
                        check=at_least(0))
    keep_last: int = option(3, help="Checkpoints kept (newest first), besides best.pt.", check=at_least(1))
    keep_best: bool = option(True, help="Keep best.pt, the checkpoint with the best verification accuracy.")
    resume: bool = option(True, help="Continue from the newest checkpoint in --out.")


@dataclass(frozen=True)
class EvalConfig(Section):
    """In-run verification on rank 0 (through lresnet.eval)."""

    PANEL = "Verification"

    val: Optional[str] = option(None, help="Verification sets dir (OUT/val of convert-rec).")
    sets: tuple[str, ...] = option((), flag="--val-set", repeat=True, metavar="NAME",
                                   help="Set to verify on (repeat); default: all in --val.")
    every: int = option(2000, flag="--eval-every", help="Verify every N steps (0 = only at epoch ends).",
                        check=at_least(0))
    at_epoch_end: bool = option(True, flag="--eval-at-epoch-end", help="Also verify at each epoch end.")
    batch_size: int = option(128, flag="--eval-batch-size", help="Images per forward when verifying.",
                             check=greater(0))
    flip: bool = option(True, flag="--eval-flip", help="Flip test-time augmentation when verifying.")


@dataclass(frozen=True)
class LogConfig(Section):
    """Metrics: JSONL always, TensorBoard when installed."""

    PANEL = "Logging"

    every: int = option(50, flag="--log-every", help="Log (and read the loss from the device) every N steps.",
                        check=at_least(1))
    tensorboard: bool = option(True, help="Also write TensorBoard scalars (when tensorboard is installed).")


@dataclass(frozen=True)
class TrainConfig(Section):
    """Everything one training run needs."""

    out: str = option("runs/lresnet", panel="Checkpoints", help="Run directory (checkpoints, metrics, config.json).")
    seed: int = option(0, panel="Data", help="Seed of the data order, augmentation and initial weights.",
                       check=at_least(0))
    deterministic: bool = option(False, panel="Distributed", help="torch deterministic algorithms (slower).")
    max_nonfinite: int = option(10, panel="Optimiser", help="Abort after K non-finite steps in a row.",
                                check=at_least(1))
    threads: int = option(0, panel="Distributed", help="torch CPU threads per process (0 = torch's default).",
                          check=at_least(0))
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: PipelineConfig = field(default_factory=PipelineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    amp: AmpConfig = field(default_factory=AmpConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def check(self) -> None:
        if self.schedule.min_lr > self.optim.lr:
            raise InputError("schedule.min_lr", f"got {self.schedule.min_lr}, expected in [0, optim.lr={self.optim.lr}]")
        if self.eval.sets and not self.eval.val:
            raise InputError("eval.sets", f"got {list(self.eval.sets)}, expected --val DIR to read them from")
        if not self.out:
            raise InputError("out", f"got {self.out!r}, expected a run directory")


def net_name(mode: str, depth: int) -> str:
    """The registry name for the reference's ``--net_mode``/``--net_depth`` pair (``ir_se``, 100 → ``irse100``)."""
    if mode not in NET_MODES:
        raise InputError("--net-mode", f"got {mode!r}, expected one of {sorted(NET_MODES)}")
    return f"{NET_MODES[mode]}{depth}"


# ----------------------------------------------------------------------------- building

def _parse_toml(fh) -> Any:
    import tomllib

    return tomllib.load(fh)


def _parse_yaml(fh) -> Any:
    try:
        import yaml
    except ImportError:
        raise InputError(fh.name, "YAML configs need pyyaml (pip install 'lresnet[yaml]'), or use TOML") from None
    try:
        return yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ValueError(" ".join(str(err).split())) from None


_PARSERS = {".toml": ("rb", _parse_toml), ".yaml": ("r", _parse_yaml), ".yml": ("r", _parse_yaml),
            ".json": ("r", json.load)}


def load_config_file(path: Union[str, Path]) -> dict[str, Any]:
    """Read a ``.toml`` (tomllib), ``.yaml``/``.yml`` (needs pyyaml) or ``.json`` config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file not found")
    suffix = path.suffix.lower()
    if suffix not in _PARSERS:
        raise InputError(path, f"got suffix {suffix!r}, expected one of {sorted(_PARSERS)}")
    mode, parse = _PARSERS[suffix]
    try:
        with open(path, mode, **({} if mode == "rb" else {"encoding": "utf-8"})) as fh:
            data = parse(fh)
    except OSError as err:
        raise InputError(path, f"cannot read config: {err.strerror or err}") from None
    except ValueError as err:  # TOML, JSON and (re-raised) YAML syntax errors, with their line numbers
        if isinstance(err, InputError):
            raise
        raise InputError(path, f"cannot parse config: {err}") from None
    if not isinstance(data, Mapping):
        raise InputError(path, "expected a table of options at the top level")
    return dict(data)


def validate(cfg: TrainConfig) -> None:
    """What a run needs beyond valid values: a data source. (Every value was checked when it was set.)"""
    if not cfg.data.shards:
        raise InputError("data.shards", f"got {cfg.data.shards!r}, expected a shard directory, manifest, "
                                        "pattern or 'synthetic'")


def build_config(values: Optional[Mapping[str, Any]] = None,
                 config_file: Union[str, Path, None] = None) -> TrainConfig:
    """Build and validate a :class:`TrainConfig`.

    Args:
        values: nested overrides (e.g. from CLI flags: ``{"optim": {"lr": 0.1}}``); ``None`` entries are skipped.
        config_file: optional TOML/YAML/JSON file; `values` override it.
    Raises:
        InputError: an unknown option, a wrong type or a value out of range.
    """
    data: dict[str, Any] = load_config_file(config_file) if config_file else {}
    cfg = build(TrainConfig, merge(data, values or {}))
    validate(cfg)
    return cfg


def replace(cfg: TrainConfig, **sections: Mapping[str, Any]) -> TrainConfig:
    """A copy of `cfg` with some section fields changed, checked again: ``replace(cfg, optim={"lr": 0.01})``."""
    return build_config(merge(to_dict(cfg), sections))


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain JSON-able data (tuples become lists)."""
    return to_plain(cfg)


def save_config(cfg: TrainConfig, run_dir: Union[str, Path]) -> Path:
    """Write the resolved config to ``RUN_DIR/config.json`` (atomically) and return the path."""
    path = make_out_dir(run_dir) / "config.json"
    with atomic_file(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
    return path
