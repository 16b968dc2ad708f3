"""Process groups and the one visible parallelize step: sequence parallel -> activation checkpointing ->
FSDP2 or DDP. Model code stays single-device code; this module only wraps and hooks.

World = data-parallel size x Ulysses size K. Ranks [g*K, (g+1)*K) form Ulysses group g; they train on the
same sample, so the data-parallel rank of a process is rank // K.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    sp_size: int = 1
    sp_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dp_group: Any = None
    sp_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_degrees(world_size: int, ulysses: int, num_heads: int) -> int:
    """Data-parallel size for `ulysses`, or ValueError with the numbers and the valid choices."""
    if ulysses < 1:
        raise ValueError(f"--ulysses {ulysses}: must be >= 1")
    if world_size % ulysses:
        valid = [k for k in range(1, world_size + 1) if world_size % k == 0 and num_heads % k == 0]
        raise ValueError(f"dp * ulysses({ulysses}) != WORLD_SIZE({world_size}): ulysses must divide the number of "
                         f"processes; valid --ulysses for {world_size} processes and {num_heads} heads: {valid}")
    if num_heads % ulysses:
        valid = [k for k in range(1, num_heads + 1) if num_heads % k == 0 and world_size % k == 0]
        raise ValueError(f"--ulysses {ulysses} does not divide the model's {num_heads} attention heads; "
                         f"valid choices with {world_size} processes: {valid}")
    return world_size // ulysses


def init_distributed(ulysses: int = 1, num_heads: int = 1) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain `python train.py` is world 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dp = check_degrees(world, ulysses, num_heads)
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    info = DistInfo(rank=rank, world_size=world, local_rank=local, dp_size=dp, dp_rank=rank // ulysses,
                    sp_size=ulysses, sp_rank=rank % ulysses, device=device)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        # every rank must create every group, in the same order
        for g in range(dp):
            ranks = list(range(g * ulysses, (g + 1) * ulysses))
            grp = dist.new_group(ranks)
            if rank in ranks:
                info.sp_group = grp
        for s in range(ulysses):
            ranks = list(range(s, world, ulysses))
            grp = dist.new_group(ranks)
            if rank in ranks:
                info.dp_group = grp
    return info


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over the whole world (every Ulysses rank of a group holds the same value)."""
    if not info.distributed:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / info.world_size


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------ parallelize
def apply_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Recompute each block in backward (non-reentrant, through hooks: names and forwards unchanged)."""
    from torch.distributed._composable import checkpoint
    for block in blocks:
        checkpoint(block)


@contextlib.contextmanager
def maybe_offload_activations(enabled: bool) -> Iterator[None]:
    """Keep tensors saved for backward on the CPU (pinned when CUDA is there) during the forward."""
    if not enabled:
        yield
        return
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        yield


def parallelize(dit: nn.Module, blocks: nn.ModuleList, info: DistInfo, *, mode: str = "ddp",
                gradient_checkpointing: bool = False) -> nn.Module:
    """Sequence parallel -> activation checkpointing -> FSDP2/DDP, in that order. Returns the module to
    call for training (the DiT itself, or its DDP wrapper)."""
    if info.sp_size > 1:
        raise ValueError("Ulysses sequence parallel (--ulysses > 1) is not available in this build")
    if gradient_checkpointing:
        apply_activation_checkpointing(blocks)
    if mode == "fsdp":
        raise ValueError("--parallel fsdp is not available in this build; use --parallel ddp")
    if info.dp_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(dit, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                   process_group=info.dp_group)
    return dit


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
