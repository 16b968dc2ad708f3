"""Stable Diffusion 1.5 VAE (diffusers `AutoencoderKL`): 2D conv autoencoder, 8x spatial compression.

Shapes: B batch, C channels, H/W pixel height/width, h/w latent height/width (H/f, W/f with
f = 2 ** (len(block_out_channels) - 1), 8 for SD1.5), Z latent channels (4), L = h*w tokens.
Pixels are [B, 3, H, W] in [-1, 1]; latents are [B, Z, h, w], *unscaled*: the spec multiplies by
`scaling_factor` (0.18215) after `encode` and divides before `decode`, the VAE never does.

Module paths equal diffusers' (248 tensors for SD1.5), so a diffusers `vae/` folder loads with
`strict=True`; the legacy attention names of the diffusers-0.6 era SD1.5 file (query/key/value/
proj_attn) are renamed by a load hook on `AttentionBlock`. The LDM single-file layout
(`first_stage_model.*`) goes through `backbones.sd.vae_ldm_keymap`.

`Encoder`, `ResnetBlock2D`, `AttentionBlock` and `UNetMidBlock2D` take diffusers' constructor
arguments rather than a config, so SVD's temporal-decoder VAE (same encoder) can reuse them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.attention import attention

from .unet_blocks import Downsample2D as _UNetDownsample
from .unet_blocks import ResnetBlock2D as _UNetResnet
from .unet_blocks import Upsample2D

NORM_EPS = 1e-6  # every GroupNorm of the VAE (diffusers hard-codes it; the UNet uses 1e-5)
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp: keeps exp(logvar / 2) finite


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of `AutoencoderKL`, field names as in diffusers' vae/config.json."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512  # informational (the training resolution); any multiple of the factor works

    def __post_init__(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels is empty; give one width per resolution, e.g. (128, 256, 512, 512)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {self.block_out_channels} has widths {bad} not divisible by "
                             f"norm_num_groups={self.norm_num_groups}; pick widths that are multiples of it")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block}; expected >= 1")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor={self.scaling_factor}; expected a positive float (SD1.5: 0.18215)")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


VAE_PRESETS: dict[str, VAEConfig] = {
    "sd15": VAEConfig(),
    # Same topology (two resolutions, so one down/upsample each), 2x compression; 658,375 parameters.
    "tiny": VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32),
}


class ResnetBlock2D(_UNetResnet):
    """The UNet's ResnetBlock2D without a time embedding (the VAE's variant), eps 1e-6.
    x [B, C_in, H, W] -> [B, C_out, H, W]. GroupNorm runs in the activation dtype as diffusers does; torch
    accumulates its statistics in fp32 for half inputs, so no explicit fp32 island is needed."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32, eps: float = NORM_EPS,
                 dropout: float = 0.0) -> None:
        super().__init__(in_channels, out_channels, temb_channels=None, groups=groups, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, None)


_LEGACY_ATTN_NAMES = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def _rename_legacy_attention_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: the SD1.5 diffusers VAE file predates diffusers' attention rename."""
    for old, new in _LEGACY_ATTN_NAMES.items():
        for suffix in ("weight", "bias"):
            key = f"{prefix}{old}{suffix}"
            if key in state_dict and f"{prefix}{new}{suffix}" not in state_dict:
                state_dict[f"{prefix}{new}{suffix}"] = state_dict.pop(key)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions with a GroupNorm in front and a residual add
    (diffusers' `Attention` as built by the VAE mid block). x [B, C, H, W] -> same."""

    def __init__(self, channels: int, groups: int = 32, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])  # index 0 is in the keys
        self.register_load_state_dict_pre_hook(_rename_legacy_attention_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, L, C]
        q, k, v = (proj(y).unsqueeze(2) for proj in (self.to_q, self.to_k, self.to_v))  # each [B, L, 1, C]
        # One head of width C, scale 1/sqrt(C) (the seam's default for D = C)
        y = attention(q, k, v).squeeze(2)  # [B, L, C]
        y = self.to_out[1](self.to_out[0](y))
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class UNetMidBlock2D(nn.Module):
    """resnets.0 -> attentions.0 -> resnets.1 at constant width. x [B, C, H, W] -> same.

    `attentions` is registered before `resnets`, as diffusers does, so state-dict order matches."""

    def __init__(self, channels: int, groups: int = 32, eps: float = NORM_EPS, add_attention: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups, eps)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, eps, dropout) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample2D(_UNetDownsample):
    """Zero pad right/bottom by one, then conv3 stride 2 with no padding: what the LDM weights were trained with
    (symmetric padding=1 gives the same shape but shifts every output by half a pixel). [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, padding=0)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets (the first changes width), then an optional Downsample2D."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int = 32,
                 eps: float = NORM_EPS, add_downsample: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                                    groups, eps, dropout) for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets (the first changes width), then an optional Upsample2D."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int = 32,
                 eps: float = NORM_EPS, add_upsample: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                                                    groups, eps, dropout) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Pixels [B, C_in, H, W] -> moments [B, 2Z (double_z) or Z, H/f, W/f], before quant_conv."""

    def __init__(self, in_channels: int = 3, out_channels: int = 4,
                 block_out_channels: tuple[int, ...] = (128, 256, 512, 512), layers_per_block: int = 2,
                 norm_num_groups: int = 32, double_z: bool = True, mid_block_add_attention: bool = True) -> None:
        super().__init__()
        widths = tuple(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(widths[max(i - 1, 0)], widths[i], layers_per_block, norm_num_groups,
                               add_downsample=i < len(widths) - 1)
            for i in range(len(widths))
        ])
        self.mid_block = UNetMidBlock2D(widths[-1], norm_num_groups, add_attention=mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents [B, Z, h, w] (after post_quant_conv) -> pixels [B, C_out, h*f, w*f], unclamped.

    Each up block has layers_per_block + 1 resnets; widths run in reverse of the encoder's. `up_blocks`
    is registered before `mid_block`, as diffusers does, so state-dict order matches."""

    def __init__(self, in_channels: int = 4, out_channels: int = 3,
                 block_out_channels: tuple[int, ...] = (128, 256, 512, 512), layers_per_block: int = 2,
                 norm_num_groups: int = 32, mid_block_add_attention: bool = True) -> None:
        super().__init__()
        rev = tuple(block_out_channels)[::-1]
        self.conv_in = nn.Conv2d(in_channels, rev[0], 3, padding=1)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], layers_per_block + 1, norm_num_groups,
                             add_upsample=i < len(rev) - 1)
            for i in range(len(rev))
        ])
        self.mid_block = UNetMidBlock2D(rev[0], norm_num_groups, add_attention=mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, rev[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(rev[-1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def _nearest_multiple(n: int, m: int) -> int:
    return max(m, m * round(n / m))


def _check_slice_size(n: object) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"slice_size={n!r}; expected a positive int (images per encoder/decoder call) "
                         "or None for the whole batch")


class AutoencoderKL(nn.Module):
    """SD VAE: `encode_dist`/`encode` pixels -> unscaled latents, `decode` unscaled latents -> pixels.

    Runs in the dtype of its weights; inputs are cast to it. `slice_size` (None: whole batch) bounds
    how many images go through the encoder/decoder at once, for the video families that push a
    clip's frames through as a batch; results do not depend on it (noise is drawn for the whole batch).
    """

    def __init__(self, cfg: VAEConfig | None = None, slice_size: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg or VAE_PRESETS["sd15"]
        self.scaling_factor = self.cfg.scaling_factor
        _check_slice_size(slice_size)
        self.slice_size = slice_size
        c = self.cfg
        z = c.latent_channels
        self.encoder = Encoder(c.in_channels, z, c.block_out_channels, c.layers_per_block, c.norm_num_groups,
                               double_z=True, mid_block_add_attention=c.mid_block_add_attention)
        self.decoder = Decoder(z, c.out_channels, c.block_out_channels, c.layers_per_block, c.norm_num_groups,
                               mid_block_add_attention=c.mid_block_add_attention)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if c.use_post_quant_conv else None

    def _slices(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        _check_slice_size(self.slice_size)  # again here: it is a plain attribute callers may reassign
        return (x,) if self.slice_size is None else x.split(self.slice_size)

    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C_in, H, W] in [-1, 1], H and W multiples of f -> (mean, logvar), each [B, Z, H/f, W/f];
        logvar clamped to [-30, 20]. For callers that draw their own noise (per-sample streams)."""
        c = self.cfg
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"encode expects images [B, {c.in_channels}, H, W], got shape {tuple(x.shape)}; "
                             "fold frames into the batch (B*F) and put channels first")
        f = c.spatial_factor
        for name, n in (("H", x.shape[2]), ("W", x.shape[3])):
            if n % f or n == 0:
                raise ValueError(f"encode got {name}={n}; it must be a multiple of {f}. "
                                 f"Nearest valid: {_nearest_multiple(n, f)}; resize or crop the images")
        x = x.to(self.encoder.conv_in.weight.dtype)
        moments = []
        for chunk in self._slices(x):
            h = self.encoder(chunk)
            moments.append(h if self.quant_conv is None else self.quant_conv(h))
        mean, logvar = torch.cat(moments).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """x [B, C_in, H, W] in [-1, 1] -> unscaled latents [B, Z, H/f, W/f]: the posterior mode (mean),
        or with sample=True mean + std * N(0, 1) drawn from `generator` (on the generator's device)."""
        mean, logvar = self.encode_dist(x)
        if not sample:
            return mean
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, Z, h, w] -> pixels [B, C_out, h*f, w*f], roughly [-1, 1], not clamped."""
        c = self.cfg
        if z.dim() != 4 or z.shape[1] != c.latent_channels:
            raise ValueError(f"decode expects latents [B, {c.latent_channels}, h, w], got shape {tuple(z.shape)}; "
                             "fold frames into the batch (B*F), and divide by scaling_factor before decoding")
        z = z.to(self.decoder.conv_in.weight.dtype)
        out = []
        for chunk in self._slices(z):
            out.append(self.decoder(chunk if self.post_quant_conv is None else self.post_quant_conv(chunk)))
        return torch.cat(out)


def build_vae(preset: str = "sd15", slice_size: int | None = None, **overrides: Any) -> AutoencoderKL:
    """AutoencoderKL from a named preset with VAEConfig field overrides (e.g. scaling_factor=...)."""
    if preset not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {preset!r}; choose one of {sorted(VAE_PRESETS)}")
    known = {f.name for f in fields(VAEConfig)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"unknown VAEConfig field {key!r}; valid fields: {sorted(known)}")
    return AutoencoderKL(replace(VAE_PRESETS[preset], **overrides), slice_size=slice_size)


__all__ = ["NORM_EPS", "LOGVAR_RANGE", "VAEConfig", "VAE_PRESETS", "ResnetBlock2D", "AttentionBlock",
           "UNetMidBlock2D", "Downsample2D", "Upsample2D", "DownEncoderBlock2D", "UpDecoderBlock2D", "Encoder",
           "Decoder", "AutoencoderKL", "build_vae"]
