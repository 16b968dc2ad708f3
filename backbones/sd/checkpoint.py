"""SD1.5-family weights, in the two layouts they are published in, loaded unchanged.

- the diffusers folder: `unet/`, `vae/`, `text_encoder/`, `tokenizer/` (and `scheduler/`, `model_index.json`),
  each model as `diffusion_pytorch_model.safetensors` / `model.safetensors` (sharded or not);
- the single LDM file (`v1-5-pruned-emaonly.safetensors`, community fine-tunes): `model.diffusion_model.*`,
  `first_stage_model.*`, `cond_stage_model.transformer.*`, through one key map per component. A `.ckpt` is
  read with `torch.load(weights_only=True)` only, so a file that needs code unpickled is refused.

A separate VAE (`model.sources.vae`: a diffusers `vae/` folder or a single VAE file, in LDM or diffusers names)
replaces the checkpoint's, e.g. for a fine-tune shipped without one; a single file carries no tokenizer, so it
comes from `model.sources.tokenizer` (a `tokenizer/` folder) or a `tokenizer/` folder beside the file.
Every file's keys and shapes are checked against the meta-device model (headers only) before anything loads.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..encoders.clip import clip_file_key, clip_ldm_file_key
from ..loading import (expected_shapes, load_state_dict_into, safetensors_shapes, sharded_safetensors, validate)
from .unet_ldm_keymap import unet_from_ldm
from .vae_ldm_keymap import convert_vae_ldm_state_dict, vae_from_ldm

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
             "text_encoder": "cond_stage_model.transformer."}
_FOLDERS = {"unet": ("unet", "diffusion_pytorch_model"), "vae": ("vae", "diffusion_pytorch_model"),
            "text_encoder": ("text_encoder", "model")}


@dataclass(frozen=True)
class Source:
    """Where one component's tensors are: a diffusers folder's files or one single file (with a key prefix)."""

    files: tuple[Path, ...]
    layout: str          # "diffusers" | "ldm" | "ldm-vae" (a bare LDM VAE file) | "diffusers-vae-file"
    prefix: str = ""

    @property
    def where(self) -> str:
        return str(self.files[0]) if len(self.files) == 1 else f"{self.files[0].parent} ({len(self.files)} shards)"


def _read_single(path: Path) -> dict[str, torch.Tensor] | None:
    """A .ckpt/.pt file's state dict (weights only); None for safetensors (read lazily by header)."""
    if path.suffix == ".safetensors":
        return None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 (an UnpicklingError means the file needs code: refused)
        raise ValueError(f"checkpoint file {path} cannot be read without unpickling code ({type(e).__name__}); "
                         "convert it to .safetensors (e.g. with the diffusers or kohya conversion scripts) and "
                         "pass that instead") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint file {path} holds a {type(sd).__name__}, expected a state dict")
    return sd


def _keys_and_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    sd = _read_single(path)
    if sd is None:
        return {k: s for k, (_, s) in safetensors_shapes([path]).items()}
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def locate(component: str, ckpt: Path | None, override: Path | None) -> Source:
    """The source of `component` ("unet", "vae", "text_encoder"); FileNotFoundError/ValueError naming the path."""
    path = override if override is not None else ckpt
    if path is None:
        raise ValueError(f"no weights for the {component}: give --ckpt-dir (a diffusers folder or a single file)")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist (expected a diffusers SD1.5 folder or a "
                                f"single .safetensors file)")
    if path.is_dir():
        sub, stem = _FOLDERS[component]
        folder = path / sub if (path / sub).is_dir() else path  # a component folder given directly
        if any(folder.glob("*.bin")) and not any(folder.glob("*.safetensors")):
            raise ValueError(f"{folder} holds only .bin (pickle) weights; convert them to .safetensors")
        return Source(tuple(sharded_safetensors(folder, stem)), "diffusers")
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ValueError(f"checkpoint file {path} is not a {'/'.join(SINGLE_FILE_SUFFIXES)} file")
    if component == "vae" and override is not None:
        keys = _keys_and_shapes(path)
        if any(k.startswith(_PREFIXES["vae"]) for k in keys):
            return Source((path,), "ldm", _PREFIXES["vae"])
        if any(k.startswith("encoder.down.") for k in keys):
            return Source((path,), "ldm-vae")
        return Source((path,), "diffusers-vae-file")
    return Source((path,), "ldm", _PREFIXES[component])


def _rename(component: str, src: Source, model: nn.Module) -> Callable[[str], str | None]:
    """File key -> model key (None: not this component's key); `model` gives the UNet's layout (its LDM block
    indices depend on it) and the VAE's up-block count."""
    if src.layout == "diffusers" or src.layout == "diffusers-vae-file":
        return (lambda k: clip_file_key(k)) if component == "text_encoder" else (lambda k: k)
    prefix = src.prefix
    if component == "text_encoder":
        return clip_ldm_file_key  # CLIP keys -> ours; everything else in the file (and position_ids) skipped

    def ldm(key: str) -> str | None:
        if not key.startswith(prefix):
            return None
        rest = key[len(prefix):]
        try:
            if component == "unet":
                return unet_from_ldm(rest, model.config)  # type: ignore[arg-type]
            return vae_from_ldm(rest, _vae_up_blocks(model))
        except (ValueError, KeyError):
            return "__unknown__." + rest  # reported by the shape check as an unexpected key
    return ldm


def _vae_up_blocks(model: nn.Module) -> int:
    return len(model.decoder.up_blocks)  # type: ignore[union-attr, arg-type]


def check(component: str, src: Source, meta: nn.Module) -> None:
    """Keys and shapes of `src` fit `meta` (headers only for safetensors)."""
    found: dict[str, tuple[int, ...]] = {}
    if src.layout == "ldm-vae":
        shapes = {}
        for f in src.files:
            shapes.update(_keys_and_shapes(f))
        converted = convert_vae_ldm_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()},
                                               to="diffusers", num_up_blocks=_vae_up_blocks(meta))
        found = {k: tuple(v.shape) for k, v in converted.items()}
    else:
        rename = _rename(component, src, meta)
        for f in src.files:
            for k, s in _keys_and_shapes(f).items():
                new = rename(k)
                if new is not None:
                    found[new] = s
        if component == "vae" and src.layout == "ldm":
            found = {k: (s[:2] if len(s) == 4 and s[2:] == (1, 1) and "attentions" in k else s)
                     for k, s in found.items()}
    validate(expected_shapes(meta), found, f"{src.where} ({component})")


def load(component: str, src: Source, model: nn.Module, *, dtype: torch.dtype, device: torch.device | str) -> None:
    """Fill `model` (built on the meta device) from `src`, checked first."""
    check(component, src, model)
    sd: dict[str, torch.Tensor] = {}
    for f in src.files:
        got = _read_single(f)
        if got is None:
            from safetensors.torch import load_file
            got = load_file(str(f))
        sd.update(got)
    if component == "vae" and src.layout in ("ldm", "ldm-vae"):
        sub = {k[len(src.prefix):]: v for k, v in sd.items() if k.startswith(src.prefix)}
        sd = convert_vae_ldm_state_dict(sub, to="diffusers", num_up_blocks=_vae_up_blocks(model))
        load_state_dict_into(model, sd, src.where, dtype=dtype, device=device)
        return
    load_state_dict_into(model, sd, src.where, rename=_rename(component, src, model), dtype=dtype, device=device)


def tokenizer_folder(ckpt: Path | None, override: Path | None) -> Path:
    """The CLIP tokenizer folder: the override, the diffusers folder's tokenizer/, or one beside a single file."""
    for cand in ([override] if override is not None else []) + (
            [ckpt / "tokenizer", ckpt] if ckpt is not None and ckpt.is_dir() else
            [ckpt.parent / "tokenizer"] if ckpt is not None else []):
        if (cand / "vocab.json").is_file() or (cand / "tokenizer.json").is_file():
            return cand
    where = override or ckpt
    raise FileNotFoundError(f"no CLIP tokenizer (vocab.json + merges.txt) found for {where}; a single checkpoint file "
                            "carries none: pass the tokenizer/ folder of the diffusers SD1.5 repository as "
                            "model.sources.tokenizer=/path/to/tokenizer (infer.py: --source tokenizer=...)")
