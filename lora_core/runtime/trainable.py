"""What trains: each component's mode (LoRA, full by parameter pattern, frozen) resolved from the config and
the backbone's declaration, applied to the built modules, and the trained tensors saved and restored by name.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..inject import inject_lora, lora_layers

MODES = ("lora", "full", "frozen")


@dataclass(frozen=True)
class TrainPlan:
    """How one component trains, every value resolved."""

    name: str
    mode: str
    targets: Any = None
    exclude: Any = None
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] | None = None
    alpha_pattern: Mapping[str, float] | None = None
    lr: float | None = None
    full_patterns: tuple[str, ...] = ()


def plan_training(cfg: Any, components: Mapping[str, Any]) -> dict[str, TrainPlan]:
    """One plan per in-training component (`components`: the backbone's declarations). The `lora` section holds
    the primary component's LoRA (the first that trains with LoRA by default) and every component's defaults;
    `components.<name>.*` overrides per component. Raises ValueError naming the key on a bad mode or name."""
    unknown = sorted(set(cfg.components) - set(components))
    if unknown:
        raise ValueError(f"components.{unknown[0]}: the backbone has no component {unknown[0]!r}; its components "
                         f"are {', '.join(components)}")
    primary = next((n for n, c in components.items() if c.in_training and "lora" in c.modes), None)
    plans: dict[str, TrainPlan] = {}
    for name, comp in components.items():
        over = cfg.components.get(name)
        mode = (over.mode if over is not None and over.mode else None) or comp.default_mode
        if mode not in comp.modes:
            raise ValueError(f"components.{name}.mode={mode!r}: component {name!r} can be trained as "
                             f"{' | '.join(comp.modes)}")
        if not comp.in_training and mode == "frozen":
            continue  # an encoder that only fills the cache
        lora = cfg.lora
        targets = (over.targets if over is not None and over.targets else None)
        if targets is None:
            targets = lora.targets if (name == primary and lora.targets) else (
                comp.lora_targets if isinstance(comp.lora_targets, str) else list(comp.lora_targets))
        plans[name] = TrainPlan(
            name=name, mode=mode, targets=targets,
            exclude=(over.exclude if over is not None and over.exclude else None) or (
                lora.exclude if name == primary else None),
            rank=(over.rank if over is not None and over.rank else None) or lora.rank,
            alpha=(over.alpha if over is not None and over.alpha else None) or lora.alpha,
            dropout=lora.dropout, use_rslora=lora.use_rslora,
            rank_pattern=lora.rank_pattern if name == primary else None,
            alpha_pattern=lora.alpha_pattern if name == primary else None,
            lr=over.lr if over is not None else None,
            full_patterns=tuple((over.full_patterns if over is not None and over.full_patterns else None)
                                or comp.full_patterns))
    if not any(p.mode != "frozen" for p in plans.values()):
        raise ValueError("every component is frozen: nothing would train; set components.<name>.mode=lora")
    return plans


def apply_plan(module: nn.Module, plan: TrainPlan) -> list[str]:
    """Make `module` train as planned; returns the adapted module names (LoRA) or trained parameter names."""
    if plan.mode == "lora":
        return inject_lora(module, plan.targets, plan.rank, plan.alpha, dropout=plan.dropout, exclude=plan.exclude,
                           rank_pattern=plan.rank_pattern, alpha_pattern=plan.alpha_pattern,
                           use_rslora=plan.use_rslora)
    trained: list[str] = []
    for pname, p in module.named_parameters():
        on = plan.mode == "full" and (not plan.full_patterns
                                      or any(re.fullmatch(pat, pname) for pat in plan.full_patterns))
        p.requires_grad_(on)
        if on:
            trained.append(pname)
    if plan.mode == "full" and not trained:
        raise ValueError(f"components.{plan.name}.full_patterns {list(plan.full_patterns)} match no parameter of "
                         f"{type(module).__name__}; names look like {next(iter(dict(module.named_parameters())))}")
    return trained


def trainable_parameters(models: Mapping[str, nn.Module], names: list[str] | None = None) -> dict[str, nn.Parameter]:
    """'<component>/<parameter name>' -> every parameter that trains, in model order. Inside an FSDP2 gather the
    full copies do not require grad: pass the `names` taken before it."""
    if names is None:
        return {f"{c}/{n}": p for c, m in models.items() for n, p in m.named_parameters() if p.requires_grad}
    params = {f"{c}/{n}": p for c, m in models.items() for n, p in m.named_parameters()}
    return {k: params[k] for k in names}


def param_groups(models: Mapping[str, nn.Module], plans: Mapping[str, TrainPlan], lr: float) -> list[dict]:
    groups = []
    for c, m in models.items():
        params = [p for p in m.parameters() if p.requires_grad]
        if params:
            group_lr = plans[c].lr if plans[c].lr is not None else lr
            groups.append({"params": params, "lr": group_lr, "base_lr": group_lr, "name": c})
    return groups


def trainable_state(models: Mapping[str, nn.Module], names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The trained tensors by name (full tensors: call inside `full_trainable` under FSDP2), plus each LoRA
    layer's scale so a checkpoint says what the tensors mean."""
    sd = {k: p.detach().cpu().clone() for k, p in trainable_parameters(models, names).items()}
    for c, m in models.items():
        for n, layer in lora_layers(m).items():
            sd[f"{c}/{n}.lora_scale"] = torch.tensor(float(layer.lora_scale))
    return sd


@torch.no_grad()
def load_trainable_state(models: Mapping[str, nn.Module], sd: Mapping[str, torch.Tensor], source: str,
                         names: list[str] | None = None) -> None:
    """Inverse of `trainable_state`; ValueError naming `source` and the first differing keys before any copy."""
    params = trainable_parameters(models, names)
    scales = {f"{c}/{n}.lora_scale": float(layer.lora_scale) for c, m in models.items()
              for n, layer in lora_layers(m).items()}
    missing = [k for k in params if k not in sd]
    unexpected = [k for k in sd if k not in params and k not in scales]
    shaped = [f"{k}: checkpoint {tuple(sd[k].shape)} vs run {tuple(p.shape)}" for k, p in params.items()
              if k in sd and tuple(sd[k].shape) != tuple(p.shape)]
    if missing or unexpected or shaped:
        parts = [f"{len(v)} {what} (first: {', '.join(v[:3])})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)) if v]
        raise ValueError(f"checkpoint {source} does not fit this run's trained parameters: {'; '.join(parts)}. "
                         "Resume with the LoRA rank, targets and component modes the run started with")
    changed = [f"{k[:-len('.lora_scale')]}: checkpoint {float(sd[k]):g}, run {v:g}" for k, v in scales.items()
               if k in sd and abs(float(sd[k]) - v) > 1e-6 * abs(v)]
    if changed:
        raise ValueError(f"checkpoint {source} was trained with another LoRA scale (alpha / rank): "
                         f"{len(changed)} layers differ (first: {changed[0]}); resume with the lora.alpha and "
                         "lora.use_rslora the run started with")
    for k, p in params.items():
        p.copy_(sd[k].to(p.dtype))
