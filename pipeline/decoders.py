"""JPEG decoders to uint8 HWC RGB: simplejpeg (default), PyTurboJPEG, Pillow (fallback).

Each decoder is a picklable callable `bytes -> np.ndarray[H, W, 3] uint8`, so DataLoader
workers can receive it; anything that holds a native handle creates it lazily in the worker.
A decoder may also have `into(data, out, mirror)`, decoding straight into a batch slot (simplejpeg).
A decoder raises :class:`SampleError` for bytes it cannot decode (its library's own error types,
caught there and only there); any other exception is a bug and is left to surface.

`nvjpeg` is not decoded here: its workers only batch the encoded bytes, and the training process
decodes them on the device (lresnet.pipeline.gpudecode).
"""

from __future__ import annotations

import io
from typing import Callable, Optional

import numpy as np
import simplejpeg
import torch

from lresnet.core.errors import InputError


Decoder = Callable[[bytes], np.ndarray]
DECODERS = ("simplejpeg", "turbojpeg", "pillow", "nvjpeg")
DEVICE_DECODERS = ("nvjpeg",)  # decoded in the training process, on the device


class SampleError(ValueError):
    """One sample's data is unusable: not a decodable image, the wrong size, a missing member, a bad label.

    Data, never a bug: the decode stage counts and skips exactly these (or, strict, reports them).
    """


def check_shape(shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """Raise SampleError when a decoded image's shape is not `expected`."""
    if tuple(shape) != tuple(expected):
        raise SampleError(f"image is {'x'.join(map(str, shape))}, expected {'x'.join(map(str, expected))}")


class _Scratch:
    """One decoded image kept in the cache, and the fastest way to copy its rows reversed byte by byte."""

    def __init__(self, shape: tuple[int, ...]):
        self.image = np.empty(shape, np.uint8)
        self.rows = (shape[0], self.image.size // shape[0])
        if self.rows[1] % 8 == 0:
            # read as big-endian 8-byte words in reverse order and written as little-endian ones,
            # each row comes out reversed byte by byte, in one numpy pass (~1.4 us for 112x112)
            self._words_reversed: Optional[np.ndarray] = self.image.reshape(self.rows).view(">u8")[:, ::-1]
        else:
            self._words_reversed = None
            self._tensor = torch.from_numpy(self.image.reshape(self.rows))

    def copy_rows_reversed(self, out: np.ndarray) -> None:
        """Write each row of the image into `out`, its bytes in reverse order."""
        if self._words_reversed is not None:
            np.copyto(out.reshape(self.rows).view("<u8"), self._words_reversed)
        else:
            np.copyto(out.reshape(self.rows), self._tensor.flip(1).numpy())


class SimpleJpegDecoder:
    """Decode with simplejpeg (libjpeg-turbo bundled in the wheel).

    Besides `decoder(data) -> array`, `decoder.into(data, out, mirror)` decodes into `out` (a slot of
    the batch buffer) with no array made per image. libjpeg writes its output row by row, which is
    slow into memory that is not in the cache (a batch is megabytes); so it decodes into one small
    scratch image, which stays in the cache, and copies that into the slot in one pass. With
    `mirror` the copy is the mirrored image: decoded as BGR, every row read backwards byte by byte
    is the RGB row mirrored.
    """

    def __init__(self) -> None:
        self._scratch: Optional[_Scratch] = None

    def __getstate__(self) -> dict:
        return {"_scratch": None}

    def __call__(self, data: bytes) -> np.ndarray:
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError as err:  # simplejpeg's error for data libjpeg-turbo cannot decode
            raise SampleError(str(err)) from None

    def into(self, data: bytes, out: np.ndarray, mirror: bool = False) -> None:
        """Decode into `out` (uint8 [H, W, 3], C-contiguous), mirrored left-right when `mirror`.

        Raises:
            SampleError: not a JPEG, or not of out's size (the message says which size it is).
        """
        scratch = self._scratch
        if scratch is None or scratch.image.shape != out.shape:
            scratch = self._scratch = _Scratch(out.shape)
        try:
            image = simplejpeg.decode_jpeg(data, colorspace="BGR" if mirror else "RGB", buffer=scratch.image)
        except ValueError as err:
            if "too small" in str(err):  # a larger image: say which size
                height, width = simplejpeg.decode_jpeg_header(data)[:2]
                check_shape((height, width, 3), out.shape)
            raise SampleError(str(err)) from None
        if image.shape != out.shape:
            check_shape(image.shape, out.shape)
        if mirror:
            scratch.copy_rows_reversed(out)
        else:
            np.copyto(out, scratch.image)


decode_simplejpeg = SimpleJpegDecoder()


def decode_pillow(data: bytes) -> np.ndarray:
    """Decode with Pillow (slowest; always available)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.array(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # Pillow's errors for bad data
        raise SampleError(str(err) or type(err).__name__) from None


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
        try:
            return self._handle.decode(data, pixel_format=self._format)
        except OSError as err:  # PyTurboJPEG's error for data libturbojpeg cannot decode
            raise SampleError(str(err)) from None


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
    """The decoder called `name` (one of DECODERS, but not a device decoder such as nvjpeg).

    Raises:
        InputError: turbojpeg asked for but not installed with its library.
        ValueError: an unknown name, or a device decoder (it decodes whole batches, not samples).
    """
    if name == "simplejpeg":
        return decode_simplejpeg
    if name == "pillow":
        return decode_pillow
    if name == "turbojpeg":
        if not turbojpeg_available():
            raise InputError("--decoder", "turbojpeg needs PyTurboJPEG and the system libturbojpeg "
                             "(pip install 'lresnet[turbojpeg]'); use --decoder simplejpeg")
        return TurboJpegDecoder()
    if name in DEVICE_DECODERS:
        raise ValueError(f"decoder {name!r} decodes whole batches on the device (lresnet.pipeline.gpudecode)")
    raise ValueError(f"unknown decoder {name!r}, expected one of {', '.join(DECODERS)}")
