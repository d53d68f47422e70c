"""``lresnet demo``: synthesize -> convert -> train a small backbone on CPU -> verify on unseen identities.

The synthetic identities carry identity in shape and layout, not colour, so the
demo's claim is relative: on the same held-out pairs it reports a raw-pixel
baseline (flattened normalised image + its flip, same 10-fold protocol), the
untrained network, and the trained network.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch

from lresnet.core.errors import InputError
from lresnet.core.files import make_out_dir
from lresnet.train.config import build_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """What the demo synthesizes and trains. The defaults aim at ~5 minutes on 2 CPU cores."""

    identities: int = 200
    images_per_id: int = 24
    pairs: int = 400
    sets: tuple[str, ...] = ("lfw", "agedb_30", "cfp_fp")
    # synth's pose/lighting/noise scale. Colours stay random per image at any difficulty, so raw
    # pixels stay near chance; 0.25 keeps the shapes learnable in a CPU budget of minutes.
    difficulty: float = 0.25
    net: str = "mobilefacenet"
    # a MobileFaceNet cut to ~17 MMAC (the paper's is ~230): fits minutes of CPU training
    net_options: dict[str, Any] = field(default_factory=lambda: {
        "bottlenecks": [[2, 32, 2, 2], [2, 64, 2, 2], [2, 64, 2, 2]], "stem_channels": 16, "head_channels": 128})
    embedding_size: int = 128
    batch_size: int = 64
    lr: float = 0.1
    head_s: float = 32.0
    head_m: float = 0.1  # a small margin: few classes and a few hundred steps
    minutes: float = 2.5  # training time budget; the step count is calibrated to fit it
    max_steps: int = 0  # > 0: exactly this many steps (no calibration)
    threads: int = 0  # 0: one per core, less one for the data loader process
    seed: int = 0

    def __post_init__(self) -> None:
        for flag, value, ok, expected in (
                ("--identities", self.identities, self.identities >= 2, "at least 2"),
                ("--minutes", self.minutes, math.isfinite(self.minutes) and self.minutes > 0, "a positive number"),
                ("--seed", self.seed, self.seed >= 0, "a non-negative integer")):
            if not ok:
                raise InputError(flag, f"got {value}, expected {expected}")

    def replace(self, **changes: Any) -> "DemoSettings":
        return dataclasses.replace(self, **changes)


MARKER = ".lresnet-demo"  # in each folder the demo made: only those it replaces on the next run
PARTS = ("faces", "shards", "run")


def claim_work_dir(work: Path) -> None:
    """Clear the demo's folders under `work` for a fresh run, and mark them as the demo's.

    Raises:
        InputError: `work` is a file or cannot be made, or one of ``faces``, ``shards``, ``run`` exists
            without the demo's mark (the user's own data: never deleted).
    """
    make_out_dir(work)
    for part in PARTS:
        folder = work / part
        if folder.exists() and not (folder / MARKER).is_file():
            raise InputError(folder, f"exists and was not made by lresnet demo, which replaces {', '.join(PARTS)} "
                                     "under --out; choose another --out")
    for part in PARTS:
        shutil.rmtree(work / part, ignore_errors=True)
        make_out_dir(work / part)
        (work / part / MARKER).write_text("made by lresnet demo; replaced by its next run\n", encoding="utf-8")


def raw_pixel_embeddings(images: np.ndarray) -> np.ndarray:
    """The baseline's 'embedding': the normalised image flattened, plus its horizontal flip, L2-normalised."""
    x = (images.astype(np.float32) - 127.5) / 127.5
    emb = x.reshape(len(x), -1) + x[:, :, ::-1, :].reshape(len(x), -1)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def _cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _calibrate_steps(cfg, budget_s: float, num_classes: int, probe_steps: int = 4) -> int:
    """How many training steps fit in `budget_s`, from timing a few steps of the same model and batch."""
    from lresnet.model import create_backbone
    from lresnet.model.partial_fc import create_head

    net = create_backbone(cfg.model.net, embedding_size=cfg.model.embedding_size, **cfg.model.options)
    head = create_head(cfg.head.name, cfg.model.embedding_size, num_classes, s=cfg.head.s, m=cfg.head.m)
    opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.0, momentum=0.9)
    x = torch.randn(cfg.data.batch_size, 3, 112, 112)
    y = torch.randint(0, num_classes, (cfg.data.batch_size,))
    times = []
    for _ in range(probe_steps + 1):
        t0 = time.perf_counter()
        head(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times[1:])) * 1.1  # + data loading and logging
    return max(300, int(budget_s / step_s))  # fewer steps do not reliably reach 0.95 on unseen identities


def run_demo(work_dir: Union[str, Path], settings: DemoSettings = DemoSettings(),
             say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Run the whole demo in `work_dir`; returns the per-set table and timings (JSON-able)."""
    from lresnet.eval import evaluate, load_pair_set, verify_backbone
    from lresnet.model import create_backbone
    from lresnet.convert.synthetic import synthetic_shards
    from lresnet.train.loop import train

    t_start = time.perf_counter()
    work = Path(work_dir)
    claim_work_dir(work)
    threads = settings.threads or max(1, _cores() - 1)
    torch.set_num_threads(threads)

    say(f"synthesizing {settings.identities} identities x {settings.images_per_id} images "
        f"+ {settings.pairs} pairs per set ({', '.join(settings.sets)}) from held-out identities, "
        "then converting them to shards")
    summary = synthetic_shards(work, identities=settings.identities, images_per_id=settings.images_per_id,
                               pairs=settings.pairs, sets=settings.sets, seed=settings.seed, shard_size=1000,
                               difficulty=settings.difficulty)
    val_dir = work / "shards" / "val"
    pair_sets = [load_pair_set(name, data_dir=val_dir) for name in settings.sets]

    run_dir = work / "run"
    values = {
        "out": str(run_dir), "seed": settings.seed, "threads": threads,
        "model": {"net": settings.net, "embedding_size": settings.embedding_size, "options": settings.net_options},
        "head": {"name": "arcface", "s": settings.head_s, "m": settings.head_m},
        "data": {"shards": str(work / "shards" / "train"), "batch_size": settings.batch_size,
                 "workers": 1, "shuffle_buffer": 1000},
        "optim": {"lr": settings.lr},
        "schedule": {"kind": "cosine", "warmup_epochs": 0.0, "max_steps": max(1, settings.max_steps)},
        "checkpoint": {"every": 0, "keep_last": 1, "resume": False},
        "log": {"every": 10, "tensorboard": False},
    }
    cfg = build_config(values)
    steps = settings.max_steps or _calibrate_steps(cfg, settings.minutes * 60.0, summary.num_classes)
    cfg = build_config({**values, "schedule": {**values["schedule"], "max_steps": steps}})

    torch.manual_seed(settings.seed)
    untrained = create_backbone(cfg.model.net, embedding_size=cfg.model.embedding_size, **cfg.model.options)

    say(f"training {cfg.model.net} for {steps} steps of {cfg.data.batch_size} images "
        f"(~{settings.minutes:g} min budget, {threads} threads)")
    t_train = time.perf_counter()
    tenths = [0]

    def report(record: dict[str, Any]) -> None:  # about every tenth of the run
        if record["step"] * 10 // steps > tenths[0]:
            tenths[0] = record["step"] * 10 // steps
            say(f"step {record['step']}/{steps}  loss {record['loss']:.3f}  {record['images_per_s']:.0f} img/s")

    result = train(cfg, progress=report)
    train_seconds = time.perf_counter() - t_train

    from lresnet.train.checkpoint import load_checkpoint

    trained = create_backbone(cfg.model.net, embedding_size=cfg.model.embedding_size, **cfg.model.options)
    trained.load_state_dict(load_checkpoint(run_dir / f"ckpt-{steps:08d}.pt")["backbone"])

    say("verifying on held-out identities")
    rows: dict[str, dict[str, float]] = {}
    for ps in pair_sets:
        raw = evaluate(raw_pixel_embeddings(ps.images), ps.issame).accuracy
        untrained.eval()
        trained.eval()
        before = verify_backbone(untrained, ps, batch_size=128, device="cpu").accuracy
        after = verify_backbone(trained, ps, batch_size=128, device="cpu").accuracy
        rows[ps.name] = {"raw_pixels": raw, "untrained": before, "trained": after,
                         "error_ratio": (1.0 - raw) / max(1.0 - after, 1e-9)}
    return {
        "sets": rows, "steps": steps, "train_seconds": train_seconds, "images_per_s": result.images_per_s,
        "total_seconds": time.perf_counter() - t_start, "final_loss": result.final_loss,
        "settings": dataclasses.asdict(settings), "run_dir": str(run_dir),
    }
