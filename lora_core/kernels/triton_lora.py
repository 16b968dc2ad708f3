"""A Triton kernel for the LoRA-augmented linear, forward and backward (CUDA; tested on the CPU under Triton's
interpreter, TRITON_INTERPRET=1).

    y = x W^T + b + scale * (x A^T) B^T          x [M, I], W [O, I], A [r, I], B [O, r]

One generic kernel `_lora_mm_kernel` computes C = beta * P Q + alpha * U V (+ bias) tile by tile: the base
GEMM and the low-rank term accumulate into one fp32 accumulator, so the LoRA term costs no extra pass over
the output (what `fused` gets from cuBLAS addmm_ with beta=1). Operands are read through their strides, so
transposes are free views. The pieces:

    forward   xa = x A^T [M, r];  y = x W^T + s * xa B^T + b                    (xa saved for dB)
    backward  g  = dY B [M, r];   dX = dY W + s * g A;  dA = s * g^T x;  dB = s * dY^T xa
              (dW = dY^T x and db = sum dY only if the base trains)

No dropout (the engine's seeded-dropout path stays in `fused`). fp32 operands use IEEE fp32 products unless
torch.backends.cuda.matmul.allow_tf32 is set (then TF32, as cuBLAS would); fp16/bf16 accumulate in fp32.

Status: correctness only. It is NOT wired into the engine: `fused.lora_linear` (cuBLAS) stays the path until
a GPU benchmark shows this kernel faster on the project's shapes; no GPU timing has been taken yet. Block
sizes are fixed guesses (no autotuning).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

__all__ = ["available", "lora_matmul", "triton_lora_linear"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """True only when CUDA and triton are both present (the engine must never pick this on CPU)."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


_KERNEL: Any = None


def _kernel() -> Any:
    """Defined lazily so importing this module never needs triton."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def _lora_mm_kernel(p_ptr, q_ptr, u_ptr, v_ptr, bias_ptr, c_ptr, M, N, K, R,
                        s_pm, s_pk, s_qk, s_qn, s_um, s_ur, s_vr, s_vn, s_cm, s_cn, alpha, beta,
                        HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_R: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rm < M
        mask_n = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # base: P [M, K] @ Q [K, N]
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < K
            p = tl.load(p_ptr + rm[:, None] * s_pm + rk[None, :] * s_pk, mask=mask_m[:, None] & mk[None, :], other=0.0)
            q = tl.load(q_ptr + rk[:, None] * s_qk + rn[None, :] * s_qn, mask=mk[:, None] & mask_n[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(p, q, input_precision="ieee")
            else:
                acc += tl.dot(p, q)
        acc = acc * beta
        if HAS_LORA:  # low-rank epilogue into the same accumulator: U [M, R] @ V [R, N]
            lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                mr = rr < R
                u = tl.load(u_ptr + rm[:, None] * s_um + rr[None, :] * s_ur, mask=mask_m[:, None] & mr[None, :],
                            other=0.0)
                v = tl.load(v_ptr + rr[:, None] * s_vr + rn[None, :] * s_vn, mask=mr[:, None] & mask_n[None, :],
                            other=0.0)
                if IEEE:
                    lora += tl.dot(u, v, input_precision="ieee")
                else:
                    lora += tl.dot(u, v)
            acc += lora * alpha
        if HAS_BIAS:
            b = tl.load(bias_ptr + rn, mask=mask_n, other=0.0)
            acc += b[None, :].to(tl.float32)
        c = acc.to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, c, mask=mask_m[:, None] & mask_n[None, :])

    _KERNEL = (triton, _lora_mm_kernel)
    return _KERNEL


def _pow2_at_least_16(n: int) -> int:
    v = 16
    while v < n:
        v *= 2
    return v


def lora_matmul(p: torch.Tensor, q: torch.Tensor, u: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
                alpha: float = 1.0, beta: float = 1.0, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """C = beta * p @ q + alpha * u @ v (+ bias), one launch. p [M, K], q [K, N], u [M, R], v [R, N], bias [N];
    any strides (pass transposed views, no copies). Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1."""
    triton, kernel = _kernel()
    m, k = p.shape
    k2, n = q.shape
    assert k == k2, (p.shape, q.shape)
    has_lora = u is not None
    if has_lora:
        assert v is not None and u.shape[0] == m and v.shape[1] == n and u.shape[1] == v.shape[0], (u.shape, v.shape)
        r = u.shape[1]
    else:
        u, v, r = p, q, 0  # unused pointers
    c = torch.empty(m, n, device=p.device, dtype=out_dtype or p.dtype)
    if c.numel() == 0:
        return c
    ieee = p.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    bm, bn, bk = (32, 32, 32) if _interpreting() else (64, 64, 32)
    br = _pow2_at_least_16(min(max(r, 1), 64))
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    kernel[grid](p, q, u, v, bias if bias is not None else c, c, m, n, k, r,
                 p.stride(0), p.stride(1), q.stride(0), q.stride(1), u.stride(0), u.stride(1),
                 v.stride(0), v.stride(1), c.stride(0), c.stride(1), float(alpha), float(beta),
                 HAS_LORA=has_lora, HAS_BIAS=bias is not None, IEEE=ieee,
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br)
    return c


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class _TritonLoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float) -> torch.Tensor:
        lead, d_in = x.shape[:-1], x.shape[-1]
        cdt = x.dtype
        x2d = x.reshape(-1, d_in)
        w, a, bm = _cast(weight, cdt), _cast(lora_A, cdt), _cast(lora_B, cdt)
        b = None if bias is None else _cast(bias, cdt)
        xa = lora_matmul(x2d, a.t())                                           # [M, r]
        y = lora_matmul(x2d, w.t(), xa, bm.t(), alpha=scale, bias=b)           # [M, O]
        ctx.save_for_backward(x2d, xa, weight, lora_A, lora_B)
        ctx.meta = (float(scale), x.shape, bias is not None, None if bias is None else bias.dtype)
        return y.view(*lead, y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        scale, x_shape, has_bias, bias_dtype = ctx.meta
        x2d, xa, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bm, _ = ctx.needs_input_grad
        cdt = x2d.dtype
        dy2d = _cast(dy.reshape(-1, dy.shape[-1]), cdt)
        w, a, bm = _cast(weight, cdt), _cast(lora_A, cdt), _cast(lora_B, cdt)
        dx = dw = db = da = dbm = None
        g = lora_matmul(dy2d, bm) if (need_x or need_a) else None              # dY B [M, r]
        if need_x:
            dx = lora_matmul(dy2d, w, g, a, alpha=scale).view(x_shape)         # dY W + s (dY B) A
        if need_a:
            da = lora_matmul(g.t(), x2d, beta=scale, out_dtype=torch.float32).to(lora_A.dtype)   # s (dY B)^T x
        if need_bm:
            dbm = lora_matmul(dy2d.t(), xa, beta=scale, out_dtype=torch.float32).to(lora_B.dtype)  # s dY^T xa
        if need_w:
            dw = lora_matmul(dy2d.t(), x2d, out_dtype=torch.float32).to(weight.dtype)
        if has_bias and need_b:
            db = dy2d.float().sum(0).to(bias_dtype)
        return dx, dw, db, da, dbm, None


def triton_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x W^T + b + scale * (x A^T) B^T with Triton kernels for forward and backward.
    x [..., I], W [O, I], b [O] or None, A [r, I], B [O, r] -> [..., O]; computes in x's dtype (no autocast
    handling, no dropout). Gradients for every input that requires one."""
    if x.shape[-1] != weight.shape[1] or lora_A.shape[1] != weight.shape[1] or \
            lora_B.shape != (weight.shape[0], lora_A.shape[0]):
        raise ValueError(f"LoRA shapes do not fit: x [..., {x.shape[-1]}], W {tuple(weight.shape)}, "
                         f"A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}")
    return _TritonLoRALinearFn.apply(x, weight, bias, lora_A, lora_B, float(scale))
