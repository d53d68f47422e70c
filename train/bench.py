"""``lresnet bench train``: train-step throughput with the real shard pipeline vs the in-memory source.

Every source uses the same model, batch and device, in the same process, one after the
other; the first log window (warm-up, worker start, torch.compile) is left out. Reported per
source: images/s end to end, images/s of the step alone (the reference's way: wall time minus
time waiting for data), the fraction of time spent waiting, and the peak memory of the run
(``max_memory_allocated`` on CUDA and NPU; on the CPU the peak RSS of this process so far,
which cannot be reset between runs).

The shard source reads with the chosen loader and decoder (``--loader dali``, ``--decoder
nvjpeg``); the memory source replays a few real batches decoded once on the CPU, so it is the
step's speed with the input pipeline taken away, whatever the decoder.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from lresnet.core.errors import InputError
from lresnet.core.files import make_out_dir
from lresnet.train.config import build_config, replace

log = logging.getLogger(__name__)

SOURCES = ("shards", "memory", "synthetic")
MARKER = ".lresnet-bench-train"  # in each folder the benchmark made: only those it replaces


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


def fresh_dir(path: Path) -> Path:
    """An empty folder at `path` for this benchmark, replacing one it made earlier.

    Raises:
        InputError: `path` exists and was not made by this benchmark (never deleted), or cannot be made.
    """
    if path.exists() and not (path / MARKER).is_file():
        raise InputError(path, "exists and was not made by lresnet bench train, which replaces its own "
                               "folders under --work; choose another --work")
    shutil.rmtree(path, ignore_errors=True)
    make_out_dir(path)
    (path / MARKER).write_text("made by lresnet bench train; replaced by its next run\n", encoding="utf-8")
    return path


def make_bench_shards(work: Path, identities: int = 100, images_per_id: int = 20, shard_size: int = 500,
                      seed: int = 0) -> Path:
    """Synthesize and convert a training set under ``work/data`` (kept for later runs with the same
    sizes); returns its shard folder."""
    from lresnet.convert.synthetic import synthetic_shards

    root = work / "data"
    train_dir = root / "shards" / "train"
    manifest = train_dir / "manifest.json"
    if manifest.is_file() and (root / MARKER).is_file():
        made = json.loads(manifest.read_text(encoding="utf-8"))
        if (made.get("num_samples"), made.get("num_classes")) == (identities * images_per_id, identities):
            return train_dir
    fresh_dir(root)
    synthetic_shards(root, identities=identities, images_per_id=images_per_id, seed=seed, shard_size=shard_size)
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


def reset_peak_memory(device: Any) -> None:
    """Start a new peak for :func:`peak_memory` (accelerators; the CPU's peak RSS cannot be reset)."""
    import torch

    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "reset_peak_memory_stats"):
        backend.reset_peak_memory_stats(device)


def peak_memory(device: Any) -> tuple[int, str]:
    """``(bytes, what)``: the device allocator's peak on CUDA/NPU, else this process's peak RSS."""
    import torch

    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "max_memory_allocated"):
        return int(backend.max_memory_allocated(device)), f"{device.type} max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "peak RSS of the process"


def source_label(source: str, workers: int, decoder: Optional[str] = None, loader: Optional[str] = None) -> str:
    """How a source is named in the report: ``shards (nvjpeg, 8 workers)``, ``real batches from memory``."""
    if source == "shards":
        parts = [f"{loader} loader"] if loader and loader != "native" else []
        parts += [decoder] if decoder and decoder != "simplejpeg" else []
        return f"shards ({', '.join(parts + [f'{workers} workers'])})"
    return {"memory": "real batches from memory", "synthetic": "SyntheticSource (random pixels)"}[source]


def bench_train(work_dir: Union[str, Path], shards: Optional[str] = None, net: str = "mobilefacenet",
                net_options: Optional[dict[str, Any]] = None, batch_size: int = 64, steps: int = 30,
                workers: int = 2, device: str = "cpu", amp_dtype: Optional[str] = None,
                log_every: int = 5, threads: int = 0, rounds: int = 2, decoder: Optional[str] = None,
                loader: Optional[str] = None, compile: bool = False,
                sources: Sequence[str] = SOURCES) -> list[dict[str, Any]]:
    """Train `steps` steps from each source, `rounds` times in turn; report each source's best round.

    Sources (in the order given): ``shards``, the real shard pipeline (`shards`, made here when
    None) read with `loader` and `decoder` (None: the config's defaults); ``memory``, the same
    real batches replayed from memory (:class:`ReplayBatches`); ``synthetic``, lresnet.pipeline's
    SyntheticSource. `compile` runs the backbone under torch.compile.

    Returns one row per source: ``source, images_per_s, images_per_s_step, data_wait,
    ratio_to_memory`` (end-to-end images/s over the replayed batches', None when they were not
    measured), ``peak_memory_bytes, peak_memory`` (what was measured) and the settings of the run.

    Raises:
        InputError: a bad setting or source, a decoder or loader that cannot run here.
    """
    from lresnet.core.device import resolve_device
    from lresnet.pipeline import PipelineConfig, World, build_train_loader
    from lresnet.train.loop import train

    if steps < 2 * log_every:
        raise InputError("--steps", f"got {steps}, expected >= {2 * log_every} (two log windows of {log_every})")
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise InputError("--source", f"got {list(sources)}, expected some of {', '.join(SOURCES)}")
    dev = resolve_device(device)
    work = make_out_dir(Path(work_dir))
    shard_source = shards or str(make_bench_shards(work))
    data = {"batch_size": batch_size, "workers": workers}
    reading = {**({"decoder": decoder} if decoder else {}), **({"loader": loader} if loader else {})}
    settings = {"net": net, "batch_size": batch_size, "steps": steps, "device": str(dev), "amp_dtype": amp_dtype,
                "compile": compile, "workers": workers, "decoder": decoder, "loader": loader}
    labels = {source: source_label(source, workers, decoder, loader) for source in sources}
    best: dict[str, dict[str, Any]] = {}
    for round_ in range(rounds):  # interleaved rounds; the best of each source (the machine is noisy)
        for source in sources:
            run_dir = fresh_dir(work / f"run-{source}")
            cfg = build_config({
                "out": str(run_dir), "threads": threads,
                "model": {"net": net, "options": net_options or {}, "compile": compile},
                # the replayed batches are decoded already: the decoder and loader are the shard source's
                "data": {**data, **(reading if source == "shards" else {}),
                         "shards": shard_source if source != "synthetic" else "synthetic"},
                "schedule": {"kind": "constant", "max_steps": steps},
                "amp": {"enabled": amp_dtype is not None, "dtype": amp_dtype or "bf16"},
                "dist": {"device": dev.type, "device_id": dev.index if dev.index is not None else -1},
                "checkpoint": {"every": 0, "resume": False},
                "log": {"every": log_every, "tensorboard": False},
            })
            replay = None
            if source != "shards":  # CPU-decoded batches: for replaying, or for the class count
                real = build_train_loader(shard_source, PipelineConfig(batch_size=batch_size, workers=0), World())
                if source == "synthetic":
                    cfg = replace(cfg, data={"synthetic_classes": real.num_classes})
                else:
                    replay = ReplayBatches(real, steps)
            reset_peak_memory(dev)
            train(cfg, loader=replay)
            peak, peak_what = peak_memory(dev)
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            row = summarize_windows([r for r in records if "images_per_s" in r], batch_size)
            log.info("round %d, %s: %.1f images/s end to end, %.1f step only, %.1f%% waiting for data, "
                     "peak memory %.1f MiB", round_ + 1, labels[source], row["images_per_s"],
                     row["images_per_s_step"], 100 * row["data_wait"], peak / 2**20)
            row.update(peak_memory_bytes=peak, peak_memory=peak_what)
            if source not in best or row["images_per_s"] > best[source]["images_per_s"]:
                best[source] = row
    memory = best["memory"]["images_per_s"] if "memory" in best else None
    return [{"source": labels[s], **best[s], "ratio_to_memory": best[s]["images_per_s"] / memory if memory else None,
             **settings} for s in sources]
