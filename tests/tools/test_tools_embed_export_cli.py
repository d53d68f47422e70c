"""``lresnet export``, ``lresnet embed``, ``lresnet synth-ijb`` and ``lresnet bench ijb``: JSON output,
ONNX and PyTorch embeddings agreeing, and bad input as one line with exit code 2 (run in-process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch

from lresnet.convert.synthetic import render_faces
from lresnet.model import create_backbone
from lresnet.tools.cli import main

TINY = dict(embedding_size=16, widths=[8, 16, 32, 64])


@pytest.fixture
def lresnet(capsys, monkeypatch):
    """``lresnet(*args) -> (exit code, stdout, stderr)``."""

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["lresnet", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A training checkpoint of a tiny IR-18, MobileFaceNet weights, and a folder of aligned faces."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    net = create_backbone("ir18", **TINY)
    torch.save({"backbone": net.state_dict(), "step": 7,
                "config": {"model": {"net": "ir18", "embedding_size": 16, "options": {"widths": [8, 16, 32, 64]}}}},
               root / "ckpt.pt")
    torch.save(create_backbone("mobilefacenet").state_dict(), root / "mfn.pt")
    (root / "faces").mkdir()
    for k, face in enumerate(render_faces(list(range(5)), np.random.default_rng(0))):
        (root / "faces" / f"{k}.jpg").write_bytes(simplejpeg.encode_jpeg(face, quality=95, colorspace="RGB"))
    return root


def test_export_then_embed_with_onnx_and_pytorch_agree(files, tmp_path, lresnet):
    code, out, err = lresnet("export", "--checkpoint", files / "ckpt.pt", "--onnx", tmp_path / "m.onnx",
                             "--exporter", "torchscript", "--check-images", files / "faces", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == "lresnet-export/1" and doc["input"]["name"] == "data"
    assert doc["input"]["shape"][1:] == [3, 112, 112] and doc["output"]["shape"][1:] == [16]
    assert [c["input"] for c in doc["checks"]] == ["random", "random", "images"]
    assert all(c["passed"] for c in doc["checks"]) and doc["metadata"]["backbone"] == "ir18"
    assert doc["model"]["kind"] == "checkpoint" and doc["model"]["step"] == 7

    code, out, err = lresnet("embed", files / "faces", "--onnx", tmp_path / "m.onnx", "--out", tmp_path / "o.npy",
                             "--flip", "--json")
    assert code == 0, err
    onnx_doc = json.loads(out)
    assert (onnx_doc["rows"], onnx_doc["embedding_size"], onnx_doc["failed"]) == (5, 16, 0)
    assert onnx_doc["encoder"]["kind"] == "onnx"
    code, out, err = lresnet("embed", files / "faces", "--checkpoint", files / "ckpt.pt", "--out", tmp_path / "t.npy",
                             "--flip", "--json")
    assert code == 0, err
    a, b = np.load(tmp_path / "o.npy"), np.load(tmp_path / "t.npy")
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max())
    assert (tmp_path / "o.names.txt").read_text() == (tmp_path / "t.names.txt").read_text()


def test_embed_table_and_weights(files, tmp_path, lresnet):
    code, out, err = lresnet("embed", files / "faces" / "0.jpg", files / "faces" / "1.jpg", "--weights",
                             files / "mfn.pt", "--out", tmp_path / "e.npy", "--normalize")
    assert code == 0, err
    assert "rows written" in out and "2 x 512" in out
    rows = np.load(tmp_path / "e.npy")
    assert rows.shape == (2, 512) and np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)


def test_synth_ijb_and_bench_ijb(tmp_path, lresnet):
    code, out, err = lresnet("synth-ijb", tmp_path / "ijb", "--identities", "3", "--templates-per-id", "2", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["templates"] == 6 and doc["positive_pairs"] == 3
    assert (tmp_path / "ijb" / "IJBC" / "meta" / "ijbc_template_pair_label.txt").is_file()
    code, out, err = lresnet("bench", "ijb", "--images", "400", "--templates", "40", "--positive-pairs", "30",
                             "--negative-pairs", "2000", "--dim", "8", "--no-baseline", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == "lresnet-bench-ijb/1" and doc["set"]["images"] == 400 and doc["peak_rss_mb"] > 0


# (id, arguments, the error line); {f} is the module's files folder, {tmp} a fresh folder
CASES = [
    ("export two models", ["export", "--onnx", "{tmp}/m.onnx", "--checkpoint", "{f}/ckpt.pt", "--weights", "{f}/mfn.pt"],
     "--checkpoint: give exactly one of --checkpoint or --weights"),
    ("export exporter", ["export", "--onnx", "{tmp}/m.onnx", "--weights", "{f}/mfn.pt", "--exporter", "jit"],
     "--exporter: got 'jit', expected one of dynamo, torchscript"),
    ("export channel order", ["export", "--onnx", "{tmp}/m.onnx", "--weights", "{f}/mfn.pt", "--channel-order", "GRB"],
     "--channel-order: got 'GRB', expected one of RGB, BGR"),
    ("export missing weights", ["export", "--onnx", "{tmp}/m.onnx", "--weights", "{tmp}/none.pt"],
     "{tmp}/none.pt: no such file"),
    ("embed no model", ["embed", "{f}/faces", "--out", "{tmp}/e.npy"],
     "--checkpoint: give exactly one of --checkpoint, --weights or --onnx"),
    ("embed missing input", ["embed", "{tmp}/nothing", "--weights", "{f}/mfn.pt", "--out", "{tmp}/e.npy"],
     "{tmp}/nothing: no such file, folder or pattern"),
    ("embed strict", ["embed", "{tmp}", "--weights", "{f}/mfn.pt", "--out", "{tmp}/out/e.npy", "--strict"],
     "{tmp}/bad.jpg: does not decode (not a JPEG, nor an image format Pillow reads)"),
    ("embed landmarks two inputs", ["embed", "{f}/faces", "{tmp}", "--landmarks", "{tmp}/lm.txt", "--weights",
                                    "{f}/mfn.pt", "--out", "{tmp}/e.npy"],
     "--landmarks: with --landmarks give one folder of loose crops, got 2 inputs"),
    ("embed onnx not a model", ["embed", "{f}/faces", "--onnx", "{tmp}/bad.jpg", "--out", "{tmp}/e.npy"],
     None),
    ("synth-ijb target", ["synth-ijb", "{tmp}/x", "--target", "IJBA"],
     "--target: got 'IJBA', expected one of IJBC, IJBB"),
]


@pytest.mark.parametrize("args,expected", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input_is_one_line_exit_2(args, expected, files, tmp_path, lresnet):
    (tmp_path / "bad.jpg").write_bytes(b"NOT A JPEG")
    (tmp_path / "lm.txt").write_text("0.jpg 1 2 3 4 5 6 7 8 9 10\n")
    code, out, err = lresnet(*(a.format(f=files, tmp=tmp_path) for a in args))
    assert code == 2, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lresnet: error: "), err
    if expected is not None:
        assert lines[0] == "lresnet: error: " + expected.format(f=files, tmp=tmp_path)
    else:
        assert "not a loadable ONNX model" in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()
