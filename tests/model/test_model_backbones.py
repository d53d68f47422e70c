"""Backbones: every registered name trains one step; sizes match the literature; structure of both unit styles."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lresnet.core.errors import InputError
from lresnet.model import (IResNet, count_macs, count_parameters, create_backbone, list_backbones,
                           profile_macs)

DEEP = re.compile(r"(ir|irse)(100|152|200)e?$")




def _names():
    return [pytest.param(n, marks=pytest.mark.slow) if DEEP.match(n) else n for n in list_backbones()]


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_backbone(name, **kwargs)


@pytest.mark.parametrize("name", _names())
def test_forward_backward_every_backbone(name):
    torch.manual_seed(0)
    model = create_backbone(name, embedding_size=128)
    x = torch.randn(2, 3, 112, 112)
    out = model(x)
    assert out.shape == (2, 128) and model.embedding_size == 128
    assert torch.isfinite(out).all()
    out.pow(2).mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    assert trainable[0].grad.abs().sum() > 0  # the stem conv gets a gradient through the whole net


def test_registry_names_and_pattern():
    names = list_backbones()
    for depth in (18, 34, 50, 100, 152, 200):
        assert f"ir{depth}" in names and f"irse{depth}" in names
    assert {"ir100e", "mobilefacenet"} <= set(names)
    assert names.index("ir18") < names.index("ir34") < names.index("ir100") < names.index("ir100e")
    assert list_backbones("irse*") == ["irse18", "irse34", "irse50", "irse100", "irse152", "irse200"]


def test_unknown_name_lists_known_names():
    with pytest.raises(InputError) as err:
        create_backbone("ir101")
    text = str(err.value)
    assert "unknown backbone 'ir101'" in text and "did you mean" in text
    for name in list_backbones():
        assert name in text


# Literature: IR-50 43.6 M / 6.3 GMAC, IR-100 (LResNet100E-IR) 65.2 M / 12.1 GMAC at 112x112.
@pytest.mark.parametrize("name, params, gmac", [("ir50", 43.6e6, 6.3), ("ir100e", 65.2e6, 12.1),
                                                ("ir100", 65.2e6, 12.1)])
def test_sizes_match_literature(name, params, gmac):
    model = _meta(name)
    assert abs(count_parameters(model) - params) / params < 0.001
    assert abs(count_macs(model) / 1e9 - gmac) / gmac < 0.01


def test_treb1en_units_are_smaller_by_one_bn_per_unit():
    paper, treb = _meta("ir100"), _meta("ir100", unit_style="treb1en")
    units = sum(treb.units[s] * w for s, w in enumerate((64, 128, 256, 512)))
    stage1_projection = 64 * 64 + 2 * 64
    assert count_parameters(paper) - count_parameters(treb) == 2 * units + stage1_projection


def test_mobilefacenet_matches_paper():
    # Paper: 0.99 M parameters, 221 M MAdds with its 128-d embedding.
    model = create_backbone("mobilefacenet", embedding_size=128)
    assert abs(count_parameters(model) - 0.99e6) / 0.99e6 < 0.02
    assert abs(count_macs(model) - 221e6) / 221e6 < 0.01


def test_profile_counts_conv_and_linear_only_in_total():
    model = _meta("ir18")
    profile = profile_macs(model, (2, 3, 112, 112))
    assert profile.macs == profile.by_type["Conv2d"] + profile.by_type["Linear"]
    assert profile.by_type["Linear"] == 512 * 7 * 7 * 512
    # stem conv alone: 112*112 outputs x 64 channels x 27 weights
    assert profile.by_type["Conv2d"] > 112 * 112 * 64 * 27
    assert profile.elementwise["PReLU"] > 0 and profile.macs == count_macs(model)


def test_paper_unit_structure():
    model = _meta("ir50")
    assert model.unit_style == "paper" and not model.se
    for stage in model.stages:
        first = stage[0]
        assert isinstance(first.bn2, nn.BatchNorm2d)
        assert isinstance(first.shortcut, nn.Sequential)  # 1x1 conv + BN in every stage, stage 1 too
        assert all(isinstance(u.shortcut, nn.Identity) for u in stage[1:])
    assert not model.head.features.weight.requires_grad  # fixed gamma, as arcface_torch / MXNet


def test_treb1en_unit_structure():
    model = _meta("irse50")
    assert model.unit_style == "treb1en" and model.se
    first = model.stages[0][0]
    assert isinstance(first.bn2, nn.Identity)
    assert isinstance(first.shortcut, nn.MaxPool2d) and first.shortcut.stride == 2
    assert sum(p.numel() for p in first.shortcut.parameters()) == 0
    assert all(isinstance(s[0].shortcut, nn.Sequential) for s in model.stages[1:])
    assert model.head.features.weight.requires_grad


def test_unit_styles_switchable_and_validated():
    assert _meta("irse50", unit_style="paper").unit_style == "paper"
    assert _meta("ir50", unit_style="treb1en").unit_style == "treb1en"
    with pytest.raises(ValueError, match="unit_style must be one of paper, treb1en, got 'v3'"):
        create_backbone("ir18", unit_style="v3")


def test_dropout_configurable_and_validated():
    model = _meta("ir18", dropout=0.4)
    assert model.head.dropout.p == 0.4
    assert create_backbone("mobilefacenet", dropout=0.2).dropout.p == 0.2
    with pytest.raises(ValueError, match="dropout"):
        create_backbone("ir18", dropout=1.5)


@pytest.mark.parametrize("name", ["ir18", "irse18", "mobilefacenet"])
def test_channels_last_gives_same_embedding(name):
    torch.manual_seed(1)
    model = create_backbone(name).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_forward_features_and_head_split():
    torch.manual_seed(2)
    model = create_backbone("ir18").eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (1, 512, 7, 7)
        torch.testing.assert_close(model.forward_head(features), model(x))


def test_iresnet_rejects_bad_input_size():
    with pytest.raises(ValueError, match="multiple of 16"):
        IResNet((2, 2, 2, 2), input_size=100)
