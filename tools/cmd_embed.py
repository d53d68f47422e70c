"""CLI: ``lresnet embed`` (images to an embeddings ``.npy`` and a names file)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lresnet.core.errors import InputError
from lresnet.tools.options import AMP, BATCH_SIZE, BGR, CHECKPOINT, DEVICE, NET, WEIGHTS
from lresnet.tools.render import StageProgress, key_value_table, out_console, print_json


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to `app` and its benchmarks to `bench`."""

    @app.command("embed")
    def embed_cmd(
        inputs: List[str] = typer.Argument(..., help="Aligned 112x112 images: files, folders, globs, .tar "
                                                     "archives, .bin pair files; with --landmarks, the folder "
                                                     "of loose crops."),
        out: Path = typer.Option(..., "--out", "-o", help="Embeddings .npy to write (float32 [rows, D]); the "
                                                         "source of each row goes to OUT.names.txt."),
        checkpoint: Optional[Path] = CHECKPOINT,
        weights: Optional[Path] = WEIGHTS,
        net: Optional[str] = NET,
        onnx: Optional[Path] = typer.Option(None, "--onnx", help="An ONNX file from lresnet export."),
        landmarks: Optional[Path] = typer.Option(None, "--landmarks",
                                                 help="Lines 'image x1 y1 ... x5 y5 [score]' (IJB name_5pts_score "
                                                      "layout): align each loose crop first."),
        flip: bool = typer.Option(False, "--flip/--no-flip", help="Row = embedding + embedding of the mirror."),
        normalize: bool = typer.Option(False, "--normalize/--no-normalize", help="L2-normalise each row."),
        batch_size: int = BATCH_SIZE,
        device: str = DEVICE,
        amp: str = AMP,
        bgr: Optional[bool] = BGR,
        workers: int = typer.Option(4, "--workers", min=1, help="Threads reading and aligning images."),
        strict: bool = typer.Option(False, "--strict", help="Fail on an unusable image instead of skipping it."),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of a table."),
    ) -> None:
        """Embed face images with a backbone or an ONNX model."""
        from lresnet.eval.embed import OnnxEncoder, TorchEncoder, collect_images, embed_images, read_landmarks

        if sum(p is not None for p in (checkpoint, weights, onnx)) != 1:
            raise InputError("--checkpoint", "give exactly one of --checkpoint, --weights or --onnx")
        if landmarks is not None:
            if len(inputs) != 1:
                raise InputError("--landmarks", f"with --landmarks give one folder of loose crops, got {len(inputs)} inputs")
            items = read_landmarks(landmarks, inputs[0])
        else:
            items = collect_images(inputs)
        if onnx is not None:
            encoder = OnnxEncoder(onnx, device=device)
        else:
            from lresnet.model.weights import load_backbone

            loaded = load_backbone(checkpoint, weights, net)
            encoder = TorchEncoder(loaded.backbone, device=device, amp=amp, bgr=loaded.bgr if bgr is None else bgr,
                                   description=loaded.description)
        with StageProgress(rate=True, transient=True) as bar:
            summary = embed_images(items, out, encoder, flip=flip, normalize=normalize, batch_size=batch_size,
                                   strict=strict, workers=workers,
                                   progress=lambda done, total: bar.update("embed", done, total))
        if as_json:
            print_json(summary.as_dict())
            return
        doc = summary.as_dict()
        rows = [("rows written", f"{doc['rows']:,} x {doc['embedding_size']} float32 -> {doc['out']}"),
                ("names", doc["names"]), ("images given", f"{doc['images']:,}"),
                ("unusable (skipped)", f"{doc['failed']:,}"), ("flip / normalize", f"{doc['flip']} / {doc['normalize']}"),
                ("aligned from landmarks", doc["aligned_from_landmarks"]),
                ("seconds", f"{doc['seconds']:.1f} ({doc['images_per_s']} img/s)"), ("model", doc["encoder"].get("kind"))]
        rows += [(f"skipped: {f['name']}", f["reason"]) for f in doc["failures"]]
        out_console().print(key_value_table("lresnet embed", rows))
