"""Typed training configuration: dataclasses hold the schema, YAML the values, `a.b=value` overrides on top.

Unknown keys and wrong types raise ValueError naming the key, so a typo never trains silently with a
default. The resolved config is written into every run folder and checkpoint.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..data import DataConfig


def _bad(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"config key {key!r} = {value!r} is invalid: expected {expected}")


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


@dataclass
class ModelConfig:
    backbone: str = ""                    # "" = the registry's default backbone
    preset: str = "tiny"
    # official checkpoint folder; None = the preset's shipped folder if it has one (wan_ti2v tiny), else random
    # weights (random presets only)
    ckpt_dir: str | None = None
    sources: dict[str, str] = field(default_factory=dict)   # further named weight sources the backbone declares
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"   # base weights: auto = bf16 on GPU, fp32 on CPU
    attention: Literal["auto", "sdpa", "xformers"] = "auto"


@dataclass
class LoRAConfig:
    """LoRA settings of the backbone's primary trained component (and defaults of the others)."""

    targets: str | list[str] | None = None   # None = the backbone's defaults; a string is a regex (PEFT rules)
    exclude: str | list[str] | None = None
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)     # module pattern -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module pattern -> alpha
    init_from: str | None = None         # start from an existing LoRA file
    save_format: Literal["comfyui", "native", "diffusers", "kohya"] = "comfyui"
    save_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"   # the final file (checkpoints keep fp32 masters)

    def validate(self) -> None:
        if self.rank <= 0:
            raise _bad("lora.rank", self.rank, "a positive integer, e.g. 16 or 32")
        if not (self.alpha > 0 and _finite(self.alpha)):
            raise _bad("lora.alpha", self.alpha, "a positive number, e.g. the rank")
        if not 0.0 <= self.dropout < 1.0:
            raise _bad("lora.dropout", self.dropout, "a probability in [0, 1), e.g. 0.05")
        for k, v in self.rank_pattern.items():
            if v <= 0:
                raise _bad(f"lora.rank_pattern.{k}", v, "a positive integer")
        for k, v in self.alpha_pattern.items():
            if not (v > 0 and _finite(v)):
                raise _bad(f"lora.alpha_pattern.{k}", v, "a positive number")


@dataclass
class ComponentConfig:
    """How one component trains; unset values fall back to the `lora` section and the backbone's defaults."""

    mode: Literal["lora", "full", "frozen"] | None = None
    targets: str | list[str] | None = None
    exclude: str | list[str] | None = None
    rank: int | None = None
    alpha: float | None = None
    lr: float | None = None              # learning rate of this component's parameters (default optim.lr)
    full_patterns: list[str] | None = None   # "full" mode: regexes of the parameter names trained

    def validate(self) -> None:
        if self.rank is not None and self.rank <= 0:
            raise _bad("components.*.rank", self.rank, "a positive integer")
        if self.alpha is not None and not (self.alpha > 0 and _finite(self.alpha)):
            raise _bad("components.*.alpha", self.alpha, "a positive number")
        if self.lr is not None and not (self.lr >= 0 and _finite(self.lr)):
            raise _bad("components.*.lr", self.lr, "a learning rate >= 0, e.g. 1e-4")


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0               # 0 disables clipping
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0            # cosine floor, as a fraction of lr

    def validate(self) -> None:
        if not (self.lr >= 0 and _finite(self.lr)):
            raise _bad("optim.lr", self.lr, "a learning rate >= 0, e.g. 1e-4")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise _bad("optim.betas", self.betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
        if not (self.eps > 0 and _finite(self.eps)):
            raise _bad("optim.eps", self.eps, "a small positive number, e.g. 1e-8")
        if not (self.weight_decay >= 0 and _finite(self.weight_decay)):
            raise _bad("optim.weight_decay", self.weight_decay, "a number >= 0, e.g. 0.01")
        if not (self.grad_clip >= 0 and _finite(self.grad_clip)):
            raise _bad("optim.grad_clip", self.grad_clip, "a norm >= 0 (0 disables clipping)")
        if self.warmup_steps < 0:
            raise _bad("optim.warmup_steps", self.warmup_steps, "an integer >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise _bad("optim.min_lr_ratio", self.min_lr_ratio, "a fraction in [0, 1]")


@dataclass
class TrainConfig:
    output: str = ""                     # "" = runs/<backbone>_<preset>
    max_steps: int = 30
    batch_size: int = 1                  # per data-parallel rank
    grad_accum: int = 1
    seed: int = 0
    mixed_precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"   # auto: bf16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool | None = None                  # None = the preset's default
    offload_activations: bool = False
    compile: bool = False                # torch.compile each repeated block (after checkpointing, before FSDP)
    skip_nonfinite: bool = False
    log_every: int = 1
    ckpt_every: int = 0                  # 0 = only at the end / on interrupt
    keep_last: int = 2
    cache_dir: str | None = None         # default: <output>/cache
    prefetch: int = 2                    # micro-batches read ahead from the cache by a background thread (0: none)

    def validate(self) -> None:
        for name, lo in (("max_steps", 1), ("batch_size", 1), ("grad_accum", 1), ("log_every", 0),
                         ("ckpt_every", 0), ("keep_last", 0), ("prefetch", 0)):
            v = getattr(self, name)
            if v < lo:
                raise _bad(f"train.{name}", v, f"an integer >= {lo}")


@dataclass
class ParallelConfig:
    mode: Literal["ddp", "fsdp"] = "ddp"
    ulysses: int = 1

    def validate(self) -> None:
        if self.ulysses < 1:
            raise _bad("parallel.ulysses", self.ulysses, "an integer >= 1")


@dataclass
class ValidationConfig:
    every: int = 0                       # 0 = no validation samples
    # a list; a prompt holding ":::" is split there (the CogVideoX scripts' --validation_prompt "a ::: b")
    prompts: list[str] = field(default_factory=list)
    videos_per_prompt: int = 1           # samples per prompt, seeds seed, seed + 1, ...
    images: dict[str, str] = field(default_factory=dict)   # named input images the backbone declares
    frames: int = 17
    height: int = 64
    width: int = 64
    steps: int = 10
    guidance: float | None = None        # None = the backbone's default
    seed: int = 0
    extras: dict[str, Any] = field(default_factory=dict)   # backbone sampling options (e.g. shift)
    # after the last step, sample every prompt next to the LoRA: OUTPUT/after.mp4 (after_1.mp4, ...)
    at_end: bool = False
    # with at_end (alone it does nothing), also without the LoRA (same prompt and seed): OUTPUT/before.mp4 and
    # the contact sheet OUTPUT/before_after.png (a row of frames of each)
    compare_base: bool = False

    def validate(self) -> None:
        if any(":::" in p for p in self.prompts):
            self.prompts = [q.strip() for p in self.prompts for q in p.split(":::") if q.strip()]
        for name, lo in (("every", 0), ("frames", 1), ("height", 1), ("width", 1), ("steps", 1),
                         ("videos_per_prompt", 1)):
            v = getattr(self, name)
            if v < lo:
                raise _bad(f"validation.{name}", v, f"an integer >= {lo}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    components: dict[str, ComponentConfig] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    objective: Any = None                # the backbone's objective section (a dataclass once resolved)


SECTIONS = ("model", "lora", "components", "data", "optim", "train", "parallel", "validation", "objective")


# ---------------------------------------------------------------------------------------- checking
def _check(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to type `tp`, or raise ValueError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"config key {key!r} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            if origin is list and args and args[0] is str and isinstance(value, str):
                return [value]  # a single target is a list of one
            raise ValueError(f"config key {key!r} expects a list, got {value!r}")
        return [_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} expects a mapping, got {value!r}")
        return {str(k): _check(v, args[1], f"{key}.{k}") for k, v in value.items()} if args else dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} expects a section (mapping), got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r} expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"config key {key!r} expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"config key {key!r} expects a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"config key {key!r}: cannot use {value!r} as {tp}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ValueError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {k: _check(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_path(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ValueError(f"config key {dotted!r}: {p!r} is not a section")
    d[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    if ":::" in raw and not raw.lstrip().startswith(("[", "{", "'", '"')):
        return key.strip(), raw.strip()  # "prompt one ::: prompt two" (CogVideoX's --validation_prompt), not YAML
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and raw.strip().lower() in ("none", "null"):
        value = None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """defaults <- base dict <- YAML file <- overrides; everything type-checked."""
    data: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {p} must hold a mapping of sections, got {type(loaded).__name__}")
        for section, values in loaded.items():
            if isinstance(values, dict):
                for k, v in values.items():
                    _set_path(data, f"{section}.{k}", v)
            else:
                data[section] = values
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(data, key, value)
    return from_dict(Config, data)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
