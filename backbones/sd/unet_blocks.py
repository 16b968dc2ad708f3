"""The SD UNet's layers and blocks, under diffusers' class and module names.

Each class takes diffusers' constructor arguments (not a config) and registers its submodules in
diffusers' order, so a diffusers state dict loads with `strict=True` and keeps its key order. They are
the pieces AnimateDiff (motion modules added after each layer of a down/mid/up block) and SVD (the same
resnet and transformer blocks beside temporal ones) build on.

Shapes: B batch, C channels (Ci in, Co out, Cs a skip's), H/W latent height/width at the block's level,
L = H*W image tokens, Lc context tokens, Cc context width (`cross_attention_dim`), NH heads, D head dim,
E time-embedding width (4 * block_out_channels[0], 1280 for SD1.5).

Precision: no module here up-casts, as diffusers' SD1.5 path does not (upcast_attention=False); under
autocast, torch's own per-op policy decides (CUDA runs group/layer norm in fp32, CPU in bf16), the same
for both. The timestep sinusoid is the one fp32 island (see `Timesteps`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.attention import attention

__all__ = ["Timesteps", "TimestepEmbedding", "Attention", "GEGLU", "FeedForward", "BasicTransformerBlock",
           "Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "DownBlock2D",
           "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "UpBlock2D", "CrossAttnUpBlock2D"]


# -- time embedding --------------------------------------------------------------------------------

class Timesteps(nn.Module):
    """Sinusoidal timestep features, [B] -> [B, num_channels] fp32 (diffusers `Timesteps`).

    freq_k = exp(-ln(10000) * k / (half - downscale_freq_shift)); [sin | cos], or [cos | sin] with
    flip_sin_to_cos (SD). Same values as LDM's `timestep_embedding`.
    """

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        # fp32 whatever the autocast: phases reach 1000 rad, where bf16 keeps no digit of the sine. The op
        # order is diffusers' (and LDM's), so the features match theirs bit for bit.
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        freqs = torch.exp(exponent / (half - self.downscale_freq_shift))
        phase = timesteps[:, None].float() * freqs[None, :]  # [B, half]
        first, second = (torch.cos(phase), torch.sin(phase)) if self.flip_sin_to_cos else (torch.sin(phase), torch.cos(phase))
        emb = torch.cat([first, second], dim=-1)
        return F.pad(emb, (0, 1)) if self.num_channels % 2 else emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2: [B, Ci] -> [B, E]."""

    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))


# -- transformer -----------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention, q from `hidden_states`, k/v from `encoder_hidden_states` (itself when None).

    The kernel is `self.attn_op` (the project's seam, `backbones.attention.attention` by default), an
    instance attribute so a wrapper (sequence parallel, a spy in tests) can replace it per module.
    `to_out` is [Linear, Dropout(0)] as in diffusers, hence the `to_out.0` names.
    """

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 bias: bool = False, out_bias: bool = True) -> None:
        super().__init__()
        inner = heads * dim_head
        kv_dim = query_dim if cross_attention_dim is None else cross_attention_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(0.0)])
        self.attn_op = attention

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [B, L, C], encoder_hidden_states [B, Lc, Cc] or None -> [B, L, C]."""
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = self.to_q(hidden_states).unflatten(-1, (self.heads, -1))  # [B, L, NH, D]
        k = self.to_k(ctx).unflatten(-1, (self.heads, -1))  # [B, Lc, NH, D]
        v = self.to_v(ctx).unflatten(-1, (self.heads, -1))
        out = self.attn_op(q, k, v).flatten(2)  # [B, L, NH*D]
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """proj to 2 * dim_out, split into (value, gate), value * gelu(gate) (exact erf GELU); value is the first half."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """net = [GEGLU(C -> mult*C), Dropout(0), Linear(mult*C -> C)], diffusers' `ff.net.0.proj` / `ff.net.2`."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention, GEGLU feed-forward, each residual. [B, L, C] -> [B, L, C].

    With cross_attention_dim None, attn2 is a second self-attention (diffusers' double_self_attention,
    the form AnimateDiff's temporal blocks use).
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int,
                 cross_attention_dim: int | None = None, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, None, num_attention_heads, attention_head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = Attention(dim, cross_attention_dim, num_attention_heads, attention_head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [B, L, C], encoder_hidden_states [B, Lc, Cc] (None: attn2 attends to itself)."""
        hidden_states = self.attn1(self.norm1(hidden_states)) + hidden_states
        hidden_states = self.attn2(self.norm2(hidden_states), encoder_hidden_states) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


class Transformer2DModel(nn.Module):
    """GroupNorm (eps 1e-6) -> proj_in -> tokens -> BasicTransformerBlock(s) -> proj_out, plus the input.

    [B, C, H, W] -> [B, C, H, W]. proj_in/proj_out are 1x1 convs (SD1.5) or Linears (use_linear_projection,
    SD2); the conv form projects before flattening to tokens, the linear form after, as diffusers.
    """

    def __init__(self, num_attention_heads: int, attention_head_dim: int, in_channels: int,
                 cross_attention_dim: int | None = None, norm_num_groups: int = 32,
                 use_linear_projection: bool = False, num_layers: int = 1) -> None:
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear_projection else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, cross_attention_dim)
            for _ in range(num_layers)])
        self.proj_out = nn.Linear(inner, in_channels) if use_linear_projection else nn.Conv2d(inner, in_channels, 1)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [B, C, H, W], encoder_hidden_states [B, Lc, Cc] -> [B, C, H, W]."""
        b, _, h, w = hidden_states.shape
        residual = hidden_states
        x = self.norm(hidden_states)
        if not self.use_linear_projection:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, x.shape[1])  # [B, L, C]
        if self.use_linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, encoder_hidden_states)
        if self.use_linear_projection:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, x.shape[-1]).permute(0, 3, 1, 2).contiguous()  # [B, C, H, W]
        if not self.use_linear_projection:
            x = self.proj_out(x)
        return x + residual


# -- resnet and resampling -------------------------------------------------------------------------

class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice with the time embedding added between; 1x1 conv shortcut iff Ci != Co.

    [B, Ci, H, W], temb [B, E] -> [B, Co, H, W]. temb_channels None: no time input (VAE-style use).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None = 1280, groups: int = 32,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return shortcut + h


class Downsample2D(nn.Module):
    """3x3 conv, stride 2: [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)] (padding 1; padding 0 pads right/bottom
    by one first, as diffusers)."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Nearest x2 (or to `output_size`, the skip's H/W when the input size is odd somewhere) then 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        # contiguous: the channels-last nearest kernel fails for large batches (diffusers issue 984)
        hidden_states = hidden_states.contiguous()
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        return self.conv(hidden_states)


# -- down / mid / up blocks ------------------------------------------------------------------------
# All take (hidden_states, temb, encoder_hidden_states) so the UNet calls every block alike; blocks
# without attention ignore the context.

class DownBlock2D(nn.Module):
    """num_layers resnets, then an optional downsampler. Returns (output, the skips it pushes)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int = 1,
                 resnet_eps: float = 1e-5, resnet_groups: int = 32, add_downsample: bool = True,
                 downsample_padding: int = 1) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, temb_channels, resnet_groups, resnet_eps)
            for j in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, downsample_padding)]) if add_downsample else None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """[B, Ci, H, W] -> ([B, Co, H', W'], num_layers (+1) skips), H' = H/2 rounded up with a downsampler."""
        skips: tuple[torch.Tensor, ...] = ()
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """DownBlock2D with a Transformer2DModel after each resnet."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int = 1,
                 resnet_eps: float = 1e-5, resnet_groups: int = 32, num_attention_heads: int = 1,
                 cross_attention_dim: int = 1280, add_downsample: bool = True, downsample_padding: int = 1,
                 use_linear_projection: bool = False) -> None:
        nn.Module.__init__(self)
        # attentions before resnets: diffusers' registration order, hence its state-dict key order
        self.attentions = nn.ModuleList([
            Transformer2DModel(num_attention_heads, out_channels // num_attention_heads, out_channels,
                               cross_attention_dim, resnet_groups, use_linear_projection)
            for _ in range(num_layers)])
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, temb_channels, resnet_groups, resnet_eps)
            for j in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, downsample_padding)]) if add_downsample else None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips: tuple[torch.Tensor, ...] = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states, temb), encoder_hidden_states)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, then (transformer, resnet) x num_layers, all at width C: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, in_channels: int, temb_channels: int, num_layers: int = 1, resnet_eps: float = 1e-5,
                 resnet_groups: int = 32, num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 use_linear_projection: bool = False) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([
            Transformer2DModel(num_attention_heads, in_channels // num_attention_heads, in_channels,
                               cross_attention_dim, resnet_groups, use_linear_projection)
            for _ in range(num_layers)])
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels, in_channels, temb_channels, resnet_groups, resnet_eps)
            for _ in range(num_layers + 1)])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = resnet(attn(hidden_states, encoder_hidden_states), temb)
        return hidden_states


def _up_resnets(in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                num_layers: int, resnet_eps: float, resnet_groups: int) -> nn.ModuleList:
    """Resnet j takes [current | skip]: current is prev_output_channel wide for j = 0 (Co after); the skip is
    Co wide except the last, which comes from the level below (in_channels)."""
    return nn.ModuleList([
        ResnetBlock2D((prev_output_channel if j == 0 else out_channels)
                      + (in_channels if j == num_layers - 1 else out_channels),
                      out_channels, temb_channels, resnet_groups, resnet_eps)
        for j in range(num_layers)])


class UpBlock2D(nn.Module):
    """Before each resnet, concatenate [current, skip] on channels (current first; skips popped last-in
    first-out), then an optional upsampler."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 num_layers: int = 1, resnet_eps: float = 1e-5, resnet_groups: int = 32,
                 add_upsample: bool = True) -> None:
        super().__init__()
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, temb_channels, num_layers,
                                   resnet_eps, resnet_groups)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        """[B, C, H, W] + num_layers skips [B, Cs, H, W] -> [B, Co, 2H, 2W] (upsample_size when given)."""
        for resnet in self.resnets:
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = resnet(hidden_states, temb)
        return self._upsample(hidden_states, upsample_size)

    def _upsample(self, hidden_states: torch.Tensor, upsample_size: tuple[int, int] | None) -> torch.Tensor:
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states, upsample_size)
        return hidden_states


class CrossAttnUpBlock2D(UpBlock2D):
    """UpBlock2D with a Transformer2DModel after each resnet."""

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int,
                 num_layers: int = 1, resnet_eps: float = 1e-5, resnet_groups: int = 32,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280, add_upsample: bool = True,
                 use_linear_projection: bool = False) -> None:
        nn.Module.__init__(self)
        self.attentions = nn.ModuleList([
            Transformer2DModel(num_attention_heads, out_channels // num_attention_heads, out_channels,
                               cross_attention_dim, resnet_groups, use_linear_projection)
            for _ in range(num_layers)])
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, temb_channels, num_layers,
                                   resnet_eps, resnet_groups)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = attn(resnet(hidden_states, temb), encoder_hidden_states)
        return self._upsample(hidden_states, upsample_size)
