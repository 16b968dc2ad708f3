"""Loading official checkpoint files unchanged into models built on the meta device.

The model is built on `meta` (no memory), every file's key names and shapes are checked against it
(headers only, so a wrong folder fails before anything is read), then tensors are read one at a time,
cast, moved and assigned, so a 5B load never holds two copies of the weights.
"""
from __future__ import annotations

import contextlib

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

Shapes = dict[str, tuple[int, ...]]
Rename = Callable[[str], str | None]   # file key -> model key (None: skip the key)


def sharded_safetensors(folder: Path, stem: str = "diffusion_pytorch_model") -> list[Path]:
    """The shard files of `<stem>.safetensors[.index.json]` in `folder`, checked to exist."""
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a safetensors index (expected a JSON object with 'weight_map')") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint shard {folder / missing[0]} named in {index.name} is missing"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return [folder / f for f in files]
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {stem}.safetensors or {stem}.safetensors.index.json in {folder}")


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    out[k] = (f, tuple(h.get_slice(k).get_shape()))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"checkpoint file {f} is not a readable safetensors file: {e}") from e
    return out


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a .pth file, memory-mapped and without unpickling code."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"checkpoint file {path} could not be read as a torch state dict: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint file {path} holds a {type(sd).__name__}, expected a state dict")
    return sd


def expected_shapes(model: nn.Module) -> Shapes:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def validate(expected: Shapes, found: Shapes, source: str) -> None:
    """ValueError naming `source` and the first missing / unexpected / mis-shaped keys."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k}: file {found[k]} vs model {expected[k]}" for k in expected
                 if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or misshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"{len(items)} {label} (first: {', '.join(items[:5])})")
        raise ValueError(f"checkpoint {source} does not fit this model: " + "; ".join(parts)
                         + ". Is it the right file for this backbone and preset?")


def _renamed(keys: Iterator[str], rename: Rename | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k in keys:
        new = rename(k) if rename else k
        if new is not None:
            out[k] = new
    return out


def load_safetensors_into(model: nn.Module, files: list[Path], *, rename: Rename | None = None,
                          dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> None:
    headers = safetensors_shapes(files)
    names = _renamed(iter(headers), rename)
    source = str(files[0].parent / files[0].name) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"
    validate(expected_shapes(model), {names[k]: headers[k][1] for k in names}, source)
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if k in names:
                    sd[names[k]] = _cast(h.get_tensor(k), dtype, device)
    _assign(model, sd)


def load_state_dict_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str, *,
                         rename: Rename | None = None, dtype: torch.dtype | None = None,
                         device: torch.device | str = "cpu") -> None:
    names = _renamed(iter(sd), rename)
    validate(expected_shapes(model), {names[k]: tuple(sd[k].shape) for k in names}, source)
    _assign(model, {names[k]: _cast(sd[k], dtype, device) for k in names})


def _cast(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device)


def _assign(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"after loading, {len(left)} tensors are still unallocated (first: {left[:3]})")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's CPU generator at `seed` inside, restored after (random weights the same in every process)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def random_init(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic random weights for a module built on the meta device and `to_empty`'d: each layer's own
    init, and N(0, 0.2) for the parameters of modules without one (e.g. Framer's mask_token, SVD's mix_factor,
    CLIP's class_embedding), which `to_empty` would leave as whatever the memory held."""
    with seeded(seed), torch.no_grad():
        for m in module.modules():
            if m is not module and hasattr(m, "reset_parameters"):
                m.reset_parameters()
            else:
                for p in m.parameters(recurse=False):
                    p.normal_(0, 0.2)
    return module


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device, offload: bool) -> Iterator[None]:
    """Run a component on `device` inside; with offload, move it back to where it was afterwards."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield
    finally:
        if offload and home != device:
            module.to(home)
            if device.type == "cuda":
                torch.cuda.empty_cache()
