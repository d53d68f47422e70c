"""JPEG decoders to uint8 HWC RGB: simplejpeg (default), PyTurboJPEG, Pillow (fallback).

Each decoder is a picklable callable `bytes -> np.ndarray[H, W, 3] uint8`, so DataLoader
workers can receive it; anything that holds a native handle creates it lazily in the worker.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import simplejpeg


Decoder = Callable[[bytes], np.ndarray]
DECODERS = ("simplejpeg", "turbojpeg", "pillow")


def decode_simplejpeg(data: bytes) -> np.ndarray:
    """Decode with simplejpeg (libjpeg-turbo bundled in the wheel)."""
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def decode_pillow(data: bytes) -> np.ndarray:
    """Decode with Pillow (slowest; always available)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


class TurboJpegDecoder:
    """Decode with PyTurboJPEG; needs the system libturbojpeg. The handle is opened per process."""

    def __init__(self) -> None:
        self._handle = None

    def __getstate__(self) -> dict:
        return {"_handle": None}

    def __call__(self, data: bytes) -> np.ndarray:
        if self._handle is None:
            from turbojpeg import TJPF_RGB, TurboJPEG

            self._handle = TurboJPEG()
            self._format = TJPF_RGB
        return self._handle.decode(data, pixel_format=self._format)


def turbojpeg_available() -> bool:
    """True when PyTurboJPEG imports and finds its system library."""
    try:
        from turbojpeg import TurboJPEG

        TurboJPEG()
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def available_decoders() -> list[str]:
    """Names of the decoders usable in this environment, fastest first."""
    names = ["simplejpeg"]
    if turbojpeg_available():
        names.append("turbojpeg")
    names.append("pillow")
    return names


def get_decoder(name: str) -> Decoder:
    """The decoder called `name` (one of DECODERS).

    Raises:
        ValueError: unknown name, or turbojpeg asked for but not installed with its library.
    """
    if name == "simplejpeg":
        return decode_simplejpeg
    if name == "pillow":
        return decode_pillow
    if name == "turbojpeg":
        if not turbojpeg_available():
            raise ValueError("decoder 'turbojpeg' needs PyTurboJPEG and the system libturbojpeg; "
                             "use decoder='simplejpeg'")
        return TurboJpegDecoder()
    raise ValueError(f"unknown decoder {name!r}, expected one of {', '.join(DECODERS)}")
