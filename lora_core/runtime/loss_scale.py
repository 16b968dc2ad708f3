"""Dynamic loss scaling for fp16 autocast: the loss is multiplied by a scale S before backward so small
gradients survive fp16's range, the gradients are divided by S before clipping and the optimizer step, and a
step whose gradients overflowed is skipped while S halves; S doubles after `growth_interval` clean steps.

Written here rather than taken from `torch.amp.GradScaler` for two reasons: under FSDP2 an overflow found on one
rank's shard must skip the step on every rank (the decision below uses the global gradient norm, which
`clip_grad_norm` already all-reduces, so every rank decides alike), and the state is two numbers that go into
the checkpoint's JSON state, so a resumed fp16 run continues with the same scale. bf16 and fp32 need no scaling
(`enabled=False` makes every method a no-op).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


class LossScaler:
    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000) -> None:
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1):
            raise ValueError(f"loss scaler: init_scale={init_scale} > 0, growth_factor={growth_factor} > 1, "
                             f"0 < backoff_factor={backoff_factor} < 1 and growth_interval={growth_interval} >= 1 "
                             "are required")
        self.enabled = enabled
        self.scale_value = float(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.clean_steps = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Divide every gradient by the scale (in place; fp32 LoRA gradients, so no precision is lost)."""
        if not self.enabled:
            return
        inv = 1.0 / self.scale_value
        for p in params:
            if p.grad is not None:
                p.grad.mul_(inv)

    def update(self, grad_norm: float) -> bool:
        """After unscale_ and the (global) gradient norm: True when the step may be taken. A non-finite norm
        is an overflow: the scale backs off and the caller skips the step."""
        if not self.enabled:
            return True
        if not math.isfinite(grad_norm):
            self.scale_value *= self.backoff_factor
            self.clean_steps = 0
            return False
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale_value *= self.growth_factor
            self.clean_steps = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale_value, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale_value = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
