"""Key map between the official Wan2.2 VAE names (`Wan2.2_VAE.pth`, our `WanVAE`) and diffusers'
`AutoencoderKLWan` (is_residual=True). Names only; tensors are identical in both layouts.

upstream                                    diffusers
conv1 / conv2                               quant_conv / post_quant_conv
{enc,dec}.conv1                             {enc,dec}.conv_in
{enc,dec}.middle.0 / .1 / .2                {enc,dec}.mid_block.resnets.0 / attentions.0 / resnets.1
{enc,dec}.head.0 / .2                       {enc,dec}.norm_out / conv_out
encoder.downsamples.i.downsamples.j         encoder.down_blocks.i.resnets.j  (j-th residual block)
encoder.downsamples.i.downsamples.R         encoder.down_blocks.i.downsampler  (R = num_res_blocks)
decoder.upsamples.i.upsamples.j             decoder.up_blocks.i.resnets.j
decoder.upsamples.i.upsamples.R             decoder.up_blocks.i.upsampler  (R = num_res_blocks + 1)
inside residual blocks: residual.0/.2/.3/.6 -> norm1/conv1/norm2/conv2, shortcut -> conv_shortcut
"""
from __future__ import annotations

import re
from typing import Literal, Mapping

import torch

_RES_TO_DIFF = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.",
                "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}
_RES_FROM_DIFF = {v: k for k, v in _RES_TO_DIFF.items()}
_TOP_TO_DIFF = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
_TOP_FROM_DIFF = {v: k for k, v in _TOP_TO_DIFF.items()}
_SIDE_TO_DIFF = {"conv1.": "conv_in.", "head.0.": "norm_out.", "head.2.": "conv_out.",
                 "middle.0.": "mid_block.resnets.0.", "middle.1.": "mid_block.attentions.0.",
                 "middle.2.": "mid_block.resnets.1."}
_SIDE_FROM_DIFF = {v: k for k, v in _SIDE_TO_DIFF.items()}
_STAGE = {"encoder": ("downsamples", "down_blocks", "downsampler"),
          "decoder": ("upsamples", "up_blocks", "upsampler")}


def _bad(name: str, fmt: str) -> ValueError:
    return ValueError(f"{name!r} is not a Wan2.2 VAE key in {fmt} layout; check that the state dict is a "
                      f"Wan2.2 VAE (not Wan2.1 or a DiT) and the `to=` direction of the conversion")


def _swap_prefix(rest: str, table: Mapping[str, str]) -> str | None:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def _map_resblock(rest: str, table: Mapping[str, str], name: str, fmt: str) -> str:
    out = _swap_prefix(rest, table)
    if out is None:
        raise _bad(name, fmt)
    return out


def vae_to_diffusers(name: str) -> str:
    """Official/upstream VAE key -> diffusers AutoencoderKLWan key."""
    top = _swap_prefix(name, _TOP_TO_DIFF)
    if top is not None:
        return top
    side, _, rest = name.partition(".")
    if side not in _STAGE:
        raise _bad(name, "upstream")
    ours, theirs, sampler = _STAGE[side]
    m = re.fullmatch(rf"{ours}\.(\d+)\.{ours}\.(\d+)\.(.+)", rest)
    if m:
        i, j, tail = m.groups()
        if tail.startswith(("resample.", "time_conv.")):
            return f"{side}.{theirs}.{i}.{sampler}.{tail}"
        return f"{side}.{theirs}.{i}.resnets.{j}.{_map_resblock(tail, _RES_TO_DIFF, name, 'upstream')}"
    mapped = _swap_prefix(rest, _SIDE_TO_DIFF)
    if mapped is None:
        raise _bad(name, "upstream")
    if rest.startswith(("middle.0.", "middle.2.")):
        head, _, tail = mapped.partition("resnets.")
        idx, _, tail = tail.partition(".")
        mapped = f"{head}resnets.{idx}.{_map_resblock(tail, _RES_TO_DIFF, name, 'upstream')}"
    return f"{side}.{mapped}"


def vae_from_diffusers(name: str, num_res_blocks: int = 2) -> str:
    """diffusers AutoencoderKLWan key -> official/upstream VAE key (num_res_blocks of the config)."""
    top = _swap_prefix(name, _TOP_FROM_DIFF)
    if top is not None:
        return top
    side, _, rest = name.partition(".")
    if side not in _STAGE:
        raise _bad(name, "diffusers")
    ours, theirs, sampler = _STAGE[side]
    m = re.fullmatch(rf"{theirs}\.(\d+)\.(?:resnets\.(\d+)|{sampler})\.(.+)", rest)
    if m:
        i, j, tail = m.groups()
        if j is None:  # the resampler sits after the residual blocks (decoder has one extra block)
            j = str(num_res_blocks + (1 if side == "decoder" else 0))
        else:
            tail = _map_resblock(tail, _RES_FROM_DIFF, name, "diffusers")
        return f"{side}.{ours}.{i}.{ours}.{j}.{tail}"
    m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
    if m:
        idx, tail = m.groups()
        if idx not in ("0", "1"):
            raise _bad(name, "diffusers")
        return f"{side}.middle.{0 if idx == '0' else 2}.{_map_resblock(tail, _RES_FROM_DIFF, name, 'diffusers')}"
    mapped = _swap_prefix(rest, {k: v for k, v in _SIDE_FROM_DIFF.items() if "resnets" not in k})
    if mapped is None:
        raise _bad(name, "diffusers")
    return f"{side}.{mapped}"


def convert_vae_state_dict(sd: Mapping[str, torch.Tensor], to: Literal["diffusers", "upstream"] = "diffusers",
                           num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """Rename every key of a VAE state dict to the other layout; tensors are shared, not copied."""
    if to == "diffusers":
        return {vae_to_diffusers(k): v for k, v in sd.items()}
    if to == "upstream":
        return {vae_from_diffusers(k, num_res_blocks): v for k, v in sd.items()}
    raise ValueError(f"convert_vae_state_dict: to={to!r}, expected 'diffusers' or 'upstream'")


def is_diffusers_vae_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for diffusers layout (it has `quant_conv.*`), False for the official layout."""
    return any(k.startswith("quant_conv.") for k in sd)


__all__ = ["vae_to_diffusers", "vae_from_diffusers", "convert_vae_state_dict", "is_diffusers_vae_state_dict"]
