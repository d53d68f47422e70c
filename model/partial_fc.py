"""Partial FC: margin softmax with class centres sharded across ranks (model parallel), and ``create_head``.

With ``world_size`` ranks, rank ``r`` holds the centres of classes ``[start_r, end_r)`` (a near-equal split,
see :func:`shard_range`). Every step, the local embeddings and labels of all ranks are all-gathered, each
rank computes the cosine logits of the whole global batch against its own centres, and a distributed
softmax cross-entropy (max all-reduce, sum-exp all-reduce, target-logit all-reduce) gives every rank the
same loss: the mean over the global batch, exactly what a single device holding all centres would compute.
Gradients are exact: each rank receives dL/d(its local embeddings) and dL/d(its centres).

With ``sample_rate < 1`` (training mode only), each rank keeps the centres of all classes present in the
global batch ("positives") plus random negatives, ``max(ceil(sample_rate * num_local), positives)`` centres
in all, and the loss is the softmax over that sampled set (Partial FC, An et al. 2022).

Training recipe (what the trainer does):

* Do **not** wrap PartialFC in DistributedDataParallel: its parameters are different on every rank (DDP would
  overwrite them with rank 0's shard and average unrelated classes). Wrap only the backbone.
* The loss is the same global-batch mean on every rank, and the all-gather hands each rank the exact gradient
  of its own embeddings, so the backbone's true gradient is the **sum** over ranks. DDP averages by default,
  which would scale the backbone gradient by ``1 / world_size`` (what arcface_torch effectively does);
  register :func:`sum_allreduce_hook` on the backbone's DDP to get exactly the single-device gradient:
  ``ddp.register_comm_hook(None, sum_allreduce_hook)``.
* Put ``head.weight`` in the optimizer (plain SGD with momentum and weight decay works). With sampling only
  the sampled rows receive a loss gradient (they are taken with an index_select of the full local shard);
  the other rows see only weight decay and their decaying momentum buffer, which is a deliberate, simple
  choice: no per-step optimizer-state surgery, and every optimizer works unchanged.
* Checkpoint with :meth:`PartialFC.full_state_dict` (a collective: call it on every rank; every rank gets
  the full ``{"weight": [num_classes, D]}`` on the CPU, so rank 0 can save it) and restore with
  :meth:`PartialFC.load_full_state_dict` on any number of ranks. Optimizer state of the centres (momentum)
  can be moved between world sizes the same way with :meth:`gather_shards` / :meth:`local_shard`.
* Every rank must pass the same local batch size. With fp16 and a GradScaler, keep the centres in the same
  optimizer as the backbone: a non-finite logit gradient reaches every rank's backbone gradient through the
  all-gather, so all ranks then skip the step together.
"""

# No `from __future__ import annotations` here: DDP checks sum_allreduce_hook's annotations at runtime.
import math

import torch
import torch.distributed as dist
from torch import nn

from lresnet.model.heads import (
    ArcFace,
    CombinedMargin,
    CosFace,
    FCHead,
    Margin,
    check_full_weight,
    check_labels,
    compute_dtype,
    normalized_cosine,
)

__all__ = ["PartialFC", "create_head", "shard_range", "sum_allreduce_hook", "HEAD_NAMES"]

HEAD_NAMES = ("arcface", "cosface", "combined")


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Classes ``[start, end)`` held by ``rank``: the first ``num_classes % world_size`` ranks hold one extra."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _AllGather(torch.autograd.Function):
    """All-gather of equal-shaped tensors along dim 0; backward sums the gradient over ranks, keeps our slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor)
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's graph holds the part of dL/d(global embeddings) that flows through its own centres;
        # the full gradient is their sum. (An all-reduce rather than reduce-scatter: gloo lacks the latter.)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType, world_size: int) -> None:
    if world_size > 1:
        dist.all_reduce(tensor, op=op)


class _DistSoftmaxCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy over classes split across ranks; every rank returns the same global-mean loss.

    ``logits [B, k]`` are this rank's columns; ``local_labels [B]`` the column of each row's class, or -1 when
    the class lives on another rank (or the row is ignored); ``valid [B]`` marks rows whose global label is
    not -1. The backward is local: ``(softmax - onehot) / num_valid`` for this rank's columns.
    """

    @staticmethod
    def forward(ctx, logits, local_labels, valid, world_size):
        with torch.no_grad():
            row_max = logits.max(dim=1).values
            _all_reduce(row_max, dist.ReduceOp.MAX, world_size)
            probs = (logits - row_max.unsqueeze(1)).exp_()
            sum_exp = probs.sum(dim=1)
            _all_reduce(sum_exp, dist.ReduceOp.SUM, world_size)
            here = local_labels >= 0
            cols = torch.where(here, local_labels, torch.zeros_like(local_labels)).unsqueeze(1)
            target = torch.where(here, logits.gather(1, cols).squeeze(1), torch.zeros_like(row_max))
            _all_reduce(target, dist.ReduceOp.SUM, world_size)
            per_row = sum_exp.log() + row_max - target  # = -log softmax(target), computed stably
            num_valid = valid.sum().clamp_min(1).to(logits.dtype)
            loss = torch.where(valid, per_row, torch.zeros_like(per_row)).sum() / num_valid
            probs.div_(sum_exp.unsqueeze(1))
        ctx.save_for_backward(probs, cols, here, valid, num_valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        probs, cols, here, valid, num_valid = ctx.saved_tensors
        grad = probs.clone()
        grad.scatter_add_(1, cols, -here.to(grad.dtype).unsqueeze(1))
        grad.mul_((valid.to(grad.dtype) * (grad_loss / num_valid)).unsqueeze(1))
        return grad, None, None, None


def sum_allreduce_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook that sums gradients over ranks instead of averaging them.

    Use on the backbone's DDP when the head is a :class:`PartialFC` with ``world_size > 1``:
    ``ddp.register_comm_hook(None, sum_allreduce_hook)`` (``state`` may be a process group; None = world).
    """
    group = state if state is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class PartialFC(nn.Module):
    """Margin softmax head with class centres sharded over ``world_size`` ranks (see the module docstring).

    Args:
        margin: an ArcFace, CosFace or CombinedMargin.
        embedding_size: D.
        num_classes: C, the total number of classes (over all ranks); needs ``C >= world_size``.
        sample_rate: fraction of this rank's centres used per training step, in (0, 1]; positives are always kept.
        rank, world_size: this process's place in the default process group (checked at the first forward).

    ``forward(local_embeddings [b, D], local_labels int64 [b]) -> loss``: every rank must pass the same ``b``.
    Labels must be -1 (ignored) or in ``[0, C)`` (ValueError otherwise). ``weight`` holds this rank's
    centres ``[end - start, D]``, initialised normal(0, 0.01). Works without a process group when
    ``world_size == 1``, where it equals :class:`FCHead` (with ``sample_rate == 1``).
    """

    def __init__(
        self,
        margin: Margin,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(margin, Margin):
            raise TypeError(f"margin must be an ArcFace, CosFace or CombinedMargin, got {type(margin).__name__}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_classes < world_size:
            raise ValueError(f"num_classes must be >= world_size, got {num_classes} classes on {world_size} ranks")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.margin = margin
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.rank = rank
        self.world_size = world_size
        self.class_start, self.class_end = shard_range(num_classes, rank, world_size)
        self.num_local = self.class_end - self.class_start
        # The small epsilon keeps float noise (0.1 * 30 = 3.0000000000000004) from adding a centre.
        self.num_sample = min(self.num_local, max(1, math.ceil(self.sample_rate * self.num_local - 1e-9)))
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_size))
        nn.init.normal_(self.weight, mean=0.0, std=0.01)
        self._world_checked = world_size == 1

    def _check_world(self) -> None:
        if self._world_checked:
            return
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"PartialFC(world_size={self.world_size}) needs an initialised torch.distributed process group"
            )
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(
                f"PartialFC was built for rank {self.rank} of {self.world_size}, but the process group says "
                f"rank {dist.get_rank()} of {dist.get_world_size()}"
            )
        self._world_checked = True

    def local_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Global labels -> index into this rank's shard, or -1 for classes held elsewhere and ignored rows."""
        here = (labels >= self.class_start) & (labels < self.class_end)
        return torch.where(here, labels - self.class_start, torch.full_like(labels, -1))

    def sample_centres(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose this rank's centres for one step from the *global* batch labels.

        Returns ``(index, remapped)``: ``index`` the sorted shard rows kept (all positives plus random
        negatives, ``max(num_sample, positives)`` of them; draws from torch's global RNG on the weight's
        device), and ``remapped`` each row's column in ``weight[index]``, or -1.
        """
        local = self.local_labels(labels)
        positives = torch.unique(local[local >= 0])
        count = max(self.num_sample, positives.numel())
        score = torch.rand(self.num_local, device=self.weight.device)
        score[positives] = 2.0  # above any uniform draw, so topk keeps every positive
        index = score.topk(count).indices.sort().values
        lookup = torch.full((self.num_local,), -1, dtype=torch.long, device=index.device)
        lookup[index] = torch.arange(count, device=index.device)
        remapped = torch.where(local >= 0, lookup[local.clamp_min(0)], torch.full_like(local, -1))
        return index, remapped

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Scalar loss, identical on every rank: the margin softmax over the global batch."""
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"expected embeddings [b, {self.embedding_size}], got {tuple(local_embeddings.shape)}"
            )
        if local_labels.shape != local_embeddings.shape[:1]:
            raise ValueError(
                f"expected labels [{local_embeddings.shape[0]}], got shape {tuple(local_labels.shape)}"
            )
        self._check_world()
        device = self.weight.device
        with torch.autocast(device_type=device.type, enabled=False):
            embeddings = local_embeddings.to(device=device, dtype=compute_dtype(local_embeddings.dtype))
            labels = local_labels.to(device=device, dtype=torch.long)
            if self.world_size > 1:
                embeddings = _AllGather.apply(embeddings, self.rank, self.world_size)
                parts = [torch.empty_like(labels) for _ in range(self.world_size)]
                dist.all_gather(parts, labels.contiguous())
                labels = torch.cat(parts)
            check_labels(labels, self.num_classes)
            if self.training and self.num_sample < self.num_local:
                index, targets = self.sample_centres(labels)
                centres = self.weight.index_select(0, index)
            else:
                targets, centres = self.local_labels(labels), self.weight
            logits = self.margin(normalized_cosine(embeddings, centres), targets)
            return _DistSoftmaxCrossEntropy.apply(logits, targets, labels != -1, self.world_size)

    def gather_shards(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``[num_local_r, ...]`` tensor into ``[num_classes, ...]`` (on every rank).

        A collective when ``world_size > 1``: call it on all ranks. Returns a detached copy on the input's device.
        """
        local = local.detach()
        if local.shape[0] != self.num_local:
            raise ValueError(f"expected {self.num_local} rows (this rank's shard), got {local.shape[0]}")
        if self.world_size == 1:
            return local.clone()
        self._check_world()
        rows = shard_range(self.num_classes, 0, self.world_size)[1]  # rank 0 holds the largest shard
        padded = local.new_zeros((rows, *local.shape[1:]))
        padded[: self.num_local] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        ranges = [shard_range(self.num_classes, r, self.world_size) for r in range(self.world_size)]
        return torch.cat([part[: end - start] for part, (start, end) in zip(parts, ranges)])

    def local_shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows ``[start:end]`` of a ``[num_classes, ...]`` tensor (a view)."""
        if full.shape[0] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} rows (all classes), got {full.shape[0]}")
        return full[self.class_start : self.class_end]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"weight": [num_classes, D]}`` on the CPU, on every rank (a collective when world_size > 1)."""
        return {"weight": self.gather_shards(self.weight).cpu()}

    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the full centre matrix (from any world size, or from FCHead) and keep this rank's shard."""
        weight = check_full_weight(state_dict, self.num_classes, self.embedding_size)
        with torch.no_grad():
            self.weight.copy_(self.local_shard(weight))

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"classes=[{self.class_start}, {self.class_end}), sample_rate={self.sample_rate}, "
            f"rank={self.rank}, world_size={self.world_size}"
        )


def create_head(
    name: str,
    embedding_size: int,
    num_classes: int,
    s: float = 64.0,
    m: float | None = None,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    sample_rate: float = 1.0,
    rank: int = 0,
    world_size: int = 1,
    partial_fc: bool | None = None,
) -> FCHead | PartialFC:
    """Build a margin head by name: ``"arcface"`` (s, m; m defaults to 0.5), ``"cosface"`` (s, m; default
    0.4) or ``"combined"`` (s, m1, m2, m3).

    Which head: ``partial_fc=None`` (the default) gives :class:`PartialFC` when ``world_size > 1`` or
    ``sample_rate < 1``, else :class:`FCHead`; ``True`` always gives PartialFC; ``False`` gives the
    replicated FCHead (then ``sample_rate`` must be 1, and with ``world_size > 1`` the trainer must wrap it
    in DDP). Both heads share ``forward(embeddings, labels) -> loss`` and the
    ``full_state_dict``/``load_full_state_dict`` checkpoint format.
    """
    if name == "arcface":
        margin: Margin = ArcFace(s=s, m=0.5 if m is None else m)
    elif name == "cosface":
        margin = CosFace(s=s, m=0.4 if m is None else m)
    elif name == "combined":
        margin = CombinedMargin(s=s, m1=m1, m2=m2, m3=m3)
    else:
        raise ValueError(f"unknown head {name!r}, expected one of {', '.join(HEAD_NAMES)}")
    if partial_fc is None:
        partial_fc = world_size > 1 or sample_rate < 1
    if partial_fc:
        return PartialFC(margin, embedding_size, num_classes, sample_rate, rank, world_size)
    if sample_rate != 1:
        raise ValueError(f"sample_rate={sample_rate} needs partial_fc=True (FCHead uses every centre)")
    return FCHead(margin, embedding_size, num_classes)
