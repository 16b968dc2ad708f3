"""CLIP ViT-L/14 text encoder of SD1.5 / AnimateDiff (transformers `CLIPTextModel`), text half only.

Shapes: B prompts, L token slots (77: BOS + up to 75 tokens + EOS, padded; SD keeps all 77),
D hidden size, N heads, C head dim (D / N), F MLP size, V vocab.

Parameter names equal the on-disk names of a diffusers `text_encoder/model.safetensors`
(`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.<i>.self_attn.q_proj.weight`,
..., `text_model.final_layer_norm.weight`), so that file loads with `strict=True` and no renaming.
Other spellings go through `clip_file_key` (state dicts saved by transformers >= 5, which drop the
`text_model.` prefix) and `clip_from_ldm` / `clip_to_ldm` (the LDM single file's
`cond_stage_model.transformer.` names); a load-state-dict pre-hook applies `clip_file_key` on the fly.

`text_model.embeddings.position_ids` (1, 77) int64, stored by older files and the LDM single file, is
accepted and ignored: positions are always arange(L). Some merged SD1.5 files carry a corrupted copy
(float, or values like 76.9999 that truncate to the wrong row), which is why A1111 and kohya also
rebuild it rather than trust it.

Attention does not go through the shared seam (`backbones.attention`): CLIP needs a causal mask,
which the seam does not take, and a 77-token text encoder is never sequence-sharded. It calls SDPA
with `is_causal=True` directly.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LDM_CLIP_PREFIX = "cond_stage_model.transformer."
POSITION_IDS_KEY = "text_model.embeddings.position_ids"
_TOP_LEVEL = ("embeddings.", "encoder.", "final_layer_norm.")  # children of `text_model`
_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPTextConfig:
    """Field names are transformers' `CLIPTextConfig` ones, so `text_encoder/config.json` maps 1:1."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"CLIPTextConfig: hidden_size ({self.hidden_size}) is not divisible by "
                             f"num_attention_heads ({self.num_attention_heads}); pick hidden_size = heads * head_dim")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig: hidden_act={self.hidden_act!r}; expected one of {_ACTIVATIONS} "
                             "(quick_gelu for OpenAI CLIP-L, gelu for OpenCLIP models)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, object]) -> CLIPTextConfig:
        """From a parsed `text_encoder/config.json`; its other keys (dropout 0, projection_dim, the
        legacy bos/eos/pad ids 0/2/1) do not change the text encoder's math and are ignored."""
        names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings", "hidden_act", "layer_norm_eps")
        missing = [n for n in names if n not in config]
        if missing:
            raise ValueError(f"CLIPTextConfig.from_hf: config has no {missing}; expected a transformers "
                             "CLIPTextConfig (text_encoder/config.json of a diffusers download)")
        return cls(**{n: config[n] for n in names})  # type: ignore[arg-type]


CLIP_TEXT_PRESETS: dict[str, CLIPTextConfig] = {
    # openai/clip-vit-large-patch14 text tower, as in SD1.5's text_encoder/config.json: 123,060,480 params
    "clip-l": CLIPTextConfig(),
    # Same architecture at toy size. vocab_size equals the vocabulary `build_tiny_clip_tokenizer` writes
    # (512 byte symbols + 126 merges + 2 specials); hidden_size 32 is what a tiny UNet cross-attends to.
    "tiny": CLIPTextConfig(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x); the weights were trained with it."""
    return x * torch.sigmoid(1.702 * x)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> [B, L, D]; positions 0..L-1 (no stored position_ids buffer, see module doc)."""
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with biased projections. x [B, L, D] -> [B, L, D]."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size
        # k, v, q, out: transformers' registration order, so state_dict() lists keys as the files do.
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = (p(x).view(b, l, self.num_heads, self.head_dim).transpose(1, 2)  # [B, N, L, C]
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # Causal: CLIP was trained autoregressively-masked; the default scale is C**-0.5 as upstream.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, N, L, C]
        return self.out_proj(out.transpose(1, 2).reshape(b, l, d))


class CLIPMLP(nn.Module):
    """fc2(act(fc1(x))). x [B, L, D] -> [B, L, D] through F."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """Holds the layers under transformers' names; `CLIPTextModel` runs them (and stops early for clip_skip)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    """The `text_model` submodule: embeddings -> encoder layers -> final_layer_norm."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP text encoder: input_ids [B, L] (L <= 77) -> last_hidden_state [B, L, D] after final_layer_norm."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        # transformers >= 5 state dicts (no `text_model.`) and files with position_ids load with strict=True.
        self.register_load_state_dict_pre_hook(_state_dict_pre_hook)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"CLIPTextModel: input_ids must be an integer tensor [B, L], got "
                             f"{tuple(input_ids.shape)} {input_ids.dtype}; tokenize with CLIPTokenizer first")
        if not 1 <= input_ids.size(1) <= self.cfg.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: {input_ids.size(1)} token slots; expected 1.."
                             f"{self.cfg.max_position_embeddings} (the position table's size); truncate with "
                             "CLIPTokenizer or split long prompts into 77-token chunks")

    def hidden_states(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """transformers' `output_hidden_states`: [embeddings, layer 1 out, ..., layer n out], each [B, L, D],
        none through final_layer_norm (num_hidden_layers + 1 entries)."""
        self._check_ids(input_ids)
        tm = self.text_model
        out = [tm.embeddings(input_ids)]
        for layer in tm.encoder.layers:
            out.append(layer(out[-1]))
        return out

    def forward(self, input_ids: torch.Tensor, *, clip_skip: int = 1) -> torch.Tensor:
        """input_ids [B, L] -> [B, L, D].

        clip_skip follows kohya / A1111 ("CLIP skip 2" = penultimate layer): the output of layer
        n - clip_skip + 1, passed through final_layer_norm, i.e. kohya's
        `final_layer_norm(hidden_states[-clip_skip])`. 1 (default) is transformers' last_hidden_state.
        diffusers' pipeline argument counts from 0 instead: its `clip_skip=k` equals ours `k + 1`.
        Layers after the chosen one are not run.
        """
        n = self.cfg.num_hidden_layers
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= n:
            raise ValueError(f"CLIPTextModel: clip_skip={clip_skip!r}; expected an int in 1..{n} (1 = last layer, "
                             "2 = penultimate as kohya/A1111 count; diffusers' clip_skip=k is k + 1 here)")
        self._check_ids(input_ids)
        tm = self.text_model
        x = tm.embeddings(input_ids)  # [B, L, D]
        for layer in tm.encoder.layers[: n - clip_skip + 1]:
            x = layer(x)
        return tm.final_layer_norm(x)


# ------------------------------------------------------------------------------------------
# Key names of other formats
# ------------------------------------------------------------------------------------------

def clip_file_key(name: str) -> str | None:
    """A key of a text-encoder state dict -> our name; None for `position_ids` (ignored).

    Accepts the diffusers / transformers-4 on-disk names (`text_model.*`, unchanged) and the
    transformers >= 5 ones (`embeddings.*`, `encoder.*`, `final_layer_norm.*`, prefixed here).
    Anything else passes through unchanged, so a strict load reports it as unexpected.
    """
    if name.startswith(_TOP_LEVEL):
        name = "text_model." + name
    return None if name == POSITION_IDS_KEY else name


def _ldm_suffix(name: str) -> str:
    """The part after `cond_stage_model.transformer.`, with `text_model.` restored when a file lacks it."""
    if not name.startswith(LDM_CLIP_PREFIX):
        raise ValueError(f"clip_from_ldm: {name!r} is not an SD1.x single-file CLIP key; expected the prefix "
                         f"{LDM_CLIP_PREFIX!r} (other keys belong to the UNet or VAE: filter with is_ldm_clip_key)")
    rest = name[len(LDM_CLIP_PREFIX):]
    # Some SD1.x files (NAI-derived merges) store `...transformer.encoder.*` without `text_model.`;
    # A1111 and kohya rename them the same way.
    return "text_model." + rest if rest.startswith(_TOP_LEVEL) else rest


def is_ldm_clip_key(name: str) -> bool:
    return name.startswith(LDM_CLIP_PREFIX)


def clip_from_ldm(name: str) -> str:
    """LDM single-file name -> our (diffusers on-disk) name:
    `cond_stage_model.transformer.text_model.X` -> `text_model.X`. position_ids maps to its own name;
    use `clip_ldm_file_key` to drop it while loading."""
    rest = _ldm_suffix(name)
    if not rest.startswith("text_model."):
        raise ValueError(f"clip_from_ldm: {name!r} names no CLIP text-model tensor; expected "
                         f"{LDM_CLIP_PREFIX}text_model.<embeddings|encoder|final_layer_norm>.*")
    return rest


def clip_to_ldm(name: str) -> str:
    """Our name -> the LDM single-file name (`cond_stage_model.transformer.` + the on-disk name)."""
    if not name.startswith("text_model."):
        raise ValueError(f"clip_to_ldm: {name!r} is not a CLIPTextModel key; expected text_model.* "
                         "(run a transformers >= 5 name through clip_file_key first)")
    return LDM_CLIP_PREFIX + name


def clip_ldm_file_key(name: str) -> str | None:
    """`backbones.loading` rename for a whole SD1.x single file: CLIP keys -> ours, everything else
    (UNet, VAE, schedule buffers) and position_ids -> None (skipped)."""
    if not is_ldm_clip_key(name):
        return None
    new = clip_from_ldm(name)
    return None if new == POSITION_IDS_KEY else new


def clip_state_dict_from_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text-encoder tensors of an SD1.x single-file state dict under our names (tensors not copied)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        new = clip_ldm_file_key(k)
        if new is not None:
            out[new] = v
    return out


def _state_dict_pre_hook(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str,
                         *args: object) -> None:
    """Rename keys under `prefix` in place (see `clip_file_key`), so `load_state_dict` takes any of them."""
    for full in [k for k in state_dict if k.startswith(prefix)]:
        new = clip_file_key(full[len(prefix):])
        if new is None:
            del state_dict[full]
        elif prefix + new != full:
            state_dict[prefix + new] = state_dict.pop(full)
