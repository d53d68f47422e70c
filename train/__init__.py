"""Training: the loop, optimizer/schedule, AMP, distributed setup, checkpoints, metrics.

    >>> from lresnet.train import build_config, train
    >>> cfg = build_config({"data": {"shards": "OUT/train"}, "model": {"net": "ir100e"}, "out": "runs/r1"})
    >>> result = train(cfg)          # resumes from runs/r1 when it holds a checkpoint

Under torchrun every process runs the same call; rank and world come from the environment.
"""

from lresnet.train.config import TrainConfig, build_config, load_config_file, save_config, validate
from lresnet.train.loop import TrainingAborted, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingAborted", "build_config", "load_config_file", "save_config",
           "train", "validate"]
