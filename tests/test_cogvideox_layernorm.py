"""CogVideoX's fp32-statistics LayerNorm: lean saving for backward, same numbers as the plain expression."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backbones.cogvideox.transformer import LayerNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm_saves_input_dtype_and_matches_plain_autograd_bitwise(dtype):
    g = torch.Generator().manual_seed(0)
    norm = LayerNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64, generator=g))
        norm.bias.copy_(0.1 * torch.randn(64, generator=g))
    x = (3 * torch.randn(4, 10, 64, generator=g)).to(dtype).requires_grad_()
    gy = torch.randn(4, 10, 64, generator=g).to(dtype)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = norm(x)
    full = [t for t in saved if t.shape == x.shape]
    assert len(full) == 1 and full[0].dtype == dtype        # the input itself, not an fp32 copy
    y.backward(gy)

    x2 = x.detach().clone().requires_grad_()
    w2, b2 = norm.weight.detach().clone().requires_grad_(), norm.bias.detach().clone().requires_grad_()
    y2 = F.layer_norm(x2.float(), (64,), w2, b2, 1e-6).to(dtype)
    y2.backward(gy)
    assert torch.equal(y, y2)
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(norm.weight.grad, w2.grad) and torch.equal(norm.bias.grad, b2.grad)
