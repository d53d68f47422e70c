"""Learning rate as a pure function of the step, and the optimizer's parameter groups.

The reference trains 20 epochs with SGD (momentum 0.9, lr 0.1) and divides the
rate by 10 at epochs 12, 15 and 18; weight decay 5e-4 applies to conv/linear
weights and the head's class centres, not to BatchNorm, PReLU or biases.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from lresnet.train.config import OptimConfig, ScheduleConfig

SCHEDULE_KINDS = ("multistep", "poly", "cosine", "constant")


@dataclass(frozen=True)
class LRSchedule:
    """A learning-rate schedule resolved to steps. ``schedule(step)`` is the rate for that step (0-based)."""

    base_lr: float
    kind: str
    total_steps: int
    warmup_steps: int = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    power: float = 2.0
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # linear ramp that reaches base_lr on the first step after warmup
            return self.base_lr * (step + 1) / (self.warmup_steps + 1)
        if self.kind == "multistep":
            passed = sum(1 for m in self.milestones if step >= m)
            return self.base_lr * self.gamma ** passed
        if self.kind == "constant":
            return self.base_lr
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "poly":
            return self.min_lr + (self.base_lr - self.min_lr) * (1.0 - progress) ** self.power
        if self.kind == "cosine":
            return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown schedule kind {self.kind!r}")

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for the checkpoint and the metrics log)."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


def scaled_lr(optim: OptimConfig, global_batch: int) -> float:
    """The base rate, linearly scaled with the global batch when ``optim.scale_lr`` is on."""
    if optim.scale_lr:
        return optim.lr * global_batch / optim.base_batch
    return optim.lr


def total_steps(schedule: ScheduleConfig, steps_per_epoch: int) -> int:
    """Steps in the whole run: ``max_steps`` when set, else ``epochs * steps_per_epoch``."""
    return schedule.max_steps if schedule.max_steps > 0 else schedule.epochs * steps_per_epoch


def build_schedule(schedule: ScheduleConfig, optim: OptimConfig, steps_per_epoch: int,
                   global_batch: int) -> LRSchedule:
    """Resolve epochs to steps: milestones and warmup in epochs become step counts."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return LRSchedule(
        base_lr=scaled_lr(optim, global_batch),
        kind=schedule.kind,
        total_steps=total_steps(schedule, steps_per_epoch),
        warmup_steps=int(round(schedule.warmup_epochs * steps_per_epoch)),
        milestones=tuple(int(round(m * steps_per_epoch)) for m in schedule.milestones),
        gamma=schedule.gamma,
        power=schedule.power,
        min_lr=schedule.min_lr,
    )


_DECAYED_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def param_groups(backbone: nn.Module, head: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """Split parameters into a decayed and a non-decayed group.

    Decayed: the ``weight`` of every conv/linear layer of the backbone, and (with
    ``optim.decay_head``) every head parameter, i.e. the class centres. Not decayed:
    BatchNorm, PReLU, biases, unless ``optim.decay_norm_and_bias``. Every trainable
    parameter lands in exactly one group; empty groups are dropped.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in backbone.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_weight = isinstance(module, _DECAYED_MODULES) and name == "weight"
            (decay if is_weight or optim.decay_norm_and_bias else no_decay).append(p)
    for p in head.parameters():
        if p.requires_grad:
            (decay if optim.decay_head else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: Iterable[dict[str, Any]], optim: OptimConfig, lr: float,
                    device: Optional[torch.device] = None) -> torch.optim.SGD:
    """SGD with momentum over `groups` (see :func:`param_groups`).

    Fused (one kernel for all parameters, and a device-side skip through ``found_inf``) where torch
    has a fused SGD for the device, else torch's default (foreach on accelerators).
    """
    groups = list(groups)
    fused = device is not None and fused_sgd_supported(device)
    return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov,
                           **({"fused": True} if fused else {}))


def fused_sgd_supported(device: torch.device) -> bool:
    """Whether this torch has a fused SGD kernel for `device` (checked on a one-element tensor)."""
    probe = torch.zeros(1, device=device, requires_grad=True)
    try:
        opt = torch.optim.SGD([probe], lr=0.0, momentum=0.9, fused=True)
        probe.grad = torch.zeros_like(probe)
        opt.step()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write the step's rate into every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
