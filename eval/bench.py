"""``lresnet bench verify``: embedding extraction images/s, variants against a baseline in one run.

The baseline is no flip, fp32, full batches; the variants are flip TTA (twice the forwards),
bf16 autocast, and a batch-size-1 loop (the per-call overhead). Each is timed ``repeats``
times on the same random images and its best run is kept.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from lresnet.core.device import resolve_device, synchronize
from lresnet.core.errors import InputError
from lresnet.eval.extract import extract_embeddings

JSON_FORMAT = "lresnet-bench-verify/1"


def bench_extraction(net: str = "mobilefacenet", images: int = 256, batch_size: int = 64, device: str = "cpu",
                     repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Images/s of :func:`~lresnet.eval.extract_embeddings` for each variant.

    Returns:
        ``{"format": "lresnet-bench-verify/1", "net", "device", "batch_size", "threads",
        "repeats", "results": [{"variant", "images", "seconds", "images_per_s",
        "ratio_to_baseline"}, ...]}``, the baseline first.

    Raises:
        InputError: unknown backbone or device, or counts below 1.
    """
    from lresnet.model import create_backbone

    if images < 1 or batch_size < 1 or repeats < 1:
        raise InputError("--images/--batch-size/--repeats", f"got {images}/{batch_size}/{repeats}, "
                                                           "expected >= 1 each")
    dev = resolve_device(device)
    backbone = create_backbone(net)
    data = np.random.default_rng(seed).integers(0, 256, (images, 112, 112, 3), dtype=np.uint8)
    variants = [
        ("baseline: no flip, fp32", dict(flip=False, amp_dtype=None, batch_size=batch_size), images),
        ("flip TTA, fp32", dict(flip=True, amp_dtype=None, batch_size=batch_size), images),
        ("no flip, bf16 autocast", dict(flip=False, amp_dtype="bf16", batch_size=batch_size), images),
        ("no flip, batch size 1 loop", dict(flip=False, amp_dtype=None, batch_size=1),
         min(images, max(8, images // 8))),
    ]
    extract_embeddings(backbone, data[:batch_size], batch_size=batch_size, device=dev, flip=True)  # warm-up
    rows = []
    for label, kwargs, count in variants:
        best = math.inf
        for _ in range(repeats):
            synchronize(dev)
            start = time.perf_counter()
            extract_embeddings(backbone, data[:count], device=dev, **kwargs)
            best = min(best, time.perf_counter() - start)
        rows.append({"variant": label, "images": count, "seconds": best, "images_per_s": count / best})
    base = rows[0]["images_per_s"]
    for row in rows:
        row["ratio_to_baseline"] = row["images_per_s"] / base
    return {"format": JSON_FORMAT, "net": net, "device": str(dev), "batch_size": batch_size,
            "threads": torch.get_num_threads(), "repeats": repeats, "results": rows}
