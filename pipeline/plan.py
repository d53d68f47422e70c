"""Who reads what in an epoch: pure functions of the shard counts, (seed, epoch), the world and the worker.

Every rank computes the same plan from the manifest counts, so no communication is needed:

1. the shards are put in a new order every epoch (seeded by seed and epoch) and their samples
   concatenated, starting at a seeded offset (so even a single shard drops different samples);
2. each rank takes the next `batches_per_rank * batch_size` samples of that sequence: the same
   number of batches on every rank, no sample twice, fewer than `world_size * batch_size`
   samples left out, a different set each epoch;
3. a rank's batches are dealt to its DataLoader workers in turn (batch j to worker role
   j % workers, matching the DataLoader's round-robin), each role reading one contiguous run of
   samples, so shards are read sequentially and mostly whole.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lresnet.pipeline.world import World


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of shard number `shard` (an index into the shard list)."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def batches_per_rank(counts: Sequence[int], batch_size: int, world_size: int) -> int:
    """Batches every rank yields per epoch."""
    return (sum(counts) // world_size) // batch_size


def epoch_sequence(counts: Sequence[int], seed: int, epoch: int) -> tuple[list[int], int]:
    """Shard order and starting offset (in samples) of the epoch's concatenated sample sequence."""
    rng = np.random.default_rng([seed, epoch, 0x5A4D])
    order = [int(i) for i in rng.permutation(len(counts))]
    total = sum(counts)
    start = int(rng.integers(total)) if total else 0
    return order, start


def _segments_of_range(counts: Sequence[int], order: Sequence[int], lo: int, hi: int) -> list[Segment]:
    """Segments covering positions [lo, hi) of the (unrotated) concatenation of shards in `order`."""
    ends = np.cumsum([counts[i] for i in order]).tolist()
    segments = []
    pos = lo
    while pos < hi:
        k = bisect.bisect_right(ends, pos)
        begin = ends[k] - counts[order[k]]
        stop = min(hi, ends[k])
        if stop > pos:
            segments.append(Segment(order[k], pos - begin, stop - begin))
        pos = stop
    return segments


def sequence_segments(counts: Sequence[int], seed: int, epoch: int, lo: int, hi: int) -> list[Segment]:
    """Segments holding positions [lo, hi) of the epoch's rotated sample sequence."""
    total = sum(counts)
    if hi <= lo or total == 0:
        return []
    order, offset = epoch_sequence(counts, seed, epoch)
    a, b = offset + lo, offset + hi
    if b <= total:
        return _segments_of_range(counts, order, a, b)
    if a >= total:
        return _segments_of_range(counts, order, a - total, b - total)
    return _segments_of_range(counts, order, a, total) + _segments_of_range(counts, order, 0, b - total)


def role_batches(num_batches: int, role: int, roles: int) -> int:
    """How many of batches 0..num_batches-1 fall to `role` when dealt in turn to `roles` workers."""
    return len(range(role, num_batches, roles))


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker role reads and yields in an epoch."""

    segments: list[Segment]
    num_batches: int  # batches this role yields in the whole epoch
    skip_batches: int  # of which already consumed before a resume


def worker_plan(counts: Sequence[int], batch_size: int, world: World, seed: int, epoch: int,
                role: int, roles: int, start_batch: int = 0) -> WorkerPlan:
    """The plan for worker role `role` of `roles` on `world.rank` in `epoch`.

    `start_batch` is the number of batches of this epoch already consumed (resume); those batches
    are still planned (the shuffle buffer must see the same samples) and marked to be skipped.
    """
    per_rank = batches_per_rank(counts, batch_size, world.world_size)
    rank_lo = world.rank * per_rank * batch_size
    first = sum(role_batches(per_rank, r, roles) for r in range(role))
    mine = role_batches(per_rank, role, roles)
    lo = rank_lo + first * batch_size
    segments = sequence_segments(counts, seed, epoch, lo, lo + mine * batch_size)
    return WorkerPlan(segments, mine, role_batches(min(start_batch, per_rank), role, roles))
