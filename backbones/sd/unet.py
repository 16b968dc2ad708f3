"""Stable Diffusion 1.5 UNet (diffusers `UNet2DConditionModel`), single-device code.

Module paths equal diffusers', so a diffusers `unet/` folder loads with `strict=True` (686 tensors,
859,520,964 parameters for SD1.5) and PEFT/diffusers LoRA keys line up; the LDM single file
(`model.diffusion_model.*`) goes through `backbones.sd.unet_ldm_keymap`. The layers and down/mid/up
blocks live in `backbones.sd.unet_blocks`, for AnimateDiff and SVD to reuse.

Shapes: B batch, Z latent channels (`in_channels`, 4), H/W latent height/width (any size: odd sizes
take diffusers' forwarded upsample sizes), Lc context tokens (77 for CLIP), Cc context width
(`cross_attention_dim`, 768), E time-embedding width (4 * block_out_channels[0]).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn

from .unet_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, ResnetBlock2D, TimestepEmbedding,
                          Timesteps, Transformer2DModel, UNetMidBlock2DCrossAttn, UpBlock2D)

__all__ = ["UNetConfig", "UNET_PRESETS", "UNet2DConditionModel"]

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def check_block_types(cfg: Any, down_allowed: tuple[str, ...], up_allowed: tuple[str, ...]) -> None:
    """One down and one up block type per entry of `cfg.block_out_channels`, each of the allowed ones; ValueError
    naming the config class and the field otherwise (the SD and SVD UNet configs)."""
    owner, n = type(cfg).__name__, len(cfg.block_out_channels)
    if len(cfg.down_block_types) != n or len(cfg.up_block_types) != n:
        raise ValueError(f"{owner} has {len(cfg.down_block_types)} down_block_types and "
                         f"{len(cfg.up_block_types)} up_block_types for {n} block_out_channels "
                         f"{cfg.block_out_channels}; give one of each per level")
    for name, allowed in (("down_block_types", down_allowed), ("up_block_types", up_allowed)):
        bad = [t for t in getattr(cfg, name) if t not in allowed]
        if bad:
            raise ValueError(f"{owner}.{name} has {bad[0]!r}; expected one of {allowed}")


@dataclass(frozen=True)
class UNetConfig:
    """The diffusers config keys this UNet reads, under their names (`from_diffusers` takes a config.json).

    attention_head_dim is diffusers' legacy name for the number of HEADS per level (one int for all, or
    one per down block; the mid block takes the last, up block i the reversed i-th): SD1.5's 8 means
    8 heads of width C/8 = 40/80/160.
    """
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = field(default=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
    up_block_types: tuple[str, ...] = field(default=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    block_out_channels: tuple[int, ...] = field(default=(320, 640, 1280, 1280))
    layers_per_block: int = 2
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    attention_head_dim: int | tuple[int, ...] = 8
    use_linear_projection: bool = False

    def __post_init__(self) -> None:
        # YAML / JSON give lists; tuples keep the frozen config hashable (the LDM key map caches on it).
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.attention_head_dim, int):
            object.__setattr__(self, "attention_head_dim", tuple(int(h) for h in self.attention_head_dim))
        n = len(self.block_out_channels)
        check_block_types(self, DOWN_BLOCK_TYPES, UP_BLOCK_TYPES)
        if len(self.num_attention_heads) != n:
            raise ValueError(f"UNetConfig.attention_head_dim={self.attention_head_dim} gives head counts for "
                             f"{len(self.num_attention_heads)} levels; expected one int or {n} entries")
        if self.layers_per_block < 1:
            raise ValueError(f"UNetConfig.layers_per_block={self.layers_per_block}; expected >= 1")
        for c, heads in zip(self.block_out_channels, self.num_attention_heads):
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels entry {c} is not divisible by norm_num_groups="
                                 f"{self.norm_num_groups} (GroupNorm); pick channels that are multiples of it")
            if c % heads:
                raise ValueError(f"block_out_channels entry {c} is not divisible by its {heads} attention heads "
                                 f"(attention_head_dim={self.attention_head_dim} counts heads); change either")

    @property
    def num_attention_heads(self) -> tuple[int, ...]:
        """Heads per down level (diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`)."""
        h = self.attention_head_dim
        return (h,) * len(self.block_out_channels) if isinstance(h, int) else h

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> UNetConfig:
        """From a diffusers unet/config.json dict; keys for features this UNet lacks must hold their defaults."""
        ours = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_") or key in _DIFFUSERS_IGNORED:
                continue
            if key in ours:
                kwargs[key] = value
            elif key in _DIFFUSERS_FIXED:
                if value not in _DIFFUSERS_FIXED[key]:
                    raise ValueError(f"diffusers UNet config has {key}={value!r}; this UNet implements only "
                                     f"{key} in {_DIFFUSERS_FIXED[key]} (SD1.5-style UNets)")
            else:
                raise ValueError(f"diffusers UNet config key {key!r} is unknown to UNetConfig; expected SD1.5-style "
                                 f"keys (a different model class or a newer diffusers config?)")
        return cls(**kwargs)


# Keys of diffusers' UNet2DConditionModel config for features not implemented here, and the values that
# mean "off" (lists for the JSON spellings).
_DIFFUSERS_FIXED: dict[str, list[Any]] = {
    "center_input_sample": [False], "mid_block_type": ["UNetMidBlock2DCrossAttn"], "only_cross_attention": [False],
    "mid_block_scale_factor": [1], "dropout": [0.0], "act_fn": ["silu"], "transformer_layers_per_block": [1],
    "reverse_transformer_layers_per_block": [None], "encoder_hid_dim": [None], "encoder_hid_dim_type": [None],
    "num_attention_heads": [None], "dual_cross_attention": [False], "class_embed_type": [None],
    "addition_embed_type": [None], "addition_time_embed_dim": [None], "num_class_embeds": [None],
    "upcast_attention": [False, None], "resnet_time_scale_shift": ["default"], "resnet_skip_time_act": [False],
    "resnet_out_scale_factor": [1.0], "time_embedding_type": ["positional"], "time_embedding_dim": [None],
    "time_embedding_act_fn": [None], "timestep_post_act": [None], "time_cond_proj_dim": [None],
    "conv_in_kernel": [3], "conv_out_kernel": [3], "projection_class_embeddings_input_dim": [None],
    "attention_type": ["default"], "class_embeddings_concat": [False], "mid_block_only_cross_attention": [None, False],
    "cross_attention_norm": [None],
}
_DIFFUSERS_IGNORED = {"addition_embed_type_num_heads"}  # read only with an addition embedding, which is fixed off

UNET_PRESETS: dict[str, UNetConfig] = {
    # runwayml/stable-diffusion-v1-5 unet/config.json (spec animatediff-sd15.md §1.1)
    "sd15": UNetConfig(),
    # Test size: both block kinds, a downsampler, an upsampler and the mid block; 2 heads (not 8), GroupNorm(8).
    "tiny": UNetConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                       cross_attention_dim=32, attention_head_dim=2),
}


def block_units(blocks: list[nn.Module], mid: nn.Module) -> list[nn.Module]:
    """The resnets and attentions of a UNet's blocks in forward order: per layer resnet then its attention; the mid
    block's first resnet, then (attention, resnet) pairs. Shared by the SD and SVD UNets."""
    out: list[nn.Module] = []
    for block in blocks:
        resnets = list(block.resnets)
        attentions = list(getattr(block, "attentions", []))
        if block is mid:
            out.append(resnets.pop(0))
            out += [m for pair in zip(attentions, resnets) for m in pair]
        else:
            for j, resnet in enumerate(resnets):
                out += [resnet] + attentions[j:j + 1]
    return out


class UNet2DConditionModel(nn.Module):
    """ε-prediction UNet. Build on the meta device, then load the diffusers state dict with `strict=True`."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch, heads, temb = cfg.block_out_channels, cfg.num_attention_heads, cfg.time_embed_dim
        common = dict(temb_channels=temb, resnet_eps=cfg.norm_eps, resnet_groups=cfg.norm_num_groups)
        attn = dict(cross_attention_dim=cfg.cross_attention_dim, use_linear_projection=cfg.use_linear_projection)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        # down_blocks then up_blocks then mid_block: diffusers' registration order (its state-dict key order)
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            args = dict(in_channels=ch[max(i - 1, 0)], out_channels=ch[i], num_layers=cfg.layers_per_block,
                        add_downsample=i < len(ch) - 1, downsample_padding=cfg.downsample_padding, **common)
            self.down_blocks.append(
                CrossAttnDownBlock2D(num_attention_heads=heads[i], **args, **attn) if kind == "CrossAttnDownBlock2D"
                else DownBlock2D(**args))
        self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], num_attention_heads=heads[-1], **common, **attn)
        rch, rheads = ch[::-1], heads[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            args = dict(in_channels=rch[min(i + 1, len(ch) - 1)], prev_output_channel=rch[max(i - 1, 0)],
                        out_channels=rch[i], num_layers=cfg.layers_per_block + 1, add_upsample=i < len(ch) - 1,
                        **common)
            self.up_blocks.append(
                CrossAttnUpBlock2D(num_attention_heads=rheads[i], **args, **attn) if kind == "CrossAttnUpBlock2D"
                else UpBlock2D(**args))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def units(self) -> list[nn.Module]:
        """The ResnetBlock2D and Transformer2DModel modules in forward order (38 for SD1.5: 22 + 16).

        These are what activation checkpointing recomputes and FSDP2 shards one by one
        (`lora_core.distributed.parallelize`); none contains another. What they leave to the root (conv_in,
        time embedding, resamplers, conv_norm_out/conv_out) is small and runs once per level.
        """
        out = block_units([*self.down_blocks, self.mid_block, *self.up_blocks], self.mid_block)
        assert all(isinstance(m, (ResnetBlock2D, Transformer2DModel)) for m in out)
        return out

    # -- forward -------------------------------------------------------------------------------------
    def _check_inputs(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor) -> None:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample has shape {tuple(sample.shape)}; expected [B, {cfg.in_channels}, H, W] "
                             f"latents (in_channels={cfg.in_channels})")
        b = sample.shape[0]
        if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b
                or encoder_hidden_states.shape[2] != cfg.cross_attention_dim):
            raise ValueError(f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}; expected "
                             f"[{b}, Lc, {cfg.cross_attention_dim}] text encodings (one per sample; repeat them "
                             f"to the batch size)")

    @staticmethod
    def _timesteps(timestep: torch.Tensor | float | int, b: int, device: torch.device) -> torch.Tensor:
        """A number, a 0-d tensor, or [1] / [B] -> [B] (broadcast as diffusers)."""
        if not torch.is_tensor(timestep):
            dtype = torch.float32 if isinstance(timestep, float) else torch.int64
            timestep = torch.tensor([timestep], dtype=dtype, device=device)
        elif timestep.ndim == 0:
            timestep = timestep[None]
        if timestep.ndim != 1 or timestep.shape[0] not in (1, b):
            raise ValueError(f"timestep has shape {tuple(timestep.shape)}; expected a number, a 0-d tensor, [1] "
                             f"or [{b}] (one per sample)")
        return timestep.to(device).expand(b)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor, *,
                down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction. sample [B, Z, H, W]; timestep [B], [1], 0-d or a number (0..999);
        encoder_hidden_states [B, Lc, Cc]. The two residual arguments are a ControlNet's outputs, given
        together or not at all: one tensor per skip (conv_in's output and each one a down block pushes, 12
        for SD1.5), added to it, and one added to the mid block's output. Returns [B, out_channels, H, W]
        in the compute dtype (the weights', or autocast's, as diffusers)."""
        self._check_inputs(sample, encoder_hidden_states)
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("down_block_additional_residuals and mid_block_additional_residual come together "
                             "(a ControlNet's two outputs); pass both or neither")
        t = self._timesteps(timestep, sample.shape[0], sample.device)
        # diffusers casts the fp32 sinusoid to the sample's dtype (so bf16 weights take bf16 features)
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))  # [B, E]

        sample = self.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            sample, pushed = block(sample, emb, encoder_hidden_states)
            skips += pushed
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                                 f"tensors; this UNet has {len(skips)} skips (a ControlNet of another layout?)")
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))

        sample = self.mid_block(sample, emb, encoder_hidden_states)
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual

        for block in self.up_blocks:
            n = len(block.resnets)
            taken, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size: 2x for even sizes (identical to diffusers' scale_factor=2),
            # and the right size where a downsampler rounded an odd size up.
            size = tuple(skips[-1].shape[2:]) if skips else None
            sample = block(sample, taken, emb, encoder_hidden_states, upsample_size=size)

        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))

    # -- init ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's default init for every layer (diffusers has no custom UNet init); makes a meta-built,
        `to_empty` model fully defined."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
