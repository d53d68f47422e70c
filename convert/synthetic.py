"""Synthetic faces_emore: procedural identities written in InsightFace's exact on-disk layout.

Every identity is a stable face-like *shape*: head outline, ears, eye spacing/size, brows, nose,
mouth, hairline, moles and glasses, drawn once into an 8-channel part-mask template. Every image
is a jittered view of that template (rotation, scale, shift, horizontal squeeze, mirror), coloured
with per-image random skin, hair, lip, eye and background colours, lit by a random gradient,
and given texture and noise. Identity lives in shape and layout, never in colour, so raw pixels
verify poorly while a small CNN learns the identities.

The renderer is vectorised numpy (one gather + one batched matmul per batch of images) and
deterministic for a seed.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import simplejpeg

from lresnet.core.errors import PathLike
from lresnet.core.files import atomic_file, atomic_paths
from lresnet.convert.pairs import write_bin
from lresnet.convert.recordio import IRHeader, RecordWriter, pack

log = logging.getLogger(__name__)

IMAGE_SIZE = 112
TEMPLATE = 128  # template canvas; the 112 view sits in its middle at scale 1
EVAL_ID_BASE = 10_000_000  # identities of the pair sets live far from the training ones
SETS = ("lfw", "agedb_30", "cfp_fp")
_BATCH = 64
# Largest per-image nuisance at difficulty 1 (each drawn uniformly in +-value, or 0..value).
JITTER = {"rotate": 0.1, "scale": 0.05, "squeeze": 0.06, "shift": 3.0,  # radians, fractions, pixels
          "noise": 8.0, "texture": 20.0}  # sigma / amplitude in 0..255 units
_CH = 8  # template channels: constant, head, eyes+dark details, brows, mouth, hair off/on head, shading


def _ramp(d: np.ndarray, width: np.ndarray | float) -> np.ndarray:
    """Soft inside-mask of a signed field: 1 where d << 0, 0 where d >> 0, linear over ``width``."""
    return np.clip(0.5 - d / width, 0.0, 1.0)


def identity_params(ids: Sequence[int], seed: int) -> Dict[str, np.ndarray]:
    """Shape parameters of each identity: a pure function of ``(seed, identity)``."""
    fields: Dict[str, List[float]] = {}
    for ident in ids:
        r = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, 7919, int(ident)]))
        u = r.random(24)
        p = {
            "rx": 30 + 12 * u[0], "ry": 41 + 9 * u[1], "cy": 63 + 6 * u[2], "jaw": 0.82 + 0.3 * u[3],
            "ear": 3 + 5 * u[4], "ex": 10 + 8 * u[5], "ey": 4 + 7 * u[6], "erx": 3.5 + 3.5 * u[7],
            "ery": 1.6 + 2.4 * u[8], "bgap": 5 + 6 * u[9], "blen": 5 + 6 * u[10], "bth": 1.0 + 2.2 * u[11],
            "btilt": -0.35 + 0.7 * u[12], "nlen": 8 + 12 * u[13], "nw": 2.5 + 4.5 * u[14],
            "my": 17 + 11 * u[15], "mw": 7 + 10 * u[16], "mcurve": -0.05 + 0.1 * u[17],
            "mth": 1.3 + 3.0 * u[18], "hair": 3 + 20 * u[19], "hwave": 6 * u[20] * (u[21] > 0.5),
            "hside": 40 * u[22], "hphase": 6.283 * u[23],
        }
        extra = r.random(8)
        p["glasses"] = float(extra[0] < 0.2)
        p["moles"] = float(int(extra[1] * 3))
        p["m1x"], p["m1y"] = -22 + 44 * extra[2], -5 + 35 * extra[3]
        p["m2x"], p["m2y"] = -22 + 44 * extra[4], -5 + 35 * extra[5]
        p["hpart"] = -15 + 30 * extra[6]
        for k, v in p.items():
            fields.setdefault(k, []).append(v)
    return {k: np.asarray(v, dtype=np.float32)[:, None, None] for k, v in fields.items()}


def render_templates(ids: Sequence[int], seed: int) -> np.ndarray:
    """Part-mask templates ``uint8 [len(ids), 128, 128, 8]`` of the given identities."""
    p = identity_params(ids, seed)
    n = len(ids)
    grid = np.arange(TEMPLATE, dtype=np.float32)
    X = grid[None, None, :] - TEMPLATE / 2  # x relative to the face's vertical axis
    Y = grid[None, :, None]
    ax = np.abs(X)
    cy = p["cy"]
    dy = Y - cy
    ry = np.where(dy > 0, p["ry"] * p["jaw"], p["ry"])
    head_d = (X / p["rx"]) ** 2 + (dy / ry) ** 2
    head = _ramp(head_d - 1.0, 2.0 / p["rx"])
    ears = _ramp(((ax - p["rx"] - 1) / (p["ear"] * 0.6)) ** 2 + ((dy + 3) / p["ear"]) ** 2 - 1.0, 0.3)
    head = np.maximum(head, ears)

    eye_y = cy - p["ey"]
    eyes = _ramp(((ax - p["ex"]) / p["erx"]) ** 2 + ((Y - eye_y) / p["ery"]) ** 2 - 1.0, 0.5)
    bx = ax - p["ex"]
    brow_y = eye_y - p["bgap"] + p["btilt"] * bx + 0.08 * np.abs(bx) * np.abs(bx) / p["blen"]
    brows = _ramp(np.abs(Y - brow_y) - p["bth"], 1.0) * _ramp(np.abs(bx) - p["blen"], 1.0)

    nose_bottom = eye_y + p["nlen"]
    nostrils = _ramp(((ax - p["nw"]) / 2.2) ** 2 + ((Y - nose_bottom) / 1.4) ** 2 - 1.0, 0.6)
    bridge = 0.45 * _ramp(np.abs(X - 0.25 * p["nw"]) - 0.8, 1.0) * (Y > eye_y + 2) * (Y < nose_bottom)
    details = np.maximum(nostrils, bridge)
    for i, (mx, my) in enumerate((("m1x", "m1y"), ("m2x", "m2y"))):
        mole = _ramp((X - p[mx]) ** 2 + (Y - cy - p[my]) ** 2 - 3.2, 2.0) * (p["moles"] > i)
        details = np.maximum(details, mole)
    rim = np.sqrt(((ax - p["ex"]) / (p["erx"] + 4)) ** 2 + ((Y - eye_y) / (p["ery"] + 4)) ** 2)
    glasses = np.maximum(_ramp(np.abs(rim - 1.0) - 0.06, 0.08),
                         _ramp(np.abs(Y - eye_y + 1) - 0.8, 1.0) * (ax < p["ex"] - p["erx"] - 3))
    details = np.maximum(details, glasses * p["glasses"])

    mouth_y = cy + p["my"] + p["mcurve"] * X * X
    mouth = _ramp(np.abs(Y - mouth_y) - p["mth"], 1.0) * _ramp(ax - p["mw"], 1.5)

    hairline = cy - p["ry"] + p["hair"] + p["hwave"] * np.sin(X * 0.25 + p["hphase"]) \
        + 0.12 * np.abs(X - p["hpart"])
    outer = _ramp((X / (p["rx"] + 5)) ** 2 + ((Y - cy + 4) / (p["ry"] + 6)) ** 2 - 1.0, 0.08)
    sides = (ax > p["rx"] * 0.8) & (Y < cy + p["hside"] - 20)
    hair = outer * np.maximum(_ramp(Y - hairline, 2.0), sides.astype(np.float32))
    hair_off = hair * (1.0 - head)
    hair_on = hair * head
    free = 1.0 - hair_on
    shade = (0.5 + 0.5 * np.clip(X / p["rx"], -1, 1)) * head

    dark = np.maximum(eyes * free, details * head)
    chans = [head, dark, brows * free, mouth * head, hair_off, hair_on, shade]
    shape = (n, TEMPLATE, TEMPLATE)
    planes = [np.full(shape, 255, dtype=np.uint8)]
    planes += [np.broadcast_to(np.clip(m, 0, 1) * 255 + 0.5, shape).astype(np.uint8) for m in chans]
    return np.stack(planes, axis=-1)


class FaceRenderer:
    """Renders jittered views of procedural identities; templates are cached (LRU).

    Args:
        seed: identity seed: identity ``i`` looks the same for the same seed.
        difficulty: scales pose jitter (:data:`JITTER`), lighting, skin-tone spread, texture and
            noise (1.0 = default; 0 = frontal views without lighting or noise, but colours and
            mirroring still vary per image).
        cache: how many identity templates to keep (131 KB each).
    """

    def __init__(self, seed: int = 0, difficulty: float = 1.0, cache: int = 512):
        self.seed = int(seed)
        self.difficulty = float(difficulty)
        self._cache: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._cache_size = cache
        bank_rng = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, 4243]))
        self._noise = bank_rng.standard_normal((3, 256, 256)).astype(np.float32)
        coarse = bank_rng.standard_normal((3, 17, 17))
        fine = np.linspace(0, 16, 256)
        rows = np.stack([[np.interp(fine, np.arange(17), line) for line in plane] for plane in coarse])
        self._texture = np.stack([[np.interp(fine, np.arange(17), line) for line in plane.T]
                                  for plane in rows]).transpose(0, 2, 1).astype(np.float32)
        g = np.arange(IMAGE_SIZE, dtype=np.float32) - (IMAGE_SIZE - 1) / 2
        self._u = g[None, None, :]
        self._v = g[None, :, None]

    def warm(self, ids: Sequence[int]) -> None:
        """Build the missing templates of ``ids`` in one vectorised call (cheaper than a few at a time)."""
        missing = [i for i in dict.fromkeys(int(x) for x in ids) if i not in self._cache]
        if missing:
            for i, t in zip(missing, render_templates(missing, self.seed)):
                self._cache[i] = t

    def templates(self, ids: Sequence[int]) -> np.ndarray:
        """``uint8 [len(ids), 128, 128, 8]`` templates (from the cache where possible)."""
        self.warm(ids)
        out = np.empty((len(ids), TEMPLATE, TEMPLATE, _CH), dtype=np.uint8)
        for j, i in enumerate(ids):
            out[j] = self._cache[int(i)]
            self._cache.move_to_end(int(i))
        while len(self._cache) > max(self._cache_size, len(ids)):
            self._cache.popitem(last=False)
        return out

    def render(self, ids: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """``uint8 [len(ids), 112, 112, 3]`` RGB views of the given identities."""
        ids = [int(i) for i in ids]
        n = len(ids)
        if n == 0:
            return np.empty((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        d = self.difficulty
        uniq = list(dict.fromkeys(ids))
        slot = {ident: k for k, ident in enumerate(uniq)}
        table = self.templates(uniq).view(np.uint64).reshape(-1)
        row = np.asarray([slot[i] for i in ids], dtype=np.int32)[:, None, None] * (TEMPLATE * TEMPLATE)

        # Inverse similarity map (+ horizontal squeeze for fake yaw, mirror): image -> template.
        r = rng.random((n, 8), dtype=np.float32)
        theta = (r[:, 0] - 0.5) * (2 * JITTER["rotate"] * d)
        scale = 1.0 + (r[:, 1] - 0.5) * (2 * JITTER["scale"] * d)
        squeeze = 1.0 + (r[:, 2] - 0.5) * (2 * JITTER["squeeze"] * d)
        tx = (r[:, 3] - 0.5) * (2 * JITTER["shift"] * d)
        ty = (r[:, 4] - 0.5) * (2 * JITTER["shift"] * d)
        mirror = np.where(r[:, 5] < 0.5, -1.0, 1.0).astype(np.float32)
        c, s = np.cos(theta) / scale, np.sin(theta) / scale
        a11, a12 = c / squeeze * mirror, s / squeeze * mirror
        a21, a22 = -s, c
        half = TEMPLATE / 2
        b1 = half - a11 * tx - a12 * ty
        b2 = half - a21 * tx - a22 * ty
        u, v = self._u, self._v
        col3 = (slice(None), None, None)
        x = a11[col3] * u + (a12[col3] * v + b1[col3])
        y = a21[col3] * u + (a22[col3] * v + b2[col3])
        idx = np.clip(y, 0, TEMPLATE - 1, out=y).astype(np.int32)
        idx *= TEMPLATE
        idx += np.clip(x, 0, TEMPLATE - 1, out=x).astype(np.int32)
        idx += row
        masks = np.take(table, idx).view(np.uint8).reshape(n, IMAGE_SIZE * IMAGE_SIZE, _CH)
        masks = masks.astype(np.float32)

        # Per-image colours (nothing here depends on the identity), as weights of the 8 channels.
        col = rng.random((n, 8, 3), dtype=np.float32)
        tone = rng.random((n, 1), dtype=np.float32)
        skin = (np.array([90, 60, 45], np.float32) + tone * np.array([150, 140, 120], np.float32)
                + (col[:, 0] - 0.5) * 60 * d)
        bg = col[:, 1] * 255
        hair = col[:, 2] * np.where(col[:, 3, :1] < 0.7, 90, 255)
        dark = col[:, 4] * 70
        brow = hair * 0.8 + col[:, 5] * 30
        lips = skin * np.array([0.85, 0.55, 0.55], np.float32) + (col[:, 6] - 0.5) * 50
        light = (col[:, 7, :1] - 0.5) * 160 * min(d, 1.5)
        weights = np.stack([bg, skin - bg, dark - skin, brow - skin, lips - skin,
                            hair - bg, hair - skin, np.broadcast_to(light, (n, 3))], axis=2)
        weights = (weights / 255.0).astype(np.float32)  # float64 here would double the matmul
        img = np.matmul(weights, masks.transpose(0, 2, 1)).reshape(n, 3, IMAGE_SIZE, IMAGE_SIZE)

        # Lighting gradient, then sensor noise and a smooth colour texture (random crops of banks).
        g = rng.random((n, 3), dtype=np.float32) - 0.5
        gain = 1.0 + g[:, 0] * 0.5 * min(d, 1.5)
        shade = gain[col3] + (g[:, 1][col3] * u + g[:, 2][col3] * v) * (0.012 * d)
        img *= shade[:, None]
        offs = rng.integers(0, 256 - IMAGE_SIZE, size=(n, 4))
        amp = rng.random((n, 2), dtype=np.float32) * np.array([JITTER["noise"], JITTER["texture"]],
                                                              np.float32) * d
        for k in range(n):
            oy, ox, py, px = offs[k]
            img[k] += amp[k, 0] * self._noise[:, oy:oy + IMAGE_SIZE, ox:ox + IMAGE_SIZE]
            img[k] += amp[k, 1] * self._texture[:, py:py + IMAGE_SIZE, px:px + IMAGE_SIZE]
        np.clip(img, 0, 255, out=img)
        return np.ascontiguousarray(img.astype(np.uint8).transpose(0, 2, 3, 1))


_RENDERERS: "OrderedDict[Tuple[int, float], FaceRenderer]" = OrderedDict()


def render_faces(identity_ids: Sequence[int], rng: np.random.Generator, seed: int = 0,
                 difficulty: float = 1.0) -> np.ndarray:
    """``uint8 [len(ids), 112, 112, 3]`` RGB images of the given identities (in memory).

    Identities depend on ``seed`` only; the views (pose, colours, noise) on ``rng``.
    """
    key = (int(seed), float(difficulty))
    renderer = _RENDERERS.get(key)
    if renderer is None:
        renderer = _RENDERERS[key] = FaceRenderer(seed, difficulty)
        while len(_RENDERERS) > 4:
            _RENDERERS.popitem(last=False)
    out = []
    for start in range(0, len(identity_ids), _BATCH):
        out.append(renderer.render(identity_ids[start:start + _BATCH], rng))
    if not out:
        return np.empty((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return np.concatenate(out)


def _views(renderer: FaceRenderer, ids: Sequence[int], rng: np.random.Generator
           ) -> Iterable[Tuple[int, np.ndarray]]:
    """``(start, images)`` for consecutive batches of ``ids`` (grouped by identity); templates
    are built for the next batch's worth of identities at once."""
    ids = [int(i) for i in ids]
    for start in range(0, len(ids), _BATCH):
        batch = ids[start:start + _BATCH]
        if any(i not in renderer._cache for i in batch):
            renderer.warm(list(dict.fromkeys(ids[start:start + _BATCH * _BATCH]))[:_BATCH])
        yield start, renderer.render(batch, rng)


def encode_jpegs(images: np.ndarray, quality: int = 95) -> List[bytes]:
    """JPEG-encode ``uint8 [B, H, W, 3]`` RGB images (4:2:0, like the released data)."""
    return [simplejpeg.encode_jpeg(np.ascontiguousarray(im), quality=quality, colorspace="RGB",
                                   colorsubsampling="420") for im in images]


def _pair_plan(pairs: int, pool: int, rng: np.random.Generator) -> Tuple[List[int], List[bool]]:
    """Identity (index into the pool) of each of the ``2 * pairs`` images, and issame per pair."""
    same = np.zeros(pairs, dtype=bool)
    same[: pairs // 2] = True
    rng.shuffle(same)
    people: List[int] = []
    for s in same:
        a = int(rng.integers(pool))
        b = a if s else int((a + 1 + rng.integers(pool - 1)) % pool)
        people += [a, b]
    return people, same.tolist()


def synthesize(out_dir: PathLike, identities: int = 100, images_per_id: int = 10, pairs: int = 600,
               seed: int = 0, sets: Iterable[str] = SETS, difficulty: float = 1.0,
               eval_identities: Optional[int] = None, label_format: str = "float",
               header_at: str = "start", quality: int = 95,
               progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, object]:
    """Write a synthetic faces_emore folder.

    Layout: ``train.rec``/``train.idx`` (header record, ``identities * images_per_id`` image
    records grouped by class, one identity record per class), ``property``
    (``classes,112,112``) and ``<set>.bin`` with ``pairs`` pairs each (half same, half different)
    from identities held out of training.

    Args:
        label_format: ``"float"`` (flag 0, scalar label) or ``"multi"`` (flag 2: class, 0.0).
        header_at: ``"start"`` (key 0, images from key 1, like InsightFace) or ``"end"`` (images
            from key 0, the header written last) to exercise readers that look the header up.
        eval_identities: size of each pair set's identity pool (default ``max(10, pairs // 4)``).
        progress: called as ``progress(images_done, images_total)``.

    Returns:
        a summary dict (counts, paths, seconds, images_per_s).
    """
    if identities < 1 or images_per_id < 1 or pairs < 0:
        raise ValueError(f"need identities >= 1, images_per_id >= 1, pairs >= 0; got "
                         f"{identities}, {images_per_id}, {pairs}")
    if label_format not in ("float", "multi"):
        raise ValueError(f"label_format must be 'float' or 'multi', got {label_format!r}")
    if header_at not in ("start", "end"):
        raise ValueError(f"header_at must be 'start' or 'end', got {header_at!r}")
    sets = list(sets) if pairs > 0 else []  # a set of no pairs is no verification set
    pool = max(2, min(100_000, int(eval_identities if eval_identities is not None else max(10, pairs // 4))))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    renderer = FaceRenderer(seed, difficulty)
    n_images = identities * images_per_id
    total = n_images + 2 * pairs * len(sets)
    done = 0
    t0 = time.perf_counter()

    first_image = 1 if header_at == "start" else 0
    first_identity = first_image + n_images
    view_rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, 101]))
    header = pack(IRHeader(2, (float(first_identity), float(first_identity + identities)), 0, 0), b"")
    labels = np.repeat(np.arange(identities), images_per_id)
    with atomic_paths(out / "train.rec", out / "train.idx") as (tmp_rec, tmp_idx):
        with RecordWriter(tmp_rec, tmp_idx) as writer:
            if header_at == "start":
                writer.write(0, header)
            for start, images in _views(renderer, labels, view_rng):
                batch = labels[start:start + _BATCH]
                for j, jpeg in enumerate(encode_jpegs(images, quality)):
                    key = first_image + start + j
                    cls = float(batch[j])
                    label = (cls, 0.0) if label_format == "multi" else cls
                    writer.write(key, pack(IRHeader(0, label, key, 0), jpeg))
                done += len(batch)
                if progress is not None:
                    progress(done, total)
            for c in range(identities):
                lo = first_image + c * images_per_id
                identity = IRHeader(2, (float(lo), float(lo + images_per_id)), 0, 0)
                writer.write(first_identity + c, pack(identity, b""))
            if header_at == "end":
                writer.write(first_identity + identities, header)

    set_files = {}
    for name in sets:
        rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, 202, zlib.crc32(name.encode())]))
        people, issame = _pair_plan(pairs, pool, rng)
        # a set's identities depend on its name only, so lfw.bin is the same whatever else is written
        ids = [EVAL_ID_BASE + (zlib.crc32(name.encode()) % 997) * 100_000 + p for p in people]
        order = np.argsort(ids, kind="stable")  # render identity by identity (template reuse)
        jpegs: List[bytes] = [b""] * len(ids)
        for start, images in _views(renderer, [ids[k] for k in order], rng):
            chunk = order[start:start + _BATCH]
            for k, jpeg in zip(chunk, encode_jpegs(images, quality)):
                jpegs[k] = jpeg
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        path = out / f"{name}.bin"
        with atomic_paths(path) as (tmp,):
            write_bin(tmp, jpegs, issame, protocol=4)
        set_files[name] = str(path)
    (out / "property").write_text(f"{identities},{IMAGE_SIZE},{IMAGE_SIZE}\n", encoding="ascii")
    seconds = time.perf_counter() - t0
    summary = {
        "out_dir": str(out), "identities": identities, "images_per_id": images_per_id,
        "images": n_images, "pairs": {name: pairs for name in sets}, "seed": seed,
        "difficulty": difficulty, "label_format": label_format, "header_at": header_at,
        "train_rec": str(out / "train.rec"), "train_rec_bytes": (out / "train.rec").stat().st_size,
        "sets": set_files, "seconds": round(seconds, 3),
        "images_per_s": round(total / seconds, 1) if seconds > 0 else None,
    }
    log.info("synthesized %d train images (%d classes) and %d pair sets in %.1f s",
             n_images, identities, len(sets), seconds)
    return summary


def synthetic_shards(root: PathLike, identities: int, images_per_id: int, pairs: int = 0,
                     sets: Iterable[str] = (), seed: int = 0, shard_size: int = 1000,
                     difficulty: float = 1.0, progress: Optional[Callable[[str, int, int], None]] = None):
    """Synthesize a faces_emore folder and convert it: ``ROOT/faces`` -> ``ROOT/shards/{train,val}``.

    The one "synthesize then convert" step behind the demo, the benchmarks and the tests.

    Args:
        progress: called as ``progress(stage, done, total)`` (``done`` counts up to ``total``) with stage
            ``"synth"``, then convert-rec's stages.
    Returns:
        convert-rec's :class:`~lresnet.convert.convert_rec.ConvertSummary`; the training shards are in
        ``ROOT/shards/train``, the pair sets in ``ROOT/shards/val``.
    """
    from lresnet.convert.convert_rec import convert_rec

    root = Path(root)
    synth_progress = (lambda done, total: progress("synth", done, total)) if progress else None
    synthesize(root / "faces", identities=identities, images_per_id=images_per_id, pairs=pairs, seed=seed,
               sets=tuple(sets), difficulty=difficulty, progress=synth_progress)
    done: Dict[str, int] = {}

    def convert_progress(stage: str, advance: int, total: int) -> None:
        done[stage] = done.get(stage, 0) + advance
        progress(stage, done[stage], total)

    return convert_rec(root / "faces", root / "shards", shard_size=shard_size, seed=seed,
                       progress=convert_progress if progress else None)


# --------------------------------------------------------------------------- IJB-B / IJB-C layout
IJB_TARGETS = ("IJBC", "IJBB")
IJB_ID_BASE = 20_000_000  # identities of synthetic IJB sets: apart from training and pair-set ones
# Where the five landmarks (eyes, nose tip, mouth corners) of a rendered 112x112 view are taken to
# lie: the ArcFace alignment template (lresnet.eval.align.ARCFACE_TEMPLATE, kept equal by a test;
# this module does not import the eval layer), so aligning a loose crop gives back its view.
_VIEW_LANDMARKS = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                            [33.5493, 92.3655], [62.7299, 92.2041]], dtype=np.float32) + np.float32([8, 0])


def _write_text(path: Path, lines: Iterable[str]) -> None:
    with atomic_file(path, "w", encoding="ascii") as fh:
        fh.write("".join(f"{line}\n" for line in lines))


def _loose_crop(view: np.ndarray, rng: np.random.Generator, difficulty: float) -> Tuple[np.ndarray, np.ndarray]:
    """A larger, rotated and shifted frame around a 112x112 view (nearest-neighbour placement) and
    the 5 landmarks of the view mapped into it: ``(uint8 [H, W, 3], float32 [5, 2])``."""
    scale = 1.0 + rng.random() * 0.8
    theta = (rng.random() - 0.5) * 0.5 * min(difficulty, 2.0)
    height, width = (int(IMAGE_SIZE * scale * (1.25 + 0.5 * rng.random())) for _ in range(2))
    c, s = np.cos(theta) * scale, np.sin(theta) * scale
    forward = np.array([[c, -s], [s, c]])
    centre = np.array([width, height]) / 2 + (rng.random(2) - 0.5) * 0.2 * np.array([width, height])
    shift = centre - forward @ np.array([IMAGE_SIZE / 2, IMAGE_SIZE / 2])
    # inverse map: crop pixel -> view pixel
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    back = np.linalg.inv(forward)
    vx = back[0, 0] * (xs - shift[0]) + back[0, 1] * (ys - shift[1])
    vy = back[1, 0] * (xs - shift[0]) + back[1, 1] * (ys - shift[1])
    inside = (vx >= 0) & (vx < IMAGE_SIZE) & (vy >= 0) & (vy < IMAGE_SIZE)
    border = np.concatenate([view[0], view[-1], view[:, 0], view[:, -1]]).mean(axis=0)
    crop = np.clip(border + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    crop[inside] = view[vy[inside].astype(np.int64), vx[inside].astype(np.int64)]
    points = _VIEW_LANDMARKS.astype(np.float64) @ forward.T + shift + rng.normal(0, 0.4 * difficulty, (5, 2))
    return crop, points.astype(np.float32)


def synthesize_ijb(root: PathLike, target: str = "IJBC", identities: int = 12, templates_per_id: int = 3,
                   max_media: int = 3, max_images_per_media: int = 3, negatives_per_positive: float = 4.0,
                   seed: int = 0, difficulty: float = 1.0, quality: int = 95,
                   progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, object]:
    """Write a synthetic IJB-B/IJB-C folder in the layout arcface_torch's ``eval_ijbc.py`` reads.

    ``ROOT/<target>/loose_crop/<k>.jpg`` (k = 1..N, the images in a shuffled order), and in
    ``ROOT/<target>/meta/`` (``ijbc_`` or ``ijbb_`` prefix): ``face_tid_mid.txt`` (image, template
    id, media id), ``name_5pts_score.txt`` (image, 5 landmarks x y, detector score) and
    ``template_pair_label.txt`` (template, template, 1 same / 0 different). Each template holds
    1..``max_media`` media of 1..``max_images_per_media`` images of one identity; template ids are
    scattered integers and media ids are shared now and then between templates of one identity,
    as in the real files. Loose crops are rendered views (:class:`FaceRenderer`) placed, scaled
    and rotated in a larger frame; the landmarks are the view's five points mapped into it (with
    a little detector noise), so aligning a crop gives its view back. Every pair of templates of
    one identity is a positive pair; ``negatives_per_positive`` times as many negative pairs.

    Returns:
        a summary dict (folder, counts, seconds).
    """
    if target not in IJB_TARGETS:
        raise ValueError(f"target must be one of {IJB_TARGETS}, got {target!r}")
    if identities < 2 or templates_per_id < 2 or max_media < 1 or max_images_per_media < 1:
        raise ValueError(f"need identities >= 2, templates_per_id >= 2, max_media >= 1, max_images_per_media >= 1; "
                         f"got {identities}, {templates_per_id}, {max_media}, {max_images_per_media}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, 303, zlib.crc32(target.encode())]))
    folder = Path(root) / target
    crops, meta = folder / "loose_crop", folder / "meta"
    crops.mkdir(parents=True, exist_ok=True)
    meta.mkdir(parents=True, exist_ok=True)
    prefix = target.lower()

    num_templates = identities * templates_per_id
    template_ids = np.sort(rng.choice(np.arange(1, 40 * num_templates + 1), num_templates, replace=False))
    rng.shuffle(template_ids)
    owner = np.repeat(np.arange(identities), templates_per_id)
    rows: List[Tuple[int, int, int]] = []  # (template id, media id, identity)
    next_media = 1000 + int(rng.integers(1000))
    for ident in range(identities):
        seen: List[int] = []
        for t in np.flatnonzero(owner == ident):
            for _ in range(int(rng.integers(1, max_media + 1))):
                if seen and rng.random() < 0.2:
                    media = seen[int(rng.integers(len(seen)))]
                else:
                    next_media += 1 + int(rng.integers(50))
                    media = next_media
                    seen.append(media)
                rows += [(int(template_ids[t]), media, ident)] * int(rng.integers(1, max_images_per_media + 1))
    rows = [rows[k] for k in rng.permutation(len(rows))]

    renderer = FaceRenderer(seed, difficulty)
    people = [IJB_ID_BASE + (zlib.crc32(target.encode()) % 97) * 10_000 + r[2] for r in rows]
    tid_lines, pts_lines = [], []
    for start, views in _views(renderer, people, rng):
        for k, view in enumerate(views, start=start):
            crop, points = _loose_crop(view, rng, difficulty)
            name = f"{k + 1}.jpg"
            (crops / name).write_bytes(encode_jpegs(crop[None], quality)[0])
            tid_lines.append(f"{name} {rows[k][0]} {rows[k][1]}")
            coords = " ".join(f"{v:.3f}" for v in points.reshape(-1))
            pts_lines.append(f"{name} {coords} {0.5 + 0.5 * rng.random():.4f}")
        if progress is not None:
            progress(start + len(views), len(rows))

    positives = [(int(template_ids[a]), int(template_ids[b]), 1)
                 for ident in range(identities)
                 for i, a in enumerate(np.flatnonzero(owner == ident))
                 for b in np.flatnonzero(owner == ident)[i + 1:]]
    wanted = int(round(len(positives) * negatives_per_positive))
    negatives: Dict[Tuple[int, int], None] = {}
    limit = num_templates * (num_templates - templates_per_id) // 2
    while len(negatives) < min(wanted, limit):
        a, b = (int(v) for v in rng.integers(num_templates, size=2))
        if owner[a] != owner[b]:
            negatives[(int(template_ids[min(a, b)]), int(template_ids[max(a, b)]))] = None
    pairs = positives + [(a, b, 0) for a, b in negatives]
    pairs = [pairs[k] for k in rng.permutation(len(pairs))]

    _write_text(meta / f"{prefix}_face_tid_mid.txt", tid_lines)
    _write_text(meta / f"{prefix}_name_5pts_score.txt", pts_lines)
    _write_text(meta / f"{prefix}_template_pair_label.txt", (f"{a} {b} {label}" for a, b, label in pairs))
    seconds = time.perf_counter() - t0
    log.info("synthesized %s: %d images, %d templates, %d pairs in %.1f s", target, len(rows), num_templates,
             len(pairs), seconds)
    return {"folder": str(folder), "target": target, "identities": identities, "templates": num_templates,
            "media": len({(r[0], r[1]) for r in rows}), "images": len(rows), "pairs": len(pairs),
            "positive_pairs": len(positives), "negative_pairs": len(negatives), "seed": seed,
            "seconds": round(seconds, 3)}


__all__ = ["FaceRenderer", "render_faces", "render_templates", "identity_params", "encode_jpegs",
           "synthesize", "synthetic_shards", "synthesize_ijb", "SETS", "EVAL_ID_BASE", "IMAGE_SIZE", "IJB_TARGETS"]
