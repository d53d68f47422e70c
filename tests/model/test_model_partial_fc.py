"""PartialFC: shard split, sampling, single-process equivalence, and 2-rank gloo runs against a full softmax.

The distributed tests start one Python process per rank; each loads this file by path and runs a
``_worker_*`` function, so the workers need nothing importable beyond lresnet. Everything runs in float64
so the sharded results can be compared with the single-process reference at ~1e-10.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lresnet.model.heads import ArcFace, CombinedMargin, CosFace, FCHead
from lresnet.model.partial_fc import PartialFC, create_head, shard_range

D = 8


def reference_loss(embeddings, centres, labels, margin) -> torch.Tensor:
    """Full softmax with margin over ``centres`` in float64, mean over rows with label != -1 (autograd-able)."""
    cosine = (F.normalize(embeddings, dim=1) @ F.normalize(centres, dim=1).t()).clamp(-1, 1)
    keep = labels != -1
    rows = keep.nonzero().squeeze(1)
    target = cosine[rows, labels[rows]]
    logits = (cosine * margin.s).index_put((rows, labels[rows]), margin.s * reference_target(target, margin))
    return F.cross_entropy(logits[keep], labels[keep])


def reference_target(c: torch.Tensor, margin) -> torch.Tensor:
    """The target logit / s, written from the papers' formulas (independent of lresnet's implementation)."""
    if isinstance(margin, CosFace):
        return c - margin.m
    if isinstance(margin, ArcFace):
        m1, m2, m3 = 1.0, margin.m, 0.0
    else:
        m1, m2, m3 = margin.m1, margin.m2, margin.m3
    main = torch.cos(m1 * torch.acos(c) + m2) - m3
    theta_max = (math.pi - m2) / m1
    if theta_max >= math.pi:
        return main
    return torch.where(c > math.cos(theta_max), main, c - (math.pi - theta_max) * math.sin(theta_max) - m3)


@pytest.mark.parametrize("num_classes, world_size", [(10, 1), (10, 3), (11, 2), (85742, 8), (7, 7)])
def test_shard_range_covers_all_classes_near_equally(num_classes, world_size):
    ranges = [shard_range(num_classes, r, world_size) for r in range(world_size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [end - start for start, end in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("margin", [ArcFace(), CosFace(), CombinedMargin(m1=1.2, m2=0.3, m3=0.1)], ids=repr)
def test_single_rank_partial_fc_equals_fc_head(margin):
    torch.manual_seed(0)
    fc = FCHead(margin, D, 13)
    pfc = PartialFC(margin, D, 13)
    pfc.load_full_state_dict(fc.full_state_dict())
    embeddings = torch.randn(9, D)
    labels = torch.tensor([0, 12, -1, 5, 5, 7, 1, -1, 3])
    e1, e2 = embeddings.clone().requires_grad_(), embeddings.clone().requires_grad_()
    loss_fc, loss_pfc = fc(e1, labels), pfc(e2, labels)
    loss_fc.backward()
    loss_pfc.backward()
    torch.testing.assert_close(loss_pfc, loss_fc, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e2.grad, e1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pfc.weight.grad, fc.weight.grad, rtol=1e-5, atol=1e-7)


def test_distributed_cross_entropy_gradients_are_exact():
    torch.manual_seed(1)
    head = PartialFC(ArcFace(s=16.0), D, 6).double()
    embeddings = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    weight = head.weight.detach().clone().requires_grad_()
    labels = torch.tensor([0, 5, -1, 2, 2, 1, 3])

    def loss(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(head, {"weight": w}, (e, labels))

    assert torch.autograd.gradcheck(loss, (embeddings, weight))
    reference = reference_loss(embeddings, weight, labels, head.margin)
    assert loss(embeddings, weight).item() == pytest.approx(reference.item(), abs=1e-12)


def test_all_rows_ignored_gives_zero_loss_and_gradient():
    head = PartialFC(CosFace(), D, 5)
    embeddings = torch.randn(3, D, requires_grad=True)
    loss = head(embeddings, torch.full((3,), -1))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(embeddings.grad) == 0 and torch.count_nonzero(head.weight.grad) == 0


def test_sampling_keeps_positives_count_and_remapping():
    head = PartialFC(ArcFace(), D, 40, sample_rate=0.3, rank=1, world_size=2)  # classes [20, 40), 20 local
    assert head.num_sample == 6
    labels = torch.tensor([21, 3, 39, -1, 21, 30, 0, 25])
    for seed in range(5):
        torch.manual_seed(seed)
        index, remapped = head.sample_centres(labels)
        assert index.numel() == 6 and torch.equal(index, index.sort().values)
        assert set((torch.tensor([21, 39, 30, 25]) - 20).tolist()) <= set(index.tolist())
        expected = [int((index == label - 20).nonzero()) if 20 <= label < 40 else -1 for label in labels.tolist()]
        assert remapped.tolist() == expected
    # more positives than ceil(rate * local): all positives, nothing else
    many = torch.arange(20, 40, 2)
    index, remapped = head.sample_centres(many)
    assert index.tolist() == list(range(0, 20, 2)) and remapped.tolist() == list(range(10))
    assert PartialFC(ArcFace(), D, 30, sample_rate=0.1).num_sample == 3  # no float-noise extra centre


def test_sampled_loss_is_full_softmax_over_the_sampled_centres():
    torch.manual_seed(2)
    head = PartialFC(ArcFace(s=32.0), D, 50, sample_rate=0.2).double()
    embeddings = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([4, 17, -1, 4, 33, 48])
    torch.manual_seed(7)
    index, remapped = head.sample_centres(labels)
    torch.manual_seed(7)  # forward draws the same sample
    loss = head(embeddings, labels)
    loss.backward()
    centres = head.weight.detach()[index].clone().requires_grad_()
    expected = reference_loss(embeddings.detach(), centres, remapped, head.margin)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    torch.testing.assert_close(head.weight.grad[index], centres.grad, rtol=0, atol=1e-12)
    unsampled = torch.ones(50, dtype=torch.bool)
    unsampled[index] = False
    assert torch.count_nonzero(head.weight.grad[unsampled]) == 0
    head.eval()  # no sampling outside training
    full = reference_loss(embeddings.detach(), head.weight.detach(), labels, head.margin)
    assert head(embeddings, labels).item() == pytest.approx(full.item(), abs=1e-12)


def test_state_dict_reshards_for_any_rank_without_a_process_group():
    torch.manual_seed(3)
    full = {"weight": torch.randn(11, D)}
    one = PartialFC(CosFace(), D, 11)
    one.load_full_state_dict(full)
    assert torch.equal(one.full_state_dict()["weight"], full["weight"])
    second = PartialFC(CosFace(), D, 11, rank=1, world_size=3)
    second.load_full_state_dict(full)
    assert torch.equal(second.weight.detach(), full["weight"][4:8])
    fc = FCHead(CosFace(), D, 11)
    fc.load_full_state_dict(one.full_state_dict())
    assert torch.equal(fc.weight.detach(), full["weight"])
    with pytest.raises(ValueError, match=r"expected \(11, 9\)"):
        PartialFC(CosFace(), 9, 11).load_full_state_dict(full)


def test_bad_configuration_and_missing_process_group():
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(ArcFace(), D, 10, sample_rate=0.0)
    with pytest.raises(ValueError, match="rank"):
        PartialFC(ArcFace(), D, 10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="num_classes must be >= world_size"):
        PartialFC(ArcFace(), D, 3, rank=0, world_size=4)
    with pytest.raises(RuntimeError, match="process group"):
        PartialFC(ArcFace(), D, 10, rank=0, world_size=2)(torch.randn(2, D), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="out of range"):
        PartialFC(ArcFace(), D, 10)(torch.randn(2, D), torch.tensor([0, 10]))
    assert isinstance(create_head("arcface", D, 10, world_size=2, rank=1), PartialFC)


# ---------------------------------------------------------------- distributed (2 gloo processes on CPU)

WORLD = 2
LOCAL_BATCH = 4

_BOOT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_pfc_test_worker', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "getattr(module, sys.argv[2])(int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])\n"
    "module._finish()\n"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(worker: str, workdir: Path, timeout: float = 60.0) -> list[dict]:
    """Run ``worker(rank, world_size, workdir)`` in WORLD processes; return what each saved to rank<r>.pt."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BOOT, __file__, worker, str(rank), str(WORLD), str(workdir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output}"
    return [torch.load(workdir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def _init(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _finish() -> None:
    """After the worker returned: free its modules and graphs, meet, then tear down. Gloo work still
    referenced at interpreter exit, or a peer leaving early, aborts a rank ("terminate called ...")."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _problem(workdir: Path, num_classes: int, labels: list[int]) -> dict:
    """Global inputs shared by the parent (reference) and the workers, written once by the parent."""
    gen = torch.Generator().manual_seed(11)
    problem = {
        "x": torch.randn(WORLD * LOCAL_BATCH, 16, generator=gen, dtype=torch.float64),
        "backbone_weight": torch.randn(D, 16, generator=gen, dtype=torch.float64) * 0.3,
        "centres": torch.randn(num_classes, D, generator=gen, dtype=torch.float64),
        "labels": torch.tensor(labels),
    }
    torch.save(problem, workdir / "problem.pt")
    return problem


def _worker_full_softmax(rank: int, world_size: int, workdir: str) -> None:
    """r = 1: loss, local embedding/centre gradients, and a DDP backbone (sum hook) gradient."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lresnet.model.partial_fc import sum_allreduce_hook

    _init(rank, world_size)
    problem = torch.load(Path(workdir) / "problem.pt", weights_only=True)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    num_classes = problem["centres"].shape[0]
    head = PartialFC(ArcFace(s=16.0), D, num_classes, rank=rank, world_size=world_size).double()
    head.load_full_state_dict({"weight": problem["centres"]})
    embeddings = (problem["x"][rows] @ problem["backbone_weight"].t()).requires_grad_()
    loss = head(embeddings, problem["labels"][rows])
    loss.backward()
    result = {"loss": loss.detach(), "embedding_grad": embeddings.grad, "centre_grad": head.weight.grad}

    backbone = torch.nn.Linear(16, D, bias=False).double()
    with torch.no_grad():
        backbone.weight.copy_(problem["backbone_weight"])
    ddp = DistributedDataParallel(backbone)
    ddp.register_comm_hook(None, sum_allreduce_hook)
    head.zero_grad()
    head(ddp(problem["x"][rows]), problem["labels"][rows]).backward()
    result["backbone_grad"] = backbone.weight.grad
    torch.save(result, Path(workdir) / f"rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_equal_single_process_full_softmax(tmp_path):
    labels = [0, 10, -1, 3, 7, 7, 5, 9]  # 11 classes: rank 0 holds [0, 6), rank 1 [6, 11)
    problem = _problem(tmp_path, num_classes=11, labels=labels)
    results = _run_ranks("_worker_full_softmax", tmp_path)

    backbone_weight = problem["backbone_weight"].clone().requires_grad_()
    embeddings = (problem["x"] @ backbone_weight.t()).detach().requires_grad_()
    centres = problem["centres"].clone().requires_grad_()
    loss = reference_loss(embeddings, centres, problem["labels"], ArcFace(s=16.0))
    loss.backward()
    backbone_grad = torch.autograd.grad(
        reference_loss(problem["x"] @ backbone_weight.t(), problem["centres"], problem["labels"], ArcFace(s=16.0)),
        backbone_weight,
    )[0]

    for rank, result in enumerate(results):
        assert result["loss"].item() == pytest.approx(loss.item(), abs=1e-12)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        torch.testing.assert_close(result["embedding_grad"], embeddings.grad[rows], rtol=0, atol=1e-12)
        start, end = shard_range(11, rank, WORLD)
        torch.testing.assert_close(result["centre_grad"], centres.grad[start:end], rtol=0, atol=1e-12)
        torch.testing.assert_close(result["backbone_grad"], backbone_grad, rtol=0, atol=1e-12)


def _worker_sampled_and_checkpoint(rank: int, world_size: int, workdir: str) -> None:
    """r < 1: sampled sets, loss and centre gradients; then one SGD step and a gathered checkpoint."""
    import torch.distributed as dist

    _init(rank, world_size)
    problem = torch.load(Path(workdir) / "problem.pt", weights_only=True)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    num_classes = problem["centres"].shape[0]
    head = PartialFC(CosFace(s=16.0, m=0.3), D, num_classes, 0.25, rank, world_size).double()
    head.load_full_state_dict({"weight": problem["centres"]})
    embeddings = problem["x"][rows] @ problem["backbone_weight"].t()
    labels = torch.cat([problem["labels"][r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH] for r in range(world_size)])
    torch.manual_seed(100 + rank)
    index, _ = head.sample_centres(labels)
    torch.manual_seed(100 + rank)  # forward draws the same sample
    loss = head(embeddings, problem["labels"][rows])
    loss.backward()
    result = {"loss": loss.detach(), "index": index + head.class_start, "centre_grad": head.weight.grad.clone()}

    torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4).step()
    result["local_after_step"] = head.weight.detach().clone()
    state = head.full_state_dict()  # a collective: every rank calls it, every rank gets the full matrix
    result["full"] = state["weight"]
    if rank == 0:
        torch.save(state, Path(workdir) / "checkpoint.pt")
    torch.save(result, Path(workdir) / f"rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_sampled_softmax_and_checkpoint_resume_on_one_rank(tmp_path):
    # 41 classes: rank 0 holds [0, 21) and samples max(6, positives); rank 1 holds [21, 41), samples 5.
    labels = [2, 26, -1, 30, 22, 23, 24, 25]  # rank 1 has 6 positives > 5, rank 0 has 1 positive
    problem = _problem(tmp_path, num_classes=41, labels=labels)
    results = _run_ranks("_worker_sampled_and_checkpoint", tmp_path)

    assert results[0]["index"].numel() == 6 and 2 in results[0]["index"].tolist()
    assert results[1]["index"].tolist() == [22, 23, 24, 25, 26, 30]  # all positives, nothing else
    sampled = torch.cat([r["index"] for r in results])
    remap = {int(c): i for i, c in enumerate(sampled)}
    remapped = torch.tensor([remap.get(label, -1) for label in labels])
    centres = problem["centres"][sampled].clone().requires_grad_()
    embeddings = problem["x"] @ problem["backbone_weight"].t()
    expected = reference_loss(embeddings, centres, remapped, CosFace(s=16.0, m=0.3))
    expected.backward()
    for rank, result in enumerate(results):
        assert result["loss"].item() == pytest.approx(expected.item(), abs=1e-12)
        start = shard_range(41, rank, WORLD)[0]
        grad = result["centre_grad"]
        local_index = result["index"] - start
        mine = slice(0, 6) if rank == 0 else slice(6, 12)
        torch.testing.assert_close(grad[local_index], centres.grad[mine], rtol=0, atol=1e-12)
        grad[local_index] = 0
        assert torch.count_nonzero(grad) == 0  # unsampled rows get no loss gradient

    after = torch.cat([r["local_after_step"] for r in results])
    assert not torch.equal(after, problem["centres"])
    assert torch.equal(results[0]["full"], after) and torch.equal(results[1]["full"], after)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    single = PartialFC(CosFace(s=16.0, m=0.3), D, 41).double()
    single.load_full_state_dict(checkpoint)
    assert torch.equal(single.weight.detach(), after)
    assert torch.equal(single.full_state_dict()["weight"], after)
