"""SD UNet names: diffusers (the project's, `UNet2DConditionModel`) <-> LDM single file (`model.diffusion_model.`).

Names carry no prefix: strip `model.diffusion_model.` (or add it) around these calls. Works on parameter
keys ("down_blocks.1.resnets.0.norm1.weight") and module names ("down_blocks.1.resnets.0.norm1"), so LoRA
targets and LoRA checkpoint keys map with the same functions. Tensor shapes are equal in both layouts
(the attention projections are 1x1 convs in both; only the VAE needs reshapes).

The table is derived from the block structure of a `UNetConfig` (SD1.5 by default), following LDM's
`openaimodel.UNetModel` layout:
- input_blocks.0.0 is conv_in; then per level, per layer one input block: `.0` its resnet, `.1` its
  attention; then one block for the downsampler, `.0.op`.
- middle_block.0 / .1 / .2 are resnet, attention, resnet.
- output_blocks: per up level, per layer (layers_per_block + 1) one block: `.0` resnet, `.1` attention;
  the level's upsampler joins its last block at the next position (`.1` without attention, else `.2`).
- time_embed.0/.2, out.0/.2 are the time MLP and the output norm/conv; inside a resnet the LDM names are
  in_layers.0/2, emb_layers.1, out_layers.0/3, skip_connection; inside an attention they are identical.
"""
from __future__ import annotations

import re
from functools import lru_cache

from .unet import UNET_PRESETS, UNetConfig

__all__ = ["unet_to_ldm", "unet_from_ldm", "ldm_module_table"]

SD15 = UNET_PRESETS["sd15"]

# Leaf modules inside a ResnetBlock2D (LDM `ResBlock`: Sequential slots, SiLUs and dropout hold no weights).
_RESNET_LEAF = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LEAF = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
# Module paths below a Transformer2DModel (same in both layouts); only these pass through unchanged:
# leaves (which hold weight/bias) and the containers above them (module names only).
_ATTN_LEAF = re.compile(r"^(norm|proj_in|proj_out|transformer_blocks\.\d+\."
                        r"(norm[123]|attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))$")
_ATTN_CONTAINER = re.compile(r"^transformer_blocks(\.\d+(\.(attn[12](\.to_out)?|ff(\.net(\.0)?)?))?)?$")

# Each table maps a unit (a module whose inside is translated leaf by leaf) to (its other name, its kind):
# "resnet" (leaves renamed by _RESNET_LEAF), "attention" (inside unchanged) or "leaf" (weight/bias only).
_Table = dict[str, tuple[str, str]]


@lru_cache(maxsize=8)
def ldm_module_table(config: UNetConfig = SD15) -> tuple[_Table, _Table]:
    """(diffusers unit -> (LDM unit, kind), LDM unit -> (diffusers unit, kind)) for this UNet layout."""
    table: _Table = {d: (ldm, "leaf") for d, ldm in _TOP_LEAF.items()}
    n_levels, layers = len(config.block_out_channels), config.layers_per_block
    idx = 0  # input_blocks index; 0 is conv_in
    for i, kind in enumerate(config.down_block_types):
        for j in range(layers):
            idx += 1
            table[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{idx}.0", "resnet")
            if kind.startswith("CrossAttn"):
                table[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{idx}.1", "attention")
        if i < n_levels - 1:
            idx += 1
            table[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{idx}.0.op", "leaf")
    table["mid_block.resnets.0"] = ("middle_block.0", "resnet")
    table["mid_block.attentions.0"] = ("middle_block.1", "attention")
    table["mid_block.resnets.1"] = ("middle_block.2", "resnet")
    idx = -1
    for i, kind in enumerate(config.up_block_types):
        has_attn = kind.startswith("CrossAttn")
        for j in range(layers + 1):
            idx += 1
            table[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{idx}.0", "resnet")
            if has_attn:
                table[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{idx}.1", "attention")
        if i < n_levels - 1:
            table[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{idx}.{2 if has_attn else 1}.conv", "leaf")
    inverse = {ldm: (d, kind) for d, (ldm, kind) in table.items()}
    assert len(inverse) == len(table), "LDM unit table is not one-to-one"
    return table, inverse


def _convert(name: str, table: _Table, leaf_map: dict[str, str], src: str, dst: str) -> str:
    parts = name.split(".")
    # the longest unit prefix wins (units never nest, so at most one matches)
    for cut in range(len(parts), 0, -1):
        unit = ".".join(parts[:cut])
        if unit not in table:
            continue
        other, kind = table[unit]
        rest = ".".join(parts[cut:])
        if kind == "leaf" and rest in ("", "weight", "bias"):
            return other + (f".{rest}" if rest else "")
        if kind == "attention":
            leaf, attr = _split_param(rest)
            if rest == "" or _ATTN_LEAF.match(leaf) or (not attr and _ATTN_CONTAINER.match(rest)):
                return other + (f".{rest}" if rest else "")
        if kind == "resnet":
            if rest == "":
                return other
            leaf, attr = _split_param(rest)
            if leaf in leaf_map:
                return f"{other}.{leaf_map[leaf]}" + (f".{attr}" if attr else "")
        break
    raise ValueError(f"{name!r} is not a known SD UNet {src} parameter or module name, so it has no {dst} "
                     f"equivalent; strip the 'model.diffusion_model.' / 'unet.' prefix and check the name "
                     f"against the {src} state dict")


def _split_param(rest: str) -> tuple[str, str]:
    """'in_layers.0.weight' -> ('in_layers.0', 'weight'); 'norm1' -> ('norm1', '')."""
    head, _, attr = rest.rpartition(".")
    return (head, attr) if attr in ("weight", "bias") and head else (rest, "")


_RESNET_LEAF_INV = {v: k for k, v in _RESNET_LEAF.items()}


def unet_to_ldm(name: str, config: UNetConfig = SD15) -> str:
    """Diffusers name -> LDM name, e.g. 'down_blocks.0.resnets.1.norm1.weight' -> 'input_blocks.2.0.in_layers.0.weight'."""
    return _convert(name, ldm_module_table(config)[0], _RESNET_LEAF, "diffusers", "LDM")


def unet_from_ldm(name: str, config: UNetConfig = SD15) -> str:
    """LDM name (prefix stripped) -> diffusers name, e.g. 'output_blocks.2.1.conv.weight' ->
    'up_blocks.0.upsamplers.0.conv.weight'."""
    return _convert(name, ldm_module_table(config)[1], _RESNET_LEAF_INV, "LDM", "diffusers")
