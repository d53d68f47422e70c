"""What the input pipeline does (frozen); how it runs is the loader's business."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lresnet.pipeline.augment import EXTRA_AUGMENTATIONS
from lresnet.pipeline.decoders import DECODERS


@dataclass(frozen=True)
class PipelineConfig:
    """Input pipeline settings.

    Args:
        batch_size: samples per batch on each rank.
        workers: DataLoader worker processes (0 = decode in the calling process).
        shuffle_buffer: samples held by each worker's shuffle buffer (0 or 1 = no shuffle).
        seed: base seed; shard order, shuffle and augmentation derive from (seed, epoch, rank, worker).
        decoder: "simplejpeg" (default), "turbojpeg" or "pillow".
        flip: random horizontal flip with p = 0.5.
        augment: extra augmentations, any of "crop", "color", "blur", "gray" (off by default).
        strict: raise InputError on a corrupt sample or shard instead of counting and skipping it.
        pin_memory: pin batches for fast host-to-device copies; None = when CUDA is available.
        prefetch_factor: batches each worker prepares ahead (each worker holds prefetch_factor + 2 batch
            buffers in shared memory: mind a small /dev/shm in containers).
        image_size: (height, width) expected; None = from the manifest (112 x 112 otherwise).
        num_classes: class count when the source has no manifest; None = from the manifest or a scan.
    """

    batch_size: int = 128
    workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    decoder: str = "simplejpeg"
    flip: bool = True
    augment: tuple[str, ...] = ()
    strict: bool = False
    pin_memory: Optional[bool] = None
    prefetch_factor: int = 2
    image_size: Optional[tuple[int, int]] = None
    num_classes: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "augment", tuple(self.augment))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        for name in self.augment:
            if name not in EXTRA_AUGMENTATIONS:
                raise ValueError(f"augment names must be among {', '.join(EXTRA_AUGMENTATIONS)}, got {name!r}")
