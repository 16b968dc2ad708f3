"""Optimizers (AdamW, 8-bit AdamW from bitsandbytes) and the learning-rate schedule."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
                    cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or 8-bit AdamW over parameters, or over parameter groups ({"params": [...], "lr": ..., ...}: one
    per trained component, each with its own learning rate)."""
    items = list(params)
    if items and isinstance(items[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": [p for p in items if p.requires_grad]}]
        groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: did LoRA injection match any module?")
    params = groups  # type: ignore[assignment]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ValueError("optim.name=adamw8bit needs bitsandbytes (pip install 'bitsandbytes>=0.50'; "
                         "0.50 and newer also run on CPU), or use optim.name=adamw") from e
    return bnb.optim.AdamW8bit(params, **kwargs)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warm-up, then constant or cosine."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int,
                    last_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over optimizer steps; `last_step` > 0 positions it for a resumed run."""
    for group in optimizer.param_groups:
        # a group's own base rate (per-component learning rates), kept in the group so a resume restores it
        group.setdefault("initial_lr", group.get("base_lr", cfg.lr))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, max_steps),
                                             last_epoch=last_step - 1)
