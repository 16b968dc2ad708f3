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


@dataclass
class ModelConfig:
    backbone: str = "wan_ti2v"
    preset: str = "tiny"
    ckpt_dir: str | None = None          # official checkpoint folder; None = random weights (tiny only)
    dtype: str = "auto"                  # base weights: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    attention: Literal["auto", "sdpa", "xformers"] = "auto"


@dataclass
class LoRAConfig:
    targets: list[str] | None = None     # None = the backbone's defaults
    exclude: list[str] | None = None
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    init_from: str | None = None         # start from an existing LoRA file
    save_format: Literal["comfyui", "native", "diffusers", "kohya"] = "comfyui"


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


@dataclass
class TrainConfig:
    output: str = "runs/wan_ti2v_tiny"
    max_steps: int = 30
    batch_size: int = 1                  # per data-parallel rank
    grad_accum: int = 1
    seed: int = 0
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool | None = None                  # None = the preset's default
    offload_activations: bool = False
    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    shift: float = 5.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    ti2v_prob: float = 0.2               # probability that a sample is conditioned on its clean first frame
    skip_nonfinite: bool = False
    log_every: int = 1
    ckpt_every: int = 0                  # 0 = only at the end / on interrupt
    keep_last: int = 2
    cache_dir: str | None = None         # default: <output>/cache
    num_workers: int = 0


@dataclass
class ParallelConfig:
    mode: Literal["ddp", "fsdp"] = "ddp"
    ulysses: int = 1


@dataclass
class ValidationConfig:
    every: int = 0                       # 0 = no validation samples
    prompts: list[str] = field(default_factory=list)
    image: str | None = None
    frames: int = 17
    height: int = 64
    width: int = 64
    steps: int = 10
    guidance: float = 5.0
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


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
