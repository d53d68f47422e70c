"""MobileFaceNet (Chen et al., 2018): a ~1 M-parameter backbone for fast experiments and CPU demos.

Table 1 of the paper, at 112x112: conv3x3/2 (64) -> depthwise conv3x3 (64) -> inverted-residual
bottlenecks (expansion t, channels c, repeats n, first stride s) -> conv1x1 (512) -> global
depthwise conv 7x7 ("GDC", linear) -> linear projection to the embedding -> BN1d.
PReLU throughout, as in the paper. With the paper's 128-d embedding it has ~1.0 M parameters
and ~0.22 GMAC; lresnet's default embedding is 512 (like the rest of the registry).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from lresnet.model.registry import check_sizes, register_backbone

# (expansion t, out channels c, repeats n, stride of the first repeat s) -- the paper's Table 1.
PAPER_BOTTLENECKS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


class ConvBN(nn.Sequential):
    """Conv (no bias, "same" padding unless given) -> BN -> optional PReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1, act: bool = True, padding: Optional[int] = None):
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel, stride=stride,
                      padding=kernel // 2 if padding is None else padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if act:
            layers.append(nn.PReLU(out_channels))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise 3x3 (stride) -> linear 1x1 project; residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = ConvBN(in_channels, hidden)
        self.depthwise = ConvBN(hidden, hidden, 3, stride=stride, groups=hidden)
        self.project = ConvBN(hidden, out_channels, act=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet for 112x112 faces.

    Args:
        embedding_size: output size D (paper: 128; lresnet default: 512).
        dropout: dropout before the final projection.
        bottlenecks: ``(t, c, n, s)`` rows (default: the paper's Table 1).
        width: channels of the stem and of the GDC input (64 and 512 in the paper).
    """

    def __init__(self, embedding_size: int = 512, dropout: float = 0.0,
                 bottlenecks: Sequence[tuple[int, int, int, int]] = PAPER_BOTTLENECKS,
                 stem_channels: int = 64, head_channels: int = 512, input_size: int = 112):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        check_sizes("stem_channels", [stem_channels])
        check_sizes("head_channels", [head_channels])
        check_sizes("embedding_size", [embedding_size])
        if isinstance(bottlenecks, (str, bytes)) or not all(
                isinstance(row, (list, tuple)) and len(row) == 4 for row in bottlenecks):
            raise ValueError(f"bottlenecks must be rows (t, c, n, s), got {bottlenecks!r}")
        for row in bottlenecks:
            check_sizes("bottlenecks", row)
        self.embedding_size = embedding_size
        self.num_features = head_channels
        self.stem = nn.Sequential(
            ConvBN(3, stem_channels, 3, stride=2),
            ConvBN(stem_channels, stem_channels, 3, groups=stem_channels),
        )
        blocks = []
        in_channels = stem_channels
        for expansion, channels, repeats, stride in bottlenecks:
            for i in range(repeats):
                blocks.append(Bottleneck(in_channels, channels, stride if i == 0 else 1, expansion))
                in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = ConvBN(in_channels, head_channels)
        strides = 2 * 2 ** sum(1 for row in bottlenecks if row[3] == 2)
        if input_size % strides:
            raise ValueError(f"input_size must be a multiple of {strides}, got {input_size}")
        spatial = input_size // strides
        self.gdc = ConvBN(head_channels, head_channels, spatial, groups=head_channels, act=False,
                          padding=0)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(head_channels, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 112, 112]`` -> ``[B, 512, 7, 7]``."""
        return self.conv_head(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map -> embedding ``[B, D]`` (not L2-normalised)."""
        x = torch.flatten(self.gdc(x), 1)
        return self.features(self.fc(self.dropout(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_backbone
def mobilefacenet(**kwargs) -> MobileFaceNet:
    """MobileFaceNet (paper Table 1), 512-d embedding by default."""
    return MobileFaceNet(**kwargs)
