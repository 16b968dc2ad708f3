"""Ulysses sequence parallel: token sharding helpers for model code, the all-to-all, the attention wrapper.

Model code stays single-device code that calls three helpers with its `sp` seam (None in a single
process): `sequence_layout(n, sp)`, `shard_sequence(x, sp, dim)` and `gather_sequence(x, sp, dim)`. They
need only `sp.size`, `sp.rank` and `sp.gather`, so a backbone imports no process-group code and tests can
stand in for the group with threads.

Gradients under Ulysses. Every rank of a Ulysses group gathers the full model output and computes the same
full loss; the backward of that gather hands each rank the gradient of its own token slice, so each rank's
parameter gradient is the partial sum over its tokens. The true gradient is therefore the SUM over the
Ulysses group and the MEAN over the data-parallel group (see `parallelize.apply_fsdp` / `apply_ddp`).

Shapes: B batch, N tokens of the unpadded sequence, Ll tokens on this rank, L = Ll * K tokens of the
whole (padded) sequence, NH heads, D head dim.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .. import fused

if TYPE_CHECKING:
    from .mesh import DistInfo

__all__ = ["SequenceGroup", "sequence_layout", "shard_sequence", "gather_sequence", "UlyssesGroup",
           "UlyssesAttention", "apply_sequence_parallel"]


class SequenceGroup(Protocol):
    """The least a model's `sp` seam provides; `UlyssesGroup` is the real one."""
    size: int
    rank: int

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor: ...


# ---------------------------------------------------------------------- helpers model code calls
def _layout(n: int, size: int, rank: int) -> tuple[int, int, int, int]:
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"sequence-parallel size={size}, rank={rank}; expected size >= 1 and 0 <= rank < size")
    total = -(-n // size) * size  # L: padded so every rank holds the same chunk length
    local = total // size
    return total, local, rank * local, (rank + 1) * local


def _shard(x: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    total, _, lo, hi = _layout(x.shape[dim], size, rank)
    if total > x.shape[dim]:
        pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, total - x.shape[dim]]
        x = F.pad(x, pad)  # zero tokens at the end
    return x.narrow(dim, lo, hi - lo).contiguous()


def sequence_layout(n: int, sp: SequenceGroup | None) -> tuple[int, int, int, int]:
    """(L, Ll, lo, hi) for a sequence of n tokens: padded length, tokens per rank, and this rank's slice
    [lo, hi) of the padded sequence. A single process (sp None) holds all n tokens unpadded."""
    if sp is None:
        return n, n, 0, n
    return _layout(n, sp.size, sp.rank)


def shard_sequence(x: torch.Tensor, sp: SequenceGroup | None, dim: int) -> torch.Tensor:
    """x [..., N, ...] (N at `dim`) -> [..., Ll, ...]: zero-padded to a multiple of sp.size, this rank's
    contiguous chunk; with sp None, x made contiguous (as every rank's chunk is, so kernels see the same
    layout either way). A group with its own `shard` (UlyssesGroup, which also tells the fused LoRA op
    its token offset) is asked to do it."""
    if sp is None:
        return x.contiguous()
    shard = getattr(sp, "shard", None)
    if shard is not None:
        return shard(x, dim)
    return _shard(x, dim, sp.size, sp.rank)


def gather_sequence(x: torch.Tensor, sp: SequenceGroup | None, dim: int) -> torch.Tensor:
    """Inverse of `shard_sequence` up to the padding: [..., Ll, ...] -> [..., L, ...] on every rank."""
    return x if sp is None else sp.gather(x, dim)


# ----------------------------------------------------------------------------- collectives
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
    def forward(ctx: Any, x: torch.Tensor, scatter_dim: int, gather_dim: int, sp: UlyssesGroup) -> torch.Tensor:
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
    def forward(ctx: Any, x: torch.Tensor, dim: int, sp: UlyssesGroup) -> torch.Tensor:
        ctx.dim, ctx.sp = dim, sp
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(sp.size)]
        dist.all_gather(parts, x, group=sp.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad.chunk(ctx.sp.size, dim=ctx.dim)[ctx.sp.rank].contiguous(), None, None


class UlyssesGroup:
    """The object a backbone's `sp` seam holds: one Ulysses group's size, this rank, and its collectives."""

    def __init__(self, group: Any, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank

    def layout(self, n: int) -> tuple[int, int, int, int]:
        """(L, Ll, lo, hi); see `sequence_layout`."""
        return _layout(n, self.size, self.rank)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """[..., N, ...] -> [..., Ll, ...], zero-padded to a multiple of size; this rank's chunk."""
        _, local, lo, _ = self.layout(x.shape[dim])
        # LoRA dropout masks are drawn per global token position, so the fused op must know which
        # positions this rank holds (guarded: older lora_core.fused has no token-shard hook)
        set_token_shard = getattr(fused, "set_token_shard", None)
        if set_token_shard is not None:
            set_token_shard(lo, local)
        return _shard(x, dim, self.size, self.rank)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """[..., Ll, ...] -> [..., L, ...]; backward keeps this rank's slice of the gradient."""
        return _GatherSequence.apply(x, dim, self)

    def all_to_all(self, x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        return _AllToAll.apply(x, scatter_dim, gather_dim, self)

    def __repr__(self) -> str:
        return f"UlyssesGroup(size={self.size}, rank={self.rank})"


class UlyssesAttention:
    """Wraps an `attn_op(q, k, v, *, k_lens)`: sequence-sharded, all heads -> full sequence, NH/K heads,
    attention, and back. k_lens counts tokens of the full sequence, so padded keys stay masked."""

    def __init__(self, inner: Callable[..., torch.Tensor], sp: UlyssesGroup) -> None:
        self.inner, self.sp = inner, sp

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """q/k/v [B, Ll, NH, D] -> [B, Ll, NH, D]."""
        if q.shape[2] % self.sp.size:
            raise ValueError(f"Ulysses size {self.sp.size} does not divide the {q.shape[2]} attention heads; "
                             f"choose --ulysses among the divisors of {q.shape[2]}")
        qkv = self.sp.all_to_all(torch.stack([q, k, v]), scatter_dim=3, gather_dim=2)  # [3, B, L, NH/K, D]
        y = self.inner(*qkv.unbind(0), **kwargs)                                     # [B, L, NH/K, D]
        return self.sp.all_to_all(y, scatter_dim=1, gather_dim=2)                    # [B, Ll, NH, D]

    def __repr__(self) -> str:
        return f"UlyssesAttention(size={self.sp.size}, inner={getattr(self.inner, '__name__', self.inner)})"


def apply_sequence_parallel(model: nn.Module, info: DistInfo) -> int:
    """Set the model's `sp` seam and wrap every `attn_op` (an instance attribute: forwards stay untouched).
    Returns the number of wrapped attention modules. Each call makes its own UlyssesGroup over
    `info.sp_group`, so several models of one process can each be made sequence-parallel."""
    if not hasattr(model, "sp"):
        raise ValueError(f"{type(model).__name__} has no sequence-parallel seam (an `sp` attribute); run it with "
                         "--ulysses 1")
    if model.sp is not None:
        raise ValueError(f"{type(model).__name__} is already sequence-parallel ({model.sp!r}); call "
                         "apply_sequence_parallel (or parallelize) once per model")
    sp = UlyssesGroup(info.sp_group, info.sp_size, info.sp_rank)
    wrapped = 0
    for m in model.modules():
        if "attn_op" in vars(m):
            m.attn_op = UlyssesAttention(m.attn_op, sp)
            wrapped += 1
    if not wrapped:
        raise ValueError(f"{type(model).__name__} has no attention module with an `attn_op` seam; run it with "
                         "--ulysses 1")
    model.sp = sp
    return wrapped
