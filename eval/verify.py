"""``lresnet verify`` as one library call: which sets, which model, and the report.

    >>> from lresnet.eval.verify import VerifyRequest, run_verify
    >>> report = run_verify(VerifyRequest(sets=("lfw",), data=Path("OUT/val"), checkpoint=Path("last.pt")))
    >>> report.as_dict()   # {"format": "lresnet-verify/1", "model": {...}, "sets": [...]}

A request names the sets (``--set``/``--all`` from a folder, ``--bin`` files) and one source of
embeddings: a training checkpoint, a weights file or precomputed embeddings. Models are loaded
by :mod:`lresnet.model.weights`; the numbers come from :func:`lresnet.eval.protocol.evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from lresnet.core.device import autocast_dtype, resolve_device
from lresnet.core.errors import InputError
from lresnet.eval.data import available_sets, find_set_file, load_embeddings, load_pair_labels, load_pair_set
from lresnet.eval.extract import extract_embeddings, normalise_rows
from lresnet.eval.protocol import VerificationResult, evaluate

JSON_FORMAT = "lresnet-verify/1"

# progress(set name, images done, images in the set)
VerifyProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SetSpec:
    """One set to score: by name from a folder, or an original ``.bin`` file."""

    name: str
    data_dir: Optional[Path] = None
    bin_path: Optional[Path] = None


@dataclass(frozen=True)
class VerifyRequest:
    """What ``lresnet verify`` was asked to do (its options, parsed).

    Exactly one of ``checkpoint``, ``weights`` and ``embeddings`` is the source of embeddings;
    ``net`` names the backbone when the file does not; ``bgr`` None takes the channel order
    the weights expect. ``save_embeddings`` is a folder for ``<set>.npy`` (the flip-summed rows
    before normalisation: scoring them with ``embeddings`` reproduces every number).
    """

    sets: Sequence[str] = ()
    all_sets: bool = False
    data: Optional[Path] = None
    bins: Sequence[Path] = ()
    checkpoint: Optional[Path] = None
    weights: Optional[Path] = None
    net: Optional[str] = None
    embeddings: Optional[Path] = None
    flip: bool = True
    batch_size: int = 64
    device: str = "cpu"
    amp: str = "none"
    bgr: Optional[bool] = None
    folds: int = 10
    save_embeddings: Optional[Path] = None
    # IJB-B/IJB-C instead of pair sets: the target under ``data``, and the reference's switches
    ijb: Optional[str] = None
    flip_embeddings: Optional[Path] = None
    norm_score: bool = True
    detector_score: bool = True
    save_aligned: Optional[Path] = None


@dataclass(frozen=True)
class SetReport:
    """One scored set: its name, the file it came from, the protocol's numbers."""

    name: str
    source: str
    result: VerificationResult

    def as_dict(self) -> dict[str, Any]:
        return dict(name=self.name, source=self.source, **self.result.as_dict())


@dataclass(frozen=True)
class VerifyReport:
    """The model (or embeddings file) and every set scored, in the order asked for, or the IJB target."""

    model: dict[str, Any]
    sets: list[SetReport] = field(default_factory=list)
    ijb: Any = None  # an lresnet.eval.ijb.IJBReport

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` document: ``{"format": "lresnet-verify/1", "model": {...}, "sets": [...]}``,
        or ``"ijb": {...}`` in place of ``"sets"``."""
        doc = {"format": JSON_FORMAT, "model": self.model}
        if self.ijb is not None:
            doc["ijb"] = self.ijb.as_dict()
        else:
            doc["sets"] = [s.as_dict() for s in self.sets]
        return doc


def collect_sets(sets: Sequence[str], all_sets: bool, data: Optional[Path], bins: Sequence[Path]) -> list[SetSpec]:
    """The sets asked for, in order, without duplicates.

    Raises:
        InputError: names without ``data``, an unknown set, a missing ``.bin``, one name given
            twice for different files, or no set at all.
    """
    specs: list[SetSpec] = []
    if (sets or all_sets) and data is None:
        raise InputError("--data", "--set/--all need --data (the folder with <set>.tar or <set>.bin files)")
    names = list(sets)
    if all_sets:
        found = available_sets(data)
        if not found:
            find_set_file("(any)", data)  # raises: no directory, or no sets in it
        names += [n for n in found if n not in names]
    for name in names:
        find_set_file(name, data)  # unknown set -> lists the available ones
        specs.append(SetSpec(name, data_dir=data))
    for path in bins:
        if not Path(path).is_file():
            raise InputError(path, "no such file")
        specs.append(SetSpec(Path(path).stem, bin_path=Path(path)))
    unique: list[SetSpec] = []
    for spec in specs:
        twin = next((u for u in unique if u.name == spec.name), None)
        if twin is None:
            unique.append(spec)
        elif twin != spec:
            raise InputError(spec.bin_path or spec.data_dir, f"set name {spec.name!r} is given twice "
                                                             "(a --bin file is named after its stem)")
    if not unique:
        raise InputError("--set", "name the sets to score with --set NAME, --all, or --bin FILE")
    return unique


def run_verify(request: VerifyRequest, progress: Optional[VerifyProgress] = None) -> VerifyReport:
    """Score the request's model (or embeddings) on its sets by InsightFace's protocol.

    Raises:
        InputError: not exactly one source, bad sets, an unusable device or AMP dtype, a file
            that is not what its option says, or fewer pairs than folds.
    """
    sources = [p for p in (request.checkpoint, request.weights, request.embeddings) if p is not None]
    if len(sources) != 1:
        raise InputError("--checkpoint", "give exactly one of --checkpoint, --weights or --embeddings")
    if request.ijb is not None:
        return _score_ijb(request, progress)
    if request.flip_embeddings is not None or request.save_aligned is not None:
        raise InputError("--flip-embeddings" if request.flip_embeddings is not None else "--save-aligned",
                         "goes with --ijb IJBC|IJBB")
    specs = collect_sets(request.sets, request.all_sets, request.data, request.bins)
    if request.embeddings is not None:
        return _score_embeddings(request.embeddings, specs, request.folds)
    return _score_model(request, specs, progress)


def _score_embeddings(path: Path, specs: list[SetSpec], folds: int) -> VerifyReport:
    if len(specs) != 1:
        raise InputError(path, f"--embeddings scores one set, got {len(specs)}: "
                               f"{', '.join(s.name for s in specs)}")
    spec = specs[0]
    issame, source = load_pair_labels(spec.name, data_dir=spec.data_dir, bin_path=spec.bin_path)
    rows = load_embeddings(path, issame.size)
    raw = rows.astype(np.float64)
    xnorm = float(np.mean(np.linalg.norm(raw, axis=1)))
    result = evaluate(normalise_rows(raw), issame, nrof_folds=_check_folds(folds, issame.size))
    return VerifyReport({"kind": "embeddings", "path": str(path)},
                        [SetReport(spec.name, source, result.with_xnorm(xnorm))])


def _score_model(request: VerifyRequest, specs: list[SetSpec], progress: Optional[VerifyProgress]
                 ) -> VerifyReport:
    dev = resolve_device(request.device)
    amp_dtype = autocast_dtype(request.amp)
    loaded = _load_model(request)
    bgr = loaded.bgr if request.bgr is None else request.bgr
    model = dict(loaded.description, flip=request.flip, bgr=bgr, device=str(dev),
                 amp=None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
                 batch_size=request.batch_size)
    report = VerifyReport(model)
    for spec in specs:
        pairs = load_pair_set(spec.name, data_dir=spec.data_dir, bin_path=spec.bin_path)
        _check_folds(request.folds, pairs.num_pairs)
        total = len(pairs.images)
        emb = extract_embeddings(loaded.backbone, pairs.images, batch_size=request.batch_size, device=dev,
                                 flip=request.flip, amp_dtype=amp_dtype, bgr=bgr,
                                 normalize_each=loaded.l2_normalized,
                                 progress=None if progress is None else
                                 (lambda done, name=spec.name: progress(name, done, total)))
        # the same two steps as lresnet.eval.verify_backbone, keeping the embeddings
        result = evaluate(emb.normed, pairs.issame, nrof_folds=request.folds).with_xnorm(emb.xnorm)
        if request.save_embeddings is not None:
            _save_npy(request.save_embeddings, spec.name, emb.unnormalised)
        report.sets.append(SetReport(spec.name, pairs.source, result))
    return report


def _load_model(request: VerifyRequest):
    from lresnet.model.weights import load_backbone

    return load_backbone(request.checkpoint, request.weights, request.net)


def _score_ijb(request: VerifyRequest, progress: Optional[VerifyProgress]) -> VerifyReport:
    """IJB-B/IJB-C template verification, as arcface_torch's eval_ijbc.py computes it."""
    from lresnet.eval.ijb import IJBOptions, evaluate_ijb, ijb_encoder

    if request.sets or request.all_sets or request.bins:
        raise InputError("--ijb", "scores one IJB target under --data; --set/--all/--bin go without it")
    if request.data is None:
        raise InputError("--data", "--ijb needs --data ROOT (the folder holding IJBC/ or IJBB/)")
    options = IJBOptions(flip=request.flip, norm_score=request.norm_score, detector_score=request.detector_score)
    on_progress = None if progress is None else (lambda stage, done, total: progress(stage, done, total))
    if request.embeddings is not None:
        report = evaluate_ijb(request.data, request.ijb, embeddings=request.embeddings,
                              flip_embeddings=request.flip_embeddings, options=options, progress=on_progress)
        return VerifyReport({"kind": "embeddings", "path": str(request.embeddings),
                             "flip_path": None if request.flip_embeddings is None else str(request.flip_embeddings)},
                            ijb=report)
    if request.flip_embeddings is not None:
        raise InputError("--flip-embeddings", "goes with --embeddings (a model embeds the mirrored crops itself)")
    dev = resolve_device(request.device)
    loaded = _load_model(request)
    bgr = loaded.bgr if request.bgr is None else request.bgr
    encoder = ijb_encoder(loaded.backbone, device=dev, amp=request.amp, bgr=bgr)
    report = evaluate_ijb(request.data, request.ijb, encoder=encoder, options=options,
                          batch_size=request.batch_size, save_aligned=request.save_aligned,
                          save_embeddings=request.save_embeddings, progress=on_progress)
    model = dict(loaded.description, flip=request.flip, bgr=bgr, device=str(dev), amp=request.amp,
                 batch_size=request.batch_size)
    return VerifyReport(model, ijb=report)


def _save_npy(folder: Path, name: str, rows: np.ndarray) -> None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        np.save(Path(folder) / f"{name}.npy", rows)
    except OSError as err:
        raise InputError(folder, f"cannot write embeddings: {err.strerror or err}") from None


def _check_folds(folds: int, num_pairs: int) -> int:
    if num_pairs < folds:
        raise InputError("--folds", f"{num_pairs} pairs cannot be split into {folds} folds")
    return folds
