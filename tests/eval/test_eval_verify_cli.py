"""``lresnet verify`` / ``lresnet bench verify``: results, JSON schema, ROC, one-line errors (exit 2)."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch

from lresnet.convert.pairs import write_bin
from lresnet.eval import evaluate, load_pair_set, normalise_rows, verify_backbone
from lresnet.model import create_backbone
from lresnet.tools.cli import main

TINY = dict(embedding_size=16, widths=[8, 16, 32, 64])


def run_cli(args, capsys, monkeypatch):
    """Run ``lresnet ARGS`` in-process through main(); returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lresnet", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lresnet: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _pairs(n_pairs, seed=0):
    rng = np.random.default_rng(seed)
    images, issame = [], []
    for k in range(n_pairs):
        a = np.kron(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
        same = k % 2 == 0
        b = a if same else np.kron(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
        images += [simplejpeg.encode_jpeg(a, colorspace="RGB"), simplejpeg.encode_jpeg(b, colorspace="RGB")]
        issame.append(same)
    return images, issame


def _write_tar(path, images, issame):
    with tarfile.open(path, "w") as archive:
        for k, same in enumerate(issame):
            for name, data in ((f"{k:06d}.a.jpg", images[2 * k]), (f"{k:06d}.b.jpg", images[2 * k + 1]),
                               (f"{k:06d}.same", b"1" if same else b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    images, issame = _pairs(12)
    val = root / "val"
    val.mkdir()
    _write_tar(val / "lfw.tar", images, issame)
    _write_tar(val / "agedb_30.tar", *_pairs(10, seed=1))
    calfw_images, calfw_issame = _pairs(40, seed=2)  # scored from precomputed embeddings only
    _write_tar(val / "calfw.tar", calfw_images, calfw_issame)
    bins = root / "bins"
    bins.mkdir()
    write_bin(bins / "lfw_bin.bin", images, issame, protocol=2)
    torch.manual_seed(0)
    net = create_backbone("ir18", **TINY)
    ckpt = root / "ckpt.pt"
    torch.save({"backbone": net.state_dict(), "step": 7,
                "config": {"model": {"net": "ir18", "embedding_size": 16, "options": {"widths": [8, 16, 32, 64]}}}},
               ckpt)
    rng = np.random.default_rng(5)
    same = np.array(calfw_issame)
    emb = rng.normal(size=(80, 8)).astype(np.float32)
    emb[1::2][same] = emb[0::2][same] + 0.8 * rng.normal(size=(int(same.sum()), 8))
    np.save(root / "emb.npy", emb)
    return dict(root=root, val=val, bin=bins / "lfw_bin.bin", ckpt=ckpt, emb=root / "emb.npy",
                emb_rows=emb, issame=same, net=net)


RESULT_KEYS = {"name": str, "source": str, "num_pairs": int, "num_folds": int, "accuracy": float, "std": float,
               "best_threshold": float, "val": float, "val_std": float, "far": float, "far_target": float,
               "auc": float, "eer": float, "eer_threshold": float, "xnorm": float, "fold_accuracies": list,
               "fold_thresholds": list, "fold_val": list, "fold_far": list, "val_thresholds": list}


def test_embeddings_json_schema_and_numbers(files, capsys, monkeypatch):
    code, out, err = run_cli(["verify", "--embeddings", files["emb"], "--set", "calfw", "--data", files["val"],
                              "--json"], capsys, monkeypatch)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == "lresnet-verify/1"
    assert doc["model"] == {"kind": "embeddings", "path": str(files["emb"])}
    (entry,) = doc["sets"]
    assert set(entry) == set(RESULT_KEYS)
    for key, kind in RESULT_KEYS.items():
        assert isinstance(entry[key], kind), key
    assert len(entry["fold_accuracies"]) == 10 and entry["num_pairs"] == 40
    expected = evaluate(normalise_rows(files["emb_rows"].astype(np.float64)), files["issame"])
    assert entry["accuracy"] == expected.accuracy and entry["std"] == expected.std
    assert entry["val"] == expected.val and entry["fold_thresholds"] == list(expected.fold_thresholds)
    assert entry["xnorm"] == pytest.approx(np.linalg.norm(files["emb_rows"].astype(np.float64), axis=1).mean())


def test_embeddings_table(files, capsys, monkeypatch):
    code, out, _ = run_cli(["verify", "--embeddings", files["emb"], "--set", "calfw", "--data", files["val"]],
                           capsys, monkeypatch)
    assert code == 0
    assert "calfw" in out and "accuracy (10-fold)" in out and "VR@FAR=0.001" in out and "EER" in out


def test_checkpoint_tar_and_bin_agree_with_library(files, capsys, monkeypatch, tmp_path):
    roc = tmp_path / "roc.png"
    code, out, err = run_cli(["verify", "--checkpoint", files["ckpt"], "--set", "lfw", "--data", files["val"],
                              "--bin", files["bin"], "--batch-size", "8", "--folds", "4", "--json",
                              "--roc", roc], capsys, monkeypatch)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"]["net"] == "ir18" and doc["model"]["step"] == 7 and doc["model"]["flip"] is True
    tar_entry, bin_entry = doc["sets"]
    assert (tar_entry["name"], bin_entry["name"]) == ("lfw", "lfw_bin")
    for key in RESULT_KEYS:
        if key not in ("name", "source"):
            assert tar_entry[key] == bin_entry[key], key
    direct = verify_backbone(files["net"], load_pair_set("lfw", data_dir=files["val"]), batch_size=8,
                             nrof_folds=4)
    assert tar_entry["accuracy"] == direct.accuracy and tar_entry["xnorm"] == pytest.approx(direct.xnorm)
    assert roc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_embeddings_reproduce_the_numbers(files, capsys, monkeypatch, tmp_path):
    saved = tmp_path / "emb"
    code, out, err = run_cli(["verify", "--checkpoint", files["ckpt"], "--set", "lfw", "--data", files["val"],
                              "--batch-size", "24", "--folds", "3", "--json", "--save-embeddings", saved],
                             capsys, monkeypatch)
    assert code == 0, err
    from_model = json.loads(out)["sets"][0]
    assert np.load(saved / "lfw.npy").shape == (24, 16)
    code, out, err = run_cli(["verify", "--embeddings", saved / "lfw.npy", "--set", "lfw", "--data", files["val"],
                              "--folds", "3", "--json"], capsys, monkeypatch)
    assert code == 0, err
    from_file = json.loads(out)["sets"][0]
    for key in RESULT_KEYS:
        if key not in ("xnorm", "source"):  # xnorm: of the raw outputs vs of the saved rows
            assert from_model[key] == from_file[key], key


def test_weights_need_a_net_or_known_keys(files, capsys, monkeypatch, tmp_path):
    sd_path = tmp_path / "sd.pt"
    torch.save(files["net"].state_dict(), sd_path)
    code, out, err = run_cli(["verify", "--weights", sd_path, "--set", "lfw", "--data", files["val"],
                              "--no-flip", "--folds", "2", "--json", "--net", "ir18"], capsys, monkeypatch)
    # ir18 with default widths does not fit the tiny weights: a one-line error naming the file
    assert_one_line_error(code, err, str(sd_path))
    # weights whose names and shapes tell no registered architecture (a MobileFaceNet with another
    # head width) load strictly into --net
    mfn = create_backbone("mobilefacenet", embedding_size=32, head_channels=256)
    mfn_path = tmp_path / "mfn.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in mfn.state_dict().items()}}, mfn_path)
    code, out, err = run_cli(["verify", "--weights", mfn_path, "--set", "agedb_30", "--data", files["val"],
                              "--no-flip", "--folds", "2", "--json"], capsys, monkeypatch)
    assert_one_line_error(code, err, str(mfn_path), "pass --net")
    code, out, err = run_cli(["verify", "--weights", mfn_path, "--net", "mobilefacenet", "--set", "agedb_30",
                              "--data", files["val"], "--no-flip", "--folds", "2", "--json"], capsys, monkeypatch)
    assert_one_line_error(code, err, str(mfn_path), "do not fit backbone 'mobilefacenet'")


def test_registered_mobilefacenet_weights_need_no_net(files, capsys, monkeypatch, tmp_path):
    torch.manual_seed(1)
    mfn = create_backbone("mobilefacenet", embedding_size=32).eval()
    path = tmp_path / "mfn.pt"
    torch.save({"state_dict": {"module._orig_mod." + k: v for k, v in mfn.state_dict().items()}}, path)
    code, out, err = run_cli(["verify", "--weights", path, "--set", "lfw", "--data", files["val"],
                              "--batch-size", "8", "--folds", "4", "--json"], capsys, monkeypatch)
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["model"]["net"], doc["model"]["source"], doc["model"]["bgr"]) == ("mobilefacenet", "lresnet", False)
    direct = verify_backbone(mfn, load_pair_set("lfw", data_dir=files["val"]), batch_size=8, nrof_folds=4)
    assert doc["sets"][0]["accuracy"] == direct.accuracy
    assert doc["sets"][0]["xnorm"] == pytest.approx(direct.xnorm)


BAD = [
    (["--set", "cfp_fp", "--embeddings", "{root}/emb.npy"], "unknown verification set 'cfp_fp'; available: agedb_30, calfw, lfw"),
    (["--set", "lfw", "--data", "{root}/nowhere", "--embeddings", "{root}/emb.npy"], "no such directory"),
    (["--set", "lfw", "--checkpoint", "{root}/missing.pt"], "no such file"),
    (["--set", "lfw", "--embeddings", "{root}/emb.npy", "--checkpoint", "{root}/ckpt.pt"], "exactly one of"),
    (["--set", "lfw"], "exactly one of"),
    (["--set", "agedb_30", "--embeddings", "{root}/emb.npy"],
     "embedding count mismatch: 80 rows, the set has 10 pairs"),
    (["--set", "calfw", "--embeddings", "{root}/flat.npy"], "wrong embedding dimension"),
    (["--set", "calfw", "--embeddings", "{root}/odd.npy"], "odd number of embeddings"),
    (["--set", "lfw", "--set", "agedb_30", "--embeddings", "{root}/emb.npy"], "scores one set"),
    (["--set", "lfw", "--checkpoint", "{root}/ckpt.pt", "--device", "tpu"], "got 'tpu', expected one of cpu"),
    (["--bin", "{root}/odd.bin", "--embeddings", "{root}/emb.npy"], "3 images for 1 pairs"),
    (["--set", "broken", "--checkpoint", "{root}/ckpt.pt"], "pair lacks 000000.b.jpg"),
    (["--set", "lfw", "--checkpoint", "{root}/emb.npy"], "cannot load"),
    (["--set", "lfw", "--bin", "{root}/again/lfw.bin", "--embeddings", "{root}/emb.npy"],
     "set name 'lfw' is given twice"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_exit_2(files, capsys, monkeypatch, args, message):
    root = files["root"]
    np.save(root / "flat.npy", np.zeros(80, np.float32))
    np.save(root / "odd.npy", np.zeros((79, 4), np.float32))
    (root / "odd.bin").write_bytes(pickle.dumps(([b"\xff\xd8"] * 3, [True]), protocol=2))
    (root / "again").mkdir(exist_ok=True)
    shutil.copy(files["bin"], root / "again" / "lfw.bin")
    bad_val = root / "badval"
    if not bad_val.exists():
        shutil.copytree(files["val"], bad_val)
        images, issame = _pairs(1)
        with tarfile.open(bad_val / "broken.tar", "w") as archive:
            info = tarfile.TarInfo("000000.a.jpg")
            info.size = len(images[0])
            archive.addfile(info, io.BytesIO(images[0]))
    data_dir = bad_val if "broken" in args else files["val"]
    argv = ["verify", "--data", data_dir] + [a.format(root=root) for a in args]
    if "--data" in args:  # the case's own --data wins
        argv = ["verify"] + [a.format(root=root) for a in args]
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert_one_line_error(code, err, message)


def test_roc_without_matplotlib_is_a_clear_error(files, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_cli(["verify", "--embeddings", files["emb"], "--set", "calfw", "--data", files["val"],
                            "--roc", tmp_path / "r.png"], capsys, monkeypatch)
    assert_one_line_error(code, err, "needs matplotlib", "lresnet[plots]")


def test_console_script_exit_code(files, tmp_path):
    exe = shutil.which("lresnet") or str(Path(sys.executable).with_name("lresnet"))
    proc = subprocess.run([exe, "verify", "--set", "nope", "--data", str(files["val"]),
                           "--embeddings", str(files["emb"])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "available: agedb_30, calfw, lfw" in proc.stderr


@pytest.mark.slow
def test_bench_verify_reports_ratios(capsys, monkeypatch):
    code, out, err = run_cli(["bench", "verify", "--net", "mobilefacenet", "--images", "2", "--batch-size", "2",
                              "--repeats", "1", "--json"], capsys, monkeypatch)
    assert code == 0, err
    doc = json.loads(out)
    assert [r["variant"].split(":")[0] for r in doc["results"]][0] == "baseline"
    assert len(doc["results"]) == 4 and doc["results"][0]["ratio_to_baseline"] == 1.0
    assert all(r["images_per_s"] > 0 for r in doc["results"])


def _weights_test_module():
    """The reference TreB1eN network written in tests/model (loaded by path: tests are not a package)."""
    import importlib.util

    path = Path(__file__).parents[1] / "model" / "test_model_weights.py"
    spec = importlib.util.spec_from_file_location("_weights_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_treb1en_weights_are_fed_bgr_and_scored_as_their_source_scores_them(files, capsys, monkeypatch, tmp_path):
    ref_module = _weights_test_module()
    ref = ref_module.TrebNet((2, 2, 2, 2), se=False).eval()
    state = ref_module.randomize(ref, seed=4)
    weights = tmp_path / "treb1en.pth"
    torch.save(state, weights)
    code, out, err = run_cli(["verify", "--set", "lfw", "--data", files["val"], "--weights", weights, "--json",
                              "--save-embeddings", tmp_path / "emb", "--folds", "3"], capsys, monkeypatch)
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["model"]["source"], doc["model"]["channel_order"], doc["model"]["bgr"]) == ("treb1en", "BGR", True)

    # the source's own protocol: BGR input, its L2-normalised outputs summed with the mirrored image's
    pairs = load_pair_set("lfw", data_dir=files["val"])
    x = torch.from_numpy(pairs.images[..., ::-1].copy()).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)
    with torch.no_grad():
        expected = (ref(x) + ref(x.flip(3))).double().numpy()
    got = np.load(tmp_path / "emb" / "lfw.npy")
    np.testing.assert_allclose(got, expected, atol=2e-5)
    reference = evaluate(normalise_rows(expected), pairs.issame, nrof_folds=3)
    assert doc["sets"][0]["accuracy"] == reference.accuracy
    assert doc["sets"][0]["best_threshold"] == reference.best_threshold

    # fed RGB instead (as if the channel order were not recorded), the embeddings are another network's
    code, out, err = run_cli(["verify", "--set", "lfw", "--data", files["val"], "--weights", weights, "--rgb",
                              "--save-embeddings", tmp_path / "rgb", "--folds", "3", "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["model"]["bgr"] is False
    assert np.abs(np.load(tmp_path / "rgb" / "lfw.npy") - expected).max() > 50 * 2e-5


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    from lresnet.convert.synthetic import synthesize_ijb

    root = tmp_path_factory.mktemp("ijb")
    synthesize_ijb(root, "IJBB", identities=4, seed=2)
    images = len((root / "IJBB" / "meta" / "ijbb_face_tid_mid.txt").read_text().splitlines())
    np.save(root / "rows.npy", np.random.default_rng(0).normal(size=(images, 8)).astype(np.float32))
    return root


def test_verify_ijb_from_a_checkpoint_and_from_its_saved_embeddings(files, ijb_root, capsys, monkeypatch, tmp_path):
    code, out, err = run_cli(["verify", "--ijb", "IJBB", "--data", ijb_root, "--checkpoint", files["ckpt"], "--json",
                              "--save-embeddings", tmp_path / "emb", "--save-aligned", tmp_path / "crops.npy"],
                             capsys, monkeypatch)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == "lresnet-verify/1" and "sets" not in doc
    ijb = doc["ijb"]
    assert ijb["target"] == "IJBB" and ijb["pairs"] == ijb["positive_pairs"] + ijb["negative_pairs"] > 0
    assert list(ijb["tpr_at_fpr"]) == ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]
    assert all(0.0 <= v <= 1.0 for v in ijb["tpr_at_fpr"].values()) and 0.0 <= ijb["auc"] <= 1.0
    crops = np.load(tmp_path / "crops.npy")
    assert crops.dtype == np.uint8 and crops.shape == (ijb["images"], 112, 112, 3)
    # the protocol from the saved per-image embeddings alone gives the same numbers
    code, out, err = run_cli(["verify", "--ijb", "IJBB", "--data", ijb_root, "--json",
                              "--embeddings", tmp_path / "emb" / "ijbb.npy",
                              "--flip-embeddings", tmp_path / "emb" / "ijbb.flip.npy"], capsys, monkeypatch)
    assert code == 0, err
    again = json.loads(out)["ijb"]
    assert (again["tpr_at_fpr"], again["auc"]) == (ijb["tpr_at_fpr"], ijb["auc"])
    code, out, err = run_cli(["verify", "--ijb", "IJBB", "--data", ijb_root, "--roc", tmp_path / "roc.png",
                              "--embeddings", tmp_path / "emb" / "ijbb.npy", "--no-flip", "--no-norm-score",
                              "--no-detector-score"], capsys, monkeypatch)
    assert code == 0, err
    assert "TPR (%)" in out and (tmp_path / "roc.png").stat().st_size > 0


@pytest.mark.parametrize("args, fragments", [
    (["--embeddings", "{rows}"], ("--flip-embeddings", "or pass --no-flip")),
    (["--embeddings", "{emb}", "--no-flip"], ("emb.npy", "got 80 rows, expected", "face_tid_mid")),
    (["--embeddings", "{emb}", "--no-flip", "--set", "lfw"], ("--ijb", "--set/--all/--bin go without it")),
    (["--checkpoint", "{ckpt}", "--flip-embeddings", "{emb}"], ("--flip-embeddings", "goes with --embeddings")),
])
def test_verify_ijb_bad_combinations_are_one_line(files, ijb_root, capsys, monkeypatch, args, fragments):
    fill = {"emb": files["emb"], "ckpt": files["ckpt"], "rows": ijb_root / "rows.npy"}
    code, _, err = run_cli(["verify", "--ijb", "IJBB", "--data", ijb_root, *(a.format(**fill) for a in args)],
                           capsys, monkeypatch)
    assert_one_line_error(code, err, *fragments)


def test_flip_embeddings_without_ijb_is_one_line(files, capsys, monkeypatch):
    code, _, err = run_cli(["verify", "--set", "lfw", "--data", files["val"], "--embeddings", files["emb"],
                            "--flip-embeddings", files["emb"]], capsys, monkeypatch)
    assert_one_line_error(code, err, "--flip-embeddings", "goes with --ijb")
