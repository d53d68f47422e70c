"""``lresnet bench model``: forward+backward images/s of a backbone, settings against a baseline.

Every setting (dtype, memory format) gets its own copy of one randomly initialised model and
the same input; the settings are measured step by step in alternation, so that noise from a
shared machine hits all of them alike, and each reports the median step.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from lresnet.core.device import resolve_device, synchronize
from lresnet.core.errors import InputError
from lresnet.model.registry import create_backbone

DTYPES = ("fp32", "bf16")  # bf16 runs under autocast; the weights stay fp32


@dataclass(frozen=True)
class BenchSetting:
    """One way to run the backbone: compute dtype and memory format."""

    dtype: str = "fp32"
    channels_last: bool = False

    @property
    def label(self) -> str:
        return f"{self.dtype} {'channels_last' if self.channels_last else 'NCHW'}"


BASELINE = BenchSetting("fp32", channels_last=False)


@dataclass(frozen=True)
class BenchResult:
    """One setting of ``lresnet bench model``: median forward+backward throughput."""

    setting: str
    images_per_s: float
    ms_per_step: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_settings(dtype: str = "fp32", channels_last: bool = True) -> list[BenchSetting]:
    """The baseline (fp32, contiguous NCHW), then the chosen setting unless it is the baseline."""
    chosen = BenchSetting(getattr(dtype, "value", dtype), channels_last)  # an Enum choice or its value
    return [BASELINE] if chosen == BASELINE else [BASELINE, chosen]


def bench_settings(name: str, settings: Sequence[BenchSetting], batch_size: int = 8, steps: int = 5,
                   warmup: int = 1, device: str = "cpu", seed: int = 0) -> list[BenchResult]:
    """Median images/s of forward+backward (train mode) for each setting, measured in alternation.

    Args:
        name: a registered backbone.
        settings: what to measure; results come back in the same order (the first is usually
            :data:`BASELINE`, the one ratios are taken against).
        steps, warmup: measured and unmeasured steps per setting.

    Raises:
        InputError: unknown backbone, device or dtype, or counts below 1 (warmup below 0).
    """
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise InputError("--batch-size/--steps/--warmup", f"got {batch_size}/{steps}/{warmup}, "
                                                          "expected >= 1/>= 1/>= 0")
    for setting in settings:
        if setting.dtype not in DTYPES:
            raise InputError("--dtype", f"got {setting.dtype!r}, expected one of {', '.join(DTYPES)}")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    base_model = create_backbone(name).to(dev).train()
    images = torch.randn(batch_size, 3, 112, 112, device=dev)
    runs = []
    for setting in settings:
        fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
        runs.append((copy.deepcopy(base_model).to(memory_format=fmt), images.contiguous(memory_format=fmt),
                     setting.dtype == "bf16"))
    times: list[list[float]] = [[] for _ in settings]
    for step in range(warmup + steps):
        for i, (model, x, bf16) in enumerate(runs):
            synchronize(dev)
            start = time.perf_counter()
            _train_step(model, x, bf16)
            synchronize(dev)
            if step >= warmup:
                times[i].append(time.perf_counter() - start)
    results = []
    for setting, t in zip(settings, times):
        median = statistics.median(t)
        label = setting.label + (" (baseline)" if setting == BASELINE else "")
        results.append(BenchResult(label, batch_size / median, 1000 * median))
    return results


@dataclass(frozen=True)
class BenchReport:
    """``lresnet bench model``'s result; ``as_dict()`` is its ``--json`` document."""

    name: str
    batch_size: int
    device: str
    steps: int
    threads: int
    results: list[BenchResult]

    def as_dict(self) -> dict[str, Any]:
        base = self.results[0].images_per_s
        return {"name": self.name, "batch_size": self.batch_size, "device": self.device, "steps": self.steps,
                "threads": self.threads,
                "results": [dict(r.as_dict(), ratio=r.images_per_s / base) for r in self.results]}


def bench_model(name: str, settings: Sequence[BenchSetting], batch_size: int = 8, steps: int = 5,
                warmup: int = 1, device: str = "cpu", threads: int = 0, seed: int = 0) -> BenchReport:
    """:func:`bench_settings` with ``threads`` CPU threads for torch (0: torch's default); the
    previous thread count is restored afterwards."""
    if threads < 0:
        raise InputError("--threads", f"got {threads}, expected >= 0 (0: torch's default)")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        used = torch.get_num_threads()
        results = bench_settings(name, settings, batch_size, steps, warmup, device, seed)
    finally:
        torch.set_num_threads(previous)
    return BenchReport(name, batch_size, device, steps, used, results)


def bench_forward_backward(name: str, batch_size: int = 8, dtype: str = "fp32", channels_last: bool = True,
                           steps: int = 5, warmup: int = 1, device: str = "cpu", seed: int = 0
                           ) -> list[BenchResult]:
    """The baseline (fp32, contiguous NCHW) and the chosen setting (:func:`bench_settings`).

    Returns the baseline first; a single result when the chosen setting is the baseline.
    """
    return bench_settings(name, default_settings(dtype, channels_last), batch_size, steps, warmup, device, seed)


def _train_step(model: nn.Module, images: torch.Tensor, bf16: bool) -> None:
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(images)
    out.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
