"""Weight import: reference modules of each source architecture, written here from the architecture
descriptions with the source's own key names, get random weights; lresnet backbones loaded from the
same state dict must give the same embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lresnet.core.errors import InputError
from lresnet.model import (backbone_from_weights, create_backbone, describe_state_dict, detect_source,
                           load_checkpoint_backbone, load_weights, load_weights_backbone, read_state_dict,
                           read_torch_file, strip_wrappers)

WIDTHS = (64, 128, 256, 512)




# --- arcface_torch-style reference: conv1/bn1/prelu, layerK.i.{bn1,conv1,bn2,prelu,conv2,bn3,downsample}, bn2/fc/features
class ArcBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        skip = x if self.downsample is None else self.downsample(x)
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + skip


class ArcNet(nn.Module):
    def __init__(self, layers, emb=512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        cin = 64
        for k, (n, w) in enumerate(zip(layers, WIDTHS), start=1):
            setattr(self, f"layer{k}", nn.Sequential(*[ArcBlock(cin if i == 0 else w, w, 2 if i == 0 else 1)
                                                       for i in range(n)]))
            cin = w
        self.bn2 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 49, emb)
        self.features = nn.BatchNorm1d(emb)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


# --- TreB1eN-style reference: input_layer, body.N.{res_layer,shortcut_layer}, output_layer; L2-normalised output
class SE(nn.Module):
    def __init__(self, c, r=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // r, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(c // r, c, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class TrebUnit(nn.Module):
    def __init__(self, cin, depth, stride, se):
        super().__init__()
        if cin == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        body = [nn.BatchNorm2d(cin), nn.Conv2d(cin, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
                nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth)]
        if se:
            body.append(SE(depth))
        self.res_layer = nn.Sequential(*body)

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


class ViewFlatten(nn.Module):
    def forward(self, x):
        return x.reshape(x.size(0), -1)


class TrebNet(nn.Module):
    def __init__(self, layers, se, emb=512):
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        units, cin = [], 64
        for n, w in zip(layers, WIDTHS):
            units += [TrebUnit(cin, w, 2, se)] + [TrebUnit(w, w, 1, se) for _ in range(n - 1)]
            cin = w
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(0.0), ViewFlatten(),
                                          nn.Linear(512 * 49, emb), nn.BatchNorm1d(emb))

    def forward(self, x):
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)


def randomize(module: nn.Module, seed: int) -> dict:
    """Random weights AND running statistics, so that a wrong mapping cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    sd = module.state_dict()
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            value.fill_(7)
        elif key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=gen) + 0.5)
        elif key.endswith("running_mean"):
            value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
        elif value.dim() > 1:  # conv / linear: keep the activations of the order of 1
            fan_in = value[0].numel()
            value.copy_(torch.randn(value.shape, generator=gen) / fan_in ** 0.5)
        else:  # BN affine, PReLU slopes, biases
            value.copy_(torch.rand(value.shape, generator=gen) * 0.5 + 0.25)
    module.load_state_dict(sd)
    return sd


def embeddings(model: nn.Module, seed: int = 0, channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(seed))
    model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return model(x)


def test_arcface_torch_import_gives_same_embeddings():
    ref = ArcNet((2, 2, 2, 2))
    sd = randomize(ref, seed=1)
    assert detect_source(sd) == "arcface_torch"
    ours = create_backbone("ir18")
    info = load_weights(ours, sd)
    assert (info.source, info.channel_order, info.l2_normalized) == ("arcface_torch", "RGB", False)
    assert ours.weight_info == info
    expected = embeddings(ref)
    torch.testing.assert_close(embeddings(ours), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("se", [True, False])
def test_treb1en_import_without_num_batches_tracked(se):
    ref = TrebNet((2, 2, 2, 2), se=se)
    sd = {k: v for k, v in randomize(ref, seed=2).items() if not k.endswith("num_batches_tracked")}
    assert detect_source(sd) == "treb1en"
    ours = create_backbone("irse18" if se else "ir18", unit_style="treb1en")
    info = load_weights(ours, sd)
    assert (info.source, info.channel_order, info.l2_normalized) == ("treb1en", "BGR", True)
    expected = embeddings(ref)
    got = embeddings(ours, channels_last=True)  # also: the flatten in the E block works on channels_last
    assert not torch.allclose(got.norm(dim=1), torch.ones(3))  # lresnet backbones do not normalise
    torch.testing.assert_close(F.normalize(got, dim=1), expected, rtol=1e-4, atol=1e-5)


def test_treb1en_state_dict_fits_depth_50_mapping():
    # Full-size key/shape check without allocating weights.
    with torch.device("meta"):
        ref = TrebNet((3, 4, 14, 3), se=True)
        ours = create_backbone("irse50")
    sd = ref.state_dict()
    spec = describe_state_dict(sd)
    assert (spec.source, spec.units, spec.se, spec.embedding_size, spec.unit_style) == \
        ("treb1en", (3, 4, 14, 3), True, 512, "treb1en")
    assert load_weights(ours, sd).source == "treb1en"


def test_arcface_state_dict_spec_at_depth_100():
    with torch.device("meta"):
        sd = ArcNet((3, 13, 30, 3)).state_dict()
    spec = describe_state_dict(sd)
    assert spec.units == (3, 13, 30, 3) and not spec.se and spec.unit_style == "paper"
    assert "create_backbone('ir100', unit_style='paper', embedding_size=512)" == spec.backbone_hint()


def test_load_from_path_with_wrappers(tmp_path):
    ref = ArcNet((2, 2, 2, 2))
    sd = randomize(ref, seed=3)
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    ours = create_backbone("ir18")
    assert load_weights(ours, path, source="arcface_torch").channel_order == "RGB"
    torch.testing.assert_close(ours.stem.conv.weight, sd["conv1.weight"])
    torch.testing.assert_close(ours.stages[3][1].act.weight, sd["layer4.1.prelu.weight"])


def test_lresnet_round_trip():
    src = create_backbone("irse18")
    randomize(src, seed=4)
    dst = create_backbone("irse18")
    info = load_weights(dst, src.state_dict())
    assert (info.source, info.channel_order, info.l2_normalized) == ("lresnet", "RGB", False)
    torch.testing.assert_close(embeddings(dst), embeddings(src))


def test_wrong_depth_lists_mismatched_keys_and_names_the_fitting_backbone():
    sd = randomize(ArcNet((2, 2, 2, 2)), seed=5)
    with pytest.raises(InputError) as err:
        load_weights(create_backbone("ir34"), sd)
    text = str(err.value)
    assert text.startswith("state dict: arcface_torch weights do not fit IR-34")
    assert "missing: stages.0.2.bn1.weight" in text
    assert "create_backbone('ir18'" in text


def test_wrong_unit_style_is_explained():
    sd = randomize(TrebNet((2, 2, 2, 2), se=False), seed=6)
    with pytest.raises(InputError, match="treb1en weights need unit_style='treb1en'"):
        load_weights(create_backbone("ir18"), sd)


def test_wrong_embedding_size_is_a_shape_mismatch():
    sd = randomize(ArcNet((2, 2, 2, 2), emb=128), seed=7)
    with pytest.raises(InputError, match=r"shape mismatch: fc.weight \(128, 25088\) vs head.fc.weight"):
        load_weights(create_backbone("ir18"), sd)


def test_unrecognised_or_unreadable_input(tmp_path):
    with pytest.raises(InputError, match="cannot tell the source"):
        load_weights(create_backbone("ir18"), {"foo.weight": torch.zeros(1)})
    with pytest.raises(InputError, match="unknown weight source 'mxnet'"):
        load_weights(create_backbone("ir18"), {"conv1.weight": torch.zeros(1)}, source="mxnet")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(InputError, match=r"bad\.pth: cannot read weights"):
        load_weights(create_backbone("ir18"), bad)
    with pytest.raises(InputError, match="no such file"):
        load_weights(create_backbone("ir18"), tmp_path / "missing.pth")
    with pytest.raises(InputError, match="IR/IR-SE backbones only"):
        load_weights(create_backbone("mobilefacenet"), {"conv1.weight": torch.zeros(1)})


def test_backbone_from_weights_builds_the_fitting_backbone(tmp_path):
    ref = TrebNet((2, 2, 2, 2), se=False, emb=128)
    sd = randomize(ref, seed=8)
    path = tmp_path / "treb.pth"
    torch.save(sd, path)
    assert set(read_state_dict(path)) == set(sd)
    ours, info = backbone_from_weights(path, dropout=0.1)
    assert (ours.depth, ours.se, ours.unit_style, ours.embedding_size) == (18, False, "treb1en", 128)
    assert info.channel_order == "BGR" and ours.head.dropout.p == 0.1
    torch.testing.assert_close(F.normalize(embeddings(ours), dim=1), embeddings(ref), rtol=1e-4, atol=1e-5)


def test_incomplete_state_dict_is_reported():
    sd = {"conv1.weight": torch.zeros(64, 3, 3, 3), "layer1.0.bn1.weight": torch.zeros(64)}
    with pytest.raises(InputError, match="incomplete arcface_torch state dict: no 'fc.weight'"):
        backbone_from_weights(sd)


def test_one_prefix_rule_strips_wrappers_in_any_order():
    sd = {"module._orig_mod.a.weight": 1, "_orig_mod.module.b": 2, "module.module.c": 3, "d.module.e": 4}
    assert strip_wrappers(sd) == {"a.weight": 1, "b": 2, "c": 3, "d.module.e": 4}


@pytest.mark.parametrize("content,reason", [(b"", "EOFError"), (b"not a pickle", "UnpicklingError"),
                                            (b"PK\x03\x04truncated", "RuntimeError")])
def test_read_torch_file_names_the_file_and_the_reason(tmp_path, content, reason):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        read_torch_file(path, "checkpoint")
    assert str(err.value).startswith(f"{path}: cannot read checkpoint: torch.load(weights_only=True) cannot "
                                     f"load it ({reason}")
    assert "weights_only=False" not in str(err.value)  # torch's advice to run pickled code is left out


def test_read_torch_file_refuses_pickled_code(tmp_path):
    import pickle
    from pathlib import Path

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(InputError, match="cannot read weights"):
        read_torch_file(path)
    assert not (tmp_path / "ran").exists()


def test_load_weights_backbone_builds_what_the_keys_say(tmp_path):
    ref = TrebNet((2, 2, 2, 2), se=True, emb=64)
    sd = randomize(ref, seed=9)
    path = tmp_path / "treb.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    loaded = load_weights_backbone(path)
    assert (loaded.net, loaded.bgr, loaded.l2_normalized) == ("irse18", True, True)
    assert loaded.description == {"kind": "weights", "path": str(path), "net": "irse18", "source": "treb1en",
                                  "channel_order": "BGR", "l2_normalized": True}
    torch.testing.assert_close(F.normalize(embeddings(loaded.backbone), dim=1), embeddings(ref),
                               rtol=1e-4, atol=1e-5)


def test_load_weights_backbone_mobilefacenet_and_unknown_names(tmp_path):
    mfn = create_backbone("mobilefacenet", embedding_size=16)
    randomize(mfn, seed=10)
    path = tmp_path / "mfn.pt"
    torch.save(mfn.state_dict(), path)
    loaded = load_weights_backbone(path)
    assert (loaded.net, loaded.bgr, loaded.description["source"]) == ("mobilefacenet", False, "lresnet")
    torch.testing.assert_close(embeddings(loaded.backbone), embeddings(mfn))
    built, info = backbone_from_weights(path)
    assert built.embedding_size == 16 and info.channel_order == "RGB"
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(InputError, match=r"foreign\.pt: cannot tell the backbone from the weight names; pass --net"):
        load_weights_backbone(foreign)
    with pytest.raises(InputError, match=r"foreign\.pt: weights do not fit backbone 'ir18'"):
        load_weights_backbone(foreign, net="ir18")


def test_load_checkpoint_backbone_reads_the_model_section(tmp_path):
    net = create_backbone("ir18", embedding_size=8, widths=[8, 16, 32, 64])
    randomize(net, seed=11)
    path = tmp_path / "ckpt.pt"
    torch.save({"backbone": {f"_orig_mod.{k}": v for k, v in net.state_dict().items()}, "step": 12,
                "config": {"model": {"net": "ir18", "embedding_size": 8, "options": {"widths": [8, 16, 32, 64]}}}},
               path)
    loaded = load_checkpoint_backbone(path)
    assert loaded.description == {"kind": "checkpoint", "path": str(path), "net": "ir18", "step": 12}
    torch.testing.assert_close(embeddings(loaded.backbone), embeddings(net))
    torch.save({"backbone": net.state_dict()}, path)
    with pytest.raises(InputError, match=r"does not name its backbone \(config\.model\.net\); pass --net"):
        load_checkpoint_backbone(path)
    with pytest.raises(InputError, match="weights do not fit backbone 'ir18'"):
        load_checkpoint_backbone(path, net="ir18")  # default widths: the shapes differ
    torch.save(net.state_dict(), path)
    with pytest.raises(InputError, match="not a training checkpoint"):
        load_checkpoint_backbone(path)
