"""The process layout: a named (dp, sp) DeviceMesh and the few collectives the training loop needs.

World = data-parallel size x Ulysses size K. sp is the inner mesh dimension, so ranks [g*K, (g+1)*K) form
Ulysses group g; they train on the same sample, and the data-parallel rank of a process is rank // K.
FSDP2 shards over the whole world (the flattened "dp_sp" dimension): Ulysses ranks hold shards too.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "check_degrees", "check_options", "barrier", "all_reduce_mean",
           "any_rank", "broadcast_object", "shutdown"]

# Name of the flattened (dp, sp) mesh dimension that FSDP2 shards over.
WORLD_DIM = "dp_sp"


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
    # the 2-D DeviceMesh, dims ("dp", "sp"), and its flattening "dp_sp" over every rank (what FSDP2 shards
    # over); both None in a single process
    mesh: Any = None
    world_mesh: Any = None

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


def check_options(info: DistInfo, *, mode: str, optimizer: str, validation_every: int) -> None:
    """Combinations this build cannot run, as ValueErrors raised before any data or model is touched."""
    sharded = mode == "fsdp" and info.distributed
    if sharded and optimizer == "adamw8bit":
        raise ValueError("optim.name=adamw8bit cannot step FSDP2-sharded parameters (bitsandbytes' 8-bit kernels "
                         "take plain tensors, FSDP2 parameters are DTensors); use --parallel ddp with adamw8bit "
                         "(LoRA optimizer states are small, so leaving them unsharded costs little), or "
                         "optim.name=adamw with --parallel fsdp")
    if validation_every and (sharded or info.sp_size > 1):
        raise ValueError(f"validation.every={validation_every} samples on rank 0 alone, which cannot drive a DiT "
                         f"that is sharded (--parallel fsdp) or sequence-parallel (--ulysses {info.sp_size}); set "
                         "validation.every=0 and sample the saved checkpoints with infer.py, or train with "
                         "--parallel ddp --ulysses 1")
    if sharded and torch.__version__ < "2.8" and torch.cuda.is_available():
        # the CPU default is fp32 everywhere, so only the GPU default (bf16 base) mixes dtypes in one unit
        raise ValueError(f"--parallel fsdp with a bf16 base and fp32 LoRA needs torch >= 2.8 (this is "
                         f"{torch.__version__}: FSDP2 asks every parameter of a unit to share a dtype); upgrade "
                         "torch, or set model.dtype=fp32 (bf16 autocast still computes in bf16)")


def init_distributed(ulysses: int = 1, num_heads: int | None = 1) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain `python train.py` is world 1.

    num_heads is the backbone's attention head count, or None when the backbone has no sequence-parallel
    seam. The degrees are checked before the process group starts, so a bad --ulysses fails at once on
    every rank. May be called again in the same process (tests do): each call builds a fresh mesh."""
    if num_heads is None:
        if ulysses != 1:
            raise ValueError(f"--ulysses {ulysses}: this backbone does not support sequence parallel "
                             "(--ulysses K); use --ulysses 1")
        num_heads = 1
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
        from torch.distributed.device_mesh import init_device_mesh
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        mesh = init_device_mesh(device.type, (dp, ulysses), mesh_dim_names=("dp", "sp"))
        # FSDP2 shards over every rank; flattening once here (not per parallelize call) lets several trained
        # models share one process group instead of creating one each
        info.mesh, info.world_mesh = mesh, mesh._flatten(WORLD_DIM)
        info.dp_group = mesh["dp"].get_group()
        info.sp_group = mesh["sp"].get_group()
        assert mesh["dp"].get_local_rank() == info.dp_rank and mesh["sp"].get_local_rank() == info.sp_rank
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


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when it is True on any (e.g. one rank caught SIGTERM)."""
    if not info.distributed:
        return flag
    t = torch.tensor([float(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank (pickled)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
