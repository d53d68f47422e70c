"""What a backbone is: parameters, MACs, unit style and output block (``lresnet model-info``).

    >>> from lresnet.model import describe_backbone, describe_weights_file
    >>> describe_backbone("ir100e").macs            # 12.09 G at 112x112, conv + linear
    >>> describe_weights_file("backbone.pth")       # source, channel order, which backbone fits

Backbones are built on the ``meta`` device, so sizing a 100-layer network allocates no weights.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from lresnet.core.errors import InputError
from lresnet.model.iresnet import IResNet
from lresnet.model.macs import count_parameters, profile_macs
from lresnet.model.registry import create_backbone
from lresnet.model.weights import describe_state_dict, read_state_dict

# What each IR unit style computes (``ModelInfo.unit_style`` names one of them).
UNIT_STYLES = {
    "paper": "BN-conv3x3-BN-PReLU-conv3x3(stride)-BN, 1x1 conv+BN shortcut in each stage's first unit",
    "treb1en": "BN-conv3x3-PReLU-conv3x3(stride)-BN, MaxPool2d(1, stride) shortcut where channels stay",
}


@dataclass(frozen=True)
class ModelInfo:
    """What ``lresnet model-info`` reports for one backbone."""

    name: str
    architecture: str
    unit_style: Optional[str]
    se: bool
    parameters: int
    trainable_parameters: int
    macs: int
    embedding_size: int
    input_size: int
    output_block: str

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` row."""
        return asdict(self)


def describe_backbone(name: str, input_size: int = 112, **kwargs) -> ModelInfo:
    """Build ``name`` on the meta device (no weights allocated) and count parameters and MACs.

    Args:
        name: a registered backbone (:func:`~lresnet.model.list_backbones`).
        input_size: side of the square input image.
        **kwargs: backbone options, e.g. ``embedding_size=256``, ``unit_style="treb1en"``.

    Raises:
        InputError: an unknown name, an option the family does not have, or an embedding size
            below 1.
    """
    embedding_size = kwargs.get("embedding_size", 512)
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size < 1:
        raise InputError("--embedding-size", f"got {embedding_size!r}, expected a positive integer")
    try:
        with torch.device("meta"):
            model = create_backbone(name, input_size=input_size, **kwargs)
    except TypeError as err:  # an option this family does not have, e.g. unit_style for MobileFaceNet
        raise InputError(name, f"bad backbone option: {err}") from None
    profile = profile_macs(model, (1, 3, input_size, input_size))
    return ModelInfo(
        name=name,
        architecture=type(model).__name__ + (f"-{model.depth}" if hasattr(model, "depth") else ""),
        unit_style=getattr(model, "unit_style", None),
        se=bool(getattr(model, "se", False)),
        parameters=count_parameters(model),
        trainable_parameters=count_parameters(model, trainable_only=True),
        macs=profile.macs,
        embedding_size=model.embedding_size,
        input_size=input_size,
        output_block=_output_block(model),
    )


def _output_block(model: nn.Module) -> str:
    fc = getattr(getattr(model, "head", model), "fc", None)
    if isinstance(model, IResNet) and fc is not None:
        return f"E: BN2d-Dropout-Flatten-Linear({fc.in_features}->{fc.out_features})-BN1d"
    if fc is not None:
        return f"GDC: depthwise conv-BN-Flatten-Dropout-Linear({fc.in_features}->{fc.out_features})-BN1d"
    return "-"


def describe_weights_file(path: Union[str, "os.PathLike[str]"]) -> dict[str, Any]:
    """What a state dict file holds (``lresnet model-info --weights``).

    Returns:
        ``{"file", "source", "channel_order", "l2_normalized", "units", "se", "unit_style",
        "embedding_size", "load_with"}``, plus ``"backbone", "parameters", "macs"`` when a
        registered backbone fits it.

    Raises:
        InputError: unreadable file, or keys that tell no known architecture (naming the file).
    """
    where = os.fspath(path)
    state_dict = read_state_dict(path)
    try:
        spec = describe_state_dict(state_dict)
    except InputError as err:
        raise InputError(where, err.message) from None
    row: dict[str, Any] = {
        "file": where, "source": spec.source, "channel_order": spec.channel_order,
        "l2_normalized": spec.l2_normalized, "units": list(spec.units), "se": spec.se,
        "unit_style": spec.unit_style, "embedding_size": spec.embedding_size, "load_with": spec.backbone_hint(),
    }
    if spec.backbone_name is not None:
        options = {"embedding_size": spec.embedding_size}
        if spec.unit_style is not None:
            options["unit_style"] = spec.unit_style
        info = describe_backbone(spec.backbone_name, **options)
        row.update(backbone=spec.backbone_name, parameters=info.parameters, macs=info.macs)
    return row
