"""`--loader dali`: an NVIDIA DALI pipeline over the same shards and `.idx` files as the native loader.

The graph (:func:`dali_pipeline`) is DALI's own: ``fn.readers.webdataset`` (``ext=["jpg", "cls"]``,
the DALI index files convert-rec writes beside each shard, ``shard_id``/``num_shards`` = this rank
in the world, ``random_shuffle``) -> ``fn.decoders.image`` -> a ``fn.random.coin_flip`` mirror, to
the batch contract:

- on a GPU (``device="mixed"`` decode): ``fn.crop_mirror_normalize`` to the training layout on the
  device, float ``[B, 3, H, W]``, ``(x - 127.5) / 127.5`` (DevicePrefetcher only casts it);
- without one (``device_id=None``, ``"cpu"`` decode): ``fn.flip``, uint8 ``[B, H, W, 3]`` as the native
  loader yields, normalised by DevicePrefetcher. Measured on the CPU (images per CPU-second, batch 128,
  one thread, with the copy out of DALI): flip 6.5k, uint8 crop_mirror_normalize 4.6k, float
  crop_mirror_normalize 3.7k: the float batch is 4x the bytes and its copy alone costs a third.

The ``.cls`` text is parsed to int64 labels on the host.

How it runs (:class:`DaliLoader`) keeps lresnet's loader contract:

- a new pipeline per epoch, seeded by (seed, epoch, rank), reading DALI shard
  ``(rank + epoch) % world_size``: a new shuffle and a new shard for each rank every epoch;
- every rank yields exactly ``len(loader)`` batches, ``(samples // world_size) // batch_size``: DALI's
  shards differ by at most one sample, so every rank has that many full batches and stops there
  (DDP never waits on an uneven last batch);
- resume inside an epoch through DALI's pipeline checkpointing (``enable_checkpointing``, DALI >= 1.34):
  the state holds the checkpoints of the last two positions (DevicePrefetcher reports one batch less
  than it has taken). With a DALI without checkpointing, or a state without the checkpoint of its
  position, the epoch's pipeline is rebuilt and the consumed batches are read again and dropped
  (the same batches: the pipeline is seeded), which costs their decoding once.

Limits, against the native loader: DALI stops at the first JPEG it cannot decode and at an image of
another size than the training size (CPU; on a GPU it is cropped or padded to it), with an InputError
saying so, where the native loader counts and skips such samples; only the flip is applied
(``--augment`` is refused), and shards must be local files (not ``pipe:`` URLs). DALI is imported only
here, when asked for.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from lresnet.core.errors import InputError
from lresnet.pipeline.config import PipelineConfig
from lresnet.pipeline.loader import EpochLoader
from lresnet.pipeline.shards import ShardSet
from lresnet.pipeline.stages import Fault, seed_int
from lresnet.pipeline.world import World

Device = Union[str, torch.device]
INSTALL = "pip install 'lresnet[dali]'"
MEAN = STD = 127.5


def dali_installed() -> bool:
    """True when NVIDIA DALI is installed (without importing it; False also when no ``nvidia`` package exists)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # find_spec imports the parent package, "nvidia", first
        return False


def import_dali() -> Any:
    """The ``nvidia.dali`` module, or the one-line InputError saying how to install it."""
    try:
        import nvidia.dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except ImportError as err:
        raise InputError(None, f"--loader dali needs NVIDIA DALI ({INSTALL}): {err}") from None
    return nvidia.dali


def supports_checkpointing() -> bool:
    """True when the installed DALI can checkpoint and restore a pipeline (DALI >= 1.34)."""
    dali = import_dali()
    return "enable_checkpointing" in inspect.signature(dali.Pipeline.__init__).parameters


def dali_pipeline(paths: list[str], index_paths: Optional[list[str]], batch_size: int, shard_id: int,
                  num_shards: int, seed: int, threads: int, device_id: Optional[int], flip: bool = True,
                  image_size: tuple[int, int] = (112, 112), shuffle_buffer: int = 2000,
                  checkpoint: Optional[Any] = None) -> Any:
    """The DALI training graph, built: outputs `(images, cls uint8 [B, L] zero-padded, mirror [B])`.

    `device_id` None = CPU only, images uint8 [B, H, W, 3]; otherwise decoded and normalised on that
    GPU, images float [B, 3, H, W] (see the module docstring).
    """
    dali = import_dali()
    fn, types = dali.fn, dali.types
    gpu = device_id is not None
    extra = {"enable_checkpointing": True} if supports_checkpointing() else {}
    if checkpoint is not None:
        extra["checkpoint"] = checkpoint

    @dali.pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed, **extra)
    def graph():
        jpegs, cls = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, ext=["jpg", "cls"], missing_component_behavior="error",
            shard_id=shard_id, num_shards=num_shards, random_shuffle=shuffle_buffer > 1,
            initial_fill=max(1, shuffle_buffer), name="reader")
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        mirror = fn.random.coin_flip(probability=0.5 if flip else 0.0)
        if gpu:
            images = fn.crop_mirror_normalize(images, mirror=mirror, crop=list(image_size), out_of_bounds_policy="pad",
                                              mean=[MEAN] * 3, std=[STD] * 3, output_layout="CHW", dtype=types.FLOAT)
        else:
            images = fn.flip(images, horizontal=mirror)
        return images, fn.pad(cls, fill_value=0), mirror

    pipe = graph()
    pipe.build()
    return pipe


def parse_labels(cls: np.ndarray, num_classes: Optional[int]) -> tuple[torch.Tensor, list[int]]:
    """int64 labels from zero-padded ASCII rows; -1 (and its slot listed) for a row that is no class id."""
    labels, bad = [], []
    for slot, row in enumerate(cls):
        text = bytes(row).rstrip(b"\0").strip()
        label = int(text) if text.isdigit() else -1
        if label < 0 or (num_classes is not None and label >= num_classes):
            label = -1
            bad.append(slot)
        labels.append(label)
    return torch.tensor(labels, dtype=torch.int64), bad


def _to_torch(batch: Any, device_id: Optional[int], image_size: tuple[int, int]) -> torch.Tensor:
    """A DALI TensorList copied into a new torch tensor (DALI reuses its buffers): CPU uint8 [B, H, W, 3]
    or GPU float [B, 3, H, W].

    Raises:
        InputError: (CPU) an image of another size than `image_size` in the batch.
    """
    if device_id is None:
        shapes = {tuple(shape) for shape in batch.shape()}
        if shapes != {(image_size[0], image_size[1], 3)}:
            raise InputError(None, f"the DALI loader met an image of {sorted(shapes)}, expected "
                             f"{image_size[0]}x{image_size[1]}x3; --loader native counts and skips such samples")
        return torch.from_numpy(np.array(batch.as_tensor()))
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = batch.as_tensor()
    out = torch.empty(tensor.shape(), dtype=torch.float32, device=torch.device("cuda", device_id))
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(out.device))
    return out


class DaliLoader(EpochLoader):
    """Per-rank batches `(images, labels int64 [B])` from DALI: images uint8 [B, H, W, 3] on the CPU,
    float [B, 3, H, W] already normalised on a GPU.

    The same interface as lresnet.pipeline.TrainLoader (len, set_epoch, state_dict/load_state_dict,
    num_classes, stats); see the module docstring for how epochs, ranks and resume work.
    """

    MATCH = EpochLoader.MATCH + ("loader",)

    def __init__(self, shards: ShardSet, config: PipelineConfig, world: World, seed: int = 0,
                 device: Optional[Device] = None):
        import_dali()
        if config.augment:
            raise InputError("augment", f"got {list(config.augment)}, expected none with --loader dali "
                             "(it applies only the flip)")
        remote = [u for u in shards.urls if not os.path.isfile(u)]
        if remote:
            raise InputError(remote[0], "--loader dali reads local shard files only (not pipe: or URLs)")
        super().__init__(shards, config, world, seed)
        indexes = [os.path.splitext(u)[0] + ".idx" for u in shards.urls]
        self.index_paths = indexes if all(os.path.isfile(i) for i in indexes) else None
        dev = torch.device(device) if device is not None else None
        self.device_id = (dev.index if dev.index is not None else torch.cuda.current_device()) \
            if dev is not None and dev.type == "cuda" else None
        self._checkpoints: list[tuple[int, Any]] = []  # (position, DALI checkpoint) of the last two positions
        self._resume_from: Optional[Any] = None

    def _new_epoch(self) -> None:
        self._resume_from, self._checkpoints = None, []

    def state_dict(self) -> dict[str, Any]:
        """The position inside the epoch, DALI's checkpoints of it and of the one before, and what must match."""
        return dict(super().state_dict(), loader="dali",
                    checkpoints=[[position, checkpoint] for position, checkpoint in self._checkpoints])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`, from DALI's checkpoint of its position when the state holds one.

        Raises:
            ValueError: saved by another loader or with another seed, batch size, world or data set.
        """
        super().load_state_dict(state)
        self._resume_from = next((cp for pos, cp in state.get("checkpoints", []) if pos == self._position), None)
        self._checkpoints = [(self._position, self._resume_from)] if self._resume_from is not None else []

    def _pipeline(self, checkpoint: Optional[Any]) -> Any:
        world, config = self.world, self.config
        return dali_pipeline(self.shards.urls, self.index_paths, config.batch_size,
                             shard_id=(world.rank + self.epoch) % world.world_size, num_shards=world.world_size,
                             seed=seed_int(self.seed, self.epoch, world.rank) & 0x7FFFFFFF,
                             threads=max(1, config.workers), device_id=self.device_id, flip=config.flip,
                             image_size=self.shards.image_size or (112, 112), shuffle_buffer=config.shuffle_buffer,
                             checkpoint=checkpoint)

    def _run(self, pipe: Any) -> tuple:
        try:
            return pipe.run()
        except RuntimeError as err:
            if "decoders.image" not in str(err):
                raise
            reason = next((line.strip() for line in str(err).splitlines() if "failure" in line or "rror:" in line),
                          "a JPEG it cannot decode")
            raise InputError(None, f"the DALI loader stopped at a corrupt JPEG on rank {self.world.rank} ({reason}); "
                             "--loader native counts and skips corrupt samples") from None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._position >= self._len:
            self._position = 0
            self._new_epoch()
        checkpoint, self._resume_from = (self._resume_from if self._position else None), None
        pipe = self._pipeline(checkpoint)
        checkpointing = supports_checkpointing()
        if checkpoint is None:
            for _ in range(self._position):  # replay: the same seeded batches, read again and dropped
                self._run(pipe)
        try:
            while self._position < self._len:
                images, cls, _ = self._run(pipe)
                labels, bad = parse_labels(np.array(cls.as_tensor()), self.num_classes)
                self._book_bad_labels(bad, cls)
                batch = _to_torch(images, self.device_id, self.shards.image_size or (112, 112))
                self._position += 1
                if checkpointing:
                    self._checkpoints = self._checkpoints[-1:] + [(self._position, pipe.checkpoint())]
                yield batch, labels
        finally:
            del pipe  # its threads and buffers go before the next epoch's pipeline is built

    def _book_bad_labels(self, slots: list[int], cls: Any) -> None:
        """A `.cls` that is no class id in range: label -1 and a corrupt fault (strict: InputError)."""
        for slot in slots:
            where = cls[slot].source_info()  # "shard.tar:offset:key.cls"
            if self.config.strict:
                raise InputError(where, "corrupt sample: bad class member")
            self.stats.corrupt_samples += 1
            self.stats.faults.append(Fault("corrupt", where, None, "bad class member"))
