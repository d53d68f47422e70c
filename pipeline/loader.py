"""The training input pipeline: its definition (`train_pipeline`) and how it runs (`TrainLoader`)."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lresnet.core.errors import InputError
from lresnet.pipeline import stages
from lresnet.pipeline.augment import build_augmentations, random_width
from lresnet.pipeline.config import PipelineConfig
from lresnet.pipeline.decoders import DEVICE_DECODERS, get_decoder
from lresnet.pipeline.plan import batches_per_rank, worker_plan
from lresnet.pipeline.shards import ShardSet, Source, resolve_source
from lresnet.pipeline.stages import Fault
from lresnet.pipeline.workers import guard_workers
from lresnet.pipeline.world import World

logger = logging.getLogger(__name__)

STATE_VERSION = 1
MAX_KEPT_FAULTS = 1000
WARN_EACH = 10  # the first bad inputs are logged one by one...
WARN_EVERY = 1000  # ...then one summary line per this many (and one at the end of an epoch)


def train_pipeline(shards: ShardSet, config: PipelineConfig, world: World, seed: int, epoch: int, role: int,
                   roles: int, start_batch: int = 0,
                   shared: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, list]]:
    """The pipeline, read top to bottom: split -> source -> shuffle -> batch -> decode + augment.

    Yields this worker role's batches of the epoch (after the first `start_batch` batches of the
    rank, which a resumed run has already consumed) as `(images, labels, faults)`; with a device
    decoder (nvjpeg) `images` is a stages.EncodedBatch, decoded later in the training process.
    """
    image_size = shards.image_size or (112, 112)
    seeds = (seed, epoch, world.rank, role, roles)
    augmentations = build_augmentations(config.flip, config.augment)
    faults: list[Fault] = []
    opener = functools.partial(stages.open_shard, timeout=config.pipe_timeout)

    plan = worker_plan(shards.counts, config.batch_size, world, seed, epoch, role, roles, start_batch)  # split
    samples = stages.read_shards(plan.segments, shards.urls, faults, strict=config.strict, opener=opener)  # source
    samples = stages.shuffle(samples, config.shuffle_buffer, seeds + (1,))
    samples = stages.skip(samples, plan.skip_batches * config.batch_size)  # resume: drop before decoding
    batches = stages.batch(samples, config.batch_size, plan.num_batches - plan.skip_batches)
    batches = stages.attach_random(batches, random_width(augmentations), seeds + (2,), first=plan.skip_batches)
    if config.decoder in DEVICE_DECODERS:  # bytes only: the training process decodes on the device
        return stages.encode(batches, augmentations, image_size, shards.num_classes, faults, strict=config.strict)
    return stages.decode(batches, get_decoder(config.decoder), augmentations, image_size,  # decode + augment
                         shards.num_classes, faults, strict=config.strict, ring=config.prefetch_factor + 2 if shared else 0)


class _EpochStream(IterableDataset):
    """One epoch of one rank, split over the DataLoader's workers (picklable: plain values only)."""

    def __init__(self, shards: ShardSet, config: PipelineConfig, world: World, seed: int, epoch: int,
                 start_batch: int):
        super().__init__()
        self.shards, self.config, self.world, self.seed = shards, config, world, seed
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        roles, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # the DataLoader asks worker 0 first; after a resume at batch k that must be role k % roles
        role = (worker + self.start_batch) % roles
        batches = train_pipeline(self.shards, self.config, self.world, self.seed, self.epoch, role, roles,
                                 start_batch=self.start_batch, shared=info is not None)
        return batches if info is None else _send_from_ring(batches, worker)


def _send_from_ring(batches: Iterator[tuple], worker: int) -> Iterator[tuple]:
    """In a worker: `(images, labels, faults, slot)`, the tensors only the first time a ring buffer is used.

    Sending a shared-memory tensor costs a file-descriptor transfer over a socket in the worker and
    an mmap plus page faults in the main process, ~9 us per image in all; after the first round the
    main process already holds every buffer of the ring (TrainLoader keeps them by `slot`), so a batch
    is sent as its slot alone. Encoded batches (a device decoder) are fresh objects, sent whole with
    no slot. The DataLoader re-raises a worker's exception as RuntimeError(traceback text) when it
    cannot be rebuilt from one string, as InputError cannot: its parts are sent instead, as
    `(None, None, (path, message, where), None)`.
    """
    sent: set[int] = set()
    try:
        for images, labels, faults in batches:
            if isinstance(images, stages.EncodedBatch):
                yield images, labels, faults, None
                continue
            slot = (worker, images.data_ptr())
            if slot[1] in sent:
                yield None, None, faults, slot
            else:
                sent.add(slot[1])
                yield images, labels, faults, slot
    except InputError as err:
        yield None, None, (err.path, err.message, err.where), None


@dataclass
class LoaderStats:
    """Bad input met so far (counted in the main process, from what the workers report)."""

    corrupt_samples: int = 0
    truncated_shards: int = 0
    faults: list[Fault] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"corrupt_samples": self.corrupt_samples, "truncated_shards": self.truncated_shards,
                "faults": [str(f) for f in self.faults]}

    @property
    def total(self) -> int:
        """Bad samples and damaged shards met so far."""
        return self.corrupt_samples + self.truncated_shards


class EpochLoader:
    """What every per-rank loader shares: `len()` batches per epoch on every rank, `set_epoch`, the
    position inside the epoch, and the checks before resuming from a `state_dict()`.

    Subclasses name in `MATCH` the state fields that must agree to resume, extend `state_dict()`,
    and reset what they keep per epoch in `_new_epoch()`.
    """

    MATCH: tuple[str, ...] = ("version", "seed", "batch_size", "world_size", "num_samples")

    def __init__(self, shards: ShardSet, config: PipelineConfig, world: World, seed: int = 0):
        self.shards, self.config, self.world, self.seed = shards, config, world, seed
        self.stats = LoaderStats()
        self.epoch = 0
        self._position = 0
        self._len = batches_per_rank(shards.counts, config.batch_size, world.world_size)

    def __len__(self) -> int:
        return self._len

    @property
    def num_classes(self) -> Optional[int]:
        """Classes in the data set (from the manifest or the shards)."""
        return self.shards.num_classes

    @property
    def num_samples(self) -> int:
        """Samples in the data set (all ranks)."""
        return self.shards.num_samples

    @property
    def samples_per_epoch(self) -> int:
        """Samples used per epoch over all ranks (the rest, under world_size x batch_size, are left out)."""
        return self._len * self.config.batch_size * self.world.world_size

    @property
    def position(self) -> int:
        """Batches of the current epoch consumed so far."""
        return self._position

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch starts at its first batch, the same one keeps its position."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._position = 0
            self._new_epoch()

    def _new_epoch(self) -> None:
        """Forget what was kept for the previous epoch's position (nothing here)."""

    def state_dict(self) -> dict[str, Any]:
        """The position inside the epoch, plus what must match on resume."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self._position,
                "seed": self.seed, "batch_size": self.config.batch_size, "rank": self.world.rank,
                "world_size": self.world.world_size, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` (its `position` possibly lowered by DevicePrefetcher).

        Raises:
            ValueError: the state was saved by another loader, or with another seed, batch size,
                world, worker count or data set.
        """
        mine = self.state_dict()
        for name in self.MATCH:
            if state.get(name) != mine[name]:
                raise ValueError(f"cannot resume the input pipeline: {name} was {state.get(name)} when saved, "
                                 f"is {mine[name]} now (resume needs the same {name})")
        position = int(state["position"])
        if not 0 <= position <= self._len:
            raise ValueError(f"loader position must be in [0, {self._len}], got {position}")
        self.epoch = int(state["epoch"])
        self._position = position


class TrainLoader(EpochLoader):
    """Per-rank batches of one training source; create with `build_train_loader`.

    Iterating yields `len(self)` batches `(images uint8 [B, H, W, 3] RGB, labels int64 [B])` for the
    current epoch (pinned when `config.pin_memory`); label -1 marks a slot whose sample was bad.
    `set_epoch(e)` selects the epoch (a new shard order, shuffle and flips); `state_dict()` records
    how many batches of the epoch were consumed, and after `load_state_dict()` iteration yields exactly
    the remaining batches of that epoch. Resume needs the same seed, batch size, world and workers.
    """

    MATCH = EpochLoader.MATCH + ("workers",)

    def __init__(self, shards: ShardSet, config: PipelineConfig, world: World, seed: int = 0):
        super().__init__(shards, config, world, seed)
        self._pin = torch.cuda.is_available() if config.pin_memory is None else config.pin_memory
        self._warned = 0  # faults logged (one by one or in a summary)

    def state_dict(self) -> dict[str, Any]:
        """The position inside the epoch, plus what must match on resume (the worker count too)."""
        return dict(super().state_dict(), workers=max(1, self.config.workers))

    def _record(self, faults: list[Fault]) -> None:
        """Count bad input; log the first WARN_EACH faults one by one, then one line per WARN_EVERY."""
        for fault in faults:
            if fault.kind == "corrupt":
                self.stats.corrupt_samples += 1
            else:
                self.stats.truncated_shards += 1
            if len(self.stats.faults) < MAX_KEPT_FAULTS:
                self.stats.faults.append(fault)
            seen = self.stats.total
            if seen <= WARN_EACH:
                logger.warning("skipped bad input: %s", fault)
                self._warned = seen
                if seen == WARN_EACH:
                    logger.warning("%d bad inputs so far: further ones are summarised every %d", seen, WARN_EVERY)
            elif seen % WARN_EVERY == 0:
                self._summarise(fault)

    def _summarise(self, latest: Optional[Fault] = None) -> None:
        """One line for the faults not logged yet."""
        stats = self.stats
        logger.warning("skipped bad input: %d so far (%d corrupt samples, %d damaged shards), %d since the last "
                       "report%s", stats.total, stats.corrupt_samples, stats.truncated_shards, stats.total - self._warned,
                       f"; latest: {latest}" if latest is not None else "")
        self._warned = stats.total

    def _batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list]]:
        """This epoch's `(images, labels, faults)` from `start`; from workers, still in their ring buffers."""
        stream = _EpochStream(self.shards, self.config, self.world, self.seed, self.epoch, start)
        if self.config.workers == 0:
            yield from stream
            return
        loader = DataLoader(stream, batch_size=None, num_workers=self.config.workers, pin_memory=False,
                            prefetch_factor=self.config.prefetch_factor, persistent_workers=False)
        ring: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for images, labels, faults, slot in guard_workers(loader):
            if slot is None:
                if images is None:  # an InputError in the worker, sent as its parts
                    raise InputError(*faults)
                yield images, labels, faults  # an encoded batch: a fresh object, no ring slot
                continue
            slot = tuple(slot)  # the DataLoader hands tuples on as lists
            if images is None:
                images, labels = ring[slot]
            else:
                ring[slot] = images, labels
            yield images, labels, faults

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        if self._position >= self._len:
            self._position = 0  # an iterator started at the end of an epoch runs it again
        for images, labels, faults in self._batches(self._position):
            if faults:
                self._record(faults)
            if isinstance(images, stages.EncodedBatch):  # decoded by DevicePrefetcher; it reports bad JPEGs here
                images.report = self._record
                self._position += 1
                yield images, labels
                continue
            if self._pin:
                images, labels = images.pin_memory(), labels.pin_memory()
            elif self.config.workers > 0:
                # the worker reuses its shared buffers (stages.decode ring): copy out before it does
                images, labels = images.clone(), labels.clone()
            self._position += 1
            yield images, labels
        if self.stats.total > self._warned:
            self._summarise()


def build_train_loader(source: Optional[Source], config: PipelineConfig, world: Optional[World] = None,
                       manifest: Optional[Union[str, "os.PathLike[str]"]] = None, seed: int = 0,
                       device: Optional[Union[str, torch.device]] = None) -> Any:
    """The per-rank loader over `source` (shard dir, manifest, brace pattern, shard list or `pipe:` URLs).

    A TrainLoader, or with ``config.loader == "dali"`` a lresnet.pipeline.dali.DaliLoader: both yield
    `len()` batches per epoch on every rank and resume inside an epoch.

    Args:
        source: the shards; None = ``config.shards``.
        config: the pipeline section.
        world: this rank and the world size (default: a single process).
        manifest: sample counts for a list of remote (`pipe:`) shards, matched by file name;
            None = ``config.manifest`` when set.
        seed: the run's seed; shard order, shuffle and augmentation derive from (seed, epoch, rank, worker).
        device: the training device, when known: `--decoder nvjpeg` needs CUDA, DALI decodes there.
    Raises:
        InputError: the source cannot be resolved, or yields no batch for this world and batch size;
            the decoder or loader asked for cannot run here (a missing library, not a CUDA device).
    """
    world = world or World()
    if config.decoder in DEVICE_DECODERS and config.loader == "native":
        from lresnet.pipeline.gpudecode import require_nvjpeg

        require_nvjpeg(device)
    elif config.loader == "native":
        get_decoder(config.decoder)  # a missing library is one line here, not a traceback in a worker
    shards = resolve_source(config.shards if source is None else source, manifest or config.manifest or None)
    if config.loader == "dali":
        from lresnet.pipeline.dali import DaliLoader

        loader: Any = DaliLoader(shards, config, world, seed, device=device)
    else:
        loader = TrainLoader(shards, config, world, seed)
    if len(loader) == 0:
        raise InputError(shards.urls[0] if len(shards.urls) == 1 else None,
                         f"{shards.num_samples} samples give no batch of {config.batch_size} "
                         f"on each of {world.world_size} ranks")
    dropped = shards.num_samples - loader.samples_per_epoch
    if dropped > 0.01 * shards.num_samples:
        logger.warning("%d of %d samples (%.1f%%) are left out each epoch: fewer ranks or a smaller batch "
                       "would use more", dropped, shards.num_samples, 100 * dropped / shards.num_samples)
    return loader
