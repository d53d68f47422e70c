"""IR and IR-SE ResNets for 112x112 faces (ArcFace paper, "improved residual" units).

Structure: stem (conv3x3 stride 1 -> BN -> PReLU), four stages of IR units at widths
64/128/256/512 (the first unit of every stage has stride 2, so 112 -> 7), then the "E" output
block BN2d -> Dropout -> Flatten -> Linear(512*7*7 -> D) -> BN1d.

Two unit styles exist in the wild and both are built here, because their weights differ in
structure, not only in names:

- ``"paper"`` (ArcFace paper, InsightFace MXNet, arcface_torch ``iresnet*``):
  BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN; the shortcut is 1x1 conv + BN in the
  first unit of every stage (including stage 1, where only the stride changes), identity elsewhere.
- ``"treb1en"`` (TreB1eN InsightFace_Pytorch and the ports that copy it):
  BN -> conv3x3 -> PReLU -> conv3x3(stride) -> BN (no BN between the convs); the shortcut is a
  parameter-free ``MaxPool2d(1, stride)`` wherever the channel count does not change (stage 1's
  first unit and every non-first unit) and 1x1 conv + BN where it does.

IR-SE adds squeeze-excitation (reduction 16) after the unit's last BN.

Sizes at 112x112 (counted by :mod:`lresnet.model.macs`, conv + linear MACs, all parameters):

    =======  =====================  =======================  =======
    depth    paper unit             treb1en unit             GMAC
    =======  =====================  =======================  =======
    IR-50    43,590,848 (43.59 M)   43,574,976 (43.57 M)     6.31
    IR-100   65,156,160 (65.16 M)   65,129,792 (65.13 M)     12.09
    =======  =====================  =======================  =======

The literature's figures (IR-50 43.6 M / 6.3 GMAC, IR-100 65.2 M / 12.1 GMAC) are the paper
unit with the E block: 0.02 % and 0.07 % off. The TreB1eN unit drops one BN per unit and
stage 1's projection shortcut (IR-100: 0.11 % fewer). Without the E block (global pooling
instead) IR-100 would be 12.85 M parameters smaller: the E block's 25088 -> 512 linear layer.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from lresnet.model.registry import check_sizes, register_backbone

UNITS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    152: (3, 8, 36, 3),
    200: (6, 26, 60, 6),
}
WIDTHS = (64, 128, 256, 512)
UNIT_STYLES = ("paper", "treb1en")

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[[int], nn.Module]


def _prelu(channels: int) -> nn.Module:
    return nn.PReLU(channels)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BN always follows or precedes)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class SqueezeExcite(nn.Module):
    """Channel gate: global average pool -> 1x1 conv (C -> C/r) -> ReLU -> 1x1 conv -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class IRUnit(nn.Module):
    """One improved-residual unit; see the module docstring for the two styles."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, style: str = "paper",
                 se: bool = False, norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = _prelu):
        super().__init__()
        _check_style(style)
        self.bn1 = norm_layer(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.bn2 = norm_layer(out_channels) if style == "paper" else nn.Identity()
        self.act = act_layer(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels, stride)
        self.bn3 = norm_layer(out_channels)
        self.se = SqueezeExcite(out_channels) if se else nn.Identity()
        self.shortcut = self._shortcut(in_channels, out_channels, stride, style, norm_layer)

    @staticmethod
    def _shortcut(in_channels: int, out_channels: int, stride: int, style: str,
                  norm_layer: NormLayer) -> nn.Module:
        projection = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm_layer(out_channels))
        if in_channels != out_channels:
            return projection
        if style == "paper":
            return projection if stride != 1 else nn.Identity()
        # TreB1eN: a 1x1 max-pool is a strided pick of pixels, no parameters.
        return nn.MaxPool2d(1, stride) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.act(self.bn2(out)))
        out = self.se(self.bn3(out))
        return out + self.shortcut(x)


class OutputBlockE(nn.Module):
    """The "E" output block: BN2d -> Dropout -> Flatten -> Linear(C*H*W -> D) -> BN1d.

    ``fix_gamma`` freezes the final BN's scale at 1 (InsightFace MXNet / arcface_torch); the
    parameter is kept so that weights with any value still load.
    Flatten goes through ``torch.flatten`` (a copy when needed), so channels_last inputs work.
    """

    def __init__(self, channels: int, spatial: int, embedding_size: int, dropout: float = 0.0,
                 fix_gamma: bool = False, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.bn = norm_layer(channels)
        self.dropout = nn.Dropout(dropout)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        self.fix_gamma = fix_gamma
        if fix_gamma:
            nn.init.ones_(self.features.weight)
            self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(self.flatten(self.dropout(self.bn(x)))))


class IResNet(nn.Module):
    """IR / IR-SE ResNet for 112x112 face crops.

    Args:
        units: units per stage, e.g. ``(3, 13, 30, 3)`` for IR-100.
        embedding_size: output size D.
        dropout: dropout probability in the E block (the paper trained LResNet100E-IR with 0.4).
        unit_style: ``"paper"`` or ``"treb1en"`` (module docstring).
        se: add squeeze-excitation to every unit (IR-SE).
        fix_gamma: freeze the embedding BN's scale; default True for "paper", False for "treb1en",
            as in the respective sources.
        input_size: square input side (112); must be a multiple of 16.
        widths: stage widths.
        norm_layer, act_layer: constructors taking a channel count.
    """

    def __init__(self, units: Sequence[int], embedding_size: int = 512, dropout: float = 0.0,
                 unit_style: str = "paper", se: bool = False, fix_gamma: Optional[bool] = None,
                 input_size: int = 112, widths: Sequence[int] = WIDTHS,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = _prelu):
        super().__init__()
        _check_style(unit_style)
        check_sizes("widths", widths)
        check_sizes("units", units)
        check_sizes("embedding_size", [embedding_size])
        if len(units) != len(widths):
            raise ValueError(f"units has {len(units)} stages, widths has {len(widths)}; they must match")
        stride_total = 2 ** len(widths)
        if input_size % stride_total:
            raise ValueError(f"input_size must be a multiple of {stride_total}, got {input_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.units = tuple(units)
        self.depth = _depth_of(self.units)
        self.unit_style = unit_style
        self.se = se
        self.embedding_size = embedding_size
        self.num_features = widths[-1]

        self.stem = nn.Sequential(OrderedDict(
            conv=conv3x3(3, widths[0]), bn=norm_layer(widths[0]), act=act_layer(widths[0])))
        stages = []
        in_channels = widths[0]
        for count, width in zip(units, widths):
            blocks = [IRUnit(in_channels if i == 0 else width, width, 2 if i == 0 else 1,
                             unit_style, se, norm_layer, act_layer) for i in range(count)]
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.head = OutputBlockE(widths[-1], input_size // stride_total, embedding_size, dropout,
                                 fix_gamma=(unit_style == "paper") if fix_gamma is None else fix_gamma,
                                 norm_layer=norm_layer)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> feature map ``[B, 512, H/16, W/16]``."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map -> embedding ``[B, D]`` (not L2-normalised)."""
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, unit_style={self.unit_style!r}, se={self.se}"


def _check_style(style: str) -> None:
    if style not in UNIT_STYLES:
        raise ValueError(f"unit_style must be one of {', '.join(UNIT_STYLES)}, got {style!r}")


def _depth_of(units: tuple[int, ...]) -> int:
    for depth, counts in UNITS.items():
        if counts == units:
            return depth
    # 2 convs per unit + stem + output linear, as ResNet depths are counted.
    return 2 * sum(units) + 2


def iresnet(depth: int, se: bool = False, **kwargs) -> IResNet:
    """IR (``se=False``) or IR-SE ResNet of a standard depth (18, 34, 50, 100, 152, 200)."""
    if depth not in UNITS:
        raise ValueError(f"depth must be one of {', '.join(map(str, UNITS))}, got {depth}")
    return IResNet(UNITS[depth], se=se, **kwargs)


def _irse(depth: int, **kwargs) -> IResNet:
    # IR-SE defaults to the TreB1eN unit: that is the IR-SE the reference port trains and whose
    # published weights (e.g. model_ir_se50.pth) exist; pass unit_style="paper" for the other.
    kwargs.setdefault("unit_style", "treb1en")
    return iresnet(depth, se=True, **kwargs)


@register_backbone
def ir18(**kwargs) -> IResNet:
    """IR-18, paper unit, E block."""
    return iresnet(18, **kwargs)


@register_backbone
def ir34(**kwargs) -> IResNet:
    """IR-34, paper unit, E block."""
    return iresnet(34, **kwargs)


@register_backbone
def ir50(**kwargs) -> IResNet:
    """IR-50, paper unit, E block (arcface_torch ``iresnet50``)."""
    return iresnet(50, **kwargs)


@register_backbone
def ir100(**kwargs) -> IResNet:
    """IR-100, paper unit, E block (arcface_torch ``iresnet100``)."""
    return iresnet(100, **kwargs)


@register_backbone
def ir100e(**kwargs) -> IResNet:
    """LResNet100E-IR, the ArcFace paper's model: IR-100 with the E output block.

    The same network as ``ir100`` (every IR variant here ends in the E block); the paper
    trained it with ``dropout=0.4``.
    """
    return iresnet(100, **kwargs)


@register_backbone
def ir152(**kwargs) -> IResNet:
    """IR-152, paper unit, E block."""
    return iresnet(152, **kwargs)


@register_backbone
def ir200(**kwargs) -> IResNet:
    """IR-200, paper unit, E block (arcface_torch ``iresnet200``)."""
    return iresnet(200, **kwargs)


@register_backbone
def irse18(**kwargs) -> IResNet:
    """IR-SE-18, TreB1eN unit by default."""
    return _irse(18, **kwargs)


@register_backbone
def irse34(**kwargs) -> IResNet:
    """IR-SE-34, TreB1eN unit by default."""
    return _irse(34, **kwargs)


@register_backbone
def irse50(**kwargs) -> IResNet:
    """IR-SE-50, TreB1eN unit by default (TreB1eN ``Backbone(50, mode="ir_se")``)."""
    return _irse(50, **kwargs)


@register_backbone
def irse100(**kwargs) -> IResNet:
    """IR-SE-100, TreB1eN unit by default: what the reference port trains."""
    return _irse(100, **kwargs)


@register_backbone
def irse152(**kwargs) -> IResNet:
    """IR-SE-152, TreB1eN unit by default."""
    return _irse(152, **kwargs)


@register_backbone
def irse200(**kwargs) -> IResNet:
    """IR-SE-200, TreB1eN unit by default."""
    return _irse(200, **kwargs)
