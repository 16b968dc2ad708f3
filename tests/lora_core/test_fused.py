"""The fused LoRA linear against the reference math y = x W^T + b + scale * dropout(x) A^T B^T."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from lora_core import fused
from lora_core.layers import LoRALinear

D_IN, D_OUT, RANK, SCALE = 48, 40, 6, 0.75


def _params(dtype: torch.dtype = torch.float32, w_dtype: torch.dtype | None = None, bias: bool = True,
            train_w: bool = False, train_b: bool = True, seed: int = 0) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(D_OUT, D_IN, generator=g) / D_IN ** 0.5).to(w_dtype or dtype).requires_grad_(train_w)
    b = torch.randn(D_OUT, generator=g).to(w_dtype or dtype).requires_grad_(train_b) if bias else None
    a = (torch.randn(RANK, D_IN, generator=g) / D_IN ** 0.5).to(dtype).requires_grad_()
    bm = torch.randn(D_OUT, RANK, generator=g).to(dtype).requires_grad_()
    return {"weight": w, "bias": b, "lora_A": a, "lora_B": bm}


def _reference(x: torch.Tensor, p: dict, scale: float, mask: torch.Tensor | None = None,
               keep: float = 1.0) -> torch.Tensor:
    """The math in float64."""
    x64 = x.double()
    xd = x64 if mask is None else x64 * mask.double() * keep
    y = x64 @ p["weight"].double().t() + scale * (xd @ p["lora_A"].double().t()) @ p["lora_B"].double().t()
    return y if p["bias"] is None else y + p["bias"].double()


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5, msg: str = "") -> None:
    """Within tol of the float64 reference, relative to the tensor's scale (fp32 GEMMs accumulate
    rounding in proportion to the largest terms, so tiny entries that come from cancellation get the
    tensor's absolute tolerance)."""
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * want.abs().max().item(), msg=msg)


def _grads(out: torch.Tensor, tensors: dict[str, torch.Tensor | None], dy: torch.Tensor) -> dict:
    names = [k for k, t in tensors.items() if t is not None and t.requires_grad]
    gs = torch.autograd.grad(out, [tensors[k] for k in names], dy)
    return dict(zip(names, gs))


def _leaf64(p: dict) -> dict:
    return {k: None if t is None else t.detach().double().requires_grad_(t.requires_grad) for k, t in p.items()}


@pytest.mark.parametrize("shape", [(37, D_IN), (2, 19, D_IN), (2, 3, 5, D_IN)])
@pytest.mark.parametrize("train_w,bias", [(False, True), (True, True), (False, False)])
def test_fp32_values_and_grads(shape: tuple[int, ...], train_w: bool, bias: bool) -> None:
    torch.manual_seed(1)
    p = _params(train_w=train_w, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    y = fused.lora_linear(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"], SCALE)
    dy = torch.randn_like(y)
    got = _grads(y, {"x": x, **p}, dy)

    p64, x64 = _leaf64(p), x.detach().double().requires_grad_()
    y64 = _reference(x64, p64, SCALE)
    want = _grads(y64, {"x": x64, **p64}, dy.double())

    assert y.shape == (*shape[:-1], D_OUT) and y.dtype == torch.float32
    _close(y, y64)
    assert set(got) == set(want) and ("weight" in got) == train_w
    for k in want:
        assert got[k].dtype == torch.float32, k
        _close(got[k], want[k], msg=k)


def test_frozen_weight_gets_no_grad_and_x_without_grad() -> None:
    p = _params(train_b=False)
    x = torch.randn(3, 11, D_IN)  # no requires_grad: e.g. the first layer's input
    y = fused.lora_linear(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"], SCALE)
    y.square().sum().backward()
    assert p["weight"].grad is None and p["bias"].grad is None and x.grad is None
    p64 = _leaf64(p)
    _reference(x, p64, SCALE).square().sum().backward()
    _close(p["lora_A"].grad, p64["lora_A"].grad)
    _close(p["lora_B"].grad, p64["lora_B"].grad)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_cpu_autocast_bf16(w_dtype: torch.dtype) -> None:
    """fp32 masters, base weight fp32 or bf16, compute in bf16; error within bf16 rounding."""
    torch.manual_seed(2)
    p = _params(w_dtype=w_dtype)
    x = torch.randn(2, 64, D_IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused.lora_linear(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"], SCALE)
        # The PEFT-style eager path under the same autocast: the rounding we have to match.
        y_eager = F.linear(x, p["weight"], p["bias"]) + F.linear(F.linear(x, p["lora_A"]), p["lora_B"]) * SCALE
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    got = _grads(y, {"x": x, **p}, dy)
    eager = _grads(y_eager, {"x": x, **p}, dy)

    p64, x64 = _leaf64(p), x.detach().double().requires_grad_()
    y64 = _reference(x64, p64, SCALE)
    want = _grads(y64, {"x": x64, **p64}, dy.double())
    assert got["x"].dtype == torch.float32 and got["lora_A"].dtype == torch.float32
    assert got["lora_B"].dtype == torch.float32 and got["bias"].dtype == w_dtype

    def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b).norm() / b.norm()).item()

    # bf16 has 8 mantissa bits: relative error of a GEMM result is a few 2^-9.
    assert rel_err(y, y64) < 1e-2
    assert rel_err(y, y64) <= 1.5 * rel_err(y_eager, y64) + 1e-3
    for k in want:
        assert rel_err(got[k], want[k]) < 2e-2, k
        assert rel_err(got[k], want[k]) <= 1.5 * rel_err(eager[k], want[k]) + 1e-3, k


def test_dropout_matches_reference_with_same_mask() -> None:
    torch.manual_seed(3)
    p, drop, seed = _params(), 0.3, 1234
    x = torch.randn(4, 25, D_IN, requires_grad=True)
    y = fused.lora_linear(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"], SCALE, drop, dropout_seed=seed)
    dy = torch.randn_like(y)
    got = _grads(y, {"x": x, **p}, dy)

    mask = fused.dropout_mask(seed, (100, D_IN), drop, "cpu", torch.float32).view(x.shape)
    dropped = (mask == 0).float().mean().item()
    assert set(mask.unique().tolist()) == {0.0, 1.0} and abs(dropped - drop) < 0.03
    p64, x64 = _leaf64(p), x.detach().double().requires_grad_()
    y64 = _reference(x64, p64, SCALE, mask, 1 / (1 - drop))
    want = _grads(y64, {"x": x64, **p64}, dy.double())
    _close(y, y64)
    for k in want:  # a backward that regenerated a different mask would fail here
        _close(got[k], want[k], msg=k)

    # Dropout only touches the LoRA path: a different mask changes y, the p=0 layer differs again.
    y2 = fused.lora_linear(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"], SCALE, drop, dropout_seed=seed + 1)
    y0 = fused.lora_linear(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"], SCALE)
    assert not torch.allclose(y, y2) and not torch.allclose(y, y0)
    # A token whose inputs are all dropped gets the base output exactly, and no LoRA input gradient.
    x_tok = x.detach().clone().requires_grad_()
    y_tok = fused.lora_linear(x_tok, p["weight"], p["bias"], p["lora_A"], p["lora_B"], SCALE, 0.999,
                              dropout_seed=seed)
    all_dropped = (fused.dropout_mask(seed, (100, D_IN), 0.999, "cpu", torch.float32) == 0).all(1).view(4, 25)
    assert all_dropped.sum() > 50
    torch.testing.assert_close(y_tok[all_dropped], F.linear(x_tok, p["weight"], p["bias"])[all_dropped])
    (dx_tok,) = torch.autograd.grad(y_tok, x_tok, dy)
    torch.testing.assert_close(dx_tok[all_dropped], (dy @ p["weight"])[all_dropped])


def test_dropout_seed_follows_torch_manual_seed() -> None:
    p = _params()
    x = torch.randn(50, D_IN)
    outs = []
    for s in (7, 7, 8):
        torch.manual_seed(s)
        outs.append(fused.lora_linear(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"], SCALE, 0.5))
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


@pytest.mark.parametrize("drop", [0.0, 0.25])
def test_checkpoint_non_reentrant(drop: float) -> None:
    p = _params()
    x = torch.randn(3, 17, D_IN, requires_grad=True)
    dy = torch.randn(3, 17, D_OUT)

    def f(inp: torch.Tensor) -> torch.Tensor:
        return fused.lora_linear(inp, p["weight"], p["bias"], p["lora_A"], p["lora_B"], SCALE, drop)

    torch.manual_seed(11)
    y = f(x)
    want = _grads(y, {"x": x, **p}, dy)
    torch.manual_seed(11)
    y_ck = checkpoint(f, x, use_reentrant=False)
    got = _grads(y_ck, {"x": x, **p}, dy)
    assert torch.equal(y, y_ck)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


def test_saves_only_x_and_s() -> None:
    """Activation memory: x itself (no copy, no fp32 cast, no dropout copy or mask) and S [M, r]."""
    for drop in (0.0, 0.4):
        p = _params()
        x = torch.randn(64, D_IN, requires_grad=True)
        param_ptrs = {t.data_ptr() for t in p.values() if t is not None}
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fused.lora_linear(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"], SCALE, drop)
        acts = [t for t in saved if t.data_ptr() not in param_ptrs]
        assert len(acts) == 2, [tuple(t.shape) for t in acts]
        assert acts[0].data_ptr() == x.data_ptr()
        assert tuple(acts[1].shape) == (64, RANK)


def test_forward_is_three_gemms_no_extra_kernels() -> None:
    """The LoRA path goes into the base output by addmm_: no separate LoRA output, scale or add kernel."""
    p = _params()
    x = torch.randn(32, D_IN, requires_grad=True)

    class Log(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Log() as fwd:
        y = fused.lora_linear(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"], SCALE)
    compute = [o for o in fwd.ops if o not in ("t", "view", "reshape", "slice", "_unsafe_view", "detach", "alias")]
    assert sorted(compute) == ["addmm", "addmm_", "mm"], fwd.ops
    with Log() as bwd:
        y.backward(torch.randn_like(y))
    compute = [o for o in bwd.ops if o not in ("t", "view", "reshape", "slice", "_unsafe_view", "detach", "alias")]
    # G^T = B^T dY^T, its scale, dX = dY W, dX += G A, dA, dB (+ scale), bias sum; no add of two [M, I]
    assert compute.count("add") == 0 and compute.count("addmm_") == 1, bwd.ops
    assert compute.count("mm") == 4, bwd.ops


def test_no_grad_path_equals_grad_path() -> None:
    p = _params()
    x = torch.randn(9, D_IN)
    y = fused.lora_linear(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"], SCALE)
    with torch.no_grad():
        y_ng = fused.lora_linear(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"], SCALE)
    assert y.grad_fn is not None and y_ng.grad_fn is None and torch.equal(y.detach(), y_ng)


def test_bad_arguments_raise() -> None:
    p = _params()
    with pytest.raises(ValueError, match="dropout"):
        fused.lora_linear(torch.randn(2, D_IN), p["weight"], None, p["lora_A"], p["lora_B"], 1.0, 1.0)
    with pytest.raises(ValueError, match="shapes"):
        fused.lora_linear(torch.randn(2, D_IN + 1), p["weight"], None, p["lora_A"], p["lora_B"], 1.0)


def test_lora_linear_module_uses_fused_path() -> None:
    torch.manual_seed(6)
    lin = nn.Linear(D_IN, D_OUT)
    ref_w, ref_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin.requires_grad_(False)
    layer = LoRALinear.from_linear(lin, RANK, alpha=12.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 21, D_IN, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__.startswith("_LoRALinearFn")
    dy = torch.randn_like(y)
    y.backward(dy)

    p64 = {"weight": ref_w.double(), "bias": ref_b.double(),
           "lora_A": layer.lora_A.detach().double().requires_grad_(),
           "lora_B": layer.lora_B.detach().double().requires_grad_()}
    x64 = x.detach().double().requires_grad_()
    y64 = _reference(x64, p64, 12.0 / RANK)
    y64.backward(dy.double())
    _close(y, y64)
    _close(x.grad, x64.grad)
    _close(layer.lora_A.grad, p64["lora_A"].grad)
    _close(layer.lora_B.grad, p64["lora_B"].grad)
    assert layer.weight.grad is None and layer.bias.grad is None



def _autocast_dropout_check(device: str, dtype: torch.dtype) -> None:
    p = {k: None if t is None else t.detach().to(device).requires_grad_(t.requires_grad) for k, t in _params().items()}
    x = torch.randn(2, 64, D_IN, device=device, requires_grad=True)
    with torch.autocast(device, dtype=dtype):
        y = fused.lora_linear(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"], SCALE, 0.1, dropout_seed=3)
    assert y.dtype == dtype
    dy = torch.randn_like(y)
    got = _grads(y, {"x": x, **p}, dy)
    mask = fused.dropout_mask(3, (128, D_IN), 0.1, device, dtype).view(x.shape)
    p64, x64 = _leaf64(p), x.detach().double().requires_grad_()
    y64 = _reference(x64, p64, SCALE, mask, 1 / 0.9)
    want = _grads(y64, {"x": x64, **p64}, dy.double())
    for k in ("x", "lora_A", "lora_B", "bias"):
        assert got[k].dtype == torch.float32, k
        err = ((got[k].double() - want[k]).norm() / want[k].norm()).item()
        assert err < 2e-2, (k, err)
    assert ((y.double() - y64).norm() / y64.norm()).item() < 1e-2


def test_cpu_autocast_bf16_dropout() -> None:
    _autocast_dropout_check("cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_dropout(dtype: torch.dtype) -> None:
    """The CPU autocast checks on CUDA (cuBLAS path; fp16 and bf16 autocast). Not run on the CPU-only box."""
    _autocast_dropout_check("cuda", dtype)
