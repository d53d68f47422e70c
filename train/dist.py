"""Devices and distributed setup, done in functions (never at import time).

Under ``torchrun`` the environment carries RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; :func:`setup_distributed` turns that into a process group
(gloo on CPU, nccl on CUDA, hccl on Ascend NPUs) and a device. ``torch_npu`` is
imported only when the NPU device is asked for.

DDP wraps the backbone *and* a replicated margin head together, so the class
centres' gradients are all-reduced too (leaving the head out of DDP, as the
reference port did, lets every rank's centres drift apart). A Partial FC head is
model-parallel (each rank owns a shard of the centres) and stays outside DDP.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from lresnet.core.device import bind_device, resolve_device
from lresnet.core.errors import InputError
from lresnet.pipeline import World
from lresnet.train.config import DistConfig

log = logging.getLogger(__name__)

DEFAULT_BACKEND = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
BACKENDS = ("auto", *DEFAULT_BACKEND.values())


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: its rank in the world, its device, the process-group backend (None alone)."""

    world: World
    local_rank: int
    device: torch.device
    backend: Optional[str]

    @property
    def is_main(self) -> bool:
        return self.world.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(name, f"got {raw!r} in the environment, expected an integer") from None


def _attempt_store(world_size: int, timeout: datetime.timedelta) -> Optional[dist.Store]:
    """Under torchrun, the key-value store of this restart attempt (None: torch's default env:// store).

    The workers of every attempt share torchrun's agent store, and the process group's keys (each
    rank's address) carry no attempt number: a restarted rank could read the address a killed
    rank of the failed attempt left there and fail to connect. A prefix per attempt keeps them apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"lresnet/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def setup_distributed(cfg: DistConfig) -> DistContext:
    """Read torchrun's environment, pick the device and, with WORLD_SIZE > 1, start the process group."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(cfg.device, cfg.device_id, local_rank, option="--device")
    bind_device(device)
    backend = None
    if world_size > 1:
        backend = DEFAULT_BACKEND[cfg.device] if cfg.backend == "auto" else cfg.backend
        if not dist.is_initialized():
            kwargs = {}
            if device.type == "cuda":
                kwargs["device_id"] = device  # binds NCCL to this rank's GPU up front
            timeout = datetime.timedelta(seconds=cfg.timeout)
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout,
                                    store=_attempt_store(world_size, timeout), **kwargs)
        log.info("process group %s: rank %d of %d on %s", backend, rank, world_size, device)
    return DistContext(World(rank=rank, world_size=world_size), local_rank, device, backend)


def teardown_distributed(ctx: DistContext, meet: bool = True) -> None:
    """Destroy the process group started by :func:`setup_distributed`, if any.

    With ``meet`` the ranks first wait for each other: a rank that tears its connections down while a
    peer still finishes its last collective can abort that peer (gloo: "terminate called without an
    active exception"). A rank leaving on an error passes ``meet=False``. DDP modules the caller no
    longer references are collected first: freed later, at interpreter exit, their reducers' gloo
    work aborts the process the same way.
    """
    if ctx.distributed and dist.is_initialized():
        gc.collect()
        if meet:
            dist.barrier()
        dist.destroy_process_group()


class FaceModel(nn.Module):
    """Backbone + margin head as one module: ``forward(images, labels) -> loss``.

    The loss is what the step differentiates: with a replicated head on several ranks, each rank's
    sum over its valid rows (label != -1) divided by the valid rows of the *global* batch, times the
    world size, so that DDP's average over ranks is the gradient of the global-batch mean even when
    ignored rows fall unevenly across ranks (each rank's own mean, averaged, would weight a rank's
    rows by how many of its rows are valid). Alone, or with Partial FC (whose loss is already the
    global-batch mean), it is the head's loss.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, world_size: int = 1):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.world_size = world_size

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.head(self.backbone(images), labels)
        if self.world_size == 1:
            return loss
        local_valid = (labels != -1).sum()
        global_valid = local_valid.clone()
        dist.all_reduce(global_valid)  # on the device: no host synchronisation
        local_sum = loss * local_valid.clamp_min(1).to(loss.dtype)  # the head's mean is 0 without valid rows
        return local_sum * (self.world_size / global_valid.clamp_min(1).to(loss.dtype))


def wrap_for_training(backbone: nn.Module, head: nn.Module, ctx: DistContext, head_sharded: bool,
                      cfg: Optional[DistConfig] = None) -> nn.Module:
    """The module the loop calls. Alone: plain FaceModel. Distributed: DDP around backbone+head,
    or around the backbone only when the head is sharded (Partial FC). `cfg` sets DDP's bucket size,
    gradient_as_bucket_view and static_graph."""
    if not ctx.distributed:
        return FaceModel(backbone, head)
    cfg = cfg or DistConfig()
    ddp_options = {"device_ids": None if ctx.device.type == "cpu" else [ctx.device.index],
                   "bucket_cap_mb": cfg.bucket_mb, "gradient_as_bucket_view": cfg.bucket_view,
                   "static_graph": cfg.static_graph}
    if head_sharded:
        from lresnet.model.partial_fc import sum_allreduce_hook

        # Partial FC's loss is the mean over the global batch on every rank, and its all-gather hands
        # each rank that loss's gradient for its own embeddings: summing (not averaging) the backbone
        # gradients gives exactly the gradient of the global batch, as the replicated head does, so a
        # run behaves the same (same LR) whichever head it uses
        ddp = nn.parallel.DistributedDataParallel(backbone, **ddp_options)
        ddp.register_comm_hook(None, sum_allreduce_hook)
        return FaceModel(ddp, head)
    return nn.parallel.DistributedDataParallel(FaceModel(backbone, head, ctx.world.world_size), **ddp_options)


def all_reduce_min(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise minimum over ranks (identity when alone)."""
    if ctx.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


def gather_objects(obj: object, ctx: DistContext) -> list:
    """Every rank's `obj`, in rank order (``[obj]`` when alone)."""
    if not ctx.distributed:
        return [obj]
    out: list = [None] * ctx.world.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op when alone)."""
    if ctx.distributed:
        dist.barrier()
