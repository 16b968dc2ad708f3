"""The Triton LoRA linear (forward and backward kernels) against the eager formula, run on the CPU under
Triton's interpreter. TRITON_INTERPRET must be set before triton is first imported, so each case runs in a
fresh subprocess; without triton the module is skipped."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")]

ROOT = Path(__file__).resolve().parents[2]

_CHILD = r"""
import json, sys
import torch
from lora_core.kernels import triton_lora as tl_lora

cases = json.loads(sys.argv[1])
worst = {}
for m, d_in, d_out, r, bias, train_w, lead in cases:
    g = torch.Generator().manual_seed(m + d_in + r)
    x = torch.randn(*lead, m // lead[0], d_in, generator=g) if lead else torch.randn(m, d_in, generator=g)
    w = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).requires_grad_(train_w)
    b = torch.randn(d_out, generator=g).requires_grad_() if bias else None
    a = (torch.randn(r, d_in, generator=g) / d_in ** 0.5).requires_grad_()
    bm = torch.randn(d_out, r, generator=g).requires_grad_()
    x.requires_grad_()
    scale = 0.75
    leaves = {"x": x, "weight": w, "bias": b, "lora_A": a, "lora_B": bm}
    names = [k for k, t in leaves.items() if t is not None and t.requires_grad]
    y = tl_lora.triton_lora_linear(x, w, b, a, bm, scale)
    dy = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(y, [leaves[k] for k in names], dy)
    # the eager formula in float64
    l64 = {k: None if t is None else t.detach().double().requires_grad_(t.requires_grad) for k, t in leaves.items()}
    y64 = l64["x"] @ l64["weight"].t() + scale * (l64["x"] @ l64["lora_A"].t()) @ l64["lora_B"].t()
    if bias:
        y64 = y64 + l64["bias"]
    want = torch.autograd.grad(y64, [l64[k] for k in names], dy.double())
    key = f"M={m} I={d_in} O={d_out} r={r} bias={bias} train_w={train_w} lead={lead}"
    errs = {"y": ((y.double() - y64).abs().max() / y64.abs().max()).item()}
    assert y.shape == y64.shape and y.dtype == torch.float32
    for k, gt, wt in zip(names, got, want):
        assert gt.shape == wt.shape and gt.dtype == leaves[k].dtype, (k, gt.shape, gt.dtype)
        errs["d" + k] = ((gt.double() - wt).abs().max() / wt.abs().max()).item()
    worst[key] = errs
assert not tl_lora.available() or torch.cuda.is_available()
print("RESULT " + json.dumps(worst))
"""

# (M, in, out, rank, bias, base weight trains, leading dims)
CASES = [
    (64, 32, 48, 4, True, False, []),
    (64, 64, 32, 8, False, True, []),
    (64, 48, 64, 5, True, True, [2]),      # ragged sizes: masked tiles; x [2, 32, 48]
]


def _run(cases: list) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-6000:]}"
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_triton_lora_forward_and_grads_match_eager_under_interpreter() -> None:
    """Forward and every gradient (x, A, B, bias, W when it trains) within 1e-4 relative of the float64
    formula y = x W^T + b + s (x A^T) B^T, for M = 64, d = 32..64, r = 4..8 (incl. ragged tiles)."""
    worst = _run(CASES)
    assert len(worst) == len(CASES)
    for case, errs in worst.items():
        for name, err in errs.items():
            assert err <= 1e-4, f"{case}: {name} relative error {err:.2e}"


def test_available_is_false_without_cuda() -> None:
    import torch

    from lora_core.kernels import triton_lora
    if not torch.cuda.is_available():
        assert triton_lora.available() is False
