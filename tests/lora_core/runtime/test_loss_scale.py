"""Dynamic fp16 loss scaling: the scale multiplies the loss and divides the gradients back, an overflow skips
the step and halves the scale, clean steps double it after the growth interval, and the state round-trips."""
from __future__ import annotations

import math

import pytest
import torch

from lora_core.runtime.loss_scale import LossScaler


def test_scale_unscale_round_trip_and_disabled_is_identity() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    s = LossScaler(True, init_scale=1024.0)
    loss = (w * torch.tensor([3.0, 4.0])).sum()
    s.scale(loss).backward()
    assert torch.equal(w.grad, torch.tensor([3072.0, 4096.0]))
    s.unscale_([w])
    assert torch.equal(w.grad, torch.tensor([3.0, 4.0]))
    off = LossScaler(False)
    assert off.scale(loss) is loss and off.update(float("inf"))


def test_overflow_skips_and_backs_off_clean_steps_grow() -> None:
    s = LossScaler(True, init_scale=2.0 ** 10, growth_interval=3)
    assert not s.update(float("inf")) and s.scale_value == 2.0 ** 9
    assert not s.update(float("nan")) and s.scale_value == 2.0 ** 8
    assert s.update(1.0) and s.update(2.0) and s.scale_value == 2.0 ** 8
    assert s.update(3.0) and s.scale_value == 2.0 ** 9 and s.clean_steps == 0
    t = LossScaler(True)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()


def test_fp16_gradients_that_underflow_unscaled_survive_scaling() -> None:
    """Why the scaler exists: an fp32 (LoRA) weight behind an fp16 computation whose gradient is below fp16's
    smallest subnormal gets zero without scaling, and its true value with it."""
    x = torch.full((4,), 1e-4, dtype=torch.float16)
    w = torch.nn.Parameter(torch.ones(4))
    (((w.half() * x).sum() * 1e-4).float()).backward()
    assert torch.all(w.grad == 0)
    w.grad = None
    s = LossScaler(True, init_scale=2.0 ** 12)
    s.scale(((w.half() * x).sum() * 1e-4).float()).backward()
    s.unscale_([w])
    assert torch.all(w.grad > 0) and math.isclose(float(w.grad[0]), 1e-8, rel_tol=0.05)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="growth_factor"):
        LossScaler(True, growth_factor=1.0)
