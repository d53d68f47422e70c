"""JPEG decoders to uint8 HWC RGB: simplejpeg (default), PyTurboJPEG, Pillow (fallback).

Each decoder is a picklable callable `bytes -> np.ndarray[H, W, 3] uint8`, so DataLoader
workers can receive it; anything that holds a native handle creates it lazily in the worker.
A decoder may also have `into(data, out, mirror)`, decoding straight into a batch slot (simplejpeg).
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import simplejpeg
import torch


Decoder = Callable[[bytes], np.ndarray]
DECODERS = ("simplejpeg", "turbojpeg", "pillow")


def _check_shape(shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if shape != expected:
        raise ValueError(f"image is {'x'.join(map(str, shape))}, expected {'x'.join(map(str, expected))}")


class SimpleJpegDecoder:
    """Decode with simplejpeg (libjpeg-turbo bundled in the wheel).

    Besides `decoder(data) -> array`, `decoder.into(data, out, mirror)` decodes straight into `out`
    (a slot of the batch buffer): no array per image, no copy into the batch. With `mirror` it writes
    the image left-right mirrored in the one copy it makes anyway: decoded as BGR, every row read
    backwards byte by byte is the RGB row mirrored.
    """

    def __init__(self) -> None:
        self._scratch: dict[tuple[int, ...], tuple[np.ndarray, torch.Tensor]] = {}

    def __getstate__(self) -> dict:
        return {"_scratch": {}}

    def __call__(self, data: bytes) -> np.ndarray:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")

    def into(self, data: bytes, out: np.ndarray, mirror: bool = False) -> None:
        """Decode into `out` (uint8 [H, W, 3], C-contiguous), mirrored left-right when `mirror`.

        Raises:
            ValueError: not a JPEG, or not of out's size (the message says which size it is).
        """
        try:
            if not mirror:
                _check_shape(simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out).shape, out.shape)
                return
            scratch = self._scratch.get(out.shape)
            if scratch is None:
                array = np.empty(out.shape, np.uint8)
                scratch = self._scratch[out.shape] = (array, torch.from_numpy(array.reshape(out.shape[0], -1)))
            _check_shape(simplejpeg.decode_jpeg(data, colorspace="BGR", buffer=scratch[0]).shape, out.shape)
        except ValueError as err:
            if "too small" not in str(err):
                raise
            height, width = simplejpeg.decode_jpeg_header(data)[:2]  # a larger image: say which size
            _check_shape((height, width, 3), out.shape)
            raise
        out.reshape(out.shape[0], -1)[...] = scratch[1].flip(1).numpy()


decode_simplejpeg = SimpleJpegDecoder()


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
