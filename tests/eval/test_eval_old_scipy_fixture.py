"""lresnet's evaluate() gives exactly what InsightFace's algorithm gave with the SciPy it was written for.

The fixture holds pair sets and the numbers the reference algorithm produced under SciPy 1.8.1 /
numpy 1.22.4 (whose interp1d still accepts repeated FAR values: current SciPy raises), written by
``old_scipy_crosscheck.py --write-fixture``; nothing here needs the old SciPy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lresnet.eval import evaluate

FIXTURE = Path(__file__).parent / "fixtures" / "old_scipy_1.8.1.npz"
DATA = np.load(FIXTURE)
CASES = sorted({key.split("_", 1)[0] for key in DATA.files if key.endswith("_emb")})


def test_the_fixture_was_made_by_the_old_scipy():
    assert [str(v) for v in DATA["versions"]] == ["1.8.1", "1.22.4"]
    assert len(CASES) == 11


@pytest.mark.parametrize("case", CASES)
def test_evaluate_matches_scipy_1_8_1_to_the_last_digit(case):
    issame = DATA[f"{case}_issame"]
    result = evaluate(DATA[f"{case}_emb"], issame, nrof_folds=1 if case == "repeated" else 10)
    ours = {"acc": result.accuracy, "std": result.std, "thr": result.fold_thresholds, "val": result.val,
            "val_std": result.val_std, "far": result.far, "vthr": result.val_thresholds}
    for key, value in ours.items():
        np.testing.assert_array_equal(np.asarray(value, dtype=float), DATA[f"{case}_{key}"], err_msg=key)
