"""Backbones (registry by name), MAC counting and weight import.

    >>> from lresnet.model import create_backbone, count_macs, count_parameters
    >>> net = create_backbone("ir100e", embedding_size=512, dropout=0.4)   # LResNet100E-IR

Margin heads live in :mod:`lresnet.model.heads` and :mod:`lresnet.model.partial_fc`.
"""

from lresnet.model.registry import create_backbone, list_backbones, register_backbone
from lresnet.model.iresnet import IResNet, IRUnit, iresnet
from lresnet.model.mobilefacenet import MobileFaceNet
from lresnet.model.macs import MacProfile, count_macs, count_parameters, profile_macs
from lresnet.model.weights import (StateDictSpec, WeightInfo, backbone_from_weights, describe_state_dict,
                                   detect_source, load_weights, read_state_dict)

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
]
