"""The memory planner (backbones/plan.py): runs without weights for every backbone, counts what the built model
holds, and its saved-activation figure agrees with an independent CPU measurement."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones.__main__ import main as backbones_main
from backbones.__main__ import plan_config
from backbones.plan import format_plan, parse_bytes, plan_run
from backbones.registry import backbone_names, get_backbone
from lora_core.runtime.trainable import apply_plan, plan_training

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backbone", backbone_names())
def test_tiny_plan_runs_without_weights(backbone: str) -> None:
    cfg, spec = plan_config(backbone, "tiny", [])
    plan = plan_run(cfg, spec, 1, phases=backbone == "wan_ti2v")
    assert plan.activation_bytes > 0 and plan.flops_per_step > 0
    assert plan.step_peak_bytes >= plan.param_bytes + plan.activation_bytes
    assert plan.peak_bytes >= plan.step_peak_bytes
    assert "flash" in format_plan(plan)


def _real_tiny_wan(dtype: torch.dtype) -> tuple[dict, object, object]:
    cfg, spec = plan_config("wan_ti2v", "tiny", [])
    plans = plan_training(cfg, spec.components("tiny"))
    comps = spec.build("tiny", set(plans), dtype=dtype)
    for name, p in plans.items():
        apply_plan(comps[name], p)
    return {n: comps[n] for n in plans}, cfg, spec


def test_counts_match_the_built_model() -> None:
    models, cfg, spec = _real_tiny_wan(torch.bfloat16)   # the planner plans for CUDA: model.dtype auto = bf16
    plan = plan_run(cfg, spec, 1, phases=False)
    lora = sum(p.numel() for m in models.values() for n, p in m.named_parameters() if "lora_" in n)
    assert plan.lora_params == lora > 0
    by_dtype: dict[str, int] = {}
    for m in models.values():
        for p in m.parameters():
            k = str(p.dtype).removeprefix("torch.")
            by_dtype[k] = by_dtype.get(k, 0) + p.numel()
    assert plan.param_counts_by_dtype == by_dtype
    assert plan.params_by_dtype == {k: n * torch.empty((), dtype=getattr(torch, k)).element_size()
                                    for k, n in by_dtype.items()}


def test_saved_bytes_match_an_independent_measurement() -> None:
    """mallinfo2 in-use delta across a real CPU forward, in a fresh process (benchmarks/validate_planner.py)."""
    args = ["wan_ti2v", "tiny", "17", "64", "64", "0"]
    out = subprocess.run([sys.executable, "-m", "benchmarks.validate_planner", "--child", *args], cwd=ROOT,
                         capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    measured = json.loads(out.stdout.strip().splitlines()[-1])["saved"]
    cfg, spec = plan_config("wan_ti2v", "tiny", ["model.dtype=fp32", "train.mixed_precision=fp32"])
    planned = plan_run(cfg, spec, 1, target="cpu", phases=False).activation_bytes
    assert abs(planned - measured) <= 0.10 * measured, (planned, measured)


def test_checkpointing_reduces_activations_and_fsdp_divides_parameters() -> None:
    over = ["data.num_frames=33", "data.height=128", "data.width=128"]
    off = plan_run(*plan_config("wan_ti2v", "tiny", over), 1, phases=False)
    on = plan_run(*plan_config("wan_ti2v", "tiny", over + ["train.gradient_checkpointing=true"]), 1, phases=False)
    assert on.activation_bytes < off.activation_bytes
    assert on.flops_per_step > off.flops_per_step        # the recompute
    fsdp = plan_run(*plan_config("wan_ti2v", "tiny", over + ["parallel.mode=fsdp"]), 8, phases=False)
    for k, v in off.params_by_dtype.items():
        assert fsdp.params_by_dtype[k] == -(-v // 8)
    assert fsdp.grad_bytes == -(-off.grad_bytes // 8) and fsdp.parallel_bytes > 0
    sp = plan_run(*plan_config("wan_ti2v", "tiny", over + ["parallel.mode=fsdp", "parallel.ulysses=2"]), 8,
                  phases=False)
    assert sp.activation_bytes < off.activation_bytes   # each rank holds half the tokens


def test_too_small_a_gpu_gets_a_suggestion() -> None:
    over = ["data.num_frames=33", "data.height=128", "data.width=128"]
    cfg, spec = plan_config("wan_ti2v", "tiny", over)
    on = plan_run(*plan_config("wan_ti2v", "tiny", over + ["train.gradient_checkpointing=true"]), 1, phases=False,
                  target="cpu")
    budget = on.step_peak_bytes + 2**20
    plan = plan_run(cfg, spec, 1, gpu_memory=budget, target="cpu", phases=False)
    assert plan.fits is False
    assert plan.suggestions and "gradient_checkpointing" in plan.suggestions[0]
    assert parse_bytes("24GB") == 24 * 2**30


def test_cli_plan(capsys: pytest.CaptureFixture[str]) -> None:
    rc = backbones_main(["plan", "--backbone", "wan_ti2v", "--preset", "tiny", "--frames", "9", "--rank", "8",
                         "train.batch_size=2", "--gpu-memory", "80GB"])
    out = capsys.readouterr().out
    assert rc == 0 and "activations saved for backward" in out and "fits" in out
    assert get_backbone("wan_ti2v").name in out


def test_train_plan_flag_and_the_planned_peak_logged_on_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    """`train.py --plan` prints the plan of the resolved run and exits (1 when --gpu-memory is too small); on a
    CUDA device training logs the planned peak (allocated tensors, the CUDA-context allowance left out) beside the
    measured one. The device check is the only CUDA-specific part, so it is exercised here with a cuda DistInfo."""
    import train
    from lora_core.distributed import DistInfo

    base = ["--backbone", "wan_ti2v", "--preset", "tiny", "--output", "unused"]
    assert train.main([*base, "--plan", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "PEAK" in out and "fits" in out
    assert train.main([*base, "--plan", "--gpu-memory", "1MB"]) == 1
    cfg, spec = train.resolve_config(train.parse_args(base))
    assert train.planned_peak_gb(cfg, spec, DistInfo()) is None  # CPU: not comparable, not planned
    gb = train.planned_peak_gb(cfg, spec, DistInfo(device=torch.device("cuda")))
    plan = plan_run(cfg, spec, suggest=False, phases=False)
    assert gb is not None and 0 < gb * 2**30 < plan.step_peak_bytes
    assert abs(gb * 2**30 - (plan.step_peak_bytes - plan.overhead_bytes)) < 1e-3 * plan.step_peak_bytes


def test_validation_phase_is_planned_for_the_log() -> None:
    """On a GPU, validation logs its measured peak beside this figure (the planned sampling phase minus the CUDA
    context allowance, which the allocator does not count)."""
    import train
    args = train.parse_args(["--preset", "tiny", "validation.every=5", "validation.prompts=[a]"])
    cfg, spec = train.resolve_config(args)
    v = train.Validator.__new__(train.Validator)
    v.cfg, v.spec = cfg, spec
    gb = v.planned_gb()
    assert gb is not None and 0 < gb * 2**30 < 64 * 2**20   # the tiny preset samples in a few MB
