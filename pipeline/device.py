"""The device stage: host batches to normalised float/bf16 NCHW (channels_last) batches on the device.

A host batch is one of: uint8 NHWC images (the CPU decoders: normalised here), a stages.EncodedBatch
(`--decoder nvjpeg`: decoded and flipped on the device by lresnet.pipeline.gpudecode, then normalised
here) or float NCHW images already normalised (the DALI loader: only cast and laid out here).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Union

import torch

Device = Union[str, torch.device]


def normalize_batch(images: torch.Tensor, device: Device = "cpu", dtype: torch.dtype = torch.float32,
                    channels_last: bool = True) -> torch.Tensor:
    """uint8 `[B, H, W, 3]` -> `(x - 127.5) / 127.5` as `dtype` `[B, 3, H, W]` on `device`.

    The copy is non_blocking (overlaps when `images` is pinned); the arithmetic runs on the device
    in float32, then casts. NHWC permuted to NCHW is already channels_last in memory, so that
    layout costs nothing; channels_last=False makes it contiguous NCHW.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {list(images.shape)}")
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    x = x.sub_(127.5).div_(127.5)
    if dtype != torch.float32:
        x = x.to(dtype)
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


class DevicePrefetcher:
    """Iterate `(images, labels)` already normalised on `device`, the next batch copied while this one is used.

    `batches` yields host batches of any kind the module docstring names (uint8 NHWC, encoded JPEGs,
    or already normalised float NCHW). On CUDA the copy and normalisation of batch i+1 run on a side stream while the caller's step on
    batch i runs; elsewhere the next batch is simply prepared one step ahead. `state_dict()` forwards
    the wrapped loader's state minus the batch held ahead, so a checkpoint resumes at the right step.
    """

    def __init__(self, batches: Iterable[tuple[Any, torch.Tensor]], device: Device,
                 dtype: torch.dtype = torch.float32, channels_last: bool = True):
        self.batches = batches
        self.device = torch.device(device)
        self.dtype = dtype
        self.channels_last = channels_last
        self._ahead = 0

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def _prepare(self, item: tuple[Any, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = item
        if not isinstance(images, torch.Tensor):  # encoded JPEGs (nvjpeg): decode on the device first
            from lresnet.pipeline.gpudecode import decode_encoded

            images, labels = decode_encoded(images, labels, self.device)
        if images.is_floating_point():  # already normalised NCHW (DALI)
            x = images.to(self.device, self.dtype, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        else:
            x = normalize_batch(images, self.device, self.dtype, self.channels_last)
        return x, labels.to(self.device, non_blocking=True)

    def _load(self, item: tuple[Any, torch.Tensor], stream: Optional[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if stream is None:
            return self._prepare(item)
        # a batch already on the device (DALI) was written on the current stream: the side stream waits for it
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            return self._prepare(item)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        it = iter(self.batches)
        item = next(it, None)
        if item is None:
            return
        ready = self._load(item, stream)
        self._ahead = 1
        while ready is not None:
            if stream is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(stream)
                for tensor in ready:
                    tensor.record_stream(current)
            item = next(it, None)
            following = self._load(item, stream) if item is not None else None
            self._ahead = 1 if following is not None else 0
            yield ready
            ready = following
        self._ahead = 0

    def state_dict(self) -> dict:
        """The wrapped loader's state, not counting the batch prepared ahead."""
        state = dict(self.batches.state_dict())  # type: ignore[attr-defined]
        state["position"] -= self._ahead
        return state

    def load_state_dict(self, state: dict) -> None:
        """Forward to the wrapped loader."""
        self.batches.load_state_dict(state)  # type: ignore[attr-defined]
