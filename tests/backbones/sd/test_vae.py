"""SD1.5 VAE: exact diffusers names/shapes/count, numerical parity with diffusers' AutoencoderKL
(test-only oracle), posterior sampling and clamping, batch slicing, legacy names, the LDM key map
against the golden table and against diffusers' own single-file converter."""
from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones.sd.vae import (NORM_EPS, VAE_PRESETS, AutoencoderKL, Downsample2D, VAEConfig, build_vae)
from backbones.sd.vae_ldm_keymap import (LDM_VAE_PREFIX, convert_vae_ldm_state_dict, is_ldm_vae_state_dict,
                                         ldm_vae_subdict, vae_from_ldm, vae_to_ldm)

_HERE = Path(__file__).parent
_REF = Path("/work/shared/reference")


def _find(name: str) -> Path:
    path = next((p for p in (_HERE / name, _REF / name) if p.is_file()), None)
    if path is None:
        pytest.skip(f"{name} (golden table from the spec) not found in {_HERE} or {_REF}")
    return path


def _reference_keys() -> list[tuple[str, tuple[int, ...]]]:
    keys = []
    for line in _find("sd15_vae_keys.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split(" ", 1)
        keys.append((name, tuple(ast.literal_eval(shape))))
    return keys


def _ldm_rows() -> list[tuple[str, str, tuple[int, ...]]]:
    """(diffusers name, LDM name with prefix stripped, LDM shape) for every VAE row of the tsv."""
    rows = []
    for line in _find("sd15_ldm_key_map.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        component, diff, ldm, shape = line.split("\t")
        if component == "vae":
            assert ldm.startswith(LDM_VAE_PREFIX)
            rows.append((diff, ldm[len(LDM_VAE_PREFIX):], tuple(ast.literal_eval(shape.split(")")[0] + ")"))))
    return rows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _diffusers_vae(cfg: VAEConfig) -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    n = len(cfg.block_out_channels)
    return diffusers.AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, sample_size=cfg.sample_size, scaling_factor=cfg.scaling_factor)


def test_sd15_on_meta_matches_reference_keys_and_count() -> None:
    with torch.device("meta"):
        model = AutoencoderKL(VAE_PRESETS["sd15"])
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == _reference_keys()  # names, shapes and order
    assert len(ours) == 248
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert not list(model.buffers())
    assert model.scaling_factor == 0.18215


def test_numerics_fixed_by_the_checkpoint() -> None:
    """What parity at 1e-5 could miss: eps 1e-6 (vs torch's 1e-5) on every GroupNorm, and the
    asymmetric downsample pad (same shape as padding=1, different values)."""
    model = build_vae("tiny")
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 24 and all(m.eps == NORM_EPS == 1e-6 and m.num_groups == 8 for m in norms)
    down = Downsample2D(4)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        y = down(x)
        torch.testing.assert_close(y, F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2))
        assert not torch.allclose(y, F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1))
    assert y.shape == (1, 4, 3, 3)


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[AutoencoderKL, nn.Module]:
    """Our tiny VAE and diffusers' with the same random weights (norm affines included)."""
    g = torch.Generator().manual_seed(0)
    ref = _diffusers_vae(VAE_PRESETS["tiny"]).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):  # GroupNorm scale
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:  # unit-variance activations through the stack
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    ours = AutoencoderKL(VAE_PRESETS["tiny"]).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def test_encode_decode_parity_with_diffusers(tiny_pair: tuple[AutoencoderKL, nn.Module]) -> None:
    ours, ref = tiny_pair
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        mean, logvar = ours.encode_dist(x)
        dist = ref.encode(x).latent_dist
        out, out_ref = ours.decode(z), ref.decode(z).sample
        s = ours.encode(x, generator=torch.Generator().manual_seed(7), sample=True)
        s_ref = dist.sample(generator=torch.Generator().manual_seed(7))
        mode = ours.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 16, 16) and out.shape == (2, 3, 32, 32)
    assert _rel(mean, dist.mean) <= 1e-5
    assert _rel(logvar, dist.logvar) <= 1e-5
    assert _rel(out, out_ref) <= 1e-5
    assert _rel(s, s_ref) <= 1e-5
    assert torch.equal(mode, mean)
    assert (s - mean).abs().mean() > 0.1  # sampling really adds noise
    assert out.abs().max() > 1.0  # decode does not clamp (the tiny random decoder overshoots)


def test_logvar_clamp_matches_diffusers(tiny_pair: tuple[AutoencoderKL, nn.Module]) -> None:
    ours, ref = (copy.deepcopy(m) for m in tiny_pair)
    with torch.no_grad():
        for m in (ours, ref):  # logvar channels are 4..7 of quant_conv's output
            m.quant_conv.bias[4] += 1e3
            m.quant_conv.bias[5] -= 1e3
        x = torch.rand(1, 3, 16, 16) * 2 - 1
        _, logvar = ours.encode_dist(x)
        ref_logvar = ref.encode(x).latent_dist.logvar
    assert torch.all(logvar[:, 0] == 20.0) and torch.all(logvar[:, 1] == -30.0)
    assert logvar[:, 2:].abs().max() < 20.0
    assert _rel(logvar, ref_logvar) <= 1e-6


def test_slice_size_chunks_the_batch_without_changing_results(tiny_pair: tuple[AutoencoderKL, nn.Module]) -> None:
    ours = copy.deepcopy(tiny_pair[0])
    calls = {"encoder": 0, "decoder": 0}
    for name in calls:
        getattr(ours, name).register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    z = torch.randn(3, 4, 8, 8, generator=g)
    with torch.no_grad():
        whole = (ours.encode(x, torch.Generator().manual_seed(5), sample=True), ours.decode(z))
        assert calls == {"encoder": 1, "decoder": 1}
        ours.slice_size = 2
        sliced = (ours.encode(x, torch.Generator().manual_seed(5), sample=True), ours.decode(z))
    assert calls == {"encoder": 3, "decoder": 3}  # 2 + 1 images per call
    for a, b in zip(sliced, whole):  # not bit-equal: conv kernels pick their algorithm by batch size
        assert _rel(a, b) <= 1e-5


def test_legacy_attention_names_load(tiny_pair: tuple[AutoencoderKL, nn.Module]) -> None:
    """The SD1.5 diffusers vae file (diffusers 0.6) spells to_q/to_k/to_v/to_out.0 as query/key/value/proj_attn."""
    sd = tiny_pair[0].state_dict()
    legacy = {}
    for k, v in sd.items():
        for new, old in (("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")):
            k = k.replace(f"attentions.0.{new}", f"attentions.0.{old}")
        legacy[k] = v
    assert sum(".query." in k or ".proj_attn." in k for k in legacy) == 8
    fresh = build_vae("tiny")
    fresh.load_state_dict(legacy, strict=True)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in sd.items())


def test_tiny_round_trip_shapes_and_low_precision() -> None:
    vae = build_vae("tiny").eval().to(torch.bfloat16)
    with torch.no_grad():
        z = vae.encode(torch.rand(2, 3, 16, 24) * 2 - 1)  # fp32 in, cast to the weights' dtype
        out = vae.decode(z)
    assert z.shape == (2, 4, 8, 12) and out.shape == (2, 3, 16, 24)
    assert z.dtype == out.dtype == torch.bfloat16


def test_bad_inputs_name_value_and_fix() -> None:
    vae = build_vae("tiny")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\], got shape \(1, 4, 16, 16\)"):
        vae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"W=15; it must be a multiple of 2"):
        vae.encode(torch.zeros(1, 3, 16, 15))
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        vae.decode(torch.zeros(1, 8, 4, 4))
    with torch.device("meta"):
        sd15 = AutoencoderKL()
    with pytest.raises(ValueError, match=r"H=100; it must be a multiple of 8. Nearest valid: 96"):
        sd15.encode(torch.zeros(1, 3, 100, 64, device="meta"))
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match=rf"slice_size={bad!r}; expected a positive int"):
            build_vae("tiny", slice_size=bad)  # type: ignore[arg-type]
        vae.slice_size = bad  # type: ignore[assignment]
        with pytest.raises(ValueError, match="slice_size"):
            vae.decode(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"widths \[48\] not divisible by norm_num_groups=32"):
        VAEConfig(block_out_channels=(128, 48))
    with pytest.raises(ValueError, match="unknown VAEConfig field 'latent_dim'"):
        build_vae("tiny", latent_dim=8)
    with pytest.raises(ValueError, match="unknown VAE preset 'sdxl'"):
        build_vae("sdxl")


# ---- LDM single-file key map ------------------------------------------------------------------


def test_keymap_matches_every_vae_row_of_the_golden_table() -> None:
    rows = _ldm_rows()
    assert len(rows) == 248
    for diff, ldm, _ in rows:
        assert vae_to_ldm(diff) == ldm
        assert vae_from_ldm(ldm) == diff
    # shapes: our sd15 state dict converted to LDM layout has the file's shapes (8 of them 1x1 convs)
    with torch.device("meta"):
        sd = AutoencoderKL().state_dict()
    ldm_sd = convert_vae_ldm_state_dict(sd, to="ldm")
    assert {k: tuple(v.shape) for k, v in ldm_sd.items()} == {ldm: shape for _, ldm, shape in rows}
    assert sum(v.dim() == 4 and v.shape[2:] == (1, 1) and "attn_1" in k for k, v in ldm_sd.items()) == 8
    assert is_ldm_vae_state_dict(ldm_sd) and not is_ldm_vae_state_dict(sd)


def test_ldm_round_trip_is_bit_exact_and_loads(tiny_pair: tuple[AutoencoderKL, nn.Module]) -> None:
    ours = tiny_pair[0]
    sd = ours.state_dict()
    ldm = convert_vae_ldm_state_dict(sd, to="ldm")  # 2 up blocks: inferred from the keys
    assert "decoder.up.1.upsample.conv.weight" in ldm and "decoder.up.0.block.1.nin_shortcut.bias" not in ldm
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    back = convert_vae_ldm_state_dict(ldm, to="diffusers")
    assert list(back) == list(sd)
    assert all(back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v) for k, v in sd.items())
    # a full LDM checkpoint: prefix, UNet keys and a training-time loss entry around the VAE tensors
    full = {f"{LDM_VAE_PREFIX}{k}": v.clone() for k, v in ldm.items()}
    full.update({"model.diffusion_model.out.0.weight": torch.ones(3), f"{LDM_VAE_PREFIX}loss.logvar": torch.zeros(())})
    fresh = build_vae("tiny").eval()
    fresh.load_state_dict(convert_vae_ldm_state_dict(ldm_vae_subdict(full), to="diffusers"), strict=True)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        for a, b in ((fresh.encode_dist(x), ours.encode_dist(x)), ((fresh.decode(ours.encode(x)),),
                                                                   (ours.decode(ours.encode(x)),))):
            assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_keymap_agrees_with_diffusers_single_file_converter(tiny_pair: tuple[AutoencoderKL, nn.Module]) -> None:
    """Independent oracle for the reversed up-block index at a depth other than SD1.5's 4."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    sd = tiny_pair[0].state_dict()
    ldm = convert_vae_ldm_state_dict(sd, to="ldm")
    config = {"down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    theirs = single_file.convert_ldm_vae_checkpoint({f"{LDM_VAE_PREFIX}{k}": v for k, v in ldm.items()}, config)
    mine = convert_vae_ldm_state_dict(ldm, to="diffusers")
    assert set(theirs) == set(mine) == set(sd)
    assert all(torch.equal(theirs[k], mine[k]) for k in sd)


def test_keymap_rejects_foreign_keys_and_shapes() -> None:
    for bad in ("encoder.down.0.block.0.norm3.weight", "decoder.mid.block_3.conv1.weight",
                "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.quant_conv.weight"):
        with pytest.raises(ValueError, match="not an SD VAE key in LDM layout"):
            vae_from_ldm(bad)
    with pytest.raises(ValueError, match="not an SD VAE key in diffusers layout"):
        vae_to_ldm("decoder.mid_block.attentions.0.query.weight")
    with pytest.raises(ValueError, match="up-block index 4, but num_up_blocks=4"):
        vae_from_ldm("decoder.up.4.block.0.conv1.weight")
    with pytest.raises(ValueError, match="expected 'diffusers' or 'ldm'"):
        convert_vae_ldm_state_dict({}, to="comfy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \(4, 4, 3, 3\); expected a 1x1 conv"):
        convert_vae_ldm_state_dict({"encoder.mid.attn_1.q.weight": torch.zeros(4, 4, 3, 3)})
    with pytest.raises(ValueError, match="no key starts with 'first_stage_model.'"):
        ldm_vae_subdict({"encoder.conv_in.weight": torch.zeros(1)})
    # already-Linear and conv1d attention weights (seen in third-party files) are accepted
    out = convert_vae_ldm_state_dict({"decoder.mid.attn_1.k.weight": torch.ones(4, 4),
                                      "decoder.mid.attn_1.proj_out.weight": torch.ones(4, 4, 1)})
    assert {k: v.shape for k, v in out.items()} == {"decoder.mid_block.attentions.0.to_k.weight": (4, 4),
                                                    "decoder.mid_block.attentions.0.to_out.0.weight": (4, 4)}
