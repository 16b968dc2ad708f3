"""Original AnimateDiff motion-module names (`mm_sd_v15_v2.ckpt`) <-> diffusers MotionAdapter names.

Pure string renames (spec animatediff-sd15.md §5.4, the rules of diffusers'
`convert_animatediff_checkpoint_to_diffusers`): block and module indices are the same in both (original
up_blocks.0 is also the lowest-resolution level), `.temporal_transformer` is dropped, and inside a
transformer block `norms.0/norms.1/ff_norm` -> `norm1/norm2/norm3`, `attention_blocks.0/1` -> `attn1/attn2`.
The original file also holds one position table per attention (`...attention_blocks.k.pos_encoder.pe`, 42
in v2; diffusers keeps one per block, `pos_embed.pe`): they are dropped, since `motion.SinusoidalPositionalEmbedding`
recomputes its table whatever a file holds.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = ["motion_from_original", "motion_to_original", "motion_state_dict_from_original",
           "motion_state_dict_to_original"]

# <prefix>.motion_modules.<j>.<rest>, prefix: down_blocks.i / up_blocks.i / mid_block
_MODULE = re.compile(r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.motion_modules\.(\d+)\.(.+)$")
# inside a transformer block, original <-> diffusers (the part after `transformer_blocks.<k>.`)
_INNER = (("norms.0.", "norm1."), ("norms.1.", "norm2."), ("ff_norm.", "norm3."),
          ("attention_blocks.0.", "attn1."), ("attention_blocks.1.", "attn2."), ("ff.", "ff."))
_TOP = ("norm.", "proj_in.", "proj_out.")
_LEAF = {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"}
_FF = {"net.0.proj.weight", "net.0.proj.bias", "net.2.weight", "net.2.bias"}
# Non-tensor entries AnimateDiff's own loader skips.
_SKIP = {"animatediff_config"}


def _inner_ok(head: str, leaf: str) -> bool:
    if head in ("attn1.", "attn2."):
        return leaf in _LEAF
    if head == "ff.":
        return leaf in _FF
    return leaf in ("weight", "bias")


def motion_from_original(name: str) -> str | None:
    """Original name -> diffusers name; None for a `pos_encoder.pe` table (recomputed, not loaded)."""
    m = _MODULE.match(name)
    rest = m.group(3) if m else ""
    if m and rest.startswith("temporal_transformer."):
        rest = rest[len("temporal_transformer."):]
        base = f"{m.group(1)}.motion_modules.{m.group(2)}."
        for top in _TOP:
            if rest in (top + "weight", top + "bias"):
                return base + rest
        t = re.match(r"^transformer_blocks\.(\d+)\.(.+)$", rest)
        if t:
            inner = t.group(2)
            if re.fullmatch(r"attention_blocks\.[01]\.pos_encoder\.pe", inner):
                return None
            for orig, ours in _INNER:
                if inner.startswith(orig) and _inner_ok(ours, inner[len(orig):]):
                    return f"{base}transformer_blocks.{t.group(1)}.{ours}{inner[len(orig):]}"
    raise ValueError(f"{name!r} is not a known original AnimateDiff motion-module name; expected e.g. "
                     f"'down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight' (an mm_sd_v15*.ckpt key)")


def motion_to_original(name: str) -> str:
    """diffusers MotionAdapter (or UNetMotionModel motion) name -> original name; `pos_embed.pe` maps to
    the first attention's `pos_encoder.pe` (the original has one per attention, both equal)."""
    m = _MODULE.match(name)
    rest = m.group(3) if m else ""
    if m:
        base = f"{m.group(1)}.motion_modules.{m.group(2)}.temporal_transformer."
        for top in _TOP:
            if rest in (top + "weight", top + "bias"):
                return base + rest
        t = re.match(r"^transformer_blocks\.(\d+)\.(.+)$", rest)
        if t:
            inner = t.group(2)
            if inner == "pos_embed.pe":
                return f"{base}transformer_blocks.{t.group(1)}.attention_blocks.0.pos_encoder.pe"
            for orig, ours in _INNER:
                if inner.startswith(ours) and _inner_ok(ours, inner[len(ours):]):
                    return f"{base}transformer_blocks.{t.group(1)}.{orig}{inner[len(ours):]}"
    raise ValueError(f"{name!r} is not a known diffusers motion-module name; expected e.g. "
                     f"'down_blocks.0.motion_modules.0.proj_in.weight' (MotionAdapter / UNetMotionModel keys)")


def motion_state_dict_from_original(state_dict: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """An original motion-module file's dict (flat, or wrapped in {"state_dict": ...}) -> MotionAdapter
    names, position tables dropped. Unknown keys raise (a wrong file should not load half-way)."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in _SKIP:
            continue
        name = motion_from_original(key)
        if name is not None:
            out[name] = value
    return out


def motion_state_dict_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MotionAdapter names -> original names (e.g. to export for ComfyUI); the one diffusers table per block
    is written for both attentions, as the original file holds (588 entries for v2)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = motion_to_original(key)
        out[name] = value
        if name.endswith("attention_blocks.0.pos_encoder.pe"):
            out[name.replace("attention_blocks.0.", "attention_blocks.1.")] = value
    return out
