"""Two trained models in one process (a LoRA denoiser and a fully fine-tuned side network, as UNet +
ControlNet), each parallelized with FSDP2; gathering their trained parameters in full and writing back."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lora_core import distributed as parallel
from lora_core.inject import inject_lora, lora_parameters

from ._procs import spawn
from .test_sync import Tiny


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    denoiser = Tiny()
    inject_lora(denoiser, ["blocks.0", "blocks.1"], 2, 2.0)  # freezes everything but the LoRA
    with torch.no_grad():
        for p in lora_parameters(denoiser):
            p.normal_(0, 0.1)
    side = Tiny()  # every parameter trained
    return denoiser, side


def _loss(denoiser: nn.Module, side: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (denoiser(x) + side(x)).pow(2).mean()


def test_single_process_full_trainable_is_the_model_itself() -> None:
    denoiser, side = _models()
    with parallel.full_trainable(side, writeback=True) as m:
        assert m is side and all(type(p) is nn.Parameter for p in m.parameters())
    with parallel.full_lora(denoiser) as m:
        assert m.blocks[0].lora_A is denoiser.blocks[0]._parameters["lora_A"]


def _two_models_worker(rank: int, world: int) -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    ref_d, ref_s = _models()
    _loss(ref_d, ref_s, x).backward()
    info = parallel.init_distributed()
    denoiser, side = _models()
    for m in (denoiser, side):  # once per trained model, as the training loop does
        assert parallel.parallelize(m, m.blocks, info, mode="fsdp") is m
    assert parallel.is_sharded(denoiser) and parallel.is_sharded(side)
    # both shard over the one world mesh of `info` (no process group made per call)
    assert all(p.device_mesh is info.world_mesh for m in (denoiser, side) for p in m.parameters())
    _loss(denoiser, side, x[2 * rank:2 * rank + 2]).backward()
    for m, ref in ((denoiser, ref_d), (side, ref_s)):
        trained = {n: p for n, p in m.named_parameters() if p.requires_grad}
        assert trained.keys() == {n for n, p in ref.named_parameters() if p.requires_grad}
        for n, p in trained.items():
            torch.testing.assert_close(p.grad.full_tensor(), dict(ref.named_parameters())[n].grad, msg=n)

    # full_trainable: every trained parameter full and plain inside; frozen ones stay sharded
    with parallel.full_trainable(side, writeback=True) as m:
        sd = m.state_dict()
        assert sd.keys() == ref_s.state_dict().keys()
        for n, t in sd.items():
            assert not parallel._is_dtensor(t)
            torch.testing.assert_close(t, ref_s.state_dict()[n])
        m.head.weight.add_(1.0)  # written back to the shards on exit
    with parallel.full_trainable(side) as m:
        torch.testing.assert_close(m.head.weight, ref_s.head.weight + 1.0)
    assert parallel._is_dtensor(side.head.weight) and side.head.weight.requires_grad
    with parallel.full_trainable(denoiser) as m:
        assert not parallel._is_dtensor(m.blocks[0].lora_A) and tuple(m.blocks[0].lora_A.shape) == (2, 8)
        assert parallel._is_dtensor(m.blocks[0].weight)  # frozen base: not gathered
    with parallel.full_lora(denoiser, writeback=True) as m:
        torch.testing.assert_close(m.blocks[1].lora_B, ref_d.blocks[1].lora_B.detach())
        m.blocks[1].lora_B.zero_()
    with parallel.full_lora(denoiser) as m:
        assert not m.blocks[1].lora_B.any()
    # a shape change cannot be written back: the error names it, and every shard is put back anyway
    with pytest.raises(ValueError, match=r"LoRALinear.lora_A changed shape from \(2, 8\) to \(3, 8\)"):
        with parallel.full_lora(denoiser, writeback=True) as m:
            m.blocks[0]._parameters["lora_A"] = nn.Parameter(torch.zeros(3, 8))
    assert all(parallel._is_dtensor(p) for p in lora_parameters(denoiser))


def test_two_fsdp_models_in_one_process() -> None:
    spawn(_two_models_worker, 2)
