"""Weights, trained parameters and optimizer state in and out of a (possibly FSDP2-sharded) model.

Everything here gives or takes full tensors, whatever the parallelism, so checkpoints resume on another
number of processes or mode. Under FSDP2 the functions are collectives: every rank must call them.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..inject import lora_layers
from .mesh import DistInfo, broadcast_object

__all__ = ["load_full_state", "full_lora", "full_trainable", "optimizer_state_dict", "load_optimizer_state_dict",
           "clip_grad_norm", "is_sharded"]


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


@torch.no_grad()
def load_full_state(model: nn.Module, full: nn.Module | None, info: DistInfo) -> None:
    """Fill a model that was sharded on the meta device with rank 0's weights.

    Rank 0 passes `full`, a complete copy (e.g. built on the CPU from the checkpoint files); the other ranks
    pass None. Tensors travel one at a time: each is broadcast, every rank keeps its shard and drops the
    rest, so a rank holds its shards plus one full tensor, and only rank 0 ever holds the whole model.
    Rank 0's torch RNG state (which drew the LoRA init) is broadcast too, so later draws agree on all ranks."""
    from torch.distributed.tensor import distribute_tensor
    model.to_empty(device=info.device)
    src = full.state_dict() if full is not None else None
    mine = list(model.named_parameters()) + list(model.named_buffers())
    if info.is_main:
        assert src is not None, "rank 0 must pass the full model"
        missing, extra = {n for n, _ in mine} - set(src), set(src) - {n for n, _ in mine}
        assert not missing and not extra, f"full and sharded models differ: {sorted(missing)[:3]} {sorted(extra)[:3]}"
    for name, t in mine:
        if info.is_main:
            buf = src[name].to(device=info.device, dtype=t.dtype).contiguous()  # type: ignore[index]
            assert buf.shape == t.shape, f"{name}: {tuple(buf.shape)} vs {tuple(t.shape)}"
        else:
            buf = torch.empty(t.shape, dtype=t.dtype, device=info.device)
        dist.broadcast(buf, src=0)
        if _is_dtensor(t):
            t.copy_(distribute_tensor(buf, t.device_mesh, t.placements, src_data_rank=None))
        else:
            t.copy_(buf)
        del buf
    torch.set_rng_state(broadcast_object(torch.get_rng_state(), info))


@contextlib.contextmanager
def _gathered(slots: Iterable[tuple[nn.Module, str]], writeback: bool) -> Iterator[None]:
    """Swap each sharded parameter `module.<attr>` for a full plain copy, and back on exit (with writeback,
    rank 0's values of the copies are scattered into the shards first). A parameter shared by several
    slots is gathered once and every slot sees the same copy."""
    from torch.distributed.tensor import distribute_tensor
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    copies: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for m, attr in slots:
            p = m._parameters[attr]
            if p is None or not _is_dtensor(p):
                continue
            if id(p) not in copies:
                copies[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=False)
            m._parameters[attr] = copies[id(p)]
            swapped.append((m, attr, p))
    try:
        yield
    finally:
        changed: list[str] = []
        with torch.no_grad():
            written: set[int] = set()
            for m, attr, p in swapped:
                full = m._parameters[attr]
                if writeback and id(p) not in written:
                    written.add(id(p))
                    if full is None or full.shape != p.shape:
                        changed.append(f"{type(m).__name__}.{attr} changed shape from {tuple(p.shape)} to "
                                       f"{None if full is None else tuple(full.shape)}")
                    else:  # every rank scatters (a collective), so a shape error is raised after the loop
                        p.copy_(distribute_tensor(full.detach().to(p.dtype), p.device_mesh, p.placements,
                                                  src_data_rank=0))
                m._parameters[attr] = p  # the shard is put back whatever happened
        if changed:
            raise ValueError(f"{changed[0]} while gathered ({len(changed)} parameters changed); a sharded model "
                             "cannot change its parameter shapes (e.g. the LoRA rank): build the model with the "
                             "new shapes instead")


@contextlib.contextmanager
def full_lora(model: nn.Module, writeback: bool = False) -> Iterator[nn.Module]:
    """Inside the block every LoRA parameter of `model` is a full, plain tensor (FSDP2 shards are
    all-gathered: a collective, every rank must enter). With writeback, values set inside (e.g. by
    load_lora) go back into the shards on exit, taken from rank 0. Without FSDP2 it changes nothing."""
    slots = [(m, attr) for m in lora_layers(model).values() for attr in ("lora_A", "lora_B")]
    with _gathered(slots, writeback):
        yield model


@contextlib.contextmanager
def full_trainable(model: nn.Module, writeback: bool = False) -> Iterator[nn.Module]:
    """`full_lora` for every parameter with requires_grad, LoRA or fully fine-tuned (e.g. a whole ControlNet
    trained under FSDP2), so `model.state_dict()` inside holds the full trained tensors."""
    slots = [(m, name) for m in model.modules() for name, p in m._parameters.items()
             if p is not None and p.requires_grad]
    with _gathered(slots, writeback):
        yield model


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state as full tensors keyed by parameter name, the same layout whatever the
    parallelism, so a checkpoint resumes on another number of processes or mode. Under FSDP2 this is a
    collective; rank 0 receives the state, the other ranks an empty dict."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sd = optimizer.state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    index = {i: names[id(p)] for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    return {"state": {index[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [index[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `optimizer_state_dict` (every rank passes the full state). Index-keyed states, as
    `optimizer.state_dict()` writes them, load too when the model is not sharded."""
    by_name = all(isinstance(n, str) for g in state["param_groups"] for n in g["params"])
    if is_sharded(model):
        if not by_name:
            raise ValueError("this checkpoint's optimizer state is keyed by index; a sharded (FSDP) run needs one "
                             "written by this version (keyed by parameter name)")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    if by_name:
        ids = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        names = {n: ids[id(p)] for n, p in model.named_parameters() if id(p) in ids}
        unknown = [n for g in state["param_groups"] for n in g["params"] if n not in names]
        if unknown:
            raise ValueError(f"optimizer state names parameters the model does not train: {unknown[:3]}; "
                             "resume with the same LoRA targets")
        state = {"state": {names[n]: s for n, s in state["state"].items()},
                 "param_groups": [{**g, "params": [names[n] for n in g["params"]]} for g in state["param_groups"]]}
    optimizer.load_state_dict(state)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Total gradient norm (all ranks' shards included), clipping to `max_norm` when it is > 0."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if _is_dtensor(total):
        total = total.full_tensor()
    return float(total)
