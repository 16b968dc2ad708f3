"""Helpers for parity tests against reference implementations: one randomisation for every model, so a swapped
or mis-shaped key cannot hide behind zero- or one-initialised weights, and one error measure."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random values for every parameter: matrices scaled by fan-in, norm weights near 1 (so they stay norms),
    biases and the other vectors small; deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model
