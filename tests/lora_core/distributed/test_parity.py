"""The Wan DiT under every parallel layout equals one process: 2 gloo processes, Ulysses (with a token count
it has to pad: 5 tokens, K = 2) + DDP, FSDP2 + Ulysses + activation checkpointing, plain FSDP2, and an FSDP2
unit holding a bf16 frozen base with fp32 LoRA masters. Output and every LoRA gradient are compared."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from lora_core import distributed as parallel
from lora_core.inject import inject_lora, lora_parameters

from ._procs import spawn


def _tiny_lora_dit(dtype: torch.dtype = torch.float32) -> nn.Module:
    from backbones.registry import get_backbone
    spec = get_backbone("wan_ti2v")
    torch.manual_seed(0)
    dit = spec.random_dit("tiny", dtype=dtype)
    inject_lora(dit, list(spec.default_targets), 4, 4.0)
    with torch.no_grad():  # B != 0 so every LoRA parameter gets a gradient
        for p in lora_parameters(dit):
            p.normal_(0, 0.05)
    return dit


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if parallel._is_dtensor(p.grad) else p.grad
            out[n] = g.detach().clone()
    return out


def _worker(rank: int, world: int) -> None:
    # 5 tokens (grid 5x1x1): Ulysses K=2 pads to 6 and must mask the padded key
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 16, 5, 2, 2, generator=g), torch.rand(2, 5, generator=g) * 1000
    ctx = torch.randn(2, 7, 64, generator=g)
    ref = _tiny_lora_dit()
    ref_out = ref(x, t, ctx)
    ref_out.pow(2).mean().backward()
    ref_grads = _grads(ref)
    assert len(ref_grads) == 40

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
    lin = [nn.Linear(8, 16), nn.Linear(16, 4)]
    seq = nn.Sequential(*lin).to(torch.bfloat16)
    torch.manual_seed(3)
    inject_lora(seq, ["0", "1"], 2, 2.0)
    with torch.no_grad():
        for p in lora_parameters(seq):
            p.normal_(0, 0.1)
    ref_seq = copy.deepcopy(seq)
    xin = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    ref_seq(xin).float().pow(2).mean().backward()
    parallel.apply_fsdp(seq, nn.ModuleList(list(seq)), info)
    assert {p.dtype for p in seq.parameters()} == {torch.bfloat16, torch.float32}
    seq(xin[2 * rank:2 * rank + 2]).float().pow(2).mean().backward()
    for n, p in seq.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32
            ref_g = dict(ref_seq.named_parameters())[n].grad
            torch.testing.assert_close(p.grad.full_tensor(), ref_g, atol=1e-3, rtol=2e-2)  # bf16 activations


def test_dit_under_ulysses_fsdp_ddp_matches_single_process_gradients() -> None:
    """Output and every LoRA gradient of 2-process Ulysses (with padding), FSDP2 (+ Ulysses +
    checkpointing) and a mixed bf16/fp32 FSDP2 unit equal the single-process ones."""
    spawn(_worker, 2)
