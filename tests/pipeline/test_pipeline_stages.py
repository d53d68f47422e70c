"""Stages on plain lists, no files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lresnet.core.errors import InputError
from lresnet.pipeline import stages
from lresnet.pipeline.augment import GaussianBlur, HorizontalFlip, build_augmentations, random_width
from lresnet.pipeline.decoders import SampleError
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


def test_attach_random_is_seeded_and_resumes_exactly():
    groups = [[None] * 4 for _ in range(6)]
    a = [r for _, r in stages.attach_random(groups, 3, (7,))]
    b = [r for _, r in stages.attach_random(groups, 3, (7,))]
    c = [r for _, r in stages.attach_random(groups, 3, (8,))]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not np.array_equal(a[0], c[0])
    assert all(r.shape == (4, 3) and (r >= 0).all() and (r < 1).all() for r in a)
    resumed = [r for _, r in stages.attach_random(groups[4:], 3, (7,), first=4)]
    assert all(np.array_equal(x, y) for x, y in zip(resumed, a[4:]))
    assert all(r is None for _, r in stages.attach_random(groups, 0, (7,)))


def test_batch_groups_encoded_samples_and_pads_a_short_stream():
    out = list(stages.batch(_samples(5), 2, 4))
    assert [[s and s["i"] for s in g] for g in out] == [[0, 1], [2, 3], [4, None], [None, None]]


def test_skip_drops_the_first_samples():
    assert [s["i"] for s in stages.skip(_samples(10), 4)] == [4, 5, 6, 7, 8, 9]


def _fake_decoder(data: bytes) -> np.ndarray:
    if data == b"bad":
        raise SampleError("not a JPEG")
    size = int(data)
    return np.full((size, size, 3), size, np.uint8)


def _raw(items, width=0):
    group = [None if k is None else {"__key__": k, "__url__": "shard-7.tar", "jpg": j, "cls": c}
             for k, j, c in items]
    return [(group, np.zeros((len(group), width)) if width else None)]


def test_decode_counts_and_skips_bad_samples():
    faults = ["from the source"]
    items = _raw([("a", b"4", b"1"), ("b", b"bad", b"2"), ("c", b"5", b"3"), ("d", b"4", b"9"), ("e", b"4", b"x"),
                  (None, None, None)])
    (images, labels, handed), = stages.decode(items, _fake_decoder, [], (4, 4), 5, faults)
    assert labels.tolist() == [1, -1, -1, -1, -1, -1]
    assert images.shape == (6, 4, 4, 3) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert (images == 4).all()  # bad and empty slots hold a copy of a good image of the batch
    assert handed[0] == "from the source" and faults == []
    assert [(f.kind, f.shard, f.key) for f in handed[1:]] == [("corrupt", "shard-7.tar", k) for k in "bcde"]
    assert "not a JPEG" in handed[1].message and "5x5x3" in handed[2].message and "out of range" in handed[3].message


def test_decode_counts_a_missing_member_as_corrupt():
    group = [{"__key__": "a", "__url__": "s.tar", "jpg": b"4", "cls": b"1"}, {"__key__": "b", "__url__": "s.tar", "cls": b"2"},
             {"__key__": "c", "__url__": "s.tar", "jpg": b"4"}]
    (_, labels, handed), = stages.decode([(group, None)], _fake_decoder, [], (4, 4), 5, [])
    assert labels.tolist() == [1, -1, -1]
    assert ["'jpg' member" in handed[0].message, "'cls' member" in handed[1].message] == [True, True]


@pytest.mark.parametrize("bug", [TypeError("an argument of the wrong type"), ValueError("a numpy mistake"),
                                 AttributeError("no such attribute")])
def test_a_bug_in_the_decoder_is_raised_not_counted_as_corrupt(bug):
    # only SampleError means bad data: anything else a decoder raises is a bug and must surface
    def broken(data: bytes) -> np.ndarray:
        raise bug

    faults: list = []
    with pytest.raises(type(bug), match=str(bug)):
        list(stages.decode(_raw([("a", b"4", b"1")]), broken, [], (4, 4), 5, faults))
    assert faults == []


def test_a_bug_in_an_augmentation_is_raised_not_counted_as_corrupt():
    class Broken(HorizontalFlip):
        def apply(self, image, u, i):
            raise ValueError("a bug in the augmentation")

    with pytest.raises(ValueError, match="a bug in the augmentation"):
        list(stages.decode(_raw([("a", b"4", b"1")], width=1), _fake_decoder, [Broken()], (4, 4), 5, []))


def test_blur_takes_the_uniforms_as_drawn():
    # the uniforms come as a numpy row: Pillow 13 refused a numpy scalar radius (a bug that was
    # booked as ~20 % corrupt samples)
    image = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    u = np.random.default_rng(2).random((4, 2))
    u[:, 0] = 0.0  # blur every sample
    out = [GaussianBlur().apply(image, row, 0) for row in u]
    assert all(o.shape == image.shape and o.dtype == np.uint8 and not np.array_equal(o, image) for o in out)


def test_decode_of_a_batch_with_no_good_sample_is_zeros():
    (images, labels, _), = stages.decode(_raw([("b", b"bad", b"2"), (None, None, None)]), _fake_decoder, [],
                                         (4, 4), 5, [])
    assert labels.tolist() == [-1, -1] and not images.any()


def test_decode_strict_names_shard_and_key():
    items = _raw([("a", b"4", b"1"), ("k17", b"bad", b"2")])
    with pytest.raises(InputError) as err:
        list(stages.decode(items, _fake_decoder, [], (4, 4), 5, [], strict=True))
    assert "shard-7.tar" in str(err.value) and "k17" in str(err.value)


def test_decode_ring_reuses_shared_buffers():
    batches = [([{"__key__": str(i), "__url__": "s", "jpg": b"2", "cls": str(i).encode()} for i in (2 * b, 2 * b + 1)],
                None) for b in range(4)]
    out = [(images.data_ptr(), labels.tolist()) for images, labels, _ in
           stages.decode(batches, _fake_decoder, [], (2, 2), None, [], ring=3)]
    assert [lab for _, lab in out] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert out[0][0] == out[3][0] and len({ptr for ptr, _ in out[:3]}) == 3


@pytest.mark.parametrize("decoder", ["simplejpeg", "pillow"])
def test_decode_with_flip_mirrors_exactly_the_drawn_slots(decoder):
    from lresnet.pipeline.decoders import get_decoder
    from lresnet.convert.synthetic import encode_jpegs, render_faces

    jpegs = encode_jpegs(render_faces(list(range(4)), np.random.default_rng(0), seed=1))
    decode = get_decoder(decoder)
    group = [{"__key__": str(i), "__url__": "s", "jpg": j, "cls": b"0"} for i, j in enumerate(jpegs)]
    rand = np.array([[0.1], [0.9], [0.4], [0.6]])
    (images, _, _), = stages.decode([(group, rand)], decode, build_augmentations(True), (112, 112), 1, [])
    for i, jpeg in enumerate(jpegs):
        want = decode(jpeg)
        assert np.array_equal(images[i].numpy(), want[:, ::-1] if rand[i, 0] < 0.5 else want)


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
    changed = stages.apply_augmentations(image, augs, [0.0] * random_width(augs))
    untouched = stages.apply_augmentations(image, augs, [0.99] * random_width(augs))
    assert changed.shape == image.shape and changed.dtype == np.uint8
    assert not np.array_equal(changed, image)
    assert np.array_equal(untouched, image)


def test_unknown_augmentation_is_refused():
    with pytest.raises(ValueError, match="expected one of"):
        build_augmentations(True, ("rotate",))


def test_expand_braces():
    assert expand_braces("d/train-{000008..000011}.tar") == [f"d/train-0000{i:02d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
