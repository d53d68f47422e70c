"""``lresnet bench model``: forward+backward images/s of a backbone, settings against a baseline.

Every setting (dtype, memory format, torch.compile) gets its own copy of one randomly
initialised model and the same input; the settings are measured step by step in alternation,
so that noise from a shared machine hits all of them alike, and each reports the median step.

Model FLOPs utilisation (MFU) puts a setting's rate against what the device does on the work
that bounds it: a training step costs about 3 x 2 x MACs per image (forward, and a backward of
twice the forward's work; 2 FLOPs per multiply-accumulate), and the reference rate is a large
square bf16 matrix product timed in the same run on the same device.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from lresnet.core.device import resolve_device, synchronize
from lresnet.core.errors import InputError
from lresnet.model.config import COMPILE_MODES
from lresnet.model.macs import count_macs
from lresnet.model.registry import create_backbone

DTYPES = ("fp32", "bf16")  # bf16 runs under autocast; the weights stay fp32
# side of the square bf16 matrix product whose rate MFU is measured against: big enough to reach
# an accelerator's peak, small enough to take well under a second on a 2-core CPU
MATMUL_SIZE = {"cpu": 1024, "cuda": 8192, "npu": 8192}


@dataclass(frozen=True)
class BenchSetting:
    """One way to run the backbone: compute dtype, memory format, and whether torch.compile wraps it."""

    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"

    @property
    def label(self) -> str:
        text = f"{self.dtype} {'channels_last' if self.channels_last else 'NCHW'}"
        if self.compile:
            text += " + compile" + ("" if self.compile_mode == "default" else f" ({self.compile_mode})")
        return text


BASELINE = BenchSetting("fp32", channels_last=False)


@dataclass(frozen=True)
class BenchResult:
    """One setting at one batch size: median forward+backward throughput.

    ``first_step_s`` is the first (unmeasured) step, which holds torch.compile's compilation;
    ``tflops`` is the model FLOP rate (3 x 2 x MACs per image x images/s) and ``mfu`` that rate
    over the measured bf16 matrix-product rate (None when no MAC count or rate is known).
    """

    setting: str
    images_per_s: float
    ms_per_step: float
    batch_size: int = 0
    first_step_s: float = 0.0
    tflops: Optional[float] = None
    mfu: Optional[float] = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MatmulRate:
    """A square ``size`` x ``size`` matrix product in ``dtype``: the median of ``reps`` timed products."""

    size: int
    dtype: str
    tflops: float
    reps: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_settings(dtype: str = "fp32", channels_last: bool = True, compile: bool = False,
                     compile_mode: str = "default") -> list[BenchSetting]:
    """The baseline (fp32, contiguous NCHW), then the chosen setting unless it is the baseline, then
    the chosen setting under torch.compile when `compile`."""
    chosen = BenchSetting(getattr(dtype, "value", dtype), channels_last)  # an Enum choice or its value
    settings = [BASELINE] if chosen == BASELINE else [BASELINE, chosen]
    if compile:
        settings.append(BenchSetting(chosen.dtype, chosen.channels_last, True, compile_mode))
    return settings


def parse_batch_sizes(items: Iterable[Union[str, int]], option: str = "--batch-size") -> list[int]:
    """``["128,256", "512"]`` -> ``[128, 256, 512]``: repeated and comma-separated values, in order.

    Raises:
        InputError: a value that is not an integer >= 1, or none at all.
    """
    sizes: list[int] = []
    for item in items:
        for part in str(item).split(","):
            text = part.strip()
            if not text.isdigit() or int(text) < 1:
                raise InputError(option, f"got {text!r}, expected integers >= 1 (repeat the option or separate "
                                         "them with commas)")
            sizes.append(int(text))
    if not sizes:
        raise InputError(option, "got no value, expected at least one batch size")
    return sizes


def measure_matmul(device: Union[str, torch.device] = "cpu", size: int = 0, reps: int = 10,
                   warmup: int = 2) -> MatmulRate:
    """The bf16 rate of a square matrix product on `device`, timed with the device's synchronize.

    Args:
        size: the matrix side; 0: :data:`MATMUL_SIZE` for the device kind.
        reps: timed products (the median is reported); ``warmup`` untimed ones first.
    """
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    n = size or MATMUL_SIZE.get(dev.type, 4096)
    if n < 1 or reps < 1 or warmup < 0:
        raise InputError("--matmul-size", f"got size {n}, reps {reps}, warmup {warmup}, expected >= 1, >= 1, >= 0")
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=generator).to(dev, torch.bfloat16) for _ in range(2))
    times = []
    for i in range(warmup + reps):
        synchronize(dev)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return MatmulRate(n, "bf16", 2 * n ** 3 / statistics.median(times) / 1e12, reps)


def compile_unavailable(device: Union[str, torch.device] = "cpu") -> Optional[str]:
    """Why torch.compile cannot run on `device` here (e.g. no C++ compiler for the CPU), or None when it can.

    Compiles and runs a two-op function once (a few seconds on a cold cache).
    """
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    try:
        torch.compile(lambda x: torch.relu(x) * 2, dynamic=False)(torch.ones(4, device=dev))
    except RuntimeError as err:  # dynamo's and inductor's failures (a missing compiler, an unsupported Python)
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


def _prepare(base_model: nn.Module, images: torch.Tensor, setting: BenchSetting) -> tuple[nn.Module, torch.Tensor]:
    fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
    model: nn.Module = copy.deepcopy(base_model).to(memory_format=fmt)
    if setting.compile:
        # static shapes: each batch size gets its own kernels, as a training run at that size would
        model = torch.compile(model, mode=setting.compile_mode, dynamic=False)
    return model, images.contiguous(memory_format=fmt)


def _check_settings(settings: Sequence[BenchSetting]) -> None:
    for setting in settings:
        if setting.dtype not in DTYPES:
            raise InputError("--dtype", f"got {setting.dtype!r}, expected one of {', '.join(DTYPES)}")
        if setting.compile_mode not in COMPILE_MODES:
            raise InputError("--compile-mode", f"got {setting.compile_mode!r}, expected one of "
                                               f"{', '.join(COMPILE_MODES)}")


def bench_settings(name: str, settings: Sequence[BenchSetting], batch_size: int = 8, steps: int = 5,
                   warmup: int = 1, device: str = "cpu", seed: int = 0, options: Optional[dict[str, Any]] = None,
                   macs_per_image: int = 0, matmul_tflops: float = 0.0) -> list[BenchResult]:
    """Median images/s of forward+backward (train mode) for each setting, measured in alternation.

    Args:
        name: a registered backbone; ``options`` are extra keyword arguments for it.
        settings: what to measure; results come back in the same order (the first is usually
            :data:`BASELINE`, the one ratios are taken against).
        steps, warmup: measured and unmeasured steps per setting (a compiled setting compiles
            in its first step: give it ``warmup >= 1``).
        macs_per_image, matmul_tflops: when both are given, each result carries its model FLOP
            rate and MFU.

    Raises:
        InputError: unknown backbone, device, dtype or compile mode, or counts below 1 (warmup below 0).
    """
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise InputError("--batch-size/--steps/--warmup", f"got {batch_size}/{steps}/{warmup}, "
                                                          "expected >= 1/>= 1/>= 0")
    _check_settings(settings)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    base_model = create_backbone(name, **(options or {})).to(dev).train()
    images = torch.randn(batch_size, 3, 112, 112, device=dev)
    runs = [_prepare(base_model, images, setting) + (setting.dtype == "bf16",) for setting in settings]
    del base_model
    times: list[list[float]] = [[] for _ in settings]
    first: list[float] = [0.0 for _ in settings]
    for step in range(warmup + steps):
        for i, (model, x, bf16) in enumerate(runs):
            synchronize(dev)
            start = time.perf_counter()
            _train_step(model, x, bf16)
            synchronize(dev)
            elapsed = time.perf_counter() - start
            if step == 0:
                first[i] = elapsed
            if step >= warmup:
                times[i].append(elapsed)
    results = []
    for setting, t, first_s in zip(settings, times, first):
        median = statistics.median(t)
        rate = batch_size / median
        tflops = 6 * macs_per_image * rate / 1e12 if macs_per_image else None
        mfu = tflops / matmul_tflops if tflops is not None and matmul_tflops > 0 else None
        label = setting.label + (" (baseline)" if setting == BASELINE else "")
        results.append(BenchResult(label, rate, 1000 * median, batch_size, first_s, tflops, mfu))
    return results


@dataclass(frozen=True)
class BenchReport:
    """``lresnet bench model``'s result; ``as_dict()`` is its ``--json`` document.

    ``results`` holds every setting at every batch size, batch size by batch size; each row's
    ``ratio`` is taken against the first setting at the same batch size.
    """

    name: str
    batch_sizes: list[int]
    device: str
    steps: int
    threads: int
    results: list[BenchResult]
    macs_per_image: int = 0
    matmul: Optional[MatmulRate] = None
    options: Optional[dict[str, Any]] = None

    def as_dict(self) -> dict[str, Any]:
        base: dict[int, float] = {}
        rows = []
        for r in self.results:
            base.setdefault(r.batch_size, r.images_per_s)
            rows.append(dict(r.as_dict(), ratio=r.images_per_s / base[r.batch_size]))
        return {"name": self.name, "options": self.options or {}, "batch_sizes": self.batch_sizes,
                "device": self.device, "steps": self.steps, "threads": self.threads,
                "macs_per_image": self.macs_per_image, "model_flops_per_image": 6 * self.macs_per_image,
                "matmul": self.matmul.as_dict() if self.matmul else None, "results": rows}


def model_macs(name: str, options: Optional[dict[str, Any]] = None) -> int:
    """Conv + linear MACs of one 112x112 image, counted on the meta device (no weights allocated)."""
    with torch.device("meta"):
        model = create_backbone(name, **(options or {}))
    return count_macs(model)


def bench_model(name: str, settings: Sequence[BenchSetting], batch_sizes: Union[int, Sequence[int]] = 8,
                steps: int = 5, warmup: int = 1, device: str = "cpu", threads: int = 0, seed: int = 0,
                options: Optional[dict[str, Any]] = None, matmul_size: int = 0, mfu: bool = True) -> BenchReport:
    """:func:`bench_settings` at each batch size, with ``threads`` CPU threads for torch (0: torch's
    default; the previous thread count is restored afterwards), and MFU against a bf16 matrix
    product measured first (``matmul_size`` 0: the device's default; ``mfu=False`` skips it)."""
    if threads < 0:
        raise InputError("--threads", f"got {threads}, expected >= 0 (0: torch's default)")
    sizes = [batch_sizes] if isinstance(batch_sizes, int) else list(batch_sizes)
    if not sizes:
        raise InputError("--batch-size", "got no value, expected at least one batch size")
    _check_settings(settings)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        used = torch.get_num_threads()
        macs = model_macs(name, options)
        rate = measure_matmul(device, matmul_size) if mfu else None
        results = [r for size in sizes
                   for r in bench_settings(name, settings, size, steps, warmup, device, seed, options, macs,
                                           rate.tflops if rate else 0.0)]
    finally:
        torch.set_num_threads(previous)
    return BenchReport(name, sizes, device, steps, used, results, macs, rate, options)


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
