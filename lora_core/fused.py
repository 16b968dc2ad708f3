"""Fused LoRA linear: the base GEMM and the LoRA path share one output and one input-gradient buffer.

    y = x W^T + b + scale * dropout(x) A^T B^T        x [..., I], W [O, I], A [r, I], B [O, r]

Letters: M = number of tokens (all leading dims of x flattened), I = in features, O = out features,
r = rank, R = sum of ranks when several projections read the same input (QKV).

Forward is one GEMM for the base (`addmm` with the bias), one skinny GEMM S = x_d A^T [M, r], and one
`addmm_` that accumulates scale * S B^T INTO the base output (GEMM epilogue with beta=1): no LoRA output
tensor, no scale kernel, no add kernel. Backward is dX = dY W with the LoRA part (dY B) A accumulated into
the same buffer by `addmm_`, plus the small dA/dB GEMMs; gradients for the fp32 masters come back in fp32.

Saved for backward: x in the compute dtype (the tensor itself when no cast happens), S [M, r] and the
parameters (no extra memory). S is saved rather than recomputed: it costs r/I of x's memory, while
recomputing it would re-read all of x, the dominant cost of a memory-bound skinny GEMM (notes §3.6).
With dropout the mask is not saved: a seed is, and the mask is regenerated in backward.

Dtypes: the compute dtype is the autocast dtype when autocast is on for x's device (and x is a
float16/bfloat16/float32 tensor, as autocast does), else x's dtype. W, A, B are cast to it; the
masters' gradients are cast back to the masters' dtype. Autocast is switched off inside, every cast is
explicit. CUDA runs this same cuBLAS code path; there is no Triton kernel (none has been measured to
beat cuBLAS + these epilogues on this project's shapes).
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)

# (weight, bias, lora_A, lora_B, scale) of one projection.
Projection = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor, float]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's for x's device when it is on, else x's own."""
    dev = x.device.type
    if x.dtype in _AUTOCAST_ELIGIBLE and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def dropout_mask(seed: int, shape: Sequence[int], p: float, device: torch.device | str,
                 dtype: torch.dtype) -> torch.Tensor:
    """The {0, 1} keep-mask (keep probability 1 - p) that `lora_linear` uses for a given seed.

    Regenerated in backward instead of saved; public so tests can rebuild the exact mask."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.empty(tuple(shape), dtype=dtype, device=device).bernoulli_(1.0 - p, generator=gen)


def _draw_seed() -> int:
    # From the CPU default generator: no device sync, follows torch.manual_seed, and is replayed by
    # torch.utils.checkpoint (it restores the CPU RNG state before recomputing the forward).
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Tensor.to is a few microseconds even when it is a no-op; this layer calls it a dozen times a step.
    return t if t.dtype == dtype else t.to(dtype)


def _no_autocast(device_type: str) -> Any:
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def _forward(x2d: torch.Tensor, projs: Sequence[Projection], p: float, seed: int | None,
             cdt: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Returns (outputs [M, O_i], x2d in cdt, S [M, R] = (x*mask) A^T, without the 1/(1-p))."""
    xc = _cast(x2d, cdt)
    outs = [torch.mm(xc, _cast(w, cdt).t()) if b is None else torch.addmm(_cast(b, cdt), xc, _cast(w, cdt).t())
            for w, b, _, _, _ in projs]                                                   # [M, O_i]
    xm = xc
    if p > 0:
        assert seed is not None
        xm = dropout_mask(seed, xc.shape, p, xc.device, cdt).mul_(xc)  # 1/(1-p) is folded into the alphas
    if len(projs) == 1:
        a_all = _cast(projs[0][2], cdt)
    else:  # one GEMM reads x once for all projections (QKV)
        a_all = torch.cat([_cast(a, cdt) for _, _, a, _, _ in projs])
    s_all = torch.mm(xm, a_all.t())                                                       # [M, R]
    keep = 1.0 / (1.0 - p)
    off = 0
    for y, (_, _, a, bm, scale) in zip(outs, projs):
        r = a.shape[0]
        y.addmm_(s_all[:, off:off + r], _cast(bm, cdt).t(), alpha=scale * keep)  # LoRA into the output
        off += r
    return outs, xc, s_all


class _LoRALinearFn(torch.autograd.Function):
    """n projections (W_i, b_i, A_i, B_i, scale_i) of one input x; n = 1 is the plain LoRA linear."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float, seed: int | None, cdt: torch.dtype,
                scales: tuple[float, ...], *params: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        n = len(scales)
        projs = [(params[4 * i], params[4 * i + 1], params[4 * i + 2], params[4 * i + 3], scales[i])
                 for i in range(n)]
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2d = x.reshape(-1, d_in)                             # [M, I]
        with _no_autocast(x.device.type):
            outs, xc, s_all = _forward(x2d, projs, p, seed, cdt)
        need = ctx.needs_input_grad  # params start at input 5: W_i 5+4i, b_i 6+4i, A_i 7+4i, B_i 8+4i
        need_w = any(need[5 + 4 * i] for i in range(n))
        need_a = any(need[7 + 4 * i] for i in range(n))
        need_bm = any(need[8 + 4 * i] for i in range(n))
        # x only when a weight or A gradient needs it; S only for the B gradients.
        ctx.save_for_backward(xc if (need_w or need_a) else None, s_all if need_bm else None,
                              *[t for t in params])
        ctx.meta = (p, seed, cdt, scales, x.shape, x.dtype)
        return tuple(y.view(*lead, y.shape[-1]) for y in outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        p, seed, cdt, scales, x_shape, x_dtype = ctx.meta
        xc, s_all, *params = ctx.saved_tensors
        n = len(scales)
        need = ctx.needs_input_grad  # params start at input 5: W_i 5+4i, b_i 6+4i, A_i 7+4i, B_i 8+4i
        need_x = need[0]
        device_type = grads[0].device.type
        with _no_autocast(device_type):
            dys = [_cast(g.reshape(-1, g.shape[-1]), cdt) for g in grads]   # [M, O_i]
            m, d_in = dys[0].shape[0], x_shape[-1]
            keep = 1.0 / (1.0 - p)
            ranks = [params[4 * i + 2].shape[0] for i in range(n)]
            offs = [sum(ranks[:i]) for i in range(n + 1)]
            need_a = any(need[7 + 4 * i] for i in range(n))
            out_grads: list[torch.Tensor | None] = [None] * (4 * n)

            # dB_i^T = S_i^T dY_i [r, O] first, while dY is hot; MKL runs this layout up to 2x faster
            # than dY^T S at small r.
            for i in range(n):
                bm = params[4 * i + 3]
                if need[8 + 4 * i]:
                    dbm = _cast(torch.mm(s_all[:, offs[i]:offs[i + 1]].t(), dys[i]).t(), bm.dtype).contiguous()
                    out_grads[4 * i + 3] = dbm.mul_(scales[i] * keep)
                b = params[4 * i + 1]
                if b is not None and need[6 + 4 * i]:
                    out_grads[4 * i + 1] = _cast(dys[i].sum(0), b.dtype)

            # G = dY_i B_i * s_i/(1-p), side by side in one [M, R] buffer so that dA and the LoRA part
            # of dX each run as a single GEMM with K = R whatever the number of projections.
            g = mask = None
            if need_x or need_a:
                if n == 1:
                    g = torch.mm(dys[0], _cast(params[3], cdt))
                else:
                    g = dys[0].new_empty(m, offs[n])
                    for i in range(n):
                        torch.mm(dys[i], _cast(params[4 * i + 3], cdt), out=g[:, offs[i]:offs[i + 1]])
                for i in range(n):
                    g[:, offs[i]:offs[i + 1]].mul_(scales[i] * keep)
                if p > 0:
                    mask = dropout_mask(seed, (m, d_in), p, g.device, cdt)   # regenerated, never saved

            for i in range(n):
                w = params[4 * i]
                if need[5 + 4 * i]:
                    out_grads[4 * i] = _cast(torch.mm(dys[i].t(), xc), w.dtype)

            dx = None
            if need_x:  # one [M, I] buffer holds the base and the LoRA parts
                a_all = _cast(params[2], cdt) if n == 1 else torch.cat(
                    [_cast(params[4 * i + 2], cdt) for i in range(n)])
                if mask is None:
                    dx = torch.mm(dys[0], _cast(params[0], cdt))
                    dx.addmm_(g, a_all)
                else:  # LoRA part first, so the mask multiplies it in place before the base part lands
                    dx = torch.mm(g, a_all).mul_(mask)
                    dx.addmm_(dys[0], _cast(params[0], cdt))
                for i in range(1, n):
                    dx.addmm_(dys[i], _cast(params[4 * i], cdt))
                dx = _cast(dx.view(x_shape), x_dtype)

            if need_a:
                xm = xc if mask is None else mask.mul_(xc)          # the mask is not needed after this
                da_all = torch.mm(g.t(), xm)                        # [R, I]
                for i in range(n):
                    if need[7 + 4 * i]:
                        out_grads[4 * i + 2] = _cast(da_all[offs[i]:offs[i + 1]], params[4 * i + 2].dtype)
        return (dx, None, None, None, None, *out_grads)


def _check(x: torch.Tensor, projs: Sequence[Projection], dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    for w, _, a, bm, _ in projs:
        if x.shape[-1] != w.shape[1] or a.shape[1] != w.shape[1] or bm.shape != (w.shape[0], a.shape[0]):
            raise ValueError(f"LoRA shapes do not fit: x [..., {x.shape[-1]}], W {tuple(w.shape)}, "
                             f"A {tuple(a.shape)}, B {tuple(bm.shape)}; expected W [O, I], A [r, I], B [O, r]")


def _apply(x: torch.Tensor, projs: Sequence[Projection], dropout: float,
           dropout_seed: int | None) -> tuple[torch.Tensor, ...]:
    _check(x, projs, dropout)
    cdt = compute_dtype(x)
    seed = (dropout_seed if dropout_seed is not None else _draw_seed()) if dropout > 0 else None
    flat = [t for w, b, a, bm, _ in projs for t in (w, b, a, bm)]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *flat)):
        return _LoRALinearFn.apply(x, float(dropout), seed, cdt, tuple(float(s) for *_, s in projs), *flat)
    # No graph: same math without the autograd.Function bookkeeping.
    lead = x.shape[:-1]
    with _no_autocast(x.device.type):
        outs, *_ = _forward(x.reshape(-1, x.shape[-1]), projs, float(dropout), seed, cdt)
    return tuple(y.view(*lead, y.shape[-1]) for y in outs)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float, dropout: float = 0.0, *,
                dropout_seed: int | None = None) -> torch.Tensor:
    """y = x W^T + b + scale * dropout(x) A^T B^T.  x [..., I], W [O, I], A [r, I], B [O, r] -> [..., O].

    `dropout` > 0 applies inverted dropout to the LoRA input only (the caller passes 0 in eval);
    `dropout_seed` fixes its mask (see `dropout_mask`), else a seed is drawn from torch's CPU RNG."""
    return _apply(x, [(weight, bias, lora_A, lora_B, scale)], dropout, dropout_seed)[0]


def lora_linear_qkv(x: torch.Tensor, projections: Sequence[Projection], dropout: float = 0.0, *,
                    dropout_seed: int | None = None) -> tuple[torch.Tensor, ...]:
    """Several LoRA linears reading the same x (Q/K/V): one x [A_q; A_k; A_v]^T GEMM, one saved x,
    one dA GEMM and one dX buffer for all of them. `projections` = [(W, b, A, B, scale), ...].

    With dropout > 0 the projections share one mask (as axolotl does); PEFT draws one per projection,
    so the two agree in distribution, not sample by sample."""
    if not projections:
        raise ValueError("lora_linear_qkv needs at least one projection")
    return _apply(x, projections, dropout, dropout_seed)
