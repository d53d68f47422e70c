"""Decoders agree within decoder tolerance; unknown or missing ones are refused clearly."""

from __future__ import annotations

import numpy as np
import pytest

from lresnet.pipeline import PipelineConfig, available_decoders, get_decoder
from lresnet.pipeline.decoders import turbojpeg_available


@pytest.fixture(scope="module")
def jpegs():
    from lresnet.convert.synthetic import encode_jpegs, render_faces

    images = render_faces(list(range(6)), np.random.default_rng(0), seed=1)
    return images, encode_jpegs(images)


def _decoders():
    names = ["simplejpeg", "pillow"]
    return names + (["turbojpeg"] if turbojpeg_available() else [])


@pytest.mark.parametrize("name", _decoders())
def test_decoders_agree_with_simplejpeg(jpegs, name):
    images, data = jpegs
    reference, other = get_decoder("simplejpeg"), get_decoder(name)
    for image, jpeg in zip(images, data):
        a, b = reference(jpeg), other(jpeg)
        assert a.shape == b.shape == (112, 112, 3) and b.dtype == np.uint8
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 8 and diff.mean() < 1.0  # IDCT / upsampling differences only
        assert np.abs(a.astype(int) - image.astype(int)).mean() < 8  # and close to what was encoded


def test_unknown_decoder_lists_the_choices():
    with pytest.raises(ValueError, match="simplejpeg, turbojpeg, pillow"):
        get_decoder("opencv")
    with pytest.raises(ValueError, match="got 'opencv'"):
        PipelineConfig(decoder="opencv")


@pytest.mark.skipif(turbojpeg_available(), reason="PyTurboJPEG with its library is installed here")
def test_turbojpeg_missing_is_explained():
    assert "turbojpeg" not in available_decoders()
    with pytest.raises(ValueError, match="libturbojpeg"):
        get_decoder("turbojpeg")


def test_config_validation_messages():
    with pytest.raises(ValueError, match="batch_size: got 0, expected > 0"):
        PipelineConfig(batch_size=0)
    with pytest.raises(ValueError, match="got 'rotate'"):
        PipelineConfig(augment=["rotate"])
    assert PipelineConfig(augment=["crop"]).augment == ("crop",)


def test_simplejpeg_decodes_into_a_slot_mirrored_or_not(jpegs):
    _, data = jpegs
    decode = get_decoder("simplejpeg")
    out = np.zeros((2, 112, 112, 3), np.uint8)
    decode.into(data[0], out[0])
    decode.into(data[0], out[1], mirror=True)
    assert np.array_equal(out[0], decode(data[0])) and np.array_equal(out[1], out[0][:, ::-1])
    with pytest.raises(ValueError, match="112x112x3"):
        decode.into(data[0], np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="image is 112x112x3, expected 120x120x3"):
        decode.into(data[0], np.zeros((120, 120, 3), np.uint8), mirror=True)


@pytest.mark.parametrize("width", [32, 30])  # rows of 96 bytes (8-byte words) and of 90 (the general path)
def test_simplejpeg_mirror_of_any_width(width):
    import simplejpeg

    image = np.random.default_rng(width).integers(0, 256, (24, width, 3), dtype=np.uint8)
    data = simplejpeg.encode_jpeg(image, quality=95, colorspace="RGB")
    decode = get_decoder("simplejpeg")
    out = np.zeros((24, width, 3), np.uint8)
    decode.into(data, out, mirror=True)
    assert np.array_equal(out, decode(data)[:, ::-1])
