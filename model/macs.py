"""Parameter and multiply-accumulate counts, measured by running the model once.

MACs are counted the way the face-recognition literature counts them (IR-100: 12.1 G at
112x112): convolutions and linear layers only, one MAC per weight use per output element.
Normalisation, activations, pooling and additions are counted separately as elementwise ops
(:func:`profile_macs`), not in the total.

Runs on any device, including ``meta``: build a model under ``torch.device("meta")`` to size
a 100-layer network in milliseconds without allocating its weights.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

_ELEMENTWISE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU, nn.ReLU, nn.Sigmoid, nn.MaxPool2d,
                nn.AdaptiveAvgPool2d, nn.Dropout)


@dataclass
class MacProfile:
    """Counts for one forward pass of a single sample.

    Attributes:
        macs: conv + linear multiply-accumulates (the literature's figure).
        by_type: MACs per layer type name (``Conv2d``, ``Linear``).
        elementwise: output elements produced by norm/activation/pooling layers, per type name.
    """

    macs: int = 0
    by_type: Counter = field(default_factory=Counter)
    elementwise: Counter = field(default_factory=Counter)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all of them, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _conv_macs(module: nn.Conv2d, output: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    return output.numel() * (module.in_channels // module.groups) * kh * kw


def _linear_macs(module: nn.Linear, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


def profile_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 112, 112)) -> MacProfile:
    """Run ``model`` once on zeros of ``input_size`` (eval mode, no grad) and count.

    Counts are divided by the batch size (``input_size[0]``), so they are per sample.
    The model's training mode is restored afterwards.
    """
    profile = MacProfile()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    def hook(module: nn.Module, _inputs, output) -> None:
        name = type(module).__name__
        if isinstance(module, nn.Conv2d):
            n = _conv_macs(module, output)
        elif isinstance(module, nn.Linear):
            n = _linear_macs(module, output)
        else:
            profile.elementwise[name] += output.numel()
            return
        profile.by_type[name] += n
        profile.macs += n

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear) + _ELEMENTWISE)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(tuple(input_size), device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    batch = int(input_size[0])
    profile.macs //= batch
    for counter in (profile.by_type, profile.elementwise):
        for key in counter:
            counter[key] //= batch
    return profile


def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 112, 112)) -> int:
    """Conv + linear multiply-accumulates for one sample of ``input_size``."""
    return profile_macs(model, input_size).macs
