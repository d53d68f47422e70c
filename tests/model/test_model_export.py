"""ONNX export: onnxruntime against PyTorch (random inputs, batches 1 and 7, real images), metadata,
and how InsightFace's model_zoo would route and preprocess the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lresnet.convert.synthetic import render_faces  # noqa: E402
from lresnet.model import backbone_from_weights, create_backbone  # noqa: E402
from lresnet.model.export import ParityError, export_onnx, normalize_for_onnx  # noqa: E402

TINY = dict(embedding_size=16, widths=[8, 16, 32, 64])


def lively(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics, so that outputs are not near zero and differences show."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return module.eval()


def insightface_view(path):
    """What insightface.model_zoo does with the file (model_zoo.ModelRouter, arcface_onnx.ArcFaceONNX):
    routed as recognition when it has < 5 outputs and a 112x112 input; input mean/std 0/1 only when
    one of the first 8 nodes is named Sub*/_minus* and one Mul*/_mul* (MXNet graphs), else 127.5/127.5;
    images go in as cv2.dnn.blobFromImages(..., swapRB=True): RGB."""
    import onnx

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    outputs = session.get_outputs()
    recognition = len(outputs) < 5 and shape[2] == 112 and shape[3] == 112 and len(outputs) == 1
    names = [n.name for n in onnx.load(str(path)).graph.node[:8]]
    sub = any(n.startswith("Sub") or n.startswith("_minus") for n in names)
    mul = any(n.startswith("Mul") or n.startswith("_mul") for n in names)
    mean, std = (0.0, 1.0) if sub and mul else (127.5, 127.5)
    return recognition, mean, std, session


def blob_like_insightface(images_rgb: np.ndarray, mean: float, std: float) -> np.ndarray:
    """cv2.dnn.blobFromImages(bgr_images, 1/std, (112, 112), (mean,) * 3, swapRB=True) for 112x112 input."""
    bgr = images_rgb[..., ::-1]
    rgb = bgr[..., ::-1].astype(np.float32)
    return ((rgb - mean) * np.float32(1.0 / std)).transpose(0, 3, 1, 2).copy()


def torch_out(module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def test_ir18_export_matches_pytorch_and_insightface_reads_it(tmp_path):
    torch.manual_seed(0)
    net = lively(create_backbone("ir18", **TINY))
    faces = render_faces(list(range(5)), np.random.default_rng(0))
    report = export_onnx(net, tmp_path / "ir18.onnx", exporter="torchscript", images=faces,
                         metadata={"backbone": "ir18"})
    assert [(c.input, c.batch) for c in report.checks] == [("random", 7), ("random", 1), ("images", 5)]
    assert all(c.passed for c in report.checks) and report.max_abs_diff < 1e-3
    assert report.input_shape[1:] == (3, 112, 112) and isinstance(report.input_shape[0], str)
    assert report.metadata["channel_order"] == "RGB" and report.metadata["backbone"] == "ir18"
    recognition, mean, std, session = insightface_view(tmp_path / "ir18.onnx")
    assert recognition and (mean, std) == (127.5, 127.5)
    meta = session.get_modelmeta().custom_metadata_map
    assert (meta["channel_order"], meta["input_mean"], meta["input_std"]) == ("RGB", "127.5", "127.5")
    rng = np.random.default_rng(1)
    for batch in (1, 7):  # the dynamic batch
        x = rng.uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32)
        got = session.run(["embedding"], {"data": x})[0]
        want = torch_out(net, x)
        assert got.shape == (batch, 16)
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    # InsightFace's own preprocessing of the faces gives what lresnet feeds the backbone
    blob = blob_like_insightface(faces, mean, std)
    assert np.allclose(blob, normalize_for_onnx(faces), atol=1e-6)
    got = session.run(None, {"data": blob})[0]
    assert np.abs(got - torch_out(net, normalize_for_onnx(faces))).max() <= 1e-4 * max(1.0, np.abs(got).max())
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_mobilefacenet_dynamo_export(tmp_path):
    torch.manual_seed(1)
    net = lively(create_backbone("mobilefacenet"))
    report = export_onnx(net, tmp_path / "mfn.onnx", exporter="dynamo",
                         images=render_faces([1, 2, 3], np.random.default_rng(2)))
    assert report.exporter == "dynamo" and report.embedding_size == 512 and report.max_abs_diff <= report.tolerance
    recognition, mean, std, session = insightface_view(tmp_path / "mfn.onnx")
    assert recognition and (mean, std) == (127.5, 127.5)
    for batch in (1, 7):
        x = np.random.default_rng(batch).uniform(-1, 1, (batch, 3, 112, 112)).astype(np.float32)
        want = torch_out(net, x)
        assert np.abs(session.run(None, {"data": x})[0] - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def treb1en_state_dict(net: torch.nn.Module) -> dict:
    """An lresnet IR (TreB1eN unit style) state dict under TreB1eN's key names."""
    top = {"stem.conv": "input_layer.0", "stem.bn": "input_layer.1", "stem.act": "input_layer.2",
           "head.bn": "output_layer.0", "head.fc": "output_layer.3", "head.features": "output_layer.4"}
    unit = {"bn1": "res_layer.0", "conv1": "res_layer.1", "act": "res_layer.2", "conv2": "res_layer.3",
            "bn3": "res_layer.4", "se.fc1": "res_layer.5.fc1", "se.fc2": "res_layer.5.fc2",
            "shortcut.0": "shortcut_layer.0", "shortcut.1": "shortcut_layer.1"}
    body = {}
    out = {}
    for key, value in net.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        if module in top:
            out[f"{top[module]}.{leaf}"] = value
            continue
        _, stage, index, part = module.split(".", 3)
        n = body.setdefault((int(stage), int(index)), len(body))
        out[f"body.{n}.{unit[part]}.{leaf}"] = value
    return out


def test_treb1en_import_exports_bgr_or_rgb(tmp_path):
    torch.manual_seed(2)
    source = lively(create_backbone("ir18", unit_style="treb1en", **TINY), seed=3)
    net, info = backbone_from_weights(treb1en_state_dict(source), widths=TINY["widths"])
    assert (info.source, info.channel_order) == ("treb1en", "BGR")
    net = net.eval()
    faces = render_faces(list(range(4)), np.random.default_rng(4))
    report = export_onnx(net, tmp_path / "bgr.onnx", weights_channel_order="BGR", exporter="torchscript", images=faces)
    assert report.metadata["channel_order"] == "BGR" and report.max_abs_diff <= report.tolerance
    session = ort.InferenceSession(str(tmp_path / "bgr.onnx"), providers=["CPUExecutionProvider"])
    bgr_input = normalize_for_onnx(faces, "BGR")
    want = torch_out(net, bgr_input)
    assert np.abs(session.run(None, {"data": bgr_input})[0] - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    # an RGB-taking file for InsightFace: the graph swaps the channels itself
    export_onnx(net, tmp_path / "rgb.onnx", weights_channel_order="BGR", channel_order="RGB", exporter="torchscript",
                images=faces)
    recognition, mean, std, rgb_session = insightface_view(tmp_path / "rgb.onnx")
    assert recognition and (mean, std) == (127.5, 127.5)
    got = rgb_session.run(None, {"data": blob_like_insightface(faces, mean, std)})[0]
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert rgb_session.get_modelmeta().custom_metadata_map["channel_order"] == "RGB"


def test_parity_failure_writes_nothing(tmp_path):
    net = lively(create_backbone("ir18", **TINY))
    (tmp_path / "keep.onnx").write_bytes(b"old")
    with pytest.raises(ParityError, match="onnxruntime differs from PyTorch"):
        export_onnx(net, tmp_path / "keep.onnx", exporter="torchscript", rtol=-1.0)
    assert (tmp_path / "keep.onnx").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx"]
    assert net.training is False or net.training is True  # the module is usable afterwards
    net(torch.zeros(1, 3, 112, 112))


def test_onnx_encoder_applies_the_recorded_preprocessing(tmp_path):
    from lresnet.eval.embed import OnnxEncoder, TorchEncoder

    net = lively(create_backbone("ir18", **TINY), seed=5)
    faces = render_faces(list(range(3)), np.random.default_rng(5))
    for order in ("RGB", "BGR"):
        export_onnx(net, tmp_path / f"{order}.onnx", weights_channel_order=order, exporter="torchscript")
        got = OnnxEncoder(tmp_path / f"{order}.onnx")(faces)
        want = TorchEncoder(net, bgr=order == "BGR")(faces)
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
        assert OnnxEncoder(tmp_path / f"{order}.onnx").describe()["channel_order"] == order
