"""Wan2.2 DiT (upstream `WanModel`), single-device code with a sequence-parallel seam.

Parameter names equal the upstream checkpoint (`ffn.0`, `norm3`, `head.modulation`, ...), so official
shards load with `strict=True`; the diffusers layout goes through `backbones.wan.keymap`.

Shapes: B batch, C model width (`dim`), F/H/W latent frames/height/width, f/h/w the patch grid,
N = f*h*w true tokens, L tokens after padding to `seq_len` / a multiple of the SP size,
Ll = L / sp.size tokens held by this rank, Lc text tokens (<= text_len), Lt = 1 (one timestep per
sample) or L (one per token), NH heads, D head dim, R = D / 2 rotary pairs.

Precision follows upstream: time embedding, time projection, modulation, gates, norms and the head
run in fp32 even under bf16 autocast; the residual stream is fp32. RoPE tables are built in float64 and
applied in float32 (the rotation of an fp32 q/k in fp32 differs from upstream's float64 one by ~1 ulp).

Activation memory: autograd keeps only what backward needs. The q/k RMSNorms save their (compute-dtype)
input and fp32 inverse RMS instead of fp32 copies; the modulated LayerNorms save the normalised x in the
compute dtype and the fp32 inverse std instead of the fp32 residual (exact in fp32 training; under bf16
autocast the LayerNorm backward reads a bf16 normalised x, like every bf16 activation autograd keeps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.attention import attention
from lora_core.distributed.ulysses import SequenceGroup, gather_sequence, sequence_layout, shard_sequence

__all__ = ["WanDiTConfig", "DIT_PRESETS", "WanDiT", "WanAttentionBlock", "SequenceParallel"]


@dataclass(frozen=True)
class WanDiTConfig:
    dim: int = 3072
    ffn_dim: int = 14336
    freq_dim: int = 256
    num_heads: int = 24
    num_layers: int = 30
    in_dim: int = 48
    out_dim: int = 48
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = field(default=(1, 2, 2))
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True

    def __post_init__(self) -> None:
        # YAML gives lists; a tuple keeps the frozen config hashable.
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3:
            raise ValueError(f"WanDiTConfig.patch_size={self.patch_size} must have 3 entries (t, h, w), e.g. (1, 2, 2)")
        if self.dim % self.num_heads != 0:
            raise ValueError(f"WanDiTConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}; "
                             f"pick num_heads dividing dim")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head dim dim/num_heads={self.head_dim} must be even for RoPE pairs; "
                             f"change dim or num_heads")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


DIT_PRESETS: dict[str, WanDiTConfig] = {
    # Wan2.2 TI2V-5B, hub config.json plus the upstream defaults it leaves out (text_dim, patch, norms).
    "5b": WanDiTConfig(dim=3072, ffn_dim=14336, freq_dim=256, num_heads=24, num_layers=30, in_dim=48,
                       out_dim=48, text_dim=4096, text_len=512),
    # Test size: in_dim = tiny VAE z_dim, text_dim = tiny text encoder width (contracts with those helpers).
    "tiny": WanDiTConfig(dim=128, ffn_dim=256, freq_dim=256, num_heads=2, num_layers=2, in_dim=16,
                         out_dim=16, text_dim=64, text_len=512),
}


# What `WanDiT.sp` must provide (size, rank, gather): the protocol the token-sharding helpers take; the
# process-group side (`UlyssesGroup`) lives in `lora_core.distributed`.
SequenceParallel = SequenceGroup


def _fp32_island(device_type: str) -> torch.autocast:
    """Region computing in fp32 whatever the outer autocast says.

    CUDA autocast has an fp32 mode that also up-casts bf16 weights (upstream's choice); other devices
    only can switch autocast off, so their weights must be fp32 there.
    """
    if device_type == "cuda":
        return torch.autocast("cuda", dtype=torch.float32)
    return torch.autocast(device_type, enabled=False)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep features [...] -> [..., dim] fp32, laid out [cos | sin] as upstream."""
    half = dim // 2
    # float64 as upstream: phases reach 1000 rad, where fp32 loses ~1e-4.
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    phase = pos[..., None] * freqs
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1).float()


def rope_apply(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]). x [B, Ll, NH, D], rope [Ll, R, 2] (cos, sin).

    Computes in rope's dtype, at least float32 (WanDiT passes float32 tables: within ~1 ulp of
    upstream's float64 rotation of the fp32 q/k). Returns float32; callers cast to their attention dtype.
    """
    xp = x.to(torch.promote_types(rope.dtype, torch.float32)).unflatten(-1, (-1, 2))  # [B, Ll, NH, R, 2]
    x0, x1 = xp[..., 0], xp[..., 1]
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).float()


class _RMSNormFn(torch.autograd.Function):
    """(x.float() * rstd).type_as(x) * weight with rstd = rsqrt(mean(x.float()^2) + eps), in fp32.

    Same forward ops as the plain expression; saves x in its own dtype and rstd [..., 1] fp32 (autograd
    would keep fp32 copies of x and of the normalised x), and recomputes x * rstd in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
        out = (xf * rstd).type_as(x) * weight
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, rstd, weight = ctx.saved_tensors
        xhat = x.float() * rstd
        gx = gw = None
        if ctx.needs_input_grad[1]:
            gw = (g * xhat.type_as(x)).reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # as autograd: the grad reaching the cast back to x's dtype is rounded to that dtype first
            gn = (g * weight).to(x.dtype).float()
            gx = (rstd * (gn - xhat * (gn * xhat).mean(dim=-1, keepdim=True))).to(x.dtype)
        return gx, gw, None


class WanRMSNorm(nn.Module):
    """RMSNorm over the full width (all heads together), statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics: bf16 mean of squares over 3072 channels is too coarse.
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x)
        return normed * self.weight


class _ModulatedLayerNormFn(torch.autograd.Function):
    """(layer_norm(x.float()) * mul + add).to(cdt): LayerNorm without affine, then a (broadcast) scale and
    shift, all in fp32 as upstream, and the cast to the compute dtype the next linear takes.

    Saves the normalised x in the compute dtype (fp32 in fp32 training: exact) and rstd [..., 1] fp32,
    not the fp32 input, the normalised x in fp32 and the modulated product autograd would keep."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mul: torch.Tensor, add: torch.Tensor, eps: float,
                cdt: torch.dtype) -> torch.Tensor:
        xhat, _, rstd = torch.native_layer_norm(x.float(), (x.shape[-1],), None, None, eps)
        xhat = xhat.type_as(x)
        out = (xhat * mul + add).to(cdt)
        ctx.save_for_backward(xhat.to(cdt), rstd, mul)
        ctx.meta = (x.dtype, add.shape, add.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xhat, rstd, mul = ctx.saved_tensors
        x_dtype, add_shape, add_dtype = ctx.meta
        need_x, need_mul, need_add = ctx.needs_input_grad[:3]
        gf = g.float()
        xh = xhat.float()
        gx = gmul = gadd = None
        if need_mul:
            gmul = (gf * xh).sum_to_size(mul.shape).to(mul.dtype)
        if need_add:
            gadd = gf.sum_to_size(add_shape).to(add_dtype)
        if need_x:
            dxh = gf * mul
            gx = rstd * (dxh - dxh.mean(dim=-1, keepdim=True) - xh * (dxh * xh).mean(dim=-1, keepdim=True))
            gx = gx.to(x_dtype)
        return gx, gmul, gadd, None, None


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (weights up-cast too), result in the input dtype."""

    def modulate(self, x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                 cdt: torch.dtype) -> torch.Tensor:
        """(self(x) * (1 + scale) + shift).to(cdt) (scale/shift None: the module's own weight/bias), in fp32,
        keeping for backward only the normalised x in cdt and the fp32 inverse std."""
        if scale is None:
            mul, add = self.weight, self.bias
        else:
            mul, add = 1 + scale, shift
        if mul is None or not torch.is_grad_enabled() or not any(
                t is not None and t.requires_grad for t in (x, mul, add)):
            return (self(x) if scale is None else self(x) * mul + add).to(cdt)
        mul = mul.float()
        add = torch.zeros_like(mul) if add is None else add.float()
        return _ModulatedLayerNormFn.apply(x, mul, add, self.eps, cdt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 because the residual stream is fp32 and bf16 statistics drift at this width.
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class _Projections(nn.Module):
    """q/k/v/o projections with q/k RMSNorm over the full width, shared by both attentions."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()


class WanSelfAttention(_Projections):
    """Self-attention with q/k RMSNorm and 3-axis RoPE. The kernel is `self.attn_op` (Ulysses swaps it)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6) -> None:
        super().__init__(dim, num_heads, qk_norm, eps)
        # attn_op(q, k, v, *, k_lens) with q/k/v [B, Ll, NH, D]; an instance attribute so a sequence-parallel
        # wrapper can replace it per module without touching forward.
        self.attn_op = attention
    def forward(self, x: torch.Tensor, rope: torch.Tensor, k_lens: torch.Tensor | None) -> torch.Tensor:
        """x [B, Ll, C], rope [Ll, R, 2], k_lens [B] or None -> [B, Ll, C]."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))  # [B, Ll, NH, D]
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        # Upstream feeds flash-attn q/k in the compute dtype after fp64 RoPE; v carries that dtype.
        q = rope_apply(q, rope).to(v.dtype)
        k = rope_apply(k, rope).to(v.dtype)
        y = self.attn_op(q, k, v, k_lens=k_lens)
        return self.o(y.flatten(2))


class WanCrossAttention(_Projections):
    """Text cross-attention: q from video tokens, k/v from all text_len text tokens, no mask (as upstream)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, Ll, C], context [B, text_len, C] -> [B, Ll, C]."""
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        # The fp32 RMSNorm output is brought back to the compute dtype, as upstream's flash-attn call does.
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1)).to(v.dtype)
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1)).to(v.dtype)
        return self.o(attention(q, k, v).flatten(2))


class WanAttentionBlock(nn.Module):
    """Modulated self-attn, un-modulated cross-attn, modulated FFN. Pure in its tensor arguments."""

    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        # Naming trap kept from upstream: norm3 is the affine cross-attn pre-norm, norm2 the FFN one.
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = WanLayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, rope: torch.Tensor,
                k_lens: torch.Tensor | None) -> torch.Tensor:
        """x [B, Ll, C] fp32, e0 [B, Lt, 6, C] fp32 (Lt 1 or Ll), context [B, text_len, C],
        rope [Ll, R, 2] float32 (or float64), k_lens [B] or None -> [B, Ll, C] fp32.
        """
        # Modulation and gates in fp32 (upstream asserts it): they scale the fp32 residual stream directly.
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (
            self.modulation.float().unsqueeze(0) + e0.float()).unbind(2)  # each [B, Lt, C]
        # context already carries the compute dtype (autocast dtype, else the weights' dtype).
        cdt = context.dtype

        h = self.norm1.modulate(x, scale_sa, shift_sa, cdt)
        x = x + self.self_attn(h, rope, k_lens) * gate_sa

        h = self.norm3.modulate(x, None, None, cdt) if isinstance(self.norm3, WanLayerNorm) else x.to(cdt)
        x = x + self.cross_attn(h, context)

        h = self.norm2.modulate(x, scale_ff, shift_ff, cdt)
        x = x + self._ffn(h) * gate_ff
        return x

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        return self.ffn(h)


class WanHead(nn.Module):
    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, Ll, C] fp32, e [B, Lt, C] fp32 (time_embedding output, not e0) -> [B, Ll, pt*ph*pw*out_dim] fp32."""
        with _fp32_island(x.device.type):  # upstream runs the whole head in fp32
            shift, scale = (self.modulation.float().unsqueeze(0) + e.float().unsqueeze(2)).unbind(2)
            return self.head(self.norm(x.float()) * (1 + scale) + shift).float()


class WanDiT(nn.Module):
    """Wan2.2 DiT. Build on the meta device, then load the upstream state dict with `strict=True`."""

    block_class = WanAttentionBlock

    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = WanHead(cfg)
        # Text tokens are replicated on every sequence-parallel rank (only video tokens are sharded): LoRA dropout
        # must then draw the same masks on every rank, even when the text length equals a shard's length.
        for m in [self.text_embedding[0], self.text_embedding[2]] + [
                p for blk in self.blocks for p in (blk.cross_attn.k, blk.cross_attn.v)]:
            m.lora_replicated_input = True  # type: ignore[assignment]
        # Set by the sequence-parallel step; see `SequenceParallel`.
        self.sp: SequenceParallel | None = None
        # RoPE base tables per device. A plain attribute, not a buffer: keeps the state dict equal to the
        # checkpoint and lets the model be built on the meta device.
        self._rope_cache: dict[torch.device, torch.Tensor] = {}

    # -- RoPE ----------------------------------------------------------------------------------------
    def _rope_axes(self) -> tuple[int, int, int]:
        d = self.config.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def _rope_table(self, device: torch.device, n_pos: int) -> torch.Tensor:
        """[P, R, 2] float64 (cos, sin) for positions 0..P-1 with P >= max(1024, n_pos); each axis'
        frequencies normalised by its own rotary width, theta 10000."""
        table = self._rope_cache.get(device)
        if table is not None and table.shape[0] >= n_pos:
            return table
        pos = torch.arange(max(1024, n_pos), dtype=torch.float64, device=device)
        phases = []
        for width in self._rope_axes():
            inv_freq = 1.0 / torch.pow(10000.0, torch.arange(0, width, 2, dtype=torch.float64, device=device) / width)
            phases.append(torch.outer(pos, inv_freq))
        phase = torch.cat(phases, dim=1)
        table = torch.stack([torch.cos(phase), torch.sin(phase)], dim=-1)
        self._rope_cache[device] = table
        return table

    def rope_for_grid(self, grid: tuple[int, int, int], total_len: int, device: torch.device) -> torch.Tensor:
        """[total_len, R, 2] rotations for the (f, h, w) grid in row-major token order; rows past f*h*w
        are the identity (padding tokens pass through unrotated)."""
        f, h, w = grid
        rt, rh, _ = (a // 2 for a in self._rope_axes())
        table = self._rope_table(device, max(grid))
        tf = table[:f, :rt][:, None, None].expand(f, h, w, -1, -1)
        th = table[:h, rt:rt + rh][None, :, None].expand(f, h, w, -1, -1)
        tw = table[:w, rt + rh:self.config.head_dim // 2][None, None, :].expand(f, h, w, -1, -1)
        rope = torch.cat([tf, th, tw], dim=3).reshape(f * h * w, -1, 2)
        if total_len > f * h * w:
            ident = torch.zeros(total_len - f * h * w, rope.shape[1], 2, dtype=rope.dtype, device=device)
            ident[..., 0] = 1.0
            rope = torch.cat([rope, ident], dim=0)
        return rope

    # -- forward -------------------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> tuple[int, int, int]:
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, {cfg.in_dim}, F, H, W] latents "
                             f"(in_dim={cfg.in_dim} must equal the VAE z_dim)")
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(f"latent size (F, H, W)={tuple(x.shape[2:])} is not divisible by patch_size="
                             f"{cfg.patch_size}; crop or pad the latent to a multiple")
        grid = tuple(s // p for s, p in zip(x.shape[2:], cfg.patch_size))
        b = x.shape[0]
        if t.ndim not in (1, 2) or t.shape[0] != b:
            raise ValueError(f"t has shape {tuple(t.shape)}; expected [{b}] (one timestep per sample) or "
                             f"[{b}, L] (one per patch token)")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context has shape {tuple(context.shape)}; expected [{b}, Lc, {cfg.text_dim}]")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} text tokens; at most text_len={cfg.text_len} "
                             f"(truncate the prompt encoding)")
        return grid

    def _time_embed(self, t: torch.Tensor, n: int, seq_len: int, total_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] or [B, n|seq_len] -> e [B, Lt, C], e0 [B, Lt, 6, C], both fp32 (Lt = 1 or total_len)."""
        if t.ndim == 1:
            t = t[:, None]  # one timestep broadcast over tokens: no per-token copies of e0
        else:
            if t.shape[1] not in (n, seq_len):
                raise ValueError(f"per-token timesteps t have {t.shape[1]} columns; expected the token count "
                                 f"{n} (= f*h*w) or seq_len={seq_len}")
            if t.shape[1] < total_len:
                # Padding tokens are dropped at the end; repeating the last value keeps them in range.
                t = torch.cat([t, t[:, -1:].expand(-1, total_len - t.shape[1])], dim=1)
        with _fp32_island(t.device.type):  # upstream keeps the time MLPs in fp32
            e = self.time_embedding(sinusoidal_embedding(t, self.config.freq_dim)).float()
            e0 = self.time_projection(e).float().unflatten(2, (6, self.config.dim))
        return e, e0

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                seq_len: int | None = None) -> torch.Tensor:
        """Velocity prediction.

        x [B, in_dim, F, H, W] latents (all samples share F, H, W); t [B] or [B, N] (or [B, seq_len])
        timesteps in 0..1000; context [B, Lc, text_dim] text encodings, Lc <= text_len, zero rows for
        padding (zero-padded to text_len here and not masked, as upstream); seq_len pads the token
        sequence (upstream's padded length, >= N). Returns [B, out_dim, F, H, W] float32.
        """
        cfg = self.config
        grid = self._check_inputs(x, t, context)
        b, n = x.shape[0], math.prod(grid)
        if seq_len is not None and seq_len < n:
            raise ValueError(f"seq_len={seq_len} is smaller than the token count {n} = f*h*w for grid {grid}; "
                             f"pass seq_len >= {n} or None")
        sp = self.sp
        seq = n if seq_len is None else seq_len
        total, _, _, _ = sequence_layout(seq, sp)  # L: seq padded so every rank holds the same chunk length

        dev = x.device
        cdt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else self.patch_embedding.weight.dtype

        # Patchify: [B, in_dim, F, H, W] -> [B, C, f, h, w] -> [B, N, C]; residual stream fp32 from here on.
        x = self.patch_embedding(x.to(cdt)).flatten(2).transpose(1, 2).float()
        if seq > n:
            x = F.pad(x, (0, 0, 0, seq - n))  # [B, seq, C], zero tokens
        x = shard_sequence(x, sp, dim=1)  # [B, Ll, C], zero tokens up to L

        e, e0 = self._time_embed(t, n, seq, total)
        if e.shape[1] > 1:
            e, e0 = shard_sequence(e, sp, dim=1), shard_sequence(e0, sp, dim=1)

        context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))  # [B, text_len, text_dim]
        context = self.text_embedding(context.to(cdt))  # [B, text_len, C]

        # float64 tables, applied in float32 (see rope_apply)
        rope = shard_sequence(self.rope_for_grid(grid, total, dev), sp, dim=0).float()  # [Ll, R, 2]
        # Mask padded keys only when there are any: keeps the unmasked (faster) kernel otherwise.
        k_lens = torch.full((b,), n, dtype=torch.int32, device=dev) if total > n else None

        for block in self.blocks:
            x = block(x, e0, context, rope, k_lens)
        x = self.head(x, e)  # [B, Ll, pt*ph*pw*out_dim]

        x = gather_sequence(x, sp, dim=1)  # [B, L, ...]
        return self.unpatchify(x[:, :n], grid)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, N, pt*ph*pw*out_dim] (channel fastest) -> [B, out_dim, F, H, W] float32."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, c, f, pt, h, ph, w, pw]
        return x.reshape(x.shape[0], self.config.out_dim, f * pt, h * ph, w * pw).float()

    # -- init ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Upstream's from-scratch init; also resets norms so a meta-built, `to_empty` model is fully defined."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (WanRMSNorm, nn.LayerNorm)):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        for block in self.blocks:
            block.modulation.copy_(torch.randn_like(block.modulation) / self.config.dim ** 0.5)
        self.head.modulation.copy_(torch.randn_like(self.head.modulation) / self.config.dim ** 0.5)
