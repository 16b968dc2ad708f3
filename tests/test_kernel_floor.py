"""The kernel-floor tools the benchmarks use (benchmarks.common): what they record and that the replay runs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import gemm_gflop, kernel_signature, record_kernels, replay_kernels, without_dim
from lora_core.fused import lora_linear


def _step(rank: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 32, generator=g, requires_grad=True)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    a = torch.randn(rank, 32, generator=g, requires_grad=True)
    bm = torch.randn(48, rank, generator=g, requires_grad=True)

    def step() -> None:
        y = lora_linear(x, w, b, a, bm, 0.5)                                  # [2, 24, 48]
        q = y[..., :32].unflatten(-1, (2, 16)).transpose(1, 2)              # [2, 2, 24, 16]
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    return step


def test_record_keeps_base_gemms_and_attention_and_skips_the_rank():
    calls = record_kernels(_step(rank=4))
    names = [f.overloadpacket.__name__ for f, _, _ in calls]
    assert "addmm" in names and any("attention" in n for n in names)
    assert any(n.endswith("_backward") for n in names)                     # backward kernels are seen too
    base = without_dim(calls, 4)
    shapes = [a[0] for _, args, _ in base for a in args if isinstance(a, tuple) and len(a) == 4]
    assert shapes and not any(4 in shape for shape in shapes)              # no call with a rank-4 dimension
    assert kernel_signature(base) == kernel_signature(without_dim(record_kernels(_step(rank=4)), 4))  # repeatable
    # forward base GEMM [48, 32] x 48 rows (2*48*32*48) + the base dX GEMM (same) = 2 * 147456 FLOP
    assert gemm_gflop(base) * 1e9 == 2 * (2 * 48 * 32 * 48)
    assert gemm_gflop(calls) > gemm_gflop(base)


def test_replay_runs_the_recorded_kernels_with_finite_results():
    calls = record_kernels(_step())
    seen = []

    class _Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen.append(func.overloadpacket.__name__)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                assert torch.isfinite(out).all(), func
            return out

    run = replay_kernels(calls)
    with _Spy():
        run()
    assert seen == [f.overloadpacket.__name__ for f, _, _ in calls]
