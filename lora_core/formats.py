"""Saving and loading LoRA files in the formats the ecosystem reads (written as safetensors; pickles such as
MotionLoRA `.ckpt` or SWIFT's `adapter_model.bin` are read with `torch.load(weights_only=True)`, never code).

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

Safety. A file holding NaN or inf anywhere is refused by `read_lora` (naming the first bad key and how many
there are): applied, it turns every output black while the run exits 0. `save_lora` refuses to write one, also
when the cast to `dtype` overflows (fp16 tops out at 65504; bf16 keeps fp32's range).

Apply what fits, name what does not. Read with a naming, keys under a prefix that no component claims in any
format (`lora_te_` text-encoder keys of a kohya file, loaded into a denoiser alone) go to `LoRAFile.skipped`
instead of failing the load; `load_lora` applies the rest and logs one warning per file (logger
"lora_core.formats") naming each skipped prefix, its key count and first keys. Keys under a claimed prefix
that fit no module (unknown name, wrong shape, A without B), of another format under a claimed prefix, or
with no recognisable prefix still fail the whole load, and so does a file where nothing fits.

Saving dtype. `save_lora(dtype=torch.float16 / torch.bfloat16)` casts A and B; the 0-dim `.alpha` scalars
stay fp32, since the stored alpha is the effective one (scale * rank, irrational under rsLoRA) and bf16 would
round it by up to 0.4%. kohya/musubi cast alpha with the rest, but every reader takes it as a number
(ComfyUI `.item()`, kohya `.float()`, diffusers' kohya converter `.item()`), so mixed dtypes load everywhere.
Reading casts A/B to fp32 before they reach the model's LoRA masters (fp32 even on bf16 base weights).

Metadata written by `save_lora` (all strings; the caller's `metadata` is applied last and wins):

| key                                  | written | value                                                     |
|--------------------------------------|---------|-----------------------------------------------------------|
| format, format_version               | always  | the key layout above, "1"                                 |
| engine, backbone                     | always  | "video-lora-engine", the backbone registry name (or "")   |
| rank, alpha, use_rslora              | always  | one value, or a JSON list when layers differ              |
| targets, components, targets.<comp.> | always* | JSON lists of adapted modules (*the last two: multi-part) |
| dtype                                | always  | A/B tensor dtype: "float32", "float16", "bfloat16"        |
| modelspec.sai_model_spec             | always  | "1.0.0" (Stability's ModelSpec, shown by LoRA managers)   |
| modelspec.title                      | always  | the file name without its suffix; callers pass a better one |
| modelspec.date                       | always  | ISO 8601 UTC time of writing, to the second               |
| modelspec.architecture               | backbone| caller's (e.g. "wan-2.2-ti2v-5b/lora"), else "<backbone>/lora" |
| modelspec.implementation             | caller  | the architecture's upstream code (musubi: the Wan repo URL) |
| modelspec.resolution                 | caller  | "<width>x<height>", format checked                        |
| ss_network_module                    | kohya   | "networks.lora", or the caller's (musubi Wan: "networks.lora_wan") |
| ss_network_dim, ss_network_alpha     | kohya   | the largest rank, its alpha                               |

Caller keys starting with `ss_` are written into kohya files only: they describe kohya's key layout, and a
diffusers file claiming `networks.lora_wan` would send kohya-style tools the wrong way.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
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
    ("comfyui", "diffusion_model."), ("comfyui", "text_encoders."),  # ComfyUI's generic text-encoder keys
    *(("kohya", p) for p in ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")),
    *(("diffusers", p) for p in ("transformer.", "unet.", "text_encoder.", "text_encoder_2.", "controlnet.")),
    ("peft", _PEFT_PREFIX),
    ("native", ""),
)
_SINGLE = ""  # component name of a lone nn.Module
MODELSPEC_VERSION = "1.0.0"
log = logging.getLogger(__name__)


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
    # reading only: own module name -> another name files use for it (e.g. SD's LDM names, which kohya files of
    # the A1111 era carry as `lora_unet_input_blocks_1_1_...`); None where a module has no other name
    alias: Callable[[str], str | None] | None = None
    # reading only: a whole file's tensors in a family's own layout (e.g. AnimateDiff's original MotionLoRA keys)
    # -> the same LoRA as native keys of this component; None when the file is not in that layout
    convert: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor] | None] | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.prefixes) - set(_READ_FORMATS))
        if unknown:
            raise ValueError(f"LoRANaming prefixes name unknown formats {unknown}; use {', '.join(_READ_FORMATS)}")

    def __hash__(self) -> int:  # a dict field is unhashable; frozen specs holding a naming should stay hashable
        return hash((tuple(sorted(self.prefixes.items())), self.key_map, self.alias, self.convert))

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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys (sorted) of floating tensors holding NaN or inf."""
    bad = []
    for k in sorted(tensors):
        t = tensors[k]
        if t.is_floating_point():
            t = t if t.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) else t.float()  # fp8
            if not bool(torch.isfinite(t).all()):
                bad.append(k)
    return bad


_RESOLUTION = re.compile(r"[1-9][0-9]*x[1-9][0-9]*")


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    extra = dict(metadata or {})
    wrong = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
    if wrong:
        raise ValueError(f"LoRA file metadata must map str to str (safetensors stores only strings); "
                         f"{wrong[0]!r} maps to {type(extra[wrong[0]]).__name__}: pass str(value) or json.dumps(value)")
    res = extra.get("modelspec.resolution")
    if res is not None and not _RESOLUTION.fullmatch(res):
        raise ValueError(f"modelspec.resolution must be '<width>x<height>' (e.g. '1280x704'), got {res!r}")
    return extra


def _backbone_of(components: Mapping[str, nn.Module]) -> str:
    names = {getattr(m, "backbone_name", "") or "" for m in components.values()} - {""}
    return names.pop() if len(names) == 1 else ""


def save_lora(model_or_components: nn.Module | Mapping[str, nn.Module], path: str | os.PathLike,
              format: str = "native", *, naming: Namings | None = None,  # noqa: A002
              backbone: str | None = None, key_map: KeyMap | None = None,
              metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the LoRA weights of a model, or of several components into one file, atomically (temp file +
    rename). A dict of components needs `naming={component: LoRANaming}`; components without LoRA are
    skipped. A lone model is named by `naming`, else by its `lora_key_map` with the default prefixes.

    `dtype` casts A and B (alpha stays fp32); `metadata` adds or overrides string entries, e.g. a backbone's
    `ss_network_module` / `modelspec.architecture` (the fields are listed in the module docstring). Raises
    ValueError for NaN/inf weights, a cast that overflows, or metadata that is not str -> str."""
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"save_lora dtype must be a floating torch.dtype (torch.float32, torch.float16, "
                         f"torch.bfloat16), got {dtype!r}")
    extra = _check_metadata(metadata)
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
    bad = _non_finite(tensors)
    if bad:
        raise ValueError(f"refusing to write {path}: the LoRA weights hold NaN or inf in {len(bad)} tensors, first "
                         f"{bad[0]!r}; training diverged (lower the learning rate, check the loss log), so resume "
                         "from a checkpoint before it rather than saving these weights")
    if dtype is not None:
        # alpha scalars stay fp32: they carry the effective scale, which bf16 would round (module docstring)
        cast = {k: v.to(dtype) if v.dim() else v for k, v in tensors.items()}
        bad = _non_finite(cast)
        if bad:
            peak = max(float(tensors[k].abs().max()) for k in bad)
            raise ValueError(f"refusing to write {path}: casting to {_dtype_name(dtype)} overflows {len(bad)} "
                             f"tensors to inf/NaN, first {bad[0]!r} (largest |value| {peak:g}); save in bfloat16 "
                             "(fp32's range) or float32 instead")
        tensors = cast
    all_layers = [m for layers in per.values() for m in layers.values()]
    ranks = sorted({m.lora_rank for m in all_layers})
    alphas = sorted({m.lora_alpha for m in all_layers})
    backbone = backbone or _backbone_of(components)
    meta = {
        "format": format,
        "format_version": FORMAT_VERSION,
        "engine": "video-lora-engine",
        "backbone": backbone,
        "rank": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
        "alpha": f"{alphas[0]:g}" if len(alphas) == 1 else json.dumps(alphas),
        "use_rslora": str(any(m.lora_use_rslora for m in all_layers)).lower(),
        "targets": json.dumps([_shown(c, n) for c, layers in per.items() for n in layers]),
        "dtype": _dtype_name(dtype or torch.float32),
        # ModelSpec fields LoRA managers display; the backbone-specific ones come from the caller's metadata
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.title": Path(path).stem,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
    }
    if backbone:
        meta["modelspec.architecture"] = f"{backbone}/lora"
    if not single:
        meta["components"] = json.dumps(list(per))
        meta.update({f"targets.{c}": json.dumps(list(layers)) for c, layers in per.items()})
    if format == "kohya":  # what kohya-style readers look for
        meta.update(ss_network_module="networks.lora", ss_network_dim=str(ranks[-1]),
                    ss_network_alpha=f"{all_layers[0].lora_scale * ranks[-1]:g}")
    meta.update({k: v for k, v in extra.items() if format == "kohya" or not k.startswith("ss_")})
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


# ---------------------------------------------------------------------------------------- reading
@dataclass
class LoRAFile:
    """A parsed LoRA file. `modules`: (prefix, module name in the file's naming) -> A [r, fan_in],
    B [out, r], alpha; `components`: prefix -> the component that reads it (when read with a naming);
    `skipped`: prefix -> its keys, for prefixes no component claims (only when read with a naming; these keys
    are in neither `modules` nor `unsupported`, and loading leaves them out with a warning);
    `unsupported`: other keys this engine does not apply (loading refuses the file over them), `foreign` the
    keys of `unsupported` and `skipped` that belong to another format;
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
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skipped_summary(self, shown: int = 3) -> str:
        """"'lora_te_' (24 keys: k1, k2, k3, ...)" per skipped prefix, for warnings and errors."""
        parts = []
        for prefix, keys in self.skipped.items():
            head = ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")
            parts.append(f"{prefix!r} ({len(keys)} key{'s' * (len(keys) != 1)}: {head})")
        return "; ".join(parts)


_WEIGHT = frozenset({"native", "comfyui", "diffusers", "peft"})
_ROLES = [  # (regex on the key's tail, role, formats that write this tail)
    (r"\.lora_A(?:\.default)?\.weight$", "A", _WEIGHT), (r"\.lora_B(?:\.default)?\.weight$", "B", _WEIGHT),
    (r"\.lora_down\.weight$", "A", frozenset({"kohya", "comfyui", "native"})),
    (r"\.lora_up\.weight$", "B", frozenset({"kohya", "comfyui", "native"})),
    (r"\.lora_A$", "A", frozenset({"native"})), (r"\.lora_B$", "B", frozenset({"native"})),
    # the legacy diffusers spellings (attention processors, LoRACompatible layers) of diffusers < 0.21 files
    (r"\.lora\.down\.weight$", "A", frozenset({"diffusers"})), (r"\.lora\.up\.weight$", "B", frozenset({"diffusers"})),
    (r"_lora\.down\.weight$", "A", frozenset({"diffusers"})), (r"_lora\.up\.weight$", "B", frozenset({"diffusers"})),
    (r"\.alpha$", "alpha", frozenset(_READ_FORMATS)),
]


_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def _resolve_path(path: str | os.PathLike) -> tuple[Path, dict | None]:
    p = Path(path)
    if p.is_dir():  # a PEFT save_pretrained folder, or SWIFT's checkpoint folder holding one as default/
        if not (p / "adapter_config.json").is_file() and (p / "default" / "adapter_config.json").is_file():
            p = p / "default"
        cfg = p / "adapter_config.json"
        found = [p / f"adapter_model{s}" for s in (".safetensors", ".bin") if (p / f"adapter_model{s}").is_file()]
        if not found:
            raise FileNotFoundError(f"LoRA folder {path} has no adapter_model.safetensors (nor adapter_model.bin)")
        return found[0], (json.loads(cfg.read_text()) if cfg.is_file() else None)
    if not p.is_file():
        raise FileNotFoundError(f"LoRA file {p} does not exist")
    cfg = p.with_name("adapter_config.json")
    return p, (json.loads(cfg.read_text()) if cfg.is_file() else None)


def _load_tensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, or of a pickle read with `torch.load(weights_only=True)`
    (MotionLoRA .ckpt, SWIFT adapter_model.bin): tensors and plain containers only, never code."""
    if p.suffix in _PICKLE_SUFFIXES:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (an UnpicklingError means the file needs code: refused)
            raise ValueError(f"LoRA file {p} is a pickle ({p.suffix}) that cannot be read without unpickling code "
                             f"({type(e).__name__}); only tensors are loaded from pickles, convert it to "
                             ".safetensors") from e
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise ValueError(f"LoRA file {p} (a pickle) holds a {type(sd).__name__}, expected a dict of tensors")
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, {}
    try:
        tensors = load_file(str(p))
        with safe_open(str(p), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"LoRA file {p} is not a readable safetensors file: {e}") from e
    return tensors, metadata


_LEGACY_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")


def _split(key: str) -> tuple[str, str, frozenset[str]] | None:
    """(key without its LoRA tail, role, formats writing that tail), or None for no LoRA A/B/alpha key."""
    for pattern, role, formats in _ROLES:
        m = re.search(pattern, key)
        if m:
            body = key[:m.start()]
            # `attn1.processor.to_q_lora.down` and `to_out_lora` name the layers `attn1.to_q` and `attn1.to_out.0`
            legacy = _LEGACY_PROCESSOR.search(body)
            if legacy is not None:
                layer = legacy.group(1)
                body = body[:legacy.start()] + "." + (layer + ".0" if layer == "to_out" else layer)
            return body, role, formats
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


def _try_alias(alias: Callable[[str], str | None], name: str) -> str | None:
    try:
        return alias(name)
    except (ValueError, KeyError):
        return None


def _as_namings(naming: Namings | None) -> dict[str, LoRANaming]:
    if naming is None:
        return {}
    return {_SINGLE: naming} if isinstance(naming, LoRANaming) else dict(naming)


def read_lora(path: str | os.PathLike, naming: Namings | None = None) -> LoRAFile:
    """Parse a LoRA file without touching any model. Raises ValueError on a corrupt or foreign file, or one
    holding NaN/inf values.

    `naming` (one LoRANaming, or one per component) adds its prefixes to the generic ones, records which
    component reads which prefix, and sets aside (`skipped`) the keys under prefixes none of them claims."""
    p, peft_cfg = _resolve_path(path)
    tensors, metadata = _load_tensors(p)
    if not tensors:
        raise ValueError(f"LoRA file {p} holds no tensors")
    bad = _non_finite(tensors)
    if bad:
        t = tensors[bad[0]].float()
        raise ValueError(f"LoRA file {p} holds NaN or inf values in {len(bad)} of its {len(tensors)} tensors, first "
                         f"{bad[0]!r} ({int(t.isnan().sum())} NaN, {int(t.isinf().sum())} inf of {t.numel()}); "
                         "applied it would turn the output black. Re-export it from a checkpoint saved before the "
                         "training diverged, or retrain (lower learning rate; bf16 rather than fp16)")
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
    for n in namings.values():
        converted = n.convert(tensors) if n.convert is not None else None
        if converted is not None:
            tensors = converted
            break
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
    lf.components = {n.prefixes[fmt]: c for c, n in namings.items() if fmt in n.prefixes}
    if fmt == "peft" and _PEFT_PREFIX not in lf.components and len(namings) == 1:
        lf.components[_PEFT_PREFIX] = next(iter(namings))  # PEFT's wrapper prefix is nobody's naming choice
    claimed = {(f, pre) for n in namings.values() for f, pre in n.prefixes.items()}
    claimed |= {(fmt, pre) for pre in lf.components}
    known = sorted({pre for _, pre, _ in candidates if pre}, key=len, reverse=True)
    for key, t in tensors.items():
        c = classified.get(key)
        if namings:
            # "" is no prefix at all: a key there cannot be put down to another component, so it stays an error
            if c is not None:
                unclaimed = bool(c[1]) and (c[0], c[1]) not in claimed
                prefix = c[1]
            else:
                prefix = next((pre for pre in known if key.startswith(pre)), "")
                unclaimed = bool(prefix) and all(pre != prefix for _, pre in claimed)
            if unclaimed:
                lf.skipped.setdefault(prefix, []).append(key)
                if c is not None and c[0] != fmt:
                    lf.foreign[key] = c[0]
                continue
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
                alias = namings[c].alias if c in namings else None
                if alias is not None:  # the other naming's underscored form, where it does not collide
                    for n in names:
                        other = _try_alias(alias, n)
                        if other is not None:
                            underscore[c].setdefault(other.replace(".", "_"), n)
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
        if rank == 0:
            problems.append(f"module {shown!r} has rank 0 (A {tuple(a.shape)}): an empty LoRA, re-export the file")
            continue
        alpha = e["alpha"]
        assert alpha is None or isinstance(alpha, float)
        scale = _file_scale(lf, prefix, stem, rank, alpha)
        if not math.isfinite(scale):  # the tensors are checked by read_lora; a config's lora_alpha is not
            problems.append(f"module {shown!r} gets a non-finite scale {scale} from the file's LoRA config "
                            "(lora_alpha / alpha_pattern); fix adapter_config.json or lora_adapter_metadata")
            continue
        plan[(c, name)] = _Planned(a2.float(), b2.float(), scale)
    return plan, problems


def load_lora(model_or_components: nn.Module | Mapping[str, nn.Module],
              paths: str | os.PathLike | Sequence[str | os.PathLike], strength: float | Sequence[float] = 1.0, *,
              naming: Namings | None = None, key_map: KeyMap | None = None,
              backbone: str | Sequence[str] | None = None) -> list[str]:
    """Apply one or more LoRA files to a model, or to several components ({name: module} with
    naming={name: LoRANaming}), each file with its own strength.

    Layers that have no LoRA yet get it injected; layers that have it get the file's weights. When the
    components already carry LoRA, the files must cover exactly those layers. Several files are combined
    per layer by concatenating their ranks (scales folded into B), so they run as one LoRA.
    Everything is validated before any module is touched; a file that does not fit raises ValueError
    listing missing, unexpected and mis-shaped keys. Keys under a prefix no component claims (a kohya file's
    `lora_te_` keys for a denoiser alone) are left out with one warning per file; `read_lora(path,
    naming).skipped` lists them. A file where nothing fits raises. Returns the adapted module names
    ("<component>:<name>" for a dict of components).
    """
    path_list = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    strengths = [float(strength)] * len(path_list) if isinstance(strength, (int, float)) else list(strength)
    if len(strengths) != len(path_list):
        raise ValueError(f"got {len(path_list)} LoRA files but {len(strengths)} strengths")
    components, namings, single = _resolve(model_or_components, naming, key_map)
    what = type(components[_SINGLE]).__name__ if single else f"components {sorted(components)}"
    backbone = backbone or _backbone_of(components) or None
    accepted = (backbone,) if isinstance(backbone, str) else tuple(backbone or ())
    existing = {(c, n) for c, comp in components.items() for n in lora_layers(comp)}
    if any(m.lora_merged for comp in components.values() for m in lora_layers(comp).values()):
        raise ValueError("the model has merged LoRA layers; unmerge_lora(model) before loading another LoRA")
    plans: list[tuple[dict[tuple[str, str], _Planned], float]] = []
    for p, s in zip(path_list, strengths):
        lf = read_lora(p, namings)
        made_for = lf.metadata.get("backbone")
        if made_for and accepted and made_for not in accepted:
            raise ValueError(f"LoRA file {lf.path} was made for backbone {made_for!r}, not "
                             f"{' or '.join(map(repr, accepted))}")
        plan, problems = _plan(components, namings, lf)
        missing = sorted(existing - set(plan))
        problems += [f"missing module {_shown(c, n)!r} (the model has LoRA there, the file does not)"
                     for c, n in missing]
        if problems:
            shown = "\n  ".join(problems[:12])
            more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
            skipped = (f"\n  (left out, no component reads their prefix: {lf.skipped_summary()})"
                       if lf.skipped else "")
            raise ValueError(f"LoRA file {lf.path} ({lf.format} format) does not fit {what}:\n  {shown}{more}"
                             f"{skipped}")
        if not plan:
            readers = sorted({f"{f} {pre!r}" for n in namings.values() for f, pre in n.prefixes.items()})
            raise ValueError(f"nothing in LoRA file {lf.path} fits {what}: all its keys are under prefixes no "
                             f"component reads ({lf.skipped_summary() or 'none'}); the model reads "
                             f"{', '.join(readers)}. Is it a LoRA for another model?")
        if lf.skipped:
            log.warning("LoRA file %s: applying %d modules, leaving out keys no component of %s reads: %s",
                        lf.path, len(plan), what, lf.skipped_summary())
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
