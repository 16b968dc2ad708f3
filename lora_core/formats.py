"""Saving and loading LoRA files (safetensors only, never pickle) in the formats the ecosystem reads.

| format    | keys (P = the component's prefix in that format; a lone model's default P)       | scale        |
|-----------|-----------------------------------------------------------------------------------|--------------|
| native    | `P<name>.lora_A`, `P<name>.lora_B`, `P<name>.alpha` (P "")                        | alpha / rank |
| comfyui   | `P<name>.lora_A.weight` / `.lora_B.weight` / `.alpha` (P `diffusion_model.`)      | alpha / rank |
| diffusers | `P<diffusers name>.lora_A.weight` / `.lora_B.weight` (P `transformer.`)           | 1 (in B)     |
| kohya     | `P<name with . -> _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (P `lora_unet_`) | alpha / rank |

diffusers files carry no alpha (PEFT layout): PEFT readers assume alpha == rank, so the scale is folded into B.

A file may hold several components (an SD UNet and its CLIP text encoder, a UNet and a ControlNet): each
has a `LoRANaming` giving its prefix per format, e.g. kohya `lora_unet_` / `lora_te_`, diffusers `unet.` /
`text_encoder.`. Reading classifies every key by the known prefixes and takes the format explaining the most
keys, so neither key order nor a stray key decides it; keys of another format are reported, not dropped.

Reading also accepts PEFT's `save_pretrained` folders (adapter_model.safetensors + adapter_config.json,
keys `base_model.model.<name>.lora_A.weight`), `lora_down/lora_up` under `diffusion_model.`, DiffSynth's
`.lora_A.default.weight`, and diffusers' `lora_adapter_metadata` (its LoraConfig, with keys either plain or
prefixed per component, `transformer.lora_alpha`). Every key and shape is validated before a model is touched.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_write

from .inject import _pattern_value, lora_layers, lora_targetable, set_trainable
from .layers import _CONV_TYPES, LoRAConv, LoRALayer, LoRALinear

FORMAT_VERSION = "1"
FORMATS = ("native", "comfyui", "diffusers", "kohya")
_READ_FORMATS = (*FORMATS, "peft")  # PEFT folders are read, never written
_PEFT_PREFIX = "base_model.model."
# Prefixes known without any naming, so foreign files are still classified (and their keys named in errors).
_GENERIC_PREFIXES: tuple[tuple[str, str], ...] = (
    ("comfyui", "diffusion_model."),
    *(("kohya", p) for p in ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")),
    *(("diffusers", p) for p in ("transformer.", "unet.", "text_encoder.", "text_encoder_2.", "controlnet.")),
    ("peft", _PEFT_PREFIX),
    ("native", ""),
)
_SINGLE = ""  # component name of a lone nn.Module


@dataclass(frozen=True)
class KeyMap:
    """Maps the model's own module names to another naming (e.g. diffusers') and back.

    A backbone attaches one to its model class as `lora_key_map`. `prefix` is only the diffusers prefix of
    a model saved without a `LoRANaming`; a naming's own diffusers prefix wins."""

    to_external: Callable[[str], str]
    from_external: Callable[[str], str]
    prefix: str = "transformer."

    @classmethod
    def identity(cls, prefix: str = "transformer.") -> KeyMap:
        """For a module whose own names already are the external (diffusers) names."""
        return cls(_same, _same, prefix)


def _same(name: str) -> str:
    return name


@dataclass(frozen=True)
class LoRANaming:
    """How one component's modules are named in files.

    `prefixes`: format ("native", "comfyui", "diffusers", "kohya", and "peft" for reading PEFT folders) ->
    key prefix; a format missing here cannot hold this component. `key_map`: own module name <-> external
    (diffusers) name, used by the diffusers format and PEFT folders."""

    prefixes: dict[str, str]
    key_map: KeyMap | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.prefixes) - set(_READ_FORMATS))
        if unknown:
            raise ValueError(f"LoRANaming prefixes name unknown formats {unknown}; use {', '.join(_READ_FORMATS)}")

    def __hash__(self) -> int:  # a dict field is unhashable; frozen specs holding a naming should stay hashable
        return hash((tuple(sorted(self.prefixes.items())), self.key_map))

    @classmethod
    def default(cls, key_map: KeyMap | None = None, *, native: str | None = "",
                comfyui: str | None = "diffusion_model.", diffusers: str | None = "transformer.",
                kohya: str | None = "lora_unet_", peft: str | None = _PEFT_PREFIX) -> LoRANaming:
        """A denoiser's naming (the Wan DiT's); None drops a format."""
        pairs = {"native": native, "comfyui": comfyui, "diffusers": diffusers, "kohya": kohya, "peft": peft}
        return cls({f: p for f, p in pairs.items() if p is not None}, key_map)


Namings = LoRANaming | Mapping[str, LoRANaming]


def _resolve(model_or_components: nn.Module | Mapping[str, nn.Module], naming: Namings | None,
             key_map: KeyMap | None) -> tuple[dict[str, nn.Module], dict[str, LoRANaming], bool]:
    """(component name -> module, component name -> naming, single); a lone module is component ""."""
    if isinstance(model_or_components, nn.Module):
        model = model_or_components
        if naming is not None and not isinstance(naming, LoRANaming):
            raise ValueError(f"naming for one module must be a LoRANaming, got {type(naming).__name__}; "
                             "a dict of namings goes with a dict of components")
        if naming is None:
            km = key_map or getattr(model, "lora_key_map", None)
            naming = LoRANaming.default(km, diffusers=km.prefix if km is not None else "transformer.")
        elif key_map is not None or naming.key_map is None:  # a naming without a map keeps the model's
            km = key_map or getattr(model, "lora_key_map", None)
            naming = dataclasses.replace(naming, key_map=km) if km is not None else naming
        return {_SINGLE: model}, {_SINGLE: naming}, True
    if not isinstance(model_or_components, Mapping) or not model_or_components:
        raise ValueError(f"expected an nn.Module or a non-empty dict of them, got {model_or_components!r:.80}")
    components = dict(model_or_components)
    bad = [k for k, v in components.items() if not isinstance(k, str) or not k or ":" in k
           or not isinstance(v, nn.Module)]
    if bad:
        raise ValueError(f"components {bad} must be non-empty names without ':' mapping to nn.Modules")
    if key_map is not None:
        raise ValueError("key_map= is for a single module; put each component's KeyMap in its LoRANaming")
    if not isinstance(naming, Mapping):
        raise ValueError(f"a dict of components needs naming={{component: LoRANaming}} for "
                         f"{sorted(components)}, got {type(naming).__name__}")
    if set(naming) != set(components) or not all(isinstance(n, LoRANaming) for n in naming.values()):
        raise ValueError(f"naming must give one LoRANaming per component: components {sorted(components)}, "
                         f"naming has {sorted(naming)}")
    namings = {c: naming[c] for c in components}
    for fmt in _READ_FORMATS:
        seen: dict[str, str] = {}
        for c, n in namings.items():
            p = n.prefixes.get(fmt)
            if p is not None and p in seen:
                raise ValueError(f"components {seen[p]!r} and {c!r} both use the {fmt} prefix {p!r}, so their "
                                 f"keys cannot be told apart; give each its own prefix in its LoRANaming")
            if p is not None:
                seen[p] = c
    return components, namings, False


def _shown(component: str, name: str) -> str:
    return name if component == _SINGLE else f"{component}:{name}"


# ----------------------------------------------------------------------------------------- saving
def _module_tensors(m: LoRALayer, name: str, fmt: str, prefix: str,
                    key_map: KeyMap | None) -> dict[str, torch.Tensor]:
    a = m.lora_A.detach().float().cpu()
    b = m.lora_B.detach().float().cpu()
    alpha = torch.tensor(m.lora_scale * m.lora_rank)  # effective alpha, so every reader's alpha/rank is our scale
    if isinstance(m, LoRAConv) and fmt != "native":  # conv-shaped, as kohya/PEFT write them
        a = a.view(m.lora_rank, *m.weight.shape[1:])
        b = b.view(*b.shape, *([1] * (m.weight.dim() - 2)))
    if fmt == "native":
        base = prefix + name
        return {f"{base}.lora_A": a, f"{base}.lora_B": b, f"{base}.alpha": alpha}
    if fmt == "comfyui":
        base = prefix + name
        return {f"{base}.lora_A.weight": a, f"{base}.lora_B.weight": b, f"{base}.alpha": alpha}
    if fmt == "kohya":
        base = prefix + name.replace(".", "_")
        return {f"{base}.lora_down.weight": a, f"{base}.lora_up.weight": b, f"{base}.alpha": alpha}
    assert fmt == "diffusers" and key_map is not None
    # PEFT readers assume alpha == rank unless told otherwise, so the scale is folded into B
    base = prefix + key_map.to_external(name)
    return {f"{base}.lora_A.weight": a, f"{base}.lora_B.weight": b * m.lora_scale}


def _backbone_of(components: Mapping[str, nn.Module]) -> str:
    names = {getattr(m, "backbone_name", "") or "" for m in components.values()} - {""}
    return names.pop() if len(names) == 1 else ""


def save_lora(model_or_components: nn.Module | Mapping[str, nn.Module], path: str | os.PathLike,
              format: str = "native", *, naming: Namings | None = None,  # noqa: A002
              backbone: str | None = None, key_map: KeyMap | None = None,
              metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the LoRA weights of a model, or of several components into one file, atomically (temp file +
    rename). A dict of components needs `naming={component: LoRANaming}`; components without LoRA are
    skipped. A lone model is named by `naming`, else by its `lora_key_map` with the default prefixes."""
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}")
    components, namings, single = _resolve(model_or_components, naming, key_map)
    per = {c: layers for c, m in components.items() if (layers := lora_layers(m))}
    if not per:
        raise ValueError(f"{type(components[_SINGLE]).__name__} has no LoRA layers to save" if single
                         else f"none of the components {sorted(components)} has LoRA layers to save")
    tensors: dict[str, torch.Tensor] = {}
    for c, layers in per.items():
        nm = namings[c]
        who = type(components[c]).__name__ if single else f"component {c!r}"
        prefix = nm.prefixes.get(format)
        if prefix is None:
            raise ValueError(f"{who} has no {format} naming (its LoRANaming prefixes: {nm.prefixes}); add a "
                             f"{format!r} prefix or save in one of {', '.join(nm.prefixes)}")
        if format == "diffusers" and nm.key_map is None:
            raise ValueError(f"saving in diffusers format needs a key map; {who} has no `lora_key_map` "
                             "(pass key_map=..., or KeyMap.identity() when its names already are diffusers')")
        for name, m in layers.items():
            keys = _module_tensors(m, name, format, prefix, nm.key_map)
            clash = sorted(tensors.keys() & keys.keys())
            if clash:
                raise ValueError(f"{who} writes key {clash[0]!r}, already written by another component; give "
                                 "the components distinct prefixes")
            tensors.update(keys)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.dim() else v for k, v in tensors.items()}
    all_layers = [m for layers in per.values() for m in layers.values()]
    ranks = sorted({m.lora_rank for m in all_layers})
    alphas = sorted({m.lora_alpha for m in all_layers})
    meta = {
        "format": format,
        "format_version": FORMAT_VERSION,
        "engine": "video-lora-engine",
        "backbone": backbone or _backbone_of(components),
        "rank": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
        "alpha": f"{alphas[0]:g}" if len(alphas) == 1 else json.dumps(alphas),
        "use_rslora": str(any(m.lora_use_rslora for m in all_layers)).lower(),
        "targets": json.dumps([_shown(c, n) for c, layers in per.items() for n in layers]),
    }
    if not single:
        meta["components"] = json.dumps(list(per))
        meta.update({f"targets.{c}": json.dumps(list(layers)) for c, layers in per.items()})
    if format == "kohya":  # what kohya-style readers look for
        meta.update(ss_network_module="networks.lora", ss_network_dim=str(ranks[-1]),
                    ss_network_alpha=f"{all_layers[0].lora_scale * ranks[-1]:g}")
    meta.update(metadata or {})
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


# ---------------------------------------------------------------------------------------- reading
@dataclass
class LoRAFile:
    """A parsed LoRA file. `modules`: (prefix, module name in the file's naming) -> A [r, fan_in],
    B [out, r], alpha; `components`: prefix -> the component that reads it (when read with a naming);
    `unsupported`: keys this engine does not apply, `foreign` those of them that belong to another format;
    `counts`: format -> number of keys it explains (the largest decides `format`)."""

    path: str
    format: str
    metadata: dict[str, str]
    modules: dict[tuple[str, str], dict[str, torch.Tensor | float | None]] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)
    peft_config: dict | None = None
    adapter_metadata: dict | None = None
    foreign: dict[str, str] = field(default_factory=dict)
    components: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


_WEIGHT = frozenset({"native", "comfyui", "diffusers", "peft"})
_ROLES = [  # (regex on the key's tail, role, formats that write this tail)
    (r"\.lora_A(?:\.default)?\.weight$", "A", _WEIGHT), (r"\.lora_B(?:\.default)?\.weight$", "B", _WEIGHT),
    (r"\.lora_down\.weight$", "A", frozenset({"kohya", "comfyui", "native"})),
    (r"\.lora_up\.weight$", "B", frozenset({"kohya", "comfyui", "native"})),
    (r"\.lora_A$", "A", frozenset({"native"})), (r"\.lora_B$", "B", frozenset({"native"})),
    (r"\.alpha$", "alpha", frozenset(_READ_FORMATS)),
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


def _split(key: str) -> tuple[str, str, frozenset[str]] | None:
    """(key without its LoRA tail, role, formats writing that tail), or None for no LoRA A/B/alpha key."""
    for pattern, role, formats in _ROLES:
        m = re.search(pattern, key)
        if m:
            return key[:m.start()], role, formats
    return None


def _classify(body: str, formats: frozenset[str], candidates: Sequence[tuple[str, str, bool]],
              sibling: tuple[str, str] | None) -> tuple[str, str, str] | None:
    """(format, prefix, module name) of a key's body.

    The longest matching prefix wins (so `unet.` beats the native ""), then a naming's prefix over the
    generic table, then a real format over native, which is what is left when nothing else fits. An alpha
    key has no tail of its own format, so it follows its module's A/B keys (`sibling`) when there are any."""
    if sibling is not None:
        fmt, prefix = sibling
    else:
        best: tuple[tuple[int, bool, bool], str, str] | None = None
        for fmt, prefix, own in candidates:
            if fmt in formats and body.startswith(prefix) and len(body) > len(prefix):
                rank = (len(prefix), own, fmt != "native")
                if best is None or rank > best[0]:
                    best = (rank, fmt, prefix)
        if best is None:
            return None
        _, fmt, prefix = best
    stem = body[len(prefix):]
    if fmt == "kohya":
        stem = stem.lstrip("_")  # Wan-Fun files use lora_unet__blocks_...
    return fmt, prefix, stem


def _as_namings(naming: Namings | None) -> dict[str, LoRANaming]:
    if naming is None:
        return {}
    return {_SINGLE: naming} if isinstance(naming, LoRANaming) else dict(naming)


def read_lora(path: str | os.PathLike, naming: Namings | None = None) -> LoRAFile:
    """Parse a LoRA file without touching any model. Raises ValueError on a corrupt or foreign file.

    `naming` (one LoRANaming, or one per component) adds its prefixes to the generic ones and records
    which component reads which prefix."""
    p, peft_cfg = _resolve_path(path)
    try:
        tensors = load_file(str(p))
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"LoRA file {p} is not a readable safetensors file: {e}") from e
    if not tensors:
        raise ValueError(f"LoRA file {p} holds no tensors")
    adapter_meta = None
    if metadata.get("lora_adapter_metadata"):  # diffusers writes its LoraConfig(s) here
        try:
            adapter_meta = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError as e:
            adapter_meta = e
        if not isinstance(adapter_meta, dict):
            raise ValueError(f"LoRA file {p} has lora_adapter_metadata that is no JSON object ({adapter_meta}); "
                             "re-save it or strip that metadata entry")
    namings = _as_namings(naming)
    candidates = [(fmt, prefix, True) for n in namings.values() for fmt, prefix in n.prefixes.items()]
    candidates += [(fmt, prefix, False) for fmt, prefix in _GENERIC_PREFIXES]
    split = {k: sp for k in tensors if (sp := _split(k)) is not None}
    classified: dict[str, tuple[str, str, str, str]] = {}
    by_body: dict[str, tuple[str, str]] = {}
    for key in sorted(split, key=lambda k: split[k][1] == "alpha"):  # A/B keys first, their alphas follow
        body, role, formats = split[key]
        c = _classify(body, formats, candidates, by_body.get(body) if role == "alpha" else None)
        if c is not None:
            classified[key] = (c[0], c[1], role, c[2])
            by_body.setdefault(body, (c[0], c[1]))
    counts = Counter(c[0] for c in classified.values())
    fmt = max(_READ_FORMATS, key=lambda f: (counts[f], -_READ_FORMATS.index(f))) if counts else "native"
    lf = LoRAFile(str(p), fmt, metadata, peft_config=peft_cfg, adapter_metadata=adapter_meta,
                  counts=dict(counts))
    for key, t in tensors.items():
        c = classified.get(key)
        if c is None or (c[2] == "alpha" and t.numel() != 1):
            lf.unsupported.append(key)
            continue
        kfmt, prefix, role, stem = c
        if kfmt != fmt:
            lf.unsupported.append(key)
            lf.foreign[key] = kfmt
            continue
        entry = lf.modules.setdefault((prefix, stem), {"A": None, "B": None, "alpha": None})
        entry[role] = float(t.float().item()) if role == "alpha" else t
    lf.components = {n.prefixes[fmt]: c for c, n in namings.items() if fmt in n.prefixes}
    if fmt == "peft" and _PEFT_PREFIX not in lf.components and len(namings) == 1:
        lf.components[_PEFT_PREFIX] = next(iter(namings))  # PEFT's wrapper prefix is nobody's naming choice
    return lf


# ---------------------------------------------------------------------------------------- loading
def _component_config(meta: dict | None, prefix: str) -> dict | None:
    """The LoraConfig of one component from diffusers' lora_adapter_metadata: pipelines write keys
    prefixed by the component (`transformer.lora_alpha`), a model's save_lora_adapter writes them plain."""
    if not meta:
        return None
    head = prefix.rstrip(".") + "." if prefix else ""
    if head:
        sub = {k[len(head):]: v for k, v in meta.items() if k.startswith(head)}
        if sub:
            return sub
    return meta if "lora_alpha" in meta or "r" in meta else None


def _config_scale(cfg: dict, name: str, rank: int) -> float:
    """alpha / rank under a PEFT LoraConfig (alpha_pattern matched as a dotted suffix, as PEFT does)."""
    alpha = float(_pattern_value(name, cfg.get("alpha_pattern") or {}, cfg.get("lora_alpha", rank)))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _file_scale(lf: LoRAFile, prefix: str, stem: str, rank: int, alpha: float | None) -> float:
    if lf.peft_config is not None:  # adapter_config.json beside the weights: one lora_alpha plus patterns
        return _config_scale(lf.peft_config, stem, rank)
    if alpha is not None:
        return alpha / rank
    cfg = _component_config(lf.adapter_metadata, prefix)
    if cfg is not None:
        return _config_scale(cfg, stem, rank)
    return 1.0  # no alpha anywhere: the ecosystem's convention is alpha == rank


@dataclass
class _Planned:
    A: torch.Tensor
    B: torch.Tensor
    scale: float


def _problem_for_key(lf: LoRAFile, key: str) -> str:
    if key in lf.foreign:
        return (f"unexpected key {key!r} (a {lf.foreign[key]} key; the file reads as {lf.format}, the format "
                f"of {lf.counts.get(lf.format, 0)} of its keys)")
    return f"unexpected key {key!r} (not a LoRA A/B/alpha key this engine applies)"


def _plan(components: dict[str, nn.Module], namings: dict[str, LoRANaming],
          lf: LoRAFile) -> tuple[dict[tuple[str, str], _Planned], list[str]]:
    """Map a file onto the components; returns ((component, module name) -> planned weights, problems)."""
    targetable = {c: {n: m for n, m in comp.named_modules() if n and isinstance(m, (nn.Linear, *_CONV_TYPES))}
                  for c, comp in components.items()}
    single = set(components) == {_SINGLE}
    problems = [_problem_for_key(lf, k) for k in lf.unsupported]
    plan: dict[tuple[str, str], _Planned] = {}
    underscore: dict[str, dict[str, str]] = {}
    for (prefix, stem), e in lf.modules.items():
        c = lf.components.get(prefix)
        if c is None:
            readers = ", ".join(repr(n.prefixes[lf.format]) + ("" if c == _SINGLE else f" ({c})")
                                for c, n in namings.items() if lf.format in n.prefixes)
            problems.append(f"unexpected module {prefix + stem!r}: no component reads {lf.format} keys with the "
                            f"prefix {prefix!r} (read: {readers or 'none'})")
            continue
        shown = _shown(c, stem)
        names, key_map = targetable[c], namings[c].key_map
        name: str | None = None
        if lf.format == "kohya":
            if c not in underscore:
                underscore[c] = {n.replace(".", "_"): n for n in names}
            name = underscore[c].get(stem)
        elif lf.format in ("diffusers", "peft"):
            candidates = [stem]
            if key_map is not None:
                try:
                    mapped = key_map.from_external(stem)
                except (ValueError, KeyError):
                    mapped = None
                # diffusers files are in the external naming; PEFT folders usually wrap the model itself
                candidates = [mapped, stem] if lf.format == "diffusers" else [stem, mapped]
            name = next((n for n in candidates if n in names), None)
        elif stem in names:
            name = stem
        if name is None:
            who = "the model" if single else f"component {c!r}"
            problems.append(f"unexpected module {shown!r}: {who} has no Linear/Conv of that name")
            continue
        a, b = e["A"], e["B"]
        if a is None or b is None:
            problems.append(f"module {shown!r} is missing its {'A (down)' if a is None else 'B (up)'} matrix")
            continue
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        w = names[name].weight
        rank = a.shape[0]
        a2, b2 = a.reshape(rank, -1), b.reshape(b.shape[0], -1)
        want_a, want_b = (rank, w[0].numel()), (w.shape[0], rank)
        if tuple(a2.shape) != want_a or tuple(b2.shape) != want_b:
            problems.append(f"mis-shaped {shown!r}: A {tuple(a.shape)} / B {tuple(b.shape)}, the model's "
                            f"{name} needs A {want_a} / B {want_b}")
            continue
        alpha = e["alpha"]
        assert alpha is None or isinstance(alpha, float)
        plan[(c, name)] = _Planned(a2.float(), b2.float(), _file_scale(lf, prefix, stem, rank, alpha))
    return plan, problems


def load_lora(model_or_components: nn.Module | Mapping[str, nn.Module],
              paths: str | os.PathLike | Sequence[str | os.PathLike], strength: float | Sequence[float] = 1.0, *,
              naming: Namings | None = None, key_map: KeyMap | None = None,
              backbone: str | None = None) -> list[str]:
    """Apply one or more LoRA files to a model, or to several components ({name: module} with
    naming={name: LoRANaming}), each file with its own strength.

    Layers that have no LoRA yet get it injected; layers that have it get the file's weights. When the
    components already carry LoRA, the files must cover exactly those layers. Several files are combined
    per layer by concatenating their ranks (scales folded into B), so they run as one LoRA.
    Everything is validated before any module is touched; a file that does not fit raises ValueError
    listing missing, unexpected and mis-shaped keys. Returns the adapted module names ("<component>:<name>"
    for a dict of components).
    """
    path_list = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    strengths = [float(strength)] * len(path_list) if isinstance(strength, (int, float)) else list(strength)
    if len(strengths) != len(path_list):
        raise ValueError(f"got {len(path_list)} LoRA files but {len(strengths)} strengths")
    components, namings, single = _resolve(model_or_components, naming, key_map)
    what = type(components[_SINGLE]).__name__ if single else f"components {sorted(components)}"
    backbone = backbone or _backbone_of(components) or None
    existing = {(c, n) for c, comp in components.items() for n in lora_layers(comp)}
    if any(m.lora_merged for comp in components.values() for m in lora_layers(comp).values()):
        raise ValueError("the model has merged LoRA layers; unmerge_lora(model) before loading another LoRA")
    plans: list[tuple[dict[tuple[str, str], _Planned], float]] = []
    for p, s in zip(path_list, strengths):
        lf = read_lora(p, namings)
        made_for = lf.metadata.get("backbone")
        if made_for and backbone and made_for != backbone:
            raise ValueError(f"LoRA file {lf.path} was made for backbone {made_for!r}, not {backbone!r}")
        plan, problems = _plan(components, namings, lf)
        missing = sorted(existing - set(plan))
        problems += [f"missing module {_shown(c, n)!r} (the model has LoRA there, the file does not)"
                     for c, n in missing]
        if problems:
            shown = "\n  ".join(problems[:12])
            more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
            raise ValueError(f"LoRA file {lf.path} ({lf.format} format) does not fit {what}:\n  {shown}{more}")
        plans.append((plan, s))
    modules = {c: dict(comp.named_modules()) for c, comp in components.items()}
    keys = list(dict.fromkeys(k for plan, _ in plans for k in plan))
    for key in keys:
        parts = [(plan[key], s) for plan, s in plans if key in plan]
        if len(parts) == 1:
            (pl, s), = parts
            a, b, scale = pl.A, pl.B, pl.scale * s
        else:
            a = torch.cat([pl.A for pl, _ in parts])
            b = torch.cat([pl.B * (pl.scale * s) for pl, s in parts], dim=1)
            scale = 1.0
        _assign(modules[key[0]][key[1]], a, b, scale)
    for c in dict.fromkeys(c for c, _ in keys):  # components the files did not touch keep their trainability
        set_trainable(components[c])
    return [_shown(c, n) for c, n in keys]


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


__all__ = ["KeyMap", "LoRANaming", "FORMATS", "save_lora", "load_lora", "read_lora", "LoRAFile",
           "lora_targetable"]
