"""Embedding extraction for verification: batched, on any device, optional AMP and flip TTA.

Follows InsightFace's ``verification.test``:

- input: uint8 RGB ``[n, H, W, 3]`` -> float ``(x - 127.5) / 127.5``, NCHW (channels_last
  memory), on the device, by the training pipeline's own :func:`lresnet.pipeline.normalize_batch`;
  ``bgr=True`` swaps the channels for weights trained on BGR input (the TreB1eN family);
- flip TTA: the embedding of an image is ``normalise(e + e_flipped)`` where ``e_flipped``
  is the backbone's output for the horizontally mirrored image; without flip it is
  ``normalise(e)``; the sum and the normalisation are done in float64 like InsightFace
  (float32 network outputs copied into float64 arrays, then ``sklearn.preprocessing.normalize``);
- XNorm: the mean L2 norm of the raw (not normalised) network outputs, over every forward
  output that was computed: with flip, the originals and the mirrored ones (InsightFace
  averages the norms of both of its embedding lists); without flip, the originals.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from lresnet.core.device import autocast_dtype, resolve_device
from lresnet.core.errors import InputError
from lresnet.eval.data import PairSet
from lresnet.eval.protocol import VerificationResult, evaluate
from lresnet.pipeline import normalize_batch

DeviceLike = Union[str, torch.device]


@dataclass(frozen=True, eq=False)
class Embeddings:
    """Result of :func:`extract_embeddings`.

    Attributes:
        normed: float64 ``[n, D]``, unit rows (float64 as in InsightFace, so that pair
            distances are the ones its pipeline computes).
        xnorm: mean L2 norm of the raw network outputs (see the module docstring).
        unnormalised: float64 ``[n, D]``, the rows before normalisation (``e + e_flipped``
            with flip, else ``e``); ``normed == normalise_rows(unnormalised)`` exactly, so
            saving these and scoring them later reproduces every number bit for bit.
    """

    normed: np.ndarray = field(repr=False)
    xnorm: float
    unnormalised: Optional[np.ndarray] = field(default=None, repr=False)


def normalise_rows(rows: np.ndarray) -> np.ndarray:
    """Unit rows, as ``sklearn.preprocessing.normalize`` (zero rows stay zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    norms[norms == 0.0] = 1.0
    return rows / norms[:, None]


def _to_input(batch: np.ndarray, device: torch.device, bgr: bool) -> torch.Tensor:
    """uint8 NHWC RGB -> float32 NCHW channels_last ``(x - 127.5) / 127.5`` on the device (BGR if asked)."""
    if bgr:
        batch = batch[..., ::-1]
    return normalize_batch(torch.from_numpy(np.ascontiguousarray(batch)), device, torch.float32,
                           channels_last=True)


def _forward(backbone: nn.Module, x: torch.Tensor, amp: Optional[torch.dtype]) -> torch.Tensor:
    """The backbone's output; under autocast, its output block (``forward_head``: the embedding's
    linear layer and BatchNorm, where fp16 overflows first) runs in fp32."""
    if amp is None or not (hasattr(backbone, "forward_features") and hasattr(backbone, "forward_head")):
        return backbone(x)
    features = backbone.forward_features(x)
    with torch.autocast(x.device.type, enabled=False):
        return backbone.forward_head(features.float())


def extract_embeddings(backbone: nn.Module, images_uint8_nhwc: np.ndarray, batch_size: int = 64,
                       device: DeviceLike = "cpu", flip: bool = True,
                       amp_dtype: Union[None, str, torch.dtype] = None, bgr: bool = False,
                       progress: Optional[Callable[[int], None]] = None,
                       normalize_each: bool = False) -> Embeddings:
    """Embed images with a backbone (see the module docstring for the exact recipe).

    Args:
        backbone: returns ``[B, D]`` embeddings for normalised NCHW input; it is moved to
            ``device``, run in eval mode under ``torch.inference_mode`` and given back in
            the train/eval mode it came in (so training can call this between steps).
        images_uint8_nhwc: uint8 ``[n, H, W, 3]`` RGB.
        batch_size: images per forward (with flip, each forward also carries their mirrors).
        device: ``cpu``, ``cuda[:i]``, ``npu[:i]`` or a torch.device.
        flip: flip test-time augmentation.
        amp_dtype: None (fp32), ``"bf16"``/``"fp16"`` or a torch dtype: autocast for the forward.
        bgr: feed BGR (for weights trained on BGR input).
        progress: called with the number of images done after each batch.
        normalize_each: L2-normalise each forward output before the flip sum, as the source model
            itself did (TreB1eN-family weights: their network ends in an L2 norm, so their protocol
            sums two unit vectors); XNorm still reads the raw outputs.

    Raises:
        ValueError: images are not uint8 ``[n, H, W, 3]`` or batch_size < 1.
        InputError: unusable device or AMP dtype.
    """
    images = np.asarray(images_uint8_nhwc)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [n, H, W, 3], got {images.dtype} {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    amp = autocast_dtype(amp_dtype)
    n = images.shape[0]
    backbone.to(dev)
    was_training = backbone.training
    backbone.eval()
    plain: Optional[np.ndarray] = None
    mirrored: Optional[np.ndarray] = None
    autocast = torch.autocast(dev.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    try:
        with torch.inference_mode(), autocast:
            for start in range(0, n, batch_size):
                x = _to_input(images[start:start + batch_size], dev, bgr)
                count = x.shape[0]
                if flip:
                    x = torch.cat([x, x.flip(3)])
                out = _forward(backbone, x, amp).float().cpu().numpy()
                if out.ndim != 2 or out.shape[0] != x.shape[0]:
                    raise ValueError(f"backbone returned shape {tuple(out.shape)} for a batch of "
                                     f"{x.shape[0]}; expected [batch, embedding_size]")
                if amp is not None and not np.isfinite(out).all():
                    raise InputError("--amp", f"embeddings of images {start}..{start + count - 1} are not finite "
                                     f"under {str(amp).replace('torch.', '')} autocast (activations beyond its "
                                     "range); use --amp bf16 or --amp none")
                if plain is None:
                    plain = np.empty((n, out.shape[1]), dtype=np.float32)
                    mirrored = np.empty((n, out.shape[1]), dtype=np.float32) if flip else None
                plain[start:start + count] = out[:count]
                if mirrored is not None:
                    mirrored[start:start + count] = out[count:]
                if progress is not None:
                    progress(start + count)
    finally:
        backbone.train(was_training)
    if plain is None:
        raise ValueError("no images to embed")
    outputs = [plain.astype(np.float64)] + ([] if mirrored is None else [mirrored.astype(np.float64)])
    xnorm = float(np.mean(np.concatenate([np.linalg.norm(o, axis=1) for o in outputs])))
    if normalize_each:
        outputs = [normalise_rows(o) for o in outputs]
    summed = outputs[0] + outputs[1] if len(outputs) == 2 else outputs[0]
    return Embeddings(normed=normalise_rows(summed), xnorm=xnorm, unnormalised=summed)


def verify_backbone(backbone: nn.Module, pair_set: PairSet, batch_size: int = 64,
                    device: DeviceLike = "cpu", flip: bool = True,
                    amp_dtype: Union[None, str, torch.dtype] = None, bgr: bool = False,
                    nrof_folds: int = 10,
                    progress: Optional[Callable[[int], None]] = None) -> VerificationResult:
    """Embed a pair set and score it: :func:`extract_embeddings` then :func:`evaluate`.

    The result carries ``xnorm``. The backbone keeps its train/eval mode (safe mid-training).
    """
    emb = extract_embeddings(backbone, pair_set.images, batch_size=batch_size, device=device,
                             flip=flip, amp_dtype=amp_dtype, bgr=bgr, progress=progress)
    return evaluate(emb.normed, pair_set.issame, nrof_folds=nrof_folds).with_xnorm(emb.xnorm)
