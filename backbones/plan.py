"""Memory and time planner: will a run fit on a GPU, and what to change so that it does.

`plan_run(cfg, spec, world_size)` answers from the model definitions without allocating weights: the in-training
components are built on the meta device, LoRA (or full training) is applied as train.py does, every tensor is
turned into a `FakeTensor`, and ONE training step (forward, loss, backward) of `spec.training_loss` runs on a
fake batch with the shapes the cache would hold. While it runs, a dispatch mode counts the bytes of every
storage created and watches when each one dies (a weakref finalizer per storage), i.e. a simulation of the
live bytes a caching allocator would hand out (`torch.cuda.memory_allocated`), without fragmentation and
rounding. From that simulation come

- the activations saved for backward: live bytes right after the forward minus those before it (whatever
  holds them: autograd nodes, checkpoint frames, the loss);
- the step peak: the highest live bytes during forward + backward (recompute of checkpointed blocks, the
  gradients as they appear, the attention and FFN transients).

Planned "as on CUDA": model.dtype / train.mixed_precision "auto" mean bf16 weights and bf16 autocast. The fake
tensors live on the CPU (this torch has no CUDA to fake), so the trace runs under CPU autocast, whose per-op
policy matches CUDA's for the ops these models use (matmul/conv/SDPA in bf16; layer/group norm, softmax in
fp32); the Wan "fp32 islands" (CUDA autocast in fp32, which CPU autocast cannot do) are emulated by casting the
inputs of linear/conv/matmul to fp32, as CUDA autocast does.

Attention: `F.scaled_dot_product_attention` is replaced during the trace by a function that saves what the
flash / memory-efficient kernels save (q, k, v, the output and a fp32 log-sum-exp [B, H, Lq]), never the score
matrix; xformers' memory_efficient_attention saves the same. Its FLOPs are counted as the flash kernel's
(forward 4·B·H·Lq·Lk·D, backward 10·B·H·Lq·Lk·D incl. the recomputed scores).

Ulysses K: the trace runs one rank of a fake sequence-parallel group (the model's `sp` seam and `attn_op`
wrappers, all-to-alls and gathers reproduced as shape-only autograd functions). FSDP2: parameters, gradients
and optimizer state divided by the world size, plus the all-gathered units (one unit and the prefetched next
one, the root kept gathered), plus the full-size gradients of one unit before its reduce-scatter.

What the simulation does not see: the CUDA context and cuBLAS/NCCL workspaces (a fixed allowance is added,
`CUDA_OVERHEAD`), allocator fragmentation, kernels' internal workspaces, and the real prompt lengths (text
fields are planned at their maximal length).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lora_core.runtime.batch import Batch
from lora_core.runtime.trainable import apply_plan, plan_training

from .spec import BackboneSpec

__all__ = ["Plan", "plan_run", "format_plan", "parse_bytes", "CUDA_OVERHEAD"]

GiB = 2**30
CUDA_OVERHEAD = int(0.75 * GiB)   # CUDA context + cuBLAS/cuDNN workspaces + NCCL buffers (allowance, not traced)
ATTENTION_KERNEL = "flash / memory-efficient SDPA (saves q, k, v, out + fp32 log-sum-exp; no score matrix)"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_bytes(text: str | int | float | None) -> int | None:
    """'24GB' / '24GiB' / '80G' / '24000MB' / a number of bytes -> bytes (GB read as GiB, as nvidia-smi)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise ValueError(f"gpu memory {text!r}: expected e.g. 24GB, 80GB or 40960MB")
    return int(float(m.group(1)) * 1024 ** "bkmgt".index(m.group(2) or "b"))


def _gb(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GB" if abs(n) >= 0.1 * GiB else f"{n / 2**20:.2f} MB"


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    """Per-GPU figures in bytes (counts where named so). `params_by_dtype` holds the bytes each GPU stores
    (sharded under FSDP2); `param_counts_by_dtype` the model's parameter counts (unsharded)."""

    backbone: str
    preset: str
    frames: int
    height: int
    width: int
    batch_size: int
    world_size: int
    parallel: str
    ulysses: int
    dp_size: int
    target: str                       # "cuda" (as planned for a GPU) or "cpu" (validation)
    param_dtype: str
    compute_dtype: str | None         # autocast dtype, None = off
    attention: str
    gradient_checkpointing: bool
    offload_activations: bool
    optimizer: str
    trained: dict[str, str]           # component -> mode
    param_counts_by_dtype: dict[str, int]
    params_by_dtype: dict[str, int]
    lora_params: int                  # LoRA A/B parameters injected (count, unsharded)
    trainable_params: int             # every trained parameter (count, unsharded)
    param_bytes: int                  # all parameters, this GPU
    grad_bytes: int                   # gradients of the trained parameters, this GPU (after reduce-scatter)
    optimizer_bytes: int              # optimizer state, this GPU
    batch_bytes: int                  # the micro-batch on the device
    activation_bytes: int             # saved for backward (live after forward - before), this GPU
    offloaded_bytes: int              # saved tensors moved to host memory (train.offload_activations)
    persistent_bytes: int             # caches the first forward fills and keeps (RoPE tables); in the peaks
    forward_peak_bytes: int           # highest live bytes above the resident ones during forward
    backward_peak_bytes: int          # ... during backward (gradients included as they appear)
    transient_bytes: int              # the largest transient: step peak above resident + saved activations
    parallel_bytes: int               # FSDP2 gathered units / DDP gradient buckets
    optimizer_step_bytes: int         # temporaries of the optimizer step (foreach AdamW)
    overhead_bytes: int               # CUDA context and workspaces (allowance)
    step_peak_bytes: int              # resident + dynamic peak of the training step
    encoder_phases: dict[str, int | None]   # phase -> peak bytes (cache filling, validation sampling)
    peak_bytes: int
    flops_per_step: float             # per GPU, forward + backward (+ recompute), one micro-batch
    tokens: int | None = None         # denoiser sequence length per rank where known
    units: int = 0
    trace_seconds: float = 0.0
    gpu_memory: int | None = None
    fits: bool | None = None
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------- live-bytes tracker
class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of each storage created while active and un-counts it when it dies; `peak` is the
    highest total since the last `reset_peak`. Storages created before (parameters, the batch) are not seen."""

    def __init__(self, existing: Any = ()) -> None:
        super().__init__()
        self._ignore = {t.untyped_storage()._cdata for t in existing}   # pre-existing: parameters, the batch
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}
        self.enabled = True
        self.flops = 0.0
        from torch.utils.flop_counter import flop_registry
        self._flop_registry = flop_registry

    def _free(self, key: int, n: int) -> None:
        if self._seen.pop(key, None) is not None:
            self.live -= n

    def reset_peak(self) -> None:
        self.peak = self.live

    def add(self, n: int) -> None:   # bytes created outside dispatch (none so far; kept for hooks)
        self.live += n
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        try:
            out = func(*args, **(kwargs or {}))
        except DataDependentOutputException:
            if func is not torch.ops.aten._local_scalar_dense.default:
                raise
            # a value read from a fake tensor (range checks, "all frames known?"): a benign stand-in
            dt = args[0].dtype
            return True if dt == torch.bool else (0 if not dt.is_floating_point else 1.0)
        if not self.enabled:
            return out
        count = self._flop_registry.get(func._overloadpacket)
        if count is not None:   # torch.utils.flop_counter's formulas (FlopCounterMode itself retains
            self.flops += count(*args, **(kwargs or {}), out_val=out)   # checkpoint recomputes: not used)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                try:
                    st = t.untyped_storage()
                except (RuntimeError, NotImplementedError):
                    continue
                key = st._cdata
                if key in self._seen or key in self._ignore:
                    continue
                n = st.nbytes()
                self._seen[key] = n
                self.live += n
                weakref.finalize(st, self._free, key, n)
        self.peak = max(self.peak, self.live)
        return out


# -------------------------------------------------------------------------- attention as flash saves
class _FlashLike(torch.autograd.Function):
    """q/k/v [B, H, L, D] -> out [B, H, Lq, Dv]; saves what flash saves; shape-only (fake tensors)."""

    flops = [0.0]

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        b, h, lq, d = q.shape
        lk = k.shape[-2]
        out = q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype)
        lse = q.new_empty((*q.shape[:-1],), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask = mask
        ctx.shape = (b * h if q.ndim == 4 else math.prod(q.shape[:-2]), lq, lk, d)
        n, lq, lk, d = ctx.shape
        _FlashLike.flops[0] += 4.0 * n * lq * lk * d
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        n, lq, lk, d = ctx.shape
        _FlashLike.flops[0] += 10.0 * n * lq * lk * d
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
          dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
          enable_gqa: bool = False) -> torch.Tensor:
    dt = query.dtype
    if torch.is_autocast_enabled("cpu"):   # SDPA is a lower-precision op under autocast
        dt = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dt) for t in (query, key, value))
    if not (query.requires_grad or key.requires_grad or value.requires_grad) or not torch.is_grad_enabled():
        _FlashLike.flops[0] += 4.0 * math.prod(query.shape[:-1]) * key.shape[-2] * query.shape[-1]
        return query.new_empty((*query.shape[:-1], value.shape[-1]))
    return _FlashLike.apply(query, key, value, attn_mask)


# --------------------------------------------------------------- fp32 islands (CUDA autocast fp32)
class _Fp32Compute(torch.overrides.TorchFunctionMode):
    _OPS = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, torch.bmm, torch.mm, torch.addmm,
            torch.baddbmm}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in self._OPS:
            args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            kwargs = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                      for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def _cuda_like_fp32_island(device_type: str) -> Iterator[None]:
    with torch.autocast(device_type, enabled=False), _Fp32Compute():
        yield


@contextlib.contextmanager
def _patched(autocast_on: bool) -> Iterator[None]:
    """SDPA as flash; Wan's fp32 islands as on CUDA (only when bf16/fp16 autocast is planned)."""
    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa  # type: ignore[assignment]
    wan = None
    try:
        from .wan import dit as wan
        old_island = wan._fp32_island
        if autocast_on:
            wan._fp32_island = _cuda_like_fp32_island  # type: ignore[assignment]
    except ImportError:  # pragma: no cover
        wan = None
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved  # type: ignore[assignment]
        if wan is not None:
            wan._fp32_island = old_island  # type: ignore[assignment]


# ------------------------------------------------------------------------------ fake Ulysses group
class _ShapeA2A(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scatter_dim: int, gather_dim: int, size: int) -> torch.Tensor:
        ctx.args = (x.shape, scatter_dim, gather_dim, size)
        shape = list(x.shape)
        shape[scatter_dim] //= size
        shape[gather_dim] *= size
        return x.new_empty(shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return grad.new_empty(ctx.args[0]), None, None, None


class _ShapeGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        ctx.args = (x.shape,)
        shape = list(x.shape)
        shape[dim] *= size
        return x.new_empty(shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return grad.new_empty(ctx.args[0]), None, None


class _FakeUlysses:
    """Rank 0 of a Ulysses group of `size` ranks, shapes only (what `UlyssesGroup` provides)."""

    def __init__(self, size: int) -> None:
        self.size, self.rank = size, 0

    def layout(self, n: int) -> tuple[int, int, int, int]:
        from lora_core.distributed.ulysses import _layout
        return _layout(n, self.size, self.rank)

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        from lora_core.distributed.ulysses import _shard
        return _shard(x, dim, self.size, self.rank)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return _ShapeGather.apply(x.contiguous(), dim, self.size)

    def all_to_all(self, x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        return _ShapeA2A.apply(x, scatter_dim, gather_dim, self.size)


def _apply_fake_ulysses(model: nn.Module, size: int) -> None:
    from lora_core.distributed.ulysses import UlyssesAttention
    if not hasattr(model, "sp"):
        raise ValueError(f"{type(model).__name__} has no sequence-parallel seam; plan with --ulysses 1")
    sp = _FakeUlysses(size)
    for m in model.modules():
        if "attn_op" in vars(m):
            m.attn_op = UlyssesAttention(m.attn_op, sp)  # type: ignore[arg-type]
    model.sp = sp


# ------------------------------------------------------------------------------- dtypes and counts
def _param_dtype(cfg: Any, target: str) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if target == "cuda" else torch.float32
    return _DTYPES[cfg.model.dtype]


def _autocast(cfg: Any, target: str) -> torch.dtype | None:
    mp = cfg.train.mixed_precision
    if mp == "fp32" or (mp == "auto" and target != "cuda"):
        return None
    return torch.float16 if mp == "fp16" else torch.bfloat16


def _name(dt: torch.dtype | None) -> str:
    return "off" if dt is None else str(dt).removeprefix("torch.")


def _adam_state_bytes(numels: list[int], name: str) -> int:
    if name == "adamw":
        return sum(8 * n for n in numels)   # exp_avg + exp_avg_sq in fp32 (the step count is a scalar)
    total = 0
    for n in numels:   # bitsandbytes AdamW8bit: 8-bit blockwise state (2 x uint8, fp32 absmax per 256) >= 4096
        total += (2 * n + 2 * 4 * math.ceil(n / 256)) if n >= 4096 else 8 * n
    return total


# ------------------------------------------------------------------------------------ fake batches
def _fake(shape: tuple[int, ...] | list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(tuple(shape), dtype=dtype)


def _latent_grid(frames: int, height: int, width: int, t: int, s: int, causal: bool = True) -> tuple[int, int, int]:
    f = (frames - 1) // t + 1 if causal else frames
    return f, height // s, width // s


def batch_fields(spec: BackboneSpec, preset: str, cfg: Any, trained: frozenset[str]) -> tuple[dict, list, dict]:
    """The fields of one sample as the cache would hold them: {name: (shape, dtype, real value or None)},
    its metadata, and {field: description}. Per-backbone knowledge (read from each spec's encode_media /
    encode_text); a tensor with a real value is created real (the objective reads it), the others fake."""
    frames, h, w = cfg.data.num_frames, cfg.data.height, cfg.data.width
    name = _family(spec)
    comps = _meta_components(spec, preset)
    fields: dict[str, tuple] = {}
    meta: dict[str, Any] = {"fps": 24.0, "num_frames": frames}
    if name == "wan_ti2v":
        vae = comps["vae"].cfg
        f, lh, lw = _latent_grid(frames, h, w, vae.temporal_factor, vae.spatial_factor)
        fields["latents"] = ((vae.z_dim, f, lh, lw), torch.float32, None)
        dit = comps["dit"].config
        fields["context"] = ((dit.text_len, dit.text_dim), torch.float32, None)   # the longest caption
    elif name in ("sd15", "animatediff"):
        vae = comps["vae"]
        s = 2 ** (len(vae.cfg.block_out_channels) - 1)
        z = vae.cfg.latent_channels
        shape = (z, h // s, w // s) if name == "sd15" else (z, frames, h // s, w // s)
        fields["latent_mean"] = (shape, torch.float32, None)
        fields["latent_logvar"] = (shape, torch.float32, None)
        te = comps["text_encoder"].cfg
        ln = getattr(te, "max_position_embeddings", 77)
        if "text_encoder" in trained:
            fields["text"] = ((ln,), torch.long, 0)
        else:
            fields["text"] = ((ln, te.hidden_size), torch.float32, None)
    elif name == "cogvideox":
        vae = comps["vae"].config
        s = 2 ** (len(vae.block_out_channels) - 1)
        t = 2 ** getattr(vae, "temporal_compress_level", 2)
        shape = (vae.latent_channels, (frames - 1) // int(t) + 1, h // s, w // s)
        fields["latent_mean"] = (shape, torch.float32, None)
        fields["latent_logvar"] = (shape, torch.float32, None)
        if any(f.name == "image_mean" for f in spec.cache_fields(preset, trained)):
            fields["image_mean"] = ((vae.latent_channels, 1, h // s, w // s), torch.float32, None)
            fields["image_logvar"] = ((vae.latent_channels, 1, h // s, w // s), torch.float32, None)
        fields["text"] = ((226, comps["text_encoder"].cfg.dim), torch.float32, None)
    elif name in ("svd", "framer"):
        vae = comps["vae"].cfg
        s = 2 ** (len(vae.block_out_channels) - 1)
        z = vae.latent_channels
        n_cond = 2 if name == "framer" else 1
        fields["latent_mean"] = ((frames, z, h // s, w // s), torch.float32, None)
        fields["latent_logvar"] = ((frames, z, h // s, w // s), torch.float32, None)
        fields["frame_mask"] = ((frames,), torch.float32, 1.0)
        fields["cond_latent"] = ((n_cond, z, h // s, w // s), torch.float32, None)
        fields["cond_sigma"] = ((), torch.float32, 0.02)
        fields["clip_embeds"] = ((n_cond, comps["image_encoder"].cfg.projection_dim), torch.float32, None)
        fields["motion"] = ((), torch.float32, 127.0)
        if name == "framer":
            fields["tracks"] = ((frames, 0, 2), torch.float32, 0.0)
        meta.update(fps=7.0, extra={}, known_frames=list(range(frames)))
    else:
        raise ValueError(f"the planner has no batch layout for backbone {name!r}; add it to backbones/plan.py "
                         "(batch_fields)")
    want = {f.name for f in spec.cache_fields(preset, trained)}
    missing = want - set(fields)
    if missing:
        raise ValueError(f"planner batch for {name!r} lacks cache fields {sorted(missing)}")
    return {k: v for k, v in fields.items() if k in want}, [meta], {}


_FAMILIES = ("wan_ti2v", "sd15", "animatediff", "cogvideox", "svd", "framer")


def _family(spec: BackboneSpec) -> str:
    """The known family a spec is (or derives from): its batch layout and encoders."""
    for cls in type(spec).__mro__:
        if getattr(cls, "name", None) in _FAMILIES:
            return cls.name  # type: ignore[attr-defined]
    return spec.name


_META_CACHE: dict[tuple[str, str], dict[str, nn.Module]] = {}


def _meta_components(spec: BackboneSpec, preset: str) -> dict[str, nn.Module]:
    key = (spec.name, preset)
    if key not in _META_CACHE:
        _META_CACHE[key] = spec.component_specs(preset)
    return _META_CACHE[key]


def _make_batch(fields: dict, metas: list, batch_size: int, seed: int = 0) -> Batch:
    out: dict[str, list[torch.Tensor]] = {}
    for k, (shape, dtype, value) in fields.items():
        if value is None:
            out[k] = [_fake(shape, dtype) for _ in range(batch_size)]
        else:
            out[k] = [t for t in [torch.full(shape, value, dtype=dtype) for _ in range(batch_size)]]
    return Batch(out, [dict(metas[0]) for _ in range(batch_size)], [seed + i for i in range(batch_size)],
                 dropped={})


def _bytes_of(fields: dict, batch_size: int) -> int:
    return batch_size * sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d, _ in fields.values())


# ----------------------------------------------------------------------------------------- tracing
@dataclass
class _Trace:
    activation: int
    forward_peak: int
    backward_peak: int
    offloaded: int
    flops: float
    tokens: int | None
    persistent: int = 0


def _build_in_training(cfg: Any, spec: BackboneSpec, pdtype: torch.dtype) -> tuple[dict, dict, dict]:
    preset = cfg.model.preset
    plans = plan_training(cfg, spec.components(preset))
    metas = spec.component_specs(preset)   # fresh modules: LoRA injection mutates them
    extra = set()
    if hasattr(spec, "frozen_in_training"):
        from lora_core.runtime.trainable import TrainPlan
        trained = frozenset(n for n, p in plans.items() if p.mode != "frozen")
        extra = set(spec.frozen_in_training(preset, cfg.objective, trained)) - set(plans)
        for n in sorted(extra):
            plans[n] = TrainPlan(name=n, mode="frozen")
    models: dict[str, nn.Module] = {}
    for name, p in plans.items():
        module = metas[name].to(pdtype)
        apply_plan(module, p)
        models[name] = module
    return models, plans, metas


def _trace_step(cfg: Any, spec: BackboneSpec, models: dict[str, nn.Module], plans: dict, fields: dict,
                metas: list, amp: torch.dtype | None, offload: bool, ulysses: int) -> _Trace:
    from lora_core import fused
    from lora_core.distributed.parallelize import apply_activation_checkpointing

    offloaded = [0]
    packed: dict[int, int] = {}   # storages offloaded and still alive on the device side (dedupe views)

    def pack(t: torch.Tensor) -> Any:
        if isinstance(t, nn.Parameter) or t.requires_grad and t.is_leaf:
            return t   # parameters are not activations
        st = t.untyped_storage()
        if st._cdata not in packed:
            packed[st._cdata] = st.nbytes()
            offloaded[0] += st.nbytes()
            weakref.finalize(st, packed.pop, st._cdata, None)
        return (t.shape, t.stride(), t.dtype, t.storage_offset(), t.untyped_storage().nbytes(), t.requires_grad)

    def unpack(x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x
        shape, stride, dtype, offset, _, _ = x
        return torch.empty_strided(shape, stride, dtype=dtype)

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _FlashLike.flops[0] = 0.0
    with mode, _patched(amp is not None):
        for name, module in models.items():
            module.to_empty(device="cpu")
            if ulysses > 1 and name == _primary(plans):
                _apply_fake_ulysses(module, ulysses)
            if cfg.train.gradient_checkpointing and plans[name].mode != "frozen":
                apply_activation_checkpointing(spec.units(name, module))
            module.train()
        batch = _make_batch(fields, metas, cfg.train.batch_size, cfg.train.seed)
        tracker = _LiveBytes(_existing(models, batch))
        hooks = (torch.autograd.graph.saved_tensors_hooks(pack, unpack) if offload
                 else contextlib.nullcontext())
        with tracker:
            base = tracker.live
            with fused.dropout_scope([s for s in batch.seeds]), \
                    torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None), hooks:
                loss = spec.training_loss(models, batch, cfg.objective)
            activation = tracker.live - base
            forward_peak = tracker.peak - base
            tracker.reset_peak()
            loss.backward()
            del loss
            backward_peak = tracker.peak - base
            # what outlives the step besides the gradients: caches the forward filled (e.g. RoPE tables); they
            # persist from the first step on, so they are not activations (they stay in the peaks)
            grads = sum(p.grad.untyped_storage().nbytes() for m in models.values() for p in m.parameters()
                        if p.grad is not None and p.grad.untyped_storage()._cdata in tracker._seen)
            persistent = max(0, tracker.live - base - grads)
            activation = max(0, activation - persistent)
    tokens = None
    for m in models.values():
        tok = getattr(m, "_plan_tokens", None)
        tokens = tok if tok is not None else tokens
    return _Trace(activation, forward_peak, backward_peak, offloaded[0],
                  float(tracker.flops) + _FlashLike.flops[0], tokens, persistent)


def _block_list(spec: BackboneSpec, name: str, module: nn.Module) -> str | None:
    """The attribute holding the module's units as one ModuleList of identical blocks, if so."""
    units = spec.units(name, module)
    if len(units) < 4:
        return None
    shapes = [[tuple(p.shape) for p in u.parameters()] for u in units]
    if any(type(u) is not type(units[0]) or sh != shapes[0] for u, sh in zip(units, shapes)):
        return None
    for attr, child in module._modules.items():
        if isinstance(child, nn.ModuleList) and len(child) == len(units) and all(a is b for a, b in zip(child, units)):
            return attr
    return None


def _trace(cfg: Any, spec: BackboneSpec, pdtype: torch.dtype, fields: dict, bmeta: list, amp: torch.dtype | None,
           k: int, notes: list[str], exact: bool = False) -> _Trace:
    offload = bool(cfg.train.offload_activations)
    models, plans, _ = _build_in_training(cfg, spec, pdtype)
    primary = _primary(plans)
    attr = None if exact else _block_list(spec, primary, models[primary])
    if attr is None:
        return _trace_step(cfg, spec, models, plans, fields, bmeta, amp, offload, k)
    n = len(getattr(models[primary], attr))
    runs = []
    for m in (2, 3):
        mods, pl, _ = _build_in_training(cfg, spec, pdtype) if runs else (models, plans, None)
        setattr(mods[primary], attr, nn.ModuleList(list(getattr(mods[primary], attr))[:m]))
        runs.append(_trace_step(cfg, spec, mods, pl, fields, bmeta, amp, offload, k))
    a, b = runs

    def ext(x: float, y: float) -> Any:
        v = x + (n - 2) * (y - x)
        return type(x)(round(v)) if isinstance(x, int) else v
    notes.append(f"traced with 2 and 3 of the {n} identical {primary} blocks, extrapolated linearly")
    return _Trace(ext(a.activation, b.activation), ext(a.forward_peak, b.forward_peak),
                  ext(a.backward_peak, b.backward_peak), ext(a.offloaded, b.offloaded), ext(a.flops, b.flops),
                  a.tokens, ext(a.persistent, b.persistent))


def _cast_meta(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """module.to(dtype) for a meta module, parameter by parameter (`.to` refuses to swap tied parameters)."""
    try:
        return module.to(dtype)
    except RuntimeError:
        for m in module.modules():
            for k, p in list(m._parameters.items()):
                if p is not None and p.is_floating_point():
                    m._parameters[k] = nn.Parameter(torch.empty_like(p, dtype=dtype), requires_grad=p.requires_grad)
        return module


def _to_fake(module: nn.Module) -> None:
    """module.to_empty(device="cpu") under FakeTensorMode; tied parameters are replaced one by one (keeping the
    tie), where `to_empty` refuses to swap them."""
    try:
        module.to_empty(device="cpu")
        return
    except RuntimeError:
        pass
    memo: dict[int, Any] = {}
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for k, p in list(store.items()):
                if p is None or p.device.type != "meta":
                    continue
                if id(p) not in memo:
                    t = torch.empty(p.shape, dtype=p.dtype)
                    memo[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) \
                        else t
                store[k] = memo[id(p)]


def _existing(models: dict[str, nn.Module], batch: Batch | None = None) -> list[torch.Tensor]:
    out = [t for m in models.values() for t in [*m.parameters(), *m.buffers()]]
    if batch is not None:
        out += [t for v in batch.fields.values() for t in v]
    return out


def _primary(plans: dict) -> str:
    return next(n for n, p in plans.items() if p.mode != "frozen")


# ------------------------------------------------------------------------------------ encode phases
def _encoder_phases(cfg: Any, spec: BackboneSpec, pdtype: torch.dtype, amp: torch.dtype | None,
                    comps: dict[str, nn.Module], in_training: set[str], resident_params: int,
                    notes: list[str]) -> dict[str, int | None]:
    """Peaks of the phases outside the training step: filling the cache (VAE, text / image encoders: their
    weights + one sample's no-grad forward, traced), and validation sampling (every sampling component's weights
    + one no-grad denoiser forward at the validation size; the VAE decode is not traced)."""
    out: dict[str, int | None] = {}
    preset = cfg.model.preset
    frames, h, w = cfg.data.num_frames, cfg.data.height, cfg.data.width

    def weights(mod: nn.Module, dt: torch.dtype) -> int:
        return sum(p.numel() * (dt.itemsize if p.is_floating_point() else p.element_size())
                   for p in mod.parameters())

    def traced(fn: Callable[[dict[str, nn.Module]], Any], parts: list[str], dts: dict[str, torch.dtype],
               extra: dict[str, nn.Module] | None = None) -> int:
        fresh = spec.component_specs(preset) if parts else {}
        mods = {p: _cast_meta(fresh[p], dts[p]) for p in parts}
        mods.update(extra or {})
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode, _patched(amp is not None):
            for m in mods.values():
                _to_fake(m)
                m.eval()
            tr = _LiveBytes(_existing(mods))
            with tr, torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                fn(mods)
            return tr.peak

    name = _family(spec)
    vae_dt = torch.float32 if name == "wan_ti2v" else pdtype
    try:
        if "vae" in comps:
            def enc(m: dict[str, nn.Module]) -> Any:
                video = _fake((1, 3, frames, h, w))
                if name == "wan_ti2v":
                    return m["vae"].encode(video.to(vae_dt))
                if name == "cogvideox":
                    return m["vae"].encode(video.to(vae_dt))
                if name == "animatediff":
                    return m["vae"].encode_dist(video[0].permute(1, 0, 2, 3)[:16].to(vae_dt))
                if name in ("svd", "framer"):
                    return m["vae"].encode_dist(video[0].permute(1, 0, 2, 3).to(vae_dt))
                return m["vae"].encode_dist(video[:, :, 0].to(vae_dt))
            out["vae encode (cache)"] = weights(comps["vae"], vae_dt) + traced(enc, ["vae"], {"vae": vae_dt})
    except Exception as e:  # noqa: BLE001 - a phase that cannot be traced is reported, not fatal
        out["vae encode (cache)"] = None
        notes.append(f"VAE encode not traced ({type(e).__name__}: {str(e)[:80]})")
    te_name = "text_encoder" if "text_encoder" in comps else ("image_encoder" if "image_encoder" in comps else None)
    if te_name is not None and te_name not in in_training:
        try:
            mod = comps[te_name]

            def text(m: dict[str, nn.Module]) -> Any:
                enc = m[te_name]
                if te_name == "image_encoder":
                    from .encoders.clip_vision import encode_image
                    return encode_image(enc, _fake((2 if name == "framer" else 1, 3, h, w)).to(pdtype))
                length = 512 if name == "wan_ti2v" else (226 if name == "cogvideox" else 77)
                return enc(torch.zeros((1, length), dtype=torch.long))
            out[f"{te_name.replace('_', ' ')} (cache)"] = weights(mod, pdtype) + traced(text, [te_name],
                                                                                          {te_name: pdtype})
        except Exception as e:  # noqa: BLE001
            out[f"{te_name.replace('_', ' ')} (cache)"] = None
            notes.append(f"{te_name} forward not traced ({type(e).__name__}: {str(e)[:80]})")
    if cfg.validation.every > 0:
        others = sum(weights(m, vae_dt if n == "vae" else pdtype) for n, m in comps.items() if n not in in_training)
        v = copy.deepcopy(cfg)
        v.data.num_frames, v.data.height, v.data.width = cfg.validation.frames, cfg.validation.height, \
            cfg.validation.width
        v.train.batch_size = 1
        v.train.gradient_checkpointing = False
        try:
            trained = frozenset(n for n, p in plan_training(v, spec.components(preset)).items() if p.mode != "frozen")
            fields, metas, _ = batch_fields(spec, preset, v, trained)
            models, plans, _ = _build_in_training(v, spec, pdtype)

            def denoise(mods: dict) -> None:
                spec.training_loss(mods, _make_batch(fields, metas, 1), v.objective)
            out["validation sampling"] = resident_params + others + traced(denoise, [], {}, models)
            notes.append("validation: weights of every sampling component + one no-grad denoiser forward at the "
                         "validation size; the VAE decode of the result is not traced")
        except Exception as e:  # noqa: BLE001
            out["validation sampling"] = None
            notes.append(f"validation sampling not traced ({type(e).__name__}: {str(e)[:80]})")
    return out


# --------------------------------------------------------------------------------------- plan_run
def plan_run(cfg: Any, spec: BackboneSpec, world_size: int = 1, *, gpu_memory: int | str | None = None,
             target: str = "cuda", suggest: bool = True, phases: bool = True, exact: bool = False) -> Plan:
    """Plan one training step of the resolved `cfg` per GPU of a `world_size` run (see the module docstring).
    `gpu_memory` (bytes or '24GB') adds whether it fits and, if not, the cheapest changes that do.
    `target="cpu"` plans the CPU dtypes (for validation against CPU measurements). A denoiser whose units are
    one list of identical blocks is traced with 2 and 3 blocks and extrapolated linearly to all of them (the
    blocks are identical, so every traced quantity grows by the same amount per block); `exact=True` traces
    every block."""
    t0 = time.perf_counter()
    preset = cfg.model.preset
    k = max(1, int(cfg.parallel.ulysses))
    if world_size % k:
        raise ValueError(f"--ulysses {k} does not divide the world size {world_size}")
    if k > 1:
        heads = spec.sequence_parallel(preset)
        if heads is None:
            raise ValueError(f"backbone {spec.name!r} has no sequence-parallel seam; plan with --ulysses 1")
        if heads % k:
            raise ValueError(f"Ulysses size {k} does not divide the {heads} attention heads")
    fsdp = cfg.parallel.mode == "fsdp" and world_size > 1
    shard = world_size if fsdp else 1
    pdtype = _param_dtype(cfg, target)
    amp = _autocast(cfg, target)
    notes: list[str] = []

    models, plans, metas = _build_in_training(cfg, spec, pdtype)
    trained_names = frozenset(n for n, p in plans.items() if p.mode != "frozen")
    counts: dict[str, int] = {}
    lora = 0
    trainable_numels: list[int] = []
    unit_bytes: list[int] = []
    unit_grad: list[int] = []
    root_bytes = 0
    n_units = 0
    for name, m in models.items():
        units = spec.units(name, m) if plans[name].mode != "frozen" else []
        n_units += len(units)
        in_units = set()
        for u in units:
            ps = list(u.parameters())
            in_units |= {id(p) for p in ps}
            unit_bytes.append(sum(p.numel() * p.element_size() for p in ps))
            unit_grad.append(sum(p.numel() * p.element_size() for p in ps if p.requires_grad))
        for pn, p in m.named_parameters():
            dt = _name(p.dtype)
            counts[dt] = counts.get(dt, 0) + p.numel()
            if p.requires_grad:
                trainable_numels.append(p.numel())
                if pn.endswith(("lora_A", "lora_B")) or ".lora_A." in pn or ".lora_B." in pn:
                    lora += p.numel()
            if id(p) not in in_units:
                root_bytes += p.numel() * p.element_size()
    isz = {n: torch.empty((), dtype=getattr(torch, n)).element_size() for n in counts}
    params_by_dtype = {n: -(-c * isz[n] // shard) for n, c in counts.items()}
    param_bytes = sum(params_by_dtype.values())
    trainable_bytes = sum(n * 4 for n in trainable_numels)   # masters are fp32 (LoRA) -- recomputed below
    trainable_bytes = sum(p.numel() * p.element_size() for m in models.values() for p in m.parameters()
                          if p.requires_grad)
    grad_bytes = -(-trainable_bytes // shard)
    optimizer_bytes = -(-_adam_state_bytes(trainable_numels, cfg.optim.name) // shard)

    fields, bmeta, _ = batch_fields(spec, preset, cfg, trained_names)
    batch_bytes = _bytes_of(fields, cfg.train.batch_size)
    tr = _trace(cfg, spec, pdtype, fields, bmeta, amp, k, notes, exact=exact)

    # parallel buffers
    parallel_bytes = 0
    if fsdp:
        biggest = max(unit_bytes, default=0)
        # root kept gathered (its full params minus its shard) + the gathered unit and the prefetched next one
        parallel_bytes = (root_bytes - root_bytes // shard) + 2 * (biggest - biggest // shard) \
            + max(unit_grad, default=0)
        notes.append("FSDP2: root kept gathered, one unit all-gathered + one prefetched, one unit's full "
                     "gradients before the reduce-scatter")
    elif world_size > 1:
        parallel_bytes = trainable_bytes   # DDP gradient buckets (a copy of the gradients)
        notes.append("DDP: gradient buckets (one copy of the trained parameters' gradients)")
    optimizer_step_bytes = 2 * -(-sum(n * 4 for n in trainable_numels) // shard)   # foreach temporaries
    resident = param_bytes + optimizer_bytes + batch_bytes
    dyn_peak = max(tr.forward_peak, tr.backward_peak)
    step_peak = resident + dyn_peak + parallel_bytes + CUDA_OVERHEAD if target == "cuda" else \
        resident + dyn_peak + parallel_bytes
    after_bwd = resident + grad_bytes + optimizer_step_bytes + parallel_bytes
    step_peak = max(step_peak, after_bwd + (CUDA_OVERHEAD if target == "cuda" else 0))
    transient = max(0, dyn_peak - tr.activation - tr.persistent)
    enc: dict[str, int | None] = {}
    if phases:
        comps = _meta_components(spec, preset)
        full_params = sum(c * isz[n] for n, c in counts.items())   # sampling uses the whole (gathered) model
        enc = _encoder_phases(cfg, spec, pdtype, amp, comps, set(models), full_params, notes)
        if target == "cuda":
            enc = {kk: (None if v is None else v + CUDA_OVERHEAD) for kk, v in enc.items()}
    peak = max([step_peak] + [v for v in enc.values() if v is not None])
    if cfg.train.offload_activations:
        notes.append(f"offload: {_gb(tr.offloaded)} of saved tensors live in (pinned) host memory per GPU")
    if amp is not None and target == "cuda":
        notes.append("traced under CPU autocast (same per-op policy as CUDA for these models: matmul/conv/SDPA in "
                     f"{_name(amp)}, norms and softmax in fp32); Wan fp32 islands emulated")
    plan = Plan(
        backbone=spec.name, preset=preset, frames=cfg.data.num_frames, height=cfg.data.height,
        width=cfg.data.width, batch_size=cfg.train.batch_size, world_size=world_size, parallel=cfg.parallel.mode,
        ulysses=k, dp_size=world_size // k, target=target, param_dtype=_name(pdtype), compute_dtype=_name(amp),
        attention=ATTENTION_KERNEL, gradient_checkpointing=bool(cfg.train.gradient_checkpointing),
        offload_activations=bool(cfg.train.offload_activations), optimizer=cfg.optim.name,
        trained={n: p.mode for n, p in plans.items()}, param_counts_by_dtype=counts,
        params_by_dtype=params_by_dtype, lora_params=lora, trainable_params=sum(trainable_numels),
        param_bytes=param_bytes, grad_bytes=grad_bytes, optimizer_bytes=optimizer_bytes, batch_bytes=batch_bytes,
        activation_bytes=tr.activation, offloaded_bytes=tr.offloaded, persistent_bytes=tr.persistent, forward_peak_bytes=tr.forward_peak,
        backward_peak_bytes=tr.backward_peak, transient_bytes=transient, parallel_bytes=parallel_bytes,
        optimizer_step_bytes=optimizer_step_bytes, overhead_bytes=CUDA_OVERHEAD if target == "cuda" else 0,
        step_peak_bytes=step_peak, encoder_phases=enc, peak_bytes=peak, flops_per_step=tr.flops,
        tokens=tr.tokens, units=n_units, notes=notes)
    plan.trace_seconds = time.perf_counter() - t0
    if gpu_memory is not None:
        plan.gpu_memory = parse_bytes(gpu_memory)
        plan.fits = plan.peak_bytes <= plan.gpu_memory
        if not plan.fits and suggest:
            plan.suggestions = suggest_changes(cfg, spec, world_size, plan.gpu_memory, target)
    return plan


# ---------------------------------------------------------------------------------------- suggest
def _with(cfg: Any, **changes: Any) -> Any:
    c = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(c, section), key, value)
    return c


def _fits(cfg: Any, spec: BackboneSpec, world: int, budget: int, target: str) -> tuple[bool, int]:
    try:
        p = plan_run(cfg, spec, world, target=target, suggest=False, phases=False)
    except ValueError:
        return False, 0
    return p.step_peak_bytes <= budget, p.step_peak_bytes


def suggest_changes(cfg: Any, spec: BackboneSpec, world: int, budget: int, target: str = "cuda",
                    limit: int = 4) -> list[str]:
    """Single changes that make the training step fit, cheapest first (in what they cost the run: compute for
    checkpointing, host transfers for offload, GPUs for Ulysses, then what the run trains on)."""
    out: list[str] = []
    gc_on = bool(cfg.train.gradient_checkpointing)
    off = bool(cfg.train.offload_activations)
    tried: list[tuple[str, Any, int]] = []
    if not gc_on:
        tried.append(("train.gradient_checkpointing=true (about +30% compute)",
                      _with(cfg, train__gradient_checkpointing=True), world))
    if cfg.optim.name == "adamw":
        tried.append(("optim.name=adamw8bit", _with(cfg, optim__name="adamw8bit"), world))
    if not off:
        tried.append(("train.offload_activations=true (host transfers each step)",
                      _with(cfg, train__offload_activations=True), world))
    if not gc_on and not off:
        tried.append(("train.gradient_checkpointing=true train.offload_activations=true",
                      _with(cfg, train__gradient_checkpointing=True, train__offload_activations=True), world))
    heads = spec.sequence_parallel(cfg.model.preset)
    if heads:
        for kk in (2, 4, 8):
            if heads % kk or kk <= cfg.parallel.ulysses:
                continue
            w = world if world % kk == 0 else max(world, kk)
            c = _with(cfg, parallel__ulysses=kk)
            if not gc_on:
                c.train.gradient_checkpointing = True
            mode = "fsdp" if w > 1 else cfg.parallel.mode
            c.parallel.mode = mode
            extra = "" if w == world else f" on {w} GPUs"
            tried.append((f"--ulysses {kk}{extra}" + ("" if gc_on else " with gradient checkpointing")
                          + (" --parallel fsdp" if mode == "fsdp" and cfg.parallel.mode != "fsdp" else ""), c, w))
            break
    for label, c, w in tried:
        ok, peak = _fits(c, spec, w, budget, target)
        if ok:
            out.append(f"{label}: step peak {_gb(peak)}")
        if len(out) >= limit:
            return out
    # what the run trains on: fewer frames, a smaller bucket (with checkpointing where it was off)
    rules = spec.media_rules(cfg.model.preset)
    base = _with(cfg, train__gradient_checkpointing=True) if not gc_on else cfg
    extra = "" if gc_on else " + gradient checkpointing"
    if rules.kind == "video":
        mult, offset = max(1, rules.frame_multiple), rules.frame_offset
        n = cfg.data.num_frames
        cand = sorted({max(offset + mult, int((n * r - offset) // mult) * mult + offset) for r in (0.75, 0.5, 0.33, 0.2)},
                      reverse=True)
        for f in cand:
            if f >= n:
                continue
            c = copy.deepcopy(base)
            c.data.num_frames = f
            ok, peak = _fits(c, spec, world, budget, target)
            if ok:
                out.append(f"data.num_frames={f}{extra}: step peak {_gb(peak)}")
                break
    sm = max(1, rules.size_multiple)
    for r in (0.75, 0.5, 0.375, 0.25):
        hh = max(sm, int(cfg.data.height * r) // sm * sm)
        ww = max(sm, int(cfg.data.width * r) // sm * sm)
        if (hh, ww) == (cfg.data.height, cfg.data.width):
            continue
        c = copy.deepcopy(base)
        c.data.height, c.data.width = hh, ww
        ok, peak = _fits(c, spec, world, budget, target)
        if ok:
            out.append(f"data.height={hh} data.width={ww}{extra}: step peak {_gb(peak)}")
            break
    if not out:
        out.append("nothing tried fits (checkpointing, offload, Ulysses, fewer frames, a smaller bucket); "
                   "use more GPUs with --parallel fsdp or a GPU with more memory")
    return out


# ----------------------------------------------------------------------------------------- format
def format_plan(plan: Plan) -> str:
    p = plan
    par = f"{p.parallel} x{p.world_size}" if p.world_size > 1 else "1 GPU"
    lines = [f"plan: {p.backbone} ({p.preset}), {p.frames}x{p.height}x{p.width}, batch {p.batch_size}, {par}, "
             f"Ulysses {p.ulysses} (dp {p.dp_size}); planned for {'a CUDA GPU' if p.target == 'cuda' else 'the CPU'}",
             f"  weights {p.param_dtype}, autocast {p.compute_dtype}, gradient checkpointing "
             f"{'on' if p.gradient_checkpointing else 'off'}, activation offload "
             f"{'on' if p.offload_activations else 'off'}, optimizer {p.optimizer}",
             f"  attention kernel assumed: {p.attention}",
             f"  trained: {', '.join(f'{n} ({m})' for n, m in p.trained.items())}; {p.trainable_params:,} trained "
             f"parameters ({p.lora_params:,} LoRA)",
             "  per GPU:"]
    for dt, n in p.param_counts_by_dtype.items():
        lines.append(f"    parameters {dt:9s} {n:>15,d}  {_gb(p.params_by_dtype[dt]):>10s}"
                     + (" (sharded)" if p.parallel == "fsdp" and p.world_size > 1 else ""))
    rows = [("gradients", p.grad_bytes), ("optimizer state", p.optimizer_bytes), ("batch", p.batch_bytes),
            ("activations saved for backward", p.activation_bytes),
            ("largest transient of the step", p.transient_bytes),
            ("caches kept by the model (RoPE)", p.persistent_bytes),
            ("FSDP/DDP buffers", p.parallel_bytes), ("optimizer step temporaries", p.optimizer_step_bytes),
            ("CUDA context/workspaces (allowance)", p.overhead_bytes)]
    for label, v in rows:
        lines.append(f"    {label:34s} {_gb(v):>10s}")
    if p.offload_activations:
        lines.append(f"    {'saved tensors offloaded to host':34s} {_gb(p.offloaded_bytes):>10s}")
    lines.append(f"    {'training step peak':34s} {_gb(p.step_peak_bytes):>10s}")
    for k, v in p.encoder_phases.items():
        lines.append(f"    {k:34s} {_gb(v):>10s}")
    lines.append(f"    {'PEAK':34s} {_gb(p.peak_bytes):>10s}")
    lines.append(f"  FLOPs per step per GPU (estimate): {p.flops_per_step / 1e12:,.3g} TFLOP"
                 f" (~{p.flops_per_step / (400e12):.2f} s at 400 TFLOP/s sustained)")
    if p.gpu_memory is not None:
        lines.append(f"  GPU memory {_gb(p.gpu_memory)}: {'fits' if p.fits else 'does NOT fit'}")
        for s in p.suggestions:
            lines.append(f"    try: {s}")
    for n in p.notes:
        lines.append(f"  note: {n}")
    lines.append(f"  (planned in {p.trace_seconds:.1f} s without weights; figures are planned, not measured)")
    return "\n".join(lines)
