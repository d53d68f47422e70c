"""Augmentations on one uint8 HWC image.

Each augmentation takes its randomness as uniforms drawn upstream (stage `attach_random`), a
fixed number per sample, so the random stream does not depend on which samples were decoded:
skipping samples on resume keeps every later flip and crop exactly as in the original run.
Only the horizontal flip is on by default (what the reference recipe trains with); the others
are arcface_torch's optional ones (random resized crop, colour jitter, blur, grayscale).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter


_TORCH_GRAIN = 32768  # at::internal::GRAIN_SIZE


class Augmentation(ABC):
    """Base: `n_random` uniforms in [0, 1) per sample; `apply(image, u, i)` reads u[i:i + n_random]."""

    n_random = 1

    @abstractmethod
    def apply(self, image: np.ndarray, u: Sequence[float], i: int) -> np.ndarray:
        """Return the augmented image (may be `image` itself when nothing is done)."""


class HorizontalFlip(Augmentation):
    """Mirror left-right with probability p."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def apply(self, image: np.ndarray, u: Sequence[float], i: int) -> np.ndarray:
        if u[i] >= self.p:
            return image
        # torch's flip kernel is ~8x faster than numpy's strided copy on HWC uint8. Above 32768
        # elements torch splits the work over its intra-op threads, which for one 112x112 image costs
        # far more than it saves; DataLoader workers run one thread, elsewhere flip in row blocks.
        tensor = torch.from_numpy(image)
        if image.size <= _TORCH_GRAIN or torch.get_num_threads() == 1:
            return tensor.flip(1).numpy()
        rows = max(1, _TORCH_GRAIN // (image.size // image.shape[0]))
        return torch.cat([tensor[r:r + rows].flip(1) for r in range(0, image.shape[0], rows)]).numpy()


class RandomResizedCrop(Augmentation):
    """Crop a random box of `scale` of the area and aspect `ratio`, resize back (probability p)."""

    n_random = 5

    def __init__(self, p: float = 0.5, scale: tuple[float, float] = (0.6, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.p, self.scale, self.ratio = p, scale, ratio

    def apply(self, image: np.ndarray, u: Sequence[float], i: int) -> np.ndarray:
        if u[i] >= self.p:
            return image
        height, width = image.shape[:2]
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[i + 1])
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[i + 2])
        w = min(width, max(1, int(round(math.sqrt(area * aspect)))))
        h = min(height, max(1, int(round(math.sqrt(area / aspect)))))
        top = int(u[i + 3] * (height - h + 1))
        left = int(u[i + 4] * (width - w + 1))
        crop = Image.fromarray(image[top:top + h, left:left + w])
        return np.array(crop.resize((width, height), Image.BILINEAR))


class ColorJitter(Augmentation):
    """Random brightness, contrast and saturation factors in [1 - s, 1 + s] (probability p)."""

    n_random = 4

    def __init__(self, p: float = 0.5, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2):
        self.p, self.brightness, self.contrast, self.saturation = p, brightness, contrast, saturation

    def apply(self, image: np.ndarray, u: Sequence[float], i: int) -> np.ndarray:
        if u[i] >= self.p:
            return image
        x = image.astype(np.float32)
        x *= 1 + self.brightness * (2 * u[i + 1] - 1)
        mean = x.mean()
        x = (x - mean) * (1 + self.contrast * (2 * u[i + 2] - 1)) + mean
        gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
        x = (x - gray[..., None]) * (1 + self.saturation * (2 * u[i + 3] - 1)) + gray[..., None]
        return np.clip(x + 0.5, 0, 255).astype(np.uint8)


class GaussianBlur(Augmentation):
    """Gaussian blur with a radius in `sigma` (probability p)."""

    n_random = 2

    def __init__(self, p: float = 0.2, sigma: tuple[float, float] = (0.1, 1.5)):
        self.p, self.sigma = p, sigma

    def apply(self, image: np.ndarray, u: Sequence[float], i: int) -> np.ndarray:
        if u[i] >= self.p:
            return image
        # a Python float: u is a numpy row, and Pillow (13) takes a numpy scalar radius for a sequence
        radius = float(self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[i + 1])
        return np.array(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


class RandomGrayscale(Augmentation):
    """Replace the colours by their luma, kept as 3 channels (probability p)."""

    def __init__(self, p: float = 0.2):
        self.p = p

    def apply(self, image: np.ndarray, u: Sequence[float], i: int) -> np.ndarray:
        if u[i] >= self.p:
            return image
        gray = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.repeat(np.clip(gray + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


EXTRA_AUGMENTATIONS = {
    "crop": RandomResizedCrop,
    "color": ColorJitter,
    "blur": GaussianBlur,
    "gray": RandomGrayscale,
}


def build_augmentations(flip: bool = True, extra: Sequence[str] = ()) -> list[Augmentation]:
    """The augmentation list: optional extras (in the given order), then the flip.

    Raises:
        ValueError: an unknown extra name.
    """
    augs: list[Augmentation] = []
    for name in extra:
        if name not in EXTRA_AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {name!r}, expected one of {', '.join(EXTRA_AUGMENTATIONS)}")
        augs.append(EXTRA_AUGMENTATIONS[name]())
    if flip:
        augs.append(HorizontalFlip(0.5))
    return augs


def random_width(augs: Sequence[Augmentation]) -> int:
    """Uniforms needed per sample by `augs`."""
    return sum(a.n_random for a in augs)
