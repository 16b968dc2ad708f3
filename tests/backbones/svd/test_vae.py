"""SVD VAE (AutoencoderKLTemporalDecoder): exact checkpoint keys and count, epsilons and the switched blender,
parity with diffusers (fp32, test-only oracle) for encode, whole-clip decode and the pipeline's chunked
decode, where frames mix, loading diffusers-saved folders (plain and fp16 variant), config and errors.

Shapes: B videos, F frames, N = B * F; the tiny preset decodes latents [N, 4, 16, 16] to [N, 3, 32, 32].
"""
from __future__ import annotations

import ast
import copy
import json
import math
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from tests.oracle import randomize_, rel_err

from backbones.svd.vae import (TEMPORAL_EPS, VAE_PRESETS, AlphaBlender, AutoencoderKLTemporalDecoder,
                               TemporalDecoderVAEConfig, TemporalResnetBlock, build_vae, load_vae)

HERE = Path(__file__).parent
SHARED = Path("/work/shared/reference")
TINY = VAE_PRESETS["tiny"]
# spec svd-framer.md §5 (META, diffusers 0.42.1): 374 tensors, 97,742,847 parameters
SVD_TENSORS, SVD_PARAMS = 374, 97_742_847
# stabilityai/stable-video-diffusion-img2vid-xt vae/config.json (values per spec §5)
SVD_CONFIG_JSON = {
    "_class_name": "AutoencoderKLTemporalDecoder", "_diffusers_version": "0.24.0.dev0",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "out_channels": 3,
    "sample_size": 768, "scaling_factor": 0.18215,
}


def reference_keys() -> list[tuple[str, tuple[int, ...]]]:
    """`name shape` rows of svd_vae_keys.txt next to this test (else the shared reference folder)."""
    path = HERE / "svd_vae_keys.txt"
    path = path if path.is_file() else SHARED / "svd_vae_keys.txt"
    if not path.is_file():
        pytest.skip(f"svd_vae_keys.txt (golden key list from the spec) not found in {HERE} or {SHARED}")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            rows.append((key, tuple(ast.literal_eval(shape))))
    return rows


def diffusers_vae(cfg: TemporalDecoderVAEConfig) -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    return diffusers.AutoencoderKLTemporalDecoder(**asdict(cfg))


def pipeline_decode(ref: nn.Module, scaled: torch.Tensor, num_frames: int, chunk: int) -> torch.Tensor:
    """diffusers' StableVideoDiffusionPipeline.decode_latents on *scaled* latents [B*F, 4, h, w] (it divides by
    scaling_factor itself), frames returned as [B*F, 3, H, W]."""
    mod = pytest.importorskip("diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion")
    latents = scaled.reshape(-1, num_frames, *scaled.shape[1:])  # [B, F, 4, h, w]
    frames = mod.StableVideoDiffusionPipeline.decode_latents(SimpleNamespace(vae=ref), latents, num_frames, chunk)
    return frames.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B, 3, F, H, W] -> [B*F, 3, H, W]


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[AutoencoderKLTemporalDecoder, nn.Module]:
    """Our tiny VAE and diffusers' with the same random weights (norm affines and mix factors included)."""
    ref = randomize_(diffusers_vae(TINY), seed=0).eval()
    ours = AutoencoderKLTemporalDecoder(TINY).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def latents(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, TINY.latent_channels, 16, 16, generator=torch.Generator().manual_seed(seed))


# -- layout ----------------------------------------------------------------------------------------

def test_svd_on_meta_matches_reference_keys_and_count() -> None:
    with torch.device("meta"):
        ours = AutoencoderKLTemporalDecoder(VAE_PRESETS["svd"])
        ref = diffusers_vae(VAE_PRESETS["svd"])
    rows = reference_keys()
    got = [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
    assert got == rows  # names, shapes and order
    assert got == [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]
    assert len(got) == SVD_TENSORS
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(math.prod(s) for _, s in rows) == sum(p.numel() for p in ref.parameters()) == SVD_PARAMS
    assert not list(ours.buffers())
    assert not hasattr(ours, "post_quant_conv")
    assert ours.scaling_factor == 0.18215


def test_config_from_diffusers_json() -> None:
    cfg = TemporalDecoderVAEConfig.from_config(SVD_CONFIG_JSON)
    assert cfg == VAE_PRESETS["svd"] and cfg.spatial_factor == 8
    assert isinstance(cfg.block_out_channels, tuple)
    with pytest.raises(ValueError, match="up_block_types"):
        TemporalDecoderVAEConfig.from_config({**SVD_CONFIG_JSON, "up_block_types": ["UpDecoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="divisible by 32"):
        TemporalDecoderVAEConfig(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2)
    with pytest.raises(ValueError, match="down_block_types"):
        TemporalDecoderVAEConfig(block_out_channels=(32, 64))
    with pytest.raises(ValueError, match="preset"):
        build_vae("xt")
    with pytest.raises(ValueError, match="field"):
        build_vae("tiny", norm_num_groups=8)


def test_epsilons_and_switched_blender() -> None:
    """What parity could miss if diffusers changed too: eps 1e-5 on the temporal resnets' norms, 1e-6 on
    every other norm; the VAE blender weights the *temporal* branch by sigmoid(m)."""
    model = build_vae("tiny")
    temporal = {id(n) for m in model.modules() if isinstance(m, TemporalResnetBlock) for n in (m.norm1, m.norm2)}
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert all(m.num_groups == 32 for m in norms)
    assert all(m.eps == (TEMPORAL_EPS if id(m) in temporal else 1e-6) for m in norms)
    assert len(temporal) == 2 * 8  # (2 mid + 2 * 3 up) resnets
    blender = AlphaBlender()
    xs, xt = torch.zeros(3), torch.ones(3)
    with torch.no_grad():
        assert torch.equal(blender(xs, xt), torch.full((3,), 0.5))
        blender.mix_factor.fill_(30.0)
        torch.testing.assert_close(blender(xs, xt), xt)


# -- parity ----------------------------------------------------------------------------------------

def test_encode_parity(tiny_pair: tuple[AutoencoderKLTemporalDecoder, nn.Module]) -> None:
    ours, ref = tiny_pair
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode_dist(x)
        dist = ref.encode(x).latent_dist
        mode = ours.encode(x)
    assert mean.shape == (3, 4, 16, 16)
    assert rel_err(mean, dist.mean) <= 1e-5
    assert rel_err(logvar, dist.logvar) <= 1e-5
    assert torch.equal(mode, mean)
    s = ours.encode(x, generator=torch.Generator().manual_seed(7), sample=True)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(s, mean + torch.exp(0.5 * logvar) * noise)


def test_decode_parity_whole_clips(tiny_pair: tuple[AutoencoderKLTemporalDecoder, nn.Module]) -> None:
    ours, ref = tiny_pair
    z = latents(2 * 4, seed=2)  # B=2 videos of F=4
    with torch.no_grad():
        out, want = ours.decode(z, num_frames=4), ref.decode(z, num_frames=4).sample
        err = rel_err(out, want)
        # decode_chunk_size >= F (the pipeline's default is F) is the whole-clip decode
        assert torch.equal(ours.decode(z, num_frames=4, decode_chunk_size=4), out)
        assert rel_err(pipeline_decode(ref, z * ref.config.scaling_factor, 4, 4), want) <= 1e-5
    assert out.shape == (8, 3, 32, 32)
    assert err <= 1e-5, err


@pytest.mark.parametrize("b,f,chunk", [(2, 4, 2), (1, 5, 2)])
def test_chunked_decode_equals_pipeline(tiny_pair: tuple[AutoencoderKLTemporalDecoder, nn.Module], b: int, f: int,
                                        chunk: int) -> None:
    """decode_chunk_size=c equals StableVideoDiffusionPipeline.decode_latents(..., decode_chunk_size=c): chunk
    size dividing F with two videos, and a ragged last chunk (5 = 2 + 2 + 1) with one."""
    ours, ref = tiny_pair
    scaled = latents(b * f, seed=3)  # what the sampler hands the pipeline
    z = 1 / ref.config.scaling_factor * scaled  # the pipeline's own unscaling, so both decode the same z
    with torch.no_grad():
        out = ours.decode(z, num_frames=f, decode_chunk_size=chunk)
        want = pipeline_decode(ref, scaled, f, chunk)
        whole = ours.decode(z, num_frames=f)
    err = rel_err(out, want)
    assert err <= 1e-5, err
    assert rel_err(whole, want) > 1e-3  # chunking changes the result: the test would see it ignored


def test_chunks_never_cross_videos(tiny_pair: tuple[AutoencoderKLTemporalDecoder, nn.Module]) -> None:
    """B=2, F=3, chunk 2: the pipeline's flat chunks would straddle videos; ours equal the pipeline per video."""
    ours, ref = tiny_pair
    z = latents(6, seed=4)
    with torch.no_grad():
        out = ours.decode(z, num_frames=3, decode_chunk_size=2)
        want = torch.cat([pipeline_decode(ref, v * ref.config.scaling_factor, 3, 2) for v in z.split(3)])
    assert rel_err(out, want) <= 1e-5


def test_frames_mix_only_within_a_chunk(tiny_pair: tuple[AutoencoderKLTemporalDecoder, nn.Module]) -> None:
    ours, _ = tiny_pair
    z = latents(8, seed=5)  # B=2, F=4; chunks (0,1) (2,3) | (4,5) (6,7)
    z2 = z.clone()
    z2[1] += 1.0
    with torch.no_grad():
        a, b = ours.decode(z, 4, decode_chunk_size=2), ours.decode(z2, 4, decode_chunk_size=2)
        wa, wb = ours.decode(z, 4), ours.decode(z2, 4)
    changed = [(a[i] - b[i]).abs().max().item() > 1e-4 for i in range(8)]
    assert changed == [True, True] + [False] * 6
    changed_whole = [(wa[i] - wb[i]).abs().max().item() > 1e-4 for i in range(8)]
    assert changed_whole == [True] * 4 + [False] * 4  # the whole video mixes, the other video does not


# -- loading ---------------------------------------------------------------------------------------

def test_loads_diffusers_saved_folder(tiny_pair: tuple[AutoencoderKLTemporalDecoder, nn.Module],
                                      tmp_path: Path) -> None:
    from safetensors.torch import load_file

    _, ref = tiny_pair
    ref.save_pretrained(tmp_path / "vae")
    # strict load of the raw file into a model built from the saved config
    cfg = TemporalDecoderVAEConfig.from_config(json.loads((tmp_path / "vae" / "config.json").read_text()))
    assert cfg == TINY
    ours = AutoencoderKLTemporalDecoder(cfg).eval()
    ours.load_state_dict(load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"), strict=True)
    loaded = load_vae(tmp_path / "vae")  # meta build + checked load
    z = latents(4, seed=6)
    with torch.no_grad():
        want = ref.decode(z, num_frames=4).sample
        assert rel_err(ours.decode(z, 4), want) <= 1e-5
        assert torch.equal(loaded.decode(z, 4), ours.decode(z, 4))
    assert loaded.training is False and not any(p.is_meta for p in loaded.parameters())


def test_loads_fp16_variant(tiny_pair: tuple[AutoencoderKLTemporalDecoder, nn.Module], tmp_path: Path) -> None:
    _, ref = tiny_pair
    copy.deepcopy(ref).half().save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    half = load_vae(tmp_path)  # no plain file: falls back to the fp16 variant
    assert all(p.dtype == torch.float16 for p in half.parameters())
    full = load_vae(tmp_path, variant="fp16", dtype=torch.float32)
    sd = ref.state_dict()
    for k, v in full.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, sd[k].half().float()), k
    with pytest.raises(FileNotFoundError, match="bf16"):
        load_vae(tmp_path, variant="bf16")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path / "missing")


# -- errors ----------------------------------------------------------------------------------------

def test_errors_name_the_value_and_the_fix() -> None:
    model = build_vae("tiny")
    with pytest.raises(ValueError, match="multiple of num_frames=4"):
        model.decode(torch.zeros(6, 4, 8, 8), num_frames=4)
    with pytest.raises(ValueError, match=r"\[B\*F, 4, h, w\]"):
        model.decode(torch.zeros(2, 4, 4, 8, 8), num_frames=4)
    with pytest.raises(ValueError, match="decode_chunk_size=0"):
        model.decode(torch.zeros(4, 4, 8, 8), num_frames=4, decode_chunk_size=0)
    with pytest.raises(ValueError, match="num_frames=True"):
        model.decode(torch.zeros(4, 4, 8, 8), num_frames=True)
    with pytest.raises(ValueError, match="H=33"):
        model.encode_dist(torch.zeros(1, 3, 33, 32))
    with pytest.raises(ValueError, match="fold frames"):
        model.encode_dist(torch.zeros(1, 2, 3, 32, 32))
