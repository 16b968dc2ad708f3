"""The one attention seam every backbone calls.

Shapes: B batch, Lq/Lk query/key tokens, H heads, D head dim.
Sequence parallelism (Ulysses) wraps this function per module (see `lora_core.distributed`);
the backend choice (SDPA everywhere, xformers on CUDA when installed) lives here only.
"""
from __future__ import annotations

import logging
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

Backend = Literal["xformers", "sdpa"]

_BACKEND = "auto"  # "auto" | "sdpa" | "xformers"
# xformers.ops once imported; False once the import failed (the reason in _XFORMERS_ERROR); None: not tried
_XFORMERS: ModuleType | Literal[False] | None = None
_XFORMERS_ERROR: str | None = None  # None: not installed; else the text of the failed import of an install
_WARNED_BROKEN = False
_LAST: Backend | None = None


def _xformers() -> ModuleType | None:
    """xformers.ops, or None when it cannot be used (the import is tried once per process)."""
    global _XFORMERS, _XFORMERS_ERROR
    if _XFORMERS is None:
        try:
            import xformers.ops as xops  # optional, CUDA only
            _XFORMERS = xops
        except ModuleNotFoundError as exc:
            _XFORMERS = False
            # xformers itself missing is "not installed"; a module missing *inside* it (triton, its
            # compiled extension) is a broken install, worth reporting
            _XFORMERS_ERROR = None if exc.name == "xformers" else f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # installed but failed to import: a .so for another torch/CUDA, an init error
            _XFORMERS = False
            _XFORMERS_ERROR = f"{type(exc).__name__}: {exc}"
    return _XFORMERS or None


def set_attention_backend(name: str) -> None:
    """'auto' (xformers where it applies and imports, else SDPA), 'sdpa', or 'xformers' (which must import;
    calls it cannot take, padded keys or fp32 or non-CUDA, still go to SDPA)."""
    global _BACKEND
    if name not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"attention backend {name!r} is not one of 'auto', 'sdpa', 'xformers'")
    if name == "xformers" and _xformers() is None:
        if _XFORMERS_ERROR is None:
            raise ValueError("attention backend 'xformers' was asked for but xformers is not installed "
                             "(pip install xformers, or use 'sdpa')")
        raise ValueError(f"attention backend 'xformers' was asked for; xformers is installed but failed to import "
                         f"({_XFORMERS_ERROR}); reinstall the xformers build matching torch {torch.__version__} "
                         "and its CUDA, or use 'sdpa'")
    _BACKEND = name


def get_attention_backend() -> str:
    return _BACKEND


def last_backend() -> Backend | None:
    """The kernel the latest `attention` call ran ("xformers" or "sdpa"); None before the first call."""
    return _LAST


def choose_backend(*, is_cuda: bool, dtype: torch.dtype, padded: bool, backend: str | None = None) -> Backend:
    """The kernel for one call, from the facts about its tensors (passed in, so it is testable without a GPU).

    xformers takes [B, L, H, D] directly but only in CUDA half precision, and padded keys (sequence-parallel
    padding only) go through SDPA's boolean mask, since xformers wants its dense biases padded to aligned
    strides. `backend` defaults to the one `set_attention_backend` chose."""
    backend = _BACKEND if backend is None else backend
    eligible = backend in ("auto", "xformers") and is_cuda and dtype in (torch.float16, torch.bfloat16) and not padded
    if not eligible:
        return "sdpa"
    if _xformers() is not None:
        return "xformers"
    global _WARNED_BROKEN
    if _XFORMERS_ERROR is not None and not _WARNED_BROKEN:
        _WARNED_BROKEN = True
        log.warning("xformers is installed but failed to import (%s); attention runs on SDPA. Reinstall the "
                    "xformers build matching torch %s, or set the attention backend to 'sdpa' to silence this",
                    _XFORMERS_ERROR, torch.__version__)
    return "sdpa"


def key_padding_mask(k_lens: torch.Tensor, lk: int, lq: int) -> torch.Tensor:
    """Boolean mask [B, 1, Lq, Lk] that is True where key index < k_lens[b]."""
    keep = torch.arange(lk, device=k_lens.device)[None, :] < k_lens[:, None]  # [B, Lk]
    return keep[:, None, None, :].expand(-1, 1, lq, lk)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              k_lens: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Softmax attention. q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].

    k_lens [B] (optional) masks keys at index >= k_lens[b] (padding added for sequence sharding).
    """
    global _LAST
    _LAST = choose_backend(is_cuda=q.is_cuda, dtype=q.dtype, padded=k_lens is not None)
    if _LAST == "xformers":
        return _xformers().memory_efficient_attention(q, k, v, scale=scale)  # type: ignore[union-attr]
    mask = None if k_lens is None else key_padding_mask(k_lens, k.shape[1], q.shape[1])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)  # [B, H, Lq, D]
    return out.transpose(1, 2)
