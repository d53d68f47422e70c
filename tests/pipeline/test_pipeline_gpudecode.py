"""`--decoder nvjpeg`: workers batch JPEG bytes, the device stage decodes them (torchvision).

On CPU, torchvision's CPU decoder stands in for nvjpeg (the same call with device="cpu"); the tests
need a torchvision built for the installed torch and are skipped without one. Tolerance against
simplejpeg: at most 8 levels per pixel and under 1 level on average (IDCT and chroma upsampling
differ between nvjpeg and libjpeg-turbo; torchvision's CPU decoder is libjpeg-turbo, so there it
is exact), i.e. 8 / 127.5 after normalisation.
"""

from __future__ import annotations

import pytest
import torch

from lresnet.core.errors import InputError
from lresnet.pipeline import DevicePrefetcher, PipelineConfig, World, build_train_loader

SEED = 11
LEVEL = 1 / 127.5  # one uint8 level after normalisation


def _torchvision_works() -> bool:
    try:
        import torchvision.io  # noqa: F401
    except (ImportError, RuntimeError):  # RuntimeError: a torchvision built for another torch
        return False
    return True


needs_torchvision = pytest.mark.skipif(not _torchvision_works(), reason="needs torchvision built for this torch")


def _config(**kw):
    base = dict(batch_size=8, workers=0, shuffle_buffer=16, pin_memory=False)
    base.update(kw)
    return PipelineConfig(**base)


def _device_batches(source, config, world=World(), device="cpu", **kw):
    loader = build_train_loader(source, config, world, seed=SEED)
    return loader, [(x.clone(), y.clone()) for x, y in DevicePrefetcher(loader, device, **kw)]


def _assert_close_to_simplejpeg(got, want):
    diff = (got.float() - want.float()).abs()
    assert diff.max() <= 8 * LEVEL + 1e-6 and diff.mean() < LEVEL


@needs_torchvision
@pytest.mark.parametrize("workers", [0, 2])
def test_same_batch_contract_labels_flips_and_pixels_as_simplejpeg(synth_shards, workers):
    _, cpu = _device_batches(synth_shards, _config(workers=workers), World(1, 2))
    loader, nvjpeg = _device_batches(synth_shards, _config(workers=workers, decoder="nvjpeg"), World(1, 2))
    assert len(nvjpeg) == len(cpu) == len(loader) == 15
    for (x, y), (want_x, want_y) in zip(nvjpeg, cpu):
        assert x.shape == (8, 3, 112, 112) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, want_y)
        _assert_close_to_simplejpeg(x, want_x)  # the same slots flipped: a wrong flip differs by far more
    assert loader.stats.corrupt_samples == 0


@needs_torchvision
def test_plain_nchw_and_bf16_when_asked(synth_shards):
    _, batches = _device_batches(synth_shards, _config(decoder="nvjpeg"), channels_last=False, dtype=torch.bfloat16)
    x, _ = batches[0]
    assert x.dtype == torch.bfloat16 and x.is_contiguous() and x.shape == (8, 3, 112, 112)


@needs_torchvision
@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_jpeg_is_one_ignored_label_and_a_good_image(corrupted_copy, workers):
    data, bad = corrupted_copy(2)
    loader, batches = _device_batches(data, _config(workers=workers, decoder="nvjpeg"))
    labels = [lab for _, y in batches for lab in y.tolist()]
    assert loader.stats.corrupt_samples == 2 == labels.count(-1)
    assert sorted(f.key for f in loader.stats.faults) == sorted(bad)
    assert all(f.shard.endswith("train-000002.tar") and f.kind == "corrupt" for f in loader.stats.faults)
    for x, y in batches:
        for slot in (y == -1).nonzero().flatten().tolist():  # filled with a copy of a good image of the batch
            assert any(torch.equal(x[slot], x[other]) for other in range(len(y)) if y[other] >= 0)


@needs_torchvision
def test_a_corrupt_jpeg_under_strict_names_shard_and_key(corrupted_copy):
    data, bad = corrupted_copy(1)
    loader = build_train_loader(data, _config(decoder="nvjpeg", strict=True), World(), seed=SEED)
    with pytest.raises(InputError) as err:
        list(DevicePrefetcher(loader, "cpu"))
    assert "train-000002.tar" in str(err.value) and f"key {next(iter(bad))}" in str(err.value)


@needs_torchvision
@pytest.mark.parametrize("workers,stop", [(0, 4), (2, 5)])
def test_resume_mid_epoch_gives_the_same_remaining_batches(synth_shards, workers, stop):
    config = _config(workers=workers, decoder="nvjpeg")
    full, expected = _device_batches(synth_shards, config)
    first = build_train_loader(synth_shards, config, World(), seed=SEED)
    batches = DevicePrefetcher(first, "cpu")
    it = iter(batches)
    for _ in range(stop):
        next(it)
    state = batches.state_dict()
    assert state["position"] == stop
    del it
    resumed = build_train_loader(synth_shards, config, World(), seed=SEED)
    resumed.load_state_dict(state)
    rest = [(x.clone(), y.clone()) for x, y in DevicePrefetcher(resumed, "cpu")]
    assert len(rest) == len(expected) - stop
    for (x, y), (want_x, want_y) in zip(rest, expected[stop:]):
        assert torch.equal(y, want_y) and torch.equal(x, want_x)


@needs_torchvision
def test_nvjpeg_refuses_a_device_that_is_not_cuda(synth_shards):
    with pytest.raises(InputError, match=r"^--decoder nvjpeg needs a CUDA device, got --device cpu"):
        build_train_loader(synth_shards, _config(decoder="nvjpeg"), World(), device="cpu")


@pytest.mark.skipif(_torchvision_works(), reason="torchvision imports here")
def test_nvjpeg_without_torchvision_is_one_line(synth_shards):
    with pytest.raises(InputError) as err:
        build_train_loader(synth_shards, _config(decoder="nvjpeg"), World())
    message = str(err.value)
    assert message.startswith("--decoder nvjpeg needs torchvision") and "lresnet[torchvision]" in message
    assert "\n" not in message


def test_nvjpeg_takes_only_the_flip():
    with pytest.raises(InputError, match=r"augment: got \['blur'\], expected none with --decoder nvjpeg"):
        PipelineConfig(decoder="nvjpeg", augment=("blur",))


@pytest.mark.cuda
@needs_torchvision
@pytest.mark.parametrize("workers", [0, 2])
def test_nvjpeg_on_cuda_matches_simplejpeg(synth_shards, workers):
    _, cpu = _device_batches(synth_shards, _config(workers=workers))
    loader, gpu = _device_batches(synth_shards, _config(workers=workers, decoder="nvjpeg"), device="cuda",
                                  dtype=torch.bfloat16)
    torch.cuda.synchronize()
    for (x, y), (want_x, want_y) in zip(gpu, cpu):
        assert x.is_cuda and y.is_cuda and x.dtype == torch.bfloat16
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y.cpu(), want_y)
        diff = (x.float().cpu() - want_x).abs()
        assert diff.max() <= 8 * LEVEL + 2 ** -7 * 2 and diff.mean() < 2 * LEVEL  # + bf16 rounding
    assert loader.stats.corrupt_samples == 0
