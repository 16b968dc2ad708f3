"""The one visible parallelize step: sequence parallel -> activation checkpointing -> FSDP2 or DDP.

Model code stays single-device code; this module only sets seams, wraps and hooks. The training loop calls
`parallelize` once per trained model (e.g. a UNet and a ControlNet): each call wraps only its own model and
shares the process groups of `info`.

Gradients under Ulysses are the SUM over the Ulysses group and the MEAN over the data-parallel group (see
`ulysses`): one all-reduce (DDP) or reduce-scatter (FSDP2) over the whole world with divisor dp_size
instead of world_size.

FSDP2 dtypes. Parameters keep their stored dtypes (frozen base in model.dtype, bf16 on GPU; LoRA masters
fp32) and are all-gathered as they are (no MixedPrecisionPolicy.param_dtype); autocast picks the compute
dtype, and the fp32 LoRA gradients are reduce-scattered in fp32. One fully_shard unit then holds bf16 and
fp32 parameters, which torch >= 2.8 accepts because it only asks the *trainable* parameters of a unit to
share a dtype (pytorch/pytorch#154103); older torch asks it of all of them, see `mesh.check_options`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .mesh import DistInfo
from .ulysses import apply_sequence_parallel

__all__ = ["parallelize", "apply_activation_checkpointing", "apply_compile", "maybe_offload_activations",
           "apply_fsdp", "apply_ddp", "shards_weights", "gradient_sync"]


def apply_activation_checkpointing(units: Sequence[nn.Module]) -> None:
    """Recompute each unit in backward (non-reentrant, through hooks: names and forwards unchanged)."""
    from torch.distributed._composable import checkpoint

    from .. import fused
    for unit in units:
        # the recomputation sees the LoRA-dropout scope of its forward, so it regenerates the same masks
        checkpoint(unit, context_fn=fused.dropout_checkpoint_context)


@torch.compiler.disable
def _eager_lora_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return type(self).forward(self, *args, **kwargs)


def apply_compile(units: Sequence[nn.Module], **compile_kwargs: Any) -> None:
    """`torch.compile` each unit in place (`nn.Module.compile`: the module, its names and state-dict keys stay
    as they are; the compiled call wraps its hooks, so a checkpoint applied before is traced with it).
    Blocks of one class share their compiled code (parameters are graph inputs, not constants).

    The fused LoRA autograd.Function traces without a graph break when dropout is off. With LoRA dropout the
    mask key is integer hashing of per-step sample seeds in Python, which dynamo would specialize per step
    (recompiling) and then fails on as symbolic ints; so LoRA layers with dropout > 0 run eagerly
    (`torch.compiler.disable`): one graph break around each, the rest of the block stays compiled.
    `compile_kwargs` go to `torch.compile` (backend, mode, fullgraph, ...)."""
    import types

    from ..layers import LoRALayer
    for unit in units:
        for m in unit.modules():
            if isinstance(m, LoRALayer) and m.lora_dropout > 0 and "forward" not in vars(m):
                m.forward = types.MethodType(_eager_lora_forward, m)
        unit.compile(**compile_kwargs)


@contextlib.contextmanager
def maybe_offload_activations(enabled: bool) -> Iterator[None]:
    """Keep tensors saved for backward on the CPU (pinned when CUDA is there) during the forward. Under
    activation checkpointing only what the checkpoints keep (each block's inputs) is saved, so that moves."""
    if not enabled:
        yield
        return
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        yield


def _world_mesh(info: DistInfo) -> Any:
    """The 1-D mesh over every rank that FSDP2 shards over."""
    if info.world_mesh is not None:
        return info.world_mesh
    # a DistInfo made by hand (not by init_distributed): a mesh of its own over the default group
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(info.device.type, (info.world_size,))


def apply_fsdp(model: nn.Module, units: Sequence[nn.Module], info: DistInfo) -> None:
    """FSDP2 over the whole world (Ulysses ranks hold shards too): each of `units` its own fully_shard unit,
    then the root.
    Works on a meta-device model (see `state.load_full_state`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = _world_mesh(info)
    # stored dtypes are all-gathered as they are; autocast casts for compute; fp32 LoRA grads reduced in fp32
    mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    sharded = [fully_shard(unit, mesh=mesh, mp_policy=mp) for unit in units]
    # the root (embeddings, head) is needed again right at the start of backward: keep it gathered
    sharded.append(fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False))
    if info.sp_size > 1:
        for unit in sharded:  # sum over the Ulysses group, mean over data parallel (module docstring)
            unit.set_gradient_divide_factor(float(info.dp_size))
            if info.device.type == "cpu":
                unit.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM


def _sum_sp_mean_dp_hook(dp_size: int) -> Callable[[Any, Any], torch.futures.Future]:
    # unannotated on purpose: DDP rejects a hook whose `bucket` annotation is not the dist.GradBucket class,
    # and postponed annotations (this file's __future__ import) are strings
    def hook(group, bucket):  # noqa: ANN001, ANN202
        buf = bucket.buffer().div_(dp_size)
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    return hook


def apply_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """The DDP wrapper over the whole world; under Ulysses its all-reduce divides by dp_size only."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if info.sp_size > 1:  # sum over the Ulysses group, mean over data parallel (module docstring)
        ddp.register_comm_hook(dist.group.WORLD, _sum_sp_mean_dp_hook(info.dp_size))
    return ddp


def shards_weights(mode: str, info: DistInfo) -> bool:
    """Whether `parallelize` will shard the parameters (build on meta, then `load_full_state`)."""
    return mode == "fsdp" and info.distributed


def parallelize(model: nn.Module, units: Sequence[nn.Module], info: DistInfo, *, mode: str = "ddp",
                gradient_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    """Sequence parallel -> activation checkpointing -> torch.compile -> FSDP2/DDP, in that order (torchtitan's).
    `units` are the repeated blocks (checkpointed, compiled and sharded one by one). compile=True compiles
    each unit in place with the default inductor backend (`apply_compile`; off by default: eager until
    measured faster, see benchmarks/bench_compile.py). Returns the module to call for training: the model
    itself (single process, FSDP2) or its DDP wrapper."""
    if mode not in ("ddp", "fsdp"):
        raise ValueError(f"--parallel {mode!r}: choose ddp or fsdp")
    if info.sp_size > 1:
        apply_sequence_parallel(model, info)
    if gradient_checkpointing:
        apply_activation_checkpointing(units)
    if compile:
        apply_compile(units)
    if not info.distributed:
        return model
    if mode == "fsdp":
        apply_fsdp(model, units, info)
        return model
    return apply_ddp(model, info)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, backward passes of `model` (what `parallelize` returned) communicate gradients only when
    `enabled`. Wrap every micro-step but the last of an accumulation window in gradient_sync(model, False):
    the gradients accumulate locally and the last backward reduces their sum, once.

    DDP: its `no_sync()`. FSDP2: gradients stay unsharded (full size on every rank) until the synced
    backward reduce-scatters them, which costs memory the size of the trained parameters. Single process,
    or enabled: nothing."""
    if enabled:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel as DDP
    if isinstance(model, DDP):
        with model.no_sync():
            yield
        return
    # every fully_shard unit keeps its own flag; set them one by one so a model whose root is not itself
    # sharded is covered too
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)
