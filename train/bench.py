"""``lresnet bench train``: train-step throughput with the real shard pipeline vs the in-memory source.

Both runs use the same model, batch and device, in the same process, one after
the other; the first log window (warm-up, worker start) is left out. Reported per
source: images/s end to end, images/s of the step alone (the reference's way:
wall time minus time waiting for data), and the fraction of time spent waiting.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from lresnet.train.config import build_config, replace

log = logging.getLogger(__name__)


def summarize_windows(records: list[dict[str, Any]], global_batch: int) -> dict[str, float]:
    """Throughput over the log windows after the first (warm-up) one: total images / total time.

    `records` are the loop's log records in step order; window i covers the steps since record i-1.
    """
    if len(records) < 2:
        raise ValueError("need at least two log windows (run more steps than two log intervals)")
    wall = step_only = 0.0
    images = 0
    for prev, rec in zip(records, records[1:]):
        n = (rec["step"] - prev["step"]) * global_batch
        images += n
        wall += n / rec["images_per_s"]
        step_only += n / rec["images_per_s_step"]
    return {"images_per_s": images / wall, "images_per_s_step": images / step_only,
            "data_wait": (wall - step_only) / wall}


def _make_shards(work: Path, seed: int = 0) -> Path:
    from lresnet.convert.synthetic import synthetic_shards

    train_dir = work / "shards" / "train"
    if (train_dir / "manifest.json").exists():  # made by an earlier run
        return train_dir
    for stale in (work / "faces", work / "shards"):
        shutil.rmtree(stale, ignore_errors=True)
    synthetic_shards(work, identities=100, images_per_id=20, seed=seed, shard_size=500)
    return train_dir


class ReplayBatches:
    """A few real batches decoded once, then cycled from memory: the input pipeline's cost taken
    away, the pixels kept (on CPU, kernel speed depends on the data: random pixels run slower)."""

    def __init__(self, loader: Any, steps: int, pool: int = 4):
        batches = iter(loader)
        self.batches = [next(batches) for _ in range(min(pool, len(loader)))]
        self.num_classes = loader.num_classes
        self.steps, self.epoch, self.position = steps, 0, 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if self.position >= self.steps:
            self.position = 0
        while self.position < self.steps:
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            yield batch


def bench_train(work_dir: Union[str, Path], shards: Optional[str] = None, net: str = "mobilefacenet",
                net_options: Optional[dict[str, Any]] = None, batch_size: int = 64, steps: int = 30,
                workers: int = 2, device: str = "cpu", amp_dtype: Optional[str] = None,
                log_every: int = 5, threads: int = 0, rounds: int = 2) -> list[dict[str, Any]]:
    """Train `steps` steps from each source, `rounds` times in turn; report each source's best round.

    Sources: the real shard pipeline (`shards`, made here when None), the same real batches
    replayed from memory (:class:`ReplayBatches`), and lresnet.pipeline's SyntheticSource.
    Returns one row per source: ``source, images_per_s, images_per_s_step, data_wait,
    ratio_to_memory`` (end-to-end images/s over the replayed real batches').
    """
    from lresnet.pipeline import PipelineConfig, World, build_train_loader
    from lresnet.train.loop import train

    if steps < 2 * log_every:
        raise ValueError(f"steps must be >= {2 * log_every} (two log windows), got {steps}")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    shard_source = shards or str(_make_shards(work))
    sources = {f"shards ({workers} workers)": shard_source, "real batches from memory": "memory",
               "SyntheticSource (random pixels)": "synthetic"}
    best: dict[str, dict[str, float]] = {}
    for round_ in range(rounds):  # interleaved rounds; the best of each source (the machine is noisy)
        for label, source in sources.items():
            run_dir = work / f"run-{source if source in ('memory', 'synthetic') else 'shards'}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = build_config({
                "out": str(run_dir), "threads": threads,
                "model": {"net": net, "options": net_options or {}},
                "data": {"shards": shard_source if source == "memory" else source, "batch_size": batch_size,
                         "workers": workers},
                "schedule": {"kind": "constant", "max_steps": steps},
                "amp": {"enabled": amp_dtype is not None, "dtype": amp_dtype or "bf16"},
                "dist": {"device": device},
                "checkpoint": {"every": 0, "resume": False},
                "log": {"every": log_every, "tensorboard": False},
            })
            real = build_train_loader(shard_source, PipelineConfig(batch_size=batch_size, workers=0), World())
            if source == "synthetic":
                cfg = replace(cfg, data={"synthetic_classes": real.num_classes})
            train(cfg, loader=ReplayBatches(real, steps) if source == "memory" else None)
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            row = summarize_windows([r for r in records if "images_per_s" in r], batch_size)
            log.info("round %d, %s: %.1f images/s end to end, %.1f step only, %.1f%% waiting for data",
                     round_ + 1, label, row["images_per_s"], row["images_per_s_step"], 100 * row["data_wait"])
            if label not in best or row["images_per_s"] > best[label]["images_per_s"]:
                best[label] = row
    memory = best["real batches from memory"]["images_per_s"]
    return [{"source": label, **best[label], "ratio_to_memory": best[label]["images_per_s"] / memory}
            for label in sources]
