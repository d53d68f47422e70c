"""Synthetic faces_emore: layout, determinism, held-out pair identities, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import simplejpeg

from lresnet.convert.pairs import load_bin
from lresnet.convert.recordio import FacesEmore, RecordReader, unpack
from lresnet.convert.synthetic import EVAL_ID_BASE, FaceRenderer, render_faces, render_templates, synthesize

SMALL = dict(identities=4, images_per_id=3, pairs=6)


def test_layout_matches_faces_emore(tmp_path):
    summary = synthesize(tmp_path / "s", seed=1, **SMALL)
    root = tmp_path / "s"
    assert sorted(p.name for p in root.iterdir()) == [
        "agedb_30.bin", "cfp_fp.bin", "lfw.bin", "property", "train.idx", "train.rec"]
    assert (root / "property").read_text() == "4,112,112\n"
    assert summary["images"] == 12
    reader = RecordReader(root / "train.rec", root / "train.idx")
    assert reader.keys == list(range(0, 1 + 12 + 4))
    header, payload = unpack(reader.read(0))
    assert header.flag == 2 and header.label == (13.0, 17.0) and payload == b""
    for c in range(4):
        ident, payload = unpack(reader.read(13 + c))
        assert ident.label == (1.0 + 3 * c, 4.0 + 3 * c) and payload == b""
    fe = FacesEmore(root)
    assert fe.header_key == 0 and fe.image_keys == list(range(1, 13))
    labels = [fe.read_image(k)[0] for k in fe.image_keys]
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    jpeg = fe.read_image(5)[1]
    assert simplejpeg.decode_jpeg(jpeg).shape == (112, 112, 3)
    for name in ("lfw", "agedb_30", "cfp_fp"):
        pairs = load_bin(root / f"{name}.bin")
        assert len(pairs.images) == 12 and sum(pairs.issame) == 3
        assert simplejpeg.decode_jpeg(pairs.images[0]).shape == (112, 112, 3)


def test_header_at_end_and_multi_labels(tmp_path):
    synthesize(tmp_path / "s", seed=2, label_format="multi", header_at="end", sets=("lfw",), **SMALL)
    fe = FacesEmore(tmp_path / "s")
    assert fe.header_key == 16 and fe.image_keys == list(range(12)) and fe.identity_keys == range(12, 16)
    header, _ = unpack(fe.reader.read(4))
    assert header.flag == 2 and header.label == (1.0, 0.0)
    assert fe.read_image(4)[0] == 1


def test_deterministic_for_seed(tmp_path):
    synthesize(tmp_path / "a", seed=5, **SMALL)
    synthesize(tmp_path / "b", seed=5, **SMALL)
    synthesize(tmp_path / "c", seed=6, **SMALL)
    for name in ("train.rec", "train.idx", "lfw.bin", "cfp_fp.bin", "property"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "train.rec").read_bytes() != (tmp_path / "c" / "train.rec").read_bytes()
    synthesize(tmp_path / "d", seed=5, sets=("cfp_fp",), **SMALL)
    assert (tmp_path / "d" / "cfp_fp.bin").read_bytes() == (tmp_path / "a" / "cfp_fp.bin").read_bytes()
    assert (tmp_path / "a" / "lfw.bin").read_bytes() != (tmp_path / "a" / "cfp_fp.bin").read_bytes()


def test_identities_are_stable_and_distinct():
    t = render_templates([3, 4, 3, EVAL_ID_BASE + 3], seed=0)
    assert t.shape == (4, 128, 128, 8) and t.dtype == np.uint8
    assert np.array_equal(t[0], t[2])
    assert not np.array_equal(t[0], t[1]) and not np.array_equal(t[0], t[3])
    assert not np.array_equal(render_templates([3], seed=1)[0], t[0])


def test_views_vary_per_image():
    rng = np.random.default_rng(0)
    imgs = render_faces([7] * 4 + [8] * 4, rng, seed=0)
    assert imgs.shape == (8, 112, 112, 3) and imgs.dtype == np.uint8
    assert len({im.tobytes() for im in imgs}) == 8
    # two renderers with the same seed draw the same identities
    again = FaceRenderer(seed=0).render([7, 8], np.random.default_rng(0))
    assert np.array_equal(again, FaceRenderer(seed=0).render([7, 8], np.random.default_rng(0)))


def test_render_faces_deterministic_for_rng():
    a = render_faces([1, 2, 3], np.random.default_rng(3), seed=4)
    b = render_faces([1, 2, 3], np.random.default_rng(3), seed=4)
    assert np.array_equal(a, b)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="label_format"):
        synthesize(tmp_path, label_format="double", **SMALL)
    with pytest.raises(ValueError, match="identities >= 1"):
        synthesize(tmp_path, identities=0)


def _lresnet(*args):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    code = "import sys; from lresnet.tools.cli import main; sys.argv = ['lresnet'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_synth(tmp_path):
    out = tmp_path / "cli"
    res = _lresnet("synth", str(out), "--identities", "3", "--images-per-id", "2", "--pairs", "4",
                   "--seed", "9", "--sets", "lfw", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["images"] == 6 and summary["pairs"] == {"lfw": 4}
    api = synthesize(tmp_path / "api", identities=3, images_per_id=2, pairs=4, seed=9, sets=("lfw",))
    assert api["train_rec_bytes"] == summary["train_rec_bytes"]
    assert (out / "train.rec").read_bytes() == (tmp_path / "api" / "train.rec").read_bytes()


def test_cli_synth_bad_option_is_one_line_exit_2(tmp_path):
    res = _lresnet("synth", str(tmp_path / "x"), "--header-at", "middle")
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == ["lresnet: error: --header-at: got 'middle', expected one of start, end"]
