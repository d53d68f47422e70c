"""Tiny data and a tiny backbone for the training tests (kept fast: 1 CPU thread, 16 identities)."""

from __future__ import annotations

import pytest

from lresnet.train.config import build_config, merge

# A MobileFaceNet cut down to ~2.4 MMAC: fast enough to train for a few dozen steps in a test.
TINY_NET = {"net": "mobilefacenet", "embedding_size": 32,
            "options": {"bottlenecks": [[2, 16, 1, 2], [2, 16, 1, 2], [2, 32, 1, 2]],
                        "stem_channels": 8, "head_channels": 32}}

TINY_NET_FLAGS = ["--net", "mobilefacenet", "--embedding-size", "32",
                  "--net-option", "bottlenecks=[[2,16,1,2],[2,16,1,2],[2,32,1,2]]",
                  "--net-option", "stem_channels=8", "--net-option", "head_channels=32"]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """16 identities x 8 images in 4 shards, and a 40-pair lfw set from held-out identities."""
    from lresnet.convert.synthetic import synthetic_shards

    root = tmp_path_factory.mktemp("tiny")
    synthetic_shards(root, identities=16, images_per_id=8, pairs=40, seed=0, sets=("lfw",), shard_size=40)
    return root / "shards" / "train", root / "shards" / "val"


@pytest.fixture
def tiny_config(tiny_shards, tmp_path):
    """Build a config for the tiny data + net; keyword sections override the defaults."""

    def make(**sections):
        base = {"out": str(tmp_path / "run"), "threads": 1, "model": TINY_NET,
                "head": {"s": 16.0, "m": 0.2},
                "data": {"shards": str(tiny_shards[0]), "batch_size": 16, "workers": 0, "shuffle_buffer": 64},
                "optim": {"lr": 0.1},
                "schedule": {"max_steps": 24},
                "log": {"every": 1, "tensorboard": False},
                "checkpoint": {"every": 0}}
        return build_config(merge(base, sections))

    return make

