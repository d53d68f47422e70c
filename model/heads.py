"""Margin-based softmax heads: ArcFace, CosFace, the combined (m1, m2, m3) margin, and the replicated FC head.

A *margin* turns cosine similarities between embeddings and class centres into logits: every entry is scaled
by ``s`` and the entry of each row's own class gets a margin. Rows labelled ``-1`` get no margin (plain
``s * cos``) and are ignored by the loss. Margin math always runs in fp32 (fp64 when given fp64), also
under autocast: the margin is a small change to a number close to 1 and bf16 would round it away.

The sharded, model-parallel head (Partial FC) lives in :mod:`lresnet.model.partial_fc`, together with
``create_head``; both heads share this module's margins, label rules and checkpoint format.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Margin",
    "ArcFace",
    "CosFace",
    "CombinedMargin",
    "FCHead",
    "check_full_weight",
    "check_labels",
    "compute_dtype",
    "normalized_cosine",
]


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the head math runs in: fp32, or fp64 when any input is fp64 (bf16/fp16 are promoted)."""
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError unless every label is ``-1`` or a class id in ``[0, num_classes)``.

    A wrong label would otherwise silently corrupt the sharded loss or trip a device-side assert far from its
    cause. On the CPU the check is immediate; on an accelerator it is an asynchronous device-side assert, so
    the training step never waits for a read-back (it then fails at the next sync with the same message).
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    bad = (labels < -1) | (labels >= num_classes)
    if labels.device.type != "cpu":
        torch._assert_async(~bad.any(), f"label out of range: expected -1 (ignored) or a class id in [0, {num_classes})")
        return
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(f"label {first} out of range: expected -1 (ignored) or a class id in [0, {num_classes})")


def normalized_cosine(embeddings: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[B, C]`` between L2-normalised embeddings ``[B, D]`` and centres ``[C, D]``.

    Runs in :func:`compute_dtype` with autocast disabled. Not clamped: rounding may leave an entry a few ulps
    outside [-1, 1], which only matters to the margin's ``acos`` (clamped there, on the B target entries),
    and a full clamp would keep another ``[B, C]`` tensor alive for the backward.
    """
    dtype = compute_dtype(embeddings.dtype, centres.dtype)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        e = F.normalize(embeddings.to(dtype), dim=1)
        w = F.normalize(centres.to(dtype), dim=1)
        return e @ w.t()


def _validate_scale(s: float) -> None:
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale s must be a positive finite number, got {s}")


class Margin(ABC):
    """Base class of the margins: ``margin(cosine [B, C], labels int64 [B]) -> logits [B, C]``.

    Subclasses define :meth:`target_logit`, the margin-adjusted cosine of the target class (before scaling).
    The call is autograd-friendly, out-of-place, and needs no device sync.
    """

    s: float

    @abstractmethod
    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        """Margin-adjusted cosine for target entries (1-D tensor in, same shape out)."""

    def __call__(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if cosine.dim() != 2 or labels.shape != cosine.shape[:1]:
            raise ValueError(
                f"expected cosine [B, C] and labels [B], got {tuple(cosine.shape)} and {tuple(labels.shape)}"
            )
        with torch.autocast(device_type=cosine.device.type, enabled=False):
            cosine = cosine.to(compute_dtype(cosine.dtype))
            valid = labels != -1
            # Rows labelled -1 read (and write back unchanged) column 0, so nothing needs a nonzero() sync.
            cols = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
            target = cosine.gather(1, cols).squeeze(1)
            target = torch.where(valid, self.target_logit(target), target)
            return (cosine * self.s).scatter(1, cols, (target * self.s).unsqueeze(1))


def _angular_target(cosine: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """``cos(m1*theta + m2) - m3`` with the fallback past the monotonic range (see CombinedMargin)."""
    eps = torch.finfo(cosine.dtype).eps
    # Clamped away from +-1 so acos has a finite derivative (torch.where would turn inf * 0 into nan).
    theta = torch.acos(cosine.clamp(-1.0 + eps, 1.0 - eps))
    main = torch.cos(m1 * theta + m2) - m3
    theta_max = (math.pi - m2) / m1
    if theta_max >= math.pi:
        return main
    threshold = math.cos(theta_max)
    penalty = (math.pi - theta_max) * math.sin(theta_max) + m3
    return torch.where(cosine > threshold, main, cosine - penalty)


@dataclass(frozen=True)
class CombinedMargin(Margin):
    """InsightFace's combined margin: target logit ``s * (cos(m1*theta + m2) - m3)``.

    ``m1=1, m2=0.5, m3=0`` is ArcFace, ``m1=1, m2=0, m3=0.35`` is CosFace, ``m1>1`` is SphereFace-like.
    ``cos(m1*theta + m2)`` stops decreasing where ``m1*theta + m2`` reaches pi, i.e. past
    ``theta* = (pi - m2) / m1``; for ``cos(theta) <= th = cos(theta*)`` the target logit falls back to the
    CosFace-like ``cos(theta) - ((pi - theta*) * sin(theta*) + m3)``: the first-order expansion of the margin
    frozen at ``theta*``. With ``m1 = 1, m3 = 0`` this is exactly ArcFace's ``cos(theta) - m*sin(m)`` below
    ``cos(pi - m)``. When ``m1*pi + m2 <= pi`` there is no fallback region.
    """

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0

    def __post_init__(self) -> None:
        _validate_scale(self.s)
        if not self.m1 > 0:
            raise ValueError(f"m1 must be > 0, got {self.m1}")
        if not 0 <= self.m2 < math.pi:
            raise ValueError(f"m2 must be in [0, pi), got {self.m2}")
        if not math.isfinite(self.m3):
            raise ValueError(f"m3 must be finite, got {self.m3}")

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        return _angular_target(cosine, self.m1, self.m2, self.m3)


@dataclass(frozen=True)
class ArcFace(Margin):
    """Additive angular margin: target logit ``s * cos(theta + m)``.

    Where ``theta + m > pi`` (``cos(theta) <= th = cos(pi - m)``) the target logit is ``s * (cos(theta) -
    m*sin(m))`` instead, the standard non-"easy-margin" fallback that keeps it decreasing in theta.
    """

    s: float = 64.0
    m: float = 0.5

    def __post_init__(self) -> None:
        _validate_scale(self.s)
        if not 0 <= self.m < math.pi:
            raise ValueError(f"ArcFace margin m must be in [0, pi), got {self.m}")

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        return _angular_target(cosine, 1.0, self.m, 0.0)


@dataclass(frozen=True)
class CosFace(Margin):
    """Additive cosine margin: target logit ``s * (cos(theta) - m)``."""

    s: float = 64.0
    m: float = 0.4

    def __post_init__(self) -> None:
        _validate_scale(self.s)
        if not math.isfinite(self.m):
            raise ValueError(f"CosFace margin m must be finite, got {self.m}")

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine - self.m


def margin_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows whose label is not -1 (0, with zero gradient, when there are none)."""
    total = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum")
    return total / (labels != -1).sum().clamp_min(1).to(total.dtype)


class FCHead(nn.Module):
    """Single-device / replicated margin head: class centres ``weight [num_classes, embedding_size]``.

    ``forward(embeddings [B, D], labels int64 [B]) -> loss``: L2-normalised embeddings and centres, cosine
    logits and margin in fp32 (autocast is switched off inside), then the mean cross-entropy over rows whose
    label is not -1. Centres start as normal(0, 0.01).

    Distributed training: this head is *replicated*. Wrap it in DistributedDataParallel together with the
    backbone (one DDP around a module holding both, or a DDP of its own) so its gradients are averaged
    across ranks like the backbone's; a head left out of DDP silently drifts apart on every rank. For many
    classes or many ranks use :class:`lresnet.model.partial_fc.PartialFC`, which shards the centres instead.

    Checkpoints: :meth:`full_state_dict` / :meth:`load_full_state_dict` use the same ``{"weight": [C, D]}``
    format as PartialFC, so either head can resume from the other.
    """

    def __init__(self, margin: Margin, embedding_size: int, num_classes: int) -> None:
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(
                f"embedding_size and num_classes must be >= 1, got {embedding_size} and {num_classes}"
            )
        if not isinstance(margin, Margin):
            raise TypeError(f"margin must be an ArcFace, CosFace or CombinedMargin, got {type(margin).__name__}")
        self.margin = margin
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Margin logits ``[B, num_classes]`` (fp32, or fp64 for fp64 inputs)."""
        return self.margin(normalized_cosine(embeddings, self.weight), labels)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scalar loss: mean margin cross-entropy over the rows with label != -1."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"expected embeddings [B, {self.embedding_size}], got {tuple(embeddings.shape)}"
            )
        labels = labels.to(device=embeddings.device)
        check_labels(labels, self.num_classes)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return margin_cross_entropy(self.logits(embeddings, labels), labels)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"weight": [num_classes, D]}`` on the CPU (a copy)."""
        return {"weight": self.weight.detach().cpu().clone()}

    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load ``{"weight": [num_classes, D]}`` as written by either head's :meth:`full_state_dict`."""
        weight = check_full_weight(state_dict, self.num_classes, self.embedding_size)
        with torch.no_grad():
            self.weight.copy_(weight)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, embedding_size={self.embedding_size}, num_classes={self.num_classes}"


def check_full_weight(state_dict: dict[str, torch.Tensor], num_classes: int, embedding_size: int) -> torch.Tensor:
    if "weight" not in state_dict:
        raise ValueError(f"head state dict has no 'weight' entry (keys: {sorted(state_dict)})")
    weight = state_dict["weight"]
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (num_classes, embedding_size):
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"head weight has shape {shape}, expected ({num_classes}, {embedding_size})")
    return weight
