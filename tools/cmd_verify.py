"""CLI: ``lresnet verify`` (the standard verification protocol) and ``lresnet bench verify``."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from lresnet.core.errors import InputError

JSON_FORMAT = "lresnet-verify/1"


@dataclass(frozen=True)
class SetSpec:
    """One set to score: by name from a folder, or an original ``.bin`` file."""

    name: str
    data_dir: Optional[Path] = None
    bin_path: Optional[Path] = None


@dataclass
class LoadedModel:
    """A backbone ready for extraction and what the report says about it."""

    backbone: Any
    net: str
    bgr: bool
    description: dict[str, Any]


# --------------------------------------------------------------------------- models
def _read_torch_file(path: Path) -> Any:
    import torch

    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged or foreign pickles
        first = str(err).splitlines()[0] if str(err) else ""
        raise InputError(path, f"cannot load with weights_only=True ({type(err).__name__}: {first})") from None


def _strip_prefixes(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _load_strict(backbone: Any, state_dict: dict, path: Path, net: str) -> None:
    try:
        backbone.load_state_dict(_strip_prefixes(state_dict))
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise InputError(path, f"weights do not fit backbone {net!r}: {detail}") from None


def load_checkpoint_backbone(path: Path, net: Optional[str]) -> LoadedModel:
    """A training checkpoint: ``{"backbone": state dict, "config": {"model": {"net", ...}}}``."""
    from lresnet.model import create_backbone

    ckpt = _read_torch_file(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("backbone"), dict):
        raise InputError(path, "not a training checkpoint (expected a dict with a 'backbone' state dict; "
                               "use --weights for a bare state dict)")
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    model_cfg = config.get("model") if isinstance(config.get("model"), dict) else {}
    name = net or model_cfg.get("net")
    if not name:
        raise InputError(path, "the checkpoint does not name its backbone (config.model.net); pass --net")
    kwargs: dict[str, Any] = {}
    if "embedding_size" in model_cfg:
        kwargs["embedding_size"] = int(model_cfg["embedding_size"])
    if isinstance(model_cfg.get("options"), dict):
        kwargs.update(model_cfg["options"])
    backbone = create_backbone(name, **kwargs)
    _load_strict(backbone, ckpt["backbone"], path, name)
    step = ckpt.get("step")
    return LoadedModel(backbone, name, False, {"kind": "checkpoint", "path": str(path), "net": name,
                                               "step": int(step) if isinstance(step, int) else None})


def load_weights_backbone(path: Path, net: Optional[str]) -> LoadedModel:
    """A bare state dict: lresnet, arcface_torch or TreB1eN weights (architecture read from the keys)."""
    from lresnet.model import create_backbone, describe_state_dict, load_weights
    from lresnet.model.iresnet import UNITS

    obj = _read_torch_file(path)
    state_dict = obj
    if isinstance(obj, dict):
        for key in ("state_dict", "backbone", "model"):
            if isinstance(obj.get(key), dict):
                state_dict = obj[key]
                break
    if not isinstance(state_dict, dict) or not state_dict:
        raise InputError(path, "not a state dict (a mapping of parameter names to tensors)")
    try:
        spec = describe_state_dict(state_dict)
    except (InputError, KeyError, IndexError, AttributeError):
        spec = None
    if spec is None:
        if not net:
            raise InputError(path, "cannot tell the backbone from the weight names; pass --net")
        backbone = create_backbone(net)
        _load_strict(backbone, state_dict, path, net)
        return LoadedModel(backbone, net, False, {"kind": "weights", "path": str(path), "net": net,
                                                  "source": "lresnet"})
    depth = next((d for d, units in UNITS.items() if units == spec.units), None)
    name = net or (f"{'irse' if spec.se else 'ir'}{depth}" if depth else None)
    if name is None:
        raise InputError(path, f"no registered depth has units {spec.units}; pass --net")
    backbone = create_backbone(name, embedding_size=spec.embedding_size, unit_style=spec.unit_style)
    try:
        info = load_weights(backbone, state_dict)
    except InputError as err:
        raise InputError(path, err.message) from None
    return LoadedModel(backbone, name, info.channel_order == "BGR",
                       {"kind": "weights", "path": str(path), "net": name, "source": info.source,
                        "channel_order": info.channel_order})


# --------------------------------------------------------------------------- sets
def collect_sets(sets: List[str], all_sets: bool, data: Optional[Path], bins: List[Path]) -> List[SetSpec]:
    """The sets asked for, in order, without duplicates."""
    from lresnet.eval import available_sets, find_set_file

    specs: List[SetSpec] = []
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
        if not path.is_file():
            raise InputError(path, "no such file")
        specs.append(SetSpec(path.stem, bin_path=path))
    unique: List[SetSpec] = []
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


# --------------------------------------------------------------------------- output
def _fmt(value: Optional[float], digits: int = 5) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def result_table(name: str, source: str, result: Any) -> Table:
    """A rich table of one set's numbers (the per-fold lists are in --json)."""
    table = Table(title=f"{name}  ({result.num_pairs} pairs, {source})", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right", no_wrap=True)
    thresholds = np.asarray(result.fold_thresholds)
    table.add_row(f"accuracy ({result.num_folds}-fold)", f"{_fmt(result.accuracy)} ± {_fmt(result.std)}")
    table.add_row("best threshold (all pairs)", _fmt(result.best_threshold, 2))
    table.add_row("fold thresholds (min/median/max)",
                  f"{thresholds.min():.2f} / {np.median(thresholds):.2f} / {thresholds.max():.2f}")
    table.add_row(f"VR@FAR={result.far_target:g}", f"{_fmt(result.val)} ± {_fmt(result.val_std)}")
    table.add_row("FAR at those thresholds", _fmt(result.far))
    table.add_row("ROC AUC", _fmt(result.auc))
    table.add_row("EER", _fmt(result.eer))
    table.add_row("XNorm", _fmt(result.xnorm, 4))
    if any(isinstance(v, float) and math.isnan(v) for v in (result.val, result.far, result.auc, result.eer)):
        table.caption = "-: undefined (a test fold, or the set, lacks same or different pairs)"
    return table


def write_roc(path: Path, curves: List[tuple[str, Any]]) -> None:
    """ROC curves (TAR against FAR, log FAR axis) of every set into one PNG."""
    try:
        import matplotlib
    except ImportError:
        raise InputError(path, "writing a ROC curve needs matplotlib: pip install 'lresnet[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    for name, result in curves:
        keep = result.roc_far > 0
        ax.plot(result.roc_far[keep], result.roc_tar[keep], label=f"{name} (AUC {result.auc:.4f})")
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("verification ROC")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as err:
        raise InputError(path, f"cannot write: {err.strerror or err}") from None
    finally:
        plt.close(fig)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, transient=True)


# --------------------------------------------------------------------------- commands
def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to `app` and its benchmarks to `bench`."""

    @app.command("verify")
    def verify_cmd(
        set_names: List[str] = typer.Option([], "--set", "-s", help="Set name (repeatable): lfw, agedb_30, cfp_fp, ..."),
        all_sets: bool = typer.Option(False, "--all", help="Every set found in --data."),
        data: Optional[Path] = typer.Option(None, "--data", help="Folder with <set>.tar (OUT/val) or <set>.bin files."),
        bins: List[Path] = typer.Option([], "--bin", help="An original InsightFace .bin file (repeatable); "
                                                         "the set is named after the file."),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Training checkpoint (.pt)."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="Backbone state dict: lresnet, "
                                                                       "arcface_torch or TreB1eN weights."),
        net: Optional[str] = typer.Option(None, "--net", help="Backbone name, when the file does not say."),
        embeddings: Optional[Path] = typer.Option(None, "--embeddings",
                                                  help="Precomputed embeddings .npy [2N, D], rows 2k/2k+1 = pair k "
                                                       "(L2-normalised before scoring)."),
        flip: bool = typer.Option(True, "--flip/--no-flip", help="Flip test-time augmentation."),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda[:i] or npu[:i]."),
        amp: str = typer.Option("none", "--amp", help="Autocast dtype for the forward: none, bf16, fp16."),
        bgr: Optional[bool] = typer.Option(None, "--bgr/--rgb", help="Channel order fed to the backbone "
                                                                     "(default: from the weights; RGB)."),
        folds: int = typer.Option(10, "--folds", min=1, help="Cross-validation folds."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
        roc: Optional[Path] = typer.Option(None, "--roc", help="Write ROC curves to this PNG (needs matplotlib)."),
        save_embeddings: Optional[Path] = typer.Option(
            None, "--save-embeddings", help="Folder to write <set>.npy: the flip-summed embeddings before "
                                            "normalisation; --embeddings on them reproduces the numbers exactly."),
    ) -> None:
        """Score a backbone (or precomputed embeddings) on verification sets, InsightFace's protocol."""
        from lresnet.core.device import autocast_dtype, resolve_device
        from lresnet.eval import evaluate, extract_embeddings, load_embeddings, load_pair_labels, load_pair_set
        from lresnet.eval import normalise_rows

        sources = [p for p in (checkpoint, weights, embeddings) if p is not None]
        if len(sources) != 1:
            raise InputError("--checkpoint", "give exactly one of --checkpoint, --weights or --embeddings")
        specs = collect_sets(set_names, all_sets, data, bins)
        console = Console(stderr=as_json)
        results: List[tuple[SetSpec, str, Any]] = []

        if embeddings is not None:
            if len(specs) != 1:
                raise InputError(embeddings, f"--embeddings scores one set, got {len(specs)}: "
                                             f"{', '.join(s.name for s in specs)}")
            spec = specs[0]
            issame, source = load_pair_labels(spec.name, data_dir=spec.data_dir, bin_path=spec.bin_path)
            rows = load_embeddings(embeddings, issame.size)
            raw = rows.astype(np.float64)
            xnorm = float(np.mean(np.linalg.norm(raw, axis=1)))
            result = evaluate(normalise_rows(raw), issame, nrof_folds=_check_folds(folds, issame.size))
            results.append((spec, source, result.with_xnorm(xnorm)))
            model_info: dict[str, Any] = {"kind": "embeddings", "path": str(embeddings)}
        else:
            dev = resolve_device(device)
            amp_dtype = autocast_dtype(amp)
            loaded = (load_checkpoint_backbone(checkpoint, net) if checkpoint is not None
                      else load_weights_backbone(weights, net))
            use_bgr = loaded.bgr if bgr is None else bgr
            model_info = dict(loaded.description, flip=flip, bgr=use_bgr, device=str(dev),
                              amp=None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
                              batch_size=batch_size)
            for spec in specs:
                pairs = load_pair_set(spec.name, data_dir=spec.data_dir, bin_path=spec.bin_path)
                _check_folds(folds, pairs.num_pairs)
                with _progress(console) as progress:
                    task = progress.add_task(f"{spec.name}: embedding", total=len(pairs.images))
                    emb = extract_embeddings(loaded.backbone, pairs.images, batch_size=batch_size, device=dev,
                                             flip=flip, amp_dtype=amp_dtype, bgr=use_bgr,
                                             progress=lambda done: progress.update(task, completed=done))
                # the same two steps as lresnet.eval.verify_backbone, keeping the embeddings
                result = evaluate(emb.normed, pairs.issame, nrof_folds=folds).with_xnorm(emb.xnorm)
                if save_embeddings is not None:
                    _save_npy(save_embeddings, spec.name, emb.unnormalised)
                results.append((spec, pairs.source, result))

        if roc is not None:
            write_roc(roc, [(spec.name, result) for spec, _, result in results])
        if as_json:
            doc = {"format": JSON_FORMAT, "model": model_info,
                   "sets": [dict(name=spec.name, source=source, **result.as_dict())
                            for spec, source, result in results]}
            typer.echo(json.dumps(doc, indent=2))
        else:
            for spec, source, result in results:
                console.print(result_table(spec.name, source, result))
            if roc is not None:
                console.print(f"ROC curves written to {roc}")

    @bench.command("verify")
    def bench_verify_cmd(
        net: str = typer.Option("mobilefacenet", "--net", help="Backbone name."),
        images: int = typer.Option(256, "--images", min=1, help="Images per measurement."),
        batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda[:i] or npu[:i]."),
        repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per variant (best is kept)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Embedding extraction images/s: variants against a no-flip fp32 baseline in the same run."""
        import torch

        from lresnet.core.device import resolve_device
        from lresnet.eval import extract_embeddings
        from lresnet.model import create_backbone

        dev = resolve_device(device)
        backbone = create_backbone(net)
        data = np.random.default_rng(0).integers(0, 256, (images, 112, 112, 3), dtype=np.uint8)
        variants = [
            ("baseline: no flip, fp32", dict(flip=False, amp_dtype=None, batch_size=batch_size), images),
            ("flip TTA, fp32", dict(flip=True, amp_dtype=None, batch_size=batch_size), images),
            ("no flip, bf16 autocast", dict(flip=False, amp_dtype="bf16", batch_size=batch_size), images),
            ("no flip, batch size 1 loop", dict(flip=False, amp_dtype=None, batch_size=1),
             min(images, max(8, images // 8))),
        ]
        extract_embeddings(backbone, data[:batch_size], batch_size=batch_size, device=dev, flip=True)  # warm-up
        rows = []
        for label, kwargs, count in variants:
            best = math.inf
            for _ in range(repeats):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                start = time.perf_counter()
                extract_embeddings(backbone, data[:count], device=dev, **kwargs)
                best = min(best, time.perf_counter() - start)
            rows.append({"variant": label, "images": count, "seconds": best, "images_per_s": count / best})
        base = rows[0]["images_per_s"]
        for row in rows:
            row["ratio_to_baseline"] = row["images_per_s"] / base
        meta = {"net": net, "device": str(dev), "batch_size": batch_size, "threads": torch.get_num_threads()}
        if as_json:
            typer.echo(json.dumps({"format": "lresnet-bench-verify/1", **meta, "results": rows}, indent=2))
            return
        table = Table(title=f"embedding extraction, {net} on {dev} (batch {batch_size}, "
                            f"{torch.get_num_threads()} threads, best of {repeats})", title_justify="left")
        for col in ("variant", "images", "images/s", "x baseline"):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for row in rows:
            table.add_row(row["variant"], str(row["images"]), f"{row['images_per_s']:.1f}",
                          f"{row['ratio_to_baseline']:.2f}")
        Console().print(table)


def _save_npy(folder: Path, name: str, rows: np.ndarray) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{name}.npy", rows)
    except OSError as err:
        raise InputError(folder, f"cannot write embeddings: {err.strerror or err}") from None


def _check_folds(folds: int, num_pairs: int) -> int:
    if num_pairs < folds:
        raise InputError("--folds", f"{num_pairs} pairs cannot be split into {folds} folds")
    return folds
