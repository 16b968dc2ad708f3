"""CogVideoX 1.0 transformer (diffusers `CogVideoXTransformer3DModel`), single-device code with a
sequence-parallel seam.

Module and parameter names equal the diffusers checkpoint (`patch_embed.proj`, `transformer_blocks.{i}.attn1.to_out.0`,
`ff.net.0.proj`, ...), so `THUDM/CogVideoX-{2b,5b,5b-I2V}/transformer` loads with `strict=True` and no key map.

Shapes: B batch, F latent frames, C latent channels, H/W latent height/width, p the spatial patch size,
h = H/p, w = W/p, N = F*h*w video tokens, T text tokens (= max_text_seq_length, 226), D model width
(heads * head_dim), NH heads, Dh head dim, E time-embedding width. Under sequence parallel (size K):
Lv = ceil(N/K) video tokens and Lt = ceil(T/K) text tokens per rank.

Positions: the 2B adds a fixed 3D sin-cos table (computed, never stored); the 5B rotates video q/k with 3D
RoPE; the 5B-I2V adds a stored learned table and uses RoPE.

Precision follows diffusers: the residual stream, modulation and attention run in the compute dtype; the
timestep sinusoid, the RoPE rotation and the position tables are fp32 (sin-cos built in float64, as upstream).
One deliberate difference: LayerNorm statistics are fp32 (diffusers' run in the weights' dtype); identical in fp32.

Sequence parallel (`sp` set): video tokens are sharded, text tokens replicated; see `JointLayout`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.attention import attention
from lora_core.distributed.ulysses import SequenceGroup, gather_sequence, sequence_layout, shard_sequence

__all__ = ["CogVideoXConfig", "TRANSFORMER_PRESETS", "CogVideoXTransformer3DModel", "CogVideoXBlock",
           "CogVideoXAttention", "sincos_pos_embed_3d", "rotary_pos_embed_3d", "JointLayout"]


@dataclass(frozen=True)
class CogVideoXConfig:
    """The diffusers transformer/config.json keys this model uses, names verbatim."""
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    time_embed_dim: int = 512
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ValueError("use_learned_positional_embeddings=True needs use_rotary_positional_embeddings=True "
                             "(no CogVideoX checkpoint has a learned table without RoPE); set both or neither")
        if self.inner_dim % 16 and not self.use_rotary_positional_embeddings:
            raise ValueError(f"inner dim {self.inner_dim} (heads * head_dim) must be divisible by 16 for the 3D "
                             f"sin-cos table (D/4 temporal, 3D/4 spatial, each half sin half cos); change the sizes")
        if self.use_rotary_positional_embeddings and self.attention_head_dim % 16:
            raise ValueError(f"attention_head_dim={self.attention_head_dim} must be divisible by 16 for 3D RoPE "
                             f"(t: Dh/4, h and w: 3*Dh/8, each in pairs); change attention_head_dim")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def sample_grid(self) -> tuple[int, int, int]:
        """(f, h, w) token grid of the training size; sample_frames counts pixel frames (upstream quirk)."""
        return ((self.sample_frames - 1) // self.temporal_compression_ratio + 1,
                self.sample_height // self.patch_size, self.sample_width // self.patch_size)


TRANSFORMER_PRESETS: dict[str, CogVideoXConfig] = {
    # THUDM/CogVideoX-2b transformer/config.json
    "2b": CogVideoXConfig(num_attention_heads=30, num_layers=30),
    # THUDM/CogVideoX-5b transformer/config.json
    "5b": CogVideoXConfig(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
    # THUDM/CogVideoX-5b-I2V: 16 noisy + 16 image-latent channels, learned table plus RoPE
    "5b-i2v": CogVideoXConfig(num_attention_heads=48, num_layers=42, in_channels=32,
                              use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True),
    # Test size: sin-cos like the 2B; override the two flags for the 5B / I2V schemes. Sample grid 2 x 4 x 6.
    "tiny": CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, time_embed_dim=24, text_embed_dim=32,
                            num_layers=2, sample_width=12, sample_height=8, sample_frames=5),
    # the I2V scheme at test size (32 input channels, learned table + RoPE); the learned table fixes the grid at
    # 3 x 4 x 6 latents: 9 frames of 64 x 96
    "tiny-i2v": CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, time_embed_dim=24, text_embed_dim=32,
                                num_layers=2, sample_width=12, sample_height=8, sample_frames=9, in_channels=32,
                                use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True),
}


# ------------------------------------------------------------------------------- position tables
def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos [M] -> [M, dim] float64 laid out [sin | cos] (sin first, unlike the timestep sinusoid)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = torch.outer(pos.to(torch.float64), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_3d(dim: int, grid: tuple[int, int, int], spatial_scale: float, temporal_scale: float,
                        device: torch.device | None = None) -> torch.Tensor:
    """The 2B's fixed table for video tokens: [N, dim] float64, tokens in (f, h, w) row-major order.

    Per token [temporal (dim/4) | width coordinate (3dim/8) | height coordinate (3dim/8)]; the width half comes
    first as in upstream's "xy" meshgrid. Positions are float32 arange / scale, as upstream, then float64.
    """
    f, h, w = grid
    spatial, temporal = 3 * dim // 4, dim // 4
    pos_w = torch.arange(w, dtype=torch.float32, device=device) / spatial_scale
    pos_h = torch.arange(h, dtype=torch.float32, device=device) / spatial_scale
    emb_w = _sincos_1d(spatial // 2, pos_w)[None, :].expand(h, w, -1)          # [h, w, 3dim/8]
    emb_h = _sincos_1d(spatial // 2, pos_h)[:, None].expand(h, w, -1)
    emb_s = torch.cat([emb_w, emb_h], dim=-1).reshape(1, h * w, spatial).expand(f, -1, -1)
    pos_t = torch.arange(f, dtype=torch.float32, device=device) / temporal_scale
    emb_t = _sincos_1d(temporal, pos_t)[:, None].expand(-1, h * w, -1)         # [f, h*w, dim/4]
    return torch.cat([emb_t, emb_s], dim=-1).reshape(f * h * w, dim)


def _rope_1d(dim: int, pos: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """pos [M] -> cos, sin [M, dim] fp32, each angle repeated for its adjacent channel pair."""
    # fp32 frequencies and angles, as upstream computes them; the checkpoint was trained with these values.
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim))
    ang = torch.outer(pos, freqs)
    return ang.cos().repeat_interleave(2, dim=1), ang.sin().repeat_interleave(2, dim=1)


def rotary_pos_embed_3d(head_dim: int, grid: tuple[int, int, int], theta: float = 10000.0,
                        device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE of the 5B for video tokens: cos, sin [N, head_dim] fp32, axes [t (Dh/4) | h (3Dh/8) | w (3Dh/8)].

    Integer positions 0..f-1, 0..h-1, 0..w-1 (upstream's "slice" grid; equal to the pipeline's "linspace"
    grid at the 480x720 training size)."""
    f, h, w = grid
    dims = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    parts = [_rope_1d(d, torch.arange(n, dtype=torch.float32, device=device), theta) for d, n in zip(dims, grid)]
    out = []
    for which in (0, 1):
        t, hh, ww = (p[which] for p in parts)
        out.append(torch.cat([t[:, None, None].expand(f, h, w, -1), hh[None, :, None].expand(f, h, w, -1),
                              ww[None, None, :].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, head_dim))
    return out[0], out[1]


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs. x [B, L, NH, Dh], cos/sin [L, Dh] -> [B, L, NH, Dh] in x's dtype."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)
    # fp32 rotation as upstream: bf16 products would round each rotated pair differently.
    return (x.float() * cos[None, :, None] + rotated.float() * sin[None, :, None]).to(x.dtype)


# ---------------------------------------------------------------------------------- building blocks
class _LayerNormFp32Fn(torch.autograd.Function):
    """F.layer_norm(x.float(), shape, w.float(), b.float(), eps).to(x.dtype) with the same forward and backward
    kernels autograd would run, but saving x in its own dtype (plus the fp32 mean and rstd [..., 1]) instead of
    its fp32 copy: backward re-makes x.float() (exact) and calls native_layer_norm_backward, so the gradients
    are bit-identical to the plain expression and a bf16 input keeps half the bytes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                shape: tuple[int, ...], eps: float) -> torch.Tensor:
        w = weight.float() if weight is not None else None
        b = bias.float() if bias is not None else None
        out, mean, rstd = torch.native_layer_norm(x.float(), shape, w, b, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        ctx.shape = shape
        return out.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mean, rstd, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.float() if weight is not None else None
        b = bias.float() if bias is not None else None
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            g.float(), x.float(), ctx.shape, mean, rstd, w, b, [need_x, need_w and w is not None,
                                                               need_b and b is not None])
        return (gx.to(x.dtype) if gx is not None else None, gw.to(weight.dtype) if gw is not None else None,
                gb.to(bias.dtype) if gb is not None else None, None, None)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with fp32 statistics (weights up-cast too), result in the input dtype. When autograd
    records it, it keeps the input in its own dtype, not the fp32 copy (`_LayerNormFp32Fn`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 because bf16 variance over thousands of channels is coarse; identical in fp32.
        params = [p for p in (self.weight, self.bias) if p is not None]
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            with torch.autocast(x.device.type, enabled=False):
                return _LayerNormFp32Fn.apply(x, self.weight, self.bias, tuple(self.normalized_shape), self.eps)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class CogVideoXPatchEmbed(nn.Module):
    """Per-frame Conv2d patchify and text projection (plus the I2V's stored learned table)."""

    def __init__(self, cfg: CogVideoXConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, kernel_size=(p, p), stride=p)
        self.text_proj = nn.Linear(cfg.text_embed_dim, cfg.inner_dim)
        if cfg.use_learned_positional_embeddings:
            # [1, T + N_sample, D]: rows for text positions too. A buffer, as upstream (stored, not trained).
            n = math.prod(cfg.sample_grid)
            self.register_buffer("pos_embedding", torch.zeros(1, cfg.max_text_seq_length + n, cfg.inner_dim),
                                 persistent=True)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] -> [B, dim] fp32 laid out [cos | sin] (flip_sin_to_cos, freq_shift 0)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    args = timestep[:, None].float() * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class CogVideoXLayerNormZero(nn.Module):
    """Expert adaptive LayerNorm: one LayerNorm, separate modulation for video and text tokens."""

    def __init__(self, conditioning_dim: int, embedding_dim: int, eps: float) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_dim, 6 * embedding_dim)
        self.norm = LayerNorm(embedding_dim, eps=eps)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """video [B, Lv, D], text [B, T, D], temb [B, E] -> normed video, normed text, gate [B, 1, D], enc_gate."""
        shift, scale, gate, enc_shift, enc_scale, enc_gate = self.linear(self.silu(temb))[:, None].chunk(6, dim=-1)
        hidden_states = self.norm(hidden_states) * (1 + scale) + shift
        encoder_hidden_states = self.norm(encoder_hidden_states) * (1 + enc_scale) + enc_shift
        return hidden_states, encoder_hidden_states, gate, enc_gate


class AdaLayerNorm(nn.Module):
    """Output-head modulation; chunk order shift then scale (opposite to most DiTs)."""

    def __init__(self, embedding_dim: int, output_dim: int, eps: float) -> None:
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, output_dim)
        self.norm = LayerNorm(output_dim // 2, eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(self.silu(temb))[:, None].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class GELU(nn.Module):
    """Linear then tanh-GELU; the module holding `proj` keeps the `ff.net.0.proj` key."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim),
                                  nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


@dataclass
class JointLayout:
    """How this rank's [text chunk ; video chunk] sits in the joint sequence under sequence parallel.

    Text is replicated; each rank feeds attention only its chunk of the text (Lt tokens, of which
    `text_real` are real) and its video chunk (Lv tokens, `video_real` real). The ranks' chunks gathered in
    rank order are a permutation of [text ; video], which attention does not see (RoPE is applied before the
    kernel and there is no positional mask); padding, moved to the end of the last rank's chunk, is masked
    with k_lens. Backward: the gather of the text output keeps this rank's rows, so each rank carries the
    gradient of its own text chunk and the SUM over the group is the true gradient, as for video tokens.
    """
    sp: SequenceGroup
    text_len: int
    text_lo: int
    text_local: int
    text_real: int
    video_real: int
    k_lens: torch.Tensor | None
    order: torch.Tensor | None  # local index permutation putting padding last; None when this rank has none
    inverse: torch.Tensor | None

    def text_chunk(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [B, Lt, ...]: this rank's text rows, zero rows past T. Not `shard_sequence`: that
        would move the fused LoRA op's token offset, which must stay the video chunk's."""
        pad = self.text_lo + self.text_local - x.shape[1]
        if pad > 0:
            x = F.pad(x, [0, 0] * (x.ndim - 2) + [0, pad])
        return x[:, self.text_lo:self.text_lo + self.text_local]


class CogVideoXAttention(nn.Module):
    """Joint self-attention over [text ; video] with per-head q/k LayerNorm and RoPE on video q/k.

    The kernel is `self.attn_op(q, k, v, *, k_lens)` with q/k/v [B, L, NH, Dh]; an instance attribute so a
    sequence-parallel wrapper replaces it per module without touching forward."""

    def __init__(self, cfg: CogVideoXConfig) -> None:
        super().__init__()
        d, self.heads = cfg.inner_dim, cfg.num_attention_heads
        self.norm_q = LayerNorm(cfg.attention_head_dim, eps=1e-6)
        self.norm_k = LayerNorm(cfg.attention_head_dim, eps=1e-6)
        self.to_q = nn.Linear(d, d, bias=cfg.attention_bias)
        self.to_k = nn.Linear(d, d, bias=cfg.attention_bias)
        self.to_v = nn.Linear(d, d, bias=cfg.attention_bias)
        self.to_out = nn.ModuleList([nn.Linear(d, d), nn.Dropout(cfg.dropout)])
        self.attn_op = attention

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, L, D] -> q, k, v [B, L, NH, Dh], q/k LayerNorm-ed per head."""
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.heads, -1)))
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.heads, -1)))
        return q, k, self.to_v(x).unflatten(-1, (self.heads, -1))

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor] | None, layout: JointLayout | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, Lv, D], text [B, T, D] (replicated), rotary cos/sin [Lv, Dh] or None -> (video out
        [B, Lv, D], text out [B, T, D]).

        Text and video are projected in separate calls (upstream concatenates first; per token, so the same
        numbers): each projection input is then either the full replicated text or this rank's video chunk,
        the two kinds of input the fused LoRA dropout tells apart, so its masks match a single process."""
        qt, kt, vt = self._qkv(encoder_hidden_states)  # [B, T, NH, Dh]
        qv, kv, vv = self._qkv(hidden_states)  # [B, Lv, NH, Dh]
        if rotary is not None:  # text tokens carry no rotary position
            qv, kv = rope_apply(qv, *rotary), rope_apply(kv, *rotary)
        if layout is not None:  # this rank's text chunk only; the other ranks bring theirs
            qt, kt, vt = (layout.text_chunk(t) for t in (qt, kt, vt))
        lt = qt.shape[1]
        q, k, v = torch.cat([qt, qv], dim=1), torch.cat([kt, kv], dim=1), torch.cat([vt, vv], dim=1)
        k_lens, order = (None, None) if layout is None else (layout.k_lens, layout.order)
        if order is not None:
            q, k, v = (t.index_select(1, order) for t in (q, k, v))
        y = self.attn_op(q, k, v, k_lens=k_lens)  # [B, Lt + Lv, NH, Dh]
        if order is not None:
            y = y.index_select(1, layout.inverse)
        y_text, y_video = y[:, :lt].flatten(2), y[:, lt:].flatten(2)
        if layout is not None:
            y_text = gather_sequence(y_text, layout.sp, dim=1)[:, :layout.text_len]  # replicated again
        return self._out(y_video), self._out(y_text)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        return self.to_out[1](self.to_out[0](y))


class CogVideoXBlock(nn.Module):
    """Expert adaLN -> joint attention -> gated residual; expert adaLN -> shared FF -> gated residual."""

    def __init__(self, cfg: CogVideoXConfig) -> None:
        super().__init__()
        self.norm1 = CogVideoXLayerNormZero(cfg.time_embed_dim, cfg.inner_dim, cfg.norm_eps)
        self.attn1 = CogVideoXAttention(cfg)
        self.norm2 = CogVideoXLayerNormZero(cfg.time_embed_dim, cfg.inner_dim, cfg.norm_eps)
        self.ff = FeedForward(cfg.inner_dim, cfg.dropout)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None, layout: JointLayout | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, Lv, D], text [B, T, D], temb [B, E] -> (video, text), same shapes."""
        v, e, gate, enc_gate = self.norm1(hidden_states, encoder_hidden_states, temb)
        attn_v, attn_e = self.attn1(v, e, rotary, layout)
        hidden_states = hidden_states + gate * attn_v
        encoder_hidden_states = encoder_hidden_states + enc_gate * attn_e

        v, e, gate, enc_gate = self.norm2(hidden_states, encoder_hidden_states, temb)
        # [text; video] in one FF call as upstream: one GEMM per linear and, under autocast, one cast weight
        # kept for backward instead of two.
        ff = self.ff(torch.cat([e, v], dim=1))
        t = e.shape[1]
        hidden_states = hidden_states + gate * ff[:, t:]
        encoder_hidden_states = encoder_hidden_states + enc_gate * ff[:, :t]
        return hidden_states, encoder_hidden_states


class CogVideoXTransformer3DModel(nn.Module):
    """CogVideoX 1.0 transformer. Build on the meta device, then load the diffusers state dict with `strict=True`."""

    block_class = CogVideoXBlock

    def __init__(self, config: CogVideoXConfig) -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.inner_dim
        self.patch_embed = CogVideoXPatchEmbed(cfg)
        self.embedding_dropout = nn.Dropout(cfg.dropout)
        self.time_embedding = TimestepEmbedding(d, cfg.time_embed_dim)
        self.transformer_blocks = nn.ModuleList([CogVideoXBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_final = LayerNorm(d, cfg.norm_eps)
        self.norm_out = AdaLayerNorm(cfg.time_embed_dim, 2 * d, cfg.norm_eps)
        self.proj_out = nn.Linear(d, cfg.patch_size ** 2 * cfg.out_channels)
        # Set by the sequence-parallel step: video tokens are sharded, text tokens replicated (see JointLayout).
        self.sp: SequenceGroup | None = None
        # Position tables per (kind, grid, device). A plain attribute, not a buffer: keeps the state dict equal
        # to the checkpoint (the 2B's table is not in the file) and lets the model be built on the meta device.
        self._table_cache: dict[tuple[str, tuple[int, int, int], torch.device], object] = {}

    @property
    def blocks(self) -> nn.ModuleList:
        """The repeated blocks (checkpointing / FSDP units); the same modules as `transformer_blocks`."""
        return self.transformer_blocks

    # -- positions ------------------------------------------------------------------------------------
    def _sincos_table(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        key = ("sincos", grid, device)
        if key not in self._table_cache:
            cfg = self.config
            self._table_cache[key] = sincos_pos_embed_3d(cfg.inner_dim, grid, cfg.spatial_interpolation_scale,
                                                         cfg.temporal_interpolation_scale, device)
        return self._table_cache[key]  # type: ignore[return-value]

    def _rotary(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("rope", grid, device)
        if key not in self._table_cache:
            self._table_cache[key] = rotary_pos_embed_3d(self.config.attention_head_dim, grid, device=device)
        return self._table_cache[key]  # type: ignore[return-value]

    def absolute_positions(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor | None:
        """Table added to the video tokens, [N, D] (float64 computed / the stored dtype), or None (5B)."""
        cfg = self.config
        if cfg.use_learned_positional_embeddings:
            if grid[1:] != cfg.sample_grid[1:]:
                raise ValueError(f"latent size (H, W)=({grid[1] * cfg.patch_size}, {grid[2] * cfg.patch_size}) "
                                 f"differs from the learned position table's ({cfg.sample_height}, "
                                 f"{cfg.sample_width}); the I2V model only runs at its training resolution")
            if grid[0] == cfg.sample_grid[0]:
                return self.patch_embed.pos_embedding[0, cfg.max_text_seq_length:]
            # Upstream quirk kept for parity: another frame count silently swaps the learned table for sin-cos.
        elif cfg.use_rotary_positional_embeddings:
            return None
        return self._sincos_table(grid, device)

    # -- forward --------------------------------------------------------------------------------------
    def _check_inputs(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                      timestep: torch.Tensor) -> tuple[int, int, int]:
        cfg = self.config
        if hidden_states.ndim != 5 or hidden_states.shape[2] != cfg.in_channels:
            raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}; expected [B, F, "
                             f"{cfg.in_channels}, H, W] latents (frames before channels, the diffusers layout)")
        b, f, _, h, w = hidden_states.shape
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"latent size (H, W)=({h}, {w}) is not divisible by patch_size={cfg.patch_size}; "
                             f"crop or pad the latent to a multiple")
        expected = (b, cfg.max_text_seq_length, cfg.text_embed_dim)
        if tuple(encoder_hidden_states.shape) != expected:
            raise ValueError(f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}; expected "
                             f"{list(expected)} (T5 states padded to max_text_seq_length={cfg.max_text_seq_length})")
        if timestep.ndim != 1 or timestep.shape[0] != b:
            raise ValueError(f"timestep has shape {tuple(timestep.shape)}; expected [{b}] (one per sample)")
        return f, h // cfg.patch_size, w // cfg.patch_size

    def joint_layout(self, n_video: int, device: torch.device, batch: int) -> JointLayout | None:
        """This rank's place in the joint [text ; video] sequence; None in a single process."""
        sp = self.sp
        if sp is None:
            return None
        t = self.config.max_text_seq_length
        total_t, lt, lo_t, _ = sequence_layout(t, sp)
        total_v, lv, lo_v, _ = sequence_layout(n_video, sp)
        # k_lens masks a suffix only, so all padding must sit on the last rank (where it is moved to the end).
        if total_t - t > lt or total_v - n_video > lv:
            raise ValueError(f"sequence-parallel size {sp.size} spreads padding over several ranks for {t} text / "
                             f"{n_video} video tokens; use a size whose square is at most the token counts")
        text_real, video_real = max(0, min(lt, t - lo_t)), max(0, min(lv, n_video - lo_v))
        order = inverse = None
        if text_real < lt or video_real < lv:
            idx = torch.arange(lt + lv, device=device)
            order = torch.cat([idx[:text_real], idx[lt:lt + video_real], idx[text_real:lt], idx[lt + video_real:]])
            inverse = torch.argsort(order)
        padded = total_t > t or total_v > n_video
        k_lens = torch.full((batch,), t + n_video, dtype=torch.int32, device=device) if padded else None
        return JointLayout(sp, t, lo_t, lt, text_real, video_real, k_lens, order, inverse)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep: torch.Tensor) -> torch.Tensor:
        """v-prediction. hidden_states [B, F, C, H, W] latents (I2V: noisy then image latents on C),
        encoder_hidden_states [B, T, text_embed_dim] T5 states (pad positions included, no mask),
        timestep [B] in 0..999. Returns [B, F, out_channels, H, W] in the compute dtype."""
        cfg = self.config
        grid = self._check_inputs(hidden_states, encoder_hidden_states, timestep)
        b, f = hidden_states.shape[:2]
        n = math.prod(grid)
        dev = hidden_states.device
        cdt = (torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type)
               else self.patch_embed.proj.weight.dtype)

        # The sinusoid is fp32 (upstream: "always returns f32"); the MLP runs in the compute dtype.
        emb = self.time_embedding(timestep_sinusoid(timestep, cfg.inner_dim).to(cdt))  # [B, E]

        text = self.patch_embed.text_proj(encoder_hidden_states.to(cdt))  # [B, T, D]
        video = self.patch_embed.proj(hidden_states.to(cdt).flatten(0, 1))  # [B*F, D, h, w]
        video = video.unflatten(0, (b, f)).flatten(3).transpose(2, 3).flatten(1, 2)  # [B, N, D]
        table = self.absolute_positions(grid, dev)
        if table is not None:
            # The tables are zero on text rows, except the I2V's learned one.
            if cfg.use_learned_positional_embeddings and grid[0] == cfg.sample_grid[0]:
                text = text + self.patch_embed.pos_embedding[:, :cfg.max_text_seq_length].to(text.dtype)
            video = video + table.to(video.dtype)
        text, video = self.embedding_dropout(text), self.embedding_dropout(video)

        sp = self.sp
        video = shard_sequence(video, sp, dim=1)  # [B, Lv, D]
        layout = self.joint_layout(n, dev, b)
        rotary = None
        if cfg.use_rotary_positional_embeddings:
            cos, sin = self._rotary(grid, dev)
            rotary = (shard_sequence(cos, sp, dim=0), shard_sequence(sin, sp, dim=0))  # [Lv, Dh] each

        for block in self.transformer_blocks:
            video, text = block(video, text, emb, rotary, layout)

        video = self.proj_out(self.norm_out(self.norm_final(video), emb))  # [B, Lv, p*p*C_out]
        video = gather_sequence(video, sp, dim=1)[:, :n]
        return self.unpatchify(video, grid)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, N, C_out*p*p] (channel slowest, then row pixel, column pixel) -> [B, F, C_out, H, W]."""
        f, h, w = grid
        p = self.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, self.config.out_channels, p, p)
        x = x.permute(0, 1, 4, 2, 5, 3, 6)  # [B, F, C_out, h, p, w, p]
        return x.reshape(x.shape[0], f, self.config.out_channels, h * p, w * p)
