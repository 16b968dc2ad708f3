"""LoRA layers: `LoRALinear` and `LoRAConv` (Conv1d/2d/3d and their subclasses).

A LoRA layer is the base module itself with its class swapped in place and two parameters added:
`lora_A` [r, fan_in] and `lora_B` [out, r] (fan_in = in_features, or in_channels/groups * prod(kernel)).
The base `weight`/`bias` keep their names and storage, so a base checkpoint still loads into an
injected model and nothing is copied at injection time.

    y = base(x) + scale * B A dropout(x),   scale = alpha / r   (rsLoRA: alpha / sqrt(r))

Merging adds scale * B A into the weight in fp32 with one rounding; unmerging restores a pristine copy
kept on the CPU, so merge/unmerge cycles are bit-exact in any dtype.

Dropout masks follow `fused.dropout_scope`: they are keyed by the layer's `lora_name` (its qualified
name, given by `inject_lora`; "" for layers built without one, which then all share one key), so
they do not depend on call order and checkpoint recomputation regenerates them.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    if rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRALayer:
    """Mixin holding the LoRA state shared by the linear and conv variants."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_rank: int
    lora_alpha: float
    lora_scale: float
    lora_dropout: float
    lora_use_rslora: bool
    lora_merged: bool
    lora_disabled: bool
    lora_name: str
    _lora_pristine: torch.Tensor | None
    # True on layers whose input is the same on every sequence-parallel rank (e.g. text-token k/v):
    # its dropout mask then never takes a token shard's offset, even when its token count equals the
    # shard's. Set by the backbone (class default: inputs of local_tokens tokens are shards).
    lora_replicated_input: bool = False

    def _init_lora(self, rank: int, alpha: float, dropout: float, use_rslora: bool,
                   dtype: torch.dtype | None, name: str = "") -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        w = self.weight
        fan_in = w[0].numel()
        # fp32 masters by default: the update is tiny next to W and bf16 would swallow it.
        dtype = dtype or (torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(w.shape[0], rank, device=w.device, dtype=dtype))
        self.lora_rank = rank
        self.lora_alpha = float(alpha)
        self.lora_use_rslora = use_rslora
        self.lora_scale = lora_scale(rank, alpha, use_rslora)
        self.lora_dropout = float(dropout)
        self.lora_merged = False
        self.lora_disabled = False
        self.lora_name = name
        self._lora_pristine = None
        if w.device.type != "meta":
            self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (a=sqrt(5), as nn.Linear), B zero: the layer starts as the base layer."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:  # type: ignore[override]
        base = super().extra_repr()  # type: ignore[misc]
        return f"{base}, lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha:g}" + (
            ", merged" if self.lora_merged else "")

    @property
    def lora_active(self) -> bool:
        return not (self.lora_merged or self.lora_disabled) and self.lora_scale != 0.0

    def delta_weight(self) -> torch.Tensor:
        """scale * B A in fp32, shaped like the base weight."""
        delta = self.lora_B.float() @ self.lora_A.float()
        return (delta * self.lora_scale).view(self.weight.shape)

    @torch.no_grad()
    def merge(self, keep_pristine: bool = True) -> None:
        """W <- round(W + scale * B A) computed in fp32; keeps a CPU copy of W for an exact unmerge."""
        if self.lora_merged:
            return
        w = self.weight
        if keep_pristine:
            self._lora_pristine = w.detach().to("cpu", copy=True)
        merged = w.float() + self.delta_weight().to(w.device)
        if not torch.isfinite(merged).all():
            raise ValueError("merging LoRA produced non-finite weights; the adapter or its strength is broken")
        w.copy_(merged.to(w.dtype))
        self.lora_merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.lora_merged:
            return
        if self._lora_pristine is None:
            raise ValueError("this LoRA layer was merged with keep_pristine=False and cannot be unmerged; "
                             "reload the base weights instead")
        self.weight.copy_(self._lora_pristine.to(self.weight.device))
        self._lora_pristine = None
        self.lora_merged = False

    def _dropout_p(self) -> float:
        return self.lora_dropout if self.training else 0.0


class LoRALinear(LoRALayer, nn.Linear):
    """nn.Linear with a LoRA path. Build with `LoRALinear.from_linear(base, ...)` (in place)."""

    _lora_base_cls = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int, alpha: float,
                 dropout: float = 0.0, use_rslora: bool = False, device: Any = None,
                 dtype: torch.dtype | None = None, name: str = "") -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(rank, alpha, dropout, use_rslora, None, name)

    @classmethod
    def from_linear(cls, base: nn.Linear, rank: int, alpha: float, *, dropout: float = 0.0,
                    use_rslora: bool = False, dtype: torch.dtype | None = None, name: str = "") -> "LoRALinear":
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear needs an nn.Linear, got {type(base).__name__}")
        base.__class__ = _lora_class(cls, type(base))
        base._init_lora(rank, alpha, dropout, use_rslora, dtype, name)  # type: ignore[attr-defined]
        return base  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lora_active:
            return F.linear(x, self.weight, self.bias)
        p = self._dropout_p()
        if p == 0.0:  # the default: no key, no mask kernel
            return fused.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_scale)
        return fused.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_scale, p,
                                 layer_id=fused.layer_id(self.lora_name),
                                 token_sharded=not self.lora_replicated_input)


class LoRAConv(LoRALayer):
    """LoRA for Conv1d/2d/3d and any subclass of them (e.g. a causal Conv3d that pads in its forward).

    The LoRA path is applied inside `_conv_forward`, which receives the input after any padding the
    module (or a subclass) did, so the delta behaves exactly like a change of the base kernel.
    groups == 1: conv(x, A as an r-channel kernel) then a 1x1 conv with B (cheap, no rounding into W);
    groups > 1: a second conv with the full delta kernel.

    Dropout on the (padded) input x [B, C, *spatial] follows the scope rules with channel = feature and
    position = the flattened spatial index within each sample; convolutions never see token shards.
    Its mask is saved by autograd as a bool tensor (what F.dropout saved), not regenerated.
    """

    @classmethod
    def from_conv(cls, base: nn.Module, rank: int, alpha: float, *, dropout: float = 0.0,
                  use_rslora: bool = False, dtype: torch.dtype | None = None, name: str = "") -> "LoRAConv":
        if not isinstance(base, _CONV_TYPES):
            raise ValueError(f"LoRAConv needs an nn.Conv1d/2d/3d, got {type(base).__name__}")
        if isinstance(base, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            raise ValueError("LoRA on transposed convolutions is not supported")
        base.__class__ = _lora_class(cls, type(base))
        base._init_lora(rank, alpha, dropout, use_rslora, dtype, name)  # type: ignore[attr-defined]
        return base  # type: ignore[return-value]

    def _dropout_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, *spatial] (or unbatched [C, *spatial]) -> x * mask / (1 - p), same shape."""
        p = self._dropout_p()
        if p == 0.0:
            return x
        xb = x if x.dim() == self.weight.dim() else x.unsqueeze(0)   # unbatched input: one sample
        b, c, positions = xb.shape[0], xb.shape[1], math.prod(xb.shape[2:])
        key = fused.dropout_key((b, positions), fused.layer_id(self.lora_name), token_sharded=False)
        keep = fused.keep_mask(key, b * positions, c, p, x.device, torch.bool)     # [B*P, C]
        keep = keep.view(b, positions, c).transpose(1, 2).reshape(x.shape)
        return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,  # noqa: A002 (torch's name)
                      bias: torch.Tensor | None) -> torch.Tensor:
        base_conv = super()._conv_forward  # type: ignore[misc]
        out = base_conv(input, weight, bias)
        if not self.lora_active:
            return out
        x = self._dropout_input(input)
        dtype = out.dtype
        if self.groups == 1:
            a_kernel = self.lora_A.view(self.lora_rank, *weight.shape[1:]).to(dtype)
            s = base_conv(x, a_kernel, None)                         # [B, r, *spatial]
            b_kernel = self.lora_B.view(*self.lora_B.shape, *([1] * (weight.dim() - 2))).to(dtype)
            conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
            return out + conv(s, b_kernel) * self.lora_scale
        return out + base_conv(x, self.delta_weight().to(dtype), None)


_CLASS_CACHE: dict[tuple[type, type], type] = {}


def _lora_class(mixin: type, base_cls: type) -> type:
    """LoRALinear for a plain nn.Linear; for anything else a subclass of both (cached), so the base
    module's own forward (e.g. causal padding) still runs."""
    if mixin is LoRALinear and base_cls is nn.Linear:
        return LoRALinear
    if issubclass(base_cls, LoRALayer):
        raise ValueError(f"module of type {base_cls.__name__} already has LoRA")
    key = (mixin, base_cls)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"LoRA{base_cls.__name__}", (mixin, base_cls),
                                 {"__module__": __name__, "_lora_base_cls": base_cls})
    return _CLASS_CACHE[key]


def is_lora_layer(module: nn.Module) -> bool:
    return isinstance(module, LoRALayer)


def strip_lora(module: nn.Module) -> nn.Module:
    """Turn a LoRA layer back into its base class (merged weights stay merged)."""
    if not isinstance(module, LoRALayer):
        return module
    for attr in ("lora_A", "lora_B"):
        delattr(module, attr)
    for attr in ("lora_rank", "lora_alpha", "lora_scale", "lora_dropout", "lora_use_rslora", "lora_merged",
                 "lora_disabled", "lora_name", "lora_replicated_input", "_lora_pristine"):
        module.__dict__.pop(attr, None)
    module.__class__ = type(module)._lora_base_cls
    return module
