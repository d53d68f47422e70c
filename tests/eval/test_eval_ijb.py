"""IJB-B/IJB-C protocol: against an independent implementation written here from the description of
arcface_torch's eval_ijbc.py, against hand-computed cases and scikit-learn, and on the synthetic
IJB writer's output; alignment against scikit-image and OpenCV when they are installed."""

from __future__ import annotations

import io
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch

from lresnet.convert.synthetic import _VIEW_LANDMARKS, synthesize_ijb
from lresnet.core.errors import InputError
from lresnet.eval import align
from lresnet.eval import ijb



@pytest.fixture(scope="module")
def ijbc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ijb")
    synthesize_ijb(root, "IJBC", identities=8, templates_per_id=3, seed=3)
    return root


# --------------------------------------------------------------------------- an independent reading of the reference
def reference_numbers(templates, medias, emb, flipped, detector, pairs_t1, pairs_t2, labels, flip=True,
                      norm_score=True, detector_score=True):
    """The reference's steps as its description reads, loop by loop: image features in float32,
    per template and per media (increasing id) a float32 mean of the images in file order, the
    template the float32 sum of its media, float64 sklearn-normalised; cosine per pair; the ROC of
    scikit-learn and, per target FPR, the TPR of the nearest ROC point (reversed ROC, first minimum)."""
    from sklearn.metrics import auc, roc_curve
    from sklearn.preprocessing import normalize

    feats = emb + flipped if flip else emb.copy()
    if not norm_score:
        feats = feats / np.sqrt(np.sum(feats ** 2, -1, keepdims=True))
    if detector_score:
        feats = feats * detector[:, None]
    ids = sorted(set(templates.tolist()))
    pooled = np.zeros((len(ids), feats.shape[1]))
    for k, t in enumerate(ids):
        mine = [i for i in range(len(templates)) if templates[i] == t]
        total = None
        for m in sorted(set(medias[mine].tolist())):
            rows = feats[[i for i in mine if medias[i] == m]]
            media = rows[0].copy()
            for r in rows[1:]:
                media = media + r
            media = (media / np.float32(len(rows))).astype(np.float32)
            total = media if total is None else total + media
        pooled[k] = total
    unit = normalize(pooled)
    where = {t: k for k, t in enumerate(ids)}
    scores = np.array([np.sum(unit[where[a]] * unit[where[b]]) for a, b in zip(pairs_t1, pairs_t2)])
    fpr, tpr, _ = roc_curve(labels, scores)
    area = auc(fpr, tpr)
    fpr, tpr = fpr[::-1], tpr[::-1]
    picks = []
    for target in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
        gaps = [abs(f - target) for f in fpr]
        picks.append(tpr[gaps.index(min(gaps))])
    return unit, scores, picks, area


def random_protocol(seed, images=900, templates=120, dim=24, media_pool=40):
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(10, 10_000), templates, replace=False)
    tpl = ids[rng.integers(0, templates, images)]
    tpl[:templates] = ids  # every template has an image
    med = rng.integers(0, media_pool, images) + 500
    emb = (rng.standard_normal((images, dim)) * rng.uniform(0.1, 30, (images, 1))).astype(np.float32)
    flipped = (emb + rng.standard_normal((images, dim)).astype(np.float32)).astype(np.float32)
    detector = np.array([f"{v:.4f}" for v in rng.uniform(0.05, 1, images)]).astype(np.float32)
    p = rng.integers(0, templates, (3000, 2))
    labels = (rng.random(3000) < 0.2).astype(np.int8)
    return tpl, med, emb, flipped, detector, ids[p[:, 0]], ids[p[:, 1]], labels


def write_meta(root: Path, templates, medias, detector, t1, t2, labels, target="IJBC", landmarks=None):
    meta = root / target / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    pre = target.lower()
    names = [f"{k + 1}.jpg" for k in range(len(templates))]
    (meta / f"{pre}_face_tid_mid.txt").write_text("".join(f"{n} {t} {m}\n" for n, t, m in zip(names, templates, medias)))
    points = landmarks if landmarks is not None else ["38.3 51.7 73.5 51.5 56.0 71.7 41.5 92.4 70.7 92.2"] * len(names)
    (meta / f"{pre}_name_5pts_score.txt").write_text(
        "".join(f"{n} {p} {d:.4f}\n" for n, p, d in zip(names, points, detector)))
    (meta / f"{pre}_template_pair_label.txt").write_text("".join(f"{a} {b} {c}\n" for a, b, c in zip(t1, t2, labels)))
    return root


@pytest.mark.parametrize("flip,norm_score,detector_score", [(True, True, True), (False, True, True),
                                                            (True, False, True), (True, True, False),
                                                            (False, False, False)])
def test_matches_the_reference_bit_for_bit(tmp_path, flip, norm_score, detector_score):
    tpl, med, emb, flipped, detector, t1, t2, labels = random_protocol(seed=int(flip) * 4 + norm_score * 2 + detector_score)
    root = write_meta(tmp_path, tpl, med, detector, t1, t2, labels)
    detector = np.array([f"{d:.4f}" for d in detector]).astype(np.float32)  # as written, as the reference reads it
    np.save(tmp_path / "e.npy", emb)
    np.save(tmp_path / "f.npy", flipped)
    options = ijb.IJBOptions(flip=flip, norm_score=norm_score, detector_score=detector_score)
    report = ijb.evaluate_ijb(root, "IJBC", embeddings=tmp_path / "e.npy", flip_embeddings=tmp_path / "f.npy",
                              options=options, threads=2)
    unit, scores, picks, area = reference_numbers(tpl, med, emb, flipped, detector, t1, t2, labels, flip,
                                                  norm_score, detector_score)
    assert np.array_equal(report.scores, scores)
    assert list(report.tpr_at_fpr.values()) == picks
    assert report.auc == area
    assert (report.images, report.templates, report.pairs) == (900, 120, 3000)
    assert report.positive_pairs == int(labels.sum())
    meta = ijb.read_ijb_meta(root, "IJBC")
    feats = ijb._ImageFeatures(ijb.EmbeddingRows(emb, 900), ijb.EmbeddingRows(flipped, 900), meta.detector_scores,
                               options)
    ids, pooled = ijb.template_features(feats, meta.templates, meta.medias, chunk_images=97)  # many chunks
    assert np.array_equal(ids, np.unique(tpl)) and np.array_equal(pooled, unit)


def test_hand_computed_case(tmp_path):
    # templates 7 (two media: [1, 0] + [3, 0] averaged, and [0, 2]) and 9 ([0, -1]), 11 ([2, 2])
    tpl = np.array([7, 7, 7, 9, 11])
    med = np.array([1, 1, 2, 3, 4])
    emb = np.array([[1, 0], [3, 0], [0, 2], [0, -1], [2, 2]], dtype=np.float32)
    root = write_meta(tmp_path, tpl, med, np.ones(5), [7, 7, 9], [9, 11, 11], [1, 0, 0])
    report = ijb.evaluate_ijb(root, "IJBC", embeddings=emb, options=ijb.IJBOptions(flip=False))
    # template 7 = [2, 0] + [0, 2] -> (1, 1)/sqrt2; 9 -> (0, -1); 11 -> (1, 1)/sqrt2
    s = 1 / math.sqrt(2)
    assert np.allclose(report.scores, [-s, 1.0, -s], atol=1e-15)
    # ROC points (fpr, tpr): (0,0) (0.5,0) (1,1) -> the positive pair scores lowest
    assert np.allclose(report.roc_fpr, [0, 0.5, 1]) and np.allclose(report.roc_tpr, [0, 0, 1])
    assert report.auc == 0.25
    # every target FPR <= 0.1 is nearest to the point (0, 0): TPR 0
    assert set(report.tpr_at_fpr.values()) == {0.0}


def test_tpr_is_read_at_the_nearest_roc_point_the_reference_way():
    fpr = np.array([0.0, 0.5e-4, 0.5e-4, 2.0e-4, 1.0])
    tpr = np.array([0.0, 0.2, 0.3, 0.6, 1.0])
    picks = ijb.tpr_at_fpr(fpr, tpr, targets=(1e-4, 1.25e-4, 1e-6))
    # 1e-4: nearest is 0.5e-4 (two points: the higher TPR); 1.25e-4: equally near 0.5e-4 and 2e-4 -> the larger FPR
    assert picks == [(0.3, 0.5e-4), (0.6, 2.0e-4), (0.0, 0.0)]


def test_roc_equals_scikit_learn_with_ties():
    from sklearn.metrics import auc, roc_curve

    rng = np.random.default_rng(0)
    for scores in (np.round(rng.standard_normal(5000), 1), rng.standard_normal(5000), np.zeros(50) - 0.0):
        labels = (rng.random(scores.size) < 0.3).astype(np.int8)
        labels[:2] = [0, 1]
        fpr, tpr = ijb.roc_curve(labels, scores)
        sk_fpr, sk_tpr, _ = roc_curve(labels, scores)
        assert np.array_equal(fpr, sk_fpr) and np.array_equal(tpr, sk_tpr)
        assert ijb.roc_auc(fpr, tpr) == auc(sk_fpr, sk_tpr)


def test_segment_sums_add_row_after_row():
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((200, 8)) * 1e4).astype(np.float32)
    counts = np.array([1, 7, 50, 2, 100, 40])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    got = ijb.segment_sums(values, starts, counts)
    for k, (s, c) in enumerate(zip(starts, counts)):
        acc = values[s].copy()
        for r in values[s + 1:s + c]:
            acc = acc + r
        assert np.array_equal(got[k], acc)


def test_sklearn_normalisation_rule():
    from sklearn.preprocessing import normalize

    rows = np.array([[3.0, 4.0], [1e-16, 0.0], [0.0, 0.0], [1e-300, 1e-300]])
    assert np.array_equal(ijb.normalise_like_sklearn(rows), normalize(rows))


def test_synthetic_writer_layout_and_reading(ijbc):
    meta = ijb.read_ijb_meta(ijbc, "IJBC")
    assert meta.folder == ijbc / "IJBC"
    assert meta.num_images == len(list((ijbc / "IJBC" / "loose_crop").glob("*.jpg")))
    assert meta.template_ids.size == 24 and meta.landmarks.shape == (meta.num_images, 5, 2)
    assert ((meta.detector_scores >= 0.5) & (meta.detector_scores <= 1)).all()
    assert int(meta.labels.sum()) == 8 * 3  # 3 positive pairs per identity of 3 templates
    assert len(set(map(tuple, meta.pairs.tolist()))) == meta.num_pairs
    first = (ijbc / "IJBC" / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines()[0].split()
    assert first[0] == "1.jpg" and len(first) == 3
    assert ijb.read_ijb_meta(ijbc / "IJBC", "IJBC").num_pairs == meta.num_pairs  # the target folder itself
    # the writer's landmark points are the alignment template
    assert np.array_equal(_VIEW_LANDMARKS, align.ARCFACE_TEMPLATE)


def test_synthetic_writer_is_deterministic(tmp_path):
    a = synthesize_ijb(tmp_path / "a", "IJBB", identities=3, templates_per_id=2, seed=5)
    b = synthesize_ijb(tmp_path / "b", "IJBB", identities=3, templates_per_id=2, seed=5)
    assert a["images"] == b["images"]
    for name in ("meta/ijbb_face_tid_mid.txt", "meta/ijbb_name_5pts_score.txt", "meta/ijbb_template_pair_label.txt",
                 "loose_crop/1.jpg"):
        assert (tmp_path / "a" / "IJBB" / name).read_bytes() == (tmp_path / "b" / "IJBB" / name).read_bytes()


class Pixels(torch.nn.Module):
    """An 'embedding' that is a fixed random projection of the input pixels (no training needed)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 112 * 112, 8)

    def forward(self, x):
        return self.proj(x.flatten(1))


def test_model_path_saves_crops_and_embeddings_that_reproduce_the_numbers(ijbc, tmp_path):
    torch.manual_seed(0)
    encoder = ijb.ijb_encoder(Pixels())
    report = ijb.evaluate_ijb(ijbc, "IJBC", encoder=encoder, batch_size=8, workers=2,
                              save_aligned=tmp_path / "aligned.npy", save_embeddings=tmp_path / "emb")
    meta = ijb.read_ijb_meta(ijbc, "IJBC")
    crops = np.load(tmp_path / "aligned.npy")
    assert crops.shape == (meta.num_images, 112, 112, 3) and crops.dtype == np.uint8
    for k in (0, meta.num_images - 1):
        image = align.read_image(meta.crop_dir / meta.names[k])
        assert np.array_equal(crops[k], align.align_face(image, meta.landmarks[k]))
    emb, flipped = np.load(tmp_path / "emb" / "ijbc.npy"), np.load(tmp_path / "emb" / "ijbc.flip.npy")
    # the first batch, fed as the reference feeds it: (x / 255 - 0.5) / 0.5, and mirrored
    x = torch.from_numpy(crops[:8]).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    with torch.no_grad():
        assert np.array_equal(emb[:8], encoder.backbone(x).numpy())
        assert np.array_equal(flipped[:8], encoder.backbone(x.flip(3)).numpy())
    again = ijb.evaluate_ijb(ijbc, "IJBC", embeddings=tmp_path / "emb" / "ijbc.npy",
                             flip_embeddings=tmp_path / "emb" / "ijbc.flip.npy")
    assert np.array_equal(again.scores, report.scores) and again.tpr_at_fpr == report.tpr_at_fpr
    doc = json.loads(json.dumps(report.as_dict()))
    assert list(doc["tpr_at_fpr"]) == ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]
    assert all(0 <= v <= 1 for v in doc["tpr_at_fpr"].values()) and 0 <= doc["auc"] <= 1
    assert (doc["target"], doc["source"], doc["flip"]) == ("IJBC", "model", True)


def test_aligning_a_loose_crop_gives_its_view_back():
    """A backbone trained on the synthetic views sees views again: the writer places a view in a loose
    crop and maps its landmarks along; aligning undoes the placement (up to resampling)."""
    from lresnet.convert.synthetic import _loose_crop, render_faces

    rng = np.random.default_rng(12)
    views = render_faces(list(range(6)), rng, difficulty=0.0)
    for view, other in zip(views, views[::-1]):
        crop, points = _loose_crop(view, rng, difficulty=0.0)
        assert crop.shape[0] > 112 and crop.shape[1] > 112
        back = align.align_face(crop, points).astype(np.float32)
        inner = (slice(8, 104), slice(8, 104))  # away from the view's own border
        assert np.abs(back[inner] - view[inner]).mean() < 6.0
        if other is not view:
            assert np.abs(back[inner] - other[inner]).mean() > 20.0


def test_verify_roc_plot_draws_a_report(ijbc, tmp_path):
    report = ijb.evaluate_ijb(ijbc, "IJBC", encoder=ijb.ijb_encoder(Pixels()), options=ijb.IJBOptions(flip=False))
    assert report.roc_far is report.roc_fpr and report.roc_tar is report.roc_tpr
    assert report.roc_far[0] == 0 and report.roc_far[-1] == 1 and np.all(np.diff(report.roc_far) >= 0)
    from lresnet.tools.cmd_verify import write_roc

    pytest.importorskip("matplotlib")
    write_roc(tmp_path / "roc.png", [(report.target, report)])
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- bad input
def _corrupt(root: Path, name: str, edit) -> None:
    path = root / "IJBC" / "meta" / f"ijbc_{name}.txt"
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("name,edit,fragment", [
    ("name_5pts_score", lambda l: l.__setitem__(2, " ".join(l[2].split()[:-2])), "got 9 values, expected 11"),
    ("name_5pts_score", lambda l: l.__setitem__(1, "zzz.jpg" + l[1][l[1].index(" "):]), "same images in the same order"),
    ("name_5pts_score", lambda l: l.pop(), "got 3 images, expected 4"),
    ("face_tid_mid", lambda l: l.__setitem__(3, l[3] + " 7"), "line 4"),
    ("template_pair_label", lambda l: l.__setitem__(1, "5 999 0"), "template 999 has no image"),
    ("template_pair_label", lambda l: l.__setitem__(0, "5 6 2"), "got label 2"),
    ("template_pair_label", lambda l: l.__setitem__(0, "5 6"), "line 1"),
    ("template_pair_label", lambda l: l.__setitem__(0, "5 6 0"), "the ROC needs both"),
])
def test_bad_meta_files(tmp_path, name, edit, fragment):
    root = write_meta(tmp_path, [5, 6, 6, 7], [1, 2, 2, 3], [0.9] * 4, [5, 5], [6, 7], [1, 0])
    _corrupt(root, name, edit)
    with pytest.raises(InputError) as err:
        ijb.read_ijb_meta(root, "IJBC")
    assert fragment in str(err.value), str(err.value)
    assert f"ijbc_{name}.txt" in str(err.value)


def test_unknown_template_names_the_line(tmp_path):
    root = write_meta(tmp_path, [5, 6, 7], [1, 2, 3], [0.9] * 3, [5, 6, 5, 7], [6, 7, 8, 5], [1, 0, 0, 1])
    with pytest.raises(InputError, match=r"template_pair_label.txt: line 3: template 8 has no image"):
        ijb.read_ijb_meta(root, "IJBC")


def test_missing_files_and_embeddings(tmp_path, ijbc):
    with pytest.raises(InputError, match="no IJBB/meta folder"):
        ijb.read_ijb_meta(ijbc, "IJBB")
    with pytest.raises(InputError, match="expected one of IJBC, IJBB"):
        ijb.read_ijb_meta(ijbc, "IJBA")
    meta = ijb.read_ijb_meta(ijbc, "IJBC")
    good = np.zeros((meta.num_images, 4), np.float32)
    np.save(tmp_path / "short.npy", good[:-1])
    with pytest.raises(InputError, match=f"got {meta.num_images - 1} rows, expected {meta.num_images}"):
        ijb.evaluate_ijb(ijbc, "IJBC", embeddings=tmp_path / "short.npy", options=ijb.IJBOptions(flip=False))
    with pytest.raises(InputError, match="--flip-embeddings"):
        ijb.evaluate_ijb(ijbc, "IJBC", embeddings=good)
    bad = good.copy()
    bad[5, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(InputError, match="nan.npy: row 5: NaN or infinite"):
        ijb.evaluate_ijb(ijbc, "IJBC", embeddings=tmp_path / "nan.npy", options=ijb.IJBOptions(flip=False))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="not a readable .npy"):
        ijb.evaluate_ijb(ijbc, "IJBC", embeddings=tmp_path / "junk.npy", options=ijb.IJBOptions(flip=False))


def test_an_image_that_does_not_decode(tmp_path, ijbc):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(ijbc, root)
    (root / "IJBC" / "loose_crop" / "3.jpg").write_bytes(b"\xff\xd8broken")
    with pytest.raises(InputError, match=r"3\.jpg: image does not decode"):
        ijb.evaluate_ijb(root, "IJBC", encoder=ijb.ijb_encoder(Pixels()), batch_size=4, workers=1)


def test_degenerate_landmarks_are_bad_input(tmp_path, ijbc):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(ijbc, root)
    _corrupt(root, "name_5pts_score", lambda l: l.__setitem__(1, l[1].split()[0] + " 1 1" * 5 + " 0.9"))
    with pytest.raises(InputError, match=r"name_5pts_score.txt: line 2: .*all points coincide"):
        ijb.evaluate_ijb(root, "IJBC", encoder=ijb.ijb_encoder(Pixels()), batch_size=4, workers=1)


# --------------------------------------------------------------------------- alignment, bit for bit
def _landmarks(rng, n):
    for _ in range(n):
        scale, theta = rng.uniform(0.3, 3.5), rng.uniform(-1.2, 1.2)
        rot = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        yield (align.ARCFACE_TEMPLATE.astype(np.float64) @ rot.T + rng.uniform(-60, 250, 2)
               + rng.normal(0, 2.5, (5, 2))).astype(np.float32)


def test_similarity_transform_equals_scikit_image():
    transform = pytest.importorskip("skimage.transform")
    import warnings

    rng = np.random.default_rng(7)
    for points in _landmarks(rng, 300):
        tform = transform.SimilarityTransform()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # estimate() is deprecated in 0.26; the reference calls it
            tform.estimate(points, align.ARCFACE_TEMPLATE)
        assert np.array_equal(align.similarity_transform(points), tform.params[:2])


def test_warp_equals_opencv():
    cv2 = pytest.importorskip("cv2")
    method = align.WARP_OPENCV5 if int(cv2.__version__.split(".")[0]) >= 5 else align.WARP_OPENCV4
    rng = np.random.default_rng(8)
    for points in _landmarks(rng, 60):
        h, w = rng.integers(30, 300, 2)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        matrix = align.similarity_transform(points)
        expected = cv2.warpAffine(image, matrix, (112, 112), borderValue=0.0)
        assert np.array_equal(align.warp_affine(image, matrix, method=method), expected)


def test_warps_on_hand_cases():
    image = np.arange(4 * 4 * 1, dtype=np.uint8).reshape(4, 4, 1) * 10
    shift = np.array([[1.0, 0, -1], [0, 1, 0]])  # output x reads input x + 1
    for method in align.WARPS:
        out = align.warp_affine(image, shift, size=(4, 4), method=method)
        assert np.array_equal(out[:, :3, 0], image[:, 1:, 0]) and (out[:, 3, 0] == 0).all()
    half = np.array([[1.0, 0, -0.5], [0, 1, 0]])  # half-way between columns: the mean (rounded half to even)
    for method in align.WARPS:
        out = align.warp_affine(image, half, size=(3, 4), method=method)
        assert np.array_equal(out[:, :, 0], (image[:, :3, 0].astype(int) + image[:, 1:, 0]) // 2)


def test_fma32_is_correctly_rounded():
    rng = np.random.default_rng(9)
    a = rng.standard_normal(2000).astype(np.float32)
    b = (rng.standard_normal(2000) * 300).astype(np.float32)
    c = (rng.standard_normal(2000) * 1e5).astype(np.float32)
    # constructed ties: c = -a*b rounded, plus a float32 half-ulp pattern
    got = align.fma32(a, b, c)
    for x, y, z, r in zip(a, b, c, got):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        below = np.float32(float(exact))
        candidates = [below, np.nextafter(below, np.float32(np.inf)), np.nextafter(below, np.float32(-np.inf))]
        best = min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(v.view(np.uint32)) & 1))
        assert r == best
    # the double-rounding case: a*b + c exactly half-way between two float32 values after float64 rounding
    x, y = np.float32(1 + 2 ** -12), np.float32(1 + 2 ** -12)  # x*y = 1 + 2**-11 + 2**-24
    z = np.float32(2 ** -60)  # lost in float64 (1 + 2**-11 + 2**-24 + 2**-60), decides the float32 rounding
    assert align.fma32(x, y, z) == np.float32(1 + 2 ** -11 + 2 ** -23)


def test_decode_equals_opencv_imread_including_exif_rotation(tmp_path):
    cv2 = pytest.importorskip("cv2")
    from PIL import Image

    rng = np.random.default_rng(10)
    image = np.kron(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    for sub in ("444", "422", "420"):
        data = simplejpeg.encode_jpeg(image, quality=90, colorspace="RGB", colorsubsampling=sub)
        expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        assert np.array_equal(align.decode_image(data), expected)
    for orientation in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=90, exif=exif.tobytes())
        (tmp_path / "o.jpg").write_bytes(buf.getvalue())
        expected = cv2.imread(str(tmp_path / "o.jpg"))[:, :, ::-1]
        assert np.array_equal(align.read_image(tmp_path / "o.jpg"), expected)
    png = io.BytesIO()
    Image.fromarray(image).save(png, "PNG")
    assert np.array_equal(align.decode_image(png.getvalue()), image)


def test_score_file_parsing_equals_a_float32_string_cast(tmp_path):
    rng = np.random.default_rng(11)
    f32 = rng.random(3000).astype(np.float32)
    halfway = (f32.astype(np.float64) + np.nextafter(f32, np.float32(2)).astype(np.float64)) / 2
    tokens = [repr(float(v)) for v in halfway] + [f"{v:.9f}" for v in rng.random(3000)]
    n = len(tokens)
    root = write_meta(tmp_path, np.arange(n) % 7 + 1, np.arange(n), np.zeros(n), [1, 2], [2, 3], [1, 0])
    path = root / "IJBC" / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    path.write_text("".join(" ".join(line.split()[:-1] + [t]) + "\n" for line, t in zip(lines, tokens)))
    meta = ijb.read_ijb_meta(root, "IJBC")
    assert np.array_equal(meta.detector_scores, np.array(tokens).astype(np.float32))


def test_bench_runs_on_a_small_set(tmp_path):
    from lresnet.eval.bench_ijb import bench_ijb

    result = bench_ijb(images=3000, templates=400, positive_pairs=300, negative_pairs=20_000, dim=16, threads=2,
                       work_dir=tmp_path, baseline=True)
    assert result["set"]["pairs"] == result["set"]["positive_pairs"] + 20_000
    assert set(result["seconds"]) >= {"read_meta", "pool", "score", "roc"}
    assert result["peak_rss_mb"] > 0 and result["baseline"]["score_s"] > 0
    assert list(result["tpr_at_fpr"]) == list(ijb.FPR_KEYS)
