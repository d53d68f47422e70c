"""The training loop: ``train(config)``.

A :class:`Trainer` holds one run's state; :meth:`Trainer.run` is the loop, readable in one
screen. Per step: take the next batch (already being copied to the device), set the step's
learning rate, forward under autocast (bf16, or fp16 with a GradScaler: one code path),
backward, optional clipping, then the optimizer step, which skips itself on the device when the
loss or gradient is not finite on any rank (a fused optimizer reads the flag, as it does
GradScaler's found_inf). Nothing in a step reads a device value on the host: the loss, the
skipped-step counters and a stop request are read at log intervals.

Rank 0 verifies (through ``lresnet.eval``), writes metrics and checkpoints; every rank takes part
in checkpointing because loader positions, RNG states and a sharded head's centres are gathered
from all of them. SIGTERM or SIGINT (what a cluster sends before preempting a job) stops every
rank at the next log interval, after a checkpoint; a second signal stops at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lresnet.core.device import autocast_dtype
from lresnet.core.errors import InputError
from lresnet.core.files import make_out_dir
from lresnet.core.interrupt import Interrupted
from lresnet.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from lresnet.train.config import TrainConfig, save_config, to_dict
from lresnet.train.dist import (DistContext, gather_objects, setup_distributed, teardown_distributed,
                                wrap_for_training)
from lresnet.train.schedule import build_optimizer, build_schedule, param_groups, set_lr, total_steps
from lresnet.train.signals import StopRequest

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]


class TrainingAborted(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite for K steps in a row)."""


class TrainingInterrupted(Interrupted):
    """A stop signal ended the run after a checkpoint; rerunning the same command resumes it."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]):
        super().__init__(signum)
        self.step, self.checkpoint = step, checkpoint
        where = f"checkpoint {checkpoint} written" if checkpoint else "no checkpoint written here"
        self.args = (f"{self.signal_name} at step {step}: {where}; run the same command again to resume",)


@dataclass
class TrainResult:
    """What a finished run reports (rank 0 has the verification results)."""

    run_dir: str
    steps: int
    start_step: int
    skipped_steps: int
    final_loss: float
    images_per_s: float  # end to end, all ranks
    images_per_s_step: float  # the reference's way: step time without data wait
    data_wait_fraction: float
    corrupt_samples: int = 0
    verification: dict[str, dict[str, Any]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- building blocks

class Throughput:
    """Images/s over log windows: end to end, and the reference's way (wall time minus data wait).

    Time spent verifying or checkpointing is left out of both.
    """

    def __init__(self, step: int, global_batch: int):
        self.global_batch = global_batch
        self.total = {"time": 0.0, "wait": 0.0, "images": 0}
        self._start(step)

    def _start(self, step: int) -> None:
        self.t0, self.wait, self.first_step = time.perf_counter(), 0.0, step

    def add_wait(self, seconds: float) -> None:
        self.wait += seconds

    def exclude(self, seconds: float) -> None:
        self.t0 += seconds

    def window(self, step: int) -> dict[str, float]:
        """Close the window ending at `step`; return its rates and start the next one."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        images = (step - self.first_step) * self.global_batch
        out = {"images_per_s": images / elapsed, "images_per_s_step": images / max(elapsed - self.wait, 1e-9),
               "data_wait": self.wait / elapsed}
        self.total["time"] += elapsed
        self.total["wait"] += self.wait
        self.total["images"] += images
        self._start(step)
        return out

    def overall(self) -> dict[str, float]:
        t = max(self.total["time"], 1e-9)
        return {"images_per_s": self.total["images"] / t,
                "images_per_s_step": self.total["images"] / max(t - self.total["wait"], 1e-9),
                "data_wait_fraction": self.total["wait"] / t}


class StepHealth:
    """Skipped (non-finite) steps, counted on the device and read at log intervals.

    ``update(bad)`` costs a few tiny device ops and no host synchronisation; :meth:`read` gives
    the totals, the longest run of consecutive bad steps since the last read (runs carry over
    reads) and the last bad step.
    """

    def __init__(self, device: torch.device):
        self.skipped, self.run, self.longest = (torch.zeros((), dtype=torch.int64, device=device) for _ in range(3))
        self.last_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.skipped_before = 0

    def update(self, bad: torch.Tensor, step: int) -> None:
        bad = bad.to(torch.int64)
        self.skipped += bad
        self.run.add_(1).mul_(bad)
        torch.maximum(self.longest, self.run, out=self.longest)
        self.last_bad.copy_(torch.where(bad > 0, step, self.last_bad))

    def read(self) -> tuple[int, int, int]:
        """``(skipped in total, longest run since the last read, last bad step)``: one host read."""
        skipped, longest, last_bad = torch.stack([self.skipped, self.longest, self.last_bad]).tolist()
        self.longest.copy_(self.run)
        return self.skipped_before + skipped, longest, last_bad


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loader(cfg: TrainConfig, ctx: DistContext):
    """The per-rank training loader: shards through lresnet.pipeline, or its synthetic source."""
    from lresnet.pipeline import SyntheticSource, build_train_loader

    d = cfg.data
    if d.shards == "synthetic":
        steps = cfg.schedule.max_steps or 100
        return SyntheticSource(batch_size=d.batch_size, num_classes=d.synthetic_classes, steps=steps,
                               seed=cfg.seed + ctx.world.rank)
    return build_train_loader(None, d, ctx.world, seed=cfg.seed, device=ctx.device)  # nvjpeg and DALI need it


def use_amp(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None: ``amp.enabled`` unset means on for accelerators, off on the CPU."""
    enabled = cfg.amp.enabled if cfg.amp.enabled is not None else device.type != "cpu"
    return autocast_dtype(cfg.amp.dtype) if enabled else None


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """channels_last on accelerators only: on CPU it gains little, and torch's CPU backward of a
    strided 1x1 conv with few channels in channels_last crashes (seen with torch 2.13, 8 channels)."""
    return cfg.model.channels_last and device.type != "cpu"


def build_networks(cfg: TrainConfig, num_classes: int, ctx: DistContext) -> tuple[nn.Module, nn.Module, bool]:
    """Backbone and margin head on the device; returns ``(backbone, head, head_sharded)``."""
    from lresnet.model import create_backbone
    from lresnet.model.partial_fc import create_head

    backbone = create_backbone(cfg.model.net, embedding_size=cfg.model.embedding_size,
                               dropout=cfg.model.dropout, **cfg.model.options)
    h = cfg.head
    sharded = h.partial_fc and ctx.distributed
    head = create_head(h.name, cfg.model.embedding_size, num_classes, s=h.s, m=h.m, m1=h.m1, m2=h.m2, m3=h.m3,
                       sample_rate=h.sample_rate, rank=ctx.world.rank if sharded else 0,
                       world_size=ctx.world.world_size if sharded else 1, partial_fc=h.partial_fc)
    memory_format = torch.channels_last if use_channels_last(cfg, ctx.device) else torch.contiguous_format
    backbone = backbone.to(ctx.device, memory_format=memory_format)
    return backbone, head.to(ctx.device), sharded


def head_state(head: nn.Module) -> dict[str, torch.Tensor]:
    """The head's full state (Partial FC gathers its shards)."""
    return head.full_state_dict() if hasattr(head, "full_state_dict") else head.state_dict()


def load_head_state(head: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if hasattr(head, "load_full_state_dict"):
        head.load_full_state_dict(state)
    else:
        head.load_state_dict(state)


def make_scaler(cfg: TrainConfig, amp: Optional[torch.dtype], device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 needs none). A fixed scale never grows but backs off on overflow."""
    growth = 2000 if cfg.amp.dynamic_loss_scale else 2**31 - 1
    return torch.amp.GradScaler(device.type, init_scale=cfg.amp.loss_scale, growth_interval=growth,
                                enabled=amp == torch.float16)


def fused_step_available(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer skips its own update when ``optimizer.found_inf`` is set (fused SGD)."""
    return all(group.get("fused") for group in optimizer.param_groups)


def init_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum buffers where none exist yet.

    Equal to SGD's first step (buf = grad when buf is 0 and dampening is 0), but a fused step that
    is skipped on the device before any buffer exists would otherwise leave uninitialised memory
    as the momentum of the next step.
    """
    for group in optimizer.param_groups:
        if not group.get("momentum"):
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def clip_and_norm(replicated: list[nn.Parameter], sharded: list[nn.Parameter], max_norm: float,
                  ctx: DistContext) -> torch.Tensor:
    """Global L2 norm of all gradients (sharded ones summed over ranks); clip to `max_norm` when > 0.

    Every rank computes the same norm, so the clip factor — and the replicated
    weights after the step — stay identical across ranks.
    """
    def sq_norm(params: list[nn.Parameter]) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=ctx.device)
        return torch.nn.utils.get_total_norm(grads).float() ** 2

    total_sq = sq_norm(replicated)
    if sharded:
        shard_sq = sq_norm(sharded)
        if ctx.distributed:
            dist.all_reduce(shard_sq)
        total_sq = total_sq + shard_sq
    norm = total_sq.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(replicated + sharded, max_norm, norm)
    return norm


class MetricsLog:
    """JSONL metrics in RUN_DIR/metrics.jsonl (rank 0), plus TensorBoard scalars when installed."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: Optional[int]):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # drop what a killed run logged after the checkpoint we continue from
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        elif self.path.exists():
            self.path.unlink()
        self.path.touch()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.debug("tensorboard not installed; metrics go to %s only", self.path)

    def write(self, record: dict[str, Any]) -> None:
        # opened per record (once per log interval): nothing is lost if the run dies or aborts
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_pair_sets(cfg: TrainConfig) -> list:
    """The verification sets named in the config (all found in ``eval.val`` when none are named)."""
    if not cfg.eval.val:
        return []
    from lresnet.eval import available_sets, load_pair_set

    names = list(cfg.eval.sets) or list(available_sets(cfg.eval.val))
    if not names:
        raise InputError(cfg.eval.val, "no verification sets found (expected <set>.tar or <set>.bin)")
    return [load_pair_set(name, data_dir=cfg.eval.val) for name in names]


def params_digest(backbone: nn.Module, head: nn.Module, head_sharded: bool) -> str:
    """sha256 over the replicated parameters (not BN statistics, which each rank updates from its own batch)."""
    digest = hashlib.sha256()
    modules = [backbone] if head_sharded else [backbone, head]
    for module in modules:
        for name, p in module.named_parameters():
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def config_changes(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every config value that differs between a checkpoint and this run."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# what a checkpoint's weights depend on: another value here cannot resume from it
_ARCHITECTURE_KEYS = ("model.net", "model.embedding_size", "model.options")


def _broadcast_float(value: float, ctx: DistContext) -> float:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.backend != "gloo" else "cpu")
    dist.broadcast(t, src=0)
    return float(t.item())


def _all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------- the run

class Trainer:
    """One training run: built from a config, resumed from ``cfg.out`` when it holds a checkpoint."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, loader: Any = None):
        self.cfg, self.ctx = cfg, ctx
        self.run_dir = Path(cfg.out)
        if ctx.is_main:
            make_out_dir(self.run_dir)
            save_config(cfg, self.run_dir)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed + ctx.world.rank)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        elif ctx.device.type == "cuda":  # every batch has the same shape: let cuDNN pick its fastest kernels
            torch.backends.cudnn.benchmark = True

        self.loader = loader if loader is not None else build_loader(cfg, ctx)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch < 1:
            raise InputError(cfg.data.shards, f"0 batches per epoch at batch size {cfg.data.batch_size} per device")
        self.last_step = total_steps(cfg.schedule, self.steps_per_epoch)
        if not self.loader.num_classes:
            raise InputError(cfg.data.shards, "the class count is unknown (no manifest.json beside the shards)")
        self.backbone, self.head, self.head_sharded = build_networks(cfg, self.loader.num_classes, ctx)
        self.forward_backbone = self.backbone
        if cfg.model.compile:  # the head stays eager: its margin math is fp32 and data dependent
            self.forward_backbone = torch.compile(self.backbone, mode=cfg.model.compile_mode)
        self.model = wrap_for_training(self.forward_backbone, self.head, ctx, self.head_sharded, cfg.dist)
        self.replicated = list(self.backbone.parameters()) + ([] if self.head_sharded else list(self.head.parameters()))
        self.sharded = list(self.head.parameters()) if self.head_sharded else []
        self.global_batch = cfg.data.batch_size * ctx.world.world_size
        self.schedule = build_schedule(cfg.schedule, cfg.optim, self.steps_per_epoch, self.global_batch)
        self.optimizer = build_optimizer(param_groups(self.backbone, self.head, cfg.optim), cfg.optim,
                                         self.schedule(0), device=ctx.device)
        init_momentum(self.optimizer)
        self.fused = fused_step_available(self.optimizer)
        self.amp = use_amp(cfg, ctx.device)
        self.scaler = make_scaler(cfg, self.amp, ctx.device)
        self.manager = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best)
        self.health = StepHealth(ctx.device)
        self.step = cfg.schedule.start_epoch * self.steps_per_epoch
        self.loader_position: Optional[dict] = None
        self.resumed = self.resume()
        self.start_step = self.step
        if ctx.is_main:
            self.manager.truncate_after(self.step)
        self.metrics = (MetricsLog(self.run_dir, cfg.log.tensorboard, self.step if self.resumed else None)
                        if ctx.is_main else None)
        self.pair_sets = load_pair_sets(cfg) if ctx.is_main else []
        self.has_eval = _broadcast_float(1.0 if self.pair_sets else 0.0, ctx) > 0
        self.speed = Throughput(self.step, self.global_batch)
        self.loss_sum = torch.zeros(2, device=ctx.device)  # loss sum and stepped count of the log window
        self.last_loss = float("nan")
        self.last_verification: dict[str, dict] = {}
        self.prefetcher = None

    # --- start or resume
    def resume(self) -> bool:
        """Load the newest good checkpoint in the run directory, if resuming; True when one was loaded."""
        if not self.cfg.checkpoint.resume:
            if self.manager.latest() is not None:
                raise InputError(self.run_dir, "holds checkpoints of an earlier run; resume it (drop --no-resume) "
                                 "or choose another --out")
            return False
        found = self.manager.load_latest(map_location="cpu")
        if found is None:
            return False
        path, ckpt = found
        self._check_compatible(path, ckpt)
        changed = config_changes(ckpt["config"], to_dict(self.cfg))
        if changed:
            log.warning("resuming with a changed config: %s", "; ".join(changed))
        self.backbone.load_state_dict(ckpt["backbone"])
        load_head_state(self.head, ckpt["head"])  # the full centre matrix, re-sharded for this world
        self.optimizer.load_state_dict(ckpt["optimizer"])
        init_momentum(self.optimizer)  # a sharded head's momentum is not checkpointed
        self.scaler.load_state_dict(ckpt["scaler"])
        self.health.skipped_before = int(ckpt.get("skipped_steps", 0))
        ranks = len(ckpt["rng"])
        rank = self.ctx.world.rank if ranks == self.ctx.world.world_size else 0
        if ranks != self.ctx.world.world_size:
            log.warning("checkpoint was written by %d ranks, now %d: every rank takes rank 0's RNG state",
                        ranks, self.ctx.world.world_size)
        set_rng_state(ckpt["rng"][rank], self.ctx.device)
        self.step, self.loader_position = int(ckpt["step"]), ckpt["loader"][rank]
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _check_compatible(self, path: Path, ckpt: dict[str, Any]) -> None:
        saved, now = ckpt["config"], to_dict(self.cfg)
        differ = [c for c in config_changes(saved, now) if c.split(":", 1)[0] in _ARCHITECTURE_KEYS]
        classes = ckpt["head"]["weight"].shape[0] if "weight" in ckpt["head"] else None
        if classes is not None and classes != self.loader.num_classes:
            differ.append(f"classes: {classes} -> {self.loader.num_classes}")
        if differ:
            raise InputError(self.run_dir, f"holds a run of another model ({'; '.join(differ)}, from {path.name}); "
                             "train into another --out (runs without --out share runs/lresnet)")

    # --- the loop
    def run(self, stop: StopRequest, progress: Optional[ProgressFn] = None) -> TrainResult:
        self.model.train()
        while self.step < self.last_step:
            epoch = self.step // self.steps_per_epoch
            batches = self.epoch_batches(epoch)
            epoch_end = min((epoch + 1) * self.steps_per_epoch, self.last_step)
            while self.step < epoch_end:
                images, labels = self.next_batch(batches)
                self.train_step(images, labels)
                self.step += 1
                if self.step % self.cfg.log.every == 0 or self.step == self.last_step:
                    self.log(progress)
                    if stop.agreed(self.ctx):
                        self.stop_now(stop)
                self.verify_and_checkpoint()
            del batches
        if self.metrics is not None:
            self.metrics.close()
        return self.result()

    def epoch_batches(self, epoch: int):
        """This epoch's batches on the device (resuming inside it when the checkpoint was)."""
        from lresnet.pipeline import DevicePrefetcher

        self.loader.set_epoch(epoch)
        if self.loader_position is not None and self.step % self.steps_per_epoch:
            try:
                self.loader.load_state_dict(self.loader_position)
            except ValueError as err:  # another world size, batch size or worker count than when saved
                log.warning("%s; epoch %d restarts from its first batch", err, epoch)
        self.loader_position = None
        self.prefetcher = DevicePrefetcher(self.loader, self.ctx.device,
                                           channels_last=use_channels_last(self.cfg, self.ctx.device))
        return iter(self.prefetcher)

    def next_batch(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        # DataLoader draws its worker seed from the global torch RNG whenever an epoch starts; a
        # forked RNG keeps data loading from shifting the training stream (dropout, sampling),
        # which a resumed run (new iterator mid-epoch) must reproduce exactly
        with torch.random.fork_rng(devices=[]):
            images, labels = next(batches, (None, None))
        if images is None:
            raise InputError(self.cfg.data.shards, f"loader ended at step {self.step}, expected "
                             f"{self.steps_per_epoch} batches per epoch")
        self.speed.add_wait(time.perf_counter() - t0)
        return images, labels

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Forward, backward, clip, step; a non-finite loss or gradient on any rank skips the update.

        The skip is decided on the device: the flag goes to a fused optimizer as ``found_inf`` (fp16:
        GradScaler's own overflow check is folded in), so no value is read on the host.
        """
        set_lr(self.optimizer, self.schedule(self.step))
        with torch.autocast(self.ctx.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            loss = self.model(images, labels)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        self.grad_norm = clip_and_norm(self.replicated, self.sharded, self.cfg.optim.grad_clip, self.ctx)
        loss = loss.detach().float()
        flags = torch.stack([~torch.isfinite(loss), ~torch.isfinite(self.grad_norm)]).float()
        if self.ctx.distributed:  # one rank's inf loss (finite gradient) skips the step everywhere
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skip = flags.amax()
        # fp16: gradient overflow is GradScaler's business (it lowers the scale), not a bad step
        self.health.update(flags[0] if self.scaler.is_enabled() else skip, self.step + 1)
        if self.fused:
            self.optimizer.grad_scale, self.optimizer.found_inf = None, skip
            self.optimizer.step()
        elif not skip.item():  # an optimizer without a device-side skip: the one host read of a step
            self.optimizer.step()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        stepped = 1.0 - skip
        self.loss_sum += torch.stack([torch.nan_to_num(loss) * stepped, stepped])

    def log(self, progress: Optional[ProgressFn]) -> None:
        """Read the window's loss and counters (the only host reads of the loop); abort on K bad steps in a row."""
        skipped, longest, last_bad = self.health.read()
        window = _all_reduce_sum(self.loss_sum, self.ctx).tolist()
        self.loss_sum = torch.zeros(2, device=self.ctx.device)
        self.last_loss = window[0] / window[1] if window[1] else float("nan")
        self.skipped_steps = skipped
        if longest >= self.cfg.max_nonfinite:
            raise TrainingAborted(
                f"the loss or gradient was not finite for {longest} steps in a row (last at step {last_bad}, "
                f"lr {self.schedule(max(last_bad - 1, 0)):.3g}); lower --lr, set --grad-clip, or use --amp-dtype bf16")
        if last_bad >= 0 and last_bad > self.step - self.cfg.log.every:
            log.warning("step %d: non-finite loss or gradient, %d step(s) skipped so far", last_bad, skipped)
        corrupt = self.loader.stats.corrupt_samples if hasattr(self.loader, "stats") else 0
        record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "loss": self.last_loss,
                  "lr": self.schedule(self.step - 1), "grad_norm": float(self.grad_norm.item()),
                  "skipped_steps": skipped, "corrupt_samples": corrupt, **self.speed.window(self.step)}
        if self.scaler.is_enabled():
            record["loss_scale"] = float(self.scaler.get_scale())
        if self.metrics is not None:
            self.metrics.write(record)
            if progress is not None:
                progress({**record, "total_steps": self.last_step})

    def verify_and_checkpoint(self) -> None:
        """Verification and checkpoints on their schedules (their time is left out of the throughput)."""
        t0 = time.perf_counter()
        cfg, step = self.cfg, self.step
        metric = None
        if self.has_eval and ((cfg.eval.every and step % cfg.eval.every == 0) or step == self.last_step
                              or (cfg.eval.at_epoch_end and step % self.steps_per_epoch == 0)):
            metric = self.verify()
            best = self.manager.best_metric() if self.ctx.is_main else None
            improved = metric == metric and (best is None or metric > best)  # NaN: no sets scored
            metric = metric if _broadcast_float(1.0 if improved else 0.0, self.ctx) > 0 else None
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == self.last_step or metric is not None:
            self.checkpoint(metric)
        self.speed.exclude(time.perf_counter() - t0)

    def verify(self) -> float:
        """Verification on rank 0; every rank gets the mean accuracy (NaN when nothing was scored)."""
        from lresnet.eval import verify_backbone

        results = {}
        if self.ctx.is_main and self.pair_sets:
            was_training = self.backbone.training
            self.backbone.eval()
            try:
                results = {ps.name: verify_backbone(self.backbone, ps, batch_size=self.cfg.eval.batch_size,
                                                    device=self.ctx.device, flip=self.cfg.eval.flip,
                                                    amp_dtype=self.amp).as_dict()
                           for ps in self.pair_sets}
            finally:
                self.backbone.train(was_training)
        mean_acc = float(np.mean([r["accuracy"] for r in results.values()])) if results else float("nan")
        if self.metrics is not None and results:
            self.metrics.write({"step": self.step, "epoch": self.step / self.steps_per_epoch,
                                "verification": results, "mean_accuracy": mean_acc})
            log.info("step %d verification: %s", self.step,
                     ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in results.items()))
        self.last_verification = results or self.last_verification
        return _broadcast_float(mean_acc, self.ctx)

    def checkpoint(self, metric: Optional[float] = None) -> Optional[Path]:
        """Write ``ckpt-STEP.pt`` (rank 0; every rank contributes its loader position and RNG)."""
        skipped, _, _ = self.health.read()
        state = {
            "backbone": self.backbone.state_dict(),
            "head": head_state(self.head),  # collective for a sharded head
            "optimizer": self._optimizer_state(),
            "scaler": self.scaler.state_dict(),
            "schedule": self.schedule.as_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "skipped_steps": skipped,
            # the prefetcher's state does not count the batch it holds ahead
            "loader": gather_objects(self.prefetcher.state_dict(), self.ctx),
            "rng": gather_objects(rng_state(self.ctx.device), self.ctx),
            "config": to_dict(self.cfg),
            # per rank: proof that every replica ran the same steps and holds the same weights
            "ranks": {"step": gather_objects(self.step, self.ctx),
                      "params_sha256": gather_objects(params_digest(self.backbone, self.head, self.head_sharded),
                                                      self.ctx)},
        }
        if not self.ctx.is_main:
            return None
        if len(set(state["ranks"]["params_sha256"])) > 1:
            log.warning("step %d: replicas hold different weights: %s", self.step, state["ranks"]["params_sha256"])
        return self.manager.save(state, self.step, metric)

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimizer state without a sharded head's (it differs per rank; its momentum restarts on resume)."""
        state = self.optimizer.state_dict()
        if self.ctx.distributed and self.sharded:
            ids = {id(p) for p in self.sharded}
            order = [p for g in self.optimizer.param_groups for p in g["params"]]
            drop = {i for i, p in enumerate(order) if id(p) in ids}
            state["state"] = {k: v for k, v in state["state"].items() if k not in drop}
        return state

    def stop_now(self, stop: StopRequest) -> None:
        """Checkpoint (unless this step just got one) and end the run on a stop signal."""
        written = self.manager.latest()
        path = written if written is not None and written.name == f"ckpt-{self.step:08d}.pt" else self.checkpoint()
        if self.metrics is not None:
            self.metrics.close()
        raise TrainingInterrupted(stop.signum or signal.SIGTERM, self.step, path if self.ctx.is_main else None)

    def result(self) -> TrainResult:
        corrupt = self.loader.stats.corrupt_samples if hasattr(self.loader, "stats") else 0
        return TrainResult(run_dir=str(self.run_dir), steps=self.step, start_step=self.start_step,
                           skipped_steps=self.health.read()[0], final_loss=self.last_loss,
                           corrupt_samples=corrupt, verification=self.last_verification, **self.speed.overall())


def train(cfg: TrainConfig, progress: Optional[ProgressFn] = None, loader: Any = None) -> TrainResult:
    """Train as `cfg` says; resume from the newest checkpoint in ``cfg.out`` when there is one.

    Args:
        cfg: a validated config (:func:`lresnet.train.config.build_config`).
        progress: called on rank 0 at each log interval with the metrics record.
        loader: an already built per-rank loader (tests, benchmarks); default: from ``cfg.data``.
    Raises:
        InputError: bad data, checkpoint, verification set or run directory; a checkpoint that cannot
            be written.
        TrainingAborted: the loss was not finite for ``cfg.max_nonfinite`` steps in a row.
        TrainingInterrupted: SIGTERM/SIGINT; a checkpoint was written first.
    """
    ctx = setup_distributed(cfg.dist)
    try:
        with StopRequest.on_signals() as stop:
            result = Trainer(cfg, ctx, loader).run(stop, progress)
    except BaseException:
        teardown_distributed(ctx, meet=False)  # the peers may never reach a last barrier
        raise
    teardown_distributed(ctx)
    return result
