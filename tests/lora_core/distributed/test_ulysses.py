"""Ulysses: token-sharding helpers (pure), the all-to-all and gather autograd ops and the attention wrapper
on 2 gloo processes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from backbones.attention import attention
from lora_core import distributed as parallel
from lora_core import fused
from lora_core.distributed import UlyssesAttention, UlyssesGroup, gather_sequence, sequence_layout, shard_sequence

from ._procs import spawn


class _Ranks:
    """The minimal `sp` seam (size, rank, gather) of a group simulated in one process."""

    def __init__(self, size: int, rank: int) -> None:
        self.size, self.rank = size, rank

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        raise AssertionError("not called here")


@pytest.mark.parametrize("n,size", [(5, 2), (6, 2), (7, 3), (1, 4), (45, 4)])
def test_shards_tile_the_zero_padded_sequence(n: int, size: int) -> None:
    x = torch.randn(2, n, 3, dtype=torch.float64)
    total = -(-n // size) * size
    chunks = []
    for rank in range(size):
        sp = _Ranks(size, rank)
        t, local, lo, hi = sequence_layout(n, sp)
        assert (t, local, lo, hi) == (total, total // size, rank * local, (rank + 1) * local)
        chunk = shard_sequence(x, sp, dim=1)
        assert chunk.shape == (2, local, 3) and chunk.is_contiguous()
        torch.testing.assert_close(shard_sequence(x.transpose(0, 1), sp, dim=-3), chunk.transpose(0, 1))
        chunks.append(chunk)
    whole = torch.cat(chunks, dim=1)
    assert torch.equal(whole[:, :n], x) and torch.equal(whole[:, n:], torch.zeros(2, total - n, 3, dtype=x.dtype))


def test_single_process_helpers_change_nothing() -> None:
    x = torch.randn(2, 5, 3).transpose(0, 1)  # non-contiguous
    assert sequence_layout(5, None) == (5, 5, 0, 5)
    out = shard_sequence(x, None, dim=0)
    assert torch.equal(out, x) and out.is_contiguous()
    assert gather_sequence(x, None, dim=0) is x


def test_bad_rank_or_size_raises_with_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"size=2, rank=2; expected size >= 1 and 0 <= rank < size"):
        sequence_layout(5, _Ranks(2, 2))
    with pytest.raises(ValueError, match=r"size=0"):
        shard_sequence(torch.zeros(1, 4), _Ranks(0, 0), dim=1)


def test_group_shard_tells_the_fused_op_its_token_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(fused, "set_token_shard", lambda lo, n: seen.append((lo, n)), raising=False)
    x = torch.arange(10.0).view(1, 5, 2)
    sp = UlyssesGroup(None, 2, 1)  # the group object is only needed by collectives
    out = shard_sequence(x, sp, dim=1)  # goes through UlyssesGroup.shard
    assert seen == [(3, 3)]  # rank 1 of 2 holds padded tokens 3, 4, 5
    assert torch.equal(out, torch.tensor([[[6.0, 7.0], [8.0, 9.0], [0.0, 0.0]]]))
    assert sp.layout(5) == (6, 3, 3, 6)
    # without the hook (an older lora_core.fused) sharding works the same
    monkeypatch.delattr(fused, "set_token_shard")
    assert torch.equal(sp.shard(x, 1), out)


def test_apply_sequence_parallel_refuses_models_without_a_seam_and_twice() -> None:
    info = parallel.DistInfo(world_size=2, sp_size=2, sp_rank=0)
    with pytest.raises(ValueError, match="no sequence-parallel seam.*--ulysses 1"):
        parallel.apply_sequence_parallel(nn.Linear(2, 2), info)

    class NoAttention(nn.Module):
        sp = None

    with pytest.raises(ValueError, match="no attention module with an `attn_op` seam"):
        parallel.apply_sequence_parallel(NoAttention(), info)

    class Seam(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sp = None
            self.inner = nn.Module()
            self.inner.attn_op = attention

    m = Seam()
    assert parallel.apply_sequence_parallel(m, info) == 1
    assert isinstance(m.inner.attn_op, UlyssesAttention) and m.inner.attn_op.inner is attention
    assert isinstance(m.sp, UlyssesGroup) and (m.sp.size, m.sp.rank) == (2, 0)
    with pytest.raises(ValueError, match="already sequence-parallel"):
        parallel.apply_sequence_parallel(m, info)


def _collectives_worker(rank: int, world: int) -> None:
    info = parallel.init_distributed(ulysses=2, num_heads=4)
    sp = UlyssesGroup(info.sp_group, 2, info.sp_rank)
    # all-to-all: sequence <-> heads and back is the identity; its backward is the inverse all-to-all
    q = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(10 + rank), requires_grad=True)
    heads = sp.all_to_all(q, scatter_dim=2, gather_dim=1)
    assert heads.shape == (2, 6, 2, 5)
    torch.testing.assert_close(sp.all_to_all(heads, scatter_dim=1, gather_dim=2), q)
    (heads * 3).sum().backward()
    torch.testing.assert_close(q.grad, torch.full_like(q, 3.0))

    # Ulysses attention on 5 tokens (padded to 6, the padded key masked) = full attention, rows of this rank
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(2, 5, 4, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    ref = attention(*full)  # [B, 5, NH, D]
    local = [shard_sequence(t, sp, dim=1).requires_grad_() for t in full]  # [B, 3, NH, D]
    op = UlyssesAttention(attention, sp)
    out = op(*local, k_lens=torch.tensor([5, 5]))
    whole = gather_sequence(out, sp, dim=1)  # [B, 6, NH, D] on both ranks
    torch.testing.assert_close(whole[:, :5], ref)
    # gradients: every rank computes the same loss from the gathered output; the gather's backward keeps
    # this rank's rows and the all-to-alls route the rest, so each rank's input gradient is exactly its
    # slice of the single-process one (zero on the padded token)
    ref_in = [t.clone().requires_grad_() for t in full]
    attention(*ref_in).pow(2).sum().backward()
    whole[:, :5].pow(2).sum().backward()
    for mine, theirs in zip(local, ref_in):
        torch.testing.assert_close(mine.grad, shard_sequence(theirs.grad, sp, dim=1))


def test_all_to_all_gather_and_attention_on_two_processes() -> None:
    spawn(_collectives_worker, 2)
