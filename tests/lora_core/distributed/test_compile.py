"""`parallelize(..., compile=True)`: each repeated block compiled in place (after checkpointing, before
FSDP/DDP) gives the eager outputs and LoRA gradients (fp32, 1e-5 relative), with and without activation
checkpointing and with seeded LoRA dropout; names and state-dict keys do not change.

Inductor on a small LoRA block stack (CPU inductor compiles C++: seconds per graph); the tiny Wan DiT runs
under the aot_eager backend (same dynamo + AOTAutograd capture, no codegen) to keep it fast, and under
inductor as a slow test."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_core import fused
from lora_core.distributed import DistInfo, parallelize
from lora_core.distributed.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
)
from lora_core.inject import lora_parameters
from lora_core.runtime.trainable import TrainPlan, apply_plan

D = 32


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class _Stack(nn.Module):
    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block() for _ in range(n)])
        self.head = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _lora(model: nn.Module, targets: list[str], dropout: float) -> nn.Module:
    apply_plan(model, TrainPlan("dit", "lora", targets=targets, rank=4, alpha=4.0, dropout=dropout))
    with torch.no_grad():  # B != 0 so A gets a gradient too
        for p in lora_parameters(model):
            p.normal_(0, 0.05)
    return model


def _lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _close(got: torch.Tensor, want: torch.Tensor, msg: str = "", tol: float = 1e-5) -> None:
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item(), msg=msg)


def _step(model: nn.Module, inputs: tuple, seeds: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with fused.dropout_scope(seeds):
        out = model(*inputs)
        out.pow(2).mean().backward()
    return out.detach(), _lora_grads(model)


def _saved_elements(model: nn.Module, x: torch.Tensor) -> int:
    """Elements autograd keeps for backward during one forward (under checkpointing: the block inputs)."""
    n = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal n
        n += t.numel()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return n


def _compare(eager: nn.Module, compiled: nn.Module, inputs: tuple, steps: int = 2) -> None:
    for step in range(steps):  # new sample seeds every step: the dropout masks change
        seeds = [10 * step + 1, 10 * step + 2]
        want_out, want = _step(eager, inputs, seeds)
        got_out, got = _step(compiled, inputs, seeds)
        _close(got_out, want_out, f"output, step {step}")
        assert got.keys() == want.keys() and got
        for n in want:
            _close(got[n], want[n], f"grad {n}, step {step}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["nodrop", "dropout"])
def test_parallelize_compile_matches_eager(ckpt: bool, dropout: float) -> None:
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    eager = _lora(_Stack(), ["fc1", "fc2"], dropout)
    model = copy.deepcopy(eager)
    keys = list(model.state_dict())
    parallelize(eager, eager.blocks, DistInfo(), gradient_checkpointing=ckpt)
    counters.clear()
    out = parallelize(model, model.blocks, DistInfo(), gradient_checkpointing=ckpt, compile=True)
    assert out is model and list(model.state_dict()) == keys  # compiled in place: same names
    assert all(b._compiled_call_impl is not None for b in model.blocks)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    _compare(eager, model, (x,))
    assert counters["stats"]["unique_graphs"] >= 1  # something did compile
    if dropout == 0.0:  # the fused LoRA autograd.Function traces without a graph break
        assert not counters["graph_break"], dict(counters["graph_break"])
    if ckpt:  # the checkpoint applied before compiling still holds: only the block inputs are kept
        unckpt = _lora(_Stack(), ["fc1", "fc2"], dropout)
        kept = _saved_elements(model, x)
        assert kept == _saved_elements(eager, x) < _saved_elements(unckpt, x) / 2


def _tiny_dit(dropout: float) -> nn.Module:
    from backbones.registry import get_backbone
    spec = get_backbone("wan_ti2v")
    torch.manual_seed(0)
    return _lora(spec.random_dit("tiny", dtype=torch.float32), list(spec.default_targets), dropout)


def _dit_inputs() -> tuple:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 16, 5, 2, 2, generator=g), torch.rand(2, 5, generator=g) * 1000,
            torch.randn(2, 7, 64, generator=g))


def _check_dit(backend: str, ckpt: bool, dropout: float) -> None:
    eager = _tiny_dit(dropout)
    model = copy.deepcopy(eager)
    keys = list(model.state_dict())
    if ckpt:
        apply_activation_checkpointing(eager.blocks)
        apply_activation_checkpointing(model.blocks)
    apply_compile(model.blocks, backend=backend)
    assert list(model.state_dict()) == keys
    _compare(eager, model, _dit_inputs())


@pytest.mark.parametrize("ckpt,dropout", [(False, 0.0), (True, 0.1)], ids=["plain", "checkpointed-dropout"])
def test_wan_dit_compiled_blocks_match_eager(ckpt: bool, dropout: float) -> None:
    """The tiny Wan DiT with LoRA on its default targets: compiled blocks (aot_eager) = eager."""
    _check_dit("aot_eager", ckpt, dropout)


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_wan_dit_inductor_matches_eager(ckpt: bool) -> None:
    """The same under inductor (about a minute of C++ compilation per case on a 2-core CPU)."""
    _check_dit("inductor", ckpt, 0.0)
