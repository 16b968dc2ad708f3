"""CLIP vision encoder of SVD / Framer (transformers `CLIPVisionModelWithProjection`, OpenCLIP ViT-H/14) and
SVD's own image preprocessing.

Shapes: B images, N images per sample (Framer: 2, first and last frame), H x W input pixels, S model input
size (224), P patch size (14), L tokens (1 CLS + (S/P)^2 patches = 257), D hidden size, E projection size
(1024; SVD's UNet cross-attends to it).

Parameter names equal the on-disk names of a diffusers `image_encoder/model.safetensors`
(`vision_model.embeddings.class_embedding`, `vision_model.pre_layrnorm.weight` (sic),
`vision_model.encoder.layers.<i>.self_attn.q_proj.weight`, ..., `visual_projection.weight`), so that file
loads with `strict=True` and no renaming. `vision_model.embeddings.position_ids`, stored by some older
files, is accepted and ignored (positions are always 0..L-1): by a load-state-dict pre-hook, and by
`clip_vision_file_key` for `backbones.loading.load_safetensors_into`.

The transformer layers are the text encoder's (`backbones.encoders.clip`: same names, pre-LN, biased q/k/v/out,
fc1/fc2 MLP with quick_gelu or exact gelu); only attention differs: no causal mask, and it goes through the
project's attention seam (`self.attn_op`), since images need no mask the seam lacks.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.attention import attention
from backbones.encoders.clip import CLIPAttention, CLIPEncoderLayer

POSITION_IDS_KEY = "vision_model.embeddings.position_ids"
_ACTIVATIONS = ("quick_gelu", "gelu")

# SVD's feature_extractor/preprocessor_config.json image_mean / image_std (reference/svd-framer.md §6.2); these
# are OpenAI CLIP's constants (transformers `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`), which OpenCLIP ViT-H reuses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Field names are transformers' `CLIPVisionConfig` ones, so `image_encoder/config.json` maps 1:1.
    Defaults are SVD's ViT-H/14 (not transformers' ViT-B/32 defaults)."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 1024
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"CLIPVisionConfig: hidden_size ({self.hidden_size}) is not divisible by "
                             f"num_attention_heads ({self.num_attention_heads}); pick hidden_size = heads * head_dim")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"CLIPVisionConfig: image_size ({self.image_size}) is not a multiple of patch_size "
                             f"({self.patch_size}); the patch grid must tile the image (224 = 16 * 14 for ViT-H/14)")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIPVisionConfig: hidden_act={self.hidden_act!r}; expected one of {_ACTIVATIONS} "
                             "(gelu for OpenCLIP ViT-H, quick_gelu for OpenAI CLIP)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> CLIPVisionConfig:
        """From a parsed `image_encoder/config.json` (a transformers CLIPVisionConfig) or a full CLIPConfig
        (its `vision_config` is used). Keys it omits take transformers' defaults, as transformers would;
        the others (dropout 0, initializer factors, model_type) do not change the math and are ignored."""
        if "vision_config" in config and isinstance(config["vision_config"], Mapping):
            config = config["vision_config"]  # type: ignore[assignment]
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                    "patch_size", "projection_dim")
        missing = [n for n in required if n not in config]
        if missing:
            raise ValueError(f"CLIPVisionConfig.from_config: config has no {missing}; expected a transformers "
                             "CLIPVisionConfig (image_encoder/config.json of an SVD download)")
        # transformers' CLIPVisionConfig defaults for the keys a hand-written config.json may leave out
        optional = {"num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
        return cls(**{n: config[n] for n in required},  # type: ignore[arg-type]
                   **{n: config.get(n, d) for n, d in optional.items()})


CLIP_VISION_PRESETS: dict[str, CLIPVisionConfig] = {
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K vision tower as in SVD's image_encoder/config.json: 632,076,800 params
    "vit-h-14": CLIPVisionConfig(),
    # Same architecture at toy size (4 x 4 patches + CLS). projection_dim is what a tiny SVD UNet's
    # cross_attention_dim must equal.
    "tiny": CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=56, patch_size=14, projection_dim=32),
}


class CLIPVisionAttention(CLIPAttention):
    """Unmasked multi-head self-attention, the text encoder's projections and names. x [B, L, D] -> [B, L, D].
    The kernel is `self.attn_op` (the project's seam), an instance attribute a backend or wrapper can swap."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__(cfg)  # type: ignore[arg-type]  # reads only the fields both configs share
        self.attn_op = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = (p(x).view(b, l, self.num_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(self.attn_op(q, k, v).reshape(b, l, d))  # scale C**-0.5, as upstream


class CLIPVisionEncoderLayer(CLIPEncoderLayer):
    """The text encoder's pre-LN block with unmasked attention."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__(cfg)  # type: ignore[arg-type]
        # Replacing the entry keeps its place in `_modules`, so state_dict() order stays transformers'.
        self.self_attn = CLIPVisionAttention(cfg)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        nn.init.normal_(self.class_embedding)
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> [B, L, D]: CLS then patches in row-major order, plus positions."""
        b = pixel_values.shape[0]
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)  # [B, (S/P)^2, D]
        cls = self.class_embedding.to(patches.dtype).expand(b, 1, -1)  # [B, 1, D]
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class CLIPVisionEncoder(nn.Module):
    """Holds the layers under transformers' names (`encoder.layers.<i>`)."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CLIPVisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPVisionTransformer(nn.Module):
    """The `vision_model` submodule: embeddings -> pre_layrnorm -> layers; post_layernorm acts on CLS only."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, transformers' name
        self.encoder = CLIPVisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPVisionModelWithProjection(nn.Module):
    """CLIP image tower: pixel_values [B, 3, S, S] (CLIP-normalised, see `svd_preprocess`) -> image_embeds [B, E]."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        self.register_load_state_dict_pre_hook(_state_dict_pre_hook)  # files with position_ids load strict

    def last_hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, L, D], the last layer's output (no post_layernorm), transformers' last_hidden_state."""
        s = self.cfg.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (self.cfg.num_channels, s, s):
            raise ValueError(f"CLIPVisionModelWithProjection: pixel_values {tuple(pixel_values.shape)}; expected "
                             f"[B, {self.cfg.num_channels}, {s}, {s}] (resize and normalise with svd_preprocess first)")
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        for layer in vm.encoder.layers:
            x = layer(x)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> image_embeds [B, E]: CLS -> post_layernorm -> visual_projection.
        Not L2-normalised: SVD feeds this vector to the UNet as is."""
        cls = self.last_hidden_state(pixel_values)[:, 0]  # [B, D]
        return self.visual_projection(self.vision_model.post_layernorm(cls))


# ------------------------------------------------------------------------------------------
# SVD preprocessing (diffusers' StableVideoDiffusionPipeline._encode_image, PIL / numpy input path)
# ------------------------------------------------------------------------------------------

def _gaussian_kernel(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """Normalised 1-D Gaussian [size] (size odd), computed in `like`'s dtype as the pipeline does."""
    x = torch.arange(size, device=like.device, dtype=like.dtype) - size // 2
    s = torch.tensor(sigma, device=like.device, dtype=like.dtype)
    g = torch.exp(-x.pow(2.0) / (2 * s.pow(2.0)))
    return g / g.sum()


def _blur(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """Depthwise 1-D convolution along dim -1 (W) or -2 (H) with reflect padding; x [B, C, H, W] keeps its shape."""
    c, k = x.shape[1], kernel.numel()
    shape = (1, 1, 1, k) if dim == -1 else (1, 1, k, 1)
    pad = (k // 2, k // 2, 0, 0) if dim == -1 else (0, 0, k // 2, k // 2)
    return F.conv2d(F.pad(x, pad, mode="reflect"), kernel.view(shape).expand(c, -1, -1, -1), groups=c)


def antialiased_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """x [B, C, H, W] -> [B, C, size[0], size[1]], diffusers' `_resize_with_antialiasing` (a port of kornia's
    antialiased resize that SGM trained SVD with): Gaussian blur with sigma = max((in/out - 1) / 2, 0.001) per
    axis and an odd kernel of int(max(4 sigma, 3)) taps, reflect padding, width pass first; then bicubic with
    align_corners=True. The aspect ratio is not kept and nothing is cropped."""
    factors = (x.shape[-2] / size[0], x.shape[-1] / size[1])
    sigmas = [max((f - 1.0) / 2.0, 0.001) for f in factors]
    ks = [int(max(4.0 * s, 3)) for s in sigmas]
    ks = [k + 1 if k % 2 == 0 else k for k in ks]
    for dim, k, s in ((-1, ks[1], sigmas[1]), (-2, ks[0], sigmas[0])):
        if k // 2 >= x.shape[dim]:
            raise ValueError(f"antialiased_resize: input {tuple(x.shape[-2:])} is too small for a {k}-tap blur "
                             f"(reflect padding needs more than {k // 2} pixels); a {size} target needs an input "
                             f"under {2 * (k // 2)}x the target per axis, or resize in two steps")
        x = _blur(x, _gaussian_kernel(k, s, x), dim)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=True)


def svd_preprocess(images: torch.Tensor, size: int = 224, *, mean: tuple[float, ...] = CLIP_MEAN,
                   std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """images [B, 3, H, W] in [-1, 1] -> pixel_values [B, 3, size, size] for the CLIP tower.

    The pipeline's path for PIL / numpy images (the one matching SGM training): antialiased resize in
    [-1, 1], back to [0, 1], then (x - mean) / std. Note diffusers skips the resize when handed a torch
    tensor, so a tensor input there must already be size x size in [0, 1]; this function always resizes.
    """
    if images.ndim != 4 or images.shape[1] != len(mean) or not images.is_floating_point():
        raise ValueError(f"svd_preprocess: images {tuple(images.shape)} {images.dtype}; expected a float tensor "
                         f"[B, {len(mean)}, H, W] with values in [-1, 1]")
    x = (antialiased_resize(images, (size, size)) + 1.0) / 2.0
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def encode_image(model: CLIPVisionModelWithProjection, images: torch.Tensor,
                 size: int | None = None) -> torch.Tensor:
    """SVD's CLIP tokens: images [B, 3, H, W] -> [B, 1, E] (the pipeline's image_embeddings.unsqueeze(1)), or
    [B, N, 3, H, W] -> [B, N, E] (Framer: N = 2, first and last frame, as its pipeline concatenates them).
    Images in [-1, 1]; size defaults to the model's image_size and must equal it."""
    size = model.cfg.image_size if size is None else size
    if size != model.cfg.image_size:
        raise ValueError(f"encode_image: size={size} but the model takes {model.cfg.image_size}x"
                         f"{model.cfg.image_size} images; drop the argument or build a matching config")
    if images.ndim not in (4, 5):
        raise ValueError(f"encode_image: images {tuple(images.shape)}; expected [B, 3, H, W] or [B, N, 3, H, W]")
    b, n = images.shape[0], 1 if images.ndim == 4 else images.shape[1]
    pixel_values = svd_preprocess(images.reshape(b * n, *images.shape[-3:]), size)
    return model(pixel_values).view(b, n, -1)


# ------------------------------------------------------------------------------------------
# Key names of other files
# ------------------------------------------------------------------------------------------

def clip_vision_file_key(name: str) -> str | None:
    """`backbones.loading` rename: a key of an image_encoder file -> ours; None for position_ids (ignored).
    Other keys pass through unchanged, so a strict load reports them as unexpected."""
    return None if name == POSITION_IDS_KEY else name


def _state_dict_pre_hook(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str,
                         *args: object) -> None:
    state_dict.pop(prefix + POSITION_IDS_KEY, None)
