"""Batches from memory, no I/O: measures model speed apart from data (like arcface_torch's synthetic mode)."""

from __future__ import annotations

from typing import Iterator, Optional

import torch


class SyntheticSource:
    """`steps` batches `(images uint8 [B, H, W, 3], labels int64 [B])` with labels over `num_classes`.

    A few random image batches are made once and cycled; labels are drawn per step from a seeded
    generator, so every class can appear (many classes, as the real data). Same contract as
    TrainLoader (len, set_epoch, state_dict, num_classes), so the trainer can swap it in.
    """

    def __init__(self, batch_size: int, num_classes: int, steps: int, seed: int = 0,
                 image_size: tuple[int, int] = (112, 112), pool: int = 4, pin_memory: Optional[bool] = None):
        if batch_size < 1 or num_classes < 1 or steps < 0:
            raise ValueError(f"need batch_size >= 1, num_classes >= 1, steps >= 0; got {batch_size}, "
                             f"{num_classes}, {steps}")
        self.batch_size, self.num_classes, self.steps, self.seed = batch_size, num_classes, steps, seed
        self.epoch = 0
        self._position = 0
        gen = torch.Generator().manual_seed(seed)
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._images = [torch.randint(0, 256, (batch_size, *image_size, 3), dtype=torch.uint8, generator=gen)
                        for _ in range(max(1, pool))]
        if pin:
            self._images = [x.pin_memory() for x in self._images]
        self.num_samples = batch_size * steps

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (labels differ per epoch); a different epoch starts at step 0."""
        if epoch != self.epoch:
            self.epoch, self._position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self._position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._position >= self.steps:
            self._position = 0
        while self._position < self.steps:
            step = self._position
            gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, step)) & 0x7FFFFFFF)
            labels = torch.randint(0, self.num_classes, (self.batch_size,), dtype=torch.int64, generator=gen)
            self._position += 1
            yield self._images[step % len(self._images)], labels
