"""Pipeline stages: small generators `Iterator[sample] -> Iterator[sample]`, one concern each.

A sample is a dict in webdataset's style: `__key__`, `__url__` (the shard) and the member
payloads by extension (`jpg`, `cls`). Samples are grouped into batches while still encoded, as
in DALI: the random numbers are drawn per batch, and the decode stage writes each image straight
into its slot of the batch buffer. Faults are appended to a shared list that the decode stage
hands on with each batch, so the main process can count and report them. Stages are composed
in lresnet.pipeline.loader.train_pipeline.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import numpy.random  # noqa: F401  (numpy loads it lazily: imported here, before workers fork, not once in each)
import torch

from lresnet.convert.shards import TarReadError, read_samples
from lresnet.core.errors import InputError
from lresnet.pipeline.augment import Augmentation, HorizontalFlip
from lresnet.pipeline.decoders import SampleError, check_shape
from lresnet.pipeline.pipes import open_pipe
from lresnet.pipeline.plan import Segment


Sample = dict[str, Any]


@dataclass(frozen=True)
class Fault:
    """A bad sample or shard met while reading: `kind` is "corrupt", "truncated" or "short"."""

    kind: str
    shard: str
    key: Optional[str]
    message: str

    def __str__(self) -> str:
        where = f" key {self.key}" if self.key else ""
        return f"{self.shard}:{where}: {self.kind}: {self.message}"


def bad_sample(shard: str, key: Optional[str], err: SampleError, faults: list, strict: bool) -> None:
    """Book one unusable sample: a "corrupt" fault, or under `strict` an InputError naming shard and key."""
    if strict:
        raise InputError(shard, f"corrupt sample: {err}", where=f"key {key}") from err
    faults.append(Fault("corrupt", shard, key, str(err) or type(err).__name__))


def sample_label(sample: Sample, num_classes: Optional[int]) -> int:
    """The class id of a sample's `cls` member.

    Raises:
        SampleError: no `cls` member, not a decimal integer, or outside [0, num_classes).
    """
    raw = sample.get("cls")
    if raw is None:
        raise SampleError("sample has no 'cls' member")
    try:
        label = int(raw)
    except ValueError:
        raise SampleError(f"class member is {bytes(raw[:24])!r}, expected a decimal integer") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise SampleError(f"class {label} out of range [0, {num_classes})")
    return label


def sample_jpeg(sample: Sample) -> bytes:
    """The encoded image of a sample. Raises: SampleError: it has no `jpg` member."""
    data = sample.get("jpg")
    if data is None:
        raise SampleError("sample has no 'jpg' member")
    return data


PIPE_TIMEOUT = 600.0  # seconds a `pipe:` command may send nothing (PipelineConfig.pipe_timeout)


def open_shard(url: str, bufsize: int = 1 << 20, timeout: float = PIPE_TIMEOUT) -> BinaryIO:
    """Open a shard for reading: a local path directly; `pipe:COMMAND` as the command's output, each
    read waiting at most `timeout` seconds (lresnet.pipeline.pipes); other URLs through webdataset's gopen."""
    if url.startswith("file:"):
        url = url[5:]
    if url.startswith("pipe:") and not os.path.exists(url):
        return open_pipe(url[5:], timeout, url, bufsize)
    if ":" in url.split("/", 1)[0] and not os.path.exists(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb", bufsize=bufsize)
    return open(url, "rb", buffering=bufsize)


def read_shards(segments: Iterable[Segment], urls: Sequence[str], faults: list, strict: bool = False,
                opener: Callable[[str], BinaryIO] = open_shard) -> Iterator[Sample]:
    """Source: the samples of each segment, in order.

    A shard that is cut short or holds fewer samples than planned is a fault: counted and
    skipped (strict: InputError naming the shard and the place). A missing shard always raises.
    """
    for seg in segments:
        url = urls[seg.shard]
        wanted = seg.stop - seg.start
        got = 0
        try:
            stream = opener(url)
        except OSError as err:
            raise InputError(url, f"cannot open shard: {err.strerror or err}") from err
        try:
            size = os.fstat(stream.fileno()).st_size if hasattr(stream, "fileno") and os.path.exists(url) else None
            for key, parts in read_samples(stream, skip=seg.start, limit=wanted, size_hint=size):
                got += 1
                parts["__key__"] = key
                parts["__url__"] = url
                yield parts
        except TarReadError as err:
            if strict:
                raise InputError(url, err.message, where=err.where) from err
            faults.append(Fault("truncated", url, err.key, f"{err.message} at {err.where}; "
                                f"{wanted - got} planned samples missing"))
            continue
        except OSError as err:  # a read error on a local file
            raise InputError(url, f"cannot read shard: {err}") from err
        finally:
            try:
                stream.close()
            except OSError as err:  # a `pipe:` command that failed (webdataset checks its exit status)
                if got < wanted:
                    raise InputError(url, f"shard stream failed: {err}") from err
        if got < wanted:
            message = f"holds {seg.start + got} samples, the manifest says at least {seg.stop}"
            if strict:
                raise InputError(url, message)
            faults.append(Fault("short", url, None, message))


def seed_int(*parts: int) -> int:
    high, low = np.random.SeedSequence(list(parts)).generate_state(2, np.uint32)
    return (int(high) << 32) | int(low)


def shuffle(samples: Iterable[Sample], bufsize: int, seed: Sequence[int]) -> Iterator[Sample]:
    """Shuffle through a buffer of `bufsize` samples (deterministic for a given seed)."""
    if bufsize <= 1:
        yield from samples
        return
    rand = random.Random(seed_int(*seed)).random
    buf: list[Sample] = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        k = int(rand() * bufsize)
        out, buf[k] = buf[k], sample
        yield out
    # drain in a seeded random order
    while buf:
        k = int(rand() * len(buf))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()


def skip(samples: Iterable[Sample], count: int) -> Iterator[Sample]:
    """Drop the first `count` samples (already consumed before a resume)."""
    yield from itertools.islice(samples, count, None)


def _new_shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # straight in shared memory, as torch's collate does in workers: sending it then copies nothing
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)  # what torch's own collate uses
    if new_shared is None:
        return torch.empty(shape, dtype=dtype).share_memory_()
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(new_shared(nbytes)).view(shape)


def batch(samples: Iterable[Sample], batch_size: int, num_batches: int) -> Iterator[list[Optional[Sample]]]:
    """Group the (still encoded) samples into exactly `num_batches` lists of `batch_size`.

    Slots left empty because the stream ran short (a shard was cut short) hold None.
    """
    it = iter(samples)
    for _ in range(num_batches):
        group = list(itertools.islice(it, batch_size))
        if len(group) < batch_size:
            group.extend([None] * (batch_size - len(group)))
        yield group


def attach_random(batches: Iterable[list], width: int, seed: Sequence[int],
                  first: int = 0) -> Iterator[tuple[list, Optional[np.ndarray]]]:
    """Give each batch its uniforms for augmentation, `[batch_size, width]` (None when width is 0).

    One seeded stream, `width` numbers per sample in sample order; a run resumed at batch `first`
    draws and drops the skipped batches' numbers first, so each batch gets exactly what it got in
    the uninterrupted run.
    """
    if not width:
        for group in batches:
            yield group, None
        return
    rng = np.random.default_rng(list(seed))
    it = iter(batches)
    group = next(it, None)
    if group is None:
        return
    for done in range(0, first, 1024):  # in chunks, so a late resume needs little memory
        rng.random((min(1024, first - done) * len(group), width))
    while group is not None:
        yield group, rng.random((len(group), width))
        group = next(it, None)


def apply_augmentations(image: np.ndarray, augmentations: Sequence[Augmentation], u: Sequence[float]) -> np.ndarray:
    """Apply the augmentations in order, each reading its uniforms from `u`."""
    i = 0
    for aug in augmentations:
        image = aug.apply(image, u, i)
        i += aug.n_random
    return image


def decode(batches: Iterable[tuple[list, Optional[np.ndarray]]], decoder: Callable[[bytes], np.ndarray],
           augmentations: Sequence[Augmentation], image_size: tuple[int, int], num_classes: Optional[int],
           faults: list, strict: bool = False, ring: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, list]]:
    """Decode and augment each batch's samples into `(images uint8 [B,H,W,3] RGB, labels int64 [B], faults)`.

    Each image is augmented on its way into its slot of the batch buffer, while it is in the cache.
    A decoder with `into` (simplejpeg) fills the slot in one copy from a cached scratch image, the
    flip (when it is the only augmentation) done in that same copy: no array per image, no second
    copy. Otherwise the image is decoded, augmented (`apply_augmentations`) and copied into its slot.

    A sample that does not decode, has the wrong size, a missing member or a bad label (a
    SampleError, nothing else: any other exception is a bug and propagates) is a fault: it is
    counted and its slot kept (the batch shape never changes, so DDP collectives stay in step),
    with label -1, which the margin heads ignore, and a copy of a good image of the batch so
    normalisation statistics are not skewed; so are empty slots (None). Strict: InputError naming
    shard and key. `faults` (also filled by the source) is emptied into each batch.

    With `ring` > 0 (in DataLoader workers) batches are written into `ring` shared-memory buffers used
    in turn: no fresh shared memory (page faults, ~15 us per image) and no copy when sending. The
    consumer must copy a batch out before `ring` more arrive (TrainLoader does; pinning copies too).
    """
    into = getattr(decoder, "into", None)
    flip_only = len(augmentations) == 1 and isinstance(augmentations[0], HorizontalFlip)
    direct = into is not None and (not augmentations or flip_only)
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    for index, (group, rand) in enumerate(batches):
        shape = (len(group), image_size[0], image_size[1], 3)
        if ring:
            if not buffers:
                buffers = [(_new_shared(shape, torch.uint8), _new_shared(shape[:1], torch.int64)) for _ in range(ring)]
            images, labels = buffers[index % ring]
        else:
            images, labels = torch.empty(shape, dtype=torch.uint8), torch.empty(shape[0], dtype=torch.int64)
        view = images.numpy()
        if direct:
            mirror = (rand[:, 0] < augmentations[0].p).tolist() if flip_only else [False] * len(group)
        label_list = []
        holes = []
        for slot, sample in enumerate(group):
            if sample is None:
                holes.append(slot)
                label_list.append(-1)
                continue
            try:
                label = sample_label(sample, num_classes)
                if direct:
                    into(sample_jpeg(sample), view[slot], mirror[slot])
                else:
                    image = decoder(sample_jpeg(sample))
                    check_shape(image.shape, shape[1:])
            except SampleError as err:
                bad_sample(sample["__url__"], sample["__key__"], err, faults, strict)
                holes.append(slot)
                label_list.append(-1)
                continue
            if not direct:
                view[slot] = apply_augmentations(image, augmentations, rand[slot]) if augmentations else image
            label_list.append(label)
        labels.numpy()[:] = label_list
        if holes:
            good = next((slot for slot, label in enumerate(label_list) if label >= 0), None)
            for slot in holes:
                view[slot] = 0 if good is None else view[good]
        handed, faults[:] = list(faults), []
        yield images, labels, handed


@dataclass
class EncodedBatch:
    """A batch of still-encoded JPEGs for a device decoder (nvjpeg): the bytes of each slot, one after
    another, in `data`; `lengths[i]` bytes for slot i (0: an empty or bad slot, label already -1);
    `mirror[i]` whether slot i is flipped. `shards`/`keys` name each slot's sample for fault reports.

    Made in a worker (stage `encode`), decoded in the training process (lresnet.pipeline.gpudecode),
    which books the samples that do not decode through `report` (set by the loader) or, strict,
    raises InputError.
    """

    data: torch.Tensor  # uint8 [total bytes]
    lengths: list[int]
    mirror: torch.Tensor  # bool [B]
    shards: list[Optional[str]]
    keys: list[Optional[str]]
    image_size: tuple[int, int]
    strict: bool = False
    report: Optional[Callable[[list[Fault]], None]] = None

    def __len__(self) -> int:
        return len(self.lengths)


def encode(batches: Iterable[tuple[list, Optional[np.ndarray]]], augmentations: Sequence[Augmentation],
           image_size: tuple[int, int], num_classes: Optional[int], faults: list,
           strict: bool = False) -> Iterator[tuple[EncodedBatch, torch.Tensor, list]]:
    """For a device decoder: each batch as `(EncodedBatch, labels int64 [B], faults)`, nothing decoded.

    The labels are parsed and the flips drawn here from the same uniforms as `decode` uses (so a
    run is the same with either decoder, and resumes the same); `augmentations` may hold only the
    flip. A sample without a `jpg` member or with a bad label is a fault here, as in `decode`.
    """
    if any(not isinstance(a, HorizontalFlip) for a in augmentations):
        raise ValueError("a device decoder applies only the flip, got "
                         f"{[type(a).__name__ for a in augmentations]}")
    flip = augmentations[0] if augmentations else None
    for group, rand in batches:
        payloads, label_list, shards, keys = [], [], [], []
        for sample in group:
            data, label = b"", -1
            if sample is not None:
                try:
                    label = sample_label(sample, num_classes)
                    data = sample_jpeg(sample)
                except SampleError as err:
                    bad_sample(sample["__url__"], sample["__key__"], err, faults, strict)
                    data, label = b"", -1
            payloads.append(data)
            label_list.append(label)
            shards.append(None if sample is None else sample["__url__"])
            keys.append(None if sample is None else sample["__key__"])
        mirror = torch.from_numpy(rand[:, 0] < flip.p) if flip is not None else torch.zeros(len(group), dtype=torch.bool)
        data = torch.frombuffer(bytearray(b"".join(payloads)), dtype=torch.uint8) if any(payloads) \
            else torch.empty(0, dtype=torch.uint8)
        encoded = EncodedBatch(data, [len(p) for p in payloads], mirror, shards, keys, tuple(image_size), strict)
        handed, faults[:] = list(faults), []
        yield encoded, torch.tensor(label_list, dtype=torch.int64), handed
