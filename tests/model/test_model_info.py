"""describe_backbone / describe_weights_file: sizes from the meta device, what a weights file holds."""

from __future__ import annotations

import pytest
import torch

from lresnet.core.errors import InputError
from lresnet.model import create_backbone, describe_backbone, describe_weights_file


def test_describe_backbone_counts_match_a_real_build():
    info = describe_backbone("irse18", embedding_size=128)
    real = create_backbone("irse18", embedding_size=128)
    assert info.parameters == sum(p.numel() for p in real.parameters())
    assert (info.architecture, info.unit_style, info.se, info.embedding_size) == ("IResNet-18", "treb1en", True, 128)
    assert info.output_block == "E: BN2d-Dropout-Flatten-Linear(25088->128)-BN1d"
    assert info.as_dict()["macs"] == info.macs > 0


def test_mobilefacenet_has_the_gdc_block():
    info = describe_backbone("mobilefacenet")
    assert info.unit_style is None and info.output_block.startswith("GDC: ") and 0.2e9 < info.macs < 0.25e9


@pytest.mark.parametrize("size", [0, -4])
def test_embedding_size_below_one_is_bad_input(size):
    with pytest.raises(InputError, match=rf"--embedding-size: got {size}, expected a positive integer"):
        describe_backbone("ir18", embedding_size=size)


def test_an_option_the_family_lacks_is_bad_input():
    with pytest.raises(InputError, match="mobilefacenet: bad backbone option"):
        describe_backbone("mobilefacenet", unit_style="paper")


def test_lresnet_mobilefacenet_state_dict_is_identified(tmp_path):
    net = create_backbone("mobilefacenet", embedding_size=128)
    path = tmp_path / "mfn.pt"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    row = describe_weights_file(path)
    assert (row["source"], row["backbone"], row["embedding_size"], row["channel_order"], row["l2_normalized"]) == \
        ("lresnet", "mobilefacenet", 128, "RGB", False)
    assert row["load_with"] == "create_backbone('mobilefacenet', embedding_size=128)"
    assert row["parameters"] == sum(p.numel() for p in net.parameters())


def test_a_mobilefacenet_of_another_layout_is_named_not_guessed(tmp_path):
    net = create_backbone("mobilefacenet", head_channels=256)
    path = tmp_path / "mfn.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(InputError, match=r"mfn\.pt: a MobileFaceNet state dict whose layers differ"):
        describe_weights_file(path)
