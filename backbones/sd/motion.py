"""AnimateDiff motion modules (diffusers `AnimateDiffTransformer3D`, `MotionAdapter`), single-device code.

Module paths equal diffusers', so a diffusers motion-adapter folder (v1-5-2: 546 parameters,
453,209,280 numbers, + 21 `pos_embed.pe` buffers) loads with `strict=True`, and inside the motion UNet
(`backbones.sd.unet_motion`) the same names sit at `down_blocks.i.motion_modules.j...`. The original
`mm_sd_v15_v2.ckpt` names go through `backbones.sd.motion_keymap`.

Math (spec animatediff-sd15.md §5.3): GroupNorm -> proj_in -> over the F frames of each pixel, blocks of
two temporal self-attentions (sinusoidal position table added to each normalised input) and a GEGLU
feed-forward -> proj_out -> plus the input. Two GroupNorm modes (§5.6): per frame (original AnimateDiff
and ComfyUI, the default) or over all frames of a video jointly (diffusers).

Shapes: B videos, F frames, C channels, H/W height/width at the module's level, P = B*H*W sequences of
F frames, NH heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn

from .unet_blocks import Attention, BasicTransformerBlock, FeedForward

__all__ = ["SinusoidalPositionalEmbedding", "sinusoidal_table", "TemporalBasicTransformerBlock",
           "AnimateDiffTransformer3D", "MotionModules", "MotionAdapterConfig", "MOTION_ADAPTER_PRESETS",
           "MotionAdapter", "zero_init_proj_out_"]


def sinusoidal_table(max_seq_length: int, embed_dim: int) -> torch.Tensor:
    """[1, max_seq_length, embed_dim] fp32: pe[p, 2i] = sin(p * 10000^(-2i/C)), pe[p, 2i+1] = cos(same).

    fp32 in diffusers' and AnimateDiff's op order, so the table equals the one saved in their checkpoints
    bit for bit (it is recomputed, never trusted from a file)."""
    position = torch.arange(max_seq_length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, embed_dim, 2) * (-math.log(10000.0) / embed_dim))
    pe = torch.zeros(1, max_seq_length, embed_dim)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


class SinusoidalPositionalEmbedding(nn.Module):
    """Adds `pe[:, :F]` to [P, F, C]. `pe` is a persistent buffer (diffusers saves it), but what a state
    dict holds for it is replaced on load by the recomputed table, so files with it, without it, or with
    a v1 24-frame table all load with `strict=True`."""

    def __init__(self, embed_dim: int, max_seq_length: int = 32) -> None:
        super().__init__()
        self.embed_dim, self.max_seq_length = embed_dim, max_seq_length
        self.register_buffer("pe", sinusoidal_table(max_seq_length, embed_dim))
        self._register_load_state_dict_pre_hook(self._recompute_pe)

    def _recompute_pe(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        state_dict[prefix + "pe"] = sinusoidal_table(self.max_seq_length, self.embed_dim)

    def reset_parameters(self) -> None:
        """Refills `pe` (a meta-built, `to_empty` model holds garbage there)."""
        with torch.no_grad():
            self.pe.copy_(sinusoidal_table(self.max_seq_length, self.embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, :x.shape[1]].to(x.dtype)


class TemporalBasicTransformerBlock(BasicTransformerBlock):
    """diffusers' BasicTransformerBlock as AnimateDiff configures it: two self-attentions (no text) and a
    GEGLU feed-forward, the position table added to the normalised input of each attention (so it reaches
    q, k and v) but not to the residual stream. [P, F, C] -> [P, F, C]."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int,
                 num_positional_embeddings: int = 32, norm_eps: float = 1e-5) -> None:
        nn.Module.__init__(self)
        # pos_embed first: diffusers registers it first, hence its state-dict key order
        self.pos_embed = SinusoidalPositionalEmbedding(dim, num_positional_embeddings)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, None, num_attention_heads, attention_head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = Attention(dim, None, num_attention_heads, attention_head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [P, F, C]; encoder_hidden_states must be None (motion modules never see text)."""
        assert encoder_hidden_states is None
        hidden_states = self.attn1(self.pos_embed(self.norm1(hidden_states))) + hidden_states
        hidden_states = self.attn2(self.pos_embed(self.norm2(hidden_states))) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


class AnimateDiffTransformer3D(nn.Module):
    """One motion module: [B*F, C, H, W] (frames of a video contiguous, index b*F + f) -> same shape.

    norm_across_frames False: GroupNorm statistics per frame (original AnimateDiff, ComfyUI);
    True: over all F frames of a video (diffusers). Same weights, outputs ~0.3-0.7 relative apart (§5.7).
    """

    def __init__(self, num_attention_heads: int, attention_head_dim: int, in_channels: int, num_layers: int = 1,
                 norm_num_groups: int = 32, num_positional_embeddings: int = 32,
                 norm_across_frames: bool = False) -> None:
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.norm_across_frames = norm_across_frames
        self.max_frames = num_positional_embeddings
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner)
        self.transformer_blocks = nn.ModuleList([
            TemporalBasicTransformerBlock(inner, num_attention_heads, attention_head_dim, num_positional_embeddings)
            for _ in range(num_layers)])
        self.proj_out = nn.Linear(inner, in_channels)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, c, h, w = hidden_states.shape
        if num_frames < 1 or bf % num_frames:
            raise ValueError(f"motion module got {bf} frames in its batch, not a multiple of num_frames="
                             f"{num_frames}; pass [B*F, C, H, W] with the F frames of each video contiguous")
        if num_frames > self.max_frames:
            raise ValueError(f"num_frames={num_frames} exceeds the motion modules' position table "
                             f"(max_seq_length={self.max_frames}); sample at most {self.max_frames} frames")
        b = bf // num_frames
        residual = hidden_states
        x = hidden_states.reshape(b, num_frames, c, h, w)
        if self.norm_across_frames:  # statistics over (C/groups, F, H, W) of one video
            x = self.norm(x.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
        else:  # per frame: each [C, H, W] image on its own
            x = self.norm(hidden_states).reshape(b, num_frames, c, h, w)
        x = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, num_frames, c)  # [P, F, C]
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x)
        x = self.proj_out(x)
        x = x.reshape(b, h, w, num_frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, h, w)  # [B*F, C, H, W]
        return x + residual


def zero_init_proj_out_(model: nn.Module) -> int:
    """Zero every motion module's proj_out (weight and bias), so each module starts as the identity and a
    freshly built motion UNet reproduces the image UNet per frame (original `zero_initialize=True`; diffusers
    leaves nn.Linear's init). Returns the number of modules zeroed."""
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AnimateDiffTransformer3D):
                m.proj_out.weight.zero_()
                m.proj_out.bias.zero_()
                n += 1
    return n


class MotionModules(nn.Module):
    """The motion modules of one UNet level, as `motion_modules.j` (diffusers' adapter-side container)."""

    def __init__(self, in_channels: int, layers_per_block: int, transformer_layers_per_block: int = 1,
                 num_attention_heads: int = 8, norm_num_groups: int = 32, max_seq_length: int = 32,
                 norm_across_frames: bool = False) -> None:
        super().__init__()
        self.motion_modules = nn.ModuleList([
            AnimateDiffTransformer3D(num_attention_heads, in_channels // num_attention_heads, in_channels,
                                     transformer_layers_per_block, norm_num_groups, max_seq_length,
                                     norm_across_frames)
            for _ in range(layers_per_block)])


@dataclass(frozen=True)
class MotionAdapterConfig:
    """diffusers MotionAdapter config keys, under their names, plus `norm_across_frames` (ours, §5.6).

    motion_layers_per_block counts the down modules per level; up levels get one more (as the UNet's up
    blocks have one more resnet). motion_num_attention_heads is one int or one per down level (the mid block
    takes the last, up level i the reversed i-th).
    """
    block_out_channels: tuple[int, ...] = field(default=(320, 640, 1280, 1280))
    motion_layers_per_block: int = 2
    motion_transformer_layers_per_block: int = 1
    motion_mid_block_layers_per_block: int = 1
    motion_transformer_layers_per_mid_block: int = 1
    motion_num_attention_heads: int | tuple[int, ...] = 8
    motion_norm_num_groups: int = 32
    motion_max_seq_length: int = 32
    use_motion_mid_block: bool = True
    norm_across_frames: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if not isinstance(self.motion_num_attention_heads, int):
            object.__setattr__(self, "motion_num_attention_heads", tuple(self.motion_num_attention_heads))
        n = len(self.block_out_channels)
        if len(self.heads) != n:
            raise ValueError(f"MotionAdapterConfig.motion_num_attention_heads={self.motion_num_attention_heads} "
                             f"gives {len(self.heads)} levels for {n} block_out_channels; give one int or {n}")
        for name in ("motion_layers_per_block", "motion_transformer_layers_per_block",
                     "motion_mid_block_layers_per_block", "motion_transformer_layers_per_mid_block",
                     "motion_max_seq_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"MotionAdapterConfig.{name}={getattr(self, name)!r}; expected an int >= 1 "
                                 f"(per-level tuples are not implemented)")
        for c, heads in zip(self.block_out_channels, self.heads):
            if c % self.motion_norm_num_groups or c % heads:
                raise ValueError(f"block_out_channels entry {c} is not divisible by motion_norm_num_groups="
                                 f"{self.motion_norm_num_groups} and its {heads} motion heads; change either")

    @property
    def heads(self) -> tuple[int, ...]:
        h = self.motion_num_attention_heads
        return (h,) * len(self.block_out_channels) if isinstance(h, int) else h

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], norm_across_frames: bool = False) -> MotionAdapterConfig:
        """From a diffusers motion-adapter config.json dict (stale keys of old files are accepted at the
        values that current diffusers ignores anyway)."""
        ours = {f.name for f in fields(cls)} - {"norm_across_frames"}
        kwargs: dict[str, Any] = {"norm_across_frames": norm_across_frames}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in ours:
                kwargs[key] = value
            elif key in _DIFFUSERS_FIXED:
                if value not in _DIFFUSERS_FIXED[key]:
                    raise ValueError(f"diffusers MotionAdapter config has {key}={value!r}; this adapter implements "
                                     f"only {key} in {_DIFFUSERS_FIXED[key]}")
            else:
                raise ValueError(f"diffusers MotionAdapter config key {key!r} is unknown to MotionAdapterConfig; "
                                 f"expected AnimateDiff motion-adapter keys (a newer diffusers config?)")
        return cls(**kwargs)


# Stale keys of the published v1-5-2 config.json (diffusers ignores them) and PIA's conv_in (not implemented).
_DIFFUSERS_FIXED: dict[str, list[Any]] = {
    "motion_activation_fn": ["geglu"], "motion_attention_bias": [False], "motion_cross_attention_dim": [None],
    "conv_in_channels": [None],
}

MOTION_ADAPTER_PRESETS: dict[str, MotionAdapterConfig] = {
    # guoyww/animatediff-motion-adapter-v1-5-2 config.json (spec animatediff-sd15.md §5.1)
    "v1-5-2": MotionAdapterConfig(),
    # fits UNET_PRESETS["tiny"]: 2 levels, 1 layer per down block, 2 heads, GroupNorm(8), with a mid module
    "tiny": MotionAdapterConfig(block_out_channels=(32, 64), motion_layers_per_block=1,
                                motion_num_attention_heads=2, motion_norm_num_groups=8),
}


def level_modules(cfg: MotionAdapterConfig) -> tuple[list[MotionModules], MotionModules | None, list[MotionModules]]:
    """The down, mid and up MotionModules of an adapter layout (shared by MotionAdapter and the motion UNet)."""
    kw = dict(norm_num_groups=cfg.motion_norm_num_groups, max_seq_length=cfg.motion_max_seq_length,
              norm_across_frames=cfg.norm_across_frames)
    ch, heads = cfg.block_out_channels, cfg.heads
    down = [MotionModules(c, cfg.motion_layers_per_block, cfg.motion_transformer_layers_per_block, h, **kw)
            for c, h in zip(ch, heads)]
    mid = (MotionModules(ch[-1], cfg.motion_mid_block_layers_per_block, cfg.motion_transformer_layers_per_mid_block,
                         heads[-1], **kw) if cfg.use_motion_mid_block else None)
    up = [MotionModules(c, cfg.motion_layers_per_block + 1, cfg.motion_transformer_layers_per_block, h, **kw)
          for c, h in zip(ch[::-1], heads[::-1])]
    return down, mid, up


class MotionAdapter(nn.Module):
    """The motion modules alone (what an adapter file holds); no forward. Build on the meta device, then
    load with `strict=True` (pe buffers optional), or `init_weights()` for training from scratch."""

    def __init__(self, config: MotionAdapterConfig) -> None:
        super().__init__()
        self.config = config
        down, mid, up = level_modules(config)
        # mid_block before down/up blocks: diffusers' registration order (its state-dict key order)
        self.mid_block = mid
        self.down_blocks = nn.ModuleList(down)
        self.up_blocks = nn.ModuleList(up)

    @torch.no_grad()
    def init_weights(self, zero_init_proj_out: bool = True) -> None:
        """PyTorch's default layer init, the position tables refilled, proj_out zeroed (identity modules)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        if zero_init_proj_out:
            zero_init_proj_out_(self)
