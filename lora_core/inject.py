"""Injecting LoRA by module-name patterns, merging, unmerging and disabling it.

Target matching follows PEFT, which users already know:
- a string is a regular expression that must match the WHOLE module name;
- a list matches exact names or dotted suffixes ("q" matches "blocks.3.self_attn.q",
  "ffn.0" matches "blocks.3.ffn.0", but "q" does not match "blocks.3.self_attn.norm_q").
`rank_pattern` / `alpha_pattern` map a pattern (regex, matched as a dotted suffix) to a per-module
rank or alpha.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from .layers import _CONV_TYPES, LoRAConv, LoRALayer, LoRALinear, strip_lora

Targets = str | Sequence[str]


def _matches(name: str, targets: Targets | None) -> bool:
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern_value(name: str, patterns: Mapping[str, float] | None, default: float) -> float:
    """The value of the first pattern that matches `name` as a dotted suffix (PEFT semantics)."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", name):
            return value
    return default


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Module name -> LoRA layer, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for m in lora_layers(model).values():
        yield m.lora_A
        yield m.lora_B


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """'<module>.lora_A' / '<module>.lora_B' -> tensor (detached, on its device)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_layers(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def set_trainable(model: nn.Module) -> int:
    """Freeze everything but the LoRA parameters; returns the number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for p in lora_parameters(model):
        p.requires_grad_(True)
        n += p.numel()
    return n


def lora_targetable(model: nn.Module) -> list[str]:
    """Names of modules LoRA can be injected into (Linear and Conv1d/2d/3d)."""
    return [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, *_CONV_TYPES))]


def inject_lora(model: nn.Module, targets: Targets, rank: int, alpha: float, *, dropout: float = 0.0,
                exclude: Targets | None = None, rank_pattern: Mapping[str, int] | None = None,
                alpha_pattern: Mapping[str, float] | None = None, use_rslora: bool = False,
                dtype: torch.dtype | None = None) -> list[str]:
    """Turn every matching Linear/Conv into a LoRA layer (in place) and freeze everything else.

    Each layer's `lora_name` is its name in `model`, which keys its dropout masks (`fused.dropout_scope`),
    so inject into the same module (the bare DiT, before any wrapping) in every process.
    Returns the adapted module names. Raises ValueError when nothing matches, when a matching module
    is of a type LoRA does not support, or when a module already carries LoRA.
    """
    if isinstance(targets, str) and not targets:
        raise ValueError("LoRA targets are empty")
    adapted: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or not _matches(name, targets) or _matches(name, exclude):
            continue
        if isinstance(module, LoRALayer):
            raise ValueError(f"module {name!r} already has LoRA; load into it or strip it first")
        r = int(_pattern_value(name, rank_pattern, rank))
        a = float(_pattern_value(name, alpha_pattern, alpha))
        if isinstance(module, nn.Linear):
            LoRALinear.from_linear(module, r, a, dropout=dropout, use_rslora=use_rslora, dtype=dtype, name=name)
        elif isinstance(module, _CONV_TYPES):
            LoRAConv.from_conv(module, r, a, dropout=dropout, use_rslora=use_rslora, dtype=dtype, name=name)
        elif isinstance(targets, str) and len(list(module.children())) > 0:
            continue  # a regex may also match containers (e.g. "blocks.0"); only leaves are adapted
        else:
            raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}; only nn.Linear and "
                             f"nn.Conv1d/2d/3d (and subclasses) can carry LoRA")
        adapted.append(name)
    if not adapted:
        sample = ", ".join(lora_targetable(model)[:8])
        raise ValueError(f"LoRA targets {targets!r} matched no Linear/Conv module of "
                         f"{type(model).__name__}; targetable names look like: {sample} ...")
    set_trainable(model)
    return adapted


def merge_lora(model: nn.Module, keep_pristine: bool = True) -> int:
    """Merge every LoRA layer (fp32 math, one rounding). With keep_pristine a CPU copy of each
    adapted weight allows an exact `unmerge_lora`; inference-only callers pass False to save memory.
    Returns the number of merged layers."""
    n = 0
    for m in lora_layers(model).values():
        if not m.lora_merged:
            m.merge(keep_pristine=keep_pristine)
            n += 1
    return n


def unmerge_lora(model: nn.Module) -> int:
    """Restore the base weights bit-exactly. Returns the number of unmerged layers."""
    n = 0
    for m in lora_layers(model).values():
        if m.lora_merged:
            m.unmerge()
            n += 1
    return n


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly its base outputs (merged layers are unmerged and
    re-merged on exit)."""
    layers = lora_layers(model)
    merged = [m for m in layers.values() if m.lora_merged]
    for m in merged:
        m.unmerge()
    previous = {n: m.lora_disabled for n, m in layers.items()}
    for m in layers.values():
        m.lora_disabled = True
    try:
        yield model
    finally:
        for n, m in layers.items():
            m.lora_disabled = previous[n]
        for m in merged:
            m.merge()


def remove_lora(model: nn.Module, merge: bool = False) -> int:
    """Strip LoRA from the model (optionally merging it first, without a pristine copy)."""
    layers = lora_layers(model)
    for m in layers.values():
        if merge and not m.lora_merged:
            m.merge(keep_pristine=False)
        elif not merge and m.lora_merged:
            m.unmerge()
        strip_lora(m)
    return len(layers)
