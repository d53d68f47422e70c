"""Verification: pair sets, embedding extraction and InsightFace's protocol, number for number.

    >>> from lresnet.eval import load_pair_set, verify_backbone
    >>> pairs = load_pair_set("agedb_30", data_dir="OUT/val")
    >>> result = verify_backbone(backbone, pairs, batch_size=128, device="cuda")
    >>> result.accuracy, result.std, result.val, result.xnorm

``lresnet verify`` is one call: ``run_verify(VerifyRequest(...)).as_dict()`` (:mod:`lresnet.eval.verify`);
``lresnet bench verify`` is :func:`lresnet.eval.bench.bench_extraction`.
"""

from lresnet.eval.data import (PairSet, available_sets, find_set_file, load_embeddings,
                               load_pair_labels, load_pair_set)
from lresnet.eval.extract import (Embeddings, extract_embeddings, normalise_rows,
                                  verify_backbone)
from lresnet.eval.protocol import (ACCURACY_THRESHOLDS, FAR_TARGET, VAL_THRESHOLDS, VerificationResult,
                                   evaluate, kfold_bounds, legacy_slinear, pair_distances)
from lresnet.eval.verify import SetReport, SetSpec, VerifyReport, VerifyRequest, collect_sets, run_verify

__all__ = [
    "PairSet",
    "available_sets",
    "find_set_file",
    "load_embeddings",
    "load_pair_labels",
    "load_pair_set",
    "Embeddings",
    "extract_embeddings",
    "normalise_rows",
    "verify_backbone",
    "ACCURACY_THRESHOLDS",
    "FAR_TARGET",
    "VAL_THRESHOLDS",
    "VerificationResult",
    "evaluate",
    "kfold_bounds",
    "legacy_slinear",
    "pair_distances",
    "SetReport",
    "SetSpec",
    "VerifyReport",
    "VerifyRequest",
    "collect_sets",
    "run_verify",
]
