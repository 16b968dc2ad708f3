"""CogVideoX 1.0 VAE (diffusers `AutoencoderKLCogVideoX`): causal 3D conv autoencoder, 4x8x8 compression.

Shapes: B batch, C channels, F pixel frames, H/W pixel height/width, L latent frames, h/w latent height/width,
Z latent channels (`latent_channels`, 16), s = 2 ** (len(block_out_channels) - 1) the spatial factor (8).
Pixel video is [B, 3, F, H, W] in [-1, 1] with F = 4k+1; latents are [B, Z, L, h, w] with L = k+1, h = H/s,
w = W/s, *unscaled*: the caller multiplies by `config.scaling_factor` after `encode` (and after `sample_latent`)
and divides before `decode`; the VAE never does.

Module paths equal diffusers' (436 tensors, 215,583,907 parameters for the released 2B/5B VAE), so an official
`vae/diffusion_pytorch_model.safetensors` loads with `strict=True` and no key map.

Time runs in chunks exactly as diffusers does (cogvideox.md §3.3): encode takes pixel frames 8 at a time, decode
latent frames 2 at a time, the first chunk absorbing the remainder (49 -> 9+8*5, 13 -> 3+2*5). Every kernel-3
causal conv keeps the last 2 frames of its padded input in a `ConvCache`, so convolutions see the whole past, but
GroupNorm statistics are per chunk; that is what the released latents were made with, hence kept for parity.

Runs in the dtype of its weights (fp32 as released; `force_upcast` says upstream pipelines keep it fp32);
inputs are cast to it. GroupNorm runs in fp32 under bf16/fp16 (diffusers' runs in the weights' dtype; identical
in fp32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CogVideoXVAEConfig", "VAE_PRESETS", "AutoencoderKLCogVideoX", "ConvCache", "CausalConv3d",
           "SafeConv3d", "SpatialNorm3D", "ResnetBlock3D", "Downsample3D", "Upsample3D", "DownBlock3D",
           "MidBlock3D", "UpBlock3D", "Encoder3D", "Decoder3D", "check_frames", "decoded_frames",
           "frame_chunks", "sample_latent", "LOGVAR_RANGE"]

LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp: keeps exp(logvar / 2) finite
NORM_EPS = 1e-6  # encoder norm_out and every SpatialNorm: hard-coded upstream, not `norm_eps`
SAMPLE_FRAMES_BATCH = 8  # diffusers `num_sample_frames_batch_size`
LATENT_FRAMES_BATCH = 2  # diffusers `num_latent_frames_batch_size`; the VAE was trained with this chunking
_SAFE_CONV_ELEMENTS = 2 ** 30  # upstream splits a conv input above "2 GB at 2 bytes per value"

_DOWN, _UP = "CogVideoXDownBlock3D", "CogVideoXUpBlock3D"


@dataclass(frozen=True)
class CogVideoXVAEConfig:
    """The diffusers vae/config.json keys, names verbatim; `VAE_PRESETS` holds the named sizes."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_DOWN,) * 4
    up_block_types: tuple[str, ...] = (_UP,) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    sample_height: int = 480  # only sets the default tile size (half of it)
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("block_out_channels is empty; give one width per resolution, e.g. (128, 256, 256, 512)")
        if tuple(self.down_block_types) != (_DOWN,) * n or tuple(self.up_block_types) != (_UP,) * n:
            raise ValueError(f"down_block_types/up_block_types must be {n} x {_DOWN!r} / {_UP!r} (one per "
                             f"block_out_channels entry), got {self.down_block_types} / {self.up_block_types}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {self.block_out_channels} has widths {bad} not divisible by "
                             f"norm_num_groups={self.norm_num_groups}; pick widths that are multiples of it")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block}; expected >= 1")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn={self.act_fn!r}; the CogVideoX VAE uses 'silu'")
        r = self.temporal_compression_ratio
        if r < 1 or r & (r - 1) or int(math.log2(r)) > n - 1:
            raise ValueError(f"temporal_compression_ratio={r}; expected a power of two <= 2**{n - 1} (one halving "
                             f"per downsampling stage); CogVideoX uses 4")
        if self.use_quant_conv or self.use_post_quant_conv:
            raise ValueError("use_quant_conv/use_post_quant_conv=True: no CogVideoX checkpoint has them (and "
                             "diffusers would size them from out_channels, not latent_channels); set both False")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor={self.scaling_factor}; expected > 0 (2B: 1.15258426, 5B: 0.7)")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_compress_level(self) -> int:
        """Number of leading down (and up) blocks that also halve (double) time."""
        return int(math.log2(self.temporal_compression_ratio))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CogVideoXVAEConfig:
        """From a diffusers vae/config.json dict; unknown keys (`_class_name`, `_diffusers_version`, ...) are
        ignored, lists become tuples."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known}
        return cls(**kwargs)


VAE_PRESETS: dict[str, CogVideoXVAEConfig] = {
    # THUDM/CogVideoX-2b vae/config.json (cogvideox.md §3.1, §0.2)
    "2b": CogVideoXVAEConfig(scaling_factor=1.15258426),
    # THUDM/CogVideoX-5b (and -5b-I2V) vae/config.json: same weights layout, other scaling
    "5b": CogVideoXVAEConfig(scaling_factor=0.7),
    # Same topology (4 stages: 8x spatial, 4x temporal; shortcuts where widths change) at toy widths,
    # 2,088,883 parameters. Default tiles stay 240 x 360 px, so tiny inputs tile only with explicit sizes.
    "tiny": CogVideoXVAEConfig(block_out_channels=(16, 32, 32, 64), layers_per_block=1, norm_num_groups=8,
                               scaling_factor=0.7),
}


# -- frame rules -----------------------------------------------------------------------------------

def check_frames(num_frames: int, temporal_compression_ratio: int = 4) -> int:
    """Latent frame count for `num_frames` pixel frames; ValueError unless num_frames = 4k+1 (k >= 0)."""
    r = temporal_compression_ratio
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % r:
        lo = max(1, (int(num_frames) - 1) // r * r + 1) if isinstance(num_frames, (int, float)) else 1
        raise ValueError(
            f"num_frames={num_frames!r}: the CogVideoX VAE encodes {r}k+1 frames (1, {r + 1}, {2 * r + 1}, ..., 49) "
            f"into k+1 latent frames; nearest valid: {lo} or {lo + r}; trim or pad the clip. Note: for an exact "
            f"encode/decode round trip use {2 * r}k+1 frames (e.g. 49), since decoding an even number of latent "
            f"frames L gives {r}L frames, not {r}(L-1)+1")
    return (num_frames - 1) // r + 1


def decoded_frames(latent_frames: int, temporal_compression_ratio: int = 4) -> int:
    """Pixel frames `decode` returns for L latent frames: r(L-1)+1 for odd L but rL for even L (the first
    chunk of 2 has no lone first frame to keep; cogvideox.md §3.5)."""
    r = temporal_compression_ratio
    if latent_frames % 2:
        return r * (latent_frames - 1) + 1
    return r * latent_frames


def frame_chunks(num_frames: int, batch: int) -> list[slice]:
    """diffusers' frame batching: max(num_frames // batch, 1) chunks of `batch` frames, the first one also
    taking the remainder (49, 8 -> 9, 8, 8, 8, 8, 8; 5, 8 -> 5)."""
    n, rem = max(num_frames // batch, 1), num_frames % batch
    return [slice(0 if i == 0 else batch * i + rem, batch * (i + 1) + rem) for i in range(n)]


def sample_latent(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """A posterior draw mean + exp(logvar / 2) * eps, eps ~ N(0, 1) drawn on the generator's device (as
    diffusers' `randn_tensor`), so a CPU generator gives the same latent on any device."""
    device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE)) * eps


# -- layers ----------------------------------------------------------------------------------------

class ConvCache:
    """The last input frames of each causal conv, carried from one temporal chunk to the next; one instance
    per encode/decode of one clip (or one tile)."""

    def __init__(self) -> None:
        self._slots: dict[nn.Module, torch.Tensor] = {}

    def get(self, owner: nn.Module) -> torch.Tensor | None:
        return self._slots.get(owner)

    def put(self, owner: nn.Module, frames: torch.Tensor) -> None:
        # clone: a slice would keep the whole chunk's activation alive until the next chunk
        self._slots[owner] = frames.clone()


class SafeConv3d(nn.Conv3d):
    """Conv3d that splits inputs over 2**30 elements into runs of output frames (each with its kernel-1 frames
    of input context), as upstream does to stay inside cuDNN limits: the same result, less memory. Time is
    never padded here (the causal wrapper did it). LoRA overrides `_conv_forward`, so it sees every run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, t_out = self.kernel_size[0], x.shape[2] - self.kernel_size[0] + 1
        parts = min(x.numel() // _SAFE_CONV_ELEMENTS + 1, t_out)
        if parts <= 1:
            return super().forward(x)
        step = -(-t_out // parts)
        return torch.cat([super(SafeConv3d, self).forward(x[:, :, s:min(s + step, t_out) + k - 1])
                          for s in range(0, t_out, step)], dim=2)


class CausalConv3d(nn.Module):
    """3D conv over the past only: zero padding in space (inside `conv`), and in front in time either copies
    of the first frame (first chunk) or the previous chunk's last frames (from the cache).
    x [B, C_in, T, H, W] -> [B, C_out, T, H, W]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.time_pad = kernel_size - 1
        self.conv = SafeConv3d(in_channels, out_channels, kernel_size,
                               padding=(0, kernel_size // 2, kernel_size // 2))

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        if self.time_pad:
            past = cache.get(self) if cache is not None else None
            if past is None:
                past = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat([past, x], dim=2)
            if cache is not None:
                cache.put(self, x[:, :, -self.time_pad:])
        return self.conv(x)


class GroupNorm(nn.GroupNorm):
    """GroupNorm with fp32 statistics and affine under fp16/bf16: a chunk's group spans ~10^7 values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                                self.eps).to(x.dtype)
        return super().forward(x)


def _resize_like(z: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Nearest resize of latents z [B, Z, L, h, w] to (T, H, W); for odd T > 1 the first latent frame maps to
    the first frame alone and the rest to the rest (the causal first frame is never mixed with later ones)."""
    t = size[0]
    if t > 1 and t % 2 == 1:
        first = F.interpolate(z[:, :, :1], size=(1, *size[1:]))
        rest = F.interpolate(z[:, :, 1:], size=(t - 1, *size[1:]))
        return torch.cat([first, rest], dim=2)
    return F.interpolate(z, size=size)


class SpatialNorm3D(nn.Module):
    """Decoder norm conditioned on the latents: GroupNorm(f) * conv_y(z) + conv_b(z), z resized to f.
    f [B, C, T, H, W], z [B, Z, L, h, w] -> [B, C, T, H, W]."""

    def __init__(self, channels: int, z_channels: int, groups: int) -> None:
        super().__init__()
        self.norm_layer = GroupNorm(groups, channels, eps=NORM_EPS)
        self.conv_y = CausalConv3d(z_channels, channels, kernel_size=1)
        self.conv_b = CausalConv3d(z_channels, channels, kernel_size=1)

    def forward(self, f: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        z = _resize_like(z, tuple(f.shape[-3:]))
        return self.norm_layer(f) * self.conv_y(z) + self.conv_b(z)


class ResnetBlock3D(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a (1x1x1 conv when widths change) shortcut.
    Norms are GroupNorm in the encoder, SpatialNorm3D (z_channels set) in the decoder; no timestep input."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float,
                 z_channels: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if z_channels is None:
            self.norm1: nn.Module = GroupNorm(groups, in_channels, eps=eps)
            self.norm2: nn.Module = GroupNorm(groups, out_channels, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(in_channels, z_channels, groups)
            self.norm2 = SpatialNorm3D(out_channels, z_channels, groups)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = SafeConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def _norm(self, norm: nn.Module, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return norm(x) if z is None else norm(x, z)

    def forward(self, x: torch.Tensor, cache: ConvCache, z: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self._norm(self.norm1, x, z)), cache)
        h = self.conv2(self.dropout(F.silu(self._norm(self.norm2, h, z))), cache)
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


def _per_frame(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A Conv2d on every frame: [B, C, T, H, W] -> [B, C', T, H', W']."""
    b, _, t = x.shape[:3]
    y = conv(x.transpose(1, 2).reshape(b * t, *x.shape[1:2], *x.shape[3:]))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class Downsample3D(nn.Module):
    """Optionally halve time (average pairs; an odd count keeps frame 0 alone), then a stride-2 3x3 Conv2d per
    frame after zero padding right and bottom by one. [B, C, T, H, W] -> [B, C, T', H/2, W/2]."""

    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compress_time:
            first, rest = (x[:, :, :1], x[:, :, 1:]) if x.shape[2] % 2 else (None, x)
            x = rest.unflatten(2, (-1, 2)).mean(dim=3)  # pairs (2t, 2t+1) averaged; T -> T/2
            if first is not None:
                x = torch.cat([first, x], dim=2)  # T -> 1 + (T-1)/2
        return _per_frame(self.conv, F.pad(x, (0, 1, 0, 1)))


class Upsample3D(nn.Module):
    """Nearest x2 in space, and with `compress_time` in time too (odd T > 1: frame 0 spatially only, so
    T -> 1 + 2(T-1); even T: T -> 2T; T = 1 stays), then a 3x3 Conv2d per frame.
    [B, C, T, H, W] -> [B, C, T', 2H, 2W]."""

    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)
        self.compress_time = compress_time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, h, w = x.shape[2:]
        if self.compress_time and t > 1 and t % 2:
            first = F.interpolate(x[:, :, :1], size=(1, 2 * h, 2 * w))
            x = torch.cat([first, F.interpolate(x[:, :, 1:], scale_factor=2.0)], dim=2)
        elif self.compress_time and t > 1:
            x = F.interpolate(x, scale_factor=2.0)
        else:
            x = F.interpolate(x, size=(t, 2 * h, 2 * w))
        return _per_frame(self.conv, x)


class DownBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, eps: float,
                 add_downsample: bool, compress_time: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels,
                                                    groups, eps) for i in range(num_layers)])
        self.downsamplers = (nn.ModuleList([Downsample3D(out_channels, compress_time)])
                             if add_downsample else None)

    def forward(self, x: torch.Tensor, cache: ConvCache) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        for down in self.downsamplers or ():
            x = down(x)
        return x


class MidBlock3D(nn.Module):
    def __init__(self, channels: int, groups: int, eps: float, z_channels: int | None = None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(channels, channels, groups, eps, z_channels)
                                      for _ in range(2)])

    def forward(self, x: torch.Tensor, cache: ConvCache, z: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache, z)
        return x


class UpBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, eps: float,
                 z_channels: int, add_upsample: bool, compress_time: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels,
                                                    groups, eps, z_channels) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample3D(out_channels, compress_time)]) if add_upsample else None

    def forward(self, x: torch.Tensor, cache: ConvCache, z: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache, z)
        for up in self.upsamplers or ():
            x = up(x)
        return x


class Encoder3D(nn.Module):
    """One chunk of video [B, 3, T, H, W] -> [B, 2Z, T', H/s, W/s] (mean | logvar), conv memory in `cache`."""

    def __init__(self, cfg: CogVideoXVAEConfig) -> None:
        super().__init__()
        ch, n, g = cfg.block_out_channels, len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0])
        self.down_blocks = nn.ModuleList([
            DownBlock3D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, cfg.norm_eps,
                        add_downsample=i < n - 1, compress_time=i < cfg.temporal_compress_level)
            for i in range(n)])
        self.mid_block = MidBlock3D(ch[-1], g, cfg.norm_eps)
        self.norm_out = GroupNorm(g, ch[-1], eps=NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor, cache: ConvCache) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(self.conv_act(self.norm_out(x)), cache)


class Decoder3D(nn.Module):
    """One chunk of latents z [B, Z, L, h, w] -> video [B, 3, T, s*h, s*w], conv memory in `cache`; every norm
    is conditioned on this chunk's z."""

    def __init__(self, cfg: CogVideoXVAEConfig) -> None:
        super().__init__()
        ch, n, g = tuple(reversed(cfg.block_out_channels)), len(cfg.block_out_channels), cfg.norm_num_groups
        zc = cfg.latent_channels
        self.conv_in = CausalConv3d(zc, ch[0])
        self.mid_block = MidBlock3D(ch[0], g, cfg.norm_eps, z_channels=zc)
        self.up_blocks = nn.ModuleList([
            UpBlock3D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, cfg.norm_eps, zc,
                      add_upsample=i < n - 1, compress_time=i < cfg.temporal_compress_level)
            for i in range(n)])
        self.norm_out = SpatialNorm3D(ch[-1], zc, g)
        self.conv_act = nn.SiLU()
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels)

    def forward(self, z: torch.Tensor, cache: ConvCache) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z, cache), cache, z)
        for block in self.up_blocks:
            x = block(x, cache, z)
        return self.conv_out(self.conv_act(self.norm_out(x, z)), cache)


def _blend_(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """Linear cross-fade, in place, from the end of tile `a` into the start of tile `b` along `dim`."""
    e = min(a.shape[dim], b.shape[dim], extent)
    if e <= 0:
        return
    shape = [1] * b.ndim
    shape[dim] = e
    w = (torch.arange(e, dtype=torch.float64) / e).view(shape)  # y / e, as upstream's python floats
    w_b, w_a = w.to(b.dtype).to(b.device), (1 - w).to(b.dtype).to(b.device)
    head = b.narrow(dim, 0, e)
    head.copy_(a.narrow(dim, a.shape[dim] - e, e) * w_a + head * w_b)


# -- the model -------------------------------------------------------------------------------------

class AutoencoderKLCogVideoX(nn.Module):
    """`encode` video -> posterior (mean, logvar); `decode` unscaled latents -> video (not clamped).

    Memory switches, same semantics and defaults as diffusers: `enable_slicing()` runs a batch one sample at
    a time (identical result); `enable_tiling()` runs overlapping spatial tiles (half the sample size, overlap
    1/6 of the height and 1/5 of the width) blended linearly (slightly different result) for inputs larger
    than one tile. Stateless between calls otherwise.
    """

    def __init__(self, config: CogVideoXVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or VAE_PRESETS["5b"]
        self.encoder = Encoder3D(self.config)
        self.decoder = Decoder3D(self.config)
        self.use_slicing = False
        self.use_tiling = False
        self.num_sample_frames_batch_size = SAMPLE_FRAMES_BATCH
        self.num_latent_frames_batch_size = LATENT_FRAMES_BATCH
        self.tile_sample_min_height = self.config.sample_height // 2
        self.tile_sample_min_width = self.config.sample_width // 2
        self.tile_overlap_factor_height = 1 / 6
        self.tile_overlap_factor_width = 1 / 5

    # -- memory switches -------------------------------------------------------------------------------

    @property
    def tile_latent_min_height(self) -> int:
        return int(self.tile_sample_min_height / self.config.spatial_factor)

    @property
    def tile_latent_min_width(self) -> int:
        return int(self.tile_sample_min_width / self.config.spatial_factor)

    def enable_tiling(self, tile_sample_min_height: int | None = None, tile_sample_min_width: int | None = None,
                      tile_overlap_factor_height: float | None = None,
                      tile_overlap_factor_width: float | None = None) -> None:
        """Tiled encode/decode; a None (or 0, as upstream) argument keeps the current value."""
        s = self.config.spatial_factor
        th = tile_sample_min_height or self.tile_sample_min_height
        tw = tile_sample_min_width or self.tile_sample_min_width
        fh = tile_overlap_factor_height or self.tile_overlap_factor_height
        fw = tile_overlap_factor_width or self.tile_overlap_factor_width
        for name, v in (("tile_sample_min_height", th), ("tile_sample_min_width", tw)):
            if v < s or v % s:
                raise ValueError(f"{name}={v}; expected a positive multiple of the VAE's spatial factor {s} "
                                 f"(e.g. {max(s, v // s * s)}), so pixel and latent tiles line up")
        for name, f, t in (("tile_overlap_factor_height", fh, th), ("tile_overlap_factor_width", fw, tw)):
            if not 0 <= f < 1 or int(t // s * (1 - f)) < 1:
                raise ValueError(f"{name}={f} with a {t}-pixel tile leaves no latent stride; expected "
                                 f"0 <= factor < 1 - {s}/{t} (default: 1/6 height, 1/5 width)")
            # upstream stitches with the stride of one space and the kept size of the other: unless they agree
            # the output silently has the wrong size (e.g. 56 px at 0.25 makes a 64-px-wide video 66 wide)
            lt = t // s
            if int(t * (1 - f)) != s * (lt - int(lt * f)) or s * int(lt * (1 - f)) != t - int(t * f):
                raise ValueError(f"{name}={f} with a {t}-pixel ({lt}-latent) tile: the tile stride and the "
                                 f"blended-off border do not line up between pixels and latents, so tiled output "
                                 f"would have the wrong size; pick e.g. 240 px at 1/6, 360 px at 1/5, 32 px at "
                                 f"0.25 or 0.5")
        self.use_tiling = True
        self.tile_sample_min_height, self.tile_sample_min_width = th, tw
        self.tile_overlap_factor_height, self.tile_overlap_factor_width = fh, fw

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # -- encode ------------------------------------------------------------------------------------------

    def _check_video(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"encode expects video [B, {cfg.in_channels}, F, H, W], got shape {tuple(x.shape)}; "
                             f"add the batch dim / put channels before frames (the transformer's layout is "
                             f"[B, F, C, H, W])")
        check_frames(x.shape[2], cfg.temporal_compression_ratio)
        s = cfg.spatial_factor
        for name, n in (("H", x.shape[3]), ("W", x.shape[4])):
            if n % s or n == 0:
                raise ValueError(f"encode got {name}={n}; it must be a multiple of {s}. Nearest valid: "
                                 f"{max(s, s * round(n / s))}; resize or crop the video")

    def _encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        cache = ConvCache()
        chunks = frame_chunks(x.shape[2], self.num_sample_frames_batch_size)
        return torch.cat([self.encoder(x[:, :, c], cache) for c in chunks], dim=2)

    def _encode_one(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and (x.shape[3] > self.tile_sample_min_height or x.shape[4] > self.tile_sample_min_width):
            fh, fw = self.tile_overlap_factor_height, self.tile_overlap_factor_width
            lh, lw = self.tile_latent_min_height, self.tile_latent_min_width
            bh, bw = int(lh * fh), int(lw * fw)
            return _tiled(x, self._encode_frames, (self.tile_sample_min_height, self.tile_sample_min_width),
                          (int(self.tile_sample_min_height * (1 - fh)), int(self.tile_sample_min_width * (1 - fw))),
                          (bh, bw), (lh - bh, lw - bw))
        return self._encode_frames(x)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, 3, F, H, W] in [-1, 1], F = 4k+1 -> (mean, logvar), each [B, Z, k+1, H/s, W/s]; logvar
        clamped to LOGVAR_RANGE. Draw with `sample_latent`, or use the mean (diffusers `mode()`)."""
        self._check_video(x)
        x = x.to(self.encoder.conv_in.conv.weight.dtype)
        if self.use_slicing and x.shape[0] > 1:
            h = torch.cat([self._encode_one(xi) for xi in x.split(1)])
        else:
            h = self._encode_one(x)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    # -- decode ------------------------------------------------------------------------------------------

    def _decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        cache = ConvCache()
        chunks = frame_chunks(z.shape[2], self.num_latent_frames_batch_size)
        return torch.cat([self.decoder(z[:, :, c], cache) for c in chunks], dim=2)

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        lh, lw = self.tile_latent_min_height, self.tile_latent_min_width
        if self.use_tiling and (z.shape[3] > lh or z.shape[4] > lw):
            fh, fw = self.tile_overlap_factor_height, self.tile_overlap_factor_width
            th, tw = self.tile_sample_min_height, self.tile_sample_min_width
            bh, bw = int(th * fh), int(tw * fw)
            return _tiled(z, self._decode_frames, (lh, lw), (int(lh * (1 - fh)), int(lw * (1 - fw))),
                          (bh, bw), (th - bh, tw - bw))
        return self._decode_frames(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents z [B, Z, L, h, w] -> video [B, 3, decoded_frames(L), s*h, s*w], not clamped (the
        caller maps it to [0, 1] with clamp(x / 2 + 0.5))."""
        cfg = self.config
        if z.dim() != 5 or z.shape[1] != cfg.latent_channels or z.shape[2] < 1:
            raise ValueError(f"decode expects latents [B, {cfg.latent_channels}, L>=1, h, w], got shape "
                             f"{tuple(z.shape)}; check the layout (the transformer's is [B, L, C, h, w])")
        z = z.to(self.decoder.conv_in.conv.weight.dtype)
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode_one(zi) for zi in z.split(1)])
        return self._decode_one(z)


def _tiled(x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor], tile: tuple[int, int],
           stride: tuple[int, int], blend: tuple[int, int], keep: tuple[int, int]) -> torch.Tensor:
    """Run `run` on overlapping (H, W) tiles of x [B, C, T, H, W] taken every `stride`, cross-fade each output
    tile into its upper and left neighbours over `blend` rows/columns (in place, row-major, so a tile's corner
    carries both fades, as upstream), crop each to `keep` and stitch."""
    (th, tw), (sh, sw) = tile, stride
    rows = [[run(x[:, :, :, i:i + th, j:j + tw]) for j in range(0, x.shape[4], sw)]
            for i in range(0, x.shape[3], sh)]
    for i, row in enumerate(rows):
        for j, out in enumerate(row):
            if i:
                _blend_(rows[i - 1][j], out, blend[0], dim=3)
            if j:
                _blend_(row[j - 1], out, blend[1], dim=4)
    kh, kw = keep
    return torch.cat([torch.cat([out[:, :, :, :kh, :kw] for out in row], dim=4) for row in rows], dim=3)
