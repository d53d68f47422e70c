"""The standard face-verification protocol, number for number the same as InsightFace's.

Given L2-normalised embeddings of ``N`` pairs (rows ``2k`` and ``2k+1`` form pair ``k``)
and whether each pair shows the same person:

- distance: squared L2 distance between the two embeddings of a pair;
  "same" is predicted when ``distance < threshold``;
- accuracy: 10-fold cross-validation without shuffling (fold sizes as
  ``sklearn.model_selection.KFold(n_splits=10, shuffle=False)``: the first ``N % 10``
  folds get one extra pair); on each fold the threshold from ``np.arange(0, 4, 0.01)``
  with the best accuracy on the other 9 folds (the first one on ties) is scored on
  the held-out fold; reported as mean and (population) standard deviation;
- VR@FAR: on the 9 training folds, the threshold that gives FAR = 1e-3 is read off
  the curve ``FAR(threshold)`` on ``np.arange(0, 4, 0.001)`` by linear interpolation
  (threshold 0 when FAR never reaches the target); the held-out fold's VR and FAR at
  that threshold are averaged over the folds.

InsightFace reads the threshold with ``scipy.interpolate.interp1d(far, thresholds,
kind="slinear")``. ``far`` repeats values (it is a step function), which SciPy >= 1.9
refuses ("Expect x to not have duplicates"), so the reference crashes on current SciPy.
SciPy 1.6-1.8 sorted ``x`` stably (mergesort), built a degree-1 B-spline on the knots
``[x0, x0, x1, ..., xn, xn]`` without checking for repeats and evaluated it with de Boor's
recursion; :func:`legacy_slinear` reproduces that evaluation exactly, so the numbers are the
ones the reference gave there (checked against real SciPy 1.8.1, see
``tests/eval/old_scipy_crosscheck.py``). SciPy <= 1.5 sorted with an unstable quicksort, so
the order of equal FAR values, and with it VR/FAR, depended on NumPy's sort internals; those
numbers are not reproducible and are not targeted.

Beyond the reference: ROC AUC and EER over all pairs, and the best threshold on all
pairs. Nothing here needs SciPy or scikit-learn.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3


def kfold_bounds(num_pairs: int, num_folds: int) -> list[tuple[int, int]]:
    """Return ``[(start, stop), ...]`` of the contiguous test folds, as KFold(shuffle=False).

    The first ``num_pairs % num_folds`` folds hold one pair more than the others.

    Raises:
        ValueError: when there are fewer pairs than folds or ``num_folds < 1``.
    """
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}")
    if num_pairs < num_folds:
        raise ValueError(f"cannot split {num_pairs} pairs into {num_folds} folds")
    base, extra = divmod(num_pairs, num_folds)
    bounds, start = [], 0
    for fold in range(num_folds):
        stop = start + base + (1 if fold < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _fold_masks(num_pairs: int, num_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) boolean masks per fold; one fold means train = test = everything."""
    if num_folds == 1:
        everything = np.ones(num_pairs, dtype=bool)
        return [(everything, everything)]
    masks = []
    for start, stop in kfold_bounds(num_pairs, num_folds):
        test = np.zeros(num_pairs, dtype=bool)
        test[start:stop] = True
        masks.append((~test, test))
    return masks


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distance of rows 2k and 2k+1, computed in the embeddings' dtype, as float64."""
    first, second = embeddings[0::2], embeddings[1::2]
    return np.sum(np.square(np.subtract(first, second)), 1).astype(np.float64)


class _Counts:
    """Counts of same / different pairs with ``distance < threshold`` for many thresholds."""

    def __init__(self, dist: np.ndarray, issame: np.ndarray):
        self.same = np.sort(dist[issame])
        self.diff = np.sort(dist[~issame])
        self.n_same = self.same.size
        self.n_diff = self.diff.size

    def below(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(true accepts, false accepts) for each threshold: values strictly below it."""
        tp = np.searchsorted(self.same, thresholds, side="left")
        fp = np.searchsorted(self.diff, thresholds, side="left")
        return tp, fp

    def accuracy(self, thresholds: np.ndarray) -> np.ndarray:
        tp, fp = self.below(thresholds)
        tn = self.n_diff - fp
        return (tp + tn) / (self.n_same + self.n_diff)

    def rates(self, thresholds: np.ndarray, undefined: float) -> tuple[np.ndarray, np.ndarray]:
        """(TPR, FPR); a rate whose denominator is zero is ``undefined``."""
        tp, fp = self.below(thresholds)
        tpr = tp / self.n_same if self.n_same else np.full(tp.shape, undefined)
        fpr = fp / self.n_diff if self.n_diff else np.full(fp.shape, undefined)
        return tpr, fpr


def legacy_slinear(x: np.ndarray, y: np.ndarray, x_new: float) -> float:
    """``interp1d(x, y, kind="slinear")(x_new)`` as SciPy 1.6-1.8 computed it (before it refused repeated x).

    The old code sorted ``x`` stably, made the degree-1 B-spline with knots
    ``[x[0], x[0], x[1], ..., x[-1], x[-1]]`` and coefficients ``y``, and evaluated it:
    the interval is the last knot ``<= x_new`` (never past the second-to-last point),
    and the value is de Boor's ``y_a * w * (x_b - x_new) + y_b * w * (x_new - x_a)``
    with ``w = 1 / (x_b - x_a)``, in this order of floating-point operations.
    Repeated knots make zero-length intervals that the search skips; the one case
    that lands on one (``x_new`` equal to a repeated maximum) evaluates to 0.

    Raises:
        ValueError: when ``x_new`` lies outside ``[min(x), max(x)]`` (interp1d's bounds
        error) or there are fewer than two points.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2 or x.size != y.size:
        raise ValueError(f"need at least two points with matching x and y, got {x.size} and {y.size}")
    order = np.argsort(x, kind="mergesort")
    xs, ys = x[order], y[order]
    if not xs[0] <= x_new <= xs[-1]:
        raise ValueError(f"{x_new} is outside the interpolation range [{xs[0]}, {xs[-1]}]")
    right = min(int(np.searchsorted(xs, x_new, side="right")), xs.size - 1)
    x_a, x_b = float(xs[right - 1]), float(xs[right])
    if x_b == x_a:
        return 0.0
    w = 1.0 / (x_b - x_a)
    return 0.0 + float(ys[right - 1]) * (w * (x_b - x_new)) + float(ys[right]) * (w * (x_new - x_a))


def _rank_auc(dist: np.ndarray, issame: np.ndarray) -> float:
    """ROC AUC of "same when closer": P(d_same < d_diff) + P(d_same == d_diff) / 2."""
    n_same, n_diff = int(issame.sum()), int((~issame).sum())
    if n_same == 0 or n_diff == 0:
        return math.nan
    _, inverse, counts = np.unique(dist, return_inverse=True, return_counts=True)
    # 1-based average rank of each distinct value, ties sharing the mean rank
    upper = np.cumsum(counts)
    mean_rank = upper - (counts - 1) / 2.0
    rank_sum_diff = float(mean_rank[inverse][~issame].sum())
    u = rank_sum_diff - n_diff * (n_diff + 1) / 2.0
    return u / (n_same * n_diff)


def roc_curve_points(dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full ROC over all pairs: (FAR, TAR, threshold) for "same when distance <= threshold".

    The first point is (0, 0, -inf); one point per distinct distance after it.
    """
    values = np.unique(dist)
    same = np.sort(dist[issame])
    diff = np.sort(dist[~issame])
    tar = np.searchsorted(same, values, side="right") / max(same.size, 1)
    far = np.searchsorted(diff, values, side="right") / max(diff.size, 1)
    return (np.concatenate([[0.0], far]), np.concatenate([[0.0], tar]),
            np.concatenate([[-np.inf], values]))


def _eer(far: np.ndarray, tar: np.ndarray, thresholds: np.ndarray) -> tuple[float, float]:
    """Equal error rate (FAR = 1 - TAR, linear between ROC points) and the first threshold past it."""
    gap = far - (1.0 - tar)  # rises from -1 to +1 along the curve
    crossed = np.nonzero(gap >= 0)[0]
    if crossed.size == 0:
        return math.nan, math.nan
    i = int(crossed[0])
    if i == 0:
        return float(far[0]), float(thresholds[0])
    before, after = gap[i - 1], gap[i]
    t = before / (before - after)
    return float(far[i - 1] + t * (far[i] - far[i - 1])), float(thresholds[i])


@dataclass(frozen=True, eq=False)
class VerificationResult:
    """Everything the protocol reports for one set of pairs.

    ``accuracy``/``std``/``val``/``val_std``/``far`` equal InsightFace's
    ``verification.evaluate`` (``np.mean(accuracy)``, ``np.std(accuracy)``, ``val``,
    ``val_std``, ``far``); ``tpr``/``fpr`` are its fold-averaged curves on
    ``ACCURACY_THRESHOLDS``. The rest is extra.
    """

    num_pairs: int
    num_folds: int
    accuracy: float
    std: float
    fold_accuracies: tuple[float, ...]
    fold_thresholds: tuple[float, ...]
    best_threshold: float
    val: float
    val_std: float
    far: float
    far_target: float
    fold_val: tuple[float, ...]
    fold_far: tuple[float, ...]
    val_thresholds: tuple[float, ...]
    auc: float
    eer: float
    eer_threshold: float
    tpr: np.ndarray = field(repr=False)
    fpr: np.ndarray = field(repr=False)
    roc_far: np.ndarray = field(repr=False)
    roc_tar: np.ndarray = field(repr=False)
    xnorm: Optional[float] = None

    def with_xnorm(self, xnorm: float) -> "VerificationResult":
        """A copy carrying the embedding norm statistic of the extraction."""
        return dataclasses.replace(self, xnorm=float(xnorm))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (NaN becomes None; the curves are left out)."""
        def clean(value: Any) -> Any:
            if isinstance(value, tuple):
                return [clean(v) for v in value]
            if isinstance(value, float) and not math.isfinite(value):
                return None
            return value

        keys = ("num_pairs", "num_folds", "accuracy", "std", "best_threshold", "val", "val_std",
                "far", "far_target", "auc", "eer", "eer_threshold", "xnorm", "fold_accuracies",
                "fold_thresholds", "fold_val", "fold_far", "val_thresholds")
        return {key: clean(getattr(self, key)) for key in keys}


def evaluate(embeddings: np.ndarray, issame: Sequence[bool] | np.ndarray, nrof_folds: int = 10,
             far_target: float = FAR_TARGET) -> VerificationResult:
    """Score embeddings of pairs by the standard protocol (see the module docstring).

    Args:
        embeddings: ``[2N, D]`` float array, rows ``2k`` and ``2k+1`` are pair ``k``; used
            as given (normalise them first, as InsightFace's callers do).
        issame: ``N`` booleans.
        nrof_folds: cross-validation folds (1 = train and test on everything).
        far_target: the FAR for VR@FAR.

    Returns:
        VerificationResult. Rates whose denominator is empty in some fold (a fold
        without same or without different pairs; the reference raises) are NaN.

    Raises:
        ValueError: wrong shapes, non-finite values, or fewer pairs than folds.
    """
    emb = np.asarray(embeddings)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    if emb.ndim != 2 or emb.shape[0] % 2 or emb.shape[1] < 1:
        raise ValueError(f"embeddings must be [2N, D] with an even row count, got shape {emb.shape}")
    if emb.shape[0] // 2 != same.size:
        raise ValueError(f"{emb.shape[0]} embeddings make {emb.shape[0] // 2} pairs, "
                         f"but issame has {same.size} entries")
    if not np.issubdtype(emb.dtype, np.floating):
        emb = emb.astype(np.float64)
    if not np.all(np.isfinite(emb)):
        raise ValueError("embeddings contain NaN or infinite values")
    n = same.size
    dist = pair_distances(emb)
    folds = _fold_masks(n, nrof_folds)

    grid, vgrid = ACCURACY_THRESHOLDS, VAL_THRESHOLDS
    tprs = np.zeros((nrof_folds, grid.size))
    fprs = np.zeros((nrof_folds, grid.size))
    fold_acc, fold_thr = np.zeros(nrof_folds), np.zeros(nrof_folds)
    fold_val, fold_far, val_thr = np.zeros(nrof_folds), np.zeros(nrof_folds), np.zeros(nrof_folds)
    for k, (train, test) in enumerate(folds):
        train_counts = _Counts(dist[train], same[train])
        test_counts = _Counts(dist[test], same[test])
        # accuracy: the best threshold on the training folds, scored on the held-out fold
        best = int(np.argmax(train_counts.accuracy(grid)))
        tprs[k], fprs[k] = test_counts.rates(grid, undefined=0.0)
        fold_acc[k] = test_counts.accuracy(grid[best:best + 1])[0]
        fold_thr[k] = grid[best]
        # VR@FAR: the threshold for the target FAR on the training folds, VR/FAR on the held-out fold
        _, far_train = train_counts.rates(vgrid, undefined=math.nan)
        threshold = legacy_slinear(far_train, vgrid, far_target) if np.max(far_train) >= far_target else 0.0
        val_thr[k] = threshold
        tpr, fpr = test_counts.rates(np.array([threshold]), undefined=math.nan)
        fold_val[k], fold_far[k] = tpr[0], fpr[0]

    all_counts = _Counts(dist, same)
    best_all = float(grid[int(np.argmax(all_counts.accuracy(grid)))])
    roc_far, roc_tar, roc_thr = roc_curve_points(dist, same)
    eer, eer_thr = _eer(roc_far, roc_tar, roc_thr) if all_counts.n_same and all_counts.n_diff \
        else (math.nan, math.nan)

    return VerificationResult(
        num_pairs=n, num_folds=nrof_folds,
        accuracy=float(np.mean(fold_acc)), std=float(np.std(fold_acc)),
        fold_accuracies=tuple(map(float, fold_acc)), fold_thresholds=tuple(map(float, fold_thr)),
        best_threshold=best_all,
        val=float(np.mean(fold_val)), val_std=float(np.std(fold_val)), far=float(np.mean(fold_far)),
        far_target=float(far_target),
        fold_val=tuple(map(float, fold_val)), fold_far=tuple(map(float, fold_far)),
        val_thresholds=tuple(map(float, val_thr)),
        auc=_rank_auc(dist, same), eer=eer, eer_threshold=eer_thr,
        tpr=np.mean(tprs, 0), fpr=np.mean(fprs, 0), roc_far=roc_far, roc_tar=roc_tar,
    )
