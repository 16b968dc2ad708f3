"""Framer's point-trajectory ControlNet (`models_diffusers/controlnet_svd.py`, `ControlNetSVDModel`).

A copy of the SVD UNet's encoder (conv_in, time and added-time embeddings, down blocks, mid block: the same classes
from `backbones.svd.unet`, hence the same key names), a per-frame 2D CNN that embeds the trajectory heatmaps
(`backbones.svd.tracks.render_heatmaps`) and is added to conv_in's output, and 13 zero-initialised 1x1 convs that
turn the 12 skips and the mid block's output into residuals for the UNet's `down_block_additional_residuals` /
`mid_block_additional_residual`. Framer's released checkpoint (K:controlnet_config.json): 671 tensors,
682,024,417 parameters (spec svd-framer.md §7.3, META key file `framer_controlnet_keys.txt`).

Shapes: B videos, F frames, N = B * F (frame-major), h/w latent height/width, H/W pixel height/width
(H = s * h with s the embedding's stride, 8 for Framer), Lc context tokens (2 for Framer), Cc context width.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.sd.unet_blocks import TimestepEmbedding, Timesteps
from backbones.sd.unet import block_units
from backbones.svd.unet import (AlphaBlender, CrossAttnDownBlockSpatioTemporal, DownBlockSpatioTemporal,
                                UNetMidBlockSpatioTemporal, UNetSpatioTemporalConditionModel,
                                UNetSpatioTemporalConfig)

__all__ = ["ControlNetSVDConfig", "CONTROLNET_PRESETS", "ControlNetConditioningEmbeddingSVD", "ControlNetSVDModel"]


@dataclass(frozen=True)
class ControlNetSVDConfig(UNetSpatioTemporalConfig):
    """The UNet's config fields (the up-path ones unused) plus the heatmap encoder's.

    conditioning_embedding_out_channels: widths of the heatmap CNN; one stride-2 conv between consecutive entries,
    so the stride is 2 ** (len - 1) and must equal the VAE's compression (8 for SVD: four entries; 2 for the tiny
    VAE: two). mask_token stays False (the ControlNet has none); framer_temporal_context as the UNet it drives.
    """
    in_channels: int = 9
    num_frames: int = 25
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = field(default=(16, 32, 96, 256))

    def __post_init__(self) -> None:
        object.__setattr__(self, "conditioning_embedding_out_channels",
                           tuple(self.conditioning_embedding_out_channels))
        super().__post_init__()
        if self.mask_token:
            raise ValueError("ControlNetSVDConfig.mask_token=True; the ControlNet has no mask_token (it reads the "
                             "UNet's full 9-channel input, conditioning block included): set mask_token=False")
        emb = self.conditioning_embedding_out_channels
        if not emb or any(not isinstance(c, int) or c < 1 for c in emb):
            raise ValueError(f"conditioning_embedding_out_channels={emb}; expected positive ints, e.g. "
                             "(16, 32, 96, 256) (stride 8)")
        if self.conditioning_channels < 1:
            raise ValueError(f"conditioning_channels={self.conditioning_channels}; expected >= 1 (3 for heatmaps)")

    @property
    def conditioning_stride(self) -> int:
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> ControlNetSVDConfig:
        """From Framer's controlnet/config.json; its unused ID-feature keys must be off (with_id_feature false)."""
        config = dict(config)
        if config.pop("with_id_feature", False):
            raise ValueError("ControlNet config has with_id_feature=true; Framer's ID-feature path is asserted off "
                             "in its pipeline and not implemented here")
        for unused in ("feature_channels", "feature_out_channels"):
            config.pop(unused, None)
        ours = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in {**config, **overrides}.items():
            if key.startswith("_"):
                continue
            if key not in ours:
                raise ValueError(f"ControlNet config key {key!r} is unknown to ControlNetSVDConfig; expected one of "
                                 f"{sorted(ours)}")
            kwargs[key] = value
        return cls(**kwargs)


CONTROLNET_PRESETS: dict[str, ControlNetSVDConfig] = {
    # wwen1997/framer_512x320 controlnet (K:controlnet_config.json, spec §7.3): SVD-xt's encoder, 9 inputs
    "framer": ControlNetSVDConfig(framer_temporal_context=True),
    # the encoder of UNET_PRESETS["tiny-framer"]; stride 2 = the tiny VAE's compression (VAE_PRESETS["tiny"])
    "tiny": ControlNetSVDConfig(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                cross_attention_dim=48,
                                down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                                up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
                                num_attention_heads=(2, 4), num_frames=3, framer_temporal_context=True,
                                conditioning_embedding_out_channels=(8, 16)),
}


class ControlNetConditioningEmbeddingSVD(nn.Module):
    """Per-frame heatmap encoder: conv_in + SiLU; per width step a 3x3 conv keeping the width and a stride-2 3x3
    conv to the next, each + SiLU; conv_out (zero-initialised, no activation). [N, Cin, H, W] -> [N, Co, h, w]."""

    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int = 3,
                 block_out_channels: tuple[int, ...] = (16, 32, 96, 256)) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(block_out_channels[-1], conditioning_embedding_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(conditioning))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNetSVDModel(nn.Module):
    """Framer's ControlNet. Build on the meta device and load Framer's controlnet state dict with `strict=True`,
    or build from a UNet with `from_unet`."""

    def __init__(self, config: ControlNetSVDConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch, heads, temb = cfg.block_out_channels, cfg.num_attention_heads, cfg.time_embed_dim
        attn = dict(transformer_layers_per_block=cfg.transformer_layers_per_block,
                    cross_attention_dim=cfg.cross_attention_dim, framer_temporal_context=cfg.framer_temporal_context)
        # registration order = Framer's state-dict key order (framer_controlnet_keys.txt): conv_in, embeddings,
        # down_blocks, controlnet_down_blocks, controlnet_cond_embedding, controlnet_mid_block, mid_block
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], True, 0)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.add_time_proj = Timesteps(cfg.addition_time_embed_dim, True, 0)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):  # exactly the UNet's construction
            args = dict(in_channels=ch[max(i - 1, 0)], out_channels=ch[i], temb_channels=temb,
                        num_layers=cfg.layers_per_block, add_downsample=i < len(ch) - 1)
            self.down_blocks.append(
                CrossAttnDownBlockSpatioTemporal(num_attention_heads=heads[i], **args, **attn)
                if kind == "CrossAttnDownBlockSpatioTemporal" else DownBlockSpatioTemporal(**args))
        skip_channels = [ch[0]]
        for i, c in enumerate(ch):
            skip_channels += [c] * (cfg.layers_per_block + (i < len(ch) - 1))
        self.controlnet_down_blocks = nn.ModuleList([_zero_conv(c) for c in skip_channels])
        self.controlnet_cond_embedding = ControlNetConditioningEmbeddingSVD(
            ch[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels)
        self.controlnet_mid_block = _zero_conv(ch[-1])
        self.mid_block = UNetMidBlockSpatioTemporal(ch[-1], temb, num_attention_heads=heads[-1], **attn)

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_unet(cls, unet: UNetSpatioTemporalConditionModel,
                  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                  conditioning_channels: int = 3, copy_add_embedding: bool = True) -> ControlNetSVDModel:
        """A ControlNet whose encoder is a copy of `unet`'s (conv_in, time_embedding, down_blocks, mid_block and,
        with copy_add_embedding, add_embedding), the heatmap encoder at PyTorch's default init but its conv_out and
        the 13 zero convs zero, so the residuals start at exactly 0.

        Framer's own `from_unet` skips add_embedding (spec §7.8 item 12); pass copy_add_embedding=False to
        reproduce that (add_embedding then keeps PyTorch's default init). diffusers' ControlNetModel copies it.
        """
        ucfg = unet.config
        values = {f.name: getattr(ucfg, f.name) for f in fields(UNetSpatioTemporalConfig)}
        values["mask_token"] = False
        cfg = ControlNetSVDConfig(**values, conditioning_channels=conditioning_channels,
                                  conditioning_embedding_out_channels=conditioning_embedding_out_channels)
        model = cls(cfg)
        param = next(unet.parameters())
        model.to(device=param.device, dtype=param.dtype)
        copied = ["conv_in", "time_embedding", "down_blocks", "mid_block"] + (["add_embedding"] if copy_add_embedding
                                                                             else [])
        for name in copied:
            getattr(model, name).load_state_dict(getattr(unet, name).state_dict(), strict=True)
        return model

    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's default init everywhere, mix factors at 0.5, then the heatmap encoder's conv_out and the zero
        convs zero; makes a meta-built, `to_empty` model fully defined."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if isinstance(m, AlphaBlender):
                m.mix_factor.fill_(m.init_alpha)
        for conv in [self.controlnet_cond_embedding.conv_out, *self.controlnet_down_blocks, self.controlnet_mid_block]:
            conv.weight.zero_()
            conv.bias.zero_()

    def units(self) -> list[nn.Module]:
        """The down path's and mid block's SpatioTemporalResBlock / TransformerSpatioTemporalModel modules in forward
        order (activation checkpointing and FSDP2 units, as the UNet's)."""
        return block_units([*self.down_blocks, self.mid_block], self.mid_block)

    # -- forward -------------------------------------------------------------------------------------
    def _check_cond(self, sample: torch.Tensor, controlnet_cond: torch.Tensor) -> None:
        b, f, _, h, w = sample.shape
        s, c = self.config.conditioning_stride, self.config.conditioning_channels
        if controlnet_cond.shape != (b, f, c, h * s, w * s):
            raise ValueError(f"controlnet_cond has shape {tuple(controlnet_cond.shape)}; expected "
                             f"[{b}, {f}, {c}, {h * s}, {w * s}]: one {c}-channel heatmap per frame at the pixel size "
                             f"(latent {h}x{w} times the embedding stride {s}), e.g. from tracks.render_heatmaps")

    def encode(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
               added_time_ids: torch.Tensor, controlnet_cond: torch.Tensor
               ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The encoder's skips and mid output before the zero convs (the UNet's down path on
        conv_in(sample) + embedding(controlnet_cond)). Inputs as `forward`."""
        UNetSpatioTemporalConditionModel._check_inputs(self, sample, encoder_hidden_states, added_time_ids)
        self._check_cond(sample, controlnet_cond)
        b, f = sample.shape[:2]
        t = UNetSpatioTemporalConditionModel._timesteps(timestep, b, sample.device)
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))  # [B, E]
        ids = self.add_time_proj(added_time_ids.flatten()).reshape(b, -1)  # [B, 3 * addition_time_embed_dim]
        emb = emb + self.add_embedding(ids.to(emb.dtype))
        emb = emb.repeat_interleave(f, dim=0)  # [N, E]
        context = encoder_hidden_states.repeat_interleave(f, dim=0)  # [N, Lc, Cc]

        x = self.conv_in(sample.flatten(0, 1))  # [N, C, h, w]
        x = x + self.controlnet_cond_embedding(controlnet_cond.flatten(0, 1).to(x.dtype))  # [N, C, h, w]
        indicator = torch.zeros(b, f, dtype=x.dtype, device=x.device)  # video mode, as the UNet
        skips: tuple[torch.Tensor, ...] = (x,)
        for block in self.down_blocks:
            x, pushed = block(x, emb, context, indicator)
            skips += pushed
        return skips, self.mid_block(x, emb, context, indicator)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                added_time_ids: torch.Tensor, controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0
                ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Residuals for the UNet: (one [N, C, h', w'] per skip, 12 for SVD, shapes `unet.skip_shapes(N, h, w)`;
        the mid residual [N, C_last, h'', w'']), every one times conditioning_scale (Framer: no guess mode).

        sample [B, F, in_channels, h, w], timestep, encoder_hidden_states [B, Lc, Cc] and added_time_ids [B, 3]
        exactly as the UNet gets them; controlnet_cond [B, F, 3, H, W] heatmaps in 0..255 (not normalised).
        """
        skips, mid = self.encode(sample, timestep, encoder_hidden_states, added_time_ids, controlnet_cond)
        down = tuple(conv(s) * conditioning_scale for conv, s in zip(self.controlnet_down_blocks, skips))
        return down, self.controlnet_mid_block(mid) * conditioning_scale
