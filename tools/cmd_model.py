"""CLI: lresnet model-info, bench model.

torch and lresnet.model are imported inside the commands, so that the other
commands of the CLI start without loading torch.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lresnet.core.errors import InputError
from lresnet.tools.render import key_value_table, out_console, print_json


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class UnitStyle(str, Enum):
    paper = "paper"
    treb1en = "treb1en"


def model_info_command(
    name: Optional[str] = typer.Argument(None, help="Backbone name; omit to list all of them."),
    embedding_size: int = typer.Option(512, help="Embedding size D (at least 1)."),
    unit_style: Optional[UnitStyle] = typer.Option(None, help="IR unit style (default: the variant's)."),
    weights: Optional[Path] = typer.Option(None, help="Describe this arcface_torch / TreB1eN / lresnet "
                                                      "state dict file instead of a NAME."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameters, MACs (conv + linear, one 112x112 image), embedding size and unit style."""
    from lresnet.model import describe_backbone, describe_weights_file, list_backbones

    if weights is not None:
        if name is not None:
            raise InputError("--weights", f"give a backbone NAME or --weights, not both (got {name!r} and {weights})")
        row = describe_weights_file(weights)
        if as_json:
            print_json(row)
            return
        out_console().print(key_value_table(f"weights {weights.name}", (
            (key.replace("_", " "), f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v)
            for key, v in row.items())))
        return
    kwargs = {"embedding_size": embedding_size}
    if unit_style is not None:
        if name is None:
            raise InputError("--unit-style", "needs a backbone name")
        kwargs["unit_style"] = unit_style.value
    infos = [describe_backbone(n, **kwargs) for n in ([name] if name is not None else list_backbones())]
    if as_json:
        print_json([i.as_dict() for i in infos] if name is None else infos[0].as_dict())
    elif name is not None:
        out_console().print(_detail_table(infos[0]))
    else:
        table = Table(title="lresnet backbones at 112x112")
        for column in ("name", "architecture", "unit style", "SE", "parameters", "GMAC", "embedding"):
            table.add_column(column, justify="right" if column in ("parameters", "GMAC", "embedding") else "left")
        for i in infos:
            table.add_row(i.name, i.architecture, i.unit_style or "-", "yes" if i.se else "no",
                          f"{i.parameters:,} ({i.parameters / 1e6:.2f} M)", f"{i.macs / 1e9:.3f}",
                          str(i.embedding_size))
        out_console().print(table)


def _detail_table(info) -> Table:
    from lresnet.model import UNIT_STYLES

    unit = f"{info.unit_style} ({UNIT_STYLES[info.unit_style]})" if info.unit_style else "-"
    return key_value_table(f"{info.name} at {info.input_size}x{info.input_size}", [
        ("architecture", info.architecture + (" with squeeze-excitation" if info.se else "")),
        ("unit style", unit),
        ("output block", info.output_block),
        ("parameters", f"{info.parameters:,} ({info.parameters / 1e6:.2f} M; trainable {info.trainable_parameters:,})"),
        ("MACs", f"{info.macs:,} ({info.macs / 1e9:.2f} G, conv + linear, one image)"),
        ("embedding size", info.embedding_size),
    ])


def bench_model_command(
    name: str = typer.Argument(..., help="Backbone name (lresnet model-info lists them)."),
    batch_size: Optional[list[str]] = typer.Option(None, "--batch-size", help="Images per step; repeat or "
                                                   "separate with commas to measure several (default 8)."),
    dtype: DType = typer.Option(DType.fp32, help="Compute dtype (bf16 through autocast)."),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last",
                                       help="Model and input in channels_last memory format."),
    compile: bool = typer.Option(False, "--compile", help="Also measure the chosen setting with the backbone "
                                                          "under torch.compile (its first step compiles)."),
    compile_mode: str = typer.Option("default", help="torch.compile mode: default, reduce-overhead, "
                                                     "max-autotune, max-autotune-no-cudagraphs."),
    net_option: Optional[list[str]] = typer.Option(None, "--net-option", metavar="NAME=JSON",
                                                   help="Extra backbone keyword (repeat), e.g. stem_channels=8."),
    steps: int = typer.Option(5, min=1, help="Measured steps per setting (median reported)."),
    warmup: int = typer.Option(1, min=0, help="Unmeasured steps per setting first."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or npu."),
    threads: int = typer.Option(0, min=0, help="CPU threads for torch (0: torch's default). "
                                               "1 gives steadier numbers on a shared machine."),
    matmul_size: int = typer.Option(0, min=0, help="Side of the bf16 matrix product MFU is measured against "
                                                   "(0: 8192 on accelerators, 1024 on the CPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Forward+backward images/s of a backbone against fp32 contiguous NCHW, with model FLOPs utilisation."""
    from lresnet.model.bench import bench_model, default_settings, parse_batch_sizes
    from lresnet.tools.options import parse_pairs

    settings = default_settings(dtype.value, channels_last, compile, compile_mode)
    report = bench_model(name, settings, parse_batch_sizes(batch_size or ["8"]), steps, warmup, device, threads,
                         options=parse_pairs(net_option or [], "--net-option"), matmul_size=matmul_size).as_dict()
    if as_json:
        print_json(report)
        return
    out_console().print(bench_model_table(report))


def bench_model_table(report: dict) -> Table:
    """The table of a ``bench model`` JSON document (also shown by ``bench device``)."""
    matmul = report["matmul"]
    macs = report["macs_per_image"]
    macs_text = f"{macs / 1e9:.3g} GMAC" if macs >= 1e8 else f"{macs / 1e6:.3g} MMAC"
    caption = (f"MFU: 3 x 2 x {macs_text} per image x images/s over a "
               f"{matmul['size']}x{matmul['size']} bf16 matmul at {matmul['tflops']:.3g} TFLOP/s" if matmul else None)
    table = Table(title=f"bench model {report['name']}: forward+backward, {report['device']}, "
                        f"{report['threads']} threads, median of {report['steps']} steps", caption=caption)
    for column in ("batch", "setting", "images/s", "ms/step", "first step s", "TFLOP/s", "MFU", "vs baseline"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for r in report["results"]:
        table.add_row(str(r["batch_size"]), r["setting"], f"{r['images_per_s']:,.1f}", f"{r['ms_per_step']:,.1f}",
                      f"{r['first_step_s']:,.2f}", "-" if r["tflops"] is None else f"{r['tflops']:,.3g}",
                      "-" if r["mfu"] is None else f"{r['mfu']:.1%}", f"{r['ratio']:.2f}x")
    return table


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to `app` and its benchmarks to `bench`."""
    app.command("model-info")(model_info_command)
    bench.command("model")(bench_model_command)
