"""lresnet's evaluate() against InsightFace's algorithm on a real old SciPy (not part of the test suite).

SciPy 1.6-1.8 is the last that accepts repeated x in ``interp1d(kind="slinear")``; it needs an old
Python, e.g.::

    python3.8 -m venv /tmp/oldscipy && /tmp/oldscipy/bin/pip install numpy==1.22.4 scipy==1.8.1
    /tmp/oldscipy/bin/python tests/eval/old_scipy_crosscheck.py SEED TRIALS

It loads ``eval/protocol.py`` by path (numpy only), runs the reference algorithm with the real
``scipy.interpolate.interp1d`` on random and constructed pair sets, and exits 1 on the first
difference. Measured: ``scipy 1.8.1 numpy 1.22.4 : all equal on 40 random sets + the
repeated-maximum case`` (seed 1, 40 trials).

With ``--write-fixture FILE.npz`` it instead writes smaller cases and the old SciPy's numbers to
FILE, which ``test_eval_old_scipy_fixture.py`` compares with lresnet's ``evaluate`` in the suite
(run with the environment above, seed 7, 10 cases: ``tests/eval/fixtures/old_scipy_1.8.1.npz``).
"""
import importlib.util
import os
import sys

import numpy as np
import scipy
from scipy import interpolate

PROTOCOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "eval", "protocol.py")


def load_protocol():
    spec = importlib.util.spec_from_file_location("protocol", PROTOCOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["protocol"] = module
    spec.loader.exec_module(module)
    return module


def folds(n, k):
    """KFold(k, shuffle=False) as (train, test) index arrays; k == 1 trains and tests on all."""
    if k == 1:
        return [(np.arange(n), np.arange(n))]
    sizes = np.full(k, n // k)
    sizes[: n % k] += 1
    out, start = [], 0
    for size in sizes:
        test = np.arange(start, start + size)
        out.append((np.setdiff1d(np.arange(n), test), test))
        start += size
    return out


def accuracy_at(t, d, same):
    predict = np.less(d, t)
    tp, tn = np.sum(predict & same), np.sum(~predict & ~same)
    return float(tp + tn) / d.size


def val_far_at(t, d, same):
    predict = np.less(d, t)
    return (float(np.sum(predict & same)) / float(np.sum(same)),
            float(np.sum(predict & ~same)) / float(np.sum(~same)))


def insightface(emb, issame, k=10):
    """The reference algorithm with the real interp1d of this environment's SciPy."""
    d = np.sum(np.square(np.subtract(emb[0::2], emb[1::2])), 1)
    grid = np.arange(0, 4, 0.01)
    accs, bests = [], []
    for train, test in folds(len(issame), k):
        train_acc = np.array([accuracy_at(t, d[train], issame[train]) for t in grid])
        best = np.argmax(train_acc)
        accs.append(accuracy_at(grid[best], d[test], issame[test]))
        bests.append(grid[best])
    grid = np.arange(0, 4, 0.001)
    val, far, thresholds = [], [], []
    for train, test in folds(len(issame), k):
        diff = d[train][~issame[train]]
        far_train = np.array([float(np.sum(diff < t)) / float(diff.size) for t in grid])
        if np.max(far_train) >= 1e-3:
            threshold = interpolate.interp1d(far_train, grid, kind="slinear")(1e-3)
        else:
            threshold = 0.0
        v, f = val_far_at(threshold, d[test], issame[test])
        val.append(v)
        far.append(f)
        thresholds.append(float(threshold))
    return dict(acc=np.mean(accs), std=np.std(accs), thr=bests, val=np.mean(val), val_std=np.std(val),
                far=np.mean(far), vthr=thresholds)


def ours_as_dict(result):
    return dict(acc=result.accuracy, std=result.std, thr=list(result.fold_thresholds), val=result.val,
                val_std=result.val_std, far=result.far, vthr=list(result.val_thresholds))


def compare(label, ref, ours):
    for key, value in ref.items():
        if not np.array_equal(np.asarray(value, dtype=float), np.asarray(ours[key], dtype=float)):
            print("MISMATCH", label, key, value, ours[key])
            sys.exit(1)


def random_set(rng, trial):
    n = int(rng.choice([100, 203, 600, 1200]))
    dim = int(rng.choice([2, 3, 8, 64]))
    noise = float(rng.choice([0.05, 0.3, 1.0]))
    issame = rng.random(n) < 0.5
    first = rng.normal(size=(n, dim))
    first /= np.linalg.norm(first, axis=1, keepdims=True)
    other = rng.normal(size=(n, dim))
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    noisy = first + noise * rng.normal(size=(n, dim))
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    emb = np.empty((2 * n, dim))
    emb[0::2], emb[1::2] = first, np.where(issame[:, None], noisy, other)
    if trial % 4 == 3:
        emb = np.round(emb, 2)  # many tied distances
    if trial % 5 == 4:
        emb = emb.astype(np.float32)
    return emb, issame


FIXTURE_KEYS = ("acc", "std", "thr", "val", "val_std", "far", "vthr")


def write_fixture(path, seed, cases):
    """Small cases (n <= 600 pairs, dim <= 8) and this environment's reference numbers, as one .npz."""
    rng = np.random.default_rng(seed)
    arrays = {"versions": np.array([scipy.__version__, np.__version__])}
    for case in range(cases):
        while True:
            emb, issame = random_set(rng, case)
            if len(issame) <= 600 and emb.shape[1] <= 8:
                break
        ref = insightface(emb, issame)
        arrays[f"{case}_emb"], arrays[f"{case}_issame"] = emb, issame
        for key in FIXTURE_KEYS:
            arrays[f"{case}_{key}"] = np.asarray(ref[key], dtype=float)
    d = np.r_[np.full(20, 0.25), [1.0], np.full(999, 4.0)]  # the repeated-maximum case, one fold
    same = np.r_[np.ones(20, bool), np.zeros(1000, bool)]
    emb = np.zeros((2 * d.size, 1))
    emb[1::2, 0] = np.sqrt(d)
    ref = insightface(emb, same, k=1)
    arrays["repeated_emb"], arrays["repeated_issame"] = emb, same
    for key in FIXTURE_KEYS:
        arrays[f"repeated_{key}"] = np.asarray(ref[key], dtype=float)
    np.savez_compressed(path, **arrays)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--write-fixture":
        write_fixture(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 7,
                      int(sys.argv[4]) if len(sys.argv) > 4 else 10)
        return
    protocol = load_protocol()
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    trials = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    rng = np.random.default_rng(seed)
    for trial in range(trials):
        emb, issame = random_set(rng, trial)
        compare(f"trial {trial}", insightface(emb, issame), ours_as_dict(protocol.evaluate(emb, issame)))
    # constructed: the FAR target equals a repeated maximum of FAR (one fold)
    d = np.r_[np.full(20, 0.25), [1.0], np.full(999, 4.0)]
    same = np.r_[np.ones(20, bool), np.zeros(1000, bool)]
    emb = np.zeros((2 * d.size, 1))
    emb[1::2, 0] = np.sqrt(d)
    compare("repeated maximum", insightface(emb, same, k=1),
            ours_as_dict(protocol.evaluate(emb, same, nrof_folds=1)))
    print("scipy", scipy.__version__, "numpy", np.__version__, ": all equal on", trials,
          "random sets + the repeated-maximum case")


if __name__ == "__main__":
    main()
