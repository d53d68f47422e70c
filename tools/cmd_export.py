"""CLI: ``lresnet export`` (a backbone to ONNX, checked by onnxruntime)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lresnet.core.errors import InputError
from lresnet.tools.options import CHECKPOINT, NET, WEIGHTS
from lresnet.tools.render import key_value_table, out_console, print_json


def check_images(inputs: List[Path], limit: int = 16):
    """uint8 ``[B, 112, 112, 3]``: the first usable aligned images of ``inputs``, else synthetic faces."""
    import numpy as np

    from lresnet.convert.synthetic import render_faces
    from lresnet.eval.align import aligned_size_error
    from lresnet.eval.embed import collect_images

    if not inputs:
        return render_faces(list(range(limit)), np.random.default_rng(0))
    found = []
    for item in collect_images(inputs):
        try:
            image = item.fetch()
        except ValueError:
            continue
        if aligned_size_error(image) is None:
            found.append(image)
        if len(found) == limit:
            break
    if not found:
        raise InputError(inputs[0], "no usable aligned 112x112 image among --check-images")
    return np.stack(found)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to `app` and its benchmarks to `bench`."""

    @app.command("export")
    def export_cmd(
        onnx: Path = typer.Option(..., "--onnx", help="The ONNX file to write."),
        checkpoint: Optional[Path] = CHECKPOINT,
        weights: Optional[Path] = WEIGHTS,
        net: Optional[str] = NET,
        channel_order: Optional[str] = typer.Option(None, "--channel-order",
                                                    help="RGB or BGR: the input the file takes (default: the "
                                                         "weights' own; otherwise the graph swaps channels)."),
        opset: int = typer.Option(17, "--opset", min=11, help="ONNX opset."),
        exporter: str = typer.Option("dynamo", "--exporter", help="dynamo (torch.export) or torchscript."),
        images: List[Path] = typer.Option([], "--check-images", help="Aligned images for the parity check "
                                                                    "(files, folders, .tar, .bin; default: "
                                                                    "16 synthetic faces)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Export a backbone to ONNX (input data [N,3,112,112], dynamic N) and check it with onnxruntime."""
        from lresnet.model.export import export_onnx

        from lresnet.model.weights import load_backbone

        loaded = load_backbone(checkpoint, weights, net)
        report = export_onnx(loaded.backbone, onnx, weights_channel_order="BGR" if loaded.bgr else "RGB",
                             channel_order=channel_order, opset=opset, exporter=exporter,
                             images=check_images(images),
                             metadata={"backbone": loaded.net,
                                       "source": str(loaded.description.get("source", loaded.description.get("kind")))})
        if as_json:
            print_json(dict(report.as_dict(), model=loaded.description))
            return
        rows = [("file", f"{report.path} ({report.bytes:,} bytes)"), ("backbone", loaded.net),
                ("input", f"data {list(report.input_shape)} float32, {report.metadata['channel_order']}, "
                          f"(x - {report.metadata['input_mean']}) / {report.metadata['input_std']}"),
                ("output", f"embedding {list(report.output_shape)} (raw, not L2-normalised)"),
                ("exporter / opset", f"{report.exporter} / {report.opset}"), ("onnxruntime", report.onnxruntime)]
        rows += [(f"max |onnx - torch|, {c.input} batch {c.batch}", f"{c.max_abs_diff:.3g} (tolerance {c.tolerance:.3g})")
                 for c in report.checks]
        out_console().print(key_value_table(f"ONNX export: {Path(report.path).name}", rows))
