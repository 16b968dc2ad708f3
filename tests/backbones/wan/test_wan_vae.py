"""Wan2.2 VAE: exact upstream names/shapes, diffusers key map, numerical parity with diffusers'
AutoencoderKLWan (test-only oracle), chunked causality, input validation, LoRA conv contract."""
from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.wan.vae import (CausalConv3d, FeatureCache, VAE_PRESETS, WanVAE, WanVAEConfig, build_vae,
                               patchify, unpatchify)
from backbones.wan.vae_keymap import (convert_vae_state_dict, is_diffusers_vae_state_dict, vae_from_diffusers,
                                      vae_to_diffusers)

_KEY_FILES = [Path(__file__).with_name("wan_vae_keys.txt"), Path("/work/shared/reference/wan_vae_keys.txt")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _reference_keys() -> dict[str, tuple[int, ...]]:
    path = next((p for p in _KEY_FILES if p.is_file()), None)
    if path is None:
        pytest.skip(f"wan_vae_keys.txt (key list of the official checkpoint) not found in {_KEY_FILES}")
    keys = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split(" ", 1)
        keys[name] = tuple(ast.literal_eval(shape))
    return keys


def _diffusers_vae(cfg: WanVAEConfig) -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    return diffusers.AutoencoderKLWan(
        base_dim=cfg.dim, decoder_base_dim=cfg.dec_dim, z_dim=cfg.z_dim, is_residual=True,
        in_channels=cfg.in_channels * cfg.patch_size ** 2, out_channels=cfg.in_channels * cfg.patch_size ** 2,
        patch_size=cfg.patch_size, scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std))


def test_5b_on_meta_matches_official_keys_and_count() -> None:
    with torch.device("meta"):
        model = WanVAE(VAE_PRESETS["5b"])
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == list(_reference_keys().items())  # names, shapes and order
    assert sum(p.numel() for p in model.parameters()) == 704_688_668
    assert not list(model.buffers())  # latent mean/std live in the config, not the state dict


def test_keymap_round_trip_equals_diffusers_key_set() -> None:
    with torch.device("meta"):
        ours = {k: v.shape for k, v in WanVAE(VAE_PRESETS["5b"]).state_dict().items()}
        theirs = {k: v.shape for k, v in _diffusers_vae(VAE_PRESETS["5b"]).state_dict().items()}
    assert len(ours) == len(theirs) == 196
    assert {vae_to_diffusers(k): s for k, s in ours.items()} == theirs
    assert {vae_from_diffusers(k): s for k, s in theirs.items()} == ours
    assert vae_to_diffusers("encoder.downsamples.1.downsamples.2.time_conv.weight") == \
        "encoder.down_blocks.1.downsampler.time_conv.weight"
    assert vae_to_diffusers("decoder.middle.2.residual.6.bias") == "decoder.mid_block.resnets.1.conv2.bias"


def test_keymap_rejects_foreign_keys() -> None:
    for bad in ("blocks.0.self_attn.q.weight", "encoder.downsamples.0.downsamples.0.residual.1.gamma"):
        with pytest.raises(ValueError, match="not a Wan2.2 VAE key"):
            vae_to_diffusers(bad)
    with pytest.raises(ValueError, match="not a Wan2.2 VAE key"):
        vae_from_diffusers("encoder.mid_block.resnets.2.norm1.gamma")
    with pytest.raises(ValueError, match="'upstream'"):
        convert_vae_state_dict({}, to="comfy")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[WanVAE, nn.Module, WanVAEConfig]:
    """Our tiny VAE and diffusers' with the same random weights (every tensor, gammas included) and
    non-trivial latent statistics, so normalisation is covered too."""
    g = torch.Generator().manual_seed(0)
    z = VAE_PRESETS["tiny"].z_dim
    cfg = replace(VAE_PRESETS["tiny"],
                  latents_mean=tuple((torch.randn(z, generator=g) * 0.3).tolist()),
                  latents_std=tuple((torch.rand(z, generator=g) + 0.5).tolist()))
    ref = _diffusers_vae(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:  # unit-variance activations through ~40 convs, so the decoder output is not all clamped
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    ours = WanVAE(cfg).eval()
    sd = ref.state_dict()
    assert is_diffusers_vae_state_dict(sd)
    ours.load_state_dict(convert_vae_state_dict(sd, to="upstream"), strict=True)
    return ours, ref, cfg


def test_encode_decode_parity_with_diffusers(tiny_pair: tuple[WanVAE, nn.Module, WanVAEConfig]) -> None:
    ours, ref, cfg = tiny_pair
    g = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, 9, 32, 32, generator=g) * 2 - 1
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z = ours.encode(video)
        z_ref = (ref.encode(video).latent_dist.mean - mean) / std
        assert z.shape == (1, cfg.z_dim, 3, 2, 2)
        assert _rel(z, z_ref) <= 1e-5

        lat = torch.randn(1, cfg.z_dim, 3, 2, 2, generator=g)
        out = ours.decode(lat)
        out_ref = ref.decode(lat * std + mean).sample  # diffusers decodes raw latents, clamps after unpatchify
    assert out.shape == (1, 3, 9, 32, 32)
    assert (out_ref.abs() < 1).float().mean() > 0.5  # most values unclamped: the comparison has teeth
    assert _rel(out, out_ref) <= 1e-5


def test_chunked_encode_decode_is_causal(tiny_pair: tuple[WanVAE, nn.Module, WanVAEConfig]) -> None:
    ours, _, cfg = tiny_pair
    g = torch.Generator().manual_seed(2)
    video = torch.rand(1, 3, 9, 16, 32, generator=g) * 2 - 1
    lat = torch.randn(2, cfg.z_dim, 3, 1, 2, generator=g)
    with torch.no_grad():
        z9, z5 = ours.encode(video), ours.encode(video[:, :, :5])
        v3, v2 = ours.decode(lat), ours.decode(lat[:, :, :2])
    # later frames must not change earlier latents/frames (a leak would be O(1); the two paths sum in another
    # order, 2e-6 apart on one thread)
    torch.testing.assert_close(z5, z9[:, :, :2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v2, v3[:, :, :5], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z9[:, :, 1], z9[:, :, 2])


@pytest.mark.parametrize("frames,latent_frames", [(1, 1), (9, 3)])
def test_round_trip_shapes(frames: int, latent_frames: int) -> None:
    vae = build_vae("tiny").eval()
    video = torch.rand(2, 3, frames, 32, 48) * 2 - 1
    with torch.no_grad():
        z = vae.encode(video)
        out = vae.decode(z)
    assert z.shape == (2, 16, latent_frames, 2, 3)
    assert out.shape == video.shape
    assert out.abs().max() <= 1.0


def test_low_precision_runs_in_weight_dtype() -> None:
    vae = build_vae("tiny").eval().to(torch.bfloat16)
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 5, 16, 16))  # fp32 input is cast to the weights' dtype
        out = vae.decode(z)
    assert z.dtype == out.dtype == torch.bfloat16 and out.shape == (1, 3, 5, 16, 16)


def test_bad_inputs_name_value_and_nearest_valid() -> None:
    vae = build_vae("tiny")
    with pytest.raises(ValueError, match=r"T=10 .*Nearest valid: 9"):
        vae.encode(torch.zeros(1, 3, 10, 32, 32))
    with pytest.raises(ValueError, match=r"T=12 .*Nearest valid: 13"):
        vae.encode(torch.zeros(1, 3, 12, 32, 32))
    with pytest.raises(ValueError, match=r"H=40; .*multiple of 16"):
        vae.encode(torch.zeros(1, 3, 1, 40, 32))
    with pytest.raises(ValueError, match=r"W=24; .*Nearest valid: 32"):
        vae.encode(torch.zeros(1, 3, 1, 32, 24))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(3, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 16, F>=1, h, w\]"):
        vae.decode(torch.zeros(1, 48, 2, 2, 2))
    with pytest.raises(ValueError, match="latents_mean has 48 values, expected z_dim=16"):
        WanVAEConfig(z_dim=16)
    with pytest.raises(ValueError, match="unknown WanVAEConfig field 'zdim'"):
        build_vae("tiny", zdim=8)


def test_patchify_layout_and_inverse() -> None:
    x = torch.randn(2, 3, 2, 8, 6)
    p = patchify(x, 2)
    assert p.shape == (2, 12, 2, 4, 3)
    c, q, r, i, j = 1, 1, 0, 2, 1  # channel c*4 + r*2 + q holds pixel (2i+q, 2j+r)
    torch.testing.assert_close(p[:, c * 4 + r * 2 + q, :, i, j], x[:, c, :, 2 * i + q, 2 * j + r])
    torch.testing.assert_close(unpatchify(p, 2), x)


def test_causal_conv_pads_in_forward_and_convolves_via_conv_forward() -> None:
    """The LoRA engine overrides `_conv_forward`; a delta kernel added there must act exactly like
    a change of the base weight, with and without the chunk cache."""
    torch.manual_seed(0)
    base = CausalConv3d(4, 5, 3, padding=1)
    assert isinstance(base, nn.Conv3d) and base.padding == (0, 0, 0)
    delta = torch.randn_like(base.weight) * 0.1

    class Patched(CausalConv3d):
        def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return super()._conv_forward(x, weight, bias) + F.conv3d(x, delta, None, self.stride)

    patched = Patched(4, 5, 3, padding=1)
    merged = CausalConv3d(4, 5, 3, padding=1)
    patched.load_state_dict(base.state_dict())
    merged.load_state_dict({"weight": base.weight + delta, "bias": base.bias})
    x = torch.randn(1, 4, 5, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), merged(x))
        cp, cm = FeatureCache(), FeatureCache()
        for chunk in (x[:, :, :1], x[:, :, 1:]):
            torch.testing.assert_close(patched(chunk, cp), merged(chunk, cm))
        # causal: output frame t depends only on frames <= t
        y = base(x)
        x2 = x.clone()
        x2[:, :, 3:] += 1.0
        torch.testing.assert_close(base(x2)[:, :, :3], y[:, :, :3])
        # chunked with cache == one pass over the whole clip
        cache = FeatureCache()
        chunked = torch.cat([base(x[:, :, :1], cache), base(x[:, :, 1:3], cache), base(x[:, :, 3:], cache)], 2)
        torch.testing.assert_close(chunked, y)
