"""The SD UNet with AnimateDiff motion modules (diffusers `UNetMotionModel`), single-device code.

The 2D blocks of `backbones.sd.unet_blocks` gain a `motion_modules` list: one motion module after each
resnet (+ attention) of every down/up block, and one after the mid block's attention (spec
animatediff-sd15.md §5.2), so the skips carry motion-module outputs. Module paths equal diffusers', so
the state dict of `UNetMotionModel.from_unet2d(unet, adapter)` loads with `strict=True` (SD1.5 + v1-5-2:
1232 parameters, 1,312,730,244 numbers, + 21 `pos_embed.pe` buffers), and a diffusers SD1.5 `unet/`
folder plus a motion-adapter file load into it together (their key sets are disjoint and cover it).

Shapes: B videos, F frames, Z latent channels, H/W latent height/width, C channels at a level, Lc context
tokens, Cc context width, E time-embedding width. Inside, frames are folded into the batch, [B*F, ...],
frames of one video contiguous (index b*F + f), as diffusers.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .motion import AnimateDiffTransformer3D, MotionAdapterConfig, MotionModules, level_modules, zero_init_proj_out_
from .unet import UNet2DConditionModel, UNetConfig
from .unet_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, ResnetBlock2D, Transformer2DModel,
                          UNetMidBlock2DCrossAttn, UpBlock2D)

__all__ = ["DownBlockMotion", "CrossAttnDownBlockMotion", "UNetMidBlockCrossAttnMotion", "UpBlockMotion",
           "CrossAttnUpBlockMotion", "UNetMotionModel"]


def _add_motion_modules(block: nn.Module, modules: MotionModules) -> None:
    """Register `motion_modules` right after `resnets` (before the resamplers): diffusers' registration order,
    hence its state-dict key order."""
    block.motion_modules = modules.motion_modules
    order = [k for k in block._modules if k != "motion_modules"]
    at = order.index("resnets") + 1
    order.insert(at, "motion_modules")
    block._modules = {k: block._modules[k] for k in order}
    assert len(block.motion_modules) == len(block.resnets), "one motion module per resnet"


class DownBlockMotion(DownBlock2D):
    """DownBlock2D with a motion module after each resnet. [B*F, Ci, H, W] -> ([B*F, Co, H', W'], skips)."""

    def __init__(self, motion: MotionModules, **kwargs: object) -> None:
        super().__init__(**kwargs)
        _add_motion_modules(self, motion)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                num_frames: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips: tuple[torch.Tensor, ...] = ()
        for resnet, mm in zip(self.resnets, self.motion_modules):
            hidden_states = mm(resnet(hidden_states, temb), num_frames)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class CrossAttnDownBlockMotion(CrossAttnDownBlock2D):
    """resnet -> attention -> motion module, per layer, then the downsampler."""

    def __init__(self, motion: MotionModules, **kwargs: object) -> None:
        super().__init__(**kwargs)
        _add_motion_modules(self, motion)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                num_frames: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips: tuple[torch.Tensor, ...] = ()
        for resnet, attn, mm in zip(self.resnets, self.attentions, self.motion_modules):
            hidden_states = mm(attn(resnet(hidden_states, temb), encoder_hidden_states), num_frames)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class UNetMidBlockCrossAttnMotion(UNetMidBlock2DCrossAttn):
    """resnet, then (attention -> motion module -> resnet) per layer. [B*F, C, H, W] -> same."""

    def __init__(self, motion: MotionModules, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.motion_modules = motion.motion_modules
        assert len(self.motion_modules) == len(self.attentions)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                num_frames: int) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, mm, resnet in zip(self.attentions, self.motion_modules, self.resnets[1:]):
            hidden_states = resnet(mm(attn(hidden_states, encoder_hidden_states), num_frames), temb)
        return hidden_states


class UpBlockMotion(UpBlock2D):
    """cat skip -> resnet -> motion module, per layer, then the upsampler."""

    def __init__(self, motion: MotionModules, **kwargs: object) -> None:
        super().__init__(**kwargs)
        _add_motion_modules(self, motion)

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None, num_frames: int,
                upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        for resnet, mm in zip(self.resnets, self.motion_modules):
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = mm(resnet(hidden_states, temb), num_frames)
        return self._upsample(hidden_states, upsample_size)


class CrossAttnUpBlockMotion(CrossAttnUpBlock2D):
    """cat skip -> resnet -> attention -> motion module, per layer, then the upsampler."""

    def __init__(self, motion: MotionModules, **kwargs: object) -> None:
        super().__init__(**kwargs)
        _add_motion_modules(self, motion)

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
                temb: torch.Tensor, encoder_hidden_states: torch.Tensor | None, num_frames: int,
                upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        for resnet, attn, mm in zip(self.resnets, self.attentions, self.motion_modules):
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = mm(attn(resnet(hidden_states, temb), encoder_hidden_states), num_frames)
        return self._upsample(hidden_states, upsample_size)


_MOTION_BLOCK = {DownBlock2D: DownBlockMotion, CrossAttnDownBlock2D: CrossAttnDownBlockMotion,
                 UpBlock2D: UpBlockMotion, CrossAttnUpBlock2D: CrossAttnUpBlockMotion}


def _block_kwargs(block: nn.Module) -> dict[str, object]:
    """The constructor arguments the 2D UNet gave `block`, read back from its layers (so the 2D UNet's
    construction code stays the one source of the layout)."""
    r0 = block.resnets[0]
    kw: dict[str, object] = dict(temb_channels=r0.time_emb_proj.in_features, num_layers=len(block.resnets),
                                 resnet_eps=r0.norm1.eps, resnet_groups=r0.norm1.num_groups)
    out = r0.conv1.out_channels
    if hasattr(block, "attentions"):
        t = block.attentions[0]
        kw.update(num_attention_heads=t.transformer_blocks[0].attn1.heads,
                  cross_attention_dim=t.transformer_blocks[0].attn2.to_k.in_features,
                  use_linear_projection=t.use_linear_projection)
    if isinstance(block, UNetMidBlock2DCrossAttn):  # num_layers counts its attentions (one resnet more)
        kw.update(in_channels=out, num_layers=len(block.attentions))
    elif isinstance(block, DownBlock2D):
        downs = block.downsamplers
        kw.update(in_channels=r0.conv1.in_channels, out_channels=out, add_downsample=downs is not None)
        if downs is not None:
            kw.update(downsample_padding=downs[0].padding)
    else:  # up: resnet 0 takes [prev_output | skip], the last one's skip comes from the level below
        last = block.resnets[-1]
        skip_in = last.conv1.in_channels - out
        kw.update(in_channels=skip_in, out_channels=out, add_upsample=block.upsamplers is not None,
                  prev_output_channel=r0.conv1.in_channels - (skip_in if len(block.resnets) == 1 else out))
    return kw


class UNetMotionModel(UNet2DConditionModel):
    """ε-prediction video UNet: the SD UNet (`unet_config`) with the motion modules of `motion_config`.

    Build on the meta device, then load a UNetMotionModel state dict with `strict=True`, or the 2D UNet's
    and the adapter's state dicts (`load_state_dict(..., strict=False)` each; their keys are disjoint).
    """

    def __init__(self, unet_config: UNetConfig, motion_config: MotionAdapterConfig) -> None:
        if tuple(unet_config.block_out_channels) != motion_config.block_out_channels:
            raise ValueError(f"motion adapter block_out_channels {motion_config.block_out_channels} differ from "
                             f"the UNet's {unet_config.block_out_channels}; use an adapter made for this UNet")
        if motion_config.motion_layers_per_block != unet_config.layers_per_block:
            raise ValueError(f"motion adapter motion_layers_per_block={motion_config.motion_layers_per_block} "
                             f"!= UNet layers_per_block={unet_config.layers_per_block}; one motion module per "
                             f"resnet needs them equal")
        if motion_config.motion_norm_num_groups != unet_config.norm_num_groups:
            # diffusers silently takes the UNet's norm_num_groups for the motion GroupNorms; refuse instead
            raise ValueError(f"motion_norm_num_groups={motion_config.motion_norm_num_groups} != UNet "
                             f"norm_num_groups={unet_config.norm_num_groups}; diffusers would use the UNet's, "
                             f"set the adapter's to {unet_config.norm_num_groups}")
        super().__init__(unet_config)
        self.motion_config = motion_config
        down, mid, up = level_modules(motion_config)
        for blocks, motions in ((self.down_blocks, down), (self.up_blocks, up)):
            for i, motion in enumerate(motions):
                old = blocks[i]
                blocks[i] = _MOTION_BLOCK[type(old)](motion, **_block_kwargs(old))
        if mid is not None:
            self.mid_block = UNetMidBlockCrossAttnMotion(mid, **_block_kwargs(self.mid_block))
        # else (v1, v3 adapters): the 2D mid block stays, as diffusers builds it for use_motion_mid_block=False
        # re-registering mid_block keeps its slot (after up_blocks), so the key order stays diffusers'

    def units(self) -> list[nn.Module]:
        """ResnetBlock2D, Transformer2DModel and motion modules in forward order (59 for SD1.5 + v2: 38 + 21;
        58 without a motion mid block)."""
        out: list[nn.Module] = []
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            resnets, mms = list(block.resnets), list(getattr(block, "motion_modules", []))
            attentions = list(getattr(block, "attentions", []))
            if block is self.mid_block:
                out.append(resnets.pop(0))
                if mms:
                    out += [m for trio in zip(attentions, mms, resnets) for m in trio]
                else:
                    out += [m for pair in zip(attentions, resnets) for m in pair]
            else:
                for j, resnet in enumerate(resnets):
                    out += [resnet, *attentions[j:j + 1], mms[j]]
        assert all(isinstance(m, (ResnetBlock2D, Transformer2DModel, AnimateDiffTransformer3D)) for m in out)
        return out

    def motion_state_dict(self) -> dict[str, torch.Tensor]:
        """The motion modules' entries under their names here, which are also the MotionAdapter's
        (diffusers `save_motion_modules`)."""
        return {k: v for k, v in self.state_dict().items() if ".motion_modules." in k}

    @torch.no_grad()
    def init_weights(self, zero_init_proj_out: bool = True) -> None:
        """Default init (position tables refilled); proj_out zeroed so the model starts as the image UNet
        applied per frame."""
        super().init_weights()
        if zero_init_proj_out:
            zero_init_proj_out_(self)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor, *, num_frames: int | None = None,
                down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None) -> torch.Tensor:
        """Noise prediction for videos.

        sample [B, Z, F, H, W] (diffusers' layout; num_frames None) or [B*F, Z, H, W] with num_frames=F;
        the output has the input's layout. timestep: a number, 0-d, [1] or [B], one per video.
        encoder_hidden_states [B, Lc, Cc] (repeated per frame here, as diffusers 0.25-0.30) or
        [B*F, Lc, Cc] (as diffusers >= 0.31 expects). ControlNet residuals are [B*F, ...] per skip.
        """
        cfg = self.config
        if sample.ndim == 5 and num_frames is None and sample.shape[1] == cfg.in_channels:
            b, _, f, h, w = sample.shape
            x = sample.permute(0, 2, 1, 3, 4).reshape(b * f, cfg.in_channels, h, w)  # [B*F, Z, H, W]
        elif sample.ndim == 4 and num_frames is not None and sample.shape[1] == cfg.in_channels \
                and num_frames >= 1 and sample.shape[0] % num_frames == 0:
            f, b, x = num_frames, sample.shape[0] // num_frames, sample
        else:
            raise ValueError(f"sample has shape {tuple(sample.shape)} with num_frames={num_frames}; expected "
                             f"[B, {cfg.in_channels}, F, H, W] (num_frames None) or [B*F, {cfg.in_channels}, H, W] "
                             f"with num_frames=F")
        if f > self.motion_config.motion_max_seq_length:  # fail before any compute
            raise ValueError(f"num_frames={f} exceeds the motion modules' position table (max_seq_length="
                             f"{self.motion_config.motion_max_seq_length}); sample at most that many frames")
        ctx = encoder_hidden_states
        if ctx.ndim == 3 and ctx.shape[0] == b and f > 1:
            ctx = ctx.repeat_interleave(f, dim=0)  # one text per video -> per frame
        self._check_inputs(x, ctx)
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("down_block_additional_residuals and mid_block_additional_residual come together "
                             "(a ControlNet's two outputs); pass both or neither")
        t = self._timesteps(timestep, b, x.device)
        # embed once per video, then per frame (diffusers' order: the same values as embedding B*F copies)
        emb = self.time_embedding(self.time_proj(t).to(x.dtype)).repeat_interleave(f, dim=0)  # [B*F, E]

        x = self.conv_in(x)
        skips: tuple[torch.Tensor, ...] = (x,)
        for block in self.down_blocks:
            x, pushed = block(x, emb, ctx, f)
            skips += pushed
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                                 f"tensors; this UNet has {len(skips)} skips (a ControlNet of another layout?)")
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))
        x = self.mid_block(x, emb, ctx, f) if self.motion_config.use_motion_mid_block else self.mid_block(x, emb, ctx)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        for block in self.up_blocks:
            n = len(block.resnets)
            taken, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[2:]) if skips else None  # the skip's size where a downsampler rounded up
            x = block(x, taken, emb, ctx, f, upsample_size=size)
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))  # [B*F, Z', H, W]
        if sample.ndim == 5:
            return x.reshape(b, f, *x.shape[1:]).permute(0, 2, 1, 3, 4)  # [B, Z', F, H, W]
        return x
