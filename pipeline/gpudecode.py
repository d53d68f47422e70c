"""`--decoder nvjpeg`: decode a batch of JPEGs on the device with torchvision, flip it there.

DataLoader workers only read the tars and pack each batch's JPEG bytes (stages.encode: an
EncodedBatch with the labels and the flip decisions, drawn from the same seeded uniforms as the CPU
decoders use). The training process decodes the whole batch in one call,
``torchvision.io.decode_jpeg(list_of_uint8_tensors, device="cuda")`` (nvjpeg's batched decoder),
mirrors the slots drawn for the flip and hands a uint8 batch to the device stage, which normalises
it: the same batch contract as the CPU decoders. torchvision is an optional extra
(``pip install 'lresnet[torchvision]'``) and is imported only here, when asked for.

A JPEG that does not decode (or has the wrong size) is a fault as on the CPU path: label -1, its slot
filled with a good image of the batch, counted through the batch's `report` (the loader's stats),
or under `strict` an InputError naming the shard and key.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from lresnet.core.errors import InputError
from lresnet.pipeline.decoders import SampleError, check_shape
from lresnet.pipeline.stages import EncodedBatch, bad_sample

Device = Union[str, torch.device]


def _torchvision_io() -> Any:
    """torchvision.io, or the one-line InputError saying how to get it."""
    try:
        import torchvision.io
    except (ImportError, RuntimeError) as err:  # RuntimeError: built for another torch ("operator ... does not exist")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(None, f"--decoder nvjpeg needs torchvision built for this torch "
                         f"(pip install 'lresnet[torchvision]'); importing it failed: {first}") from None
    return torchvision.io


def require_nvjpeg(device: Optional[Device]) -> None:
    """Check that `--decoder nvjpeg` can run: torchvision imports and (when given) `device` is CUDA.

    Raises:
        InputError: one line saying what is missing.
    """
    _torchvision_io()
    if device is not None and torch.device(device).type != "cuda":
        raise InputError(None, f"--decoder nvjpeg needs a CUDA device, got --device {torch.device(device).type} "
                         "(use --decoder simplejpeg there)")


def _reason(err: RuntimeError) -> str:
    """torchvision's words without its source location ("decode_jpeg, .../decode_jpeg.cpp:171, WORDS")."""
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return text.rsplit(", ", 1)[-1] if ".cpp:" in text else text


def _decode_each(io: Any, jpegs: list[torch.Tensor], device: torch.device) -> list[Union[torch.Tensor, SampleError]]:
    """Decode one JPEG at a time: after a batched call failed, find which samples are bad."""
    out: list[Union[torch.Tensor, SampleError]] = []
    for jpeg in jpegs:
        try:
            out.append(io.decode_jpeg(jpeg, mode=io.ImageReadMode.RGB, device=device))
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as err:  # torchvision's error for a JPEG its decoder rejects
            out.append(SampleError(_reason(err)))
    return out


def decode_encoded(batch: EncodedBatch, labels: torch.Tensor, device: Device) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode `batch` on `device`: `(images uint8 [B, H, W, 3] on device, labels int64 [B] on the host)`.

    The images are a channels-last view of NCHW memory (what the decoder writes), flipped where
    `batch.mirror` says; ready for lresnet.pipeline.device.normalize_batch. Bad slots get label -1
    and a copy of a good image of the batch (zeros when none is good).

    Raises:
        InputError: torchvision missing; or, under `batch.strict`, a sample that does not decode.
    """
    io = _torchvision_io()
    device = torch.device(device)
    height, width = batch.image_size
    parts = torch.split(batch.data, batch.lengths) if len(batch.data) else [batch.data] * len(batch)
    present = [slot for slot, length in enumerate(batch.lengths) if length > 0]
    jpegs = [parts[slot] for slot in present]
    try:
        decoded: list[Any] = io.decode_jpeg(jpegs, mode=io.ImageReadMode.RGB, device=device) if jpegs else []
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError:  # one bad JPEG fails the batched call: decode one by one to find it
        decoded = _decode_each(io, jpegs, device)
    images: list[Optional[torch.Tensor]] = [None] * len(batch)
    faults: list = []
    for slot, image in zip(present, decoded):
        if not isinstance(image, SampleError):
            try:
                check_shape((image.shape[1], image.shape[2], image.shape[0]), (height, width, 3))
            except SampleError as err:
                image = err
        if isinstance(image, SampleError):
            bad_sample(batch.shards[slot], batch.keys[slot], image, faults, batch.strict)
        else:
            images[slot] = image
    labels = labels.clone()
    mirror = batch.mirror
    holes = [slot for slot, image in enumerate(images) if image is None]
    if holes:  # a copy of a good image, flipped as that one is (as the CPU path copies the finished slot)
        labels[holes] = -1
        good = next((slot for slot, image in enumerate(images) if image is not None), None)
        fill = images[good] if good is not None else torch.zeros((3, height, width), dtype=torch.uint8, device=device)
        images = [fill if image is None else image for image in images]
        if good is not None:
            mirror = mirror.clone()
            mirror[holes] = bool(mirror[good])  # a host tensor: no device sync
    x = torch.stack(images)  # [B, 3, H, W]
    x = torch.where(mirror.to(device, non_blocking=True).view(-1, 1, 1, 1), x.flip(3), x)
    if faults and batch.report is not None:
        batch.report(faults)
    return x.permute(0, 2, 3, 1), labels
