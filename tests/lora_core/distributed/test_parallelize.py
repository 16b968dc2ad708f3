"""Distributed training on CPU (gloo, tiny preset): single process vs DDP vs FSDP2 vs Ulysses vs both.

The end-to-end runs launch `python -m torch.distributed.run ... train.py` on one shared latent cache and
keep the global batch fixed (2 samples a step), so every layout must log the same losses and end with the
same LoRA. The unit tests spawn 2 gloo processes and compare the DiT's output and LoRA gradients with a
single-process reference, including a token count that Ulysses has to pad (5 tokens, K = 2).
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import train
from lora_core import distributed as parallel

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
            "train.log_every=0", *extra]


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
    lora = load_file(str(ck / "lora.safetensors"))
    a = next(k for k in lora if k.endswith("self_attn.q.lora_A"))
    assert lora[a].shape == (32, 128)  # the full A, not half of it
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


# -------------------------------------------------------------------------------- user errors
def test_invalid_degrees_raise_with_the_numbers(shared, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"ulysses\(3\) != WORLD_SIZE\(4\).*\[1, 2, 4\]"):
        parallel.check_degrees(4, 3, 8)
    with pytest.raises(ValueError, match=r"--ulysses 4 does not divide the model's 2 attention heads.*\[1, 2\]"):
        parallel.check_degrees(4, 4, 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        parallel.check_degrees(2, 0, 2)
    assert parallel.check_degrees(4, 2, 2) == 2
    # train.py reports it before touching data or a model (no process group is started either)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"ulysses\(4\) != WORLD_SIZE\(2\).*\[1, 2\]"):
        train.main(_args(shared, tmp_path / "bad", "--ulysses", "4"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="--ulysses 4 does not divide the model's 2 attention heads"):
        train.main(_args(shared, tmp_path / "bad", "--ulysses", "4"))
    assert not (tmp_path / "bad").exists() and not dist.is_initialized()


def test_unsupported_combinations_fail_before_training():
    info = parallel.DistInfo(world_size=2, dp_size=2)
    with pytest.raises(ValueError, match="adamw8bit.*--parallel ddp"):
        parallel.check_options(info, mode="fsdp", optimizer="adamw8bit", validation_every=0)
    parallel.check_options(info, mode="ddp", optimizer="adamw8bit", validation_every=0)
    with pytest.raises(ValueError, match="validation.every=5"):
        parallel.check_options(parallel.DistInfo(world_size=2, sp_size=2), mode="ddp", optimizer="adamw",
                               validation_every=5)


# ------------------------------------------------------------------ unit tests on a real gloo group
def _tiny_lora_dit(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from backbones.registry import get_backbone
    from lora_core.inject import inject_lora, lora_parameters
    spec = get_backbone("wan_ti2v")
    torch.manual_seed(0)
    dit = spec.random_dit("tiny", dtype=dtype)
    inject_lora(dit, list(spec.default_targets), 4, 4.0)
    with torch.no_grad():  # B != 0 so every LoRA parameter gets a gradient
        for p in lora_parameters(dit):
            p.normal_(0, 0.05)
    return dit


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if parallel._is_dtensor(p.grad) else p.grad
            out[n] = g.detach().clone()
    return out


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from lora_core.inject import inject_lora, lora_parameters
    # 5 tokens (grid 5x1x1): Ulysses K=2 pads to 6 and must mask the padded key
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 16, 5, 2, 2, generator=g), torch.rand(2, 5, generator=g) * 1000
    ctx = torch.randn(2, 7, 64, generator=g)
    ref = _tiny_lora_dit()
    ref_out = ref(x, t, ctx)
    ref_out.pow(2).mean().backward()
    ref_grads = _grads(ref)
    assert len(ref_grads) == 40

    # all-to-all: sequence <-> heads and back is the identity; its backward is the inverse all-to-all
    info = parallel.init_distributed(ulysses=2, num_heads=2)
    sp = parallel.UlyssesGroup(info.sp_group, 2, info.sp_rank)
    q = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(10 + rank), requires_grad=True)
    heads = sp.all_to_all(q, scatter_dim=2, gather_dim=1)
    assert heads.shape == (2, 6, 2, 5)
    torch.testing.assert_close(sp.all_to_all(heads, scatter_dim=1, gather_dim=2), q)
    (heads * 3).sum().backward()
    torch.testing.assert_close(q.grad, torch.full_like(q, 3.0))

    cases = [("ddp", 2, False), ("fsdp", 2, True), ("fsdp", 1, False)]  # (mode, ulysses, checkpointing)
    for mode, k, ckpt in cases:
        info = parallel.init_distributed(ulysses=k, num_heads=2)
        dit = _tiny_lora_dit()
        model = parallel.parallelize(dit, dit.blocks, info, mode=mode, gradient_checkpointing=ckpt)
        per = 2 // info.dp_size
        lo = info.dp_rank * per
        out = model(x[lo:lo + per], t[lo:lo + per], ctx[lo:lo + per])
        out.pow(2).mean().backward()
        torch.testing.assert_close(out, ref_out[lo:lo + per], atol=2e-5, rtol=1e-5)
        # sum over the Ulysses group, mean over data parallel = the single-process gradient
        got = _grads(dit)
        assert got.keys() == ref_grads.keys(), (mode, k)
        for n in got:
            torch.testing.assert_close(got[n], ref_grads[n], atol=1e-6, rtol=1e-4, msg=f"{mode} K={k} {n}")
        norm = parallel.clip_grad_norm(lora_parameters(dit), 0.0)
        ref_norm = torch.linalg.vector_norm(torch.stack([v.norm() for v in ref_grads.values()])).item()
        assert abs(norm - ref_norm) <= 1e-5 * ref_norm
        if mode == "fsdp":  # gathered LoRA = the full tensors; writeback scatters edits into the shards
            with parallel.full_lora(dit, writeback=True) as m:
                a = m.blocks[0].self_attn.q.lora_A
                assert not parallel._is_dtensor(a) and a.shape == (4, 128)
                torch.testing.assert_close(a, ref.blocks[0].self_attn.q.lora_A.detach())
                a.add_(1.0)
            with parallel.full_lora(dit) as m:
                torch.testing.assert_close(m.blocks[0].self_attn.q.lora_A, ref.blocks[0].self_attn.q.lora_A + 1)

    # FSDP2 unit holding a bf16 frozen base and fp32 LoRA masters (the GPU default): torch >= 2.8 accepts it
    info = parallel.init_distributed(ulysses=1, num_heads=2)
    lin = [torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)]
    seq = torch.nn.Sequential(*lin).to(torch.bfloat16)
    torch.manual_seed(3)
    inject_lora(seq, ["0", "1"], 2, 2.0)
    with torch.no_grad():
        for p in lora_parameters(seq):
            p.normal_(0, 0.1)
    ref_seq = copy.deepcopy(seq)
    xin = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    ref_seq(xin).float().pow(2).mean().backward()
    parallel.apply_fsdp(seq, torch.nn.ModuleList(list(seq)), info)
    assert {p.dtype for p in seq.parameters()} == {torch.bfloat16, torch.float32}
    seq(xin[2 * rank:2 * rank + 2]).float().pow(2).mean().backward()
    for n, p in seq.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32
            ref_g = dict(ref_seq.named_parameters())[n].grad
            torch.testing.assert_close(p.grad.full_tensor(), ref_g, atol=1e-3, rtol=2e-2)  # bf16 activations
    parallel.shutdown()


def test_dit_under_ulysses_fsdp_ddp_matches_single_process_gradients():
    """Output and every LoRA gradient of 2-process Ulysses (with padding), FSDP2 (+ Ulysses +
    checkpointing) and a mixed bf16/fp32 FSDP2 unit equal the single-process ones."""
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
