"""Five-point face alignment to the 112x112 ArcFace template, pixel for pixel as arcface_torch does it.

arcface_torch's ``eval_ijbc.py`` reads a loose crop with ``cv2.imread`` (BGR), estimates a
similarity transform from the five landmarks to the ArcFace template with scikit-image's
``SimilarityTransform.estimate`` (Umeyama's least squares, computed in float32 because the points
are float32), and warps with ``cv2.warpAffine(img, M, (112, 112), borderValue=0.0)`` (bilinear,
constant black border). This module does the same in numpy, with no OpenCV or scikit-image:

- :func:`similarity_transform` performs scikit-image's arithmetic step for step (same dtypes,
  same order of operations, numpy's own SVD), so the matrix is bit-identical;
- :func:`warp_affine` reproduces OpenCV's bilinear ``warpAffine`` for uint8 images exactly.
  OpenCV 4.x (every release up to 4.14, and the one the reference was run with) works in fixed
  point: the inverse map is sampled in 1/1024 pixel, cut to 1/32 pixel, and each pixel is the
  weighted sum of its 4 neighbours with 15-bit integer weights (``WARP_OPENCV4``). OpenCV 5
  computes coordinates and weights in float32 with fused multiply-adds and rounds half to
  even (``WARP_OPENCV5``); its results differ from 4.x by up to a few grey levels;
- :func:`read_image` decodes like ``cv2.imread``: libjpeg-turbo through simplejpeg (the same
  pixels as OpenCV's decoder), EXIF orientation applied, other formats through Pillow.

The tests check all three against the real libraries when they are installed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Union

import numpy as np

from lresnet.core.errors import InputError

ALIGNED_SIZE = 112
WARP_OPENCV4 = "opencv4"
WARP_OPENCV5 = "opencv5"
WARPS = (WARP_OPENCV4, WARP_OPENCV5)

# The ArcFace 5-point template (left eye, right eye, nose tip, left and right mouth corners) in
# the 112x112 crop: InsightFace's 96x112 points shifted right by 8, in float32 as the reference.
ARCFACE_TEMPLATE = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                             [33.5493, 92.3655], [62.7299, 92.2041]], dtype=np.float32)
ARCFACE_TEMPLATE[:, 0] += 8.0
ARCFACE_TEMPLATE.setflags(write=False)

# OpenCV 4's fixed-point bilinear warp: coordinates in 1/2**10, sub-pixel position in 1/2**5,
# weights scaled by 2**15.
_AB_BITS = 10
_INTER_BITS = 5
_INTER_TAB = 1 << _INTER_BITS
_COEF_BITS = 15


def _bilinear_weights() -> np.ndarray:
    """int32 ``[4, 32 * 32]``: the integer weights of the 4 neighbours for each 1/32 sub-pixel
    position ``(fy, fx)``, each rounded from the float weight and corrected to sum to 2**15 exactly
    (the largest weight takes the rounding surplus, the smallest a deficit), as OpenCV builds them."""
    frac = np.arange(_INTER_TAB, dtype=np.float64) / _INTER_TAB
    pair = np.stack([1.0 - frac, frac], axis=1)
    table = np.empty((_INTER_TAB, _INTER_TAB, 2, 2), dtype=np.int64)
    scale = 1 << _COEF_BITS
    for fy in range(_INTER_TAB):
        for fx in range(_INTER_TAB):
            w = np.rint(np.outer(pair[fy], pair[fx]) * scale).astype(np.int64)
            surplus = int(w.sum()) - scale
            if surplus:
                flat = w.reshape(-1)
                flat[np.argmax(flat) if surplus > 0 else np.argmin(flat)] -= surplus
            table[fy, fx] = w
    return np.ascontiguousarray(table.reshape(_INTER_TAB * _INTER_TAB, 4).T.astype(np.int32))


_WEIGHTS = _bilinear_weights()


def similarity_transform(landmarks: np.ndarray, template: np.ndarray = ARCFACE_TEMPLATE) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, translation) mapping ``landmarks`` onto ``template``.

    Least squares after Umeyama (1991), evaluated with exactly the operations of scikit-image's
    ``SimilarityTransform.estimate(landmarks, template)``: means, covariance and SVD in the points'
    own dtype (float32 for IJB landmarks), the matrix assembled in float64.

    Args:
        landmarks: ``[K, 2]`` points (x, y) in the source image.
        template: ``[K, 2]`` destination points.

    Returns:
        float64 ``[2, 3]``: ``dst = M[:, :2] @ src + M[:, 2]``.

    Raises:
        ValueError: the shapes differ, or the points do not determine a transform (all equal:
            scikit-image returns NaNs there).
    """
    src = np.asarray(landmarks)
    dst = np.asarray(template)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2:
        raise ValueError(f"landmarks {src.shape} and template {dst.shape} must both be [K, 2]")
    count, dim = src.shape
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_centred = src - src_mean
    dst_centred = dst - dst_mean
    cov = dst_centred.T @ src_centred / count
    signs = np.ones((dim,), dtype=np.float64)
    if np.linalg.det(cov) < 0:
        signs[dim - 1] = -1
    u, singular, vt = np.linalg.svd(cov)
    tolerance = singular.max() * np.max(cov.shape) * np.finfo(float).eps
    rank = int(np.count_nonzero(singular > tolerance))
    if rank == 0:
        raise ValueError("the landmarks do not determine a similarity transform (all points coincide)")
    matrix = np.eye(dim + 1, dtype=np.float64)
    if rank == dim - 1 and np.linalg.det(u) * np.linalg.det(vt) > 0:
        matrix[:dim, :dim] = u @ vt
    else:
        proper = signs.copy()
        if rank == dim - 1:
            proper[dim - 1] = -1
        matrix[:dim, :dim] = u @ np.diag(proper) @ vt
    scale = 1.0 / src_centred.var(axis=0).sum() * (singular @ signs)
    matrix[:dim, dim] = dst_mean - scale * (matrix[:dim, :dim] @ src_mean.T)
    matrix[:dim, :dim] *= scale
    return matrix[:2]


def _inverse(matrix: np.ndarray) -> np.ndarray:
    """OpenCV's inversion of a 2x3 affine map (destination pixel -> source position), in float64."""
    m = np.asarray(matrix, dtype=np.float64).reshape(6)
    det = m[0] * m[4] - m[1] * m[3]
    det = 1.0 / det if det != 0 else 0.0
    a11, a22 = m[4] * det, m[0] * det
    a12, a21 = -m[1] * det, -m[3] * det
    return np.array([a11, a12, -a11 * m[2] - a12 * m[5], a21, a22, -a21 * m[2] - a22 * m[5]])


def _sample(image: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """uint8 ``[C, 4, H, W]``: the neighbours (0,0), (0,1), (1,0), (1,1) of the integer source
    positions ``(iy, ix)``, channel first; neighbours outside the image are 0 (the black border)."""
    height, width, channels = image.shape
    flat = np.ascontiguousarray(image).reshape(-1)
    index = np.empty((4,) + ix.shape, dtype=np.int64)
    inside = np.empty((4,) + ix.shape, dtype=bool)
    for k, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        yy, xx = iy + dy, ix + dx
        inside[k] = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        index[k] = (np.clip(yy, 0, height - 1) * width + np.clip(xx, 0, width - 1)) * channels
    pixels = np.take(flat, index[None] + np.arange(channels).reshape(-1, 1, 1, 1))
    pixels *= inside
    return pixels


def _warp_opencv4(image: np.ndarray, inv: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    ab_scale = 1 << _AB_BITS
    xs = np.arange(width, dtype=np.float64)
    ys = np.arange(height, dtype=np.float64)
    x_step = np.rint(inv[0] * xs * ab_scale).astype(np.int64)
    y_step = np.rint(inv[3] * xs * ab_scale).astype(np.int64)
    half = ab_scale // _INTER_TAB // 2
    x_row = np.rint((inv[1] * ys + inv[2]) * ab_scale).astype(np.int64) + half
    y_row = np.rint((inv[4] * ys + inv[5]) * ab_scale).astype(np.int64) + half
    shift = _AB_BITS - _INTER_BITS
    x = (x_row[:, None] + x_step[None, :]) >> shift
    y = (y_row[:, None] + y_step[None, :]) >> shift
    weights = np.take(_WEIGHTS, ((y & (_INTER_TAB - 1)) << _INTER_BITS) | (x & (_INTER_TAB - 1)), axis=1)
    pixels = _sample(image, x >> _INTER_BITS, y >> _INTER_BITS)
    acc = np.einsum("ckhw,khw->chw", pixels.astype(np.int32), weights)
    acc += 1 << (_COEF_BITS - 1)
    acc >>= _COEF_BITS
    return np.ascontiguousarray(np.clip(acc, 0, 255).astype(np.uint8).transpose(1, 2, 0))


_HALF_WAY = np.uint64(1 << 28)  # a float64 whose 29 bits below float32 precision read 100...0
_BELOW_FLOAT32 = np.uint64((1 << 29) - 1)


def fma32(a, b, c) -> np.ndarray:
    """``a * b + c`` in float32 with one rounding (a fused multiply-add), for float32 operands.

    The product of two float32 values is exact in float64, and the float64 sum rounds once more;
    that second rounding matters only where the float64 sum lies exactly half-way between two
    float32 values, and there the sum's error term says on which side the exact value lies.
    """
    a, b, c = np.broadcast_arrays(np.atleast_1d(np.asarray(a, dtype=np.float32)),
                                  np.atleast_1d(np.asarray(b, dtype=np.float32)),
                                  np.atleast_1d(np.asarray(c, dtype=np.float32)))
    product = a.astype(np.float64) * b
    total = product + c
    out = total.astype(np.float32)
    tie = (total.view(np.uint64) & _BELOW_FLOAT32) == _HALF_WAY
    if tie.any():
        p, t = product[tie], total[tie]
        back = t - p
        error = (p - (t - back)) + (c[tie].astype(np.float64) - back)  # t + error == p + c exactly
        nearest = out[tie]
        step = np.nextafter(nearest, np.where(error > 0, np.float32(np.inf), np.float32(-np.inf)))
        wrong_side = np.where(error > 0, nearest < t, nearest > t) & (error != 0)
        out[tie] = np.where(wrong_side, step, nearest)
    return out


def _warp_opencv5(image: np.ndarray, inv: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    m = inv.astype(np.float32)
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)
    x_row = ys * m[1] + m[2]
    y_row = ys * m[4] + m[5]
    sx = fma32(m[0], xs[None, :], x_row[:, None])
    sy = fma32(m[3], xs[None, :], y_row[:, None])
    fx, fy = np.floor(sx), np.floor(sy)
    alpha, beta = sx - fx, sy - fy
    p00, p01, p10, p11 = _sample(image, fx.astype(np.int64), fy.astype(np.int64)).astype(np.float32).swapaxes(0, 1)
    top = fma32(alpha, p01 - p00, p00)
    bottom = fma32(alpha, p11 - p10, p10)
    value = fma32(beta, bottom - top, top)
    return np.ascontiguousarray(np.clip(np.rint(value), 0, 255).astype(np.uint8).transpose(1, 2, 0))


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int] = (ALIGNED_SIZE, ALIGNED_SIZE),
                method: str = WARP_OPENCV4) -> np.ndarray:
    """``cv2.warpAffine(image, matrix, size, borderValue=0)`` (bilinear) for a uint8 ``[H, W, C]`` image.

    Args:
        image: uint8 ``[H, W, C]``; channels are independent, so RGB in gives RGB out.
        matrix: ``[2, 3]`` source -> destination map (inverted inside, as OpenCV does).
        size: ``(width, height)`` of the output.
        method: ``"opencv4"`` (fixed point, OpenCV <= 4.x) or ``"opencv5"`` (float32).

    Returns:
        uint8 ``[height, width, C]``; destination pixels whose source lies outside are black.
    """
    if method not in WARPS:
        raise ValueError(f"method must be one of {', '.join(WARPS)}, got {method!r}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image must be uint8 [H, W, C], got {image.dtype} {image.shape}")
    inv = _inverse(matrix)
    if method == WARP_OPENCV4:
        return _warp_opencv4(image, inv, size)
    return _warp_opencv5(image, inv, size)


def align_face(image: np.ndarray, landmarks: np.ndarray, method: str = WARP_OPENCV4) -> np.ndarray:
    """The 112x112 crop of ``image`` with its five ``landmarks`` moved onto :data:`ARCFACE_TEMPLATE`.

    Raises:
        ValueError: ``landmarks`` is not ``[5, 2]`` or does not determine a transform.
    """
    points = np.asarray(landmarks, dtype=np.float32)
    if points.shape != (5, 2):
        raise ValueError(f"expected 5 landmarks [5, 2], got shape {points.shape}")
    return warp_affine(image, similarity_transform(points), method=method)


# --------------------------------------------------------------------------- decoding
# EXIF orientation -> (transpose first, then flip rows, flip columns), as cv2.imread applies it
_ORIENTATION = {2: (False, False, True), 3: (False, True, True), 4: (False, True, False),
                5: (True, False, False), 6: (True, False, True), 7: (True, True, True), 8: (True, True, False)}


def _exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag of a JPEG (1 when it has none)."""
    if b"Exif" not in data[:65536]:
        return 1
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return int(img.getexif().get(0x0112, 1))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return 1


def decode_image(data: bytes) -> np.ndarray:
    """Decode an image into uint8 ``[H, W, 3]`` RGB, with the pixels ``cv2.imread`` gives (as RGB).

    JPEGs go through simplejpeg (libjpeg-turbo, accurate DCT and upsampling: the same pixels as
    OpenCV's decoder) with their EXIF orientation applied; grey JPEGs are expanded to 3 channels;
    other formats go through Pillow.

    Raises:
        ValueError: the data does not decode.
    """
    import simplejpeg

    if data[:2] == b"\xff\xd8":
        img = simplejpeg.decode_jpeg(data, colorspace="RGB")
        orientation = _exif_orientation(data)
        if orientation in _ORIENTATION:
            transpose, flip_rows, flip_cols = _ORIENTATION[orientation]
            if transpose:
                img = img.transpose(1, 0, 2)
            img = np.ascontiguousarray(img[::-1 if flip_rows else 1, ::-1 if flip_cols else 1])
        return img
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError("not a JPEG, nor an image format Pillow reads") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(str(err) or type(err).__name__) from None


def read_image(path: Union[str, Path]) -> np.ndarray:
    """Read and decode an image file into uint8 ``[H, W, 3]`` RGB (see :func:`decode_image`).

    Raises:
        InputError: the file is missing, unreadable or does not decode.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror or err}") from None
    try:
        return decode_image(data)
    except ValueError as err:
        raise InputError(path, f"image does not decode ({err})") from None


def aligned_size_error(image: np.ndarray) -> Optional[str]:
    """None for a 112x112 image, else what is wrong (for inputs that must already be aligned)."""
    if image.shape[:2] == (ALIGNED_SIZE, ALIGNED_SIZE):
        return None
    return f"got {image.shape[0]}x{image.shape[1]}, expected {ALIGNED_SIZE}x{ALIGNED_SIZE} aligned faces"


__all__ = ["ALIGNED_SIZE", "ARCFACE_TEMPLATE", "WARPS", "WARP_OPENCV4", "WARP_OPENCV5", "align_face",
           "aligned_size_error", "decode_image", "fma32", "read_image", "similarity_transform",
           "warp_affine"]
