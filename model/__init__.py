"""Backbones (registry by name), MAC counting, descriptions and weight import.

    >>> from lresnet.model import create_backbone, count_macs, count_parameters, describe_backbone
    >>> net = create_backbone("ir100e", embedding_size=512, dropout=0.4)   # LResNet100E-IR
    >>> describe_backbone("ir100e").parameters                               # 65,156,160
    >>> load_weights_backbone("backbone.pth").backbone                       # arcface_torch/TreB1eN/lresnet

The forward+backward benchmark is :mod:`lresnet.model.bench`.

Margin heads live in :mod:`lresnet.model.heads` and :mod:`lresnet.model.partial_fc`.
"""

from lresnet.model.registry import create_backbone, list_backbones, register_backbone
from lresnet.model.iresnet import IResNet, IRUnit, iresnet
from lresnet.model.mobilefacenet import MobileFaceNet
from lresnet.model.macs import MacProfile, count_macs, count_parameters, profile_macs
from lresnet.model.weights import (LoadedBackbone, StateDictSpec, WeightInfo, backbone_from_weights,
                                   describe_state_dict, detect_source, load_backbone, load_checkpoint_backbone,
                                   load_weights, load_weights_backbone, read_state_dict, read_torch_file,
                                   strip_wrappers)
from lresnet.model.info import UNIT_STYLES, ModelInfo, describe_backbone, describe_weights_file

__all__ = [
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "IResNet",
    "IRUnit",
    "iresnet",
    "MobileFaceNet",
    "MacProfile",
    "count_macs",
    "count_parameters",
    "profile_macs",
    "StateDictSpec",
    "WeightInfo",
    "backbone_from_weights",
    "describe_state_dict",
    "detect_source",
    "load_weights",
    "read_state_dict",
    "LoadedBackbone",
    "load_backbone",
    "load_checkpoint_backbone",
    "load_weights_backbone",
    "read_torch_file",
    "strip_wrappers",
    "UNIT_STYLES",
    "ModelInfo",
    "describe_backbone",
    "describe_weights_file",
]
