"""`--loader dali` in DALI's CPU mode (device_id=None): labels, equal batches per rank, resume, pixels.

Skipped where NVIDIA DALI is not installed (it is never in the test extra: its wheel is ~0.5 GB);
`pip install nvidia-dali-cuda120` runs these on a machine without a GPU.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from lresnet.core.errors import InputError
from lresnet.pipeline import DevicePrefetcher, PipelineConfig, World, build_train_loader
from lresnet.pipeline.dali import dali_installed

SAMPLES = 240  # tests/pipeline/conftest.py: one image per class, so a label names its sample
SEED = 4

needs_dali = pytest.mark.skipif(not dali_installed(), reason="needs NVIDIA DALI")


def _config(**kw):
    base = dict(batch_size=8, workers=1, shuffle_buffer=64, pin_memory=False, loader="dali")
    base.update(kw)
    return PipelineConfig(**base)


def _labels(loader):
    return [lab for _, labels in loader for lab in labels.tolist()]


@needs_dali
@pytest.mark.parametrize("world_size", [2, 7])
def test_every_rank_yields_the_same_batches_of_disjoint_labels(synth_shards, world_size):
    # 7 ranks: DALI's shards hold 34 or 35 samples; every rank stops at 4 batches of 8 all the same
    per_rank = SAMPLES // world_size // 8
    for epoch in (0, 1):
        seen = []
        for rank in range(world_size):
            loader = build_train_loader(synth_shards, _config(), World(rank, world_size), seed=SEED)
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(loader) == len(batches) == per_rank
            for images, labels in batches:  # the CPU batch contract: uint8 NHWC, normalised by DevicePrefetcher
                assert images.shape == (8, 112, 112, 3) and images.dtype == torch.uint8
                assert labels.dtype == torch.int64 and labels.shape == (8,)
            seen += [lab for _, labels in batches for lab in labels.tolist()]
        assert len(seen) == len(set(seen)) == per_rank * 8 * world_size  # no sample on two ranks
        assert set(seen) <= set(range(SAMPLES))
        assert loader.stats.corrupt_samples == 0


@needs_dali
def test_each_epoch_another_shard_and_order_per_rank_and_the_seed_matters(synth_shards):
    def stream(seed, epoch, rank=0):
        loader = build_train_loader(synth_shards, _config(), World(rank, 2), seed=seed)
        loader.set_epoch(epoch)
        return _labels(loader)

    assert stream(SEED, 0) == stream(SEED, 0)  # seeded: the same run twice
    assert set(stream(SEED, 0)) != set(stream(SEED, 1))  # rank 0 reads the other DALI shard in epoch 1
    assert stream(SEED, 0) != stream(SEED + 1, 0)


@needs_dali
@pytest.mark.parametrize("keep_checkpoints", [True, False])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(synth_shards, keep_checkpoints):
    config, world = _config(), World(1, 2)
    full = build_train_loader(synth_shards, config, world, seed=SEED)
    full.set_epoch(2)
    expected = [(x.clone(), y.clone()) for x, y in DevicePrefetcher(full, "cpu")]

    first = build_train_loader(synth_shards, config, world, seed=SEED)
    first.set_epoch(2)
    batches = DevicePrefetcher(first, "cpu")
    it = iter(batches)
    for _ in range(6):
        next(it)
    state = batches.state_dict()  # one batch less than the loader has handed out
    assert state["position"] == 6 and first.state_dict()["position"] == 7
    if not keep_checkpoints:  # a DALI without checkpointing: the batches are read again and dropped
        state["checkpoints"] = []
    del it

    resumed = build_train_loader(synth_shards, config, world, seed=SEED)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    rest = [(x.clone(), y.clone()) for x, y in DevicePrefetcher(resumed, "cpu")]
    assert len(rest) == len(expected) - 6 == 9
    for (x, y), (want_x, want_y) in zip(rest, expected[6:]):
        assert torch.equal(y, want_y) and torch.equal(x, want_x)


@needs_dali
def test_state_of_another_setup_is_refused(synth_shards):
    dali = build_train_loader(synth_shards, _config(), World(0, 2), seed=SEED)
    state = dali.state_dict()
    native = build_train_loader(synth_shards, _config(loader="native", workers=1), World(0, 2), seed=SEED)
    with pytest.raises(ValueError, match="workers was None when saved"):
        native.load_state_dict(state)
    with pytest.raises(ValueError, match="loader was None when saved, is dali now"):
        dali.load_state_dict(native.state_dict())
    other = build_train_loader(synth_shards, _config(batch_size=4), World(0, 2), seed=SEED)
    with pytest.raises(ValueError, match="batch_size was 8 when saved, is 4 now"):
        other.load_state_dict(state)


@needs_dali
def test_pixels_are_simplejpegs_mirrored_as_drawn(synth_shards):
    from lresnet.pipeline.bench import load_jpegs
    from lresnet.pipeline.dali import dali_pipeline, parse_labels
    from lresnet.pipeline.decoders import get_decoder
    from lresnet.pipeline.shards import resolve_source

    jpegs, classes = load_jpegs(synth_shards)
    by_class = dict(zip(classes, jpegs))
    shards = resolve_source(synth_shards)
    pipe = dali_pipeline(shards.urls, None, 16, shard_id=0, num_shards=1, seed=9, threads=1, device_id=None)
    decode = get_decoder("simplejpeg")
    mirrored = 0
    for _ in range(3):
        images, cls, mirror = pipe.run()
        labels, bad = parse_labels(np.array(cls.as_tensor()), SAMPLES)
        assert bad == []
        flips = np.array(mirror.as_tensor()).reshape(-1).astype(bool)
        mirrored += int(flips.sum())
        for got, label, flip in zip(np.array(images.as_tensor()), labels.tolist(), flips):
            want = decode(by_class[label])
            assert np.array_equal(got, want[:, ::-1] if flip else want)  # the very same pixels
    assert 0 < mirrored < 48


@needs_dali
def test_prefetched_batches_are_the_training_layout(synth_shards):
    loader = build_train_loader(synth_shards, _config(), World(), seed=SEED)
    x, y = next(iter(DevicePrefetcher(loader, "cpu", dtype=torch.bfloat16)))
    assert x.shape == (8, 3, 112, 112) and x.dtype == torch.bfloat16 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0


@needs_dali
def test_an_image_of_another_size_stops_with_one_line(synth_shards, tmp_path):
    import io
    import shutil
    import tarfile

    import simplejpeg

    data = tmp_path / "resized"
    shutil.copytree(synth_shards, data)
    shard = data / "train" / "train-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    small = simplejpeg.encode_jpeg(np.zeros((100, 100, 3), np.uint8), colorspace="RGB")
    first = next(name for name, _ in members if name.endswith(".jpg"))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            payload = small if name == first else payload
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (data / "train" / "train-000001.idx").unlink()  # offsets changed: DALI infers them from the tar
    with pytest.raises(InputError, match=r"the DALI loader met an image of .*\(100, 100, 3\)") as err:
        _labels(build_train_loader(data, _config(shuffle_buffer=0), World(), seed=SEED))
    assert "expected 112x112x3; --loader native counts and skips" in str(err.value)


@needs_dali
def test_corrupt_jpeg_stops_with_one_line(corrupted_copy):
    data, _ = corrupted_copy(1)
    loader = build_train_loader(data, _config(shuffle_buffer=0), World(), seed=SEED)
    with pytest.raises(InputError) as err:
        _labels(loader)
    message = str(err.value)
    assert "the DALI loader stopped at a corrupt JPEG on rank 0" in message and "--loader native" in message
    assert "\n" not in message


@needs_dali
def test_dali_refuses_augmentations_and_remote_shards(synth_shards):
    with pytest.raises(InputError, match=r"augment: got \['crop'\], expected none with --loader dali"):
        build_train_loader(synth_shards, _config(augment=("crop",)), World())
    train = synth_shards / "train"
    urls = [f"pipe:cat {train}/train-00000{i}.tar" for i in range(7)]
    with pytest.raises(InputError, match="reads local shard files only"):
        build_train_loader(urls, _config(), World(), manifest=train / "manifest.json")


def test_missing_dali_is_one_line_saying_what_to_install(synth_shards, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if it were not installed
    with pytest.raises(InputError) as err:
        build_train_loader(synth_shards, _config(), World())
    assert str(err.value).startswith("--loader dali needs NVIDIA DALI (pip install 'lresnet[dali]')")
    assert "\n" not in str(err.value)
