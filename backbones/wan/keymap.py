"""Wan DiT names: upstream (`WanModel`, the project's names) <-> diffusers (`WanTransformer3DModel`).

Works on parameter keys ("blocks.0.self_attn.q.weight") and on module names ("blocks.0.self_attn.q"),
so LoRA targets and LoRA checkpoint keys map with the same functions. Names carry no prefix
("transformer.", "diffusion_model."): strip it before calling. The VAE map lives in its own file.
"""
from __future__ import annotations

import re
from typing import Literal

import torch

__all__ = ["dit_to_diffusers", "dit_from_diffusers", "convert_state_dict"]

# Block-local entries are relative to "blocks.N.". Upstream norm2 (FFN pre-norm, no parameters) and
# norm3 (affine cross-attn pre-norm) are swapped in diffusers; listing both directions explicitly
# avoids the order-sensitive substring rewrites of the diffusers convert script.
# Modules holding .weight/.bias:
_TOP_LEAF: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
# Bare parameters and parameter-free / container modules (exact names only):
_TOP_EXACT: dict[str, str] = {
    "text_embedding": "condition_embedder.text_embedder",
    "time_embedding": "condition_embedder.time_embedder",
    "blocks": "blocks",
    "head.norm": "norm_out",
    "head.modulation": "scale_shift_table",  # parameter [1, 2, C]
}
_BLOCK_LEAF: dict[str, str] = {"norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
_BLOCK_EXACT: dict[str, str] = {
    "": "",
    "modulation": "scale_shift_table",  # parameter [1, 6, C]
    "norm1": "norm1",
    "norm2": "norm3",
    "ffn": "ffn",
}
for _ours, _theirs in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    _BLOCK_EXACT[_ours] = _theirs
    for _p in ("q", "k", "v"):
        _BLOCK_LEAF[f"{_ours}.{_p}"] = f"{_theirs}.to_{_p}"
    _BLOCK_LEAF[f"{_ours}.o"] = f"{_theirs}.to_out.0"
    _BLOCK_LEAF[f"{_ours}.norm_q"] = f"{_theirs}.norm_q"
    _BLOCK_LEAF[f"{_ours}.norm_k"] = f"{_theirs}.norm_k"

_Tables = tuple[dict[str, str], dict[str, str]]  # (leaf modules, exact names)


def _invert(tables: _Tables) -> _Tables:
    inv = tuple({v: k for k, v in t.items()} for t in tables)
    assert all(len(a) == len(b) for a, b in zip(inv, tables)), "key map is not one-to-one"
    return inv  # type: ignore[return-value]


_TO_DIFFUSERS: tuple[_Tables, _Tables] = ((_TOP_LEAF, _TOP_EXACT), (_BLOCK_LEAF, _BLOCK_EXACT))
_FROM_DIFFUSERS: tuple[_Tables, _Tables] = (_invert(_TO_DIFFUSERS[0]), _invert(_TO_DIFFUSERS[1]))

_BLOCK_RE = re.compile(r"^blocks\.(\d+)(?:\.(.*))?$")


def _lookup(name: str, tables: _Tables) -> str | None:
    """Exact module/parameter name, else `<leaf module>.weight` / `<leaf module>.bias`."""
    leaf, exact = tables
    if name in leaf:
        return leaf[name]
    if name in exact:
        return exact[name]
    head, _, attr = name.rpartition(".")
    if attr in ("weight", "bias") and head in leaf:
        return f"{leaf[head]}.{attr}"
    return None


def _convert(name: str, maps: tuple[_Tables, _Tables], src: str, dst: str) -> str:
    top, block = maps
    m = _BLOCK_RE.match(name)
    if m:
        mapped = _lookup(m.group(2) or "", block)
        if mapped is not None:
            return f"blocks.{m.group(1)}" + (f".{mapped}" if mapped else "")
    else:
        mapped = _lookup(name, top)
        if mapped is not None:
            return mapped
    raise ValueError(f"{name!r} is not a known Wan DiT {src} parameter or module name, so it has no {dst} "
                     f"equivalent; strip prefixes such as 'transformer.' / 'diffusion_model.' and check the "
                     f"name against the {src} state dict")


def dit_to_diffusers(name: str) -> str:
    """Upstream name -> diffusers name, e.g. 'blocks.0.ffn.0' -> 'blocks.0.ffn.net.0.proj'."""
    return _convert(name, _TO_DIFFUSERS, "upstream", "diffusers")


def dit_from_diffusers(name: str) -> str:
    """Diffusers name -> upstream name, e.g. 'proj_out.weight' -> 'head.head.weight'."""
    return _convert(name, _FROM_DIFFUSERS, "diffusers", "upstream")


def convert_state_dict(sd: dict[str, torch.Tensor], to: Literal["diffusers", "upstream"]) -> dict[str, torch.Tensor]:
    """Rename every key of a DiT state dict (tensors are shared, not copied)."""
    if to == "diffusers":
        fn = dit_to_diffusers
    elif to == "upstream":
        fn = dit_from_diffusers
    else:
        raise ValueError(f"convert_state_dict(to={to!r}); expected 'diffusers' or 'upstream'")
    return {fn(k): v for k, v in sd.items()}
