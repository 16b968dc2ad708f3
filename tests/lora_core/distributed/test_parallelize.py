"""Distributed training on CPU (gloo, tiny preset), end to end through train.py: single process vs DDP vs FSDP2
vs Ulysses vs both, with and without LoRA dropout.

The runs launch `python -m torch.distributed.run ... train.py` on one shared latent cache and keep the global
batch fixed (2 samples a step), so every layout must log the same losses and end with the same LoRA. The unit
tests of the distributed package live beside this file (test_mesh, test_ulysses, test_sync, test_state,
test_parity).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train

ROOT = Path(__file__).resolve().parents[3]
STEPS = 4
REL_TOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The sample dataset and its latent cache, built once for every run below."""
    from lora_core.data.sample_data import make_sample_dataset
    root = tmp_path_factory.mktemp("dist")
    data = make_sample_dataset(root / "data")
    cache = root / "cache"
    assert train.main(["--preset", "tiny", "--data", str(data), "--output", str(root / "warm"), "--cache-only",
                       f"train.cache_dir={cache}"]) == 0
    return data, cache


def _args(shared, out, *extra) -> list[str]:
    data, cache = shared
    return ["--preset", "tiny", "--data", str(data), "--output", str(out), f"train.cache_dir={cache}",
            "train.log_every=0", "lora.save_dtype=fp32", "validation.at_end=false", *extra]


def torchrun(nproc: int, shared, out, *extra) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(ROOT / "train.py"), *_args(shared, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-6000:]}"


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in open(Path(out) / "metrics.jsonl")]


def max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def assert_same_lora(a, b) -> float:
    """Same keys and full shapes; each tensor within 1e-3 of its norm. Adam turns rounding-level gradient
    differences on near-zero gradients into +-lr steps, so a few elements may differ by up to ~lr (1e-3).
    Returns the largest relative (Frobenius) difference."""
    sa, sb = load_file(str(Path(a) / "lora.safetensors")), load_file(str(Path(b) / "lora.safetensors"))
    assert sa.keys() == sb.keys()
    worst = 0.0
    for k in sa:
        assert sa[k].shape == sb[k].shape, k  # full tensors, not one rank's shard
        d = (sa[k] - sb[k]).float()
        rel = (d.norm() / sb[k].float().norm().clamp_min(1e-12)).item()
        assert rel <= 1e-3 and d.abs().max() <= 1e-3, (k, rel, d.abs().max().item())
        worst = max(worst, rel)
    return worst


# ------------------------------------------------------------------------ end to end through train.py
@pytest.fixture(scope="module")
def single(shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert train.main(_args(shared, out, "--max-steps", str(STEPS), "--batch-size", "2")) == 0
    return out


LAYOUTS = {  # name: (processes, flags); the global batch is 2 samples in each
    "ddp2": (2, ["--parallel", "ddp", "--batch-size", "1"]),
    "fsdp2": (2, ["--parallel", "fsdp", "--batch-size", "1"]),
    # Ulysses alone is data-parallel size 1; with per-block checkpointing and activation offload on top
    "ulysses2": (2, ["--ulysses", "2", "--batch-size", "2", "train.gradient_checkpointing=true",
                     "train.offload_activations=true"]),
    "fsdp2_x_ulysses2": (4, ["--parallel", "fsdp", "--ulysses", "2", "--batch-size", "1"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, shared, single, tmp_path):
    nproc, flags = LAYOUTS[layout]
    out = tmp_path / layout
    torchrun(nproc, shared, out, "--max-steps", str(STEPS), *flags)
    ref, got = losses(single), losses(out)
    assert len(got) == STEPS
    err = max_rel(got, ref)
    print(f"{layout}: max relative loss difference {err:.2e}")
    assert err <= REL_TOL, (layout, ref, got)
    grads = [json.loads(line)["grad_norm"] for line in open(out / "metrics.jsonl")]
    ref_grads = [json.loads(line)["grad_norm"] for line in open(single / "metrics.jsonl")]
    assert max_rel(grads, ref_grads) <= 1e-3, (grads, ref_grads)  # Adam alone would hide a gradient scale
    print(f"{layout}: max relative LoRA difference {assert_same_lora(out, single):.2e}")


def test_fsdp_resume_equals_straight_run_and_checkpoint_is_portable(shared, single, tmp_path):
    """2 steps, stop; --resume latest to step 4 under FSDP2 x2. The checkpoint (full LoRA, optimizer state
    keyed by name) also resumes in a single process."""
    out = tmp_path / "fsdp_resumed"
    torchrun(2, shared, out, "--parallel", "fsdp", "--batch-size", "1", "--max-steps", "2")
    ck = out / "checkpoints" / "step-2"
    osd = torch.load(ck / "optimizer.pt", weights_only=True)
    assert all(isinstance(k, str) for k in osd["state"])
    trained = load_file(str(ck / "trainable.safetensors"))
    a = next(k for k in trained if k.endswith("self_attn.q.lora_A"))
    assert trained[a].shape == (32, 128)  # the full A, not half of it
    torchrun(2, shared, out, "--parallel", "fsdp", "--batch-size", "1", "--max-steps", str(STEPS),
             "--resume", "latest")
    got = losses(out)
    assert len(got) == STEPS
    assert max_rel(got, losses(single)) <= REL_TOL
    assert_same_lora(out, single)
    # the same checkpoint, resumed by one process
    solo = tmp_path / "solo"
    assert train.main(_args(shared, solo, "--max-steps", str(STEPS), "--batch-size", "2",
                             "--resume", str(ck))) == 0
    assert max_rel(losses(solo), losses(single)[2:]) <= REL_TOL
    assert_same_lora(solo, single)


DROPOUT = ["lora.dropout=0.2", "train.grad_accum=2"]


@pytest.mark.parametrize("layout", ["ddp2", "ulysses2"])
def test_dropout_masks_follow_the_sample_not_the_rank(layout, shared, tmp_path):
    """With LoRA dropout each sample's masks are a function of (seed, step, sample, token, layer): DDP x2 and
    Ulysses x2 (tokens sharded) draw exactly the masks one process draws, and grad_accum=2 skips the
    gradient sync of the first micro-step without changing the result."""
    ref = tmp_path / "single"
    assert train.main(_args(shared, ref, "--max-steps", "3", "--batch-size", "2", *DROPOUT)) == 0
    nproc, flags = LAYOUTS[layout]
    out = tmp_path / layout
    torchrun(nproc, shared, out, "--max-steps", "3", *flags, *DROPOUT)
    err = max_rel(losses(out), losses(ref))
    print(f"{layout} with dropout: max relative loss difference {err:.2e}")
    assert err <= REL_TOL, (losses(ref), losses(out))
    assert_same_lora(out, ref)
