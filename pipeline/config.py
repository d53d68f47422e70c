"""The pipeline's config section: where the training data comes from and what the input pipeline does.

This is the ``data`` section of a training config, passed to the pipeline as it is (the
pipeline receives its own section, not a copy). The run's seed and the world (rank, size)
are not settings of the pipeline: :func:`lresnet.pipeline.build_train_loader` takes them
as arguments. Allowed decoder and augmentation names come from this layer's registries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lresnet.core.errors import InputError
from lresnet.core.schema import Section, at_least, greater, option

LOADERS = ("native", "dali")


def decoder_names() -> tuple[str, ...]:
    from lresnet.pipeline.decoders import DECODERS

    return DECODERS


def augmentation_names() -> list[str]:
    from lresnet.pipeline.augment import EXTRA_AUGMENTATIONS

    return list(EXTRA_AUGMENTATIONS)


@dataclass(frozen=True)
class PipelineConfig(Section):
    """Input pipeline settings (the ``data`` section of a training config)."""

    PANEL = "Data"

    shards: str = option("", help="Shard dir, manifest.json, brace pattern (train-{000000..000579}.tar), "
                         "or 'synthetic'.")
    manifest: str = option("", help="manifest.json giving the sample counts of remote shards "
                           "(a 'pipe:...{000000..000579}.tar' pattern).")
    batch_size: int = option(128, help="Batch size per device.", check=greater(0))
    workers: int = option(2, help="DataLoader worker processes per rank (0 = decode in the training process).",
                          check=at_least(0))
    shuffle_buffer: int = option(2000, help="Samples in each worker's shuffle buffer (0 or 1 = no shuffle).",
                                 check=at_least(0))
    loader: str = option("native", help="Input pipeline: lresnet's own (native), or an NVIDIA DALI pipeline over "
                         "the same shards and .idx files (dali; pip install 'lresnet[dali]').", choices=LOADERS)
    decoder: str = option("simplejpeg", help="JPEG decoder of the native loader; nvjpeg decodes each batch on the "
                          "GPU (torchvision), the workers only read and batch the JPEG bytes.", choices=decoder_names)
    flip: bool = option(True, help="Random horizontal flip (p = 0.5).")
    augment: tuple[str, ...] = option((), help="Extra augmentations, comma-separated (default none).",
                                      choices=augmentation_names, metavar="NAMES")
    strict: bool = option(False, help="Fail on a corrupt sample instead of counting and skipping it.")
    prefetch_factor: int = option(2, help="Batches each worker prepares ahead (each holds prefetch_factor + 2 "
                                  "batch buffers in shared memory: mind a small /dev/shm).", check=greater(0))
    pin_memory: Optional[bool] = option(None, help="Pin host batches for fast copies (default: when CUDA is "
                                        "available).")
    synthetic_classes: int = option(1000, help="Classes of --shards synthetic (in-memory batches, no I/O).",
                                    check=greater(1))
    pipe_timeout: float = option(600.0, help="Seconds a 'pipe:' shard command may send nothing before training "
                                 "stops with an error naming it.", check=greater(0))

    def check(self) -> None:
        """The device decoder applies only the flip (the other augmentations run on the CPU).

        (The DALI loader's own limits are checked when it is built, lresnet.pipeline.dali: they
        depend on what that loader does, not on this section.)
        """
        from lresnet.pipeline.decoders import DEVICE_DECODERS

        if self.augment and self.decoder in DEVICE_DECODERS:
            raise InputError("augment", f"got {list(self.augment)}, expected none with --decoder {self.decoder} "
                             "(it applies only the flip)")
