"""The verification protocol against an independent reference of InsightFace's evaluate().

The reference below is written the plain way InsightFace's ``verification.py`` works
(sklearn KFold, per-threshold boolean predictions, ``np.argmax``), and reads the
threshold for FAR = 1e-3 the way SciPy 1.6-1.8's ``interp1d(kind="slinear")`` did before
SciPy 1.9 refused repeated x: stable sort, then a degree-1 B-spline on the knots
``[x0, x0, x1, ..., xn, xn]``, evaluated here with SciPy's own ``BSpline`` (which still
evaluates such knots). ``old_scipy_crosscheck.py`` beside this file runs the same comparison
against a real SciPy 1.8.1 (in an old environment; not part of the suite).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.interpolate import BSpline, interp1d
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import KFold

from lresnet.eval.protocol import (ACCURACY_THRESHOLDS, evaluate, kfold_bounds, legacy_slinear,
                                   pair_distances)


# ---------------------------------------------------------------- the reference
def old_scipy_slinear(x, y, x_new):
    """What ``interp1d(x, y, kind='slinear')(x_new)`` returned on SciPy 1.6-1.8 (repeated x accepted)."""
    order = np.argsort(x, kind="mergesort")
    xs = np.asarray(x, dtype=float)[order]
    ys = np.asarray(y, dtype=float)[order]
    if x_new < xs[0] or x_new > xs[-1]:
        raise ValueError("A value in x_new is out of the interpolation range.")
    knots = np.r_[xs[0], xs, xs[-1]]
    spline = BSpline.construct_fast(knots, ys, 1)
    return float(spline(x_new))


def ref_evaluate(embeddings, issame, nrof_folds=10):
    """InsightFace's evaluate(), spelled out; returns the numbers it computes and its thresholds."""
    issame = np.asarray(issame)
    dist = np.sum(np.square(np.subtract(embeddings[0::2], embeddings[1::2])), 1)
    n = len(issame)
    if nrof_folds == 1:
        splits = [(np.arange(n), np.arange(n))]
    else:
        splits = list(KFold(n_splits=nrof_folds, shuffle=False).split(np.arange(n)))

    def counts(threshold_column, d, same):
        predict = np.less(d[None, :], threshold_column)
        tp = np.logical_and(predict, same).sum(1)
        fp = np.logical_and(predict, ~same).sum(1)
        tn = np.logical_and(~predict, ~same).sum(1)
        fn = np.logical_and(~predict, same).sum(1)
        return tp, fp, tn, fn

    thresholds = np.arange(0, 4, 0.01)
    accuracy, best_thresholds = [], []
    tprs = np.zeros((nrof_folds, thresholds.size))
    fprs = np.zeros((nrof_folds, thresholds.size))
    for k, (train, test) in enumerate(splits):
        tp, fp, tn, fn = counts(thresholds[:, None], dist[train], issame[train])
        best = np.argmax((tp + tn) / dist[train].size)
        tp, fp, tn, fn = counts(thresholds[:, None], dist[test], issame[test])
        tprs[k] = [0 if a + b == 0 else a / (a + b) for a, b in zip(tp, fn)]
        fprs[k] = [0 if a + b == 0 else a / (a + b) for a, b in zip(fp, tn)]
        accuracy.append((tp[best] + tn[best]) / dist[test].size)
        best_thresholds.append(thresholds[best])

    thresholds = np.arange(0, 4, 0.001)
    val, far, val_thresholds = [], [], []
    for train, test in splits:
        _, fp, _, _ = counts(thresholds[:, None], dist[train], issame[train])
        far_train = fp / np.sum(~issame[train])
        if np.max(far_train) >= 1e-3:
            threshold = old_scipy_slinear(far_train, thresholds, 1e-3)
        else:
            threshold = 0.0
        tp, fp, _, _ = counts(np.array([[threshold]]), dist[test], issame[test])
        with np.errstate(invalid="ignore"):
            val.append(tp[0] / np.sum(issame[test]))
            far.append(fp[0] / np.sum(~issame[test]))
        val_thresholds.append(threshold)
    return dict(accuracy=np.mean(accuracy), std=np.std(accuracy), fold_accuracies=accuracy,
                fold_thresholds=best_thresholds, val=np.mean(val), val_std=np.std(val),
                far=np.mean(far), val_thresholds=val_thresholds,
                tpr=np.mean(tprs, 0), fpr=np.mean(fprs, 0))


def assert_same_as_reference(embeddings, issame, nrof_folds=10):
    ours = evaluate(embeddings, issame, nrof_folds=nrof_folds)
    ref = ref_evaluate(embeddings, issame, nrof_folds=nrof_folds)
    # exact equality; NaN (a test fold without same or different pairs, where the
    # reference divides by zero) counts as equal to NaN
    for key in ("accuracy", "std", "val", "val_std", "far"):
        np.testing.assert_array_equal(getattr(ours, key), ref[key], err_msg=key)
    for key in ("fold_accuracies", "fold_thresholds", "val_thresholds"):
        np.testing.assert_array_equal(getattr(ours, key), ref[key], err_msg=key)
    np.testing.assert_array_equal(ours.tpr, ref["tpr"])
    np.testing.assert_array_equal(ours.fpr, ref["fpr"])
    return ours


def unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def random_pairs(rng, n, dim, noise, dtype=np.float64):
    """Pairs of unit vectors; same pairs are a vector and a noisy copy of it."""
    issame = rng.random(n) < 0.5
    first = unit(rng.normal(size=(n, dim)))
    other = unit(rng.normal(size=(n, dim)))
    second = np.where(issame[:, None], unit(first + noise * rng.normal(size=(n, dim))), other)
    emb = np.empty((2 * n, dim))
    emb[0::2], emb[1::2] = first, second
    return emb.astype(dtype), issame


def line_pairs(dists, issame):
    """1-D embeddings [0] and [sqrt(d)] with exactly representable squared distances."""
    emb = np.zeros((2 * len(dists), 1))
    emb[1::2, 0] = np.sqrt(dists)
    assert np.array_equal(pair_distances(emb), np.asarray(dists, dtype=float))
    return emb, np.asarray(issame, dtype=bool)


# ---------------------------------------------------------------- equality with the reference
@pytest.mark.parametrize("seed", range(12))
def test_random_sets_match_insightface(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.choice([10, 37, 100, 203, 600, 1001]))
    dim = int(rng.choice([2, 3, 8, 32]))
    noise = float(rng.choice([0.05, 0.3, 1.0, 5.0]))
    dtype = np.float32 if seed % 3 == 0 else np.float64
    emb, issame = random_pairs(rng, n, dim, noise, dtype)
    assert_same_as_reference(emb, issame)


@pytest.mark.parametrize("folds", [1, 2, 5, 10])
def test_fold_counts_match_insightface(folds):
    emb, issame = random_pairs(np.random.default_rng(7), 123, 4, 0.5)
    assert_same_as_reference(emb, issame, nrof_folds=folds)


def test_quantised_distances_tie_on_both_grids():
    # distances that are exactly grid values of both threshold grids, many repeats
    rng = np.random.default_rng(3)
    n = 400
    values = np.array([0.0, 0.25, 1.0, 2.25])
    issame = rng.random(n) < 0.5
    dists = np.where(issame, rng.choice(values[:3], n), rng.choice(values[1:], n))
    emb, issame = line_pairs(dists, issame)
    ours = assert_same_as_reference(emb, issame)
    assert set(ours.fold_thresholds) <= {0.0, 0.01, 0.26, 1.01, 2.26}


# ---------------------------------------------------------------- known answers
def test_perfectly_separable():
    n = 100
    issame = np.arange(n) % 2 == 0
    emb, issame = line_pairs(np.where(issame, 0.25, 2.25), issame)
    result = assert_same_as_reference(emb, issame)
    assert result.accuracy == 1.0 and result.std == 0.0
    # the first grid threshold that accepts distance 0.25 (predict same when d < t)
    assert result.fold_thresholds == (ACCURACY_THRESHOLDS[26],) * 10
    assert result.best_threshold == ACCURACY_THRESHOLDS[26]
    assert result.auc == 1.0 and result.eer == 0.0
    # FAR(t) jumps from 0 to 1 between t = 2.250 and 2.251: the interpolated threshold for
    # FAR = 1e-3 lands just above 2.25, so the reference accepts every different pair too
    assert all(2.25 < t < 2.2501 for t in result.val_thresholds)
    assert result.val == 1.0 and result.far == 1.0


def test_ties_on_grid_take_the_first_best_threshold():
    # every pair at distance exactly 1.0, half of them the same person: thresholds <= 1.0
    # call everything different, thresholds > 1.0 call everything same, both score 0.5
    n = 100
    emb, issame = line_pairs(np.full(n, 1.0), np.arange(n) % 2 == 0)
    result = assert_same_as_reference(emb, issame)
    assert result.fold_thresholds == (0.0,) * 10
    assert result.accuracy == 0.5 and result.std == 0.0
    assert result.auc == 0.5 and result.eer == 0.5


def test_distance_equal_to_threshold_is_not_accepted():
    n = 100
    issame = np.arange(n) % 2 == 0
    emb, issame = line_pairs(np.where(issame, 1.0, 2.25), issame)
    result = assert_same_as_reference(emb, issame)
    assert result.fold_thresholds == (ACCURACY_THRESHOLDS[101],) * 10


def test_uneven_folds_known_accuracy():
    # 103 pairs: folds of 11, 11, 11, 10, ... pairs; pair 0 is a "same" pair as far apart as
    # the different ones, so it is the only error, in fold 0 (10 of 11 right)
    n = 103
    issame = np.arange(n) % 2 == 0
    dists = np.where(issame, 0.25, 2.25)
    dists[0] = 2.25
    emb, issame = line_pairs(dists, issame)
    result = assert_same_as_reference(emb, issame)
    assert result.fold_accuracies == (10 / 11,) + (1.0,) * 9
    assert result.accuracy == np.mean([10 / 11] + [1.0] * 9)


def test_kfold_bounds_match_sklearn():
    for n, k in [(10, 10), (103, 10), (6000, 10), (7001, 10), (9, 4), (5, 1)]:
        ours = [np.arange(a, b) for a, b in kfold_bounds(n, k)]
        if k == 1:
            assert [(a, b) for a, b in kfold_bounds(n, k)] == [(0, n)]
            continue
        theirs = [test for _, test in KFold(n_splits=k, shuffle=False).split(np.arange(n))]
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="cannot split 9 pairs into 10 folds"):
        kfold_bounds(9, 10)


# ---------------------------------------------------------------- the old interp1d
def test_legacy_slinear_equals_current_scipy_without_repeats():
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = np.sort(rng.random(20))
        x = x[np.r_[True, np.diff(x) > 0]]
        y = rng.random(x.size) * 4
        x_new = float(rng.uniform(x[0], x[-1]))
        assert legacy_slinear(x, y, x_new) == float(interp1d(x, y, kind="slinear")(x_new))


def test_legacy_slinear_with_repeats_equals_old_bspline():
    rng = np.random.default_rng(1)
    for _ in range(200):
        x = np.sort(rng.integers(0, 6, size=30)) / 1000.0  # many repeated values
        y = np.arange(30) * 0.001
        x_new = float(rng.choice([rng.uniform(x[0], x[-1]), rng.choice(x)]))
        assert legacy_slinear(x, y, x_new) == old_scipy_slinear(x, y, x_new)
    with pytest.raises(ValueError):
        interp1d(np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 2.0]), kind="slinear")


def test_legacy_slinear_repeated_maximum_gives_zero():
    x = np.array([0.0, 0.0, 0.001, 0.001, 0.001])
    y = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert old_scipy_slinear(x, y, 0.001) == 0.0
    assert legacy_slinear(x, y, 0.001) == 0.0
    with pytest.raises(ValueError, match="outside"):
        legacy_slinear(x, y, 0.002)


def test_far_target_equal_to_repeated_maximum():
    # one fold, 1000 different pairs of which one is closer than 3.999: max FAR is exactly 1e-3,
    # reached on many thresholds; old SciPy then returned threshold 0 (nothing accepted)
    dists = np.r_[np.full(20, 0.25), [1.0], np.full(999, 4.0)]
    issame = np.r_[np.ones(20, bool), np.zeros(1000, bool)]
    emb, issame = line_pairs(dists, issame)
    result = assert_same_as_reference(emb, issame, nrof_folds=1)
    assert result.val_thresholds == (0.0,)
    assert result.val == 0.0 and result.far == 0.0


# ---------------------------------------------------------------- extras: AUC, EER
@pytest.mark.parametrize("seed", range(4))
def test_auc_and_eer_against_sklearn(seed):
    from scipy.optimize import brentq

    rng = np.random.default_rng(100 + seed)
    emb, issame = random_pairs(rng, 500, 8, 1.0)
    if seed % 2:  # coarse distances: many ties
        emb = np.round(emb, 1)
    result = evaluate(emb, issame)
    dist = pair_distances(emb)
    assert result.auc == pytest.approx(roc_auc_score(issame, -dist), abs=1e-12)
    fpr, tpr, _ = roc_curve(issame, -dist)
    eer = brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0, xtol=1e-14)
    assert result.eer == pytest.approx(eer, abs=1e-9)


def test_single_class_sets_give_nan_not_crash():
    emb, issame = line_pairs(np.full(20, 0.25), np.ones(20, bool))
    result = evaluate(emb, issame)
    assert math.isnan(result.far) and math.isnan(result.auc) and math.isnan(result.eer)
    assert result.as_dict()["far"] is None


def test_bad_shapes_are_refused():
    emb, issame = random_pairs(np.random.default_rng(0), 20, 4, 0.1)
    with pytest.raises(ValueError, match="even row count"):
        evaluate(emb[:-1], issame)
    with pytest.raises(ValueError, match="make 20 pairs"):
        evaluate(emb, issame[:-1])
    bad = emb.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate(bad, issame)
