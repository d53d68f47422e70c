"""Streaming input pipeline: shards -> per-rank decode/augment -> uint8 batches -> normalised device tensors.

Knows nothing of models. The trainer calls::

    loader = build_train_loader(shard_dir, PipelineConfig(batch_size=128, workers=4), World.from_env())
    batches = DevicePrefetcher(loader, device, dtype=torch.bfloat16)
    for epoch in ...:
        loader.set_epoch(epoch)
        for images, labels in batches: ...
"""

from lresnet.pipeline.config import PipelineConfig
from lresnet.pipeline.decoders import available_decoders, get_decoder
from lresnet.pipeline.device import DevicePrefetcher, normalize_batch
from lresnet.pipeline.loader import LoaderStats, TrainLoader, build_train_loader, train_pipeline
from lresnet.pipeline.shards import ShardSet, expand_braces, resolve_source
from lresnet.pipeline.stages import Fault
from lresnet.pipeline.synthetic import SyntheticSource
from lresnet.pipeline.world import World

__all__ = [
    "DevicePrefetcher", "Fault", "LoaderStats", "PipelineConfig", "ShardSet", "SyntheticSource", "TrainLoader",
    "World", "available_decoders", "build_train_loader", "expand_braces", "get_decoder", "normalize_batch",
    "resolve_source", "train_pipeline",
]
