"""Pair-set reading (.tar and .bin give the same set) and embedding extraction (flip TTA, XNorm)."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from torch import nn

from lresnet.core.errors import InputError
from lresnet.convert.pairs import write_bin
from lresnet.eval import (available_sets, evaluate, extract_embeddings, load_embeddings,
                          load_pair_labels, load_pair_set, normalise_rows, verify_backbone)


def tiny_faces(n_pairs: int, seed: int = 0, size: int = 112):
    """JPEG pairs: 'same' pairs are one random picture twice with a little noise."""
    rng = np.random.default_rng(seed)
    issame = [bool(k % 2 == 0) for k in range(n_pairs)]
    images = []
    for k in range(n_pairs):
        base = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
        a = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))
        if issame[k]:
            b = np.clip(a.astype(int) + rng.integers(-10, 10, a.shape), 0, 255).astype(np.uint8)
        else:
            other = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
            b = np.kron(other, np.ones((8, 8, 1), dtype=np.uint8))
        images += [simplejpeg.encode_jpeg(a, quality=95, colorspace="RGB"),
                   simplejpeg.encode_jpeg(b, quality=95, colorspace="RGB")]
    return images, issame


def write_pair_tar(path: Path, images, issame, drop=None):
    with tarfile.open(path, "w") as archive:
        for k, same in enumerate(issame):
            members = [(f"{k:06d}.a.jpg", images[2 * k]), (f"{k:06d}.b.jpg", images[2 * k + 1]),
                       (f"{k:06d}.same", b"1" if same else b"0")]
            for name, data in members:
                if name == drop:
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


class TinyNet(nn.Module):
    """A small deterministic backbone: conv, BN, pooled to a 4x4 grid, linear to 16-d."""

    def __init__(self, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(64, dim)
        self.embedding_size = dim

    def forward(self, x):
        return self.fc(self.pool(self.bn(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    images, issame = tiny_faces(24)
    write_bin(root / "lfw.bin", images, issame, protocol=2)
    val = root / "val"
    val.mkdir()
    write_pair_tar(val / "lfw.tar", images, issame)
    return root, images, issame


def test_tar_and_bin_give_the_same_set(pair_files):
    root, images, issame = pair_files
    from_tar = load_pair_set("lfw", data_dir=root / "val")
    from_bin = load_pair_set("lfw", bin_path=root / "lfw.bin")
    assert from_tar.images.shape == (48, 112, 112, 3) and from_tar.images.dtype == np.uint8
    np.testing.assert_array_equal(from_tar.images, from_bin.images)
    np.testing.assert_array_equal(from_tar.issame, np.array(issame))
    np.testing.assert_array_equal(from_bin.issame, np.array(issame))
    expected = simplejpeg.decode_jpeg(images[5], colorspace="RGB")
    np.testing.assert_array_equal(from_tar.images[5], expected)
    net = TinyNet()
    a = verify_backbone(net, from_tar, batch_size=7)
    b = verify_backbone(net, from_bin, batch_size=7)
    assert a.as_dict() == b.as_dict()


def test_synthetic_bin_and_converted_tar_score_identically(tmp_path):
    # the project's own chain: synthetic faces_emore -> convert_rec -> val/<set>.tar
    from lresnet.convert.synthetic import synthetic_shards

    src, out = tmp_path / "faces", tmp_path / "shards"
    synthetic_shards(tmp_path, identities=2, images_per_id=1, pairs=20, sets=("lfw",), seed=3, shard_size=10)
    from_tar = load_pair_set("lfw", data_dir=out / "val")
    from_bin = load_pair_set("lfw", bin_path=src / "lfw.bin")
    assert from_tar.source.endswith("lfw.tar") and from_tar.num_pairs == 20
    np.testing.assert_array_equal(from_tar.images, from_bin.images)
    np.testing.assert_array_equal(from_tar.issame, from_bin.issame)
    net = TinyNet()
    a = verify_backbone(net, from_tar, batch_size=16, nrof_folds=5)
    b = verify_backbone(net, from_bin, batch_size=16, nrof_folds=5)
    assert a.as_dict() == b.as_dict()


def test_labels_only_and_available_sets(pair_files):
    root, _, issame = pair_files
    labels, source = load_pair_labels("lfw", data_dir=root / "val")
    np.testing.assert_array_equal(labels, issame)
    assert source.endswith("lfw.tar")
    assert available_sets(root) == ["lfw"] and available_sets(root / "missing") == []


def test_unknown_set_lists_available(pair_files, tmp_path):
    root, _, _ = pair_files
    with pytest.raises(InputError, match=r"unknown verification set 'cfp_fp'; available: lfw"):
        load_pair_set("cfp_fp", data_dir=root / "val")
    with pytest.raises(InputError, match="no such directory"):
        load_pair_set("lfw", data_dir=root / "nowhere")
    (tmp_path / "val").mkdir()
    shutil.copy(root / "val" / "lfw.tar", tmp_path / "val" / "lfw.tar")
    with pytest.raises(InputError, match=r"available: none .* \(the converted sets are in .*val\)"):
        load_pair_set("lfw", data_dir=tmp_path)
    with pytest.raises(InputError, match="no such file"):
        load_pair_set("lfw", bin_path=root / "nowhere.bin")


def test_damaged_sets_are_named(tmp_path):
    images, issame = tiny_faces(3)
    write_pair_tar(tmp_path / "odd.tar", images, issame, drop="000001.b.jpg")
    with pytest.raises(InputError, match=r"odd\.tar: sample 1 \(key 000001\): pair lacks 000001\.b\.jpg"):
        load_pair_set("odd", data_dir=tmp_path)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InputError, match="junk.tar"):
        load_pair_set("junk", data_dir=tmp_path)
    small = [simplejpeg.encode_jpeg(np.zeros((64, 64, 3), np.uint8), colorspace="RGB")] * 2
    write_pair_tar(tmp_path / "small.tar", small, [True])
    with pytest.raises(InputError, match="image 0: image is 64x64, expected 112x112"):
        load_pair_set("small", data_dir=tmp_path)
    broken = [images[0], b"\xff\xd8garbage"]
    write_pair_tar(tmp_path / "broken.tar", broken, [True])
    with pytest.raises(InputError, match="image 1: image does not decode"):
        load_pair_set("broken", data_dir=tmp_path)


def test_bad_embedding_files(tmp_path):
    good = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    np.save(tmp_path / "good.npy", good)
    assert load_embeddings(tmp_path / "good.npy", 4).shape == (8, 4)
    np.save(tmp_path / "flat.npy", good.ravel())
    with pytest.raises(InputError, match="wrong embedding dimension"):
        load_embeddings(tmp_path / "flat.npy", 4)
    with pytest.raises(InputError, match="wrong embedding dimension: rows have 4 values, expected 512"):
        load_embeddings(tmp_path / "good.npy", 4, expected_dim=512)
    np.save(tmp_path / "odd.npy", good[:7])
    with pytest.raises(InputError, match="odd number of embeddings"):
        load_embeddings(tmp_path / "odd.npy", 4)
    with pytest.raises(InputError, match="embedding count mismatch: 8 rows, the set has 5 pairs"):
        load_embeddings(tmp_path / "good.npy", 5)
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(InputError, match="not a readable .npy"):
        load_embeddings(tmp_path / "text.npy", 4)
    with pytest.raises(InputError, match="no such file"):
        load_embeddings(tmp_path / "none.npy", 4)


# ---------------------------------------------------------------- extraction
def _unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _manual_forward(net, images, bgr=False):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    if bgr:
        x = x[:, [2, 1, 0]]
    x = (x - 127.5) / 127.5
    net.eval()
    with torch.no_grad():
        return net(x).double().numpy(), net(torch.flip(x, dims=[3])).double().numpy()


def test_flip_tta_is_normalised_sum_with_mirror():
    images = np.random.default_rng(1).integers(0, 256, (10, 112, 112, 3), dtype=np.uint8)
    net = TinyNet()
    e, e_flip = _manual_forward(net, images)
    assert not np.allclose(e, e_flip, atol=1e-3)  # the net is not mirror-symmetric
    got = extract_embeddings(net, images, batch_size=3, flip=True)
    np.testing.assert_allclose(got.normed, _unit(e + e_flip), atol=1e-5)
    assert got.normed.dtype == np.float64
    np.testing.assert_array_equal(got.normed, normalise_rows(got.unnormalised))
    np.testing.assert_allclose(got.unnormalised, e + e_flip, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got.normed, axis=1), 1.0, atol=1e-12)
    # XNorm: mean norm of every raw output, originals and mirrors (as InsightFace)
    expected_xnorm = np.mean(np.r_[np.linalg.norm(e, axis=1), np.linalg.norm(e_flip, axis=1)])
    assert got.xnorm == pytest.approx(expected_xnorm, rel=1e-5)
    plain = extract_embeddings(net, images, batch_size=4, flip=False)
    np.testing.assert_allclose(plain.normed, _unit(e), atol=1e-5)
    assert plain.xnorm == pytest.approx(np.linalg.norm(e, axis=1).mean(), rel=1e-5)
    # a mirrored image's flip-TTA embedding is the original's
    mirrored = extract_embeddings(net, np.ascontiguousarray(images[:, :, ::-1]), batch_size=5)
    np.testing.assert_allclose(mirrored.normed, got.normed, atol=1e-5)


def test_normalisation_matches_sklearn():
    from sklearn.preprocessing import normalize

    images = np.random.default_rng(2).integers(0, 256, (6, 112, 112, 3), dtype=np.uint8)
    net = TinyNet()
    got = extract_embeddings(net, images, batch_size=6, flip=False)
    e, _ = _manual_forward(net, images)
    np.testing.assert_allclose(got.normed, normalize(e), atol=1e-6)


def test_bgr_swaps_channels_and_mode_is_restored():
    images = np.random.default_rng(3).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    net = TinyNet()
    net.train()
    got = extract_embeddings(net, images, flip=False, bgr=True)
    assert net.training  # given back in train mode
    e, _ = _manual_forward(net, images, bgr=True)
    np.testing.assert_allclose(got.normed, _unit(e), atol=1e-5)
    rgb = extract_embeddings(net, images[..., ::-1].copy(), flip=False, bgr=False)
    np.testing.assert_allclose(got.normed, rgb.normed, atol=1e-6)


def test_batch_size_does_not_change_embeddings():
    images = np.random.default_rng(4).integers(0, 256, (9, 112, 112, 3), dtype=np.uint8)
    net = TinyNet()
    one = extract_embeddings(net, images, batch_size=1)
    many = extract_embeddings(net, images, batch_size=9)
    np.testing.assert_allclose(one.normed, many.normed, atol=1e-6)


def test_bf16_autocast_on_cpu_is_close():
    images = np.random.default_rng(5).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    net = TinyNet()
    fp32 = extract_embeddings(net, images, batch_size=4)
    bf16 = extract_embeddings(net, images, batch_size=4, amp_dtype="bf16")
    assert np.all(np.sum(fp32.normed * bf16.normed, axis=1) > 0.99)


def test_bad_device_and_amp_are_input_errors():
    images = np.zeros((2, 112, 112, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="got 'tpu', expected one of cpu"):
        extract_embeddings(TinyNet(), images, device="tpu")
    with pytest.raises(InputError, match="got 'int8', expected one of bf16"):
        extract_embeddings(TinyNet(), images, amp_dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            extract_embeddings(TinyNet(), images, device="cuda")


def test_verify_backbone_equals_evaluate_on_extracted(pair_files):
    root, _, _ = pair_files
    pairs = load_pair_set("lfw", data_dir=root / "val")
    net = TinyNet()
    result = verify_backbone(net, pairs, batch_size=16, nrof_folds=4)
    emb = extract_embeddings(net, pairs.images, batch_size=16)
    expected = evaluate(emb.normed, pairs.issame, nrof_folds=4)
    assert result.accuracy == expected.accuracy and result.val == expected.val
    assert result.xnorm == pytest.approx(emb.xnorm)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    images = np.random.default_rng(6).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    cpu = extract_embeddings(TinyNet(), images, batch_size=4)
    gpu = extract_embeddings(TinyNet(), images, batch_size=4, device="cuda")
    np.testing.assert_allclose(cpu.normed, gpu.normed, atol=1e-4)


def test_cpu_never_imports_torch_npu():
    import importlib.util
    import sys

    images = np.zeros((2, 112, 112, 3), dtype=np.uint8)
    extract_embeddings(TinyNet(), images, device="cpu")
    if importlib.util.find_spec("torch_npu") is None:
        assert "torch_npu" not in sys.modules
        with pytest.raises(InputError, match="torch_npu is not installed"):
            extract_embeddings(TinyNet(), images, device="npu")


@pytest.mark.npu
def test_npu_matches_cpu():
    images = np.random.default_rng(7).integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    cpu = extract_embeddings(TinyNet(), images, batch_size=4)
    npu = extract_embeddings(TinyNet(), images, batch_size=4, device="npu")
    np.testing.assert_allclose(cpu.normed, npu.normed, atol=1e-3)


def _tiny_backbone():
    from lresnet.model import create_backbone

    torch.manual_seed(0)
    return create_backbone("mobilefacenet", embedding_size=16, bottlenecks=[[1, 8, 1, 2]], stem_channels=8,
                           head_channels=16).eval()


def test_fp16_keeps_the_output_block_in_fp32():
    # an early checkpoint: a huge projection overflows fp16 (max 65504) in the output block only
    net = _tiny_backbone()
    with torch.no_grad():
        net.fc.weight.mul_(1e8)
    images = np.random.default_rng(1).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    fp32 = extract_embeddings(net, images, batch_size=4)
    fp16 = extract_embeddings(net, images, batch_size=4, amp_dtype="fp16")
    assert np.isfinite(fp16.normed).all() and np.isfinite(fp16.xnorm)
    assert np.all(np.sum(fp32.normed * fp16.normed, axis=1) > 0.99)


def test_fp16_overflow_before_the_output_block_is_one_clear_error():
    net = _tiny_backbone()
    with torch.no_grad():
        net.stem[0][0].weight.mul_(1e6)  # the first conv already leaves fp16's range
    images = np.random.default_rng(1).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="not finite under float16 autocast.*use --amp bf16 or --amp none"):
        extract_embeddings(net, images, batch_size=2, amp_dtype="fp16")
