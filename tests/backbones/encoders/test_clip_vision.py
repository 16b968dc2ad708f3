"""CLIP ViT-H/14 image encoder + SVD preprocessing: key/shape contract, parity with transformers and diffusers.

transformers (`CLIPVisionModelWithProjection`, `CLIPImageProcessorPil`) and diffusers (the SVD pipeline's
module-level resize helpers) are test-only oracles; the runtime module never imports them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from backbones.encoders.clip_vision import (CLIP_MEAN, CLIP_STD, CLIP_VISION_PRESETS, POSITION_IDS_KEY,
                                            CLIPVisionConfig, CLIPVisionModelWithProjection, antialiased_resize,
                                            clip_vision_file_key, encode_image, svd_preprocess)
from backbones.loading import load_safetensors_into
from tests.oracle import randomize_, rel_err

PARAMS_VIT_H = 632_076_800  # reference/svd-framer.md §6.1, counted on transformers' meta model
KEYS_FILE = Path(__file__).parent / "clip_vit_h_keys.txt"  # copy of reference/clip_vit_h_keys.txt: "name (shape)"


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is the parity oracle")


def _svd_pipeline_module():
    pytest.importorskip("diffusers", reason="diffusers is the preprocessing oracle")
    from diffusers.pipelines.stable_video_diffusion import pipeline_stable_video_diffusion as pipe
    return pipe


def _hf_config(cfg: CLIPVisionConfig):
    hf = _transformers().CLIPVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_channels=cfg.num_channels, image_size=cfg.image_size,
        patch_size=cfg.patch_size, projection_dim=cfg.projection_dim, hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps, attention_dropout=0.0)
    hf._attn_implementation = "eager"  # explicit softmax(q k^T * scale) v, independent of our SDPA path
    return hf


def _hf_tiny(cfg: CLIPVisionConfig, seed: int = 0):
    hf = _transformers().CLIPVisionModelWithProjection(_hf_config(cfg)).eval()
    return randomize_(hf, seed)  # "pre_layrnorm"/"post_layernorm" contain "norm": weights near 1


def _ours_from(hf, cfg: CLIPVisionConfig) -> CLIPVisionModelWithProjection:
    ours = CLIPVisionModelWithProjection(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours


def _images(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # [-1, 1]


def _diffusers_pixel_values(images: torch.Tensor, size: int) -> torch.Tensor:
    """`_encode_image` for PIL input, from the pipeline's own functions: its `image * 2 - 1` is already done."""
    pipe = _svd_pipeline_module()
    x = (pipe._resize_with_antialiasing(images, (size, size)) + 1.0) / 2.0
    fe = _transformers().CLIPImageProcessorPil(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return fe(images=x, do_normalize=True, do_center_crop=False, do_resize=False, do_rescale=False,
              return_tensors="pt").pixel_values


# ---------------------------------------------------------------------------------- contract (meta)

def test_vit_h_keys_and_count_match_reference_and_transformers():
    with torch.device("meta"):
        ours = CLIPVisionModelWithProjection(CLIP_VISION_PRESETS["vit-h-14"])
    lines = [ln for ln in KEYS_FILE.read_text().splitlines() if ln.strip()]
    ref = [(m.group(1), tuple(int(d) for d in m.group(2).replace(" ", "").split(",") if d))
           for m in (re.fullmatch(r"(\S+) \(([\d, ]*)\)", ln) for ln in lines)]
    assert len(ref) == 520
    got = [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
    assert got == ref  # names, shapes and order
    n = sum(p.numel() for p in ours.parameters())
    assert n == PARAMS_VIT_H
    assert sum(math.prod(s) for _, s in ref) == n

    with torch.device("meta"):
        hf = _transformers().CLIPVisionModelWithProjection(_hf_config(CLIP_VISION_PRESETS["vit-h-14"]))
    assert sum(p.numel() for p in hf.parameters()) == PARAMS_VIT_H
    assert list(hf.state_dict()) == [k for k, _ in ref]


def test_from_config_reads_transformers_config_json(tmp_path: Path):
    for name, cfg in CLIP_VISION_PRESETS.items():
        path = tmp_path / f"{name}.json"
        _hf_config(cfg).to_json_file(str(path))
        assert CLIPVisionConfig.from_config(json.loads(path.read_text())) == cfg
    # a full CLIPConfig: its vision half is used
    full = {"vision_config": _hf_config(CLIP_VISION_PRESETS["tiny"]).to_dict(), "text_config": {}}
    assert CLIPVisionConfig.from_config(full) == CLIP_VISION_PRESETS["tiny"]
    with pytest.raises(ValueError, match="projection_dim"):
        CLIPVisionConfig.from_config({"hidden_size": 32})
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPVisionConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="patch_size"):
        CLIPVisionConfig(image_size=50, patch_size=14)


# ---------------------------------------------------------------------------------- model parity

@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_tiny_image_embeds_match_transformers(act: str):
    cfg = dataclasses.replace(CLIP_VISION_PRESETS["tiny"], hidden_act=act)
    hf = _hf_tiny(cfg)
    ours = _ours_from(hf, cfg)
    pixel_values = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = hf(pixel_values=pixel_values)
        ref, ref_hidden = out.image_embeds, out.last_hidden_state
        got, got_hidden = ours(pixel_values), ours.last_hidden_state(pixel_values)
    assert got.shape == (3, cfg.projection_dim)
    assert rel_err(got, ref) <= 1e-5
    assert rel_err(got_hidden, ref_hidden) <= 1e-5
    # position embeddings are applied: a mirrored image (same patches' pixels, other places) embeds differently
    with torch.no_grad():
        assert rel_err(ours(pixel_values.flip(-1)), got) > 1e-3
        assert torch.allclose(ours(pixel_values[:1]), got[:1], atol=1e-6, rtol=0)  # no mixing across the batch


def test_wrong_input_size_raises():
    ours = CLIPVisionModelWithProjection(CLIP_VISION_PRESETS["tiny"])
    with pytest.raises(ValueError, match="svd_preprocess"):
        ours(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="size=224"):
        encode_image(ours, torch.zeros(1, 3, 64, 64), 224)


def test_transformers_saved_file_loads_strict(tmp_path: Path):
    cfg = CLIP_VISION_PRESETS["tiny"]
    hf = _hf_tiny(cfg, seed=3)
    hf.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert CLIPVisionConfig.from_config(json.loads((tmp_path / "config.json").read_text())) == cfg

    ours = CLIPVisionModelWithProjection(cfg)
    ours.load_state_dict(sd, strict=True)
    for k, v in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k

    # older files also store position_ids: ignored by load_state_dict and by the loader's rename
    sd[POSITION_IDS_KEY] = torch.arange(cfg.num_positions)[None]
    CLIPVisionModelWithProjection(cfg).load_state_dict(dict(sd), strict=True)
    save_file(sd, str(tmp_path / "with_ids.safetensors"))
    with torch.device("meta"):
        meta = CLIPVisionModelWithProjection(cfg)
    load_safetensors_into(meta, [tmp_path / "with_ids.safetensors"], rename=clip_vision_file_key)
    assert torch.equal(meta.visual_projection.weight, hf.visual_projection.weight)


# ---------------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("hw", [(256, 384), (320, 512), (96, 64)])
def test_svd_preprocess_matches_pipeline(hw: tuple[int, int]):
    images = _images((2, 3, *hw))
    ref = _diffusers_pixel_values(images, 224)
    got = svd_preprocess(images)
    assert got.shape == (2, 3, 224, 224)
    assert (got - ref).abs().max().item() <= 1e-6
    # the resize alone is the pipeline's, and it is antialiased (not plain bicubic)
    resized = antialiased_resize(images, (224, 224))
    assert torch.equal(resized, _svd_pipeline_module()._resize_with_antialiasing(images, (224, 224)))
    if hw[0] > 224:
        plain = torch.nn.functional.interpolate(images, size=(224, 224), mode="bicubic", align_corners=True)
        assert (plain - resized).abs().max().item() > 1e-2


def test_clip_constants_are_transformers_openai_ones():
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    assert tuple(CLIP_MEAN) == tuple(OPENAI_CLIP_MEAN) and tuple(CLIP_STD) == tuple(OPENAI_CLIP_STD)


def test_encode_image_matches_pipeline_embeddings():
    cfg = CLIP_VISION_PRESETS["tiny"]
    hf = _hf_tiny(cfg, seed=4)
    ours = _ours_from(hf, cfg)
    first, last = _images((2, 3, 80, 120), seed=5), _images((2, 3, 80, 120), seed=6)
    with torch.no_grad():
        ref = hf(pixel_values=_diffusers_pixel_values(first, cfg.image_size)).image_embeds.unsqueeze(1)
        got = encode_image(ours, first)
        two = encode_image(ours, torch.stack([first, last], dim=1))  # Framer: [B, 2, E]
        ref_last = encode_image(ours, last)
    assert got.shape == (2, 1, cfg.projection_dim)
    assert rel_err(got, ref) <= 1e-5
    assert two.shape == (2, 2, cfg.projection_dim)
    assert torch.allclose(two, torch.cat([got, ref_last], dim=1), atol=1e-6, rtol=0)


def test_svd_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        svd_preprocess(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="float"):
        svd_preprocess(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
