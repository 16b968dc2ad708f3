"""Fused LoRA linear: the base GEMM and the LoRA path share one output and one input-gradient buffer.

    y = x W^T + b + scale * dropout(x) A^T B^T        x [..., I], W [O, I], A [r, I], B [O, r]

Letters: M = number of tokens (all leading dims of x flattened), I = in features, O = out features,
r = rank, R = sum of ranks when several projections read the same input (the autograd op takes n
projections of one x for a fused QKV; only `lora_linear`, n = 1, is public until that path is benchmarked).

Forward is one GEMM for the base (`addmm` with the bias), one skinny GEMM S = x_d A^T [M, r], and one
`addmm_` that accumulates scale * S B^T INTO the base output (GEMM epilogue with beta=1): no LoRA output
tensor, no scale kernel, no add kernel. Backward is dX = dY W with the LoRA part (dY B) A accumulated into
the same buffer by `addmm_`, plus the small dA/dB GEMMs; gradients for the fp32 masters come back in fp32.

Saved for backward: x in the compute dtype (the tensor itself when no cast happens), S [M, r] and the
parameters (no extra memory). S is saved rather than recomputed: it costs r/I of x's memory, while
recomputing it would re-read all of x, the dominant cost of a memory-bound skinny GEMM (notes §3.6).
With dropout the mask is not saved: its key (a few integers, `DropoutKey`) is, and the mask is
regenerated in backward from the same key.

Dropout masks are a pure function of (sample seed, layer, global token position, feature), so one
process, DDP and Ulysses (tokens sharded across ranks) draw the same mask for the same sample, and
activation checkpointing regenerates it. The training loop opens `dropout_scope(sample_seeds)` around
each micro-step; the sequence-parallel seam calls `set_token_shard(offset, local_tokens)`. Rules for an
input x [B, T, S..., I] (S... = any extra middle dims, prod(S) = P):
- B == len(sample_seeds): sample b's rows are keyed by its own seed; its row (t, s) sits at position
  t0 * P + t * P + s (the middle dims flattened row-major after the token dim), where t0 = the shard
  offset when a shard is set and T == local_tokens, else 0 (a replicated input, e.g. text tokens, is
  masked as one process masks it). x [B, I] has one row per sample, at position 0.
- leading dim != B (or x [I]): one key mixing all sample seeds and the layer, rows at 0..M-1.
- no scope (eval, unit code): one key from a seed drawn from torch's CPU RNG, rows at 0..M-1.
- `dropout_seed` given (tests, explicit callers): one key from it, whatever the scope, rows at 0..M-1.
Known ambiguity: a replicated input whose length happens to equal local_tokens is taken for a shard;
layers that read such inputs pass token_sharded=False (`LoRALayer.lora_replicated_input`).

Dtypes: the compute dtype is the autocast dtype when autocast is on for x's device (and x is a
float16/bfloat16/float32 tensor, as autocast does), else x's dtype. W, A, B are cast to it; the
masters' gradients are cast back to the masters' dtype. Autocast is switched off inside, every cast is
explicit. CUDA runs this same cuBLAS code path; there is no Triton kernel (none has been measured to
beat cuBLAS + these epilogues on this project's shapes).
"""
from __future__ import annotations

import functools
import hashlib
import math
import operator
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

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


# ------------------------------------------------------------------------------------ dropout masks
# Counter-based hash: splitmix64's finalizer (Steele, Lea & Flood 2014, with Stafford's Mix13 constants
# as in java.util.SplittableRandom), on int64 tensors. Multiplication wraps modulo 2^64 on every torch
# backend; right shifts of negative int64 are arithmetic, hence the masks after each shift that make
# them logical (uint64 tensors would not need them, but CPU torch has no uint64 right shift).
_M64 = (1 << 64) - 1
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_COL = 0x9E3779B97F4A7C15   # Weyl increments: features and positions step the hash input by these
_ROW = 0xD6E8FEB86659FD93
# Elements per chunk of rows: bounds the two int64 temporaries to 2 x 128 MiB however large x is.
_CHUNK = 1 << 24


def _s64(v: int) -> int:
    """A Python int as the int64 with the same low 64 bits (what torch scalars must be)."""
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def _mix64(v: int) -> int:
    """splitmix64's finalizer on a Python int (the scalar twin of `_mix64_`); returns 0 <= h < 2^64."""
    v &= _M64
    v = ((v ^ (v >> 30)) * _C1) & _M64
    v = ((v ^ (v >> 27)) * _C2) & _M64
    return v ^ (v >> 31)


def _mix64_(z: torch.Tensor, final: bool = True) -> torch.Tensor:
    """`_mix64` in place on an int64 tensor. final=False leaves out the last xor-shift, which only
    changes the low 33 bits: a threshold test on the whole word reads the top bits (saves 3 passes)."""
    z ^= (z >> 30).bitwise_and_((1 << 34) - 1)
    z *= _s64(_C1)
    z ^= (z >> 27).bitwise_and_((1 << 37) - 1)
    z *= _s64(_C2)
    if final:
        z ^= (z >> 31).bitwise_and_((1 << 33) - 1)
    return z


@functools.lru_cache(maxsize=4096)
def layer_id(name: str) -> int:
    """A stable signed 64-bit id of a module's qualified name ("blocks.3.self_attn.q"): the same in every
    process and run (unlike Python's salted `hash`). Unnamed layers ("") all share one id."""
    return _s64(int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little"))


def _key(seed: int, layer: int) -> int:
    return _s64(_mix64(_mix64(seed) ^ layer))


class DropoutKey(NamedTuple):
    """Everything a keep-mask depends on, besides its shape and p: the M rows of x [M, I] are
    len(keys) equal groups (one per sample), group g keyed by keys[g] with its rows at positions
    first_position, first_position + 1, ..."""
    keys: tuple[int, ...]
    first_position: int = 0


@dataclass(frozen=True)
class _Scope:
    seeds: tuple[int, ...]
    token_offset: int
    local_tokens: int | None


# Module-global, not thread-local: CUDA's autograd engine runs backward (and so checkpoint
# recomputation) on its own worker threads, which must see the scope too.
_active: _Scope | None = None


def _check_shard(offset: int, local_tokens: int | None) -> None:
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"token shard offset must be an int >= 0, got {offset!r}")
    if local_tokens is not None and (not isinstance(local_tokens, int) or local_tokens < 1):
        raise ValueError(f"local_tokens must be None (no shard) or an int >= 1, got {local_tokens!r}")


@contextmanager
def dropout_scope(sample_seeds: Sequence[int], *, token_offset: int = 0,
                  local_tokens: int | None = None) -> Iterator[None]:
    """Within the block LoRA dropout masks are pure functions of (sample_seeds[b], layer, global token
    position, feature) for the B = len(sample_seeds) samples of this rank's micro-batch, in batch order.
    Open it around the micro-step's forward AND backward (checkpoint recomputation happens in
    backward), or checkpoint with context_fn=dropout_checkpoint_context. On exit the previous scope (if
    any) is back. token_offset / local_tokens: as `set_token_shard`."""
    global _active
    try:
        seeds = tuple(operator.index(s) for s in sample_seeds)
    except TypeError:
        raise ValueError(f"sample_seeds must be integers (one per sample of the micro-batch), got "
                         f"{sample_seeds!r}") from None
    if not seeds:
        raise ValueError("dropout_scope needs one seed per sample of the micro-batch, got none")
    _check_shard(token_offset, local_tokens)
    previous, _active = _active, _Scope(seeds, token_offset, local_tokens)
    try:
        yield
    finally:
        _active = previous


def set_token_shard(offset: int, local_tokens: int) -> None:
    """This rank holds global token positions [offset, offset + local_tokens) of every sample (Ulysses).
    Inputs whose token dim (dim 1) has local_tokens entries are masked at those global positions;
    others are treated as replicated. A no-op outside a `dropout_scope`."""
    global _active
    _check_shard(offset, local_tokens)
    if _active is not None:
        _active = replace(_active, token_offset=offset, local_tokens=local_tokens)


@contextmanager
def _restored(scope: _Scope | None) -> Iterator[None]:
    global _active
    previous, _active = _active, scope
    try:
        yield
    finally:
        _active = previous


def dropout_checkpoint_context() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    """A `context_fn` for torch.utils.checkpoint (or the composable `checkpoint(module, ...)`): the
    recomputation runs under the dropout scope (and token shard) that was active in the forward, even
    when backward is called after the scope closed."""
    return nullcontext(), _restored(_active)


def _draw_seed() -> int:
    # From the CPU default generator: no device sync, follows torch.manual_seed, and is replayed by
    # torch.utils.checkpoint (it restores the CPU RNG state before recomputing the forward).
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def dropout_key(lead: Sequence[int], layer: int = 0, *, seed: int | None = None,
                token_sharded: bool = True) -> DropoutKey:
    """The key of the mask for an input x [*lead, I] of the layer with id `layer` (module docstring).
    `seed` fixes the key whatever the scope; token_sharded=False masks x as replicated even when its
    token count equals the shard's."""
    if seed is not None:
        return DropoutKey((_key(seed, layer),))
    scope = _active
    if scope is None:
        return DropoutKey((_key(_draw_seed(), layer),))
    if len(lead) >= 1 and lead[0] == len(scope.seeds):
        first = 0
        if token_sharded and len(lead) >= 2 and lead[1] == scope.local_tokens:
            first = scope.token_offset * math.prod(lead[2:])
        return DropoutKey(tuple(_key(s, layer) for s in scope.seeds), first)
    # The batch dim is not the samples' (e.g. frames folded into it): one key for the whole call.
    mixed = len(scope.seeds)
    for s in scope.seeds:
        mixed = _mix64(mixed ^ _mix64(s))
    return DropoutKey((_key(mixed, layer),))


def _threshold(p: float) -> int:
    """Hash outputs are uniform over the int64 range: keep when below this, with probability 1 - p."""
    return min(int((1.0 - p) * 2.0**64) - (1 << 63), (1 << 63) - 1)


def keep_mask(key: DropoutKey, rows: int, features: int, p: float, device: torch.device | str,
              dtype: torch.dtype) -> torch.Tensor:
    """The {0, 1} keep-mask [rows, features] (keep probability 1 - p) for `key`: element (m, i) of
    group g = m // (rows / G), position q = first_position + m % (rows / G) is kept when
    mix(mix(keys[g] + q * ROW) + i * COL) < threshold(p). Integer math only, so every device type
    gives the same mask, and any slice of positions is computed without the others."""
    n_groups = len(key.keys)
    assert n_groups >= 1 and rows % n_groups == 0, (key, rows)
    out = torch.empty(rows, features, dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    per = rows // n_groups
    thr = _threshold(p)
    col = torch.arange(features, dtype=torch.int64, device=device).mul_(_s64(_COL))        # [I]
    step = max(1, _CHUNK // features)
    for g, k in enumerate(key.keys):
        for a in range(0, per, step):
            n = min(step, per - a)
            q0 = key.first_position + a
            row = torch.arange(q0, q0 + n, dtype=torch.int64, device=device).mul_(_s64(_ROW)).add_(k)
            z = _mix64_(row)[:, None] + col                                               # [n, I]
            torch.lt(_mix64_(z, final=False), thr, out=out[g * per + a:g * per + a + n])
    return out


def dropout_mask(seed: int, shape: Sequence[int], p: float, device: torch.device | str,
                 dtype: torch.dtype, *, layer: int = 0) -> torch.Tensor:
    """The keep-mask that `lora_linear(..., dropout_seed=seed, layer_id=layer)` applies to an x of
    `shape` (and, outside a scope, to a call whose drawn seed was `seed`)."""
    shape = tuple(shape)
    rows = math.prod(shape[:-1])
    return keep_mask(dropout_key(shape[:-1], layer, seed=seed), rows, shape[-1], p, device, dtype).view(shape)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Tensor.to is a few microseconds even when it is a no-op; this layer calls it a dozen times a step.
    return t if t.dtype == dtype else t.to(dtype)


def _no_autocast(device_type: str) -> Any:
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def _forward(x2d: torch.Tensor, projs: Sequence[Projection], p: float, key: DropoutKey | None,
             cdt: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Returns (outputs [M, O_i], x2d in cdt, S [M, R] = (x*mask) A^T, without the 1/(1-p))."""
    xc = _cast(x2d, cdt)
    outs = [torch.mm(xc, _cast(w, cdt).t()) if b is None else torch.addmm(_cast(b, cdt), xc, _cast(w, cdt).t())
            for w, b, _, _, _ in projs]                                                   # [M, O_i]
    xm = xc
    if p > 0:
        assert key is not None
        xm = keep_mask(key, *xc.shape, p, xc.device, cdt).mul_(xc)  # 1/(1-p) is folded into the alphas
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
    def forward(ctx: Any, x: torch.Tensor, p: float, key: DropoutKey | None, cdt: torch.dtype,
                scales: tuple[float, ...], *params: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        n = len(scales)
        projs = [(params[4 * i], params[4 * i + 1], params[4 * i + 2], params[4 * i + 3], scales[i])
                 for i in range(n)]
        lead, d_in = x.shape[:-1], x.shape[-1]
        x2d = x.reshape(-1, d_in)                             # [M, I]
        with _no_autocast(x.device.type):
            outs, xc, s_all = _forward(x2d, projs, p, key, cdt)
        need = ctx.needs_input_grad  # params start at input 5: W_i 5+4i, b_i 6+4i, A_i 7+4i, B_i 8+4i
        need_w = any(need[5 + 4 * i] for i in range(n))
        need_a = any(need[7 + 4 * i] for i in range(n))
        need_bm = any(need[8 + 4 * i] for i in range(n))
        # x only when a weight or A gradient needs it; S only for the B gradients.
        ctx.save_for_backward(xc if (need_w or need_a) else None, s_all if need_bm else None,
                              *[t for t in params])
        ctx.meta = (p, key, cdt, scales, x.shape, x.dtype)
        return tuple(y.view(*lead, y.shape[-1]) for y in outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        p, key, cdt, scales, x_shape, x_dtype = ctx.meta
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
                    mask = keep_mask(key, m, d_in, p, g.device, cdt)   # regenerated from the key, never saved

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


def _apply(x: torch.Tensor, projs: Sequence[Projection], dropout: float, dropout_seed: int | None,
           layer: int, token_sharded: bool) -> tuple[torch.Tensor, ...]:
    _check(x, projs, dropout)
    cdt = compute_dtype(x)
    key = dropout_key(x.shape[:-1], layer, seed=dropout_seed, token_sharded=token_sharded) if dropout > 0 else None
    flat = [t for w, b, a, bm, _ in projs for t in (w, b, a, bm)]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *flat)):
        return _LoRALinearFn.apply(x, float(dropout), key, cdt, tuple(float(s) for *_, s in projs), *flat)
    # No graph: same math without the autograd.Function bookkeeping.
    lead = x.shape[:-1]
    with _no_autocast(x.device.type):
        outs, *_ = _forward(x.reshape(-1, x.shape[-1]), projs, float(dropout), key, cdt)
    return tuple(y.view(*lead, y.shape[-1]) for y in outs)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float, dropout: float = 0.0, *, dropout_seed: int | None = None,
                layer_id: int = 0, token_sharded: bool = True) -> torch.Tensor:
    """y = x W^T + b + scale * dropout(x) A^T B^T.  x [..., I], W [O, I], A [r, I], B [O, r] -> [..., O].

    `dropout` > 0 applies inverted dropout to the LoRA input only (the caller passes 0 in eval). Its
    mask follows the active `dropout_scope` for the layer `layer_id` (see the module docstring), or is
    fixed by `dropout_seed` (see `dropout_mask`), else keyed by a seed drawn from torch's CPU RNG.
    token_sharded=False: x is never a token shard (an input replicated on every Ulysses rank)."""
    return _apply(x, [(weight, bias, lora_A, lora_B, scale)], dropout, dropout_seed, layer_id, token_sharded)[0]
