"""Under torchrun, both head layouts give the backbone exactly the gradient of the global batch.

The replicated head sits inside DDP with the backbone (each rank's loss scaled by the global count of
valid rows, then averaged); Partial FC is outside DDP and the backbone's gradients are summed. Either way two ranks with half the batch each must match
one process with the whole batch, so a run's behaviour (and its learning rate) does not depend on the
head layout or the number of ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lresnet.model.heads import ArcFace, FCHead

WORLD, LOCAL_BATCH, IN, D, C = 2, 4, 12, 8, 10


LABELS = {
    "all valid": [0, 9, 3, 1, 5, 5, 2, 7],
    # ignored rows (corrupt samples) fall unevenly: rank 0 keeps 1 row, rank 1 all 4; averaging the
    # ranks' own means would weight rank 0's one row like rank 1's four
    "uneven -1": [-1, 9, -1, -1, 5, 5, 2, 7],
    "one rank all -1": [-1, -1, -1, -1, 5, 0, 2, 7],
}


def _problem(case: str = "all valid") -> dict:
    gen = torch.Generator().manual_seed(5)
    return {"x": torch.randn(WORLD * LOCAL_BATCH, IN, generator=gen, dtype=torch.float64),
            "labels": torch.tensor(LABELS[case]),
            "weight": torch.randn(D, IN, generator=gen, dtype=torch.float64) * 0.3,
            "centres": torch.randn(C, D, generator=gen, dtype=torch.float64)}


def _backbone(problem: dict) -> torch.nn.Module:
    net = torch.nn.Linear(IN, D, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(problem["weight"])
    return net


def _rank_main(workdir: str, case: str) -> None:
    """Run by each torchrun rank: one backward through wrap_for_training, for both head layouts."""
    from lresnet.model.partial_fc import PartialFC
    from lresnet.train.config import DistConfig
    from lresnet.train.dist import setup_distributed, teardown_distributed, wrap_for_training

    ctx = setup_distributed(DistConfig(device="cpu"))
    rank = ctx.world.rank
    problem = _problem(case)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)

    def backbone_grad(layout: str) -> torch.Tensor:
        backbone = _backbone(problem)
        if layout == "sharded":
            head = PartialFC(ArcFace(s=16.0, m=0.3), D, C, rank=rank, world_size=WORLD).double()
        else:
            head = FCHead(ArcFace(s=16.0, m=0.3), D, C).double()
        head.load_full_state_dict({"weight": problem["centres"]})
        model = wrap_for_training(backbone, head, ctx, head_sharded=layout == "sharded")
        model(problem["x"][rows], problem["labels"][rows]).backward()
        return backbone.weight.grad.clone()

    grads = {layout: backbone_grad(layout) for layout in ("replicated", "sharded")}
    torch.save(grads, Path(workdir) / f"rank{rank}.pt")
    teardown_distributed(ctx)  # the DDP modules are unreferenced now; teardown collects them first


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(LABELS))
def test_two_ranks_give_the_backbone_the_global_batch_gradient(case, tmp_path):
    script = ("import importlib.util, sys\n"
              "spec = importlib.util.spec_from_file_location('_grad_test', sys.argv[1])\n"
              "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
              "module._rank_main(sys.argv[2], sys.argv[3])\n")
    boot = tmp_path / "boot.py"
    boot.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(WORLD), str(boot), __file__, str(tmp_path), case],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    problem = _problem(case)
    backbone = _backbone(problem)
    head = FCHead(ArcFace(s=16.0, m=0.3), D, C).double()
    head.load_full_state_dict({"weight": problem["centres"]})
    head(backbone(problem["x"]), problem["labels"]).backward()
    expected = backbone.weight.grad

    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for layout in ("replicated", "sharded"):
            torch.testing.assert_close(grads[layout], expected, rtol=0, atol=1e-12, msg=f"rank {rank} {layout}")
