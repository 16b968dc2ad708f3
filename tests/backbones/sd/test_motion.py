"""AnimateDiff motion modules and the motion UNet: exact diffusers layout (SD1.5 + v1-5-2 on meta), parity
with diffusers `UNetMotionModel.from_unet2d` (all-frames GroupNorm), a hand-written original per-frame
motion module, zero init, position tables, the original-checkpoint key map, errors.

Shapes: B videos, F frames; the tiny presets run latents [2, 4, 6, 16, 16] with text [2, 7, 32].
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tests.oracle import randomize_
import torch.nn.functional as F

from backbones.sd.motion import (MOTION_ADAPTER_PRESETS, AnimateDiffTransformer3D, MotionAdapter,
                                 MotionAdapterConfig, sinusoidal_table)
from backbones.sd.motion_keymap import (motion_from_original, motion_state_dict_from_original,
                                        motion_state_dict_to_original, motion_to_original)
from backbones.sd.unet import UNET_PRESETS, UNet2DConditionModel
from backbones.sd.unet_motion import UNetMotionModel

SHARED = Path(__file__).parent  # copies of ../shared/reference key lists
TINY_UNET, TINY_MOTION = UNET_PRESETS["tiny"], MOTION_ADAPTER_PRESETS["tiny"]
ACROSS = replace(TINY_MOTION, norm_across_frames=True)  # diffusers' GroupNorm mode
ADAPTER_PARAMS, UNET_MOTION_PARAMS, V1_ADAPTER_PARAMS = 453_209_280, 1_312_730_244, 417_137_600
TINY_UNET_KW = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
                    attention_head_dim=2)
TINY_ADAPTER_KW = dict(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                       motion_norm_num_groups=8, motion_max_seq_length=32, use_motion_mid_block=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()




def key_rows(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (SHARED / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            rows.append((key, tuple(ast.literal_eval(shape))))
    return rows


def original_rows() -> list[tuple[str, tuple[int, ...], str | None]]:
    """mm_sd_v15_v2_original_keys.txt: (original name, shape, diffusers name or None for a dropped pe)."""
    rows = []
    for line in (SHARED / "mm_sd_v15_v2_original_keys.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            left, right = line.split(" -> ")
            key, shape = left.split(" ", 1)
            rows.append((key, tuple(ast.literal_eval(shape)), None if right.startswith("(dropped") else right))
    return rows


def video_inputs(seed: int, b: int = 2, f: int = 6,
                 hw: tuple[int, int] = (16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, f, *hw, generator=g), torch.randn(b, 7, 32, generator=g)


@pytest.fixture(scope="module")
def sd15_meta() -> tuple[MotionAdapter, UNetMotionModel]:
    with torch.device("meta"):
        return (MotionAdapter(MOTION_ADAPTER_PRESETS["v1-5-2"]),
                UNetMotionModel(UNET_PRESETS["sd15"], MOTION_ADAPTER_PRESETS["v1-5-2"]))


@pytest.fixture(scope="module")
def diffusers_pair() -> tuple[nn.Module, nn.Module, UNetMotionModel]:
    """(diffusers adapter, diffusers UNetMotionModel, ours in the all-frames mode) with the same random weights."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference oracle (test extra)")
    unet2d = diffusers.UNet2DConditionModel(**TINY_UNET_KW)
    adapter = diffusers.MotionAdapter(**TINY_ADAPTER_KW)
    randomize_(unet2d, seed=1)
    randomize_(adapter, seed=2)
    ref = diffusers.UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    ours = UNetMotionModel(TINY_UNET, ACROSS).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names: no key map
    return adapter, ref, ours


# -- layout ----------------------------------------------------------------------------------------

def test_v152_adapter_meta_matches_key_list(sd15_meta: tuple[MotionAdapter, UNetMotionModel]) -> None:
    adapter, _ = sd15_meta
    want = key_rows("motion_adapter_v152_keys.txt")
    assert len(want) == 567
    assert [(k, tuple(v.shape)) for k, v in adapter.state_dict().items()] == want  # names, shapes, order
    assert sum(p.numel() for p in adapter.parameters()) == ADAPTER_PARAMS
    assert len(list(adapter.parameters())) == 546 and len(list(adapter.buffers())) == 21
    with torch.device("meta"):  # v1 / v3 layout: no mid block (AnimateDiff issue #256 prints 417.1376 M)
        v1 = MotionAdapter(replace(MOTION_ADAPTER_PRESETS["v1-5-2"], use_motion_mid_block=False))
    assert sum(p.numel() for p in v1.parameters()) == V1_ADAPTER_PARAMS


def test_unet_motion_meta_matches_key_list(sd15_meta: tuple[MotionAdapter, UNetMotionModel]) -> None:
    adapter, unet = sd15_meta
    want = key_rows("unet_motion_sd15_v152_keys.txt")
    assert len(want) == 1253
    assert [(k, tuple(v.shape)) for k, v in unet.state_dict().items()] == want
    assert sum(p.numel() for p in unet.parameters()) == UNET_MOTION_PARAMS
    # the adapter's keys sit unchanged inside the UNet; the rest is exactly the SD1.5 image UNet
    motion = unet.motion_state_dict()
    assert motion.keys() == adapter.state_dict().keys()  # same names (the order differs: mid first there)
    image_keys = [k for k, _ in key_rows("sd15_unet_keys.txt")]
    assert sorted(set(unet.state_dict()) - set(motion)) == sorted(image_keys)
    units = unet.units()
    assert len(units) == 59 and sum(isinstance(u, AnimateDiffTransformer3D) for u in units) == 21
    names = {id(m): n for n, m in unet.named_modules()}
    assert [names[id(u)] for u in units[:3]] == ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0",
                                                 "down_blocks.0.motion_modules.0"]
    assert [names[id(u)] for u in units[22:26]] == ["mid_block.resnets.0", "mid_block.attentions.0",
                                                    "mid_block.motion_modules.0", "mid_block.resnets.1"]


def test_config_from_diffusers_equals_presets(diffusers_pair: tuple[nn.Module, nn.Module, UNetMotionModel]) -> None:
    adapter, _, _ = diffusers_pair
    assert MotionAdapterConfig.from_diffusers(dict(adapter.config)) == TINY_MOTION
    assert MotionAdapterConfig.from_diffusers(dict(adapter.config), norm_across_frames=True) == ACROSS
    published = {  # guoyww/animatediff-motion-adapter-v1-5-2 config.json (spec §5.1), stale keys included
        "_class_name": "MotionAdapter", "_diffusers_version": "0.24.0.dev0",
        "block_out_channels": [320, 640, 1280, 1280],
        "motion_activation_fn": "geglu", "motion_attention_bias": False, "motion_cross_attention_dim": None,
        "motion_layers_per_block": 2, "motion_max_seq_length": 32, "motion_mid_block_layers_per_block": 1,
        "motion_norm_num_groups": 32, "motion_num_attention_heads": 8, "use_motion_mid_block": True}
    assert MotionAdapterConfig.from_diffusers(published) == MOTION_ADAPTER_PRESETS["v1-5-2"]
    assert not MOTION_ADAPTER_PRESETS["v1-5-2"].norm_across_frames  # the original per-frame norm is the default


# -- parity with diffusers -------------------------------------------------------------------------

def test_parity_with_diffusers_unet_motion(diffusers_pair: tuple[nn.Module, nn.Module, UNetMotionModel]) -> None:
    _, ref, ours = diffusers_pair
    x, ctx = video_inputs(seed=3)
    b, f = x.shape[0], x.shape[2]
    t = torch.tensor([999, 3])
    with torch.no_grad():
        want = ref(x, t, ctx.repeat_interleave(f, 0), return_dict=False)[0]  # diffusers >= 0.31 takes [B*F, ...]
        got = ours(x, t, ctx)  # [B, Lc, Cc]: repeated inside
        folded = ours(x.permute(0, 2, 1, 3, 4).reshape(b * f, 4, 16, 16), t, ctx.repeat_interleave(f, 0),
                      num_frames=f)
    assert got.shape == want.shape == x.shape
    err = rel_err(got, want)
    print(f"UNetMotionModel max rel err vs diffusers (all-frames norm, B=2 F=6 16x16): {err:.2e}")
    assert err <= 1e-5  # contract; measured 0 (same ops, same order)
    assert torch.equal(folded, got.permute(0, 2, 1, 3, 4).reshape(b * f, 4, 16, 16))
    # the default (original) per-frame norm is a different function of the same weights
    per_frame = UNetMotionModel(TINY_UNET, TINY_MOTION).eval()
    per_frame.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(per_frame(x, t, ctx), want) > 1e-2


def test_parity_odd_size_one_timestep_and_two_state_dicts(
        diffusers_pair: tuple[nn.Module, nn.Module, UNetMotionModel]) -> None:
    """A 15x13 latent (rounded-up downsampling, upsampling to the skip's size), one int timestep, and the
    model assembled from an image-UNet state dict plus a diffusers adapter state dict (pe buffers included)."""
    adapter, ref, ours = diffusers_pair
    image_sd = {k: v for k, v in ref.state_dict().items() if ".motion_modules." not in k}
    rebuilt = UNetMotionModel(TINY_UNET, ACROSS).eval()
    missing, unexpected = rebuilt.load_state_dict(image_sd, strict=False)
    assert not unexpected and missing and all(".motion_modules." in k for k in missing)
    missing, unexpected = rebuilt.load_state_dict(adapter.state_dict(), strict=False)
    assert not unexpected and all(".motion_modules." not in k for k in missing)
    ours_adapter = MotionAdapter(ACROSS)
    ours_adapter.load_state_dict(adapter.state_dict(), strict=True)  # the adapter file alone, pe included
    x, ctx = video_inputs(seed=4, b=1, f=4, hw=(15, 13))
    with torch.no_grad():
        want = ref(x, 421, ctx.repeat_interleave(4, 0), return_dict=False)[0]
        got = rebuilt(x, 421, ctx)
    err = rel_err(got, want)
    print(f"UNetMotionModel max rel err vs diffusers (15x13, F=4, rebuilt from two state dicts): {err:.2e}")
    assert err <= 1e-5


def test_gradients_match_diffusers(diffusers_pair: tuple[nn.Module, nn.Module, UNetMotionModel]) -> None:
    _, ref, ours = diffusers_pair
    x, ctx = video_inputs(seed=5, f=3, hw=(8, 8))
    t = torch.tensor([250, 800])
    grads = []
    for model, call in ((ours, lambda: ours(x, t, ctx)),
                        (ref, lambda: ref(x, t, ctx.repeat_interleave(3, 0), return_dict=False)[0])):
        model.zero_grad(set_to_none=True)
        call().square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys()
    worst = max(rel_err(grads[0][k], grads[1][k]) for k in grads[1] if grads[1][k].abs().max() > 0)
    print(f"max rel grad err vs diffusers: {worst:.2e}")
    assert worst <= 1e-5
    assert all(grads[0][k].abs().max() > 0 for k in grads[0] if ".motion_modules." in k)  # every motion weight trains


# -- the original per-frame motion module, written out ---------------------------------------------

def original_motion_module(x: torch.Tensor, sd: dict[str, torch.Tensor], f: int, heads: int, groups: int,
                           zero_pe: bool = False) -> torch.Tensor:
    """AnimateDiff's VanillaTemporalModule (v2 yaml) in plain functional ops, following its own data flow:
    per-frame GroupNorm on (b f) c h w, tokens (b f) (h w) c, each attention block rearranging to
    (b h w) f c, adding its position table to the normalised input, attending over frames, and back."""
    bf, c, h, w = x.shape
    b, d = bf // f, c // heads
    pe = torch.zeros(f, c) if zero_pe else torch.stack([  # pe[p, 2i] = sin(p w_i), pe[p, 2i+1] = cos(p w_i)
        torch.stack([torch.sin(p * 10000.0 ** (-2 * i / c)), torch.cos(p * 10000.0 ** (-2 * i / c))])
        for p in torch.arange(f, dtype=torch.float64) for i in range(c // 2)]).reshape(f, c).float()
    n = F.group_norm(x, groups, sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    tokens = n.permute(0, 2, 3, 1).reshape(bf, h * w, c)  # (b f) (h w) c
    tokens = F.linear(tokens, sd["proj_in.weight"], sd["proj_in.bias"])
    p = "transformer_blocks.0."
    for k, norm in ((0, "norm1"), (1, "norm2")):
        a = f"{p}attn{k + 1}."
        normed = F.layer_norm(tokens, (c,), sd[f"{p}{norm}.weight"], sd[f"{p}{norm}.bias"], 1e-5)
        seq = normed.reshape(b, f, h * w, c).transpose(1, 2).reshape(b * h * w, f, c) + pe  # (b d) f c
        q, kk, v = (F.linear(seq, sd[a + proj]).reshape(-1, f, heads, d).transpose(1, 2)  # [P, NH, F, D]
                    for proj in ("to_q.weight", "to_k.weight", "to_v.weight"))
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v  # [P, NH, F, D]
        out = F.linear(att.transpose(1, 2).reshape(-1, f, c), sd[a + "to_out.0.weight"], sd[a + "to_out.0.bias"])
        tokens = tokens + out.reshape(b, h * w, f, c).transpose(1, 2).reshape(bf, h * w, c)
    normed = F.layer_norm(tokens, (c,), sd[f"{p}norm3.weight"], sd[f"{p}norm3.bias"], 1e-5)
    value, gate = F.linear(normed, sd[f"{p}ff.net.0.proj.weight"], sd[f"{p}ff.net.0.proj.bias"]).chunk(2, -1)
    tokens = tokens + F.linear(value * F.gelu(gate), sd[f"{p}ff.net.2.weight"], sd[f"{p}ff.net.2.bias"])
    out = F.linear(tokens, sd["proj_out.weight"], sd["proj_out.bias"])
    return out.reshape(bf, h, w, c).permute(0, 3, 1, 2) + x


@pytest.mark.parametrize("f", [1, 5, 32])
def test_per_frame_module_matches_the_original_math(f: int) -> None:
    c, heads, groups, b = 32, 4, 8, 2
    mm = AnimateDiffTransformer3D(heads, c // heads, c, norm_num_groups=groups).eval()
    randomize_(mm, seed=6)
    x = torch.randn(b * f, c, 3, 5, generator=torch.Generator().manual_seed(7)) * 2 + 0.5
    sd = mm.state_dict()
    want = original_motion_module(x, sd, f, heads, groups)
    with torch.no_grad():
        got = mm(x, num_frames=f)
    err = rel_err(got, want)
    print(f"per-frame motion module vs hand-written original (F={f}): {err:.2e}")
    assert err <= 1e-5
    if f > 1:  # what the test would catch: the position table, frame order, the norm mode
        assert rel_err(got, original_motion_module(x, sd, f, heads, groups, zero_pe=True)) > 1e-2
        rev = x.reshape(b, f, c, 3, 5).flip(1).reshape(b * f, c, 3, 5)
        with torch.no_grad():
            got_rev = mm(rev, num_frames=f).reshape(b, f, c, 3, 5).flip(1).reshape(b * f, c, 3, 5)
            mm.norm_across_frames = True
            across = mm(x, num_frames=f)
        assert rel_err(got_rev, want) > 1e-2 and rel_err(across, want) > 1e-2


def test_all_frames_module_matches_diffusers() -> None:
    pytest.importorskip("diffusers", reason="diffusers is the reference oracle (test extra)")
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D as Ref
    ref = Ref(num_attention_heads=4, attention_head_dim=8, in_channels=32, norm_num_groups=8,
              positional_embeddings="sinusoidal", num_positional_embeddings=32).eval()
    randomize_(ref, seed=8)
    ours = AnimateDiffTransformer3D(4, 8, 32, norm_num_groups=8, norm_across_frames=True).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3 * 7, 32, 4, 4, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        err = rel_err(ours(x, 7), ref(x, num_frames=7))
    print(f"all-frames motion module vs diffusers: {err:.2e}")
    assert err <= 1e-6  # measured 0


# -- init, position tables -------------------------------------------------------------------------

def test_zero_init_makes_the_motion_unet_the_image_unet_per_frame() -> None:
    with torch.device("meta"):
        model = UNetMotionModel(TINY_UNET, TINY_MOTION)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    pe = model.down_blocks[0].motion_modules[0].transformer_blocks[0].pos_embed.pe
    assert torch.equal(pe, sinusoidal_table(32, 32))  # refilled after to_empty
    image = UNet2DConditionModel(TINY_UNET).eval()
    image.load_state_dict({k: v for k, v in model.state_dict().items() if ".motion_modules." not in k}, strict=True)
    x, ctx = video_inputs(seed=10, f=3)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        video = model.eval()(x, t, ctx)
        frames = image(x.permute(0, 2, 1, 3, 4).reshape(6, 4, 16, 16), t.repeat_interleave(3),
                       ctx.repeat_interleave(3, 0))
    # identity modules are exact (0 * x + 0); measured 1e-6 comes from embedding the timesteps as [B] rows,
    # not [B*F] rows (other GEMM shapes), and grows through the UNet
    assert rel_err(video.permute(0, 2, 1, 3, 4).reshape(6, 4, 16, 16), frames) <= 1e-5
    model.init_weights(zero_init_proj_out=False)  # diffusers' init: the modules are no identity
    with torch.no_grad():
        assert rel_err(model(x, t, ctx).permute(0, 2, 1, 3, 4).reshape(6, 4, 16, 16), frames) > 1e-3


def test_position_table_equals_the_formula_and_diffusers() -> None:
    c, n = 320, 32
    p = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(c // 2, dtype=torch.float64)[None, :]
    want = torch.empty(n, c, dtype=torch.float64)
    want[:, 0::2], want[:, 1::2] = torch.sin(p * 10000.0 ** (-2 * i / c)), torch.cos(p * 10000.0 ** (-2 * i / c))
    table = sinusoidal_table(n, c)
    assert table.shape == (1, n, c) and table.dtype == torch.float32
    torch.testing.assert_close(table[0].double(), want, rtol=0, atol=1e-5)  # fp32 phases up to 31 rad
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    assert torch.equal(table, embeddings.SinusoidalPositionalEmbedding(c, n).pe)  # bit for bit: the file's table


def test_pe_in_a_state_dict_is_ignored_and_recomputed() -> None:
    adapter = MotionAdapter(TINY_MOTION)
    sd = adapter.state_dict()
    pe_keys = [k for k in sd if k.endswith("pos_embed.pe")]
    assert len(pe_keys) == 2 + 1 + 4  # down 2, mid 1, up 4 modules
    fresh = MotionAdapter(TINY_MOTION)
    without = {k: v for k, v in sd.items() if k not in pe_keys}
    fresh.load_state_dict(without, strict=True)  # absent: fine
    garbage = dict(sd, **{k: torch.full_like(sd[k], 7.0) for k in pe_keys})
    garbage[pe_keys[0]] = torch.zeros(1, 24, 32)  # a v1 24-frame table: ignored too
    fresh.load_state_dict(garbage, strict=True)
    for k in pe_keys:
        assert torch.equal(fresh.state_dict()[k], sinusoidal_table(32, sd[k].shape[-1]))


# -- original checkpoint key map -------------------------------------------------------------------

def test_original_key_map_every_row_both_directions(sd15_meta: tuple[MotionAdapter, UNetMotionModel]) -> None:
    adapter, _ = sd15_meta
    rows = original_rows()
    assert len(rows) == 588 and sum(r[2] is None for r in rows) == 42
    shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    for orig, shape, name in rows:
        assert motion_from_original(orig) == name, orig
        if name is not None:
            assert motion_to_original(name) == orig, name
            assert shapes[name] == shape, name  # no reshape in either direction
        else:
            pe_name = re.sub(r"temporal_transformer\.(transformer_blocks\.\d+)\.attention_blocks\.[01]\.pos_encoder",
                             r"\1.pos_embed", orig)
            assert shapes[pe_name] == shape  # the same (1, 32, C) table as the block's one
    assert {r[2] for r in rows if r[2]} == {k for k in shapes if not k.endswith(".pe")}
    exported = motion_state_dict_to_original(adapter.state_dict())
    assert sorted(exported) == sorted(r[0] for r in rows)  # 588: one table per attention, as the original file


def test_original_checkpoint_loads_with_its_pe_tables() -> None:
    adapter = MotionAdapter(TINY_MOTION)
    randomize_(adapter, seed=11)
    original = motion_state_dict_to_original(adapter.state_dict())
    # as in mm_sd_v15_v2.ckpt: one table per attention; here a v1-style 24-frame one, which must not matter
    original = {k: (torch.zeros(1, 24, v.shape[-1]) if k.endswith("pos_encoder.pe") else v)
                for k, v in original.items()}
    for wrapped in (original, {"state_dict": original, "animatediff_config": {}}):
        loaded = MotionAdapter(TINY_MOTION)
        loaded.load_state_dict(motion_state_dict_from_original(wrapped), strict=True)
        for k, v in adapter.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("bad", ["down_blocks.0.motion_modules.0.norm.weight", "down_blocks.0.motion_modules.0."
                                 "temporal_transformer.transformer_blocks.0.attention_blocks.2.to_q.weight",
                                 "mid_block.motion_modules.0.temporal_transformer.proj.weight",
                                 "down_blocks.0.attentions.0.norm.weight", ""])
def test_key_map_unknown_original_name_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="not a known original AnimateDiff"):
        motion_from_original(bad)


@pytest.mark.parametrize("bad", ["down_blocks.0.motion_modules.0.temporal_transformer.norm.weight",
                                 "down_blocks.0.motion_modules.0.transformer_blocks.0.norms.0.weight",
                                 "down_blocks.0.motion_modules.0.transformer_blocks.0.attn3.to_q.weight",
                                 "down_blocks.0.resnets.0.norm1.weight"])
def test_key_map_unknown_diffusers_name_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="not a known diffusers motion-module"):
        motion_to_original(bad)


# -- errors ----------------------------------------------------------------------------------------

def test_user_errors_are_value_errors() -> None:
    model = UNetMotionModel(TINY_UNET, TINY_MOTION)
    x, ctx = video_inputs(seed=12, b=1, f=33, hw=(8, 8))
    with pytest.raises(ValueError, match=r"num_frames=33 exceeds .*\(max_seq_length=32\)"):
        model(x, 1, ctx)
    with pytest.raises(ValueError, match=r"expected \[B, 4, F, H, W\]"):
        model(x[:, :, 0], 1, ctx)  # 4-D without num_frames
    with pytest.raises(ValueError, match=r"with num_frames=F"):
        model(x[:, :, 0].expand(5, -1, -1, -1), 1, ctx, num_frames=2)  # 5 frames is no multiple of 2
    with pytest.raises(ValueError, match=r"\[3, Lc, 32\]"):
        model(x[:, :, :3], 1, ctx.expand(2, -1, -1))  # neither B nor B*F texts
    with pytest.raises(ValueError, match="motion_layers_per_block=2 != UNet layers_per_block=1"):
        UNetMotionModel(TINY_UNET, replace(TINY_MOTION, motion_layers_per_block=2))
    with pytest.raises(ValueError, match="set the adapter's to 8"):
        UNetMotionModel(TINY_UNET, replace(TINY_MOTION, motion_norm_num_groups=16))
    with pytest.raises(ValueError, match="block_out_channels"):
        UNetMotionModel(TINY_UNET, replace(TINY_MOTION, block_out_channels=(32, 32)))
    with pytest.raises(ValueError, match="gives 3 levels"):
        MotionAdapterConfig(motion_num_attention_heads=(8, 8, 8))
    with pytest.raises(ValueError, match="not divisible"):
        MotionAdapterConfig(motion_num_attention_heads=7)
    with pytest.raises(ValueError, match=r"conv_in_channels=9; .* in \[None\]"):
        MotionAdapterConfig.from_diffusers({"conv_in_channels": 9})
    with pytest.raises(ValueError, match="'attention_head_dim' is unknown"):
        MotionAdapterConfig.from_diffusers({"attention_head_dim": 8})
