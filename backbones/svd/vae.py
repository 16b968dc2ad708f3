"""Stable Video Diffusion's VAE (diffusers `AutoencoderKLTemporalDecoder`): SD's 2D KL encoder, a decoder
whose resnets mix neighbouring frames, and a final 3-tap conv over frames (`time_conv_out`).

Shapes: B videos, F frames per video, N = B * F images (frame-major: the frames of one video are
consecutive), C channels, H/W pixel height/width, h/w latent height/width (H/f, W/f with
f = 2 ** (len(block_out_channels) - 1), 8 for SVD), Z latent channels (4).
Pixels are [N, 3, H, W] in [-1, 1]; latents are [N, Z, h, w], *unscaled*: the spec multiplies by
`scaling_factor` (0.18215) for diffusion latents only, and SVD's image conditioning uses the unscaled
posterior mode. Encoding is per image; only decoding is temporal.

Module paths equal diffusers' (374 tensors, 97,742,847 parameters for SVD / SVD-XT), so
`vae/diffusion_pytorch_model{,.fp16}.safetensors` loads with `strict=True`. The encoder, its blocks, the
single-head attention and the resnets are SD's (`backbones.sd.vae`); what is SVD's own lives here.
Every GroupNorm has 32 groups: diffusers hard-codes them in the temporal decoder, so widths must be
multiples of 32.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.loading import load_safetensors_into, sharded_safetensors
from backbones.sd.vae import LOGVAR_RANGE, NORM_EPS, AttentionBlock, Encoder, ResnetBlock2D, Upsample2D

GROUPS = 32  # hard-coded by diffusers in TemporalDecoder, TemporalResnetBlock and the encoder default
TEMPORAL_EPS = 1e-5  # the temporal resnets' GroupNorms; every other VAE norm uses NORM_EPS (1e-6)
WEIGHTS_STEM = "diffusion_pytorch_model"


@dataclass(frozen=True)
class TemporalDecoderVAEConfig:
    """Architecture of `AutoencoderKLTemporalDecoder`; field names and defaults as in SVD's vae/config.json."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    sample_size: int = 768  # informational (the training resolution)
    scaling_factor: float = 0.18215
    # informational: diffusers' pipelines run this VAE in fp32 when the rest is fp16; callers decide the dtype
    force_upcast: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "down_block_types", tuple(self.down_block_types))
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("block_out_channels is empty; give one width per resolution, e.g. (128, 256, 512, 512)")
        bad = [c for c in self.block_out_channels if c % GROUPS]
        if bad:
            raise ValueError(f"block_out_channels {self.block_out_channels} has widths {bad} not divisible by "
                             f"{GROUPS} (the GroupNorm groups diffusers hard-codes); use multiples of {GROUPS}")
        if self.down_block_types != ("DownEncoderBlock2D",) * len(self.block_out_channels):
            raise ValueError(f"down_block_types {self.down_block_types} is not supported; expected "
                             f"'DownEncoderBlock2D' once per entry of block_out_channels "
                             f"({len(self.block_out_channels)} entries)")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block}; expected >= 1")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor={self.scaling_factor}; expected a positive float (SVD: 0.18215)")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TemporalDecoderVAEConfig:
        """From a diffusers vae/config.json dict; `_`-prefixed metadata is ignored, other unknown keys raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"unknown AutoencoderKLTemporalDecoder config keys {unknown}; valid keys: "
                             f"{sorted(known)}. Is this the vae/config.json of an SVD checkpoint?")
        return cls(**{k: v for k, v in config.items() if k in known})


VAE_PRESETS: dict[str, TemporalDecoderVAEConfig] = {
    "svd": TemporalDecoderVAEConfig(),  # img2vid and img2vid-xt share this VAE
    # two resolutions (one down/upsample), 2x compression, every block kind present; 987,673 parameters
    "tiny": TemporalDecoderVAEConfig(down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32, 64),
                                     sample_size=32),
}


# -- temporal decoder blocks -------------------------------------------------------------------------
# Tensors inside a block are [N, C, h, w] with N = B * num_frames; temporal parts view them as
# [B, C, F, h, w]. A "video" here is whatever the caller decodes together (one chunk of frames).

def _to_video(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)  # [B, C, F, h, w]


def _to_images(x: torch.Tensor) -> torch.Tensor:
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # [N, C, h, w]


class TemporalResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv3d(3,1,1) twice with a residual, no time embedding (the VAE's use).
    x [B, C, F, h, w] -> same. Its GroupNorm statistics span all F frames: one way frames mix."""

    def __init__(self, channels: int, eps: float = TEMPORAL_EPS) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, channels, eps=eps)
        self.conv1 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.norm2 = nn.GroupNorm(GROUPS, channels, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return x + h


class AlphaBlender(nn.Module):
    """Merge strategy "learned" with the VAE's switch: out = (1 - sigmoid(m)) * spatial + sigmoid(m) * temporal
    (the UNet's blender weights the spatial branch by sigmoid(m) instead). m starts at 0."""

    def __init__(self, alpha: float = 0.0) -> None:
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor([alpha]))

    def forward(self, x_spatial: torch.Tensor, x_temporal: torch.Tensor) -> torch.Tensor:
        alpha = (1.0 - torch.sigmoid(self.mix_factor)).to(x_spatial.dtype)
        return alpha * x_spatial + (1.0 - alpha) * x_temporal


class SpatioTemporalResBlock(nn.Module):
    """SD's VAE resnet per frame (eps 1e-6), then a temporal resnet over the frames (eps 1e-5), blended.
    x [N, Ci, h, w] -> [N, Co, h, w]."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.spatial_res_block = ResnetBlock2D(in_channels, out_channels, GROUPS, NORM_EPS)
        self.temporal_res_block = TemporalResnetBlock(out_channels, TEMPORAL_EPS)
        self.time_mixer = AlphaBlender(0.0)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = _to_video(self.spatial_res_block(x), num_frames)  # [B, Co, F, h, w]
        return _to_images(self.time_mixer(x, self.temporal_res_block(x)))


class MidBlockTemporalDecoder(nn.Module):
    """resnets.0, then (attention, resnet) pairs; attention is per frame (1 head of width C).

    diffusers builds `num_layers` resnets but one attention and zips them, so with num_layers > 2 the
    resnets after the second hold weights but never run; reproduced as is. `attentions` is registered
    before `resnets`, as diffusers does, so state-dict order matches."""

    def __init__(self, channels: int, num_layers: int) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(channels, GROUPS, NORM_EPS)])
        self.resnets = nn.ModuleList([SpatioTemporalResBlock(channels, channels) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = self.resnets[0](x, num_frames)
        for resnet, attn in zip(self.resnets[1:], self.attentions):
            x = resnet(attn(x), num_frames)
        return x


class UpBlockTemporalDecoder(nn.Module):
    """`num_layers` spatio-temporal resnets (the first changes width), then an optional nearest-2x + conv."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, add_upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([SpatioTemporalResBlock(in_channels if i == 0 else out_channels, out_channels)
                                      for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class TemporalDecoder(nn.Module):
    """Latents [N, Z, h, w] -> pixels [N, C_out, h*f, w*f], unclamped; every N // num_frames consecutive
    images are decoded as one video (frames mix within it: temporal GroupNorms and 3-tap convs)."""

    def __init__(self, in_channels: int = 4, out_channels: int = 3,
                 block_out_channels: tuple[int, ...] = (128, 256, 512, 512), layers_per_block: int = 2) -> None:
        super().__init__()
        rev = tuple(block_out_channels)[::-1]
        self.conv_in = nn.Conv2d(in_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlockTemporalDecoder(rev[0], layers_per_block)
        self.up_blocks = nn.ModuleList([
            UpBlockTemporalDecoder(rev[max(i - 1, 0)], rev[i], layers_per_block + 1, add_upsample=i < len(rev) - 1)
            for i in range(len(rev))
        ])
        self.conv_norm_out = nn.GroupNorm(GROUPS, rev[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(rev[-1], out_channels, 3, padding=1)
        self.time_conv_out = nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z), num_frames)
        for block in self.up_blocks:
            x = block(x, num_frames)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))  # [N, C_out, H, W]
        return _to_images(self.time_conv_out(_to_video(x, num_frames)))


# -- the autoencoder -------------------------------------------------------------------------------

def _positive_int(name: str, n: object, fix: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name}={n!r}; expected a positive int ({fix})")


class AutoencoderKLTemporalDecoder(nn.Module):
    """SVD VAE: `encode_dist`/`encode` images -> unscaled latents, `decode` a clip's unscaled latents -> frames.

    Runs in the dtype of its weights; inputs are cast to it. No post_quant_conv (latents go straight to the
    decoder), as in the checkpoint."""

    def __init__(self, cfg: TemporalDecoderVAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or VAE_PRESETS["svd"]
        self.scaling_factor = self.cfg.scaling_factor
        c = self.cfg
        z = c.latent_channels
        self.encoder = Encoder(c.in_channels, z, c.block_out_channels, c.layers_per_block, GROUPS, double_z=True)
        self.decoder = TemporalDecoder(z, c.out_channels, c.block_out_channels, c.layers_per_block)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)

    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, C_in, H, W] in [-1, 1] (independent images, e.g. SVD's conditioning frame), H and W
        multiples of f -> (mean, logvar), each [N, Z, H/f, W/f]; logvar clamped to [-30, 20]."""
        c = self.cfg
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"encode expects images [N, {c.in_channels}, H, W], got shape {tuple(x.shape)}; "
                             "fold frames into the batch (B*F) and put channels first")
        f = c.spatial_factor
        for name, n in (("H", x.shape[2]), ("W", x.shape[3])):
            if n % f or n == 0:
                raise ValueError(f"encode got {name}={n}; it must be a multiple of {f}. "
                                 f"Nearest valid: {max(f, f * round(n / f))}; resize or crop the images")
        moments = self.quant_conv(self.encoder(x.to(self.quant_conv.weight.dtype)))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False) -> torch.Tensor:
        """x [N, C_in, H, W] -> unscaled latents [N, Z, H/f, W/f]: the posterior mode (mean; what SVD
        conditions on), or with sample=True mean + std * N(0, 1) drawn from `generator` (on its device)."""
        mean, logvar = self.encode_dist(x)
        if not sample:
            return mean
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z: torch.Tensor, num_frames: int, decode_chunk_size: int | None = None) -> torch.Tensor:
        """Unscaled latents z [B*F, Z, h, w] (frame-major, F = num_frames) -> frames [B*F, C_out, h*f, w*f],
        roughly [-1, 1], not clamped.

        decode_chunk_size None decodes each video whole (diffusers' `vae.decode(z, num_frames=F)`). Otherwise
        each video's frames go through the decoder `decode_chunk_size` at a time, each chunk decoded as a
        clip of its own (frames mix only within a chunk, and the temporal convs zero-pad at chunk edges), as
        SVD's pipeline `decode_latents` does. The pipeline chunks the flattened B*F axis, so for B > 1 with F
        not a multiple of the chunk size its chunks straddle two videos; here chunks never cross videos,
        which equals the pipeline run on each video alone (and the pipeline itself when B = 1 or the chunk
        size divides F)."""
        c = self.cfg
        if z.dim() != 4 or z.shape[1] != c.latent_channels:
            raise ValueError(f"decode expects latents [B*F, {c.latent_channels}, h, w], got shape {tuple(z.shape)};"
                             " fold frames into the batch (B*F), and divide by scaling_factor before decoding")
        _positive_int("num_frames", num_frames, "frames per video in the B*F batch")
        if z.shape[0] % num_frames:
            raise ValueError(f"decode got {z.shape[0]} latents, not a multiple of num_frames={num_frames}; "
                             "pass B*F latents of B videos with num_frames frames each")
        if decode_chunk_size is not None:
            _positive_int("decode_chunk_size", decode_chunk_size, "frames per decoder call, or None for whole videos")
        z = z.to(self.quant_conv.weight.dtype)
        if decode_chunk_size is None or decode_chunk_size >= num_frames:
            return self.decoder(z, num_frames)
        out = []
        for video in z.split(num_frames):  # each [F, Z, h, w]
            for chunk in video.split(decode_chunk_size):
                out.append(self.decoder(chunk, chunk.shape[0]))
        return torch.cat(out)


def build_vae(preset: str = "svd", **overrides: Any) -> AutoencoderKLTemporalDecoder:
    """AutoencoderKLTemporalDecoder from a named preset with TemporalDecoderVAEConfig field overrides."""
    if preset not in VAE_PRESETS:
        raise ValueError(f"unknown SVD VAE preset {preset!r}; choose one of {sorted(VAE_PRESETS)}")
    known = {f.name for f in fields(TemporalDecoderVAEConfig)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"unknown TemporalDecoderVAEConfig field {key!r}; valid fields: {sorted(known)}")
    return AutoencoderKLTemporalDecoder(replace(VAE_PRESETS[preset], **overrides))


def load_vae(folder: str | Path, variant: str | None = None, dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> AutoencoderKLTemporalDecoder:
    """The VAE of a diffusers `vae/` folder (config.json + diffusion_pytorch_model[.<variant>].safetensors),
    built on meta and loaded strictly. variant None takes the plain file, else the fp16 one if only it exists
    (their keys are identical); `dtype` casts the weights (default: as stored)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}; pass the checkpoint's vae/ folder")
    try:
        cfg = TemporalDecoderVAEConfig.from_config(json.loads(config_file.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    stems = [f"{WEIGHTS_STEM}.{variant}"] if variant else [WEIGHTS_STEM, f"{WEIGHTS_STEM}.fp16"]
    for i, stem in enumerate(stems):
        try:
            files = sharded_safetensors(folder, stem)
            break
        except FileNotFoundError:
            if i == len(stems) - 1:
                raise
    with torch.device("meta"):
        model = AutoencoderKLTemporalDecoder(cfg)
    load_safetensors_into(model, files, dtype=dtype, device=device)
    return model.eval()


__all__ = ["GROUPS", "TEMPORAL_EPS", "TemporalDecoderVAEConfig", "VAE_PRESETS", "TemporalResnetBlock",
           "AlphaBlender", "SpatioTemporalResBlock", "MidBlockTemporalDecoder", "UpBlockTemporalDecoder",
           "TemporalDecoder", "AutoencoderKLTemporalDecoder", "build_vae", "load_vae"]
