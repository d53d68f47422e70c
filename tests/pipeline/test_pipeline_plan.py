"""The epoch plan on counts alone: rank/worker split, equal batches, drops, epochs."""

from __future__ import annotations

import pytest

from lresnet.pipeline.plan import batches_per_rank, epoch_sequence, worker_plan
from lresnet.pipeline.world import World

COUNTS = [53, 17, 91, 40, 77, 29, 64]  # 7 shards of different sizes, 371 samples
BATCH = 8


def _samples(plan):
    return [(seg.shard, i) for seg in plan.segments for i in range(seg.start, seg.stop)]


def _rank_samples(counts, world, epoch, roles, batch=BATCH):
    out = []
    for role in range(roles):
        plan = worker_plan(counts, batch, world, 0, epoch, role, roles)
        assert len(_samples(plan)) == plan.num_batches * batch
        out += _samples(plan)
    return out


@pytest.mark.parametrize("roles", [1, 2, 3])
def test_three_ranks_uneven_shards_disjoint_equal_and_nearly_complete(roles):
    world_size = 3
    per_rank = batches_per_rank(COUNTS, BATCH, world_size)
    assert per_rank == 15  # 371 // 3 = 123 samples, 15 batches of 8
    everything = set()
    for rank in range(world_size):
        got = _rank_samples(COUNTS, World(rank, world_size), 0, roles)
        assert len(got) == per_rank * BATCH  # the same number of batches on every rank
        assert len(set(got)) == len(got)
        assert not everything & set(got)  # no sample on two ranks
        everything |= set(got)
    universe = {(s, i) for s, n in enumerate(COUNTS) for i in range(n)}
    assert everything <= universe
    assert len(universe - everything) < world_size * BATCH


def test_worker_roles_share_out_the_rank_batches():
    world = World(1, 3)
    plans = [worker_plan(COUNTS, BATCH, world, 0, 0, role, 4) for role in range(4)]
    assert [p.num_batches for p in plans] == [4, 4, 4, 3]  # batches 0..14 dealt round-robin
    assert sorted(x for p in plans for x in _samples(p)) == sorted(_rank_samples(COUNTS, world, 0, 1))


def test_resume_skips_exactly_the_consumed_batches_per_role():
    plans = [worker_plan(COUNTS, BATCH, World(0, 3), 0, 0, role, 2, start_batch=5) for role in range(2)]
    assert [(p.num_batches, p.skip_batches) for p in plans] == [(8, 3), (7, 2)]  # 0,2,4 and 1,3 consumed


def test_each_epoch_has_a_new_order_and_drops_different_samples():
    world = World(0, 3)
    orders = {tuple(epoch_sequence(COUNTS, 0, e)[0]) for e in range(6)}
    assert len(orders) > 1
    first = {e: _rank_samples(COUNTS, world, e, 1) for e in range(4)}
    assert len({tuple(v) for v in first.values()}) == 4
    dropped = []
    for e in range(4):
        used = set()
        for rank in range(3):
            used |= set(_rank_samples(COUNTS, World(rank, 3), e, 1))
        dropped.append(frozenset((s, i) for s, n in enumerate(COUNTS) for i in range(n)) - used)
    assert len(set(dropped)) == 4
    assert worker_plan(COUNTS, BATCH, world, 0, 2, 0, 1) == worker_plan(COUNTS, BATCH, world, 0, 2, 0, 1)


def test_at_most_one_percent_left_out_at_scale():
    counts = [10000] * 57 + [3173]  # a faces_emore-sized tail: 573,173 samples
    for world_size in (1, 3, 8):
        used = batches_per_rank(counts, 128, world_size) * 128 * world_size
        assert sum(counts) - used < world_size * 128 <= 0.01 * sum(counts)


def test_single_shard_still_changes_what_is_dropped():
    firsts = {worker_plan([100], 8, World(0, 1), 0, e, 0, 1).segments[0].start for e in range(5)}
    assert len(firsts) > 1


def test_world_from_env_and_validation(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert World.from_env() == World(2, 4)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert World.from_env() == World(0, 1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        World(2, 2)


def test_the_seed_changes_the_plan_and_the_same_seed_repeats_it():
    world = World(1, 3)
    for epoch in range(3):
        assert epoch_sequence(COUNTS, 7, epoch) == epoch_sequence(COUNTS, 7, epoch)
        assert epoch_sequence(COUNTS, 7, epoch) != epoch_sequence(COUNTS, 8, epoch)
        plans = {seed: [worker_plan(COUNTS, BATCH, world, seed, epoch, role, 2) for role in range(2)] for seed in (7, 8)}
        assert plans[7] == [worker_plan(COUNTS, BATCH, world, 7, epoch, role, 2) for role in range(2)]
        assert plans[7] != plans[8]
        assert {x for p in plans[7] for x in _samples(p)} != {x for p in plans[8] for x in _samples(p)}
    orders = {tuple(epoch_sequence(COUNTS, seed, 0)[0]) for seed in range(8)}
    assert len(orders) > 4  # the shard order itself follows the seed, not only the offset
