"""`lresnet bench pipeline`: input throughput against the decode limit and the usual map-style Dataset.

All rates are images/s per worker process, measured in one run over the same synthetic shards:
(a) simplejpeg decoding the same JPEG bytes from memory in a loop (the limit of any JPEG input path),
(b) this pipeline from the shards (in-process, one worker, two workers),
(c) the common peer approach: a map-style Dataset doing PIL decode + per-sample flip / ToTensor /
    Normalize, batched by a DataLoader (transforms written out with PIL + numpy + torch),
(d) when NVIDIA DALI is installed, `--loader dali` on the CPU (one DALI thread, in-process) over the
    same shards, compared per CPU-second with (b) in-process: DALI's CPU path against lresnet's own.
"""

from __future__ import annotations

import io
import random
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lresnet.convert.shards import read_samples
from lresnet.pipeline.config import PipelineConfig
from lresnet.pipeline.loader import build_train_loader
from lresnet.pipeline.shards import resolve_source
from lresnet.pipeline.stages import open_shard

@dataclass(frozen=True)
class BenchResult:
    """One measured configuration.

    `rate` is images/s of wall-clock time per worker process; `cpu_rate` is images per CPU-second
    of the processes doing the work (the loop itself in-process, the DataLoader workers otherwise),
    which a shared, loaded machine disturbs far less than the wall clock.
    """

    name: str
    images: int
    seconds: float
    processes: int
    cpu_images: int
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds / self.processes if self.seconds > 0 else 0.0

    @property
    def cpu_rate(self) -> float:
        return self.cpu_images / self.cpu_seconds if self.cpu_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        """The measured numbers and both rates."""
        return {"name": self.name, "images": self.images, "seconds": self.seconds, "processes": self.processes,
                "cpu_images": self.cpu_images, "cpu_seconds": self.cpu_seconds, "rate": self.rate,
                "cpu_rate": self.cpu_rate}


JSON_FORMAT = "lresnet-bench-pipeline/1"


NATIVE_IN_PROCESS = "(b) pipeline from shards, in-process"
DALI_CPU = "(d) DALI CPU pipeline, 1 thread, in-process"


def bench_report(results: list[BenchResult], images: int, batch_size: int, rounds: int) -> dict:
    """``lresnet bench pipeline``'s ``--json`` document: every result with its ratios to the decode
    limit (a) and to the map-style Dataset (c), wall clock and CPU time; with a DALI row (d), also
    ``dali_vs_native``: its images per CPU-second over lresnet's in-process loader's (b)."""
    limit = next(r for r in results if r.name.startswith("(a)"))
    peer = next(r for r in results if r.name.startswith("(c)"))
    rows = [dict(r.as_dict(), rate_vs_limit=r.rate / limit.rate, rate_vs_peer=r.rate / peer.rate,
                 cpu_rate_vs_limit=r.cpu_rate / limit.cpu_rate, cpu_rate_vs_peer=r.cpu_rate / peer.cpu_rate)
            for r in results]
    report = {"format": JSON_FORMAT, "images": images, "batch_size": batch_size, "rounds": rounds, "results": rows}
    dali = next((r for r in results if r.name == DALI_CPU), None)
    native = next((r for r in results if r.name == NATIVE_IN_PROCESS), None)
    if dali is not None and native is not None:
        report["dali_vs_native"] = dali.cpu_rate / native.cpu_rate
    return report


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def make_bench_shards(work_dir: Path, images: int, seed: int = 0, shard_size: int = 2000,
                      progress: Optional[Callable[[str, int, int], None]] = None) -> Path:
    """Synthetic faces_emore (the project's writer) converted to shards; returns the shard folder."""
    from lresnet.convert.synthetic import synthetic_shards

    per_id = 20
    identities = max(1, -(-images // per_id))
    synthetic_shards(work_dir, identities=identities, images_per_id=per_id, seed=seed, shard_size=shard_size,
                     progress=progress)
    return work_dir / "shards"


def load_jpegs(shard_dir: Path) -> tuple[list[bytes], list[int]]:
    """Every JPEG and label of the shards, in memory."""
    shards = resolve_source(shard_dir)
    jpegs, labels = [], []
    for url in shards.urls:
        with open_shard(url) as stream:
            for _, parts in read_samples(stream):
                jpegs.append(parts["jpg"])
                labels.append(int(parts["cls"]))
    return jpegs, labels


def bench_decode(jpegs: list[bytes]) -> BenchResult:
    """(a) simplejpeg over bytes in memory: the limit."""
    import simplejpeg

    decode = simplejpeg.decode_jpeg
    start, cpu = time.perf_counter(), time.process_time()
    for data in jpegs:
        decode(data, colorspace="RGB")
    cpu = time.process_time() - cpu
    return BenchResult("(a) simplejpeg decode loop, bytes in memory", len(jpegs), time.perf_counter() - start, 1,
                       len(jpegs), cpu)


def _time_batches(name: str, batches: Iterable, workers: int) -> BenchResult:
    """Wall time from the first batch to the last (worker start-up is not throughput); CPU time of the
    whole run in the workers (joined at the end, so counted as children) or in this process."""
    cpu_children, cpu_self = _children_cpu(), time.process_time()
    it = iter(batches)
    first = len(next(it)[0])
    start = time.perf_counter()
    count = 0
    for images, _ in it:
        count += len(images)
    seconds = time.perf_counter() - start
    del it  # joins the DataLoader workers, so their CPU time is counted
    cpu = _children_cpu() - cpu_children if workers else time.process_time() - cpu_self
    return BenchResult(name, count, seconds, max(1, workers), count + first, cpu)


def bench_pipeline(shard_dir: Path, workers: int, batch_size: int = 128, shuffle: bool = True,
                   flip: bool = True) -> BenchResult:
    """(b) this pipeline over the shards (shuffle=False and flip=False show what those stages cost)."""
    config = PipelineConfig(batch_size=batch_size, workers=workers, pin_memory=False, flip=flip,
                            shuffle_buffer=1000 if shuffle else 0)
    loader = build_train_loader(shard_dir, config)
    label = "in-process" if workers == 0 else f"{workers} worker{'s' if workers > 1 else ''}"
    if not shuffle:
        label += ", no shuffle"
    if not flip:
        label += ", no flip"
    return _time_batches(f"(b) pipeline from shards, {label}", loader, workers)


def dali_available() -> bool:
    """True when NVIDIA DALI is installed (the (d) row is measured only then)."""
    from lresnet.pipeline.dali import dali_installed

    return dali_installed()


def bench_dali(shard_dir: Path, batch_size: int = 128) -> BenchResult:
    """(d) `--loader dali` on the CPU over the shards: shuffle + flip, one DALI thread, in this process."""
    config = PipelineConfig(batch_size=batch_size, workers=1, pin_memory=False, shuffle_buffer=1000, loader="dali")
    return _time_batches(DALI_CPU, build_train_loader(shard_dir, config), 0)


class PeerDataset(Dataset):
    """The usual map-style face dataset: PIL decode, then per-sample RandomHorizontalFlip, ToTensor, Normalize."""

    def __init__(self, jpegs: list[bytes], labels: list[int]):
        self.jpegs, self.labels = jpegs, labels

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image = Image.open(io.BytesIO(self.jpegs[index])).convert("RGB")
        if random.random() < 0.5:  # RandomHorizontalFlip
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255)  # ToTensor
        x = x.sub_(0.5).div_(0.5)  # Normalize(mean=0.5, std=0.5)
        return x, self.labels[index]


def bench_peer(jpegs: list[bytes], labels: list[int], workers: int = 1, batch_size: int = 128) -> BenchResult:
    """(c) the map-style Dataset + DataLoader baseline."""
    loader = DataLoader(PeerDataset(jpegs, labels), batch_size=batch_size, shuffle=True, num_workers=workers,
                        drop_last=True)
    return _time_batches(f"(c) map-style Dataset, PIL, {workers} worker", loader, workers)


def run_bench(images: int = 20000, work_dir: Optional[Path] = None, batch_size: int = 128, rounds: int = 3,
              progress: Optional[Callable[[str, int, int], None]] = None) -> list[BenchResult]:
    """Make the data, then measure every configuration `rounds` times, interleaved; keep each one's best
    wall-clock rate and best CPU rate.

    Best-of-rounds, interleaved, because the machine is shared: a burst of load from elsewhere then
    hits one round of every configuration rather than all rounds of one.
    """
    import tempfile

    torch.set_num_threads(1)
    best: dict[str, BenchResult] = {}
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lresnet-bench-", dir=work_dir) as tmp:
        shard_dir = make_bench_shards(Path(tmp), images, progress=progress)
        jpegs, labels = load_jpegs(shard_dir)
        runs: list[Callable[[], BenchResult]] = [
            lambda: bench_decode(jpegs),
            lambda: bench_pipeline(shard_dir, 0, batch_size),
            lambda: bench_pipeline(shard_dir, 0, batch_size, shuffle=False, flip=False),
            lambda: bench_pipeline(shard_dir, 1, batch_size),
            lambda: bench_pipeline(shard_dir, 2, batch_size),
            lambda: bench_peer(jpegs, labels, 1, batch_size),
        ]
        if dali_available():
            runs.append(lambda: bench_dali(shard_dir, batch_size))
        total = rounds * len(runs)
        for r in range(rounds):
            for i, run in enumerate(runs):
                result = run()
                old = best.get(result.name)
                if old is not None:  # keep the best of each measure
                    wall = result if result.rate > old.rate else old
                    cpu = result if result.cpu_rate > old.cpu_rate else old
                    result = replace(wall, cpu_images=cpu.cpu_images, cpu_seconds=cpu.cpu_seconds)
                best[result.name] = result
                if progress is not None:
                    progress("measure", r * len(runs) + i + 1, total)
    return list(best.values())
