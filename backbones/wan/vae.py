"""Wan2.2 VAE (upstream `Wan2_2_VAE` / `WanVAE_`): causal 3D conv autoencoder, 4x16x16 compression.

Shapes: B batch, C channels, T pixel frames, H/W pixel height/width, F latent frames, h/w latent
height/width, Z latent channels (`z_dim`). Pixel video is [B, 3, T, H, W] in [-1, 1] with T = 4n+1;
latents are [B, Z, F, h, w] with F = 1 + (T-1)/4, h = H/16, w = W/16.

Parameter names equal the official `Wan2.2_VAE.pth` (196 tensors), so it loads with `strict=True`;
the diffusers layout goes through `backbones.wan.vae_keymap`.

Time is processed in chunks (encode: frame 0, then 4-frame chunks; decode: one latent frame at a
time). Every causal conv with temporal context remembers the last CACHE_T frames of its input in a
`FeatureCache` so that chunked processing equals a causal pass over the whole clip, at the memory of
one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE_T = 2  # frames of left context a kernel-3 causal conv needs from the previous chunk

# Latent statistics of the official 5B VAE (§3.5 of the spec; upstream keeps them in code, not in
# the checkpoint). encode returns (mu - mean) / std, decode inverts it.
_WAN22_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542,
    0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665,
    -0.2108, -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433,
    -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
_WAN22_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894,
    1.0901, 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986,
    0.5659, 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415,
    0.4944, 0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468,
    0.7744,
)


@dataclass(frozen=True)
class WanVAEConfig:
    """Architecture of the Wan2.2 VAE; `VAE_PRESETS` holds the named sizes."""

    z_dim: int = 48
    dim: int = 160  # encoder base width (upstream `c_dim`)
    dec_dim: int = 256  # decoder base width
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 2  # pixel patchify before the encoder / after the decoder
    in_channels: int = 3
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = _WAN22_MEAN
    latents_std: tuple[float, ...] = _WAN22_STD

    def __post_init__(self) -> None:
        n_down = len(self.dim_mult) - 1
        if len(self.temporal_downsample) != n_down:
            raise ValueError(f"temporal_downsample has {len(self.temporal_downsample)} entries but dim_mult "
                             f"{self.dim_mult} has {n_down} downsampling stages; give one bool per stage")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} has {len(getattr(self, name))} values, expected z_dim={self.z_dim}; "
                                 f"give one per latent channel")
        if any(s <= 0 for s in self.latents_std):
            raise ValueError(f"latents_std must be positive, got {self.latents_std}")

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)


VAE_PRESETS: dict[str, WanVAEConfig] = {
    "5b": WanVAEConfig(),
    # Same topology with small widths (961,420 parameters: the shipped tiny base stays a few MB); z_dim 16 is the
    # contract with the tiny DiT.
    "tiny": WanVAEConfig(z_dim=16, dim=8, dec_dim=8, latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16),
}


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


class FeatureCache:
    """Per-module memory carried from one temporal chunk to the next; one instance per encode/decode."""

    def __init__(self) -> None:
        self._slots: dict[nn.Module, torch.Tensor] = {}

    def get(self, owner: nn.Module) -> torch.Tensor | None:
        return self._slots.get(owner)

    def put(self, owner: nn.Module, frames: torch.Tensor) -> None:
        # clone: a slice would keep the whole chunk's activation alive until the next chunk
        self._slots[owner] = frames.clone()


class CausalConv3d(nn.Conv3d):
    """Conv3d that sees only past frames: zero padding in front in time, symmetric in space.

    The padding is applied here with F.pad and the conv itself runs through `_conv_forward` with
    `self.padding == 0`; LoRA overrides `_conv_forward`, so a delta on this conv stays correct.
    With a cache, the previous chunk's last frames replace (part of) the front zero padding.
    x [B, C_in, T, H, W] -> [B, C_out, T', H', W'].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = _triple(padding)
        self.causal_padding = (pw, pw, ph, ph, 2 * pt, 0)  # F.pad order: W, H, then T (front only)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        pad = list(self.causal_padding)
        if cache is not None and pad[4] > 0:
            prev = cache.get(self)
            keep = x[:, :, -CACHE_T:]
            if keep.shape[2] < CACHE_T and prev is not None:
                # a 1-frame chunk still leaves 2 frames of context: last old frame + this one
                keep = torch.cat([prev[:, :, -1:], keep], dim=2)
            cache.put(self, keep)
            if prev is not None:
                x = torch.cat([prev, x], dim=2)
                pad[4] -= prev.shape[2]
        x = F.pad(x, pad)
        return self._conv_forward(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """x / ||x||_2 over channels * sqrt(C) * gamma (upstream RMS_norm; no eps inside the sqrt).

    Channel dim is 1. `images=True` -> gamma [C, 1, 1] for [N, C, H, W]; else [C, 1, 1, 1] for 5-D.
    """

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 island: the sum of C squares loses too many bits in bf16/fp16
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        return F.normalize(xf, dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """[norm, SiLU, conv3, norm, SiLU, dropout, conv3] + (1x1x1 conv or identity) shortcut.

    x [B, C_in, T, H, W] -> [B, C_out, T, H, W].
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        # ModuleList (not Sequential) because the convs need the cache; indices match upstream keys
        self.residual = nn.ModuleList([
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1),
        ])
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        r = self.residual
        y = r[2](r[1](r[0](x)), cache)
        y = r[6](r[5](r[4](r[3](y))), cache)
        return y + self.shortcut(x)  # 1x1x1 shortcut has no temporal context, so no cache


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no temporal mixing).

    x [B, C, T, H, W] -> same.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(y)).flatten(2).transpose(1, 2)  # [B*T, H*W, 3C]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # each [B*T, 1, H*W, C]
        # Plain SDPA, not the shared seam: one head of width C (up to 1024), per frame, never sharded.
        y = F.scaled_dot_product_attention(q, k, v)
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.view(b, t, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """Per-frame 2x spatial down/upsampling, plus 2x in time for the '3d' modes.

    downsample2d/3d: [B, C, T, H, W] -> [B, C, T', H/2, W/2]; upsample2d/3d -> [B, C, T', 2H, 2W].
    Temporal: downsample3d maps a 4-frame chunk to 2 (2 -> 1) using the last frame of the previous
    chunk; the first chunk (1 frame) passes through. upsample3d doubles frames except on the first
    chunk, whose single latent frame decodes to a single frame.
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode {mode!r} is not one of {self.MODES}")
        self.mode = mode
        if mode.startswith("down"):
            # pad right/bottom only, then a stride-2 conv: matches the checkpoint's alignment
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim, 3, padding=1))
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        elif mode == "upsample3d":
            # 2C outputs = two interleaved frames per input frame
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool = False) -> torch.Tensor:
        if self.mode == "upsample3d" and not first_chunk:
            b, c, t, h, w = x.shape
            x = self.time_conv(x, cache)  # [B, 2C, T, H, W]
            x = x.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        b, c, t, h, w = x.shape
        y = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        x = y.view(b, t, c, y.shape[-2], y.shape[-1]).transpose(1, 2)
        if self.mode == "downsample3d":
            prev = cache.get(self)
            cache.put(self, x[:, :, -1:])
            if not first_chunk:
                if prev is None:
                    raise RuntimeError("downsample3d got a later chunk before the first one; "
                                       "encode chunks in order with one FeatureCache")
                # 1 old + 4 new frames -> 2 (kernel 3, stride 2, no padding)
                x = self.time_conv(torch.cat([prev, x], dim=2))
        return x


class AvgDown3D(nn.Module):
    """Parameter-free shortcut: fold (ft, fs, fs) blocks into channels, average groups to C_out.

    [B, C_in, T, H, W] -> [B, C_out, ceil(T/ft), H/fs, W/fs]; T is zero-padded in front to a multiple of ft.
    """

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.ft, self.fs = in_dim, out_dim, factor_t, factor_s
        folded = in_dim * factor_t * factor_s ** 2
        if folded % out_dim:
            raise ValueError(f"AvgDown3D: in_dim*ft*fs^2 = {folded} is not divisible by out_dim={out_dim}")
        self.group = folded // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut, inverse layout of AvgDown3D: repeat channels, unfold into (ft, fs, fs).

    [B, C_in, T, H, W] -> [B, C_out, T*ft, H*fs, W*fs]; on the first chunk the first ft-1 frames are
    dropped (the first latent frame stands for one pixel frame).
    """

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.ft, self.fs = in_dim, out_dim, factor_t, factor_s
        unfolded = out_dim * factor_t * factor_s ** 2
        if unfolded % in_dim:
            raise ValueError(f"DupUp3D: out_dim*ft*fs^2 = {unfolded} is not divisible by in_dim={in_dim}")
        self.repeats = unfolded // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool = False) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first_chunk else x


class DownResidualBlock(nn.Module):
    """Encoder stage: residual blocks (+ Resample) with an AvgDown3D shortcut around the whole stage."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float,
                 temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if spatial else 1)
        blocks: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout)
                                   for i in range(num_res_blocks)]
        if spatial:
            blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool = False) -> torch.Tensor:
        y = x
        for m in self.downsamples:
            y = m(y, cache, first_chunk) if isinstance(m, Resample) else m(y, cache)
        return y + self.avg_shortcut(x)


class UpResidualBlock(nn.Module):
    """Decoder stage: num_res_blocks+1 residual blocks (+ Resample and DupUp3D shortcut if upsampling).

    The last stage (no upsampling) has no stage shortcut at all, as upstream.
    """

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float,
                 temporal: bool, spatial: bool) -> None:
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if spatial else None
        blocks: list[nn.Module] = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout)
                                   for i in range(num_res_blocks + 1)]
        if spatial:
            blocks.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool = False) -> torch.Tensor:
        y = x
        for m in self.upsamples:
            y = m(y, cache, first_chunk) if isinstance(m, Resample) else m(y, cache)
        if self.avg_shortcut is not None:
            y = y + self.avg_shortcut(x, first_chunk)
        return y


def _middle(dim: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout)])


def _head(in_dim: int, out_dim: int) -> nn.ModuleList:
    return nn.ModuleList([RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1)])


class Encoder3d(nn.Module):
    """One chunk of patchified frames [B, C*p*p, T_chunk, H/p, W/p] -> [B, 2Z, 1, h, w] (mu, log_var)."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        n = len(cfg.dim_mult)
        self.conv1 = CausalConv3d(cfg.in_channels * cfg.patch_size ** 2, dims[0], 3, padding=1)
        self.downsamples = nn.ModuleList([
            DownResidualBlock(dims[i], dims[i + 1], cfg.num_res_blocks, cfg.dropout,
                              temporal=i < n - 1 and bool(cfg.temporal_downsample[i]), spatial=i < n - 1)
            for i in range(n)
        ])
        self.middle = _middle(dims[-1], cfg.dropout)
        self.head = _head(dims[-1], cfg.z_dim * 2)

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool = False) -> torch.Tensor:
        x = self.conv1(x, cache)
        for stage in self.downsamples:
            x = stage(x, cache, first_chunk)
        x = self.middle[2](self.middle[1](self.middle[0](x, cache)), cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)


class Decoder3d(nn.Module):
    """One latent frame [B, Z, 1, h, w] -> [B, C*p*p, 1 (first chunk) or 4, H/p, W/p]."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        mult = (cfg.dim_mult[-1], *cfg.dim_mult[::-1])
        dims = [cfg.dec_dim * m for m in mult]
        temporal_up = tuple(cfg.temporal_downsample[::-1])
        n = len(cfg.dim_mult)
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], cfg.dropout)
        self.upsamples = nn.ModuleList([
            UpResidualBlock(dims[i], dims[i + 1], cfg.num_res_blocks, cfg.dropout,
                            temporal=i < n - 1 and bool(temporal_up[i]), spatial=i < n - 1)
            for i in range(n)
        ])
        self.head = _head(dims[-1], cfg.in_channels * cfg.patch_size ** 2)

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool = False) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = self.middle[2](self.middle[1](self.middle[0](x, cache)), cache)
        for stage in self.upsamples:
            x = stage(x, cache, first_chunk)
        return self.head[2](self.head[1](self.head[0](x)), cache)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*p*p, T, H/p, W/p]; channel = (c*p + col offset)*p + row offset."""
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)  # b c r q t h w
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`: [B, C*p*p, T, h, w] -> [B, C, T, h*p, w*p]."""
    b, cpp, t, h, w = x.shape
    c = cpp // (p * p)
    x = x.view(b, c, p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)  # b c t h q w r
    return x.reshape(b, c, t, h * p, w * p)


def _nearest_valid_frames(t: int, tf: int) -> int:
    return max(1, tf * round((t - 1) / tf) + 1)


def _nearest_multiple(n: int, m: int) -> int:
    return max(m, m * round(n / m))


class WanVAE(nn.Module):
    """Wan2.2 VAE: `encode` video -> normalised latent mean, `decode` normalised latents -> video.

    Runs in the dtype of its weights (upstream: fp32); inputs are cast to it. Stateless between
    calls: the per-chunk feature cache lives only inside one encode/decode call.
    """

    def __init__(self, cfg: WanVAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or VAE_PRESETS["5b"]
        z = self.cfg.z_dim
        self.encoder = Encoder3d(self.cfg)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)  # applied to the concatenated chunk outputs
        self.conv2 = CausalConv3d(z, z, 1)  # applied to all latents before chunked decoding
        self.decoder = Decoder3d(self.cfg)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.cfg.latents_mean, dtype=torch.float32, device=like.device).view(shape)
        std = torch.tensor(self.cfg.latents_std, dtype=torch.float32, device=like.device).view(shape)
        return mean, std

    def _check_video(self, video: torch.Tensor) -> None:
        cfg = self.cfg
        if video.dim() != 5 or video.shape[1] != cfg.in_channels:
            raise ValueError(f"encode expects video [B, {cfg.in_channels}, T, H, W], got shape "
                             f"{tuple(video.shape)}; add the batch dim / put channels before frames")
        t, h, w = video.shape[2:]
        tf, sf = cfg.temporal_factor, cfg.spatial_factor
        if (t - 1) % tf:
            raise ValueError(f"encode got T={t} frames; the VAE needs T = {tf}n+1 frames. "
                             f"Nearest valid: {_nearest_valid_frames(t, tf)}; trim or pad the clip")
        for name, n in (("H", h), ("W", w)):
            if n % sf or n == 0:
                raise ValueError(f"encode got {name}={n}; it must be a multiple of {sf}. "
                                 f"Nearest valid: {_nearest_multiple(n, sf)}; resize or crop the video")

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 4n+1 -> normalised latent mean [B, Z, 1+(T-1)/4, H/16, W/16]."""
        self._check_video(video)
        dtype = self.conv1.weight.dtype
        x = patchify(video.to(dtype), self.cfg.patch_size)
        tf = self.cfg.temporal_factor
        cache = FeatureCache()
        # chunk 0 is frame 0 alone (the image latent), then tf frames per latent frame
        chunks = [x[:, :, :1]] + (list(x[:, :, 1:].split(tf, dim=2)) if x.shape[2] > 1 else [])
        out = torch.cat([self.encoder(c, cache, first_chunk=i == 0) for i, c in enumerate(chunks)], dim=2)
        mu = self.conv1(out)[:, : self.cfg.z_dim]  # the log-variance half is unused (deterministic)
        mean, std = self._stats(mu)
        return ((mu.float() - mean) / std).to(dtype)

    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latents [B, Z, F, h, w] -> video [B, 3, 4(F-1)+1, 16h, 16w] clamped to [-1, 1] (`clamp=False`:
        unclamped, for training the decoder, where a clamp would stop the gradient of an overshooting pixel)."""
        cfg = self.cfg
        if z.dim() != 5 or z.shape[1] != cfg.z_dim or z.shape[2] < 1:
            raise ValueError(f"decode expects latents [B, {cfg.z_dim}, F>=1, h, w], got shape {tuple(z.shape)}; "
                             f"check the VAE preset (z_dim) and the latent layout")
        dtype = self.conv2.weight.dtype
        mean, std = self._stats(z)
        x = self.conv2((z.float() * std + mean).to(dtype))
        cache = FeatureCache()
        frames = [self.decoder(x[:, :, i:i + 1], cache, first_chunk=i == 0) for i in range(x.shape[2])]
        out = unpatchify(torch.cat(frames, dim=2), cfg.patch_size)
        return out.clamp(-1.0, 1.0) if clamp else out


def build_vae(preset: str = "5b", **overrides: object) -> WanVAE:
    """WanVAE from a named preset, with dataclass field overrides (e.g. z_dim=...)."""
    if preset not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {preset!r}; choose one of {sorted(VAE_PRESETS)}")
    known = {f.name for f in fields(WanVAEConfig)}
    for key in overrides:
        if key not in known:
            raise ValueError(f"unknown WanVAEConfig field {key!r}; valid fields: {sorted(known)}")
    return WanVAE(replace(VAE_PRESETS[preset], **overrides))  # type: ignore[arg-type]


__all__ = ["CACHE_T", "WanVAEConfig", "VAE_PRESETS", "WanVAE", "CausalConv3d", "FeatureCache", "RMSNorm",
           "ResidualBlock", "AttentionBlock", "Resample", "AvgDown3D", "DupUp3D", "DownResidualBlock",
           "UpResidualBlock", "Encoder3d", "Decoder3d", "patchify", "unpatchify", "build_vae"]
