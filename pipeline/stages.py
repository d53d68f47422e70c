"""Pipeline stages: small generators `Iterator[sample] -> Iterator[sample]`, one concern each.

A sample is a dict in webdataset's style: `__key__`, `__url__` (the shard) and the member
payloads by extension (`jpg`, `cls`); later stages add `rand` (uniforms for augmentation),
`image` (uint8 HWC RGB, None when the sample was bad) and `label`. Faults are appended to a
shared list that the batch stage hands on with each batch, so the main process can count and
report them. Stages are composed in lresnet.pipeline.loader.train_pipeline.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from lresnet.convert.errors import InputError
from lresnet.pipeline.augment import Augmentation
from lresnet.pipeline.plan import Segment
from lresnet.pipeline.tario import TarReadError, read_samples


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


def open_shard(url: str, bufsize: int = 1 << 20) -> BinaryIO:
    """Open a shard for reading: a local path directly; `pipe:` and URLs through webdataset's gopen."""
    if url.startswith("file:"):
        url = url[5:]
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


def _seed_int(*parts: int) -> int:
    high, low = np.random.SeedSequence(list(parts)).generate_state(2, np.uint32)
    return (int(high) << 32) | int(low)


def shuffle(samples: Iterable[Sample], bufsize: int, seed: Sequence[int]) -> Iterator[Sample]:
    """Shuffle through a buffer of `bufsize` samples (deterministic for a given seed)."""
    if bufsize <= 1:
        yield from samples
        return
    rand = random.Random(_seed_int(*seed)).random
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


def attach_random(samples: Iterable[Sample], width: int, seed: Sequence[int], chunk: int = 256) -> Iterator[Sample]:
    """Give each sample its `width` uniforms for augmentation, drawn in stream order."""
    if width == 0:
        yield from samples
        return
    rng = np.random.default_rng(list(seed))
    rows: list = []
    i = chunk
    for sample in samples:
        if i == chunk:
            rows = rng.random((chunk, width)).tolist()
            i = 0
        sample["rand"] = rows[i]
        i += 1
        yield sample


def skip(samples: Iterable[Sample], count: int) -> Iterator[Sample]:
    """Drop the first `count` samples (already consumed before a resume)."""
    yield from itertools.islice(samples, count, None)


def decode(samples: Iterable[Sample], decoder: Callable[[bytes], np.ndarray], image_size: tuple[int, int],
           num_classes: Optional[int], faults: list, strict: bool = False) -> Iterator[Sample]:
    """Decode `jpg` to a uint8 HWC RGB `image` and `cls` to an int `label`.

    A sample that does not decode, has the wrong size or a bad label is a fault: it is counted
    and passed on with image None (strict: InputError naming shard and key).
    """
    shape = (image_size[0], image_size[1], 3)
    for sample in samples:
        try:
            image = decoder(sample.pop("jpg"))
            if image.shape != shape:
                raise ValueError(f"image is {'x'.join(map(str, image.shape))}, expected {'x'.join(map(str, shape))}")
            label = int(sample.pop("cls"))
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise ValueError(f"class {label} out of range [0, {num_classes})")
        except Exception as err:  # any decoder failure on one sample is a data fault, not a crash
            if isinstance(err, KeyError):
                err = ValueError(f"sample has no {err.args[0]!r} member")
            if strict:
                raise InputError(sample["__url__"], f"corrupt sample: {err}", where=f"key {sample['__key__']}") from err
            faults.append(Fault("corrupt", sample["__url__"], sample["__key__"], str(err) or type(err).__name__))
            image, label = None, -1
        sample["image"] = image
        sample["label"] = label
        yield sample


def augment(samples: Iterable[Sample], augmentations: Sequence[Augmentation]) -> Iterator[Sample]:
    """Apply the augmentations in order, each reading its uniforms from `rand`."""
    if not augmentations:
        yield from samples
        return
    for sample in samples:
        image = sample["image"]
        if image is not None:
            u = sample["rand"]
            i = 0
            for aug in augmentations:
                image = aug.apply(image, u, i)
                i += aug.n_random
            sample["image"] = image
        yield sample


def _new_shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # straight in shared memory, as torch's collate does in workers: sending it then copies nothing
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)  # what torch's own collate uses
    if new_shared is None:
        return torch.empty(shape, dtype=dtype).share_memory_()
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(new_shared(nbytes)).view(shape)


def batch(samples: Iterable[Sample], batch_size: int, num_batches: int, image_size: tuple[int, int],
          faults: list, ring: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, list]]:
    """Collect exactly `num_batches` batches `(images uint8 [B,H,W,3], labels int64 [B], faults)`.

    A bad sample keeps its slot (the batch shape never changes, so DDP collectives stay in step):
    the slot gets label -1, which the margin heads ignore, and a copy of a good image of the batch
    so normalisation statistics are not skewed. Slots left empty because a shard was cut short are
    filled the same way. `faults` is emptied into each batch.

    With `ring` > 0 (in DataLoader workers) batches are written into `ring` shared-memory buffers used
    in turn: no fresh shared memory (page faults, ~15 us per image) and no copy when sending. The
    consumer must copy a batch out before `ring` more arrive (TrainLoader does; pinning copies too).
    """
    shape = (batch_size, image_size[0], image_size[1], 3)
    buffers = [(_new_shared(shape, torch.uint8), _new_shared((batch_size,), torch.int64)) for _ in range(ring)]
    it = iter(samples)
    last_good: Optional[np.ndarray] = None
    for index in range(num_batches):
        if buffers:
            images, labels = buffers[index % ring]
        else:
            images, labels = torch.empty(shape, dtype=torch.uint8), torch.empty(batch_size, dtype=torch.int64)
        view = images.numpy()
        label_view = labels.numpy()
        holes = []
        for slot in range(batch_size):
            sample = next(it, None)
            if sample is None or sample["image"] is None:
                holes.append(slot)
                label_view[slot] = -1
                continue
            view[slot] = last_good = sample["image"]
            label_view[slot] = sample["label"]
        for slot in holes:
            if last_good is None:
                view[slot] = 0
            else:
                view[slot] = last_good
        handed, faults[:] = list(faults), []
        yield images, labels, handed
