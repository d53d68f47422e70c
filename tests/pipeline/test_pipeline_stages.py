"""Stages on plain lists, no files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lresnet.convert.errors import InputError
from lresnet.pipeline import stages
from lresnet.pipeline.augment import HorizontalFlip, build_augmentations, random_width
from lresnet.pipeline.shards import expand_braces


def _samples(n):
    return [{"__key__": f"{i:04d}", "__url__": "s.tar", "i": i} for i in range(n)]


def test_shuffle_is_a_seeded_permutation():
    out = [s["i"] for s in stages.shuffle(_samples(500), 64, (1, 2))]
    again = [s["i"] for s in stages.shuffle(_samples(500), 64, (1, 2))]
    other = [s["i"] for s in stages.shuffle(_samples(500), 64, (1, 3))]
    assert sorted(out) == list(range(500))
    assert out == again
    assert out != other
    assert out != list(range(500))
    # a sample can only come out after the buffer (64) has filled behind it, but can travel far
    assert all(pos >= i - 64 for pos, i in enumerate(out))
    assert max(pos - i for pos, i in enumerate(out)) > 64


def test_shuffle_without_buffer_keeps_order():
    assert [s["i"] for s in stages.shuffle(_samples(10), 0, (0,))] == list(range(10))


def test_attach_random_does_not_depend_on_chunking():
    a = [s["rand"] for s in stages.attach_random(_samples(50), 3, (7,), chunk=256)]
    b = [s["rand"] for s in stages.attach_random(_samples(50), 3, (7,), chunk=256)]
    c = [s["rand"] for s in stages.attach_random(_samples(50), 3, (8,), chunk=256)]
    assert a == b and a != c
    assert all(len(r) == 3 and all(0 <= x < 1 for x in r) for r in a)


def test_skip_drops_the_first_samples():
    assert [s["i"] for s in stages.skip(_samples(10), 4)] == [4, 5, 6, 7, 8, 9]


def _fake_decoder(data: bytes) -> np.ndarray:
    if data == b"bad":
        raise ValueError("not a JPEG")
    size = int(data)
    return np.full((size, size, 3), size, np.uint8)


def _raw(items):
    return [{"__key__": k, "__url__": "shard-7.tar", "jpg": j, "cls": c} for k, j, c in items]


def test_decode_counts_and_skips_bad_samples():
    faults = []
    items = _raw([("a", b"4", b"1"), ("b", b"bad", b"2"), ("c", b"5", b"3"), ("d", b"4", b"9"), ("e", b"4", b"x")])
    out = list(stages.decode(items, _fake_decoder, (4, 4), 5, faults))
    assert [s["label"] for s in out] == [1, -1, -1, -1, -1]
    assert out[0]["image"].shape == (4, 4, 3)
    assert all(s["image"] is None for s in out[1:])
    assert [(f.kind, f.shard, f.key) for f in faults] == [("corrupt", "shard-7.tar", k) for k in "bcde"]
    assert "not a JPEG" in faults[0].message and "5x5x3" in faults[1].message and "out of range" in faults[2].message


def test_decode_strict_names_shard_and_key():
    items = _raw([("a", b"4", b"1"), ("k17", b"bad", b"2")])
    with pytest.raises(InputError) as err:
        list(stages.decode(items, _fake_decoder, (4, 4), 5, [], strict=True))
    assert "shard-7.tar" in str(err.value) and "k17" in str(err.value)


def test_flip_mirrors_only_when_drawn():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    flip = HorizontalFlip(0.5)
    assert np.array_equal(flip.apply(image, [0.2], 0), image[:, ::-1])
    assert flip.apply(image, [0.7], 0) is image


@pytest.mark.parametrize("threads", [1, 2])
def test_flip_of_a_full_size_image_in_any_thread_setting(threads):
    image = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert np.array_equal(HorizontalFlip(0.5).apply(image, [0.0], 0), image[:, ::-1])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("extra", [("crop",), ("color",), ("blur",), ("gray",), ("crop", "color", "blur", "gray")])
def test_extra_augmentations_keep_shape_and_dtype(extra):
    augs = build_augmentations(True, extra)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    samples = [{"image": image, "rand": [0.0] * random_width(augs)}, {"image": image, "rand": [0.99] * random_width(augs)}]
    changed, untouched = list(stages.augment(samples, augs))
    assert changed["image"].shape == image.shape and changed["image"].dtype == np.uint8
    assert not np.array_equal(changed["image"], image)
    assert np.array_equal(untouched["image"], image)


def test_unknown_augmentation_is_refused():
    with pytest.raises(ValueError, match="expected one of"):
        build_augmentations(True, ("rotate",))


def _decoded(labels, size=2):
    return [{"image": None if lab is None else np.full((size, size, 3), lab, np.uint8),
             "label": -1 if lab is None else lab} for lab in labels]


def test_batch_shape_is_fixed_and_bad_slots_are_labelled_minus_one():
    faults = ["f1"]
    out = list(stages.batch(_decoded([1, None, 3, 4, 5]), 3, 3, (2, 2), faults))
    assert len(out) == 3  # 5 samples, 3 per batch, 3 batches asked for: the stream ran short
    images, labels, handed = out[0]
    assert images.shape == (3, 2, 2, 3) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert labels.tolist() == [1, -1, 3]
    assert images[1].unique().tolist() == [3]  # the hole holds a copy of a good image of the batch
    assert handed == ["f1"] and faults == []
    assert out[1][1].tolist() == [4, 5, -1]
    assert out[2][1].tolist() == [-1, -1, -1]


def test_batch_ring_reuses_shared_buffers():
    out = [(images.data_ptr(), labels.tolist()) for images, labels, _ in
           stages.batch(_decoded(list(range(8))), 2, 4, (2, 2), [], ring=3)]
    assert [lab for _, lab in out] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert out[0][0] == out[3][0] and len({ptr for ptr, _ in out[:3]}) == 3


def test_expand_braces():
    assert expand_braces("d/train-{000008..000011}.tar") == [f"d/train-0000{i:02d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
