"""gradient_sync: skipping the gradient reduction on all micro-steps but the last of an accumulation window
communicates once per window and leaves the same gradients (2 gloo processes, DDP and FSDP2)."""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from lora_core import distributed as parallel

from ._procs import spawn

MICRO = 2


class Tiny(nn.Module):
    """Two blocks (the units parallelize checkpoints and shards) and a head owned by the root."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def _batch(rank: int, micro: int) -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(100 * rank + micro))


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    # names without DDP's "module." prefix
    return {n.removeprefix("module."): (p.grad.full_tensor() if parallel._is_dtensor(p.grad) else p.grad).clone()
            for n, p in model.named_parameters() if p.grad is not None}


def _accumulate(model: nn.Module, rank: int, sync_each: bool,
                after_first: Callable[[], None] | None = None) -> None:
    for a in range(MICRO):
        with parallel.gradient_sync(model, sync_each or a == MICRO - 1):
            (model(_batch(rank, a)).pow(2).mean() / MICRO).backward()
        if a == 0 and after_first is not None:
            after_first()


def test_single_process_sync_is_a_no_op() -> None:
    torch.manual_seed(0)
    model = Tiny()
    ref = copy.deepcopy(model)
    _accumulate(model, 0, sync_each=False)
    _accumulate(ref, 0, sync_each=True)
    for n, g in _grads(model).items():
        assert torch.equal(g, _grads(ref)[n])


@contextmanager
def _count_reduce_scatters() -> Iterator[list[int]]:
    """Counts calls of the reduce-scatter entry points FSDP2 may use (torch versions differ in which)."""
    names = [n for n in ("reduce_scatter_tensor", "reduce_scatter_single") if hasattr(dist, n)]
    saved = {n: getattr(dist, n) for n in names}
    count = [0]

    def counting(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            return fn(*args, **kwargs)
        return wrapper

    for n in names:
        setattr(dist, n, counting(saved[n]))
    try:
        yield count
    finally:
        for n in names:
            setattr(dist, n, saved[n])


def _sync_worker(rank: int, world: int) -> None:
    torch.manual_seed(0)
    base = Tiny()
    # the reference: every rank's micro-batches on one model, gradient = mean over ranks of the accumulation
    ref = copy.deepcopy(base)
    for r in range(world):
        for a in range(MICRO):
            (ref(_batch(r, a)).pow(2).mean() / (MICRO * world)).backward()
    expected = _grads(ref)
    info = parallel.init_distributed()

    # DDP: a comm hook sees every bucket the reducer sends
    counts: dict[bool, int] = {}
    for sync_each in (True, False):
        calls = [0]

        # unannotated: DDP checks the annotation against dist.GradBucket, and postponed annotations are str
        def hook(state, bucket):  # noqa: ANN001, ANN202
            calls[0] += 1
            buf = bucket.buffer().div_(world)
            return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

        m = copy.deepcopy(base)
        model = parallel.parallelize(m, m.blocks, info, mode="ddp")
        model.register_comm_hook(None, hook)
        _accumulate(model, rank, sync_each)
        counts[sync_each] = calls[0]
        for n, g in _grads(model).items():
            torch.testing.assert_close(g, expected[n], msg=f"ddp sync_each={sync_each} {n}")
    assert counts[False] >= 1 and counts[True] == MICRO * counts[False], counts

    # FSDP2: one reduce-scatter per unit (2 blocks + root) per synced backward
    for sync_each in (True, False):
        m = copy.deepcopy(base)
        model = parallel.parallelize(m, m.blocks, info, mode="fsdp")

        def nothing_reduced_yet() -> None:
            # the unsynced backward keeps the unsharded gradient inside FSDP: no sharded .grad exists yet
            assert all(p.grad is None for p in model.parameters())

        with _count_reduce_scatters() as rs:
            _accumulate(model, rank, sync_each, None if sync_each else nothing_reduced_yet)
        counts[sync_each] = rs[0]
        got = _grads(model)
        assert got.keys() == expected.keys()
        for n, g in got.items():
            torch.testing.assert_close(g, expected[n], msg=f"fsdp sync_each={sync_each} {n}")
        # the flags are restored: a later plain backward reduces again
        with _count_reduce_scatters() as rs:
            model(_batch(rank, 9)).sum().backward()
        assert rs[0] == 3
    assert counts == {True: MICRO * 3, False: 3}, counts


def test_sync_skipping_communicates_once_per_window_with_the_same_gradients() -> None:
    spawn(_sync_worker, 2)
