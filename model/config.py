"""The model layer's config sections: which backbone, which margin head.

The allowed names come from this layer's registries (``list_backbones()``, ``HEAD_NAMES``),
read only when a value is checked, so importing this module does not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from lresnet.core.errors import InputError
from lresnet.core.schema import Section, at_least, between, greater, option


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def backbone_names() -> list[str]:
    from lresnet.model.registry import list_backbones

    return list_backbones()


def head_names() -> tuple[str, ...]:
    from lresnet.model.partial_fc import HEAD_NAMES

    return HEAD_NAMES


@dataclass(frozen=True)
class ModelConfig(Section):
    """Backbone: a registry name (``lresnet model-info`` lists them)."""

    PANEL = "Model"

    net: str = option("ir100e", help="Backbone name (lresnet model-info lists them): ir100e, irse100, ir50, "
                      "mobilefacenet, ...", choices=backbone_names)
    embedding_size: int = option(512, help="Embedding size D.", check=greater(0))
    dropout: float = option(0.0, help="Dropout in the output block (the paper trained LResNet100E-IR with 0.4).",
                            check=between(0, 1))
    channels_last: bool = option(True, help="channels_last memory format for the backbone on accelerators.")
    compile: bool = option(False, help="torch.compile the backbone (the margin head stays eager and fp32).")
    compile_mode: str = option("default", help="torch.compile mode.", choices=COMPILE_MODES)
    options: dict[str, Any] = option(default_factory=dict, flag="--net-option", metavar="NAME=JSON",
                                     help="Extra backbone keyword (repeat), e.g. widths=[16,32,64,128].")


@dataclass(frozen=True)
class HeadConfig(Section):
    """Margin head. ``partial_fc`` shards the class centres across ranks."""

    PANEL = "Head"

    name: str = option("arcface", flag="--head", help="Margin head.", choices=head_names)
    s: float = option(64.0, flag="--margin-s", help="Scale s.", check=greater(0))
    m: Optional[float] = option(None, flag="--margin-m", help="Margin m (default: arcface 0.5, cosface 0.4).",
                                check=between(0, math.pi))
    m1: float = option(1.0, help="Combined margin m1 (multiplicative angular).", check=greater(0))
    m2: float = option(0.5, help="Combined margin m2 (additive angular).", check=between(0, math.pi))
    m3: float = option(0.0, help="Combined margin m3 (additive cosine).", check=at_least(0))
    partial_fc: bool = option(False, help="Shard the class centres across ranks (model parallel).")
    sample_rate: float = option(1.0, help="Partial FC: fraction of negative centres sampled per step.",
                                check=between(0, 1, lo_open=True, hi_open=False))

    def check(self) -> None:
        if self.sample_rate < 1.0 and not self.partial_fc:
            raise InputError("sample_rate", f"got {self.sample_rate}, expected 1.0 unless head.partial_fc is on")
