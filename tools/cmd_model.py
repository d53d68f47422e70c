"""CLI: lresnet model-info, bench model.

torch and lresnet.model are imported inside the commands, so that the other
commands of the CLI start without loading torch.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.table import Table

from lresnet.core.device import resolve_device, synchronize
from lresnet.core.errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class UnitStyle(str, Enum):
    paper = "paper"
    treb1en = "treb1en"


@dataclass(frozen=True)
class ModelInfo:
    """What ``lresnet model-info`` reports for one backbone."""

    name: str
    architecture: str
    unit_style: Optional[str]
    se: bool
    parameters: int
    trainable_parameters: int
    macs: int
    embedding_size: int
    input_size: int
    output_block: str


def describe_backbone(name: str, input_size: int = 112, **kwargs) -> ModelInfo:
    """Build ``name`` on the meta device (no weights allocated) and count parameters and MACs."""
    import torch

    from lresnet.model import count_parameters, create_backbone, profile_macs

    try:
        with torch.device("meta"):
            model = create_backbone(name, input_size=input_size, **kwargs)
    except TypeError as err:  # an option this family does not have, e.g. unit_style for MobileFaceNet
        raise InputError(name, f"bad backbone option: {err}") from None
    profile = profile_macs(model, (1, 3, input_size, input_size))
    return ModelInfo(
        name=name,
        architecture=type(model).__name__ + (f"-{model.depth}" if hasattr(model, "depth") else ""),
        unit_style=getattr(model, "unit_style", None),
        se=bool(getattr(model, "se", False)),
        parameters=count_parameters(model),
        trainable_parameters=count_parameters(model, trainable_only=True),
        macs=profile.macs,
        embedding_size=model.embedding_size,
        input_size=input_size,
        output_block=_output_block(model),
    )


_UNIT_STYLES = {
    "paper": "BN-conv3x3-BN-PReLU-conv3x3(stride)-BN, 1x1 conv+BN shortcut in each stage's first unit",
    "treb1en": "BN-conv3x3-PReLU-conv3x3(stride)-BN, MaxPool2d(1, stride) shortcut where channels stay",
}


def _output_block(model: nn.Module) -> str:
    from lresnet.model import IResNet

    fc = getattr(getattr(model, "head", model), "fc", None)
    if isinstance(model, IResNet) and fc is not None:
        return f"E: BN2d-Dropout-Flatten-Linear({fc.in_features}->{fc.out_features})-BN1d"
    if fc is not None:
        return f"GDC: depthwise conv-BN-Flatten-Dropout-Linear({fc.in_features}->{fc.out_features})-BN1d"
    return "-"


def _detail_table(info: ModelInfo) -> Table:
    table = Table(title=f"{info.name} at {info.input_size}x{info.input_size}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    unit = info.unit_style or "-"
    if info.unit_style:
        unit = f"{info.unit_style} ({_UNIT_STYLES[info.unit_style]})"
    rows = [
        ("architecture", info.architecture + (" with squeeze-excitation" if info.se else "")),
        ("unit style", unit),
        ("output block", info.output_block),
        ("parameters", f"{info.parameters:,} ({info.parameters / 1e6:.2f} M; trainable {info.trainable_parameters:,})"),
        ("MACs", f"{info.macs:,} ({info.macs / 1e9:.2f} G, conv + linear, one image)"),
        ("embedding size", str(info.embedding_size)),
    ]
    for row in rows:
        table.add_row(*row)
    return table


@dataclass(frozen=True)
class BenchResult:
    """One setting of ``lresnet bench model``: median forward+backward throughput."""

    setting: str
    images_per_s: float
    ms_per_step: float


def _train_step(model: nn.Module, images: torch.Tensor, dtype: DType) -> None:
    import torch

    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=dtype is DType.bf16):
        out = model(images)
    out.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)


def bench_forward_backward(name: str, batch_size: int = 8, dtype: DType = DType.fp32,
                           channels_last: bool = True, steps: int = 5, warmup: int = 1,
                           device: str = "cpu", seed: int = 0) -> list[BenchResult]:
    """Images/s of forward+backward (train mode) for the baseline (fp32, contiguous NCHW) and the
    chosen setting, measured step by step in alternation so that machine noise hits both alike.

    Returns the baseline first; a single result when the chosen setting is the baseline.
    """
    import torch

    from lresnet.model import create_backbone

    dev = resolve_device(device)
    torch.manual_seed(seed)
    base_model = create_backbone(name).to(dev).train()
    images = torch.randn(batch_size, 3, 112, 112, device=dev)
    settings = [("fp32 NCHW (baseline)", base_model, images, DType.fp32)]
    if dtype is not DType.fp32 or channels_last:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = copy.deepcopy(base_model).to(memory_format=fmt)
        label = f"{dtype.value} {'channels_last' if channels_last else 'NCHW'}"
        settings.append((label, model, images.contiguous(memory_format=fmt), dtype))
    times: list[list[float]] = [[] for _ in settings]
    for step in range(warmup + steps):
        for i, (_, model, x, dt) in enumerate(settings):
            synchronize(dev)
            start = time.perf_counter()
            _train_step(model, x, dt)
            synchronize(dev)
            if step >= warmup:
                times[i].append(time.perf_counter() - start)
    results = []
    for (label, *_), t in zip(settings, times):
        median = statistics.median(t)
        results.append(BenchResult(label, batch_size / median, 1000 * median))
    return results


def _weights_info(path: Path, name: Optional[str], as_json: bool) -> None:
    from lresnet.model import describe_state_dict, read_state_dict

    if name is not None:
        raise InputError("--weights", f"give a backbone NAME or --weights, not both (got {name!r} and {path})")
    state_dict = read_state_dict(path)
    try:
        spec = describe_state_dict(state_dict)
    except InputError as err:
        raise InputError(path, err.message) from None
    row = {"file": str(path), "source": spec.source, "channel_order": spec.channel_order,
           "l2_normalized": spec.l2_normalized, "units": list(spec.units), "se": spec.se,
           "unit_style": spec.unit_style, "embedding_size": spec.embedding_size, "load_with": spec.backbone_hint()}
    if spec.backbone_name is not None:
        info = describe_backbone(spec.backbone_name, unit_style=spec.unit_style, embedding_size=spec.embedding_size)
        row.update(backbone=spec.backbone_name, parameters=info.parameters, macs=info.macs)
    if as_json:
        typer.echo(json.dumps(row, indent=2))
        return
    table = Table(title=f"weights {path.name}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in row.items():
        table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) and not isinstance(value, bool)
                      else str(value))
    Console(width=120).print(table)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to `app` and its benchmarks to `bench`."""

    @app.command("model-info")
    def model_info(
        name: Optional[str] = typer.Argument(None, help="Backbone name; omit to list all of them."),
        embedding_size: int = typer.Option(512, help="Embedding size D."),
        unit_style: Optional[UnitStyle] = typer.Option(None, help="IR unit style (default: the variant's)."),
        weights: Optional[Path] = typer.Option(None, help="Describe this arcface_torch / TreB1eN / lresnet "
                                                          "state dict file instead of a NAME."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Parameters, MACs (conv + linear, one 112x112 image), embedding size and unit style."""
        from lresnet.model import list_backbones

        if weights is not None:
            _weights_info(weights, name, as_json)
            return
        kwargs = {"embedding_size": embedding_size}
        if unit_style is not None:
            if name is None:
                raise InputError("--unit-style", "needs a backbone name")
            kwargs["unit_style"] = unit_style.value
        names = [name] if name is not None else list_backbones()
        infos = [describe_backbone(n, **kwargs) for n in names]
        if as_json:
            typer.echo(json.dumps([asdict(i) for i in infos] if name is None else asdict(infos[0]), indent=2))
            return
        if name is not None:
            Console(width=120).print(_detail_table(infos[0]))
            return
        table = Table(title="lresnet backbones at 112x112" if name is None else f"{name}")
        for column in ("name", "architecture", "unit style", "SE", "parameters", "GMAC", "embedding"):
            table.add_column(column, justify="right" if column in ("parameters", "GMAC", "embedding") else "left")
        for i in infos:
            params = f"{i.parameters:,} ({i.parameters / 1e6:.2f} M)"
            table.add_row(i.name, i.architecture, i.unit_style or "-", "yes" if i.se else "no", params,
                          f"{i.macs / 1e9:.3f}", str(i.embedding_size))
        Console(width=120).print(table)

    @bench.command("model")
    def bench_model(
        name: str = typer.Argument(..., help="Backbone name (lresnet model-info lists them)."),
        batch_size: int = typer.Option(8, min=1, help="Images per step."),
        dtype: DType = typer.Option(DType.fp32, help="Compute dtype (bf16 through autocast)."),
        channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last",
                                           help="Model and input in channels_last memory format."),
        steps: int = typer.Option(5, min=1, help="Measured steps per setting (median reported)."),
        warmup: int = typer.Option(1, min=0, help="Unmeasured steps per setting first."),
        device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or npu."),
        threads: int = typer.Option(0, min=0, help="CPU threads for torch (0: torch's default). "
                                                   "1 gives steadier numbers on a shared machine."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Forward+backward images/s of a backbone: the chosen setting against fp32 contiguous NCHW."""
        import torch

        previous_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            used_threads = torch.get_num_threads()
            results = bench_forward_backward(name, batch_size, dtype, channels_last, steps, warmup, device)
        finally:
            torch.set_num_threads(previous_threads)
        base = results[0].images_per_s
        if as_json:
            typer.echo(json.dumps({"name": name, "batch_size": batch_size, "device": device, "steps": steps,
                                   "threads": used_threads,
                                   "results": [dict(asdict(r), ratio=r.images_per_s / base) for r in results]},
                                  indent=2))
            return
        table = Table(title=f"bench model {name}: forward+backward, batch {batch_size}, {device}, "
                            f"{used_threads} threads, median of {steps} steps")
        for column in ("setting", "images/s", "ms/step", "vs baseline"):
            table.add_column(column, justify="left" if column == "setting" else "right")
        for r in results:
            table.add_row(r.setting, f"{r.images_per_s:,.1f}", f"{r.ms_per_step:,.1f}", f"{r.images_per_s / base:.2f}x")
        Console(width=120).print(table)
