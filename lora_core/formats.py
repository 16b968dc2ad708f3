"""Saving and loading LoRA files (safetensors only, never pickle) in the formats the ecosystem reads.

| format    | keys                                                          | scale            |
|-----------|---------------------------------------------------------------|------------------|
| native    | `<name>.lora_A`, `<name>.lora_B`, `<name>.alpha`              | alpha / rank     |
| comfyui   | `diffusion_model.<name>.lora_A.weight` / `.lora_B.weight` / `.alpha` (original names) | alpha / rank |
| diffusers | `transformer.<diffusers name>.lora_A.weight` / `.lora_B.weight` (PEFT layout, no alpha: the scale is folded into B) | 1 |
| kohya     | `lora_unet_<name with . -> _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (musubi-tuner) | alpha / rank |

Reading also accepts PEFT's `save_pretrained` folders (adapter_model.safetensors + adapter_config.json,
keys `base_model.model.<name>.lora_A.weight`), `lora_down/lora_up` under `diffusion_model.`, and
DiffSynth's `.lora_A.default.weight`. Every key and shape is validated before the model is touched.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .inject import _pattern_value, lora_layers, lora_targetable, set_trainable
from .layers import _CONV_TYPES, LoRAConv, LoRALayer, LoRALinear

FORMAT_VERSION = "1"
FORMATS = ("native", "comfyui", "diffusers", "kohya")
_PREFIX = {"comfyui": "diffusion_model.", "diffusers": "transformer.", "peft": "base_model.model.",
           "kohya": "lora_unet_"}


@dataclass(frozen=True)
class KeyMap:
    """Maps the model's own module names to another naming (e.g. diffusers') and back.

    A backbone attaches one to its model class as `lora_key_map`."""

    to_external: Callable[[str], str]
    from_external: Callable[[str], str]
    prefix: str = "transformer."


# ----------------------------------------------------------------------------------------- saving
def save_lora(model: nn.Module, path: str | os.PathLike, format: str = "native", *,  # noqa: A002
              backbone: str | None = None, key_map: KeyMap | None = None,
              metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the model's LoRA weights to a .safetensors file, atomically (temp file + rename)."""
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to save")
    key_map = key_map or getattr(model, "lora_key_map", None)
    if format == "diffusers" and key_map is None:
        raise ValueError(f"saving in diffusers format needs a key map; {type(model).__name__} has no "
                         "`lora_key_map` (pass key_map=...)")
    tensors: dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        a = m.lora_A.detach().float().cpu()
        b = m.lora_B.detach().float().cpu()
        alpha = m.lora_scale * m.lora_rank  # effective alpha, so every reader's alpha/rank is our scale
        if isinstance(m, LoRAConv) and format != "native":  # conv-shaped, as kohya/PEFT write them
            a = a.view(m.lora_rank, *m.weight.shape[1:])
            b = b.view(*b.shape, *([1] * (m.weight.dim() - 2)))
        if format == "native":
            keys = {f"{name}.lora_A": a, f"{name}.lora_B": b, f"{name}.alpha": torch.tensor(alpha)}
        elif format == "comfyui":
            base = _PREFIX["comfyui"] + name
            keys = {f"{base}.lora_A.weight": a, f"{base}.lora_B.weight": b, f"{base}.alpha": torch.tensor(alpha)}
        elif format == "kohya":
            base = _PREFIX["kohya"] + name.replace(".", "_")
            keys = {f"{base}.lora_down.weight": a, f"{base}.lora_up.weight": b,
                    f"{base}.alpha": torch.tensor(alpha)}
        else:  # diffusers: PEFT readers assume alpha == rank unless told otherwise, so fold the scale into B
            base = key_map.prefix + key_map.to_external(name)
            keys = {f"{base}.lora_A.weight": a, f"{base}.lora_B.weight": b * m.lora_scale}
        tensors.update(keys)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.dim() else v for k, v in tensors.items()}
    ranks = sorted({m.lora_rank for m in layers.values()})
    alphas = sorted({m.lora_alpha for m in layers.values()})
    meta = {
        "format": format,
        "format_version": FORMAT_VERSION,
        "engine": "video-lora-engine",
        "backbone": backbone or getattr(model, "backbone_name", "") or "",
        "rank": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
        "alpha": f"{alphas[0]:g}" if len(alphas) == 1 else json.dumps(alphas),
        "use_rslora": str(any(m.lora_use_rslora for m in layers.values())).lower(),
        "targets": json.dumps(list(layers)),
    }
    if format == "kohya":  # what kohya-style readers look for
        meta.update(ss_network_module="networks.lora", ss_network_dim=str(ranks[-1]),
                    ss_network_alpha=f"{layers[next(iter(layers))].lora_scale * ranks[-1]:g}")
    meta.update(metadata or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------- reading
@dataclass
class LoRAFile:
    """A parsed LoRA file: module name (in the file's naming) -> A [r, fan_in], B [out, r], scale."""

    path: str
    format: str
    metadata: dict[str, str]
    modules: dict[str, dict[str, torch.Tensor | float | None]] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)
    peft_config: dict | None = None


_SUFFIXES = [  # (regex on the key's tail, role)
    (r"\.lora_A(?:\.default)?\.weight$", "A"), (r"\.lora_B(?:\.default)?\.weight$", "B"),
    (r"\.lora_down\.weight$", "A"), (r"\.lora_up\.weight$", "B"),
    (r"\.lora_A$", "A"), (r"\.lora_B$", "B"), (r"\.alpha$", "alpha"),
]


def _resolve_path(path: str | os.PathLike) -> tuple[Path, dict | None]:
    p = Path(path)
    if p.is_dir():  # a PEFT save_pretrained folder
        cfg = p / "adapter_config.json"
        p = p / "adapter_model.safetensors"
        if not p.is_file():
            raise FileNotFoundError(f"LoRA folder {path} has no adapter_model.safetensors")
        return p, (json.loads(cfg.read_text()) if cfg.is_file() else None)
    if not p.is_file():
        raise FileNotFoundError(f"LoRA file {p} does not exist")
    if p.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        raise ValueError(f"LoRA file {p} is a pickle ({p.suffix}); only .safetensors files are loaded")
    cfg = p.with_name("adapter_config.json")
    return p, (json.loads(cfg.read_text()) if cfg.is_file() else None)


def read_lora(path: str | os.PathLike) -> LoRAFile:
    """Parse a LoRA file without touching any model. Raises ValueError on a corrupt or foreign file."""
    p, peft_cfg = _resolve_path(path)
    try:
        tensors = load_file(str(p))
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"LoRA file {p} is not a readable safetensors file: {e}") from e
    if not tensors:
        raise ValueError(f"LoRA file {p} holds no tensors")
    first = next(iter(tensors))
    if first.startswith(_PREFIX["comfyui"]):
        fmt = "comfyui"
    elif first.startswith("lora_unet_"):
        fmt = "kohya"
    elif first.startswith(_PREFIX["diffusers"]):
        fmt = "diffusers"
    elif first.startswith(_PREFIX["peft"]):
        fmt = "peft"
    else:
        fmt = "native"
    lf = LoRAFile(str(p), fmt, metadata, peft_config=peft_cfg)
    for key, t in tensors.items():
        role = next((r for pat, r in _SUFFIXES if re.search(pat, key)), None)
        prefix = _PREFIX.get(fmt, "")
        if role is None or not key.startswith(prefix):
            lf.unsupported.append(key)
            continue
        stem = re.sub(r"\.(lora_[AB](\.default)?(\.weight)?|lora_(down|up)\.weight|alpha)$", "", key)
        stem = stem[len(prefix):]
        if fmt == "kohya":
            stem = stem.lstrip("_")  # Wan-Fun files use lora_unet__blocks_...
        entry = lf.modules.setdefault(stem, {"A": None, "B": None, "alpha": None})
        entry[role] = float(t.float().item()) if role == "alpha" else t
    return lf


def _file_scale(lf: LoRAFile, file_name: str, rank: int, alpha: float | None) -> float:
    if lf.peft_config is not None:  # PEFT: one lora_alpha plus optional patterns
        cfg = lf.peft_config
        r = int(_pattern_value(file_name, cfg.get("rank_pattern") or {}, cfg.get("r", rank)))
        a = float(_pattern_value(file_name, cfg.get("alpha_pattern") or {}, cfg.get("lora_alpha", r)))
        return a / math.sqrt(rank) if cfg.get("use_rslora") else a / rank
    if alpha is not None:
        return alpha / rank
    meta = lf.metadata.get("lora_adapter_metadata")  # diffusers writes its LoraConfig here
    if meta:
        cfg = json.loads(meta)
        a = float(_pattern_value(file_name, cfg.get("alpha_pattern") or {}, cfg.get("lora_alpha", rank)))
        return a / math.sqrt(rank) if cfg.get("use_rslora") else a / rank
    return 1.0  # no alpha anywhere: the ecosystem's convention is alpha == rank


@dataclass
class _Planned:
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float | None


def _plan(model: nn.Module, lf: LoRAFile, key_map: KeyMap | None) -> tuple[dict[str, _Planned], list[str]]:
    """Map a file onto the model; returns (module name -> planned weights, problems)."""
    targetable = {n: m for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, *_CONV_TYPES))}
    underscore = {n.replace(".", "_"): n for n in targetable}
    problems: list[str] = [f"unexpected key {k!r} (not a LoRA A/B/alpha key this engine applies)"
                           for k in lf.unsupported]
    plan: dict[str, _Planned] = {}
    for file_name, e in lf.modules.items():
        name: str | None = None
        if lf.format == "kohya":
            name = underscore.get(file_name)
        elif file_name in targetable:
            name = file_name
        elif key_map is not None and lf.format in ("diffusers", "peft"):
            try:
                mapped = key_map.from_external(file_name)
            except (ValueError, KeyError):
                mapped = None
            name = mapped if mapped in targetable else None
        if name is None:
            problems.append(f"unexpected module {file_name!r}: the model has no Linear/Conv of that name")
            continue
        a, b = e["A"], e["B"]
        if a is None or b is None:
            problems.append(f"module {file_name!r} is missing its {'A (down)' if a is None else 'B (up)'} matrix")
            continue
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        w = targetable[name].weight
        rank = a.shape[0]
        a2, b2 = a.reshape(rank, -1), b.reshape(b.shape[0], -1)
        want_a, want_b = (rank, w[0].numel()), (w.shape[0], rank)
        if tuple(a2.shape) != want_a or tuple(b2.shape) != want_b:
            problems.append(f"mis-shaped {file_name!r}: A {tuple(a.shape)} / B {tuple(b.shape)}, the model's "
                            f"{name} needs A {want_a} / B {want_b}")
            continue
        alpha = e["alpha"]
        plan[name] = _Planned(a2.float(), b2.float(), _file_scale(lf, file_name, rank, alpha),  # type: ignore[arg-type]
                              alpha)  # type: ignore[arg-type]
    return plan, problems


def load_lora(model: nn.Module, paths: str | os.PathLike | Sequence[str | os.PathLike],
              strength: float | Sequence[float] = 1.0, *, key_map: KeyMap | None = None,
              backbone: str | None = None) -> list[str]:
    """Apply one or more LoRA files to `model`, each with its own strength.

    Layers that have no LoRA yet get it injected; layers that have it get the file's weights. When the
    model already carries LoRA, the files must cover exactly those layers. Several files are combined
    per layer by concatenating their ranks (scales folded into B), so they run as one LoRA.
    Everything is validated before the model is touched; a file that does not fit raises ValueError
    listing missing, unexpected and mis-shaped keys. Returns the adapted module names.
    """
    path_list = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    strengths = [float(strength)] * len(path_list) if isinstance(strength, (int, float)) else list(strength)
    if len(strengths) != len(path_list):
        raise ValueError(f"got {len(path_list)} LoRA files but {len(strengths)} strengths")
    key_map = key_map or getattr(model, "lora_key_map", None)
    backbone = backbone or getattr(model, "backbone_name", None)
    existing = lora_layers(model)
    if any(m.lora_merged for m in existing.values()):
        raise ValueError("the model has merged LoRA layers; unmerge_lora(model) before loading another LoRA")
    plans: list[tuple[dict[str, _Planned], float]] = []
    for p, s in zip(path_list, strengths):
        lf = read_lora(p)
        made_for = lf.metadata.get("backbone")
        if made_for and backbone and made_for != backbone:
            raise ValueError(f"LoRA file {lf.path} was made for backbone {made_for!r}, not {backbone!r}")
        plan, problems = _plan(model, lf, key_map)
        if existing:
            missing = sorted(set(existing) - set(plan))
            problems += [f"missing module {n!r} (the model has LoRA there, the file does not)" for n in missing]
        if problems:
            shown = "\n  ".join(problems[:12])
            more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
            raise ValueError(f"LoRA file {lf.path} ({lf.format} format) does not fit "
                             f"{type(model).__name__}:\n  {shown}{more}")
        plans.append((plan, s))
    modules = dict(model.named_modules())
    names = list(dict.fromkeys(n for plan, _ in plans for n in plan))
    for name in names:
        parts = [(plan[name], s) for plan, s in plans if name in plan]
        if len(parts) == 1:
            (pl, s), = parts
            a, b, scale = pl.A, pl.B, pl.scale * s
        else:
            a = torch.cat([pl.A for pl, _ in parts])
            b = torch.cat([pl.B * (pl.scale * s) for pl, s in parts], dim=1)
            scale = 1.0
        _assign(modules[name], a, b, scale)
    set_trainable(model)
    return names


@torch.no_grad()
def _assign(module: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    rank = a.shape[0]
    if not isinstance(module, LoRALayer):
        ctor = LoRALinear.from_linear if isinstance(module, nn.Linear) else LoRAConv.from_conv
        ctor(module, rank, alpha=scale * rank)  # type: ignore[arg-type]
    m: LoRALayer = module  # type: ignore[assignment]
    dtype, device = m.lora_A.dtype, m.weight.device
    if m.lora_A.shape != a.shape or m.lora_B.shape != b.shape:
        m.lora_A = nn.Parameter(torch.empty(a.shape, dtype=dtype, device=device))
        m.lora_B = nn.Parameter(torch.empty(b.shape, dtype=dtype, device=device))
    m.lora_A.copy_(a)
    m.lora_B.copy_(b)
    m.lora_rank = rank
    m.lora_scale = scale
    m.lora_alpha = scale * rank
    m.lora_use_rslora = False  # the effective scale is stored directly


def lora_targets_of(path: str | os.PathLike) -> list[str]:
    """Module names (in the file's naming) a LoRA file adapts; for tools and error messages."""
    return list(read_lora(path).modules)


__all__ = ["KeyMap", "FORMATS", "save_lora", "load_lora", "read_lora", "LoRAFile", "lora_targets_of",
           "lora_targetable"]
