"""The training loop: ``train(config)``.

One screen of loop, the rest small helpers. Per step: wait for the next batch
(already being copied to the device), set the LR for this step, forward under
autocast (bf16, or fp16 with a GradScaler — one code path), backward, optional
gradient clipping, then the optimizer step unless the loss (or gradient) is not
finite. The loss is accumulated on the device and read with ``.item()`` only at
log intervals; the one per-step host read is the finiteness flag, which the host
needs to decide whether to step (GradScaler makes the same read).

Rank 0 verifies (through ``lresnet.eval``), writes metrics and checkpoints; every
rank takes part in checkpointing because loader positions, RNG states and a
sharded head's centres are gathered from all of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lresnet.core.errors import InputError
from lresnet.train.checkpoint import CheckpointManager, load_checkpoint, rng_state, set_rng_state
from lresnet.train.config import TrainConfig, save_config, to_dict
from lresnet.train.dist import (DistContext, all_reduce_min, gather_objects, setup_distributed,
                                teardown_distributed, wrap_for_training)
from lresnet.train.schedule import build_optimizer, build_schedule, param_groups, set_lr, total_steps

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]


class TrainingAborted(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite for K steps in a row)."""


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


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, autocast_dtype: Optional[torch.dtype],
               params: tuple[list[nn.Parameter], list[nn.Parameter]], grad_clip: float,
               ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Forward, backward, clip, and step unless the loss or gradient is not finite on some rank.

    Returns ``(loss, grad_norm, stepped)``; loss and norm stay on the device.
    """
    with torch.autocast(ctx.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = model(images, labels)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = clip_and_norm(params[0], params[1], grad_clip, ctx)
    finite = torch.isfinite(loss.detach())
    if not scaler.is_enabled():  # with fp16 the scaler itself skips steps whose gradients overflowed
        finite = finite & torch.isfinite(grad_norm)
    # the host must decide whether to step (GradScaler makes the same read); every rank decides alike
    stepped = bool(all_reduce_min(finite.to(torch.float32), ctx).item() > 0)
    if stepped:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm, stepped


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
    return build_train_loader(None, d, ctx.world, seed=cfg.seed)


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


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """channels_last on accelerators only: on CPU it gains little, and torch's CPU backward of a
    strided 1x1 conv with few channels in channels_last crashes (seen with torch 2.13, 8 channels)."""
    return cfg.model.channels_last and device.type != "cpu"


def head_state(head: nn.Module) -> dict[str, torch.Tensor]:
    """The head's full state (Partial FC gathers its shards)."""
    return head.full_state_dict() if hasattr(head, "full_state_dict") else head.state_dict()


def load_head_state(head: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if hasattr(head, "load_full_state_dict"):
        head.load_full_state_dict(state)
    else:
        head.load_state_dict(state)


def amp_dtype(cfg: TrainConfig) -> Optional[torch.dtype]:
    """The autocast dtype, or None when AMP is off."""
    if not cfg.amp.enabled:
        return None
    return torch.bfloat16 if cfg.amp.dtype == "bf16" else torch.float16


def make_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (bf16 needs none). A fixed scale never grows but backs off on overflow."""
    enabled = cfg.amp.enabled and cfg.amp.dtype == "fp16"
    growth = 2000 if cfg.amp.dynamic_loss_scale else 2**31 - 1
    return torch.amp.GradScaler(device.type, init_scale=cfg.amp.loss_scale, growth_interval=growth,
                                enabled=enabled)


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


def verify(backbone: nn.Module, pair_sets: list, cfg: TrainConfig, device: torch.device) -> dict[str, dict]:
    """Verification of `backbone` on every set (eval mode, then back to train mode)."""
    from lresnet.eval import verify_backbone

    was_training = backbone.training
    backbone.eval()
    try:
        return {ps.name: verify_backbone(backbone, ps, batch_size=cfg.eval.batch_size, device=device,
                                         flip=cfg.eval.flip, amp_dtype=amp_dtype(cfg)).as_dict()
                for ps in pair_sets}
    finally:
        backbone.train(was_training)


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


def _broadcast_float(value: float, ctx: DistContext) -> float:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.backend != "gloo" else "cpu")
    dist.broadcast(t, src=0)
    return float(t.item())


def _optimizer_state(optimizer: torch.optim.Optimizer, drop: set[int]) -> dict[str, Any]:
    """The optimizer state without the parameters listed in `drop` (a sharded head's, which differ per rank)."""
    state = optimizer.state_dict()
    if drop:
        state["state"] = {k: v for k, v in state["state"].items() if k not in drop}
    return state


def restore(path: Path, cfg: TrainConfig, ctx: DistContext, backbone: nn.Module, head: nn.Module,
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> tuple[int, Any]:
    """Load a checkpoint into the run's objects and this rank's RNG; returns ``(step, loader position)``."""
    ckpt = load_checkpoint(path, map_location="cpu")
    changed = config_changes(ckpt["config"], to_dict(cfg))
    if changed:
        log.warning("resuming with a changed config: %s", "; ".join(changed))
    backbone.load_state_dict(ckpt["backbone"])
    load_head_state(head, ckpt["head"])  # the full centre matrix, re-sharded for this world
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    same_world = len(ckpt["rng"]) == ctx.world.world_size
    rank = ctx.world.rank if same_world else 0
    if not same_world:
        log.warning("checkpoint was written by %d ranks, now %d: every rank takes rank 0's RNG state",
                    len(ckpt["rng"]), ctx.world.world_size)
    set_rng_state(ckpt["rng"][rank], ctx.device)
    log.info("resumed from %s at step %d", path, ckpt["step"])
    return int(ckpt["step"]), ckpt["loader"][rank]


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, progress: Optional[ProgressFn] = None, loader: Any = None) -> TrainResult:
    """Train as `cfg` says; resume from the newest checkpoint in ``cfg.out`` when there is one.

    Args:
        cfg: a validated config (:func:`lresnet.train.config.build_config`).
        progress: called on rank 0 at each log interval with the metrics record.
        loader: an already built per-rank loader (tests, benchmarks); default: from ``cfg.data``.
    Raises:
        InputError: bad data, checkpoint or verification set.
        TrainingAborted: the loss was not finite for ``cfg.max_nonfinite`` steps in a row.
    """
    ctx = setup_distributed(cfg.dist)
    try:
        result = _train(cfg, ctx, progress, loader)
    except BaseException:
        teardown_distributed(ctx, meet=False)  # the peers may never reach a last barrier
        raise
    teardown_distributed(ctx)
    return result


def _train(cfg: TrainConfig, ctx: DistContext, progress: Optional[ProgressFn], loader: Any) -> TrainResult:
    run_dir = Path(cfg.out)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed + ctx.world.rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)

    loader = loader if loader is not None else build_loader(cfg, ctx)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise InputError(cfg.data.shards, f"0 batches per epoch at batch size {cfg.data.batch_size} per device")
    last_step = total_steps(cfg.schedule, steps_per_epoch)
    if not loader.num_classes:
        raise InputError(cfg.data.shards, "the class count is unknown (no manifest.json beside the shards)")
    backbone, head, head_sharded = build_networks(cfg, loader.num_classes, ctx)
    model = wrap_for_training(backbone, head, ctx, head_sharded)
    replicated = [p for p in backbone.parameters()] + ([] if head_sharded else list(head.parameters()))
    sharded = list(head.parameters()) if head_sharded else []
    global_batch = cfg.data.batch_size * ctx.world.world_size
    schedule = build_schedule(cfg.schedule, cfg.optim, steps_per_epoch, global_batch)
    optimizer = build_optimizer(param_groups(backbone, head, cfg.optim), cfg.optim, schedule(0))
    sharded_ids = {id(p) for p in sharded}
    sharded_index = {i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])
                     if id(p) in sharded_ids}
    scaler = make_scaler(cfg, ctx.device)
    autocast_dtype = amp_dtype(cfg)
    manager = CheckpointManager(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best)

    # --- start or resume
    step = cfg.schedule.start_epoch * steps_per_epoch
    loader_position = None
    if not cfg.checkpoint.resume and manager.latest() is not None:
        raise InputError(run_dir, "holds checkpoints of an earlier run; resume it (drop --no-resume) "
                         "or choose another --out")
    ckpt_path = manager.latest() if cfg.checkpoint.resume else None
    if ckpt_path is not None:
        step, loader_position = restore(ckpt_path, cfg, ctx, backbone, head, optimizer, scaler)
    if ctx.is_main:
        manager.truncate_after(step)
    metrics = MetricsLog(run_dir, cfg.log.tensorboard, step if ckpt_path else None) if ctx.is_main else None
    pair_sets = load_pair_sets(cfg) if ctx.is_main else []
    has_eval = _broadcast_float(1.0 if pair_sets else 0.0, ctx) > 0

    def checkpoint(metric: Optional[float]) -> None:
        state = {
            "backbone": backbone.state_dict(),
            "head": head_state(head),  # collective for a sharded head
            "optimizer": _optimizer_state(optimizer, sharded_index if ctx.distributed else set()),
            "scaler": scaler.state_dict(),
            "schedule": schedule.as_dict(),
            "step": step,
            "epoch": step // steps_per_epoch,
            # the prefetcher's state does not count the batch it holds ahead
            "loader": gather_objects(prefetcher.state_dict(), ctx),
            "rng": gather_objects(rng_state(ctx.device), ctx),
            "config": to_dict(cfg),
            # per rank: proof that every replica ran the same steps and holds the same weights
            "ranks": {"step": gather_objects(step, ctx),
                      "params_sha256": gather_objects(params_digest(backbone, head, head_sharded), ctx)},
        }
        if ctx.is_main:
            if len(set(state["ranks"]["params_sha256"])) > 1:
                log.warning("step %d: replicas hold different weights: %s", step, state["ranks"]["params_sha256"])
            manager.save(state, step, metric)

    def run_verification() -> Optional[float]:
        results = verify(backbone, pair_sets, cfg, ctx.device) if ctx.is_main and pair_sets else {}
        mean_acc = float(np.mean([r["accuracy"] for r in results.values()])) if results else float("nan")
        if metrics is not None and results:
            metrics.write({"step": step, "epoch": step / steps_per_epoch, "verification": results,
                           "mean_accuracy": mean_acc})
            log.info("step %d verification: %s", step,
                     ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in results.items()))
        nonlocal last_verification
        last_verification = results or last_verification
        return _broadcast_float(mean_acc, ctx)

    # --- the loop
    from lresnet.pipeline import DevicePrefetcher

    model.train()
    start_step = step
    skipped = consecutive_bad = 0
    last_loss = float("nan")
    last_verification: dict[str, dict] = {}
    speed = Throughput(step, global_batch)
    loss_sum, loss_count = torch.zeros((), device=ctx.device), 0
    while step < last_step:
        epoch = step // steps_per_epoch
        loader.set_epoch(epoch)
        if loader_position is not None and step % steps_per_epoch:
            try:
                loader.load_state_dict(loader_position)  # resume inside this epoch
            except ValueError as err:  # another world size, batch size or worker count than when saved
                log.warning("%s; epoch %d restarts from its first batch", err, epoch)
        loader_position = None
        prefetcher = DevicePrefetcher(loader, ctx.device, channels_last=use_channels_last(cfg, ctx.device))
        batches = iter(prefetcher)
        while step < min((epoch + 1) * steps_per_epoch, last_step):
            t0 = time.perf_counter()
            # DataLoader draws its worker seed from the global torch RNG whenever an epoch starts; a
            # forked RNG keeps data loading from shifting the training stream (dropout, sampling),
            # which a resumed run (new iterator mid-epoch) must reproduce exactly
            with torch.random.fork_rng(devices=[]):
                images, labels = next(batches, (None, None))
            if images is None:
                raise InputError(cfg.data.shards, f"loader ended at step {step}, expected {steps_per_epoch} "
                                 "batches per epoch")
            speed.add_wait(time.perf_counter() - t0)

            lr = schedule(step)
            set_lr(optimizer, lr)
            loss, grad_norm, stepped = train_step(model, images, labels, optimizer, scaler, autocast_dtype,
                                                  (replicated, sharded), cfg.optim.grad_clip, ctx)
            step += 1
            if stepped:
                consecutive_bad = 0
                loss_sum += loss.float()
                loss_count += 1
            else:
                skipped += 1
                consecutive_bad += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step,
                            consecutive_bad)
                if consecutive_bad >= cfg.max_nonfinite:
                    raise TrainingAborted(
                        f"the loss or gradient was not finite for {consecutive_bad} steps in a row "
                        f"(last at step {step}, lr {lr:.3g}); lower --lr, set --grad-clip, or use --amp-dtype bf16")

            if step % cfg.log.every == 0 or step == last_step:  # the only .item() of the loss
                last_loss = (loss_sum / loss_count).item() if loss_count else float("nan")
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": last_loss, "lr": lr,
                          "grad_norm": float(grad_norm.item()), "skipped_steps": skipped, **speed.window(step)}
                if scaler.is_enabled():
                    record["loss_scale"] = float(scaler.get_scale())
                loss_sum, loss_count = torch.zeros((), device=ctx.device), 0
                if metrics is not None:
                    metrics.write(record)
                    if progress is not None:
                        progress({**record, "total_steps": last_step})

            t0 = time.perf_counter()
            metric = None
            if has_eval and ((cfg.eval.every and step % cfg.eval.every == 0) or step == last_step
                             or (cfg.eval.at_epoch_end and step % steps_per_epoch == 0)):
                metric = run_verification()
                best = manager.best_metric() if ctx.is_main else None
                improved = metric == metric and (best is None or metric > best)  # NaN: no sets scored
                metric = metric if _broadcast_float(1.0 if improved else 0.0, ctx) > 0 else None
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == last_step or metric is not None:
                checkpoint(metric)
            speed.exclude(time.perf_counter() - t0)
        del batches

    if metrics is not None:
        metrics.close()
    return TrainResult(run_dir=str(run_dir), steps=step, start_step=start_step, skipped_steps=skipped,
                       final_loss=last_loss, verification=last_verification, **speed.overall())
