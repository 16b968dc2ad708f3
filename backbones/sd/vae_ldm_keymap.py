"""Key map between the LDM single-file VAE (`first_stage_model.*` of v1-5-pruned-emaonly.safetensors,
prefix stripped) and diffusers' `AutoencoderKL` names (ours). Built from rules, not a table:

LDM                                         diffusers
{enc,dec}.norm_out                          {enc,dec}.conv_norm_out
encoder.down.i.block.j                      encoder.down_blocks.i.resnets.j
encoder.down.i.downsample.conv              encoder.down_blocks.i.downsamplers.0.conv
decoder.up.i.block.j                        decoder.up_blocks.(N-1-i).resnets.j   (N up blocks; reversed)
decoder.up.i.upsample.conv                  decoder.up_blocks.(N-1-i).upsamplers.0.conv
{enc,dec}.mid.block_k                       {enc,dec}.mid_block.resnets.(k-1)
{enc,dec}.mid.attn_1.norm / q / k / v       {enc,dec}.mid_block.attentions.0.group_norm / to_q / to_k / to_v
{enc,dec}.mid.attn_1.proj_out               {enc,dec}.mid_block.attentions.0.to_out.0
inside resnets: nin_shortcut                conv_shortcut  (norm1, conv1, norm2, conv2 unchanged)
conv_in, conv_out, quant_conv, post_quant_conv unchanged

Shapes differ in one place: the mid-attention q/k/v/proj_out weights are 1x1 convs [C, C, 1, 1] in
LDM and Linear [C, C] in diffusers; `convert_vae_ldm_state_dict` reshapes them (a view, bit-exact).
"""
from __future__ import annotations

import re
from typing import Literal, Mapping

import torch

LDM_VAE_PREFIX = "first_stage_model."
SD15_NUM_UP_BLOCKS = 4

_RES_FROM_LDM = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "nin_shortcut": "conv_shortcut"}
_RES_TO_LDM = {v: k for k, v in _RES_FROM_LDM.items()}
_ATTN_FROM_LDM = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_TO_LDM = {v: k for k, v in _ATTN_FROM_LDM.items()}
_SIDE_FROM_LDM = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
_SIDE_TO_LDM = {v: k for k, v in _SIDE_FROM_LDM.items()}
_TOP = ("quant_conv", "post_quant_conv")
_PARAM = r"(weight|bias)"

# diffusers names of the weights stored as 1x1 convs in LDM (biases have the same shape in both)
_LINEAR_IN_DIFFUSERS = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight")


def _bad(name: str, fmt: str) -> ValueError:
    return ValueError(f"{name!r} is not an SD VAE key in {fmt} layout; strip the {LDM_VAE_PREFIX!r} prefix from "
                      f"LDM keys (see ldm_vae_subdict) and check the `to=` direction of the conversion")


def _alt(table: Mapping[str, str]) -> str:
    return "|".join(re.escape(k) for k in sorted(table, key=len, reverse=True))


def _check_blocks(num_up_blocks: int) -> None:
    if isinstance(num_up_blocks, bool) or not isinstance(num_up_blocks, int) or num_up_blocks < 1:
        raise ValueError(f"num_up_blocks={num_up_blocks!r}; expected a positive int, len(block_out_channels) "
                         f"of the VAE config ({SD15_NUM_UP_BLOCKS} for SD1.5)")


def _flip(i: str, num_up_blocks: int, name: str, fmt: str) -> int:
    if int(i) >= num_up_blocks:  # the index would map to a negative block
        raise ValueError(f"{name!r} ({fmt} layout) has up-block index {i}, but num_up_blocks={num_up_blocks}; "
                         "pass num_up_blocks = len(block_out_channels) of the checkpoint's config")
    return num_up_blocks - 1 - int(i)


def vae_from_ldm(name: str, num_up_blocks: int = SD15_NUM_UP_BLOCKS) -> str:
    """LDM VAE key (without `first_stage_model.`) -> diffusers AutoencoderKL key."""
    _check_blocks(num_up_blocks)
    if re.fullmatch(rf"({'|'.join(_TOP)})\.{_PARAM}", name):
        return name
    res, attn = _alt(_RES_FROM_LDM), _alt(_ATTN_FROM_LDM)
    if m := re.fullmatch(rf"(encoder|decoder)\.({_alt(_SIDE_FROM_LDM)})\.{_PARAM}", name):
        return f"{m[1]}.{_SIDE_FROM_LDM[m[2]]}.{m[3]}"
    if m := re.fullmatch(rf"encoder\.down\.(\d+)\.block\.(\d+)\.({res})\.{_PARAM}", name):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RES_FROM_LDM[m[3]]}.{m[4]}"
    if m := re.fullmatch(rf"encoder\.down\.(\d+)\.downsample\.conv\.{_PARAM}", name):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(rf"decoder\.up\.(\d+)\.block\.(\d+)\.({res})\.{_PARAM}", name):
        i = _flip(m[1], num_up_blocks, name, "LDM")
        return f"decoder.up_blocks.{i}.resnets.{m[2]}.{_RES_FROM_LDM[m[3]]}.{m[4]}"
    if m := re.fullmatch(rf"decoder\.up\.(\d+)\.upsample\.conv\.{_PARAM}", name):
        return f"decoder.up_blocks.{_flip(m[1], num_up_blocks, name, 'LDM')}.upsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(rf"(encoder|decoder)\.mid\.block_([12])\.({res})\.{_PARAM}", name):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RES_FROM_LDM[m[3]]}.{m[4]}"
    if m := re.fullmatch(rf"(encoder|decoder)\.mid\.attn_1\.({attn})\.{_PARAM}", name):
        return f"{m[1]}.mid_block.attentions.0.{_ATTN_FROM_LDM[m[2]]}.{m[3]}"
    raise _bad(name, "LDM")


def vae_to_ldm(name: str, num_up_blocks: int = SD15_NUM_UP_BLOCKS) -> str:
    """diffusers AutoencoderKL key -> LDM VAE key (without `first_stage_model.`)."""
    _check_blocks(num_up_blocks)
    if re.fullmatch(rf"({'|'.join(_TOP)})\.{_PARAM}", name):
        return name
    res, attn = _alt(_RES_TO_LDM), _alt(_ATTN_TO_LDM)
    if m := re.fullmatch(rf"(encoder|decoder)\.({_alt(_SIDE_TO_LDM)})\.{_PARAM}", name):
        return f"{m[1]}.{_SIDE_TO_LDM[m[2]]}.{m[3]}"
    if m := re.fullmatch(rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.({res})\.{_PARAM}", name):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_RES_TO_LDM[m[3]]}.{m[4]}"
    if m := re.fullmatch(rf"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_PARAM}", name):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.({res})\.{_PARAM}", name):
        i = _flip(m[1], num_up_blocks, name, "diffusers")
        return f"decoder.up.{i}.block.{m[2]}.{_RES_TO_LDM[m[3]]}.{m[4]}"
    if m := re.fullmatch(rf"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_PARAM}", name):
        return f"decoder.up.{_flip(m[1], num_up_blocks, name, 'diffusers')}.upsample.conv.{m[2]}"
    if m := re.fullmatch(rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.({res})\.{_PARAM}", name):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RES_TO_LDM[m[3]]}.{m[4]}"
    if m := re.fullmatch(rf"(encoder|decoder)\.mid_block\.attentions\.0\.({attn})\.{_PARAM}", name):
        return f"{m[1]}.mid.attn_1.{_ATTN_TO_LDM[m[2]]}.{m[3]}"
    raise _bad(name, "diffusers")


def ldm_vae_subdict(sd: Mapping[str, torch.Tensor], prefix: str = LDM_VAE_PREFIX) -> dict[str, torch.Tensor]:
    """The VAE tensors of a whole LDM checkpoint (UNet, CLIP and schedule buffers dropped), prefix stripped."""
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"no key starts with {prefix!r}; this is not an LDM single-file checkpoint with a VAE "
                         "(a diffusers vae/ folder loads without conversion)")
    return out


def _infer_num_up_blocks(sd: Mapping[str, torch.Tensor], to: str) -> int:
    pattern = re.compile(r"decoder\.up\.(\d+)\." if to == "diffusers" else r"decoder\.up_blocks\.(\d+)\.")
    found = {int(m[1]) for k in sd if (m := pattern.match(k))}
    return max(found) + 1 if found else SD15_NUM_UP_BLOCKS  # no up-block keys: the count is never used


def _to_linear(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 2:  # some converted files already store Linear weights
        return t
    # [C, C, 1] (a conv1d proj_attn) turns up in some third-party files; diffusers accepts it too
    if t.dim() not in (3, 4) or any(s != 1 for s in t.shape[2:]):
        raise ValueError(f"{name!r} has shape {tuple(t.shape)}; expected a 1x1 conv [C, C, 1, 1] or a Linear [C, C]")
    return t[:, :, 0] if t.dim() == 3 else t[:, :, 0, 0]


def convert_vae_ldm_state_dict(sd: Mapping[str, torch.Tensor], to: Literal["diffusers", "ldm"] = "diffusers",
                               num_up_blocks: int | None = None) -> dict[str, torch.Tensor]:
    """Rename every key of a VAE state dict to the other layout and reshape the 8 mid-attention weights
    (1x1 conv <-> Linear). LDM keys come without `first_stage_model.` (see `ldm_vae_subdict`).
    Tensors are views of the input, not copies. num_up_blocks defaults to what the keys show.

    `loss.*` entries (the discriminator/LPIPS of VAE training checkpoints) are dropped: no inference or
    fine-tuning path uses them."""
    if to not in ("diffusers", "ldm"):
        raise ValueError(f"convert_vae_ldm_state_dict: to={to!r}, expected 'diffusers' or 'ldm'")
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    n = _infer_num_up_blocks(sd, to) if num_up_blocks is None else num_up_blocks
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        new = vae_from_ldm(key, n) if to == "diffusers" else vae_to_ldm(key, n)
        linear_name = new if to == "diffusers" else key
        if _LINEAR_IN_DIFFUSERS.fullmatch(linear_name):
            t = _to_linear(key, t)
            if to == "ldm":
                t = t[:, :, None, None]
        if new in out:
            raise ValueError(f"{key!r} and another key both map to {new!r}; the state dict mixes layouts")
        out[new] = t
    return out


def is_ldm_vae_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for LDM layout (prefix stripped or not: it has `encoder.down.*`), False for diffusers."""
    return any(re.match(rf"({re.escape(LDM_VAE_PREFIX)})?encoder\.down\.\d+\.", k) for k in sd)


__all__ = ["LDM_VAE_PREFIX", "SD15_NUM_UP_BLOCKS", "vae_from_ldm", "vae_to_ldm", "ldm_vae_subdict",
           "convert_vae_ldm_state_dict", "is_ldm_vae_state_dict"]
