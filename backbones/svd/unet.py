"""Stable Video Diffusion's UNet (diffusers `UNetSpatioTemporalConditionModel`) and Framer's variant of it.

Module paths equal diffusers', so an official `unet/diffusion_pytorch_model{,.fp16}.safetensors` loads with
`strict=True` (SVD-xt: 1428 tensors, 1,524,623,082 parameters; Framer adds `mask_token` and a 9th input channel:
1429 tensors, 1,524,625,966). The 2D pieces (time embedding, attention, GEGLU, ResnetBlock2D, resamplers) are the SD
UNet's, from `backbones.sd.unet_blocks`; this file adds the temporal halves and the AlphaBlender that mixes them.

Shapes: B videos, F frames, N = B * F (frame-major: video 0's frames first), C channels, h/w latent height/width at a
block's level, L = h * w tokens, Lc context tokens (1 CLIP image embedding for SVD, 2 for Framer), Cc context width
(`cross_attention_dim`, 1024), E time-embedding width (4 * block_out_channels[0], 1280), Z latent channels (4).

Precision follows diffusers: the sinusoids are fp32 and cast to the activations' dtype before their MLPs; the
AlphaBlender's sigmoid runs in the parameter's dtype and is cast to the activations'. Nothing else up-casts.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn

from backbones.sd.unet import block_units, check_block_types
from backbones.sd.unet_blocks import (Attention, BasicTransformerBlock, Downsample2D, FeedForward, ResnetBlock2D,
                                      TimestepEmbedding, Timesteps, Upsample2D)

__all__ = ["UNetSpatioTemporalConfig", "UNET_PRESETS", "UNetSpatioTemporalConditionModel", "AlphaBlender",
           "TemporalResnetBlock", "SpatioTemporalResBlock", "TemporalBasicTransformerBlock",
           "TransformerSpatioTemporalModel", "count_parameters"]

DOWN_BLOCK_TYPES = ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal")
UP_BLOCK_TYPES = ("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal")
GROUPS = 32  # diffusers hard-codes GroupNorm(32) in every spatio-temporal block (not a config key)


# -- temporal layers -------------------------------------------------------------------------------

class AlphaBlender(nn.Module):
    """alpha * spatial + (1 - alpha) * temporal with a learned scalar `mix_factor` (diffusers `AlphaBlender`).

    "learned": alpha = sigmoid(mix_factor). "learned_with_images": the same for video frames, alpha = 1 (spatial
    only) where image_only_indicator is 1. switch_spatial_to_temporal_mix swaps the roles (the SVD VAE's form).
    """

    strategies = ("learned", "learned_with_images")

    def __init__(self, alpha: float, merge_strategy: str = "learned_with_images",
                 switch_spatial_to_temporal_mix: bool = False) -> None:
        super().__init__()
        if merge_strategy not in self.strategies:
            raise ValueError(f"AlphaBlender merge_strategy={merge_strategy!r}; expected one of {self.strategies}")
        self.merge_strategy = merge_strategy
        self.switch_spatial_to_temporal_mix = switch_spatial_to_temporal_mix
        self.init_alpha = alpha
        self.mix_factor = nn.Parameter(torch.tensor([float(alpha)]))

    def get_alpha(self, image_only_indicator: torch.Tensor | None, ndim: int) -> torch.Tensor:
        """Broadcastable alpha: [B, 1, F, 1, 1] for ndim 5 inputs [B, C, F, h, w], [N, 1, 1] for ndim 3 [N, L, C]."""
        if self.merge_strategy == "learned":
            return torch.sigmoid(self.mix_factor)
        if image_only_indicator is None:
            raise ValueError("AlphaBlender 'learned_with_images' needs image_only_indicator [B, F] (zeros for video)")
        alpha = torch.where(image_only_indicator.bool(), torch.ones(1, 1, device=image_only_indicator.device),
                            torch.sigmoid(self.mix_factor)[..., None])  # [B, F]
        if ndim == 5:
            return alpha[:, None, :, None, None]
        if ndim == 3:
            return alpha.reshape(-1)[:, None, None]
        raise ValueError(f"AlphaBlender got {ndim}-d inputs; expected [B, C, F, h, w] or [N, L, C]")

    def forward(self, x_spatial: torch.Tensor, x_temporal: torch.Tensor,
                image_only_indicator: torch.Tensor | None = None) -> torch.Tensor:
        alpha = self.get_alpha(image_only_indicator, x_spatial.ndim).to(x_spatial.dtype)
        if self.switch_spatial_to_temporal_mix:
            alpha = 1.0 - alpha
        return alpha * x_spatial + (1.0 - alpha) * x_temporal


class TemporalResnetBlock(nn.Module):
    """ResnetBlock2D's layout with (3, 1, 1) Conv3d kernels: mixes each pixel across frames only.

    [B, Ci, F, h, w], temb [B, F, E] (or None: no time input) -> [B, Co, F, h, w].
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, temb_channels: int | None = 512,
                 eps: float = 1e-6) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        kernel, pad = (3, 1, 1), (1, 0, 0)
        self.norm1 = nn.GroupNorm(GROUPS, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel, padding=pad)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(GROUPS, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel, padding=pad)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(self.nonlinearity(temb)).permute(0, 2, 1)[:, :, :, None, None]  # [B, C, F, 1, 1]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return shortcut + h


class SpatioTemporalResBlock(nn.Module):
    """`spatial_res_block` per frame, `temporal_res_block` across frames on its output, `time_mixer` blends the two.

    [N, Ci, h, w], temb [N, E] or None, image_only_indicator [B, F] -> [N, Co, h, w].
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, temb_channels: int | None = 512,
                 eps: float = 1e-6, temporal_eps: float | None = None, merge_factor: float = 0.5,
                 merge_strategy: str = "learned_with_images", switch_spatial_to_temporal_mix: bool = False) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, temb_channels, GROUPS, eps)
        self.temporal_res_block = TemporalResnetBlock(out_channels, out_channels, temb_channels,
                                                      eps if temporal_eps is None else temporal_eps)
        self.time_mixer = AlphaBlender(merge_factor, merge_strategy, switch_spatial_to_temporal_mix)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None,
                image_only_indicator: torch.Tensor) -> torch.Tensor:
        f = image_only_indicator.shape[-1]
        x = self.spatial_res_block(hidden_states, temb)
        n, c, h, w = x.shape
        spatial = x.reshape(n // f, f, c, h, w).permute(0, 2, 1, 3, 4)  # [B, C, F, h, w]
        temporal = self.temporal_res_block(spatial, None if temb is None else temb.reshape(n // f, f, -1))
        x = self.time_mixer(spatial, temporal, image_only_indicator)
        return x.permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class TemporalBasicTransformerBlock(nn.Module):
    """The temporal half of a TransformerSpatioTemporalModel: every pixel's F frames form one sequence.

    norm_in -> ff_in (GEGLU) -> +res; norm1 -> self-attention over frames -> +res; norm2 -> cross-attention to the
    first frame's context -> +res; norm3 -> ff -> +res. [N, L, C] -> [N, L, C]. Only the residual form
    (time_mix_inner_dim == dim), the one every SVD-family checkpoint uses.
    """

    def __init__(self, dim: int, time_mix_inner_dim: int, num_attention_heads: int, attention_head_dim: int,
                 cross_attention_dim: int) -> None:
        super().__init__()
        if time_mix_inner_dim != dim:
            raise ValueError(f"TemporalBasicTransformerBlock time_mix_inner_dim={time_mix_inner_dim} != dim={dim}; "
                             "only the residual form (equal widths, as in SVD) is implemented")
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, num_attention_heads, attention_head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim, num_attention_heads, attention_head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, hidden_states: torch.Tensor, num_frames: int, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, L, C], encoder_hidden_states [B * L, Lc, Cc] (one context per frame sequence)."""
        n, l, c = hidden_states.shape
        b = n // num_frames
        x = hidden_states.reshape(b, num_frames, l, c).permute(0, 2, 1, 3).reshape(b * l, num_frames, c)
        x = self.ff_in(self.norm_in(x)) + x
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), encoder_hidden_states) + x
        x = self.ff(self.norm3(x)) + x
        return x.reshape(b, l, num_frames, c).permute(0, 2, 1, 3).reshape(n, l, c)


class _PositionEmbedding(TimestepEmbedding):
    """TimestepEmbedding(C -> 4C -> C): diffusers' `time_pos_embed` (its out_dim form)."""

    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int) -> None:
        super().__init__(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim)


class TransformerSpatioTemporalModel(nn.Module):
    """GroupNorm -> proj_in -> per layer: spatial BasicTransformerBlock, temporal block on (its output + a frame
    position embedding), time_mixer blend -> proj_out -> + input. [N, C, h, w] -> [N, C, h, w].

    framer_temporal_context: lay out the temporal cross-attention context position-major, (L, B) rows, as Framer's
    own `transformer_temporal.py` does, while the temporal block reads rows video-major, (B, L). With B > 1 video
    b's pixel p then attends to the context of video (b * L + p) % B, so in a CFG batch the uncond and cond rows
    swap contexts at alternating pixels. Released Framer outputs come from that layout; with B = 1 it is a no-op.
    """

    def __init__(self, num_attention_heads: int, attention_head_dim: int, in_channels: int, num_layers: int = 1,
                 cross_attention_dim: int = 1024, framer_temporal_context: bool = False) -> None:
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        if inner != in_channels:
            raise ValueError(f"TransformerSpatioTemporalModel: {num_attention_heads} heads x {attention_head_dim} = "
                             f"{inner} != in_channels {in_channels}; heads must divide the width")
        self.framer_temporal_context = framer_temporal_context
        self.norm = nn.GroupNorm(GROUPS, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, cross_attention_dim)
            for _ in range(num_layers)])
        self.temporal_transformer_blocks = nn.ModuleList([
            TemporalBasicTransformerBlock(inner, inner, num_attention_heads, attention_head_dim, cross_attention_dim)
            for _ in range(num_layers)])
        self.time_pos_embed = _PositionEmbedding(in_channels, in_channels * 4, in_channels)
        self.time_proj = Timesteps(in_channels, True, 0)
        self.time_mixer = AlphaBlender(0.5, "learned_with_images")
        self.proj_out = nn.Linear(inner, in_channels)

    def temporal_context(self, encoder_hidden_states: torch.Tensor, b: int, l: int) -> torch.Tensor:
        """Each video's first-frame context, one copy per pixel: [N, Lc, Cc] -> [B * L, Lc, Cc]."""
        lc, cc = encoder_hidden_states.shape[1:]
        first = encoder_hidden_states.reshape(b, -1, lc, cc)[:, 0]  # [B, Lc, Cc]
        if self.framer_temporal_context:
            return first[None].expand(l, b, lc, cc).reshape(l * b, lc, cc)  # rows (p, b): Framer's layout
        return first[:, None].expand(b, l, lc, cc).reshape(b * l, lc, cc)  # rows (b, p): diffusers'

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                image_only_indicator: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, C, h, w], encoder_hidden_states [N, Lc, Cc], image_only_indicator [B, F]."""
        n, c, h, w = hidden_states.shape
        f = image_only_indicator.shape[-1]
        b, l = n // f, h * w
        time_context = self.temporal_context(encoder_hidden_states, b, l)
        residual = hidden_states
        x = self.norm(hidden_states).permute(0, 2, 3, 1).reshape(n, l, c)
        x = self.proj_in(x)  # [N, L, C]
        frame_index = torch.arange(f, device=x.device).repeat(b)  # [N]: 0..F-1 per video
        pos = self.time_pos_embed(self.time_proj(frame_index).to(x.dtype))[:, None, :]  # [N, 1, C]
        for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            x = block(x, encoder_hidden_states)
            mixed = temporal_block(x + pos, f, time_context)
            x = self.time_mixer(x, mixed, image_only_indicator)
        x = self.proj_out(x)
        x = x.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()
        return x + residual


def set_temporal_context_layout(module: nn.Module, framer: bool) -> bool:
    """Switch every TransformerSpatioTemporalModel in `module` to Framer's position-major temporal context
    (`framer`) or to per-video rows; returns whether any was in Framer's layout before.

    Training uses per-video rows: in Framer's layout a sample's temporal attention reads other samples' CLIP
    context when B > 1, so the loss of one sample would depend on its batch-mates (and a 2-process run would not
    equal a 1-process run of the same global batch); at B = 1, FramerTurbo's batch, the two layouts are the same.
    Sampling switches back to Framer's layout, so outputs match the released model's CFG batch. A plain
    attribute set between steps (never inside one), so activation-checkpoint recomputes see the layout the
    forward saw."""
    if getattr(module, "_temporal_context_framer", None) is framer:  # set by the last call: nothing to walk
        return framer
    before = False
    for m in module.modules():
        if isinstance(m, TransformerSpatioTemporalModel):
            before = before or m.framer_temporal_context
            m.framer_temporal_context = framer
    module._temporal_context_framer = framer  # type: ignore[attr-defined]
    return before


# -- down / mid / up blocks ------------------------------------------------------------------------
# All take (hidden_states, temb, encoder_hidden_states, image_only_indicator); blocks without attention ignore the
# context. Resnet eps: 1e-6 in the cross-attention down blocks and every up block, 1e-5 in DownBlockSpatioTemporal
# and the mid block (diffusers hard-codes these per block; the UNet's resnet_eps reaches none of them).

class _STTransformers(nn.ModuleList):
    """num_layers TransformerSpatioTemporalModels at width C with `heads` heads."""

    def __init__(self, num_layers: int, heads: int, channels: int, transformer_layers: int, cross_attention_dim: int,
                 framer_temporal_context: bool) -> None:
        super().__init__([TransformerSpatioTemporalModel(heads, channels // heads, channels, transformer_layers,
                                                         cross_attention_dim, framer_temporal_context)
                          for _ in range(num_layers)])


class DownBlockSpatioTemporal(nn.Module):
    """num_layers resnets (eps 1e-5), an optional downsampler. Returns (output, the skips it pushes)."""

    has_attention = False

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int = 1,
                 add_downsample: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([
            SpatioTemporalResBlock(in_channels if j == 0 else out_channels, out_channels, temb_channels, eps)
            for j in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, 1)]) if add_downsample else None

    def _layers(self) -> list[tuple[nn.Module, nn.Module | None]]:
        attentions = list(getattr(self, "attentions", [None] * len(self.resnets)))
        return list(zip(self.resnets, attentions))

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor,
                image_only_indicator: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """[N, Ci, h, w] -> ([N, Co, h', w'], num_layers (+1) skips); h' = ceil(h / 2) with a downsampler."""
        skips: tuple[torch.Tensor, ...] = ()
        for resnet, attn in self._layers():
            hidden_states = resnet(hidden_states, temb, image_only_indicator)
            if attn is not None:
                hidden_states = attn(hidden_states, encoder_hidden_states, image_only_indicator)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class CrossAttnDownBlockSpatioTemporal(DownBlockSpatioTemporal):
    """DownBlockSpatioTemporal (eps 1e-6) with a TransformerSpatioTemporalModel after each resnet."""

    has_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int = 1,
                 transformer_layers_per_block: int = 1, num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 add_downsample: bool = True, framer_temporal_context: bool = False) -> None:
        nn.Module.__init__(self)
        # attentions before resnets: diffusers' registration order, hence its state-dict key order
        self.attentions = _STTransformers(num_layers, num_attention_heads, out_channels, transformer_layers_per_block,
                                          cross_attention_dim, framer_temporal_context)
        self.resnets = nn.ModuleList([
            SpatioTemporalResBlock(in_channels if j == 0 else out_channels, out_channels, temb_channels, 1e-6)
            for j in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, 1)]) if add_downsample else None


class UNetMidBlockSpatioTemporal(nn.Module):
    """resnet, then (transformer, resnet) x num_layers, all at width C (resnet eps 1e-5)."""

    def __init__(self, in_channels: int, temb_channels: int, num_layers: int = 1, transformer_layers_per_block: int = 1,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 framer_temporal_context: bool = False) -> None:
        super().__init__()
        self.attentions = _STTransformers(num_layers, num_attention_heads, in_channels, transformer_layers_per_block,
                                          cross_attention_dim, framer_temporal_context)
        self.resnets = nn.ModuleList([SpatioTemporalResBlock(in_channels, in_channels, temb_channels, 1e-5)
                                      for _ in range(num_layers + 1)])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor,
                image_only_indicator: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb, image_only_indicator)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = attn(hidden_states, encoder_hidden_states, image_only_indicator)
            hidden_states = resnet(hidden_states, temb, image_only_indicator)
        return hidden_states


class UpBlockSpatioTemporal(nn.Module):
    """Before each resnet (eps 1e-6) concatenate [current, skip] on channels (skips popped last-in first-out); then
    an optional upsampler. Resnet j reads prev_output_channel (j = 0) or Co, plus a Co-wide skip, except the last
    skip, which comes from the level below (in_channels)."""

    has_attention = False

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 num_layers: int = 1, add_upsample: bool = True) -> None:
        super().__init__()
        self.resnets = self._resnets(in_channels, prev_output_channel, out_channels, temb_channels, num_layers)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    @staticmethod
    def _resnets(in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 num_layers: int) -> nn.ModuleList:
        return nn.ModuleList([
            SpatioTemporalResBlock((prev_output_channel if j == 0 else out_channels)
                                   + (in_channels if j == num_layers - 1 else out_channels),
                                   out_channels, temb_channels, 1e-6)
            for j in range(num_layers)])

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor, encoder_hidden_states: torch.Tensor, image_only_indicator: torch.Tensor,
                upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        """[N, C, h, w] + num_layers skips [N, Cs, h, w] -> [N, Co, 2h, 2w] (upsample_size when given)."""
        attentions = list(getattr(self, "attentions", [None] * len(self.resnets)))
        for resnet, attn in zip(self.resnets, attentions):
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = resnet(hidden_states, temb, image_only_indicator)
            if attn is not None:
                hidden_states = attn(hidden_states, encoder_hidden_states, image_only_indicator)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states, upsample_size)
        return hidden_states


class CrossAttnUpBlockSpatioTemporal(UpBlockSpatioTemporal):
    """UpBlockSpatioTemporal with a TransformerSpatioTemporalModel after each resnet."""

    has_attention = True

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int,
                 num_layers: int = 1, transformer_layers_per_block: int = 1, num_attention_heads: int = 1,
                 cross_attention_dim: int = 1280, add_upsample: bool = True,
                 framer_temporal_context: bool = False) -> None:
        nn.Module.__init__(self)
        self.attentions = _STTransformers(num_layers, num_attention_heads, out_channels, transformer_layers_per_block,
                                          cross_attention_dim, framer_temporal_context)  # first, as diffusers
        self.resnets = self._resnets(in_channels, prev_output_channel, out_channels, temb_channels, num_layers)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None


# -- config ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UNetSpatioTemporalConfig:
    """diffusers' config.json keys for this UNet under their names, plus two Framer switches of this project.

    num_attention_heads counts heads per down level (the mid block takes the last, up block i the reversed i-th);
    SVD's checkpoints need (5, 10, 20, 20), i.e. head width 64 everywhere. diffusers' class default is the same in
    0.42 but (5, 10, 10, 20) in Framer's copy: a wrong count loads silently, so carry it from the config.
    num_frames is only a pipeline default (the forward reads F from the sample).

    Framer (not diffusers keys): mask_token adds the (1, 1, Z, 1, 1) parameter Framer's pipeline fills the middle
    frames' conditioning with (see `interp_condition`), needing in_channels = 2 * out_channels + 1;
    framer_temporal_context reproduces Framer's temporal-context layout (see `TransformerSpatioTemporalModel`).
    """
    sample_size: int | tuple[int, int] | None = 96
    in_channels: int = 8
    out_channels: int = 4
    down_block_types: tuple[str, ...] = field(default=("CrossAttnDownBlockSpatioTemporal",) * 3
                                              + ("DownBlockSpatioTemporal",))
    up_block_types: tuple[str, ...] = field(default=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3)
    block_out_channels: tuple[int, ...] = field(default=(320, 640, 1280, 1280))
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 768
    layers_per_block: int = 2
    cross_attention_dim: int = 1024
    transformer_layers_per_block: int = 1
    num_attention_heads: int | tuple[int, ...] = (5, 10, 20, 20)
    num_frames: int = 25
    mask_token: bool = False
    framer_temporal_context: bool = False

    def __post_init__(self) -> None:
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        n = len(self.block_out_channels)
        heads = self.num_attention_heads
        object.__setattr__(self, "num_attention_heads", (heads,) * n if isinstance(heads, int) else tuple(heads))
        check_block_types(self, DOWN_BLOCK_TYPES, UP_BLOCK_TYPES)
        if len(self.num_attention_heads) != n:
            raise ValueError(f"UNetSpatioTemporalConfig.num_attention_heads={heads} has "
                             f"{len(self.num_attention_heads)} entries; expected one int or {n} (one per level)")
        for name in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNetSpatioTemporalConfig.{name}={value!r}; this UNet takes one positive int "
                                 "for all levels (per-level lists are not implemented)")
        for c, h in zip(self.block_out_channels, self.num_attention_heads):
            if c % GROUPS:
                raise ValueError(f"block_out_channels entry {c} is not a multiple of {GROUPS} (the blocks' "
                                 "GroupNorm(32) is fixed); pick multiples of 32")
            if c % h:
                raise ValueError(f"block_out_channels entry {c} is not divisible by its {h} attention heads; "
                                 "change num_attention_heads or the width")
        if self.projection_class_embeddings_input_dim % self.addition_time_embed_dim:
            raise ValueError(f"projection_class_embeddings_input_dim={self.projection_class_embeddings_input_dim} is "
                             f"not a multiple of addition_time_embed_dim={self.addition_time_embed_dim} (one "
                             "sinusoid per added time id); SVD uses 768 = 3 x 256")
        if self.mask_token and self.in_channels != 2 * self.out_channels + 1:
            raise ValueError(f"mask_token needs in_channels = 2 * out_channels + 1 (noisy, conditioning, mask "
                             f"channel: 9 for Framer); got in_channels={self.in_channels}, "
                             f"out_channels={self.out_channels}")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def num_added_time_ids(self) -> int:
        return self.projection_class_embeddings_input_dim // self.addition_time_embed_dim

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> UNetSpatioTemporalConfig:
        """From a diffusers unet/config.json dict (keys starting with '_' skipped), then `overrides` (e.g.
        mask_token=True, framer_temporal_context=True for Framer's unet/config.json, which names neither)."""
        ours = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in {**config, **overrides}.items():
            if key.startswith("_"):
                continue
            if key not in ours:
                raise ValueError(f"UNet config key {key!r} is unknown to UNetSpatioTemporalConfig; expected the keys "
                                 f"of diffusers' UNetSpatioTemporalConditionModel: {sorted(ours)}")
            kwargs[key] = value
        return cls(**kwargs)


_TINY = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48,
             down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
             up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
             addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, num_attention_heads=(2, 4),
             num_frames=3)

UNET_PRESETS: dict[str, UNetSpatioTemporalConfig] = {
    # stabilityai/stable-video-diffusion-img2vid-xt unet/config.json (spec svd-framer.md §2.1)
    "svd-xt": UNetSpatioTemporalConfig(),
    # stabilityai/stable-video-diffusion-img2vid: same weights layout, a 14-frame pipeline default
    "svd": UNetSpatioTemporalConfig(num_frames=14),
    # wwen1997/framer_512x320 unet: SVD-xt with a mask channel and mask_token (spec §1.2, §7.1, §7.8)
    "framer": UNetSpatioTemporalConfig(in_channels=9, mask_token=True, framer_temporal_context=True),
    # Test size: both block kinds, a downsampler, an upsampler, the mid block; heads (2, 4), width 16 per head.
    "tiny": UNetSpatioTemporalConfig(**_TINY),
    "tiny-framer": UNetSpatioTemporalConfig(**_TINY, in_channels=9, mask_token=True, framer_temporal_context=True),
}


# -- the UNet --------------------------------------------------------------------------------------

class UNetSpatioTemporalConditionModel(nn.Module):
    """v-prediction video UNet (SVD / Framer). Build on the meta device, then load the diffusers state dict
    with `strict=True`."""

    def __init__(self, config: UNetSpatioTemporalConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch, heads, temb = cfg.block_out_channels, cfg.num_attention_heads, cfg.time_embed_dim
        attn = dict(transformer_layers_per_block=cfg.transformer_layers_per_block,
                    cross_attention_dim=cfg.cross_attention_dim, framer_temporal_context=cfg.framer_temporal_context)
        if cfg.mask_token:  # registered first: Framer's first state-dict key
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.out_channels, 1, 1))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], True, 0)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.add_time_proj = Timesteps(cfg.addition_time_embed_dim, True, 0)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
        # down_blocks then up_blocks then mid_block: diffusers' registration order (its state-dict key order)
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            args = dict(in_channels=ch[max(i - 1, 0)], out_channels=ch[i], temb_channels=temb,
                        num_layers=cfg.layers_per_block, add_downsample=i < len(ch) - 1)
            self.down_blocks.append(
                CrossAttnDownBlockSpatioTemporal(num_attention_heads=heads[i], **args, **attn)
                if kind == "CrossAttnDownBlockSpatioTemporal" else DownBlockSpatioTemporal(**args))
        self.mid_block = UNetMidBlockSpatioTemporal(ch[-1], temb, num_attention_heads=heads[-1], **attn)
        rch, rheads = ch[::-1], heads[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            args = dict(in_channels=rch[min(i + 1, len(ch) - 1)], prev_output_channel=rch[max(i - 1, 0)],
                        out_channels=rch[i], temb_channels=temb, num_layers=cfg.layers_per_block + 1,
                        add_upsample=i < len(ch) - 1)
            self.up_blocks.append(
                CrossAttnUpBlockSpatioTemporal(num_attention_heads=rheads[i], **args, **attn)
                if kind == "CrossAttnUpBlockSpatioTemporal" else UpBlockSpatioTemporal(**args))
        self.conv_norm_out = nn.GroupNorm(GROUPS, ch[0], eps=1e-5)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def units(self) -> list[nn.Module]:
        """The SpatioTemporalResBlock and TransformerSpatioTemporalModel modules in forward order (SVD: 22 + 16).

        What activation checkpointing recomputes and FSDP2 shards one by one; none contains another. The root keeps
        conv_in, the time embeddings, the resamplers and the output head.
        """
        out = block_units([*self.down_blocks, self.mid_block, *self.up_blocks], self.mid_block)
        assert all(isinstance(m, (SpatioTemporalResBlock, TransformerSpatioTemporalModel)) for m in out)
        return out

    def skip_shapes(self, batch_frames: int, h: int, w: int) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
        """Shapes a ControlNet's residuals must have: one per skip (conv_in's output, then each one a down block
        pushes; 12 for SVD) and the mid block's output, for N = batch_frames latents of h x w."""
        ch = self.config.block_out_channels
        shapes = [(batch_frames, ch[0], h, w)]
        for i, c in enumerate(ch):
            shapes += [(batch_frames, c, h, w)] * self.config.layers_per_block
            if i < len(ch) - 1:
                h, w = (h + 1) // 2, (w + 1) // 2
                shapes.append((batch_frames, c, h, w))
        return shapes, (batch_frames, ch[-1], h, w)

    # -- Framer conditioning -------------------------------------------------------------------------
    def interp_condition(self, start: torch.Tensor, end: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Framer's conditioning block, concatenated after the Z noisy channels: [B, Z, h, w] start and end latents
        (VAE mode, unscaled; zeros for the uncond row) -> [B, F, Z + 1, h, w]: frame 0 start, frames 1..F-2
        `mask_token`, frame F-1 end, then a mask channel (0 at the two keyframes, 1 between)."""
        if not self.config.mask_token:
            raise ValueError("interp_condition needs the mask_token of a Framer UNet (preset 'framer', "
                             "mask_token=True); this UNet has none")
        if num_frames < 3:
            raise ValueError(f"interp_condition num_frames={num_frames}; Framer needs >= 3 (start, >= 1 generated "
                             "frame, end)")
        if start.shape != end.shape or start.ndim != 4 or start.shape[1] != self.config.out_channels:
            raise ValueError(f"start {tuple(start.shape)} and end {tuple(end.shape)} must both be "
                             f"[B, {self.config.out_channels}, h, w] latents")
        b, z, h, w = start.shape
        token = self.mask_token
        if hasattr(token, "full_tensor"):  # FSDP2 keeps the root's parameters sharded outside its forward
            token = token.full_tensor()  # an all-gather: every rank builds its input each step
        middle = token.to(start.dtype).expand(b, num_frames - 2, z, h, w)
        latents = torch.cat([start[:, None], middle, end[:, None]], dim=1)  # [B, F, Z, h, w]
        mask = torch.ones(b, num_frames, 1, h, w, dtype=start.dtype, device=start.device)
        mask[:, 0] = 0
        mask[:, -1] = 0
        return torch.cat([latents, mask], dim=2)

    # -- forward -------------------------------------------------------------------------------------
    def _check_inputs(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor,
                      added_time_ids: torch.Tensor) -> None:
        cfg = self.config
        if sample.ndim != 5 or sample.shape[2] != cfg.in_channels:
            raise ValueError(f"sample has shape {tuple(sample.shape)}; expected [B, F, {cfg.in_channels}, h, w] "
                             f"(in_channels={cfg.in_channels}: noisy latents then the conditioning channels)")
        b = sample.shape[0]
        if (encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b
                or encoder_hidden_states.shape[2] != cfg.cross_attention_dim):
            raise ValueError(f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}; expected "
                             f"[{b}, Lc, {cfg.cross_attention_dim}] CLIP image embeddings (Lc = 1 for SVD, 2 for "
                             "Framer), one row per video")
        if added_time_ids.shape != (b, cfg.num_added_time_ids):
            raise ValueError(f"added_time_ids has shape {tuple(added_time_ids.shape)}; expected "
                             f"[{b}, {cfg.num_added_time_ids}] (fps - 1, motion_bucket_id, noise_aug_strength)")

    @staticmethod
    def _timesteps(timestep: torch.Tensor | float, b: int, device: torch.device) -> torch.Tensor:
        """A number, a 0-d tensor, or [1] / [B] -> [B] (broadcast as diffusers)."""
        if not torch.is_tensor(timestep):
            dtype = torch.float32 if isinstance(timestep, float) else torch.int64
            timestep = torch.tensor([timestep], dtype=dtype, device=device)
        elif timestep.ndim == 0:
            timestep = timestep[None]
        if timestep.ndim != 1 or timestep.shape[0] not in (1, b):
            raise ValueError(f"timestep has shape {tuple(timestep.shape)}; expected a number, a 0-d tensor, [1] "
                             f"or [{b}] (one c_noise = 0.25 ln(sigma) per video)")
        return timestep.to(device).expand(b)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                added_time_ids: torch.Tensor, *,
                down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None,
                return_up_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The network output F (v-type; the EDM wrapper turns it into a denoised latent).

        sample [B, F, in_channels, h, w] = [c_in * x_sigma | conditioning]; timestep c_noise, a number, 0-d, [1] or
        [B]; encoder_hidden_states [B, Lc, Cc], repeated to every frame here; added_time_ids [B, 3] = (fps - 1,
        motion_bucket_id, noise_aug_strength). The residual arguments are a ControlNet's outputs, given together or
        not at all: one [N, C, h', w'] tensor per skip (see `skip_shapes`), added to the skip (not to the path going
        down), and one added to the mid block's output. Returns [B, F, out_channels, h, w]; with return_up_features
        also Framer's features: the 4 up blocks' outputs (after their upsamplers), each [N, C, h', w'].
        """
        self._check_inputs(sample, encoder_hidden_states, added_time_ids)
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("down_block_additional_residuals and mid_block_additional_residual come together "
                             "(a ControlNet's two outputs); pass both or neither")
        b, f = sample.shape[:2]
        t = self._timesteps(timestep, b, sample.device)
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))  # [B, E]
        ids = self.add_time_proj(added_time_ids.flatten()).reshape(b, -1)  # [B, 3 * 256]
        emb = emb + self.add_embedding(ids.to(emb.dtype))
        emb = emb.repeat_interleave(f, dim=0)  # [N, E]
        context = encoder_hidden_states.repeat_interleave(f, dim=0)  # [N, Lc, Cc]

        x = self.conv_in(sample.flatten(0, 1))  # [N, C, h, w]
        # always video mode (0 = frame of a video), as diffusers' forward and every SVD/Framer pipeline
        indicator = torch.zeros(b, f, dtype=x.dtype, device=x.device)
        skips: tuple[torch.Tensor, ...] = (x,)
        for block in self.down_blocks:
            x, pushed = block(x, emb, context, indicator)
            skips += pushed
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                                 f"tensors; this UNet has {len(skips)} skips (a ControlNet of another layout?)")
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))

        x = self.mid_block(x, emb, context, indicator)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual

        features: list[torch.Tensor] = []
        for block in self.up_blocks:
            n = len(block.resnets)
            taken, skips = skips[-n:], skips[:-n]
            # the next skip's size: 2x for even sizes (diffusers' scale_factor=2), exact where a downsampler
            # rounded an odd size up (diffusers forwards the same sizes then)
            size = tuple(skips[-1].shape[2:]) if skips else None
            x = block(x, taken, emb, context, indicator, upsample_size=size)
            features.append(x)

        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        x = x.reshape(b, f, *x.shape[1:])
        return (x, features) if return_up_features else x

    # -- init ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's default init for every layer, mix factors at their diffusers start values (0.5), mask_token
        N(0, 1) as Framer's surgery on plain SVD weights; makes a meta-built, `to_empty` model fully defined."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if isinstance(m, AlphaBlender):
                m.mix_factor.fill_(m.init_alpha)
        if self.config.mask_token:
            self.mask_token.normal_()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
