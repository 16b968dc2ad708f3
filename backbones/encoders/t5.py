"""umT5-XXL text encoder of Wan2.2 (upstream `wan/modules/t5.py :: T5Encoder`), encoder only.

Shapes: B prompts, L token slots (512 upstream), D model dim, N heads, C head dim (D_attn / N),
V vocab, K relative-position buckets.

Parameter names equal the official `models_t5_umt5-xxl-enc-bf16.pth` (flat state dict), so it
loads with `strict=True`; HF `UMT5EncoderModel` names go through `t5_to_hf` / `t5_from_hf`, and a
load-state-dict pre-hook converts an HF-format state dict on the fly.

The encoder is frozen in every Wan recipe, so the upstream dropout (0.1, a no-op in eval) is left
out. Attention does not use the shared seam (`backbones.attention`): T5 needs an additive
per-head position bias, which the seam does not take, and the text encoder is never sharded.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from backbones.encoders.t5_tokenizer import WanTokenizer


@dataclass(frozen=True)
class UMT5Config:
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_dist: int = 128
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads != 0:
            raise ValueError(f"UMT5Config: dim_attn ({self.dim_attn}) is not divisible by num_heads "
                             f"({self.num_heads}); pick dim_attn = num_heads * head_dim")
        if self.num_buckets % 2 != 0 or self.num_buckets < 4:
            raise ValueError(f"UMT5Config: num_buckets ({self.num_buckets}) must be even and >= 4 "
                             "(bidirectional buckets split in halves, then exact/log halves)")
        if self.max_dist <= self.num_buckets // 4:
            raise ValueError(f"UMT5Config: max_dist ({self.max_dist}) must exceed num_buckets // 4 "
                             f"({self.num_buckets // 4}), the last exactly-bucketed distance")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads


T5_PRESETS: dict[str, UMT5Config] = {
    # umt5_xxl(encoder_only=True): per-layer relative position bias (shared_pos=False)
    "5b": UMT5Config(),
    # Same architecture at toy size; dim 64 is a fixed contract with the tiny DiT's text_dim.
    "tiny": UMT5Config(vocab=512, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2),
}


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # Upstream guards fp16 overflow in the residual stream; bf16/fp32 never need it.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        clamp = torch.finfo(x.dtype).max - 1000
        x = torch.clamp(x, min=-clamp, max=clamp)
    return x


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias. x [..., D] -> [..., D]."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 island: the mean of squares over 4096 channels loses too much in bf16.
        x = x.float() * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class T5Attention(nn.Module):
    """Self-attention with additive bias and no 1/sqrt(C) scaling (T5 folds it into the init)."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], bias [B or 1, N, L, L] (position bias + key padding) -> [B, L, D]."""
        b, n, c = x.size(0), self.num_heads, self.head_dim
        q = self.q(x).view(b, -1, n, c)
        k = self.k(x).view(b, -1, n, c)
        v = self.v(x).view(b, -1, n, c)
        attn = torch.einsum("binc,bjnc->bnij", q, k)  # [B, N, L, L]
        attn = attn + bias.to(attn.dtype)
        # fp32 island: softmax over 512 keys with finfo.min fills is unstable in bf16.
        attn = F.softmax(attn.float(), dim=-1).type_as(attn)
        x = torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, -1, n * c)
        return self.o(x)


class T5FeedForward(nn.Module):
    """Gated GELU: fc2(fc1(x) * gelu_tanh(gate(x))). x [B, L, D] -> [B, L, D]."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        # Sequential so the checkpoint name stays `gate.0.weight`.
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def relative_position_bucket(lq: int, lk: int, num_buckets: int, max_dist: int,
                             device: torch.device | None = None) -> torch.Tensor:
    """Bidirectional T5 buckets for key j relative to query i: LongTensor [Lq, Lk] in [0, K).

    Half the buckets hold keys after the query; within each half, distances below K/4 get exact
    buckets and larger ones log-spaced buckets up to max_dist (everything beyond shares the last).
    """
    rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    max_exact = half // 2
    # clamp(min=1) only avoids log(0); those entries take the exact branch below anyway.
    large = max_exact + (torch.log(rel.clamp(min=1).float() / max_exact)
                         / math.log(max_dist / max_exact) * (half - max_exact)).long()
    large = torch.clamp(large, max=half - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


class T5RelativeEmbedding(nn.Module):
    """Per-layer learned bias per (bucket, head)."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """buckets [L, L] -> bias [1, N, L, L]."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)); x + ffn(norm2(x))."""

    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, D], buckets [L, L], keep [B, L] bool (True = real token) or None -> [B, L, D]."""
        bias = self.pos_embedding(buckets).to(x.dtype)  # [1, N, L, L]
        if keep is not None:
            # Replace (not add) with finfo.min as upstream does, so padded keys get ~0 weight.
            bias = bias.expand(x.size(0), -1, -1, -1).masked_fill(
                ~keep[:, None, None, :], torch.finfo(bias.dtype).min)
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """umT5 encoder: ids [B, L] int64, mask [B, L] (1 = token, 0 = padding) -> [B, L, D]."""

    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList([T5Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = T5LayerNorm(cfg.dim, cfg.eps)
        # HF `UMT5EncoderModel` state dicts load with no manual conversion.
        self.register_load_state_dict_pre_hook(_hf_state_dict_pre_hook)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"UMT5Encoder: ids must be an integer tensor [B, L], got {tuple(ids.shape)} "
                             f"{ids.dtype}; tokenize with WanTokenizer first")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"UMT5Encoder: mask shape {tuple(mask.shape)} != ids shape {tuple(ids.shape)}; "
                             "pass the mask returned together with the ids")
        keep = None if mask is None else mask.to(ids.device) != 0
        x = self.token_embedding(ids)  # [B, L, D]
        buckets = relative_position_bucket(ids.size(1), ids.size(1), self.cfg.num_buckets,
                                           self.cfg.max_dist, device=ids.device)
        for block in self.blocks:
            x = block(x, buckets, keep)
        return self.norm(x)


@torch.no_grad()
def encode_prompts(encoder: UMT5Encoder, tokenizer: WanTokenizer, prompts: list[str],
                   device: torch.device | str | None = None, max_length: int = 512) -> list[torch.Tensor]:
    """Encode prompts as upstream: run all max_length slots with the mask, then trim.

    Returns one tensor [L_i, D] per prompt, L_i = its real token count incl. </s> (mask.sum()).
    The DiT re-pads these with zeros, so the padded rows computed here are never used.
    """
    if isinstance(prompts, str):
        raise ValueError(f"encode_prompts: prompts must be a list of strings, got the string {prompts!r}; "
                         "wrap it as [prompt]")
    device = encoder.token_embedding.weight.device if device is None else torch.device(device)
    ids, mask = tokenizer(prompts, max_length=max_length)
    ids, mask = ids.to(device), mask.to(device)
    out = encoder(ids, mask)  # [B, L, D]
    lens = mask.gt(0).sum(dim=1).tolist()
    return [u[:n] for u, n in zip(out, lens)]


# ------------------------------------------------------------------------------------------
# Key map to HF `UMT5EncoderModel`
# ------------------------------------------------------------------------------------------

_HF_EMBED = ("shared.weight", "encoder.embed_tokens.weight")  # tied; HF may save either or both
_BLOCK_TO_HF = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_FROM_HF = {v: k for k, v in _BLOCK_TO_HF.items()}
# A full seq2seq umT5 checkpoint also holds these; the Wan encoder does not use them.
_HF_IGNORED_PREFIXES = ("decoder.", "lm_head.")


def t5_to_hf(name: str) -> str:
    """Upstream name -> HF UMT5EncoderModel name (the embedding maps to `shared.weight`)."""
    if name == "token_embedding.weight":
        return _HF_EMBED[0]
    if name == "norm.weight":
        return "encoder.final_layer_norm.weight"
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in _BLOCK_TO_HF:
        return f"encoder.block.{parts[1]}.{_BLOCK_TO_HF[parts[2]]}"
    raise ValueError(f"t5_to_hf: {name!r} is not an upstream umT5 encoder key; expected "
                     "token_embedding.weight, norm.weight or blocks.<i>.<"
                     + "|".join(_BLOCK_TO_HF) + ">")


def t5_from_hf(name: str) -> str:
    """HF UMT5EncoderModel name -> upstream name (both tied embedding names map to one)."""
    if name in _HF_EMBED:
        return "token_embedding.weight"
    if name == "encoder.final_layer_norm.weight":
        return "norm.weight"
    parts = name.split(".", 3)
    if (len(parts) == 4 and parts[0] == "encoder" and parts[1] == "block" and parts[2].isdigit()
            and parts[3] in _BLOCK_FROM_HF):
        return f"blocks.{parts[2]}.{_BLOCK_FROM_HF[parts[3]]}"
    raise ValueError(f"t5_from_hf: {name!r} is not an HF UMT5EncoderModel key; expected shared.weight, "
                     "encoder.embed_tokens.weight, encoder.final_layer_norm.weight or "
                     "encoder.block.<i>.<" + "|".join(_BLOCK_FROM_HF) + ">")


def convert_t5_state_dict(sd: Mapping[str, torch.Tensor], to: str = "hf") -> dict[str, torch.Tensor]:
    """Rename a whole state dict between upstream and HF names (tensors are not copied).

    to="hf": emits both tied names `shared.weight` and `encoder.embed_tokens.weight`, like
    `UMT5EncoderModel.state_dict()`. to="upstream": accepts either or both tied names (keeps
    `shared.weight` when both are present) and drops `decoder.*` / `lm_head.*` of full umT5 models.
    """
    if to == "hf":
        out: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            out[t5_to_hf(k)] = v
            if k == "token_embedding.weight":
                out[_HF_EMBED[1]] = v
        return out
    if to == "upstream":
        out = {}
        for k, v in sd.items():
            if k.startswith(_HF_IGNORED_PREFIXES):
                continue
            new = t5_from_hf(k)
            if k == _HF_EMBED[1] and _HF_EMBED[0] in sd:
                if sd[_HF_EMBED[0]].shape != v.shape:
                    raise ValueError(f"convert_t5_state_dict: tied embeddings differ in shape: shared.weight "
                                     f"{tuple(sd[_HF_EMBED[0]].shape)} vs encoder.embed_tokens.weight "
                                     f"{tuple(v.shape)}; the state dict is not one UMT5EncoderModel")
                continue
            out[new] = v
        return out
    raise ValueError(f"convert_t5_state_dict: to={to!r}; expected 'hf' or 'upstream'")


def _hf_state_dict_pre_hook(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str,
                            *args: object) -> None:
    """Rename HF-format keys under `prefix` in place so `load_state_dict(hf_sd)` just works."""
    sub = {k[len(prefix):]: k for k in state_dict if k.startswith(prefix)}
    if not any(k in _HF_EMBED or k.startswith("encoder.") for k in sub):
        return  # already upstream names
    hf = {k: state_dict.pop(full) for k, full in sub.items()}
    for k, v in convert_t5_state_dict(hf, to="upstream").items():
        state_dict[prefix + k] = v
