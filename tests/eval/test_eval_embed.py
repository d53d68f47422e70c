"""lresnet.eval.embed: inputs of every kind, rows and names in order, flip/normalize, unusable images."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import simplejpeg
import torch

from lresnet.convert.pairs import write_bin
from lresnet.convert.synthetic import render_faces, synthesize_ijb
from lresnet.core.errors import InputError
from lresnet.eval.align import align_face, read_image
from lresnet.eval.embed import TorchEncoder, collect_images, embed_images, names_path, read_landmarks
from lresnet.eval.ijb import read_ijb_meta
from lresnet.model import create_backbone

TINY = dict(embedding_size=16, widths=[8, 16, 32, 64])


@pytest.fixture(scope="module")
def faces():
    return render_faces(list(range(10)), np.random.default_rng(0))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return create_backbone("ir18", **TINY).eval()


def jpeg(image) -> bytes:
    return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=95, colorspace="RGB")


def decoded(image) -> np.ndarray:
    return simplejpeg.decode_jpeg(jpeg(image), colorspace="RGB")


def forward(net, images) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)
    with torch.no_grad():
        return net(x).numpy()


def test_inputs_of_every_kind_in_order(tmp_path, faces):
    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.jpg").write_bytes(jpeg(faces[0]))
    (folder / "sub" / "a.jpg").write_bytes(jpeg(faces[1]))
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "c.jpg").write_bytes(jpeg(faces[2]))
    with tarfile.open(tmp_path / "set.tar", "w") as tar:
        for key, (a, b) in enumerate([(3, 4)]):
            for member, data in ((f"{key:06d}.a.jpg", jpeg(faces[a])), (f"{key:06d}.b.jpg", jpeg(faces[b])),
                                 (f"{key:06d}.same", b"1")):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    write_bin(tmp_path / "pairs.bin", [jpeg(faces[5]), jpeg(faces[6])], [False])
    items = collect_images([folder, str(tmp_path / "c.*"), tmp_path / "set.tar", tmp_path / "pairs.bin"])
    names = [it.name for it in items]
    assert names == [str(folder / "b.jpg"), str(folder / "sub" / "a.jpg"), str(tmp_path / "c.jpg"),
                     f"{tmp_path / 'set.tar'}:000000.a.jpg", f"{tmp_path / 'set.tar'}:000000.b.jpg",
                     f"{tmp_path / 'pairs.bin'}:0", f"{tmp_path / 'pairs.bin'}:1"]
    for item, k in zip(items, [0, 1, 2, 3, 4, 5, 6]):
        assert np.array_equal(item.fetch(), decoded(faces[k]))


def test_rows_names_flip_and_normalize(tmp_path, faces, net):
    for k in range(6):
        (tmp_path / f"{k}.jpg").write_bytes(jpeg(faces[k]))
    images = np.stack([decoded(faces[k]) for k in range(6)])
    encoder = TorchEncoder(net)
    plain = embed_images([str(tmp_path / "*.jpg")], tmp_path / "out" / "e.npy", encoder, batch_size=4, workers=2)
    rows = np.load(tmp_path / "out" / "e.npy")
    assert rows.dtype == np.float32 and rows.shape == (6, 16) and plain.rows == 6 and plain.failed == 0
    assert np.allclose(rows, forward(net, images), atol=1e-5)
    assert (tmp_path / "out" / "e.names.txt").read_text().splitlines() == [str(tmp_path / f"{k}.jpg") for k in range(6)]
    embed_images([str(tmp_path / "*.jpg")], tmp_path / "f.npy", encoder, flip=True, normalize=True, batch_size=6)
    flipped = forward(net, images) + forward(net, images[:, :, ::-1])
    want = flipped / np.linalg.norm(flipped, axis=1, keepdims=True)
    assert np.allclose(np.load(tmp_path / "f.npy"), want, atol=1e-5)
    assert names_path("x/emb.npy").name == "emb.names.txt"


def test_unusable_images_are_counted_or_fail_under_strict(tmp_path, faces, net):
    (tmp_path / "0.jpg").write_bytes(jpeg(faces[0]))
    (tmp_path / "1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "2.jpg").write_bytes(jpeg(np.zeros((50, 60, 3), np.uint8)))
    (tmp_path / "3.jpg").write_bytes(jpeg(faces[3]))
    summary = embed_images([tmp_path], tmp_path / "e.npy", TorchEncoder(net))
    assert (summary.images, summary.rows, summary.failed) == (4, 2, 2)
    reasons = dict(summary.failures)
    assert "does not decode" in reasons[str(tmp_path / "1.jpg")]
    assert "got 50x60, expected 112x112" in reasons[str(tmp_path / "2.jpg")]
    assert (tmp_path / "e.names.txt").read_text().split() == [str(tmp_path / "0.jpg"), str(tmp_path / "3.jpg")]
    with pytest.raises(InputError, match=r"1\.jpg: does not decode"):
        embed_images([tmp_path], tmp_path / "s.npy", TorchEncoder(net), strict=True)
    assert not (tmp_path / "s.npy").exists() and not list(tmp_path.glob("*.tmp"))
    (tmp_path / "0.jpg").unlink()
    (tmp_path / "3.jpg").unlink()
    with pytest.raises(InputError, match="no usable image"):
        embed_images([tmp_path], tmp_path / "n.npy", TorchEncoder(net))


def test_loose_crops_with_landmarks_are_aligned_as_ijb(tmp_path, net):
    synthesize_ijb(tmp_path, "IJBB", identities=2, templates_per_id=2, seed=1)
    meta = read_ijb_meta(tmp_path, "IJBB")
    items = read_landmarks(meta.meta_file("name_5pts_score"), meta.crop_dir)
    assert len(items) == meta.num_images
    summary = embed_images(items, tmp_path / "e.npy", TorchEncoder(net), batch_size=3)
    assert summary.aligned_from_landmarks and summary.rows == meta.num_images
    crops = np.stack([align_face(read_image(meta.crop_dir / n), meta.landmarks[k]) for k, n in enumerate(meta.names)])
    assert np.allclose(np.load(tmp_path / "e.npy"), forward(net, crops), atol=1e-5)


@pytest.mark.parametrize("inputs,fragment", [
    ([], "give at least one image"),
    (["missing/"], "no such file, folder or pattern"),
    (["nothing-*.jpg"], "the pattern matches no files"),
])
def test_bad_inputs(tmp_path, monkeypatch, inputs, fragment):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=fragment):
        collect_images(inputs)


def test_bad_landmark_files(tmp_path):
    (tmp_path / "crops").mkdir()
    (tmp_path / "lm.txt").write_text("a.jpg 1 2 3\n")
    with pytest.raises(InputError, match=r"lm\.txt: line 1: got 3 values after the image name"):
        read_landmarks(tmp_path / "lm.txt", tmp_path / "crops")
    with pytest.raises(InputError, match="folder of loose crops"):
        read_landmarks(tmp_path / "lm.txt", tmp_path / "lm.txt")
