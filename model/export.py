"""ONNX export of a backbone, checked against PyTorch by onnxruntime.

    >>> from lresnet.model.export import export_onnx
    >>> report = export_onnx(backbone, "model.onnx", channel_order="RGB", images=faces_uint8)
    >>> report.max_abs_diff, report.tolerance

The file takes ``data``: float32 ``[N, 3, 112, 112]`` (dynamic ``N``), already normalised as
``(x - input_mean) / input_std`` in the channel order its metadata records, and gives
``embedding``: the backbone's raw (not L2-normalised) float32 ``[N, D]`` output. Metadata props:
``channel_order`` (``RGB``/``BGR``), ``input_mean``/``input_std`` (127.5), ``normalization``,
``layout`` (``NCHW``), ``embedding_size``, and what the caller adds (backbone name, source).

InsightFace's deployment code (``insightface.model_zoo``: ``ModelRouter`` then ``ArcFaceONNX``)
takes any single-output model with a 112x112 input as a recognition model and feeds it
``cv2.dnn.blobFromImages(imgs, 1/127.5, (112, 112), (127.5,) * 3, swapRB=True)``: RGB,
``(x - 127.5) / 127.5``, unless one of the graph's first 8 nodes is named ``Sub*``/``_minus*`` and
one ``Mul*``/``_mul*`` (an MXNet model normalising inside), which never holds for these files.
That is the default preprocessing here; weights trained on BGR (TreB1eN) record ``BGR``, or take
RGB with ``channel_order="RGB"`` (a channel flip is then built into the graph).

:func:`export_onnx` writes the file only after onnxruntime reproduces PyTorch's output on random
inputs (batches of 7 and 1) and on a batch of real images within the tolerance: by default
``1e-4 * max(1, max |torch output|)``.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from lresnet.core.errors import InputError, PathLike

INPUT_NAME = "data"
OUTPUT_NAME = "embedding"
META_CHANNEL_ORDER = "channel_order"
META_MEAN = "input_mean"
META_STD = "input_std"
EXPORTERS = ("dynamo", "torchscript")
CHANNEL_ORDERS = ("RGB", "BGR")
DEFAULT_OPSET = 17
DEFAULT_RTOL = 1e-4
PIXEL_MEAN = 127.5
PIXEL_STD = 127.5


class ParityError(InputError):
    """onnxruntime's output differs from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class ParityCheck:
    """One comparison: the input kind, its batch size and the largest absolute difference."""

    input: str
    batch: int
    max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how closely onnxruntime matched PyTorch."""

    path: str
    bytes: int
    exporter: str
    opset: int
    input_shape: tuple
    output_shape: tuple
    embedding_size: int
    metadata: dict[str, str]
    checks: tuple[ParityCheck, ...]
    onnxruntime: str
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())

    @property
    def max_abs_diff(self) -> float:
        return max(c.max_abs_diff for c in self.checks)

    @property
    def tolerance(self) -> float:
        return min(c.tolerance for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"format": "lresnet-export/1", "path": self.path, "bytes": self.bytes, "exporter": self.exporter,
                "opset": self.opset, "input": {"name": INPUT_NAME, "shape": list(self.input_shape)},
                "output": {"name": OUTPUT_NAME, "shape": list(self.output_shape)},
                "embedding_size": self.embedding_size, "metadata": dict(self.metadata),
                "onnxruntime": self.onnxruntime, "max_abs_diff": self.max_abs_diff,
                "checks": [dict(input=c.input, batch=c.batch, max_abs_diff=c.max_abs_diff, tolerance=c.tolerance,
                                passed=c.passed) for c in self.checks],
                "seconds": round(self.seconds, 3), "notes": list(self.notes)}


class _SwapChannels(nn.Module):
    """Feed the backbone the other channel order (RGB <-> BGR) from inside the graph."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x[:, [2, 1, 0]])


def _import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise InputError("--onnx", "ONNX export needs onnx and onnxruntime: pip install 'lresnet[onnx]'") from None
    return onnx, onnxruntime


def _export(module: nn.Module, path: Path, exporter: str, opset: int) -> None:
    sample = torch.zeros(2, 3, 112, 112)
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")  # deprecation notes and converter chatter; failures still raise
        if exporter == "dynamo":
            torch.onnx.export(module, (sample,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=True, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        else:
            torch.onnx.export(module, (sample,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def normalize_for_onnx(images: np.ndarray, channel_order: str = "RGB") -> np.ndarray:
    """uint8 RGB ``[B, H, W, 3]`` -> the file's input: float32 NCHW ``(x - 127.5) / 127.5`` in ``channel_order``."""
    x = images[..., ::-1] if channel_order == "BGR" else images
    return np.ascontiguousarray(((x.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD).transpose(0, 3, 1, 2))


def export_onnx(backbone: nn.Module, path: PathLike, *, weights_channel_order: str = "RGB",
                channel_order: Optional[str] = None, opset: int = DEFAULT_OPSET, exporter: str = "dynamo",
                images: Optional[np.ndarray] = None, rtol: float = DEFAULT_RTOL,
                metadata: Optional[dict[str, str]] = None, seed: int = 0) -> ExportReport:
    """Export ``backbone`` to ONNX, check it with onnxruntime, and only then move it to ``path``.

    Args:
        backbone: an lresnet backbone (exported in eval mode, float32, on the CPU; the module is
            given back in the mode and on the device it came in).
        weights_channel_order: the channel order the weights were trained on (``"BGR"`` for TreB1eN).
        channel_order: the channel order the file takes (default: the weights'); when it differs,
            the graph swaps the channels itself.
        opset: ONNX opset.
        exporter: ``"dynamo"`` (``torch.export``; needs onnxscript) or ``"torchscript"`` (the
            older exporter: faster, deprecated by PyTorch).
        images: uint8 RGB ``[B, 112, 112, 3]`` real images for the parity check (recommended).
        rtol: tolerance as a fraction of the largest absolute PyTorch output (at least 1).
        metadata: extra metadata props (e.g. ``{"backbone": "ir100", "source": "arcface_torch"}``).

    Raises:
        InputError: onnx/onnxruntime missing, unknown options, an unwritable path.
        ParityError: onnxruntime differs from PyTorch beyond the tolerance (nothing is written).
    """
    import time

    onnx, ort = _import_onnx()
    if exporter not in EXPORTERS:
        raise InputError("--exporter", f"got {exporter!r}, expected one of {', '.join(EXPORTERS)}")
    channel_order = (channel_order or weights_channel_order).upper()
    for option, value in (("--channel-order", channel_order), ("weights channel order", weights_channel_order)):
        if value not in CHANNEL_ORDERS:
            raise InputError(option, f"got {value!r}, expected one of {', '.join(CHANNEL_ORDERS)}")
    if images is not None and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (112, 112, 3)):
        raise InputError("--check-images", f"got {images.dtype} {images.shape}, expected uint8 [B, 112, 112, 3]")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    start = time.perf_counter()
    was_training = backbone.training
    device = next(backbone.parameters()).device
    module = backbone.float().cpu().eval()
    if channel_order != weights_channel_order.upper():
        module = _SwapChannels(module).eval()
    notes = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _export(module, tmp, exporter, opset)
        model = onnx.load(str(tmp))
        props = {META_CHANNEL_ORDER: channel_order, META_MEAN: str(PIXEL_MEAN), META_STD: str(PIXEL_STD),
                 "normalization": "(x - input_mean) / input_std", "layout": "NCHW",
                 "output": "raw embedding (not L2-normalised)", **(metadata or {})}
        del model.metadata_props[:]
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(seed)
        inputs = [("random", rng.uniform(-1, 1, (7, 3, 112, 112)).astype(np.float32)),
                  ("random", rng.uniform(-1, 1, (1, 3, 112, 112)).astype(np.float32))]
        if images is not None:
            inputs.append(("images", normalize_for_onnx(images, channel_order)))
        else:
            notes.append("no real images given: checked on random inputs only")
        checks = []
        with torch.inference_mode():
            for kind, x in inputs:
                expected = module(torch.from_numpy(x)).float().numpy()
                got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
                tolerance = rtol * max(1.0, float(np.abs(expected).max()))
                checks.append(ParityCheck(kind, x.shape[0], float(np.abs(got - expected).max()), tolerance))
        failed = [c for c in checks if not c.passed]
        if failed:
            c = failed[0]
            raise ParityError(path, f"onnxruntime differs from PyTorch by {c.max_abs_diff:.3g} on {c.input} "
                                    f"input (batch {c.batch}), more than the tolerance {c.tolerance:.3g}")
        out_dim = session.get_outputs()[0].shape
        report = ExportReport(
            path=str(path), bytes=tmp.stat().st_size, exporter=exporter, opset=opset,
            input_shape=tuple(session.get_inputs()[0].shape), output_shape=tuple(out_dim),
            embedding_size=int(expected.shape[1]), metadata=props, checks=tuple(checks),
            onnxruntime=ort.__version__, seconds=time.perf_counter() - start, notes=tuple(notes))
        os.replace(tmp, path)
        return report
    except OSError as err:
        raise InputError(err.filename or path, f"cannot write: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)
        backbone.to(device).train(was_training)


__all__ = ["CHANNEL_ORDERS", "DEFAULT_OPSET", "DEFAULT_RTOL", "EXPORTERS", "ExportReport", "INPUT_NAME",
           "META_CHANNEL_ORDER", "META_MEAN", "META_STD", "OUTPUT_NAME", "ParityCheck", "ParityError",
           "export_onnx", "normalize_for_onnx"]
