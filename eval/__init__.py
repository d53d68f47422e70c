"""Verification: pair sets, embedding extraction and InsightFace's protocol, number for number.

    >>> from lresnet.eval import load_pair_set, verify_backbone
    >>> pairs = load_pair_set("agedb_30", data_dir="OUT/val")
    >>> result = verify_backbone(backbone, pairs, batch_size=128, device="cuda")
    >>> result.accuracy, result.std, result.val, result.xnorm
"""

from lresnet.eval.data import (PairSet, available_sets, find_set_file, load_embeddings,
                               load_pair_labels, load_pair_set)
from lresnet.eval.extract import (Embeddings, extract_embeddings, normalise_rows,
                                  verify_backbone)
from lresnet.eval.protocol import (ACCURACY_THRESHOLDS, FAR_TARGET, VAL_THRESHOLDS, VerificationResult,
                                   evaluate, kfold_bounds, legacy_slinear, pair_distances)

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
]
