"""CogVideoX VAE: exact checkpoint layout, parity with diffusers (plain, frame-chunked, tiled, sliced), the
frame-count rules and the posterior draw.

Shapes: B batch, F pixel frames, L latent frames; the tiny preset keeps the 4x8x8 compression, so a
[B, 3, 9, 32, 32] clip has latents [B, 16, 3, 4, 4].
"""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import backbones.cogvideox.vae as vae_module
from backbones.cogvideox.vae import (VAE_PRESETS, AutoencoderKLCogVideoX, CogVideoXVAEConfig, check_frames,
                                     decoded_frames, frame_chunks, sample_latent)
from tests.oracle import randomize_, rel_err

KEYS = Path(__file__).parent / "cogvideox_vae_keys.txt"  # copy of ../shared/reference/cogvideox_vae_keys.txt
TINY = VAE_PRESETS["tiny"]
# cogvideox.md §3.7, counted from diffusers 0.42.1 AutoencoderKLCogVideoX built on the meta device.
PARAMS, ENCODER_PARAMS, DECODER_PARAMS = 215_583_907, 92_215_456, 123_368_451
# THUDM/CogVideoX-5b vae/config.json as published (cogvideox.md §3.1), with its bookkeeping keys.
CONFIG_JSON_5B = """{"_class_name": "AutoencoderKLCogVideoX", "_diffusers_version": "0.31.0.dev0", "act_fn": "silu",
 "block_out_channels": [128, 256, 256, 512], "down_block_types": ["CogVideoXDownBlock3D", "CogVideoXDownBlock3D",
 "CogVideoXDownBlock3D", "CogVideoXDownBlock3D"], "force_upcast": true, "in_channels": 3, "latent_channels": 16,
 "latents_mean": null, "latents_std": null, "layers_per_block": 3, "norm_eps": 1e-06, "norm_num_groups": 32,
 "out_channels": 3, "sample_height": 480, "sample_width": 720, "scaling_factor": 0.7, "shift_factor": null,
 "temporal_compression_ratio": 4, "up_block_types": ["CogVideoXUpBlock3D", "CogVideoXUpBlock3D",
 "CogVideoXUpBlock3D", "CogVideoXUpBlock3D"], "use_post_quant_conv": false, "use_quant_conv": false}"""


def _video(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def _built_pair() -> tuple[nn.Module, AutoencoderKLCogVideoX]:
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference oracle (test extra)")
    ours = randomize_(AutoencoderKLCogVideoX(TINY), seed=0).eval()
    # every config field is a diffusers constructor argument, verbatim
    ref = diffusers.AutoencoderKLCogVideoX(**dataclasses.asdict(TINY)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # same names, no key map
    return ref, ours


@pytest.fixture
def pair(_built_pair: tuple[nn.Module, AutoencoderKLCogVideoX]) -> tuple[nn.Module, AutoencoderKLCogVideoX]:
    """diffusers' model and ours with the same random weights (ours randomised, loaded into diffusers), built
    once per module, tiling and slicing off."""
    for model in _built_pair:
        model.disable_tiling()
        model.disable_slicing()
    return _built_pair


# -- checkpoint layout -----------------------------------------------------------------------------

def _reference_keys() -> list[tuple[str, list[int]]]:
    if not KEYS.exists():
        pytest.skip(f"{KEYS} (the key list dumped from diffusers) is not present")
    rows = []
    for line in KEYS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split(" ", 1)
            rows.append((name, list(ast.literal_eval(shape))))
    return rows


def test_meta_model_matches_checkpoint_layout() -> None:
    with torch.device("meta"):
        model = AutoencoderKLCogVideoX(VAE_PRESETS["5b"])
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == _reference_keys()  # names, shapes, order
    assert sum(p.numel() for p in model.parameters()) == PARAMS
    assert sum(p.numel() for p in model.encoder.parameters()) == ENCODER_PARAMS
    assert sum(p.numel() for p in model.decoder.parameters()) == DECODER_PARAMS
    assert not list(model.buffers())
    assert model.config is VAE_PRESETS["5b"]


def test_presets_differ_only_in_scaling_factor() -> None:
    two, five = VAE_PRESETS["2b"], VAE_PRESETS["5b"]
    assert (two.scaling_factor, five.scaling_factor) == (1.15258426, 0.7)  # cogvideox.md §0.2 (not reversed)
    assert dataclasses.replace(two, scaling_factor=0.7) == five


def test_from_config_reads_config_json_and_ignores_bookkeeping_keys() -> None:
    cfg = CogVideoXVAEConfig.from_config(json.loads(CONFIG_JSON_5B))
    assert cfg == VAE_PRESETS["5b"]
    with pytest.raises(ValueError, match="use_quant_conv"):
        CogVideoXVAEConfig.from_config({"use_quant_conv": True})
    with pytest.raises(ValueError, match="norm_num_groups"):
        CogVideoXVAEConfig(block_out_channels=(16, 24), down_block_types=("CogVideoXDownBlock3D",) * 2,
                           up_block_types=("CogVideoXUpBlock3D",) * 2, norm_num_groups=16,
                           temporal_compression_ratio=2)


# -- parity with diffusers -------------------------------------------------------------------------

@pytest.mark.parametrize("frames", [1, 9, 17])  # 17: encode chunks 9 + 8, decode chunks 3 + 2 latents
def test_encode_decode_parity_with_diffusers(pair: tuple[nn.Module, AutoencoderKLCogVideoX], frames: int) -> None:
    ref, ours = pair
    x = _video((1, 3, frames, 32, 32), seed=frames)
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        post = ref.encode(x).latent_dist
        latent_frames = check_frames(frames)
        assert mean.shape == logvar.shape == (1, 16, latent_frames, 4, 4)
        err_m, err_v = rel_err(mean, post.mean), rel_err(logvar, post.logvar)
        z = _latents(tuple(mean.shape), seed=frames + 100)
        got, want = ours.decode(z), ref.decode(z).sample
    assert got.shape == want.shape == (1, 3, frames, 32, 32)
    err_d = rel_err(got, want)
    print(f"{frames} frames: rel err mean {err_m:.1e}, logvar {err_v:.1e}, decode {err_d:.1e}")
    assert max(err_m, err_v, err_d) <= 1e-5


@pytest.mark.parametrize("latent_frames", [2, 4])  # even L: 4L frames out (chunks (0,1) / (0,1),(2,3))
def test_decode_even_latent_count_parity(pair: tuple[nn.Module, AutoencoderKLCogVideoX], latent_frames: int) -> None:
    ref, ours = pair
    z = _latents((1, 16, latent_frames, 3, 4), seed=latent_frames)
    with torch.no_grad():
        got, want = ours.decode(z), ref.decode(z).sample
    assert got.shape == want.shape == (1, 3, decoded_frames(latent_frames), 24, 32)
    assert decoded_frames(latent_frames) == 4 * latent_frames
    assert rel_err(got, want) <= 1e-5


def test_posterior_draw_matches_diffusers(pair: tuple[nn.Module, AutoencoderKLCogVideoX]) -> None:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    _, ours = pair
    with torch.no_grad():
        mean, logvar = ours.encode(_video((2, 3, 5, 16, 24), seed=7))
    got = sample_latent(mean, logvar, torch.Generator().manual_seed(3))
    want = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)).sample(torch.Generator().manual_seed(3))
    assert torch.equal(got, want)
    assert not torch.equal(got, sample_latent(mean, logvar, torch.Generator().manual_seed(4)))


# -- tiling and slicing ----------------------------------------------------------------------------

# (tile px h, w, overlap h, w): 32 px = 4 latents at 1/4 (stride 24 px / 3 latents, blend 1 latent / 8 px)
# and 48 px = 6 latents at 1/2 (stride 24 px / 3 latents, blend 3 latents / 24 px); on 48 x 80 px that is
# 2 x 4 tiles, including thin edge tiles (8 px, 1 latent).
TILINGS = [(32, 32, 0.25, 0.25), (32, 48, 0.25, 0.5)]


@pytest.mark.parametrize("tiling,frames", [(TILINGS[0], 9), (TILINGS[1], 5)])  # frame chunks inside tiles
def test_tiled_parity_with_diffusers(pair: tuple[nn.Module, AutoencoderKLCogVideoX],
                                     tiling: tuple[int, int, float, float], frames: int) -> None:
    ref, ours = pair
    latent_frames = check_frames(frames)
    x = _video((1, 3, frames, 48, 80), seed=11)
    z = _latents((1, 16, latent_frames, 6, 10), seed=12)
    with torch.no_grad():
        mean0, _ = ours.encode(x)
        dec0 = ours.decode(z)
        for model in pair:
            model.enable_tiling(*tiling)
        mean, logvar = ours.encode(x)
        post = ref.encode(x).latent_dist
        got, want = ours.decode(z), ref.decode(z).sample
    assert mean.shape == mean0.shape == (1, 16, latent_frames, 6, 10)
    assert got.shape == dec0.shape == (1, 3, decoded_frames(latent_frames), 48, 80)
    assert rel_err(mean, post.mean) <= 1e-5 and rel_err(logvar, post.logvar) <= 1e-5
    assert rel_err(got, want) <= 1e-5
    # With random weights every tile's GroupNorm statistics differ from the whole frame's, so tiled and
    # untiled differ at O(1) (measured 0.61 / 0.67 encode, 0.40 / 0.38 decode); that closeness is tested on a
    # spatially local model below, where it must hold to float precision.
    print(f"tiled vs untiled, random weights {tiling}: encode {rel_err(mean, mean0):.2f}, "
          f"decode {rel_err(got, dec0):.2f}")


def test_tiles_are_placed_where_they_came_from(pair: tuple[nn.Module, AutoencoderKLCogVideoX]) -> None:
    """The unblended part of each top-row tile equals encoding that crop alone."""
    _, ours = pair
    x = _video((1, 3, 5, 48, 80), seed=13)
    ours.enable_tiling(32, 32, 0.25, 0.25)  # stride 24 px; latent tile 4, blend 1, keep 3
    with torch.no_grad():
        tiled, _ = ours.encode(x)
        ours.disable_tiling()
        for j in range(3):
            alone, _ = ours.encode(x[..., :32, 24 * j:24 * j + 32])
            lo = 0 if j == 0 else 1  # columns blended with the left neighbour
            assert rel_err(tiled[..., :3, 3 * j + lo:3 * j + 3], alone[..., :3, lo:3]) <= 1e-6


def _spatially_local_(model: nn.Module) -> nn.Module:
    """Keep only the centre spatial tap of every conv (time taps stay): the network is then local in space
    except for GroupNorm statistics, and zero padding at tile borders no longer matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.kernel_size[-1] > 1:
                centre = torch.zeros_like(m.weight)
                centre[..., 1, 1] = m.weight[..., 1, 1]
                m.weight.copy_(centre)
    return model


def test_tiled_equals_untiled_on_a_local_model() -> None:
    """Spatially local weights and inputs periodic with the tile stride: every tile (edge tiles included)
    holds whole periods, so its GroupNorm statistics equal the frame's and tiling must not change the result;
    a wrong crop, stride or blend weight would."""
    model = _spatially_local_(randomize_(AutoencoderKLCogVideoX(TINY), seed=5)).eval()
    base = _video((1, 3, 5, 16, 16), seed=14)
    x = base.repeat(1, 1, 1, 3, 4)  # 48 x 64 px, period 16 px
    z = _latents((1, 16, 2, 2, 2), seed=15).repeat(1, 1, 1, 3, 4)  # 6 x 8 latents, period 2
    with torch.no_grad():
        mean0, logvar0 = model.encode(x)
        dec0 = model.decode(z)
        model.enable_tiling(32, 32, 0.5, 0.5)  # stride 16 px / 2 latents, tiles 3 x 4 (edges 16 px / 2 latents)
        mean, logvar = model.encode(x)
        dec = model.decode(z)
    errs = rel_err(mean, mean0), rel_err(logvar, logvar0), rel_err(dec, dec0)
    print("tiled vs untiled, local model: encode mean {:.1e}, logvar {:.1e}, decode {:.1e}".format(*errs))
    assert max(errs) <= 1e-5  # measured <= 1e-6


def test_slicing_matches_the_batched_call(pair: tuple[nn.Module, AutoencoderKLCogVideoX]) -> None:
    ref, ours = pair
    x = _video((2, 3, 9, 32, 32), seed=16)
    z = _latents((2, 16, 3, 4, 4), seed=17)
    with torch.no_grad():
        mean_b, logvar_b = ours.encode(x)
        dec_b = ours.decode(z)
        for model in pair:
            model.enable_slicing()
        mean_s, logvar_s = ours.encode(x)
        dec_s = ours.decode(z)
        assert torch.equal(mean_s[1:], ours.encode(x[1:])[0])  # one sample at a time, really
        assert rel_err(mean_s, ref.encode(x).latent_dist.mean) <= 1e-6
    # batch 2 vs 1 changes only the conv kernels' summation order: measured 1.3e-6 / 1.4e-6 / 1.5e-6
    assert max(rel_err(mean_s, mean_b), rel_err(logvar_s, logvar_b), rel_err(dec_s, dec_b)) <= 1e-5


def test_safe_conv_split_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream splits conv inputs over 2**30 elements along time; forced here with a tiny limit."""
    model = randomize_(AutoencoderKLCogVideoX(TINY), seed=8).eval()
    x, z = _video((1, 3, 9, 16, 16), seed=20), _latents((1, 16, 3, 2, 2), seed=21)
    with torch.no_grad():
        want = model.encode(x)[0], model.decode(z)
        monkeypatch.setattr(vae_module, "_SAFE_CONV_ELEMENTS", 3000)  # every 3-D conv splits, some per frame
        got = model.encode(x)[0], model.decode(z)
    assert rel_err(got[0], want[0]) <= 1e-6 and rel_err(got[1], want[1]) <= 1e-6


def test_enable_tiling_defaults_and_bad_geometry() -> None:
    model = AutoencoderKLCogVideoX(TINY)
    assert not model.use_tiling and not model.use_slicing
    model.enable_tiling()  # diffusers' defaults: half the sample size, overlap 1/6 x 1/5
    assert (model.tile_sample_min_height, model.tile_sample_min_width) == (240, 360)
    assert (model.tile_latent_min_height, model.tile_latent_min_width) == (30, 45)
    assert (model.tile_overlap_factor_height, model.tile_overlap_factor_width) == (1 / 6, 1 / 5)
    model.enable_tiling(tile_sample_min_width=48, tile_overlap_factor_width=0.5)  # None keeps a value
    assert (model.tile_sample_min_height, model.tile_sample_min_width, model.tile_latent_min_width) == (240, 48, 6)
    with pytest.raises(ValueError, match="multiple of"):
        model.enable_tiling(tile_sample_min_height=36)
    with pytest.raises(ValueError, match="wrong size"):
        model.enable_tiling(40, 56, 0.25, 0.25)  # diffusers would return a 66-px-wide video for 64 px
    model.disable_tiling()
    assert not model.use_tiling


# -- frame rules and input checks ------------------------------------------------------------------

def test_check_frames() -> None:
    assert [check_frames(n) for n in (1, 5, 9, 17, 49)] == [1, 2, 3, 5, 13]
    for bad, nearest in ((0, "1 or 5"), (2, "1 or 5"), (12, "9 or 13"), (48, "45 or 49")):
        with pytest.raises(ValueError, match=rf"4k\+1.*nearest valid: {nearest}"):
            check_frames(bad)
    with pytest.raises(ValueError, match=r"8k\+1"):  # the round-trip advice is in the message
        check_frames(50)
    assert [decoded_frames(n) for n in (1, 2, 3, 4, 13)] == [1, 8, 9, 16, 49]
    assert [(s.start, s.stop) for s in frame_chunks(49, 8)] == [(0, 9), (9, 17), (17, 25), (25, 33), (33, 41),
                                                               (41, 49)]
    assert [(s.start, s.stop) for s in frame_chunks(13, 2)] == [(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]


def test_bad_inputs_raise() -> None:
    model = AutoencoderKLCogVideoX(TINY)
    with pytest.raises(ValueError, match="4k\\+1"):
        model.encode(torch.zeros(1, 3, 12, 16, 16))
    with pytest.raises(ValueError, match="multiple of 8"):
        model.encode(torch.zeros(1, 3, 5, 16, 20))
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        model.encode(torch.zeros(1, 5, 3, 16, 16))  # [B, F, C, H, W] by mistake
    with pytest.raises(ValueError, match="latents"):
        model.decode(torch.zeros(1, 3, 16, 2, 2))


# -- low precision ---------------------------------------------------------------------------------

def test_bf16_runs_close_to_fp32() -> None:
    ours = randomize_(AutoencoderKLCogVideoX(TINY), seed=6).eval()
    low = AutoencoderKLCogVideoX(TINY).to(torch.bfloat16).eval()
    low.load_state_dict(ours.state_dict())
    x = _video((1, 3, 5, 16, 16), seed=18)
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        z = _latents(tuple(mean.shape), seed=19)
        dec = ours.decode(z)
        mean_l, logvar_l = low.encode(x)
        dec_l = low.decode(z)
    assert mean_l.dtype == dec_l.dtype == torch.bfloat16
    errs = rel_err(mean_l, mean), rel_err(logvar_l, logvar), rel_err(dec_l, dec)
    print("bf16 vs fp32: mean {:.1e}, logvar {:.1e}, decode {:.1e}".format(*errs))
    assert max(errs) <= 5e-2  # bf16 has 8 mantissa bits (~4e-3 per op); measured ~1e-2
