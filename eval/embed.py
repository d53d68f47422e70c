"""Turn face images into embeddings: ``lresnet embed`` as a library call, and the encoders it uses.

    >>> from lresnet.eval.embed import TorchEncoder, embed_images
    >>> summary = embed_images(["faces/", "lfw.bin"], "emb.npy", TorchEncoder(backbone), flip=True)
    >>> summary.rows, summary.failed, summary.names_file

Inputs, in the order given: image files, folders (their images, sorted by path, recursively),
glob patterns, tar archives (their image members in archive order: a converted ``<set>.tar``
gives ``KEY.a.jpg, KEY.b.jpg`` of each pair) and InsightFace ``.bin`` pair files (images in
order). They must be aligned 112x112 faces, unless a landmarks file is given: then the one
input is a folder of loose crops and each line of the file (``image x1 y1 ... x5 y5
[score]``, the IJB ``name_5pts_score`` layout) names a crop, aligned as IJB crops are
(:mod:`lresnet.eval.align`).

An encoder maps uint8 RGB ``[B, 112, 112, 3]`` to float32 ``[B, D]``: :class:`TorchEncoder`
(a backbone, any device, optional autocast) or :class:`OnnxEncoder` (a file written by
``lresnet export``, run by onnxruntime with the preprocessing recorded in it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, Union

import numpy as np

from lresnet.core.errors import InputError, PathLike
from lresnet.eval.align import WARP_OPENCV4, align_face, aligned_size_error, decode_image

NORM_INSIGHTFACE = "(x-127.5)/127.5"  # training, verification, arcface_torch's ONNX export
NORM_REFERENCE_IJB = "(x/255-0.5)/0.5"  # arcface_torch's eval_ijbc.py (differs in the last float bit)
NORMALIZATIONS = (NORM_INSIGHTFACE, NORM_REFERENCE_IJB)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_LISTED_FAILURES = 10


class Encoder(Protocol):
    """uint8 RGB ``[B, 112, 112, 3]`` -> float32 ``[B, D]`` raw embeddings."""

    def __call__(self, images: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


class TorchEncoder:
    """A backbone in eval mode on a device, fed normalised NCHW float input.

    Args:
        backbone: maps float ``[B, 3, 112, 112]`` to ``[B, D]``.
        device: ``cpu``, ``cuda[:i]``, ``npu[:i]`` or a torch.device.
        amp: None/``"none"``, ``"bf16"`` or ``"fp16"``: autocast for the forward.
        bgr: feed BGR (weights trained on BGR input, the TreB1eN family).
        normalization: :data:`NORM_INSIGHTFACE` or :data:`NORM_REFERENCE_IJB`.
    """

    def __init__(self, backbone, device="cpu", amp=None, bgr: bool = False,
                 normalization: str = NORM_INSIGHTFACE, description: Optional[dict[str, Any]] = None):
        import torch

        from lresnet.core.device import autocast_dtype, resolve_device

        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.device = resolve_device(device)
        self.amp = autocast_dtype(amp)
        self.bgr = bgr
        self.normalization = normalization
        self.backbone = backbone.to(self.device).eval()
        self._torch = torch
        self._description = dict(description or {})

    def _input(self, images: np.ndarray):
        torch = self._torch
        batch = torch.from_numpy(np.ascontiguousarray(images[..., ::-1] if self.bgr else images))
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if self.normalization == NORM_INSIGHTFACE:
            x = x.sub_(127.5).div_(127.5)
        else:
            x = x.div_(255).sub_(0.5).div_(0.5)
        return x.contiguous(memory_format=torch.channels_last)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        torch = self._torch
        autocast = (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            out = self.backbone(self._input(images))
        return out.float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return dict(self._description, kind=self._description.get("kind", "torch"), device=str(self.device),
                    amp=None if self.amp is None else str(self.amp).replace("torch.", ""),
                    channel_order="BGR" if self.bgr else "RGB", normalization=self.normalization)


def _onnxruntime_errors() -> tuple[type, ...]:
    """The exception types onnxruntime raises for a file it cannot load (they derive from Exception only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "InvalidProtobuf", "InvalidGraph",
             "RuntimeException", "NotImplemented")
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (OSError,)


class OnnxEncoder:
    """An ONNX file (``lresnet export``) run by onnxruntime, with the preprocessing its metadata records.

    Raises:
        InputError: onnxruntime is missing, the file does not load, or its input is not
            ``[N, 3, 112, 112]``.
    """

    def __init__(self, path: PathLike, device="cpu"):
        from lresnet.model.export import META_CHANNEL_ORDER, META_MEAN, META_STD

        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError(path, "running an ONNX model needs onnxruntime: pip install 'lresnet[onnx]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(path, "no such file")
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except _onnxruntime_errors() as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise InputError(path, f"not a loadable ONNX model ({first[:200]})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = list(inputs[0].shape)
        if len(inputs) != 1 or len(shape) != 4 or shape[1:] != [3, 112, 112]:
            raise InputError(path, f"got input {inputs[0].name} {shape}, expected one [N, 3, 112, 112] input")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.channel_order = meta.get(META_CHANNEL_ORDER, "RGB").upper()
        self.mean = np.float32(meta.get(META_MEAN, "127.5"))
        self.std = np.float32(meta.get(META_STD, "127.5"))
        self.providers = self.session.get_providers()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = images[..., ::-1] if self.channel_order == "BGR" else images
        blob = np.ascontiguousarray(((x.astype(np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2))
        return np.asarray(self.session.run([self.output_name], {self.input_name: blob})[0], dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {"kind": "onnx", "path": str(self.path), "providers": self.providers,
                "channel_order": self.channel_order, "mean": float(self.mean), "std": float(self.std)}


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ImageItem:
    """One image to embed: its name in ``names.txt`` and how to get its pixels."""

    name: str
    fetch: Callable[[], np.ndarray] = field(repr=False)
    landmarks: Optional[np.ndarray] = field(default=None, repr=False)


def _file_item(path: Path) -> ImageItem:
    def fetch() -> np.ndarray:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ValueError(f"cannot read: {err.strerror or err}") from None
        return decode_image(data)

    return ImageItem(str(path), fetch)


def _bytes_item(name: str, data: bytes) -> ImageItem:
    return ImageItem(name, lambda: decode_image(data))


def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _archive_items(path: Path) -> list[ImageItem]:
    """The images of a ``.tar`` (image members, archive order) or a ``.bin`` (images in order)."""
    if path.suffix == ".bin":
        from lresnet.convert.pairs import load_bin

        return [_bytes_item(f"{path}:{i}", data) for i, data in enumerate(load_bin(path).images)]
    from lresnet.convert.shards import read_shard

    items = []
    for key, parts in read_shard(path, select=lambda name: Path(name).suffix.lower() in IMAGE_SUFFIXES):
        for ext, data in parts.items():
            items.append(_bytes_item(f"{path}:{key}.{ext}", data))
    return items


def collect_images(inputs: Sequence[PathLike]) -> list[ImageItem]:
    """The aligned images named by ``inputs`` (files, folders, globs, ``.tar``, ``.bin``), in order.

    Raises:
        InputError: an input that is none of these, a folder or glob without images, a damaged archive.
    """
    if not inputs:
        raise InputError("INPUT", "give at least one image, folder, glob, .tar or .bin")
    items: list[ImageItem] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = _folder_images(path)
            if not found:
                raise InputError(path, f"no images in this folder (expected {', '.join(IMAGE_SUFFIXES)})")
            items += [_file_item(p) for p in found]
        elif path.is_file():
            items += _archive_items(path) if path.suffix in (".tar", ".bin") else [_file_item(path)]
        elif glob.has_magic(str(spec)):
            found = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
            if not found:
                raise InputError(spec, "the pattern matches no files")
            items += [_file_item(p) for p in found]
        else:
            raise InputError(spec, "no such file, folder or pattern")
    return items


def read_landmarks(path: PathLike, crops: PathLike) -> list[ImageItem]:
    """Loose crops in ``crops`` with 5 landmarks each, from ``path`` (``image x1 y1 ... x5 y5 [score]``).

    Raises:
        InputError: missing files, or a line without 10 (or 11) numbers after the image name.
    """
    path, crops = Path(path), Path(crops)
    if not crops.is_dir():
        raise InputError(crops, "with --landmarks the input is the folder of loose crops the file names")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read: {getattr(err, 'strerror', None) or err}") from None
    items = []
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (11, 12):
            raise InputError(path, f"got {len(parts) - 1} values after the image name, expected 10 landmark "
                                   "values (5 x/y points) and an optional score", where=f"line {number}")
        try:
            points = np.array([float(v) for v in parts[1:11]], dtype=np.float32).reshape(5, 2)
        except ValueError:
            raise InputError(path, "landmarks must be numbers", where=f"line {number}") from None
        item = _file_item(crops / parts[0])
        items.append(ImageItem(item.name, item.fetch, points))
    if not items:
        raise InputError(path, "no landmark lines")
    return items


# --------------------------------------------------------------------------- embedding
@dataclass(frozen=True)
class EmbedSummary:
    """What :func:`embed_images` wrote.

    Attributes:
        out, names_file: the ``.npy`` (float32 ``[rows, D]``) and the source of each row.
        images: inputs seen; rows: rows written; failed: images that could not be used
            (``failures``: the first few, ``(name, reason)``).
    """

    out: str
    names_file: str
    images: int
    rows: int
    embedding_size: int
    failed: int
    failures: tuple[tuple[str, str], ...]
    flip: bool
    normalize: bool
    aligned_from_landmarks: bool
    seconds: float
    encoder: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"format": "lresnet-embed/1", "out": self.out, "names": self.names_file, "images": self.images,
                "rows": self.rows, "embedding_size": self.embedding_size, "failed": self.failed,
                "failures": [{"name": n, "reason": r} for n, r in self.failures], "flip": self.flip,
                "normalize": self.normalize, "aligned_from_landmarks": self.aligned_from_landmarks,
                "seconds": round(self.seconds, 3),
                "images_per_s": round(self.rows / self.seconds, 1) if self.seconds > 0 else None,
                "encoder": self.encoder}


def names_path(out: PathLike) -> Path:
    """``emb.npy`` -> ``emb.names.txt``."""
    text = os.fspath(out)
    return Path((text[:-4] if text.endswith(".npy") else text) + ".names.txt")


def _load(item: ImageItem, warp: str) -> tuple[Optional[np.ndarray], Optional[str]]:
    """``(aligned 112x112 RGB, None)`` or ``(None, why it cannot be used)``."""
    try:
        image = item.fetch()
    except ValueError as err:
        return None, f"does not decode ({err})"
    if item.landmarks is not None:
        try:
            return align_face(image, item.landmarks, method=warp), None
        except ValueError as err:
            return None, str(err)
    problem = aligned_size_error(image)
    return (None, problem) if problem else (image, None)


def _batches(items: Sequence[ImageItem], batch_size: int, warp: str, workers: int
             ) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """``(positions, images, failures)`` per batch of ``items``."""
    with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            loaded = list(pool.map(lambda it: _load(it, warp), chunk)) if pool else [_load(it, warp) for it in chunk]
            good = [start + k for k, (img, _) in enumerate(loaded) if img is not None]
            bad = [(start + k, why) for k, (img, why) in enumerate(loaded) if img is None]
            images = np.stack([img for img, _ in loaded if img is not None]) if good else None
            yield good, images, bad


def _write_npy_from_raw(raw: Path, out: Path, rows: int, dim: int) -> None:
    """``out`` = an ``.npy`` header for float32 ``[rows, dim]`` followed by the bytes of ``raw``."""
    tmp = Path(f"{out}.tmp")
    with open(tmp, "wb") as dst, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(dst, {"descr": np.dtype(np.float32).str, "fortran_order": False,
                                                   "shape": (rows, dim)})
        while True:
            block = src.read(1 << 24)
            if not block:
                break
            dst.write(block)
    os.replace(tmp, out)


def embed_images(items: Union[Sequence[ImageItem], Sequence[PathLike]], out: PathLike, encoder: Encoder,
                 flip: bool = False, normalize: bool = False, batch_size: int = 64, strict: bool = False,
                 warp: str = WARP_OPENCV4, workers: int = 4,
                 progress: Optional[Callable[[int, int], None]] = None) -> EmbedSummary:
    """Embed images and write ``out`` (float32 ``[rows, D]``) and ``<out>.names.txt`` (one source per row).

    Args:
        items: :func:`collect_images` / :func:`read_landmarks` output, or input paths for the former.
        encoder: a :class:`TorchEncoder` or :class:`OnnxEncoder`.
        flip: each row is ``e + e_mirrored`` (flip test-time augmentation).
        normalize: L2-normalise each row.
        strict: fail on the first image that cannot be used, instead of counting and skipping it.
        warp: how crops with landmarks are warped (:data:`lresnet.eval.align.WARPS`).
        workers: threads reading, decoding and aligning images.
        progress: called as ``progress(images done, images)``.

    Raises:
        InputError: bad inputs, an unusable image under ``strict``, no usable image, unwritable output.
    """
    if items and not isinstance(items[0], ImageItem):
        items = collect_images(items)  # type: ignore[arg-type]
    items = list(items)  # type: ignore[arg-type]
    out = Path(out)
    names_file = names_path(out)
    raw = Path(f"{out}.rows.tmp")
    start_time = time.perf_counter()
    rows, dim, failed = 0, 0, 0
    failures: list[tuple[str, str]] = []
    names: list[str] = []
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # removed again on failure
    done = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(raw, "wb") as sink:
            for good, images, bad in _batches(items, batch_size, warp, workers):
                for position, why in bad:
                    if strict:
                        raise InputError(items[position].name, why)
                    failed += 1
                    if len(failures) < _LISTED_FAILURES:
                        failures.append((items[position].name, why))
                if images is not None:
                    emb = np.asarray(encoder(images), dtype=np.float32)
                    if flip:
                        emb = emb + np.asarray(encoder(np.ascontiguousarray(images[:, :, ::-1])), dtype=np.float32)
                    if normalize:
                        norms = np.linalg.norm(emb.astype(np.float64), axis=1, keepdims=True)
                        emb = (emb / np.where(norms == 0, 1.0, norms)).astype(np.float32)
                    sink.write(np.ascontiguousarray(emb).tobytes())
                    rows += emb.shape[0]
                    dim = emb.shape[1]
                    names += [items[p].name for p in good]
                if progress is not None:
                    progress(good[-1] + 1 if good else bad[-1][0] + 1, len(items))
        if rows == 0:
            raise InputError(failures[0][0] if failures else "INPUT",
                             f"no usable image ({failures[0][1] if failures else 'no inputs'})")
        _write_npy_from_raw(raw, out, rows, dim)
        names_file.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
        done = True
    except OSError as err:
        raise InputError(err.filename or out, f"cannot write: {err.strerror or err}") from None
    finally:
        raw.unlink(missing_ok=True)
        if not done:
            for folder in made:
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return EmbedSummary(out=str(out), names_file=str(names_file), images=len(items), rows=rows, embedding_size=dim,
                        failed=failed, failures=tuple(failures), flip=flip, normalize=normalize,
                        aligned_from_landmarks=any(it.landmarks is not None for it in items),
                        seconds=time.perf_counter() - start_time, encoder=encoder.describe())


__all__ = ["Encoder", "EmbedSummary", "IMAGE_SUFFIXES", "ImageItem", "NORMALIZATIONS", "NORM_INSIGHTFACE",
           "NORM_REFERENCE_IJB", "OnnxEncoder", "TorchEncoder", "collect_images", "embed_images", "names_path",
           "read_landmarks"]
