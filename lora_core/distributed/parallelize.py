"""Process groups and the one visible parallelize step: sequence parallel -> activation checkpointing ->
FSDP2 or DDP. Model code stays single-device code; this module only sets seams, wraps and hooks.

World = data-parallel size x Ulysses size K. Ranks [g*K, (g+1)*K) form Ulysses group g; they train on the
same sample, so the data-parallel rank of a process is rank // K.

Gradients under Ulysses. Every rank of a Ulysses group gathers the full model output and computes the same
full loss; the backward of that gather hands each rank the gradient of its own token slice, so each rank's
parameter gradient is the partial sum over its tokens. The true gradient is therefore the SUM over the
Ulysses group and the MEAN over the data-parallel group: one all-reduce (DDP) or reduce-scatter (FSDP2)
over the whole world with divisor dp_size instead of world_size.

FSDP2 dtypes. Parameters keep their stored dtypes (frozen base in model.dtype, bf16 on GPU; LoRA masters
fp32) and are all-gathered as they are (no MixedPrecisionPolicy.param_dtype); autocast picks the compute
dtype, and the fp32 LoRA gradients are reduce-scattered in fp32. One fully_shard unit then holds bf16 and
fp32 parameters, which torch >= 2.8 accepts because it only asks the *trainable* parameters of a unit to
share a dtype (pytorch/pytorch#154103); older torch asks it of all of them, see `check_options`.

Shapes: B batch, Ll tokens on this rank, L = Ll * K tokens of the whole (padded) sequence, NH heads, D head dim.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..inject import lora_layers


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


def init_distributed(ulysses: int = 1, num_heads: int = 1) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a plain `python train.py` is world 1.

    The degrees are checked before the process group starts, so a bad --ulysses fails at once on every rank."""
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


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when it is True on any (e.g. one rank caught SIGTERM)."""
    if not info.distributed:
        return flag
    t = torch.tensor([float(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------- Ulysses (SP)
def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: Any, size: int) -> torch.Tensor:
    """Chunk `scatter_dim` into `size` pieces, send piece j to rank j, concatenate what arrives along
    `gather_dim` in rank order."""
    send = torch.stack(x.chunk(size, dim=scatter_dim))  # [K, ...], contiguous
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Autograd-aware all-to-all; its backward is the inverse all-to-all (the dims swapped)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scatter_dim: int, gather_dim: int, sp: "UlyssesGroup") -> torch.Tensor:
        ctx.dims, ctx.sp = (scatter_dim, gather_dim), sp
        return _all_to_all(x, scatter_dim, gather_dim, sp.group, sp.size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.sp.group, ctx.sp.size), None, None, None


class _GatherSequence(torch.autograd.Function):
    """All-gather along `dim`. Every rank of the group computes the same loss from the gathered tensor, so
    the incoming gradient is the same everywhere and the backward keeps this rank's slice (no reduction)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, sp: "UlyssesGroup") -> torch.Tensor:
        ctx.dim, ctx.sp = dim, sp
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(sp.size)]
        dist.all_gather(parts, x, group=sp.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad.chunk(ctx.sp.size, dim=ctx.dim)[ctx.sp.rank].contiguous(), None, None


class UlyssesGroup:
    """The object a backbone's `sp` seam expects (size, rank, gather), plus the all-to-all Ulysses uses."""

    def __init__(self, group: Any, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return _GatherSequence.apply(x, dim, self)

    def all_to_all(self, x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        return _AllToAll.apply(x, scatter_dim, gather_dim, self)


class UlyssesAttention:
    """Wraps an `attn_op(q, k, v, *, k_lens)`: sequence-sharded, all heads -> full sequence, NH/K heads,
    attention, and back. k_lens counts tokens of the full sequence, so padded keys stay masked."""

    def __init__(self, inner: Callable[..., torch.Tensor], sp: UlyssesGroup) -> None:
        self.inner, self.sp = inner, sp

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """q/k/v [B, Ll, NH, D] -> [B, Ll, NH, D]."""
        if q.shape[2] % self.sp.size:
            raise ValueError(f"Ulysses size {self.sp.size} does not divide the {q.shape[2]} attention heads")
        qkv = self.sp.all_to_all(torch.stack([q, k, v]), scatter_dim=3, gather_dim=2)  # [3, B, L, NH/K, D]
        y = self.inner(*qkv.unbind(0), **kwargs)                                     # [B, L, NH/K, D]
        return self.sp.all_to_all(y, scatter_dim=1, gather_dim=2)                    # [B, Ll, NH, D]

    def __repr__(self) -> str:
        return f"UlyssesAttention(size={self.sp.size}, inner={getattr(self.inner, '__name__', self.inner)})"


def apply_sequence_parallel(dit: nn.Module, info: DistInfo) -> int:
    """Set the model's `sp` seam and wrap every `attn_op` (an instance attribute: forwards stay untouched).
    Returns the number of wrapped attention modules."""
    if not hasattr(dit, "sp"):
        raise ValueError(f"{type(dit).__name__} has no sequence-parallel seam (an `sp` attribute); run it with "
                         "--ulysses 1")
    sp = UlyssesGroup(info.sp_group, info.sp_size, info.sp_rank)
    wrapped = 0
    for m in dit.modules():
        if "attn_op" in vars(m):
            m.attn_op = UlyssesAttention(m.attn_op, sp)
            wrapped += 1
    if not wrapped:
        raise ValueError(f"{type(dit).__name__} has no attention module with an `attn_op` seam; run it with "
                         "--ulysses 1")
    dit.sp = sp
    return wrapped


# ------------------------------------------------------------------------------------ parallelize
def apply_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Recompute each block in backward (non-reentrant, through hooks: names and forwards unchanged)."""
    from torch.distributed._composable import checkpoint
    for block in blocks:
        checkpoint(block)


@contextlib.contextmanager
def maybe_offload_activations(enabled: bool) -> Iterator[None]:
    """Keep tensors saved for backward on the CPU (pinned when CUDA is there) during the forward. Under
    activation checkpointing only what the checkpoints keep (each block's inputs) is saved, so that moves."""
    if not enabled:
        yield
        return
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        yield


def apply_fsdp(dit: nn.Module, blocks: nn.ModuleList, info: DistInfo) -> None:
    """FSDP2 over the whole world (Ulysses ranks hold shards too): each block a unit, then the root.
    Works on a meta-device model (see `load_full_state`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    # stored dtypes are all-gathered as they are; autocast casts for compute; fp32 LoRA grads reduced in fp32
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    units = [fully_shard(block, mesh=mesh, mp_policy=mp) for block in blocks]
    # the root (embeddings, head) is needed again right at the start of backward: keep it gathered
    units.append(fully_shard(dit, mesh=mesh, mp_policy=mp, reshard_after_forward=False))
    if info.sp_size > 1:
        for unit in units:  # sum over the Ulysses group, mean over data parallel (module docstring)
            unit.set_gradient_divide_factor(float(info.dp_size))
            if info.device.type == "cpu":
                unit.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM


def _sum_sp_mean_dp_hook(dp_size: int) -> Callable[[Any, Any], torch.futures.Future]:
    # unannotated on purpose: DDP rejects a hook whose `bucket` annotation is not the dist.GradBucket class,
    # and postponed annotations (this file's __future__ import) are strings
    def hook(group, bucket):  # noqa: ANN001, ANN202
        buf = bucket.buffer().div_(dp_size)
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    return hook


def apply_ddp(dit: nn.Module, info: DistInfo) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(dit, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if info.sp_size > 1:  # sum over the Ulysses group, mean over data parallel (module docstring)
        ddp.register_comm_hook(dist.group.WORLD, _sum_sp_mean_dp_hook(info.dp_size))
    return ddp


def shards_weights(mode: str, info: DistInfo) -> bool:
    """Whether `parallelize` will shard the parameters (build on meta, then `load_full_state`)."""
    return mode == "fsdp" and info.distributed


def parallelize(dit: nn.Module, blocks: nn.ModuleList, info: DistInfo, *, mode: str = "ddp",
                gradient_checkpointing: bool = False) -> nn.Module:
    """Sequence parallel -> activation checkpointing -> FSDP2/DDP, in that order. Returns the module to
    call for training: the DiT itself (single process, FSDP2) or its DDP wrapper."""
    if mode not in ("ddp", "fsdp"):
        raise ValueError(f"--parallel {mode!r}: choose ddp or fsdp")
    if info.sp_size > 1:
        apply_sequence_parallel(dit, info)
    if gradient_checkpointing:
        apply_activation_checkpointing(blocks)
    if not info.distributed:
        return dit
    if mode == "fsdp":
        apply_fsdp(dit, blocks, info)
        return dit
    return apply_ddp(dit, info)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


# ------------------------------------------------------------------- weights, LoRA and optimizer I/O
def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


@torch.no_grad()
def load_full_state(model: nn.Module, full: nn.Module | None, info: DistInfo) -> None:
    """Fill a model that was sharded on the meta device with rank 0's weights.

    Rank 0 passes `full`, a complete copy (e.g. built on the CPU from the checkpoint files); the other ranks
    pass None. Tensors travel one at a time: each is broadcast, every rank keeps its shard and drops the
    rest, so a rank holds its shards plus one full tensor, and only rank 0 ever holds the whole model.
    Rank 0's torch RNG state (which drew the LoRA init) is broadcast too, so later draws agree on all ranks."""
    from torch.distributed.tensor import distribute_tensor
    model.to_empty(device=info.device)
    src = full.state_dict() if full is not None else None
    mine = list(model.named_parameters()) + list(model.named_buffers())
    if info.is_main:
        assert src is not None, "rank 0 must pass the full model"
        missing, extra = {n for n, _ in mine} - set(src), set(src) - {n for n, _ in mine}
        assert not missing and not extra, f"full and sharded models differ: {sorted(missing)[:3]} {sorted(extra)[:3]}"
    for name, t in mine:
        if info.is_main:
            buf = src[name].to(device=info.device, dtype=t.dtype).contiguous()  # type: ignore[index]
            assert buf.shape == t.shape, f"{name}: {tuple(buf.shape)} vs {tuple(t.shape)}"
        else:
            buf = torch.empty(t.shape, dtype=t.dtype, device=info.device)
        dist.broadcast(buf, src=0)
        if _is_dtensor(t):
            t.copy_(distribute_tensor(buf, t.device_mesh, t.placements, src_data_rank=None))
        else:
            t.copy_(buf)
        del buf
    torch.set_rng_state(broadcast_object(torch.get_rng_state(), info))


@contextlib.contextmanager
def full_lora(model: nn.Module, writeback: bool = False) -> Iterator[nn.Module]:
    """Inside the block every LoRA parameter of `model` is a full, plain tensor (FSDP2 shards are
    all-gathered: a collective, every rank must enter). With writeback, values set inside (e.g. by
    load_lora) go back into the shards on exit, taken from rank 0. Without FSDP2 it changes nothing."""
    from torch.distributed.tensor import distribute_tensor
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    with torch.no_grad():
        for m in lora_layers(model).values():
            for attr in ("lora_A", "lora_B"):
                p = m._parameters[attr]
                if _is_dtensor(p):
                    m._parameters[attr] = nn.Parameter(p.full_tensor(), requires_grad=False)
                    swapped.append((m, attr, p))  # type: ignore[arg-type]
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, attr, p in swapped:
                full = m._parameters[attr]
                if writeback:
                    if full.shape != p.shape:
                        raise ValueError(f"LoRA {attr} changed shape from {tuple(p.shape)} to {tuple(full.shape)} "
                                         "while gathered; a sharded model cannot change its LoRA rank")
                    p.copy_(distribute_tensor(full.detach().to(p.dtype), p.device_mesh, p.placements,
                                              src_data_rank=0))
                m._parameters[attr] = p


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state as full tensors keyed by parameter name, the same layout whatever the
    parallelism, so a checkpoint resumes on another number of processes or mode. Under FSDP2 this is a
    collective; rank 0 receives the state, the other ranks an empty dict."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sd = optimizer.state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    index = {i: names[id(p)] for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    return {"state": {index[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [index[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `optimizer_state_dict` (every rank passes the full state). Index-keyed states, as
    `optimizer.state_dict()` writes them, load too when the model is not sharded."""
    by_name = all(isinstance(n, str) for g in state["param_groups"] for n in g["params"])
    if is_sharded(model):
        if not by_name:
            raise ValueError("this checkpoint's optimizer state is keyed by index; a sharded (FSDP) run needs one "
                             "written by this version (keyed by parameter name)")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    if by_name:
        ids = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        names = {n: ids[id(p)] for n, p in model.named_parameters() if id(p) in ids}
        unknown = [n for g in state["param_groups"] for n in g["params"] if n not in names]
        if unknown:
            raise ValueError(f"optimizer state names parameters the model does not train: {unknown[:3]}; "
                             "resume with the same LoRA targets")
        state = {"state": {names[n]: s for n, s in state["state"].items()},
                 "param_groups": [{**g, "params": [names[n] for n in g["params"]]} for g in state["param_groups"]]}
    optimizer.load_state_dict(state)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Total gradient norm (all ranks' shards included), clipping to `max_norm` when it is > 0."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if _is_dtensor(total):
        total = total.full_tensor()
    return float(total)
