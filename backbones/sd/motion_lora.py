"""Motion LoRA files in the original AnimateDiff layout (MotionLoRA `v2_lora_ZoomIn.ckpt` and the files
ComfyUI-AnimateDiff-Evolved loads), written and read.

Layout (spec animatediff-sd15.md §7.3): the original motion-module name of the adapted layer, its last part
moved behind `processor.` and suffixed `_lora`, then `down.weight` (A, [r, in]) / `up.weight` (B, [out, r]):

    down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q_lora.down.weight
    ...attention_blocks.0.processor.to_out_lora.up.weight          (the layer `attention_blocks.0.to_out.0`)
    ...temporal_transformer.processor.proj_in_lora.down.weight      (SWIFT-style targets beyond the attentions)

Both readers (AnimateDiff's `load_diffusers_lora`, ADE's `load_motion_lora_as_patches`) strip `processor.`,
`_lora`, `down.`/`up.`, turn `to_out.` into `to_out.0.` and add strength * up @ down to the weight: there is no
alpha, so the training scale alpha/r is folded into `up` on writing and a file read here gets scale 1.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from lora_core.inject import lora_layers

from .motion_keymap import motion_from_original, motion_to_original

__all__ = ["to_original_lora", "from_original_lora", "is_original_lora"]

_KEY = re.compile(r"^(?P<parent>.+?)\.processor\.(?P<leaf>[^.]+)_lora\.(?P<role>down|up)\.weight$")


def _original_key(module: str, role: str) -> str:
    """Own (diffusers) module name -> the original layout's key of its A ("down") or B ("up")."""
    orig = motion_to_original(module + ".weight")[:-len(".weight")]
    if orig.endswith(".to_out.0"):
        parent, leaf = orig[:-len(".to_out.0")], "to_out"
    else:
        parent, leaf = orig.rsplit(".", 1)
    return f"{parent}.processor.{leaf}_lora.{role}.weight"


def to_original_lora(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The motion-module LoRA layers of `model` (a UNetMotionModel) in the original layout, alpha/r folded into
    `up` (computed in fp32, then cast). Raises when a LoRA layer is not in a motion module (image LoRA layers
    have no original-layout name)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        if ".motion_modules." not in name:
            raise ValueError(f"LoRA layer {name!r} is not in a motion module; the original motion-LoRA layout "
                             "holds motion modules only (save image-layer LoRAs in the kohya or diffusers format)")
        a = layer.lora_A.detach().float().reshape(layer.lora_A.shape[0], -1)
        b = layer.lora_B.detach().float().reshape(layer.lora_B.shape[0], -1) * float(layer.lora_scale)
        out[_original_key(name, "down")] = a.to(dtype).cpu().contiguous()
        out[_original_key(name, "up")] = b.to(dtype).cpu().contiguous()
    return out


def is_original_lora(tensors: Mapping[str, torch.Tensor]) -> bool:
    return bool(tensors) and all(".temporal_transformer." in k and _KEY.match(k) for k in tensors)


def from_original_lora(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor] | None:
    """An original-layout motion LoRA as native keys (`<prefix><module>.lora_A` / `.lora_B`, `.alpha` = rank so
    the scale is 1, as the original readers apply it); None when `tensors` is not in that layout. Unknown
    original names raise ValueError naming the key."""
    if not is_original_lora(tensors):
        return None
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        assert m is not None
        leaf = "to_out.0" if m["leaf"] == "to_out" else m["leaf"]
        try:
            name = motion_from_original(f"{m['parent']}.{leaf}.weight")
        except ValueError as e:
            raise ValueError(f"motion LoRA key {key!r}: {e}") from None
        assert name is not None
        module = prefix + name[:-len(".weight")]
        out[f"{module}.{'lora_A' if m['role'] == 'down' else 'lora_B'}"] = t
        if m["role"] == "down":
            out[f"{module}.alpha"] = torch.tensor(float(t.shape[0]))
    return out
