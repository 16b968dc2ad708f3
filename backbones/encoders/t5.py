"""T5-family text encoders, encoder only: umT5-XXL (Wan2.2) and T5 v1.1 XXL (CogVideoX).

Shapes: B prompts, L token slots (512 Wan, 226 CogVideoX), D model dim, N heads, C head dim
(D_attn / N), V vocab, K relative-position buckets.

Both share the math (RMS norm, unscaled attention with an additive bucketed position bias,
gated tanh-GELU FFN, pre-norm residual blocks with the fp16 clamp); they differ in where the
position bias lives and in parameter names:

* `UMT5Encoder` (upstream `wan/modules/t5.py :: T5Encoder`): a bias table in every block; names
  equal the official `models_t5_umt5-xxl-enc-bf16.pth`, HF `UMT5EncoderModel` names go through
  `t5_to_hf` / `t5_from_hf`, and a load-state-dict pre-hook converts an HF state dict on the fly.
* `T5V11Encoder` (transformers `T5EncoderModel`, google/t5-v1_1-xxl): one bias table in block 0,
  shared by all blocks; names are the transformers names verbatim, so the CogVideoX
  `text_encoder/` shards load strict (`load_t5_v11`).

Both encoders are frozen in every recipe, so dropout (a no-op in eval) is left out. Attention does
not use the shared seam (`backbones.attention`): T5 needs an additive per-head position bias,
which the seam does not take, and the text encoder is never sharded.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from ..loading import expected_shapes, safetensors_shapes, sharded_safetensors, validate

if TYPE_CHECKING:
    from backbones.encoders.spm_tokenizer import T5SpmTokenizer
    from backbones.encoders.t5_tokenizer import WanTokenizer


@dataclass(frozen=True)
class T5EncoderConfig:
    """Sizes shared by both encoders (the defaults are umT5-XXL's)."""

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
            raise ValueError(f"{type(self).__name__}: dim_attn ({self.dim_attn}) is not divisible by num_heads "
                             f"({self.num_heads}); pick dim_attn = num_heads * head_dim")
        if self.num_buckets % 2 != 0 or self.num_buckets < 4:
            raise ValueError(f"{type(self).__name__}: num_buckets ({self.num_buckets}) must be even and >= 4 "
                             "(bidirectional buckets split in halves, then exact/log halves)")
        if self.max_dist <= self.num_buckets // 4:
            raise ValueError(f"{type(self).__name__}: max_dist ({self.max_dist}) must exceed num_buckets // 4 "
                             f"({self.num_buckets // 4}), the last exactly-bucketed distance")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads


@dataclass(frozen=True)
class UMT5Config(T5EncoderConfig):
    """umT5-XXL (Wan2.2's `umt5_xxl`, encoder only)."""


@dataclass(frozen=True)
class T5V11Config(T5EncoderConfig):
    """T5 v1.1 (google/t5-v1_1-xxl config.json: d_model 4096, d_kv 64, d_ff 10240, 64 heads, 24 layers).

    dim = d_model, dim_attn = num_heads * d_kv, dim_ffn = d_ff, num_buckets / max_dist =
    relative_attention_num_buckets / relative_attention_max_distance, eps = layer_norm_epsilon.
    """

    vocab: int = 32128  # 32000 SentencePiece pieces + 100 extra ids, padded to a multiple of 128


T5_PRESETS: dict[str, UMT5Config] = {
    # umt5_xxl(encoder_only=True): per-layer relative position bias (shared_pos=False)
    "5b": UMT5Config(),
    # Same architecture at toy size; dim 64 is a fixed contract with the tiny DiT's text_dim.
    "tiny": UMT5Config(vocab=512, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2),
}


T5_V11_PRESETS: dict[str, T5V11Config] = {
    # google/t5-v1_1-xxl encoder = CogVideoX text_encoder/config.json; 4,762,310,656 parameters.
    "xxl": T5V11Config(),
    # Toy size; dim 32 is a fixed contract with the tiny CogVideoX transformer's text_embed_dim,
    # vocab 256 holds the tiny tokenizer's 134 pieces + 100 extra ids (`save_tiny_t5_tokenizer`).
    "tiny": T5V11Config(vocab=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2),
}


# ------------------------------------------------------------------------------------------
# Shared math
# ------------------------------------------------------------------------------------------

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
    """Self-attention with additive bias and no 1/sqrt(C) scaling (T5 folds it into the init).

    With `num_buckets` it also owns the position-bias table `relative_attention_bias` [K, N]
    (T5 v1.1 block 0); the caller turns it into a bias with `position_bias`.
    """

    def __init__(self, dim: int, dim_attn: int, num_heads: int, num_buckets: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)
        if num_buckets is not None:
            self.relative_attention_bias = nn.Embedding(num_buckets, num_heads)

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


def gated_gelu(x: torch.Tensor, gate: nn.Linear, linear: nn.Linear, out: nn.Linear) -> torch.Tensor:
    """out(gelu_tanh(gate(x)) * linear(x)). x [B, L, D] -> [B, L, D] in out's dtype.

    The product is cast to `out`'s weight dtype, so an fp32 `out` (kept so in fp16 models, as
    transformers' `_keep_in_fp32_modules = ["wo"]`) sees fp32 input and returns fp32.
    """
    h = F.gelu(gate(x), approximate="tanh") * linear(x)  # [B, L, D_ffn]
    return out(h.to(out.weight.dtype))


class T5FeedForward(nn.Module):
    """umT5 names: fc2(fc1(x) * gelu_tanh(gate(x))). x [B, L, D] -> [B, L, D]."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        # Sequential so the checkpoint name stays `gate.0.weight`; `gated_gelu` applies the GELU.
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_gelu(x, self.gate[0], self.fc1, self.fc2)


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


def position_bias(table: nn.Embedding, buckets: torch.Tensor, keep: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """Bias table [K, N], buckets [L, L], keep [B, L] bool or None -> bias [B or 1, N, L, L] in dtype.

    Padded keys are replaced (not added to) with finfo.min as upstream umT5 does, so they get ~0
    weight without overflowing to -inf in half precision.
    """
    bias = table(buckets).permute(2, 0, 1).unsqueeze(0).to(dtype)  # [1, N, L, L]
    if keep is not None:
        bias = bias.expand(keep.size(0), -1, -1, -1).masked_fill(
            ~keep[:, None, None, :], torch.finfo(dtype).min)
    return bias


def _residual_block(x: torch.Tensor, bias: torch.Tensor, norm1: T5LayerNorm, attn: T5Attention,
                    norm2: T5LayerNorm, ffn: nn.Module) -> torch.Tensor:
    """Pre-norm block: x + attn(norm1(x)); x + ffn(norm2(x)), each clamped in fp16. [B, L, D]."""
    x = _fp16_clamp(x + attn(norm1(x), bias))
    return _fp16_clamp(x + ffn(norm2(x)))


def _check_inputs(owner: str, ids: torch.Tensor, mask: torch.Tensor | None, tokenizer: str) -> torch.Tensor | None:
    """-> keep [B, L] bool (True = real token) or None."""
    if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{owner}: ids must be an integer tensor [B, L], got {tuple(ids.shape)} "
                         f"{ids.dtype}; tokenize with {tokenizer} first")
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"{owner}: mask shape {tuple(mask.shape)} != ids shape {tuple(ids.shape)}; "
                         "pass the mask returned together with the ids")
    return None if mask is None else mask.to(ids.device) != 0


# ------------------------------------------------------------------------------------------
# umT5 (Wan2.2): a bias table per block, upstream names
# ------------------------------------------------------------------------------------------

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
        bias = position_bias(self.pos_embedding.embedding, buckets, keep, x.dtype)
        return _residual_block(x, bias, self.norm1, self.attn, self.norm2, self.ffn)


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
        keep = _check_inputs("UMT5Encoder", ids, mask, "WanTokenizer")
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


# ------------------------------------------------------------------------------------------
# T5 v1.1 (CogVideoX): one bias table in block 0 shared by all blocks, transformers names
# ------------------------------------------------------------------------------------------
#
# fp16: T5 v1.1 activations overflow fp16 in the FFN output. As transformers does
# (`_keep_in_fp32_modules = ["wo"]`, applied only when loading in fp16), `load_t5_v11(...,
# dtype=torch.float16)` keeps every `DenseReluDense.wo` in fp32 (`keep_wo_in_fp32` does it after a
# plain `.half()`); `gated_gelu` then feeds `wo` fp32 input, the residual stream is promoted to fp32
# from block 0 on, and only the norms' outputs (and so q/k/v and wi_*) run in fp16. bf16 and fp32
# need none of this; CogVideoX recommends bf16 (5B) and SAT ran T5 in fp32.

_V11_EMBED = ("shared.weight", "encoder.embed_tokens.weight")  # tied; the CogVideoX file stores only the first
_V11_IGNORED_PREFIXES = ("decoder.", "lm_head.")  # parts of a full seq2seq T5 file the encoder does not use
V11_FILE_STEM = "model"  # text_encoder/model.safetensors[.index.json] (transformers save_pretrained)


class T5GatedGeluDense(nn.Module):
    """transformers `T5DenseGatedActDense` names: wo(gelu_tanh(wi_0(x)) * wi_1(x)). [B, L, D] -> [B, L, D]."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(dim, dim_ffn, bias=False)  # GELU branch
        self.wi_1 = nn.Linear(dim, dim_ffn, bias=False)  # linear branch
        self.wo = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_gelu(x, self.wi_0, self.wi_1, self.wo)


class T5LayerSelfAttention(nn.Module):
    """`block.{i}.layer.0`: `SelfAttention` (+ the bias table in block 0) and its pre-norm."""

    def __init__(self, cfg: T5V11Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads,
                                         cfg.num_buckets if has_relative_attention_bias else None)
        self.layer_norm = T5LayerNorm(cfg.dim, cfg.eps)


class T5LayerFF(nn.Module):
    """`block.{i}.layer.1`: `DenseReluDense` and its pre-norm."""

    def __init__(self, cfg: T5V11Config) -> None:
        super().__init__()
        self.DenseReluDense = T5GatedGeluDense(cfg.dim, cfg.dim_ffn)
        self.layer_norm = T5LayerNorm(cfg.dim, cfg.eps)


class T5V11Block(nn.Module):
    """Pre-norm block, the same math as umT5's `T5Block`; the bias comes from block 0."""

    def __init__(self, cfg: T5V11Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], bias [B or 1, N, L, L] -> [B, L, D]."""
        attn, ff = self.layer
        return _residual_block(x, bias, attn.layer_norm, attn.SelfAttention, ff.layer_norm, ff.DenseReluDense)


class T5V11Stack(nn.Module):
    """`encoder.*`: embed_tokens (the parent's `shared`, tied), block, final_layer_norm."""

    def __init__(self, cfg: T5V11Config, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([T5V11Block(cfg, i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.dim, cfg.eps)


class T5V11Encoder(nn.Module):
    """T5 v1.1 encoder (transformers `T5EncoderModel`): ids [B, L], mask [B, L] or None -> [B, L, D].

    `shared` and `encoder.embed_tokens` are one module, so the state dict holds both names (220
    keys for xxl) and a file holding either one loads strict (a load pre-hook fills the alias).
    CogVideoX calls it without a mask (`encode_prompts_t5`), so pad slots attend and are attended.
    Run it in bf16 or fp32; in fp16 keep `wo` in fp32 (`keep_wo_in_fp32`, or `load_t5_v11(dtype=
    torch.float16)`), else the FFN outputs overflow and the clamp destroys them (note above).
    """

    def __init__(self, cfg: T5V11Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab, cfg.dim)
        self.encoder = T5V11Stack(cfg, self.shared)
        self.register_load_state_dict_pre_hook(_v11_state_dict_pre_hook)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = _check_inputs("T5V11Encoder", ids, mask, "T5SpmTokenizer")
        x = self.shared(ids)  # [B, L, D]
        buckets = relative_position_bucket(ids.size(1), ids.size(1), self.cfg.num_buckets,
                                           self.cfg.max_dist, device=ids.device)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = position_bias(table, buckets, keep, x.dtype)  # computed once, shared by every block
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def _v11_state_dict_pre_hook(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str,
                             *args: object) -> None:
    """Fill the missing tied embedding name and drop a full T5 file's decoder, in place."""
    for k in [k for k in state_dict if k.startswith(tuple(prefix + p for p in _V11_IGNORED_PREFIXES))]:
        del state_dict[k]
    a, b = (prefix + k for k in _V11_EMBED)
    if a in state_dict and b not in state_dict:
        state_dict[b] = state_dict[a]
    elif b in state_dict and a not in state_dict:
        state_dict[a] = state_dict[b]


def keep_wo_in_fp32(model: T5V11Encoder) -> T5V11Encoder:
    """Cast every FFN output projection `wo` back to fp32 when the model is fp16 (see the note above)."""
    for block in model.encoder.block:
        wo = block.layer[1].DenseReluDense.wo
        if wo.weight.dtype == torch.float16:
            wo.float()
    return model


@torch.no_grad()
def encode_prompts_t5(encoder: T5V11Encoder, tokenizer: T5SpmTokenizer, prompts: list[str],
                      max_length: int = 226, device: torch.device | str | None = None) -> torch.Tensor:
    """Encode as CogVideoX's `_get_t5_prompt_embeds`: pad/truncate to max_length, no mask -> [B, L, D].

    All max_length rows (pad positions included) are returned; the transformer consumes them all.
    """
    if isinstance(prompts, str):
        raise ValueError(f"encode_prompts_t5: prompts must be a list of strings, got the string {prompts!r}; "
                         "wrap it as [prompt]")
    device = encoder.shared.weight.device if device is None else torch.device(device)
    ids, _ = tokenizer(prompts, max_length=max_length)
    return encoder(ids.to(device))  # [B, L, D]


# transformers config.json key -> how our config derives it
_V11_CONFIG_KEYS = {
    "vocab_size": lambda c: c.vocab, "d_model": lambda c: c.dim, "d_ff": lambda c: c.dim_ffn,
    "d_kv": lambda c: c.head_dim, "num_heads": lambda c: c.num_heads, "num_layers": lambda c: c.num_layers,
    "relative_attention_num_buckets": lambda c: c.num_buckets,
    "relative_attention_max_distance": lambda c: c.max_dist, "feed_forward_proj": lambda c: "gated-gelu",
}


def _check_v11_config(file: Path, cfg: T5V11Config, preset: str) -> None:
    try:
        found = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); re-download text_encoder/") from e
    for key, ours in _V11_CONFIG_KEYS.items():
        if key in found and found[key] != ours(cfg):
            raise ValueError(f"{file}: {key}={found[key]!r} but preset {preset!r} has {ours(cfg)!r}; "
                             f"pick the preset that matches the checkpoint (presets: {sorted(T5_V11_PRESETS)})")


def load_t5_v11(path: str | Path, preset: str = "xxl", *, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu") -> T5V11Encoder:
    """Build `T5V11Encoder` on meta and load a transformers `text_encoder/` folder into it, strict.

    `path`: the text_encoder/ folder (model.safetensors, or model.safetensors.index.json + shards)
    or the checkpoint root holding it. Shapes are checked from the headers before any tensor is
    read; `config.json`, when present, must match the preset. `dtype` None keeps the file's
    dtype; fp16 (asked for or stored) keeps `wo` in fp32.
    """
    if preset not in T5_V11_PRESETS:
        raise ValueError(f"load_t5_v11: unknown preset {preset!r}; expected one of {sorted(T5_V11_PRESETS)}")
    cfg = T5_V11_PRESETS[preset]
    folder = Path(path)
    if not any((folder / f"{V11_FILE_STEM}.safetensors{s}").is_file() for s in ("", ".index.json")) \
            and (folder / "text_encoder").is_dir():
        folder = folder / "text_encoder"
    files = sharded_safetensors(folder, stem=V11_FILE_STEM)
    if (folder / "config.json").is_file():
        _check_v11_config(folder / "config.json", cfg, preset)
    with torch.device("meta"):
        model = T5V11Encoder(cfg)
    headers = {k: v for k, v in safetensors_shapes(files).items() if not k.startswith(_V11_IGNORED_PREFIXES)}
    found = {k: shape for k, (_, shape) in headers.items()}
    for a, b in (_V11_EMBED, _V11_EMBED[::-1]):
        if a in found and b not in found:
            found[b] = found[a]
    source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    validate(expected_shapes(model), found, source)
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if k in headers:
                    t = h.get_tensor(k)
                    if t.is_floating_point():
                        target = t.dtype if dtype is None else dtype
                        if target == torch.float16 and k.endswith("DenseReluDense.wo.weight"):
                            target = torch.float32
                        t = t.to(target)
                    sd[k] = t.to(device)
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in model.named_parameters() if t.is_meta]
    assert not left, f"validated load left meta tensors: {left[:3]}"
    return model.eval()
