"""Device stage: normalisation values, NCHW channels_last layout, dtypes, prefetching."""

from __future__ import annotations

import pytest
import torch

from lresnet.pipeline import DevicePrefetcher, SyntheticSource, normalize_batch


def _batch():
    images = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[0, 0, 0] = torch.tensor([0, 255, 127], dtype=torch.uint8)
    return images


def test_normalize_values_and_layout():
    images = _batch()
    x = normalize_batch(images, "cpu")
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, (127 - 127.5) / 127.5])
    want = (images.permute(0, 3, 1, 2).double() - 127.5) / 127.5
    assert torch.allclose(x.double(), want, atol=1e-6)


def test_normalize_bf16_and_plain_nchw():
    images = _batch()
    x = normalize_batch(images, "cpu", dtype=torch.bfloat16, channels_last=False)
    assert x.dtype == torch.bfloat16 and x.is_contiguous()
    assert torch.allclose(x.float(), normalize_batch(images, "cpu"), atol=1e-2)


def test_normalize_refuses_wrong_input():
    with pytest.raises(ValueError, match="expected uint8 images"):
        normalize_batch(torch.zeros(2, 3, 5, 5), "cpu")


def test_prefetcher_matches_normalize_and_keeps_labels():
    source = [(_batch(), torch.tensor([3, 4])), (_batch(), torch.tensor([5, 6]))]
    out = list(DevicePrefetcher(source, "cpu"))
    assert [labels.tolist() for _, labels in out] == [[3, 4], [5, 6]]
    assert torch.equal(out[0][0], normalize_batch(source[0][0], "cpu"))


def test_synthetic_source_contract():
    source = SyntheticSource(batch_size=4, num_classes=100000, steps=5, seed=1, pin_memory=False)
    batches = list(source)
    assert len(batches) == len(source) == 5
    images, labels = batches[0]
    assert images.shape == (4, 112, 112, 3) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    all_labels = torch.cat([lab for _, lab in batches])
    assert int(all_labels.min()) >= 0 and int(all_labels.max()) < 100000
    assert len(set(all_labels.tolist())) > 15  # many classes, not a handful
    again = [lab.tolist() for _, lab in SyntheticSource(4, 100000, 5, seed=1, pin_memory=False)]
    assert again == [lab.tolist() for _, lab in batches]
    source.set_epoch(1)
    assert [lab.tolist() for _, lab in source] != again
    x, _ = next(iter(DevicePrefetcher(source, "cpu", dtype=torch.bfloat16)))
    assert x.shape == (4, 3, 112, 112) and x.dtype == torch.bfloat16


@pytest.mark.cuda
def test_prefetcher_on_cuda_with_pinned_batches():
    source = [(_batch().pin_memory(), torch.tensor([1, 2]).pin_memory()) for _ in range(3)]
    out = list(DevicePrefetcher(source, "cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    assert len(out) == 3
    x, labels = out[-1]
    assert x.is_cuda and labels.is_cuda and x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x.float().cpu(), normalize_batch(source[-1][0], "cpu"), atol=1e-2)
