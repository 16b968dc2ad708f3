"""lora_core.runtime.optim: 8-bit AdamW against fp32 AdamW, bnb's small-tensor rule, the lr schedule."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from lora_core.runtime.config import OptimConfig
from lora_core.runtime.optim import build_optimizer, build_scheduler, lr_factor

LR, WD, STEPS = 1e-3, 0.1, 5


def _bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed; adamw8bit cannot be tested")


def _train(
    name: str, shapes: list[tuple[int, ...]], steps: int = STEPS
) -> tuple[list[torch.Tensor], list[torch.nn.Parameter], torch.optim.Optimizer]:
    """(start values, trained parameters, optimizer) after `steps` steps on fixed random gradients.

    Gradient scales vary per step so the moments are not a constant multiple of one gradient.
    """
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    start = [p.detach().clone() for p in params]
    grads = [[torch.randn(*s, generator=g) * (0.5 + 0.1 * t) for s in shapes] for t in range(steps)]
    opt = build_optimizer(params, OptimConfig(name=name, lr=LR, weight_decay=WD, betas=[0.9, 0.999], eps=1e-8))
    for step_grads in grads:
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        opt.step()
        opt.zero_grad()
    return start, params, opt


def test_adamw8bit_follows_fp32_adamw_with_really_8bit_state() -> None:
    bnb = _bnb()
    import bitsandbytes.functional as bnb_f

    shapes = [(64, 128)]  # 8192 elements: above min_8bit_size, so the state is quantised
    start, ref, ref_opt = _train("adamw", shapes)
    _, q, q_opt = _train("adamw8bit", shapes)
    assert type(ref_opt) is torch.optim.AdamW and isinstance(q_opt, bnb.optim.AdamW8bit)
    d_ref, d_q = ref[0].detach() - start[0], q[0].detach() - start[0]
    # Tolerance: m and v are stored as 8-bit codes of a dynamic map scaled by the absmax of each
    # 256-element block, so a moment far below its block's max is off by a few percent (measured
    # below: ~1.7% for m, ~1% for v). The update error accumulates from step 2 on (step 1 uses the
    # unquantised moments): 0.86% of the total update's norm after 5 steps with bnb 0.50.2 on CPU.
    # 3% leaves room for other kernels and still fails for a 10% lr error (10%) or coupled L2
    # weight decay instead of AdamW's decoupled one (~19%).
    rel = ((d_q - d_ref).norm() / d_ref.norm()).item()
    assert 0 < rel < 0.03, rel  # > 0: an fp32 state would match (almost) exactly
    assert (d_q - d_ref).abs().max().item() < 0.5 * LR  # no element strays by half a step
    assert d_ref.pow(2).mean().sqrt() > LR  # the reference moved (each Adam step is ~LR per element)

    st, ref_st = q_opt.state[q[0]], ref_opt.state[ref[0]]
    assert st["state1"].dtype == torch.uint8 and st["state2"].dtype == torch.uint8
    assert st["state1"].shape == q[0].shape and st["state2"].shape == q[0].shape
    blocksize = q[0].numel() // st["absmax1"].numel()
    assert blocksize * st["absmax1"].numel() == q[0].numel()
    m = bnb_f.dequantize_blockwise(st["state1"], absmax=st["absmax1"], code=st["qmap1"], blocksize=blocksize)
    v = bnb_f.dequantize_blockwise(st["state2"], absmax=st["absmax2"], code=st["qmap2"], blocksize=blocksize)
    # The bytes really hold Adam's moments (not just some uint8 buffer).
    assert ((m - ref_st["exp_avg"]).norm() / ref_st["exp_avg"].norm()).item() < 0.05
    assert ((v - ref_st["exp_avg_sq"]).norm() / ref_st["exp_avg_sq"].norm()).item() < 0.05


def test_tensors_below_min_8bit_size_keep_fp32_state_as_bnb_does() -> None:
    _bnb()
    probe = build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(name="adamw8bit"))
    n = probe.args.min_8bit_size  # bnb: state is 8-bit from this many elements on (4096 in 0.50)
    shapes = [(n - 1,), (n,), (10,)]  # just below, at the threshold, a bias-sized vector
    start, ref, ref_opt = _train("adamw", shapes)
    _, q, q_opt = _train("adamw8bit", shapes)
    dtypes = [(q_opt.state[p]["state1"].dtype, q_opt.state[p]["state2"].dtype) for p in q]
    assert dtypes == [(torch.float32,) * 2, (torch.uint8,) * 2, (torch.float32,) * 2]
    for i in (0, 2):  # fp32 state: bnb's 32-bit AdamW is plain AdamW up to float rounding
        torch.testing.assert_close(q[i].detach(), ref[i].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q_opt.state[q[i]]["state1"], ref_opt.state[ref[i]]["exp_avg"], rtol=1e-5, atol=1e-7)
    d_ref, d_q = ref[1].detach() - start[1], q[1].detach() - start[1]
    assert 0 < ((d_q - d_ref).norm() / d_ref.norm()).item() < 0.03  # quantised: close, not equal


def test_build_optimizer_takes_only_trainable_parameters() -> None:
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    lora = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer([frozen, lora], OptimConfig(lr=2e-4, weight_decay=0.05, betas=[0.8, 0.99], eps=1e-6))
    (group,) = opt.param_groups
    assert group["params"] == [lora]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (2e-4, 0.05, (0.8, 0.99), 1e-6)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_build_optimizer_refuses_when_nothing_is_trainable(name: str) -> None:
    frozen = [torch.nn.Parameter(torch.zeros(3), requires_grad=False)]
    for params in (frozen, []):
        with pytest.raises(ValueError, match="no trainable parameters: did LoRA injection match any module"):
            build_optimizer(params, OptimConfig(name=name))


def test_adamw8bit_without_bitsandbytes_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'bitsandbytes>=0.50'.*optim.name=adamw"):
        build_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimConfig(name="adamw8bit"))


def _expected(step: int, warmup: int, schedule: str, max_steps: int, floor: float) -> float:
    """The schedule written out independently: warm-up reaches 1 on its last step (no zero-lr step)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, max_steps - warmup))  # past max_steps: stay at the floor
    return floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2


def test_lr_factor_pinned_values() -> None:
    cfg = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    got = [lr_factor(s, cfg, max_steps=14) for s in (0, 1, 3, 4, 9, 14, 30)]
    # warm-up 1/4 .. 4/4, then cosine from 1 at step 4 through 0.55 halfway (step 9) to the floor 0.1
    assert got == pytest.approx([0.25, 0.5, 1.0, 1.0, 0.55, 0.1, 0.1])
    assert [lr_factor(s, OptimConfig(warmup_steps=2), 10) for s in (0, 1, 2, 9)] == pytest.approx([0.5, 1, 1, 1])


@pytest.mark.parametrize("warmup", [0, 1, 5])
@pytest.mark.parametrize("schedule,floor", [("constant", 0.0), ("cosine", 0.0), ("cosine", 0.2)])
def test_lr_factor_matches_the_formula(warmup: int, schedule: str, floor: float) -> None:
    cfg = OptimConfig(warmup_steps=warmup, schedule=schedule, min_lr_ratio=floor)
    for max_steps in (1, 7, 40):
        for step in range(max_steps + 3):
            assert lr_factor(step, cfg, max_steps) == pytest.approx(
                _expected(step, warmup, schedule, max_steps, floor), abs=1e-12
            ), (step, max_steps)
    factors = [lr_factor(s, cfg, 40) for s in range(warmup, 41)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))  # never rises after warm-up


def test_scheduler_drives_the_optimizer_and_resumes_mid_run() -> None:
    cfg = OptimConfig(lr=1e-3, warmup_steps=3, schedule="cosine", min_lr_ratio=0.1)

    def fresh() -> torch.optim.Optimizer:
        return build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)

    opt = fresh()
    sched = build_scheduler(opt, cfg, max_steps=12)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])  # the lr optimizer step s uses
        opt.step()
        sched.step()
    assert seen == pytest.approx([cfg.lr * lr_factor(s, cfg, 12) for s in range(12)])
    opt = fresh()
    resumed = build_scheduler(opt, cfg, max_steps=12, last_step=5)  # 5 steps were done before the restart
    after = []
    for _ in range(7):
        after.append(opt.param_groups[0]["lr"])
        opt.step()
        resumed.step()
    assert after == pytest.approx(seen[5:])
