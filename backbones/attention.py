"""The one attention seam every backbone calls.

Shapes: B batch, Lq/Lk query/key tokens, H heads, D head dim.
Sequence parallelism (Ulysses) wraps this function per module (see `lora_core.distributed`);
the backend choice (SDPA everywhere, xformers on CUDA when installed) lives here only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_BACKEND = "auto"  # "auto" | "sdpa" | "xformers"
_XFORMERS = None


def set_attention_backend(name: str) -> None:
    global _BACKEND
    if name not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"attention backend {name!r} is not one of 'auto', 'sdpa', 'xformers'")
    if name == "xformers" and _xformers() is None:
        raise ValueError("attention backend 'xformers' was asked for but xformers is not installed "
                         "(pip install xformers, or use 'sdpa')")
    _BACKEND = name


def get_attention_backend() -> str:
    return _BACKEND


def _xformers():
    global _XFORMERS
    if _XFORMERS is None:
        try:
            import xformers.ops as xops  # optional, CUDA only
            _XFORMERS = xops
        except Exception:  # not installed or built without CUDA kernels
            _XFORMERS = False
    return _XFORMERS or None


def key_padding_mask(k_lens: torch.Tensor, lk: int, lq: int) -> torch.Tensor:
    """Boolean mask [B, 1, Lq, Lk] that is True where key index < k_lens[b]."""
    keep = torch.arange(lk, device=k_lens.device)[None, :] < k_lens[:, None]  # [B, Lk]
    return keep[:, None, None, :].expand(-1, 1, lq, lk)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              k_lens: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Softmax attention. q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    k_lens [B] (optional) masks keys at index >= k_lens[b] (padding added for sequence sharding).
    """
    # xformers takes [B, L, H, D] directly; padded keys (sequence-parallel padding only) go through SDPA's
    # boolean mask, since xformers wants its dense biases padded to aligned strides.
    use_xf = (_BACKEND in ("auto", "xformers") and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
              and k_lens is None and _xformers() is not None)
    if use_xf:
        return _xformers().memory_efficient_attention(q, k, v, scale=scale)
    mask = None if k_lens is None else key_padding_mask(k_lens, k.shape[1], q.shape[1])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)
