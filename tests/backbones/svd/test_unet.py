"""SVD / Framer UNet: exact checkpoint layouts, head counts, parity with diffusers (fp32), ControlNet residuals,
Framer's features, context layout and conditioning block, units, gradients, seams, errors.

Shapes: B videos, F frames, N = B * F; the tiny preset runs samples [2, 3, 8, 16, 16] with context [2, Lc, 48].
"""
from __future__ import annotations

import ast
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tests.oracle import randomize_, rel_err

import backbones.attention as attention_mod
from backbones.sd.unet_blocks import Attention
from backbones.svd.unet import (UNET_PRESETS, SpatioTemporalResBlock, TransformerSpatioTemporalModel,
                                UNetSpatioTemporalConditionModel, UNetSpatioTemporalConfig, count_parameters)

HERE = Path(__file__).parent
SHARED = Path("/work/shared/reference")
TINY = UNET_PRESETS["tiny"]
# spec svd-framer.md §0 key-file table (META, diffusers 0.42.1)
SVD_XT_TENSORS, SVD_XT_PARAMS = 1428, 1_524_623_082
FRAMER_TENSORS, FRAMER_PARAMS = 1429, 1_524_625_966
OURS_ONLY = ("mask_token", "framer_temporal_context")  # config fields that are not diffusers keys


def reference_keys(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """`name shape` rows of the key file next to this test (else the shared reference folder)."""
    path = HERE / name if (HERE / name).is_file() else SHARED / name
    rows = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            rows.append((key, tuple(ast.literal_eval(shape))))
    return rows


def meta(preset: str) -> UNetSpatioTemporalConditionModel:
    with torch.device("meta"):
        return UNetSpatioTemporalConditionModel(UNET_PRESETS[preset])


def diffusers_kwargs(cfg: UNetSpatioTemporalConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in OURS_ONLY}


def inputs(cfg: UNetSpatioTemporalConfig, seed: int, b: int = 2, f: int = 3, hw: tuple[int, int] = (16, 16),
           lc: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sample, c_noise timesteps [B], context, added time ids (fps - 1, motion bucket, noise aug)."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(b, f, cfg.in_channels, *hw, generator=g)
    t = 0.25 * torch.log(torch.rand(b, generator=g) * 100 + 0.01)
    ctx = torch.randn(b, lc, cfg.cross_attention_dim, generator=g)
    ids = torch.stack([torch.full((b,), 6.0), torch.randint(0, 255, (b,), generator=g).float(),
                       torch.rand(b, generator=g) * 0.1], dim=1)
    return sample, t, ctx, ids


def _pair(cfg: UNetSpatioTemporalConfig, seed: int) -> tuple[nn.Module, UNetSpatioTemporalConditionModel]:
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference oracle (test extra)")
    ref = diffusers.UNetSpatioTemporalConditionModel(**diffusers_kwargs(cfg)).eval()
    randomize_(ref, seed)
    ours = UNetSpatioTemporalConditionModel(cfg).eval()
    state = ref.state_dict()
    if cfg.mask_token:  # Framer's one extra parameter; diffusers' class has none
        state["mask_token"] = torch.randn(1, 1, cfg.out_channels, 1, 1)
    ours.load_state_dict(state, strict=True)  # same names: no key map
    return ref, ours


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[nn.Module, UNetSpatioTemporalConditionModel]:
    return _pair(TINY, seed=1)


def run_ref(ref: nn.Module, sample: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
            ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref(sample, t, ctx, ids, return_dict=False)[0]


# -- layout ----------------------------------------------------------------------------------------

def test_svd_xt_meta_matches_checkpoint_layout() -> None:
    model = meta("svd-xt")
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == reference_keys("svd_unet_keys.txt")  # names, shapes and order
    assert len(ours) == SVD_XT_TENSORS and count_parameters(model) == SVD_XT_PARAMS
    assert not list(model.buffers())
    # svd (14 frames) differs from svd-xt only in the pipeline's default frame count
    assert replace(UNET_PRESETS["svd"], num_frames=25) == UNET_PRESETS["svd-xt"]


def test_framer_meta_matches_checkpoint_layout() -> None:
    model = meta("framer")
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == reference_keys("framer_unet_keys.txt")
    assert ours[0] == ("mask_token", (1, 1, 4, 1, 1)) and ours[1] == ("conv_in.weight", (320, 9, 3, 3))
    assert len(ours) == FRAMER_TENSORS and count_parameters(model) == FRAMER_PARAMS


def test_heads_per_level_are_5_10_20_20_of_width_64() -> None:
    model = meta("svd-xt")
    expected_down, expected_up = [5, 10, 20, 20], [20, 20, 10, 5]
    seen = 0
    for name, m in model.named_modules():
        if not isinstance(m, Attention):
            continue
        part, idx = name.split(".")[0], name.split(".")[1]
        heads = {"down_blocks": lambda: expected_down[int(idx)], "up_blocks": lambda: expected_up[int(idx)],
                 "mid_block": lambda: 20}[part]()
        assert m.heads == heads, name
        assert m.to_q.out_features // m.heads == 64, name
        seen += 1
    assert seen == 16 * 4  # 16 transformers x (spatial attn1, attn2, temporal attn1, attn2)
    # the count is the config's: diffusers' older class default (5, 10, 10, 20) would load the same weights
    with torch.device("meta"):
        wrong = UNetSpatioTemporalConditionModel(replace(UNET_PRESETS["svd-xt"], num_attention_heads=(5, 10, 10, 20)))
    assert wrong.down_blocks[2].attentions[0].transformer_blocks[0].attn1.heads == 10
    assert [tuple(v.shape) for v in wrong.state_dict().values()] == [s for _, s in reference_keys("svd_unet_keys.txt")]


def test_norm_eps_values() -> None:
    model = meta("svd-xt")
    for name, m in model.named_modules():
        if isinstance(m, SpatioTemporalResBlock):
            eps = 1e-5 if name.startswith(("down_blocks.3", "mid_block")) else 1e-6
            assert m.spatial_res_block.norm1.eps == m.temporal_res_block.norm2.eps == eps, name
        if isinstance(m, TransformerSpatioTemporalModel):
            assert m.norm.eps == 1e-6
            assert m.temporal_transformer_blocks[0].norm_in.eps == 1e-5
    assert model.conv_norm_out.eps == 1e-5


def test_from_config_equals_presets(tiny_pair: tuple[nn.Module, UNetSpatioTemporalConditionModel]) -> None:
    ref, _ = tiny_pair
    assert UNetSpatioTemporalConfig.from_config(dict(ref.config)) == TINY
    svd_json = {"_class_name": "UNetSpatioTemporalConditionModel", "_diffusers_version": "0.24.0.dev0",
                **{k: list(v) if isinstance(v, tuple) else v for k, v in diffusers_kwargs(UNET_PRESETS["svd-xt"]).items()}}
    assert UNetSpatioTemporalConfig.from_config(svd_json) == UNET_PRESETS["svd-xt"]
    framer_json = {**svd_json, "in_channels": 9}  # K:svd_config.json
    assert UNetSpatioTemporalConfig.from_config(framer_json, mask_token=True,
                                                framer_temporal_context=True) == UNET_PRESETS["framer"]
    with pytest.raises(ValueError, match="'resnet_eps' is unknown"):
        UNetSpatioTemporalConfig.from_config({**svd_json, "resnet_eps": 1e-5})


# -- parity with diffusers -------------------------------------------------------------------------

def test_parity_tiny(tiny_pair: tuple[nn.Module, UNetSpatioTemporalConditionModel]) -> None:
    ref, ours = tiny_pair
    sample, t, ctx, ids = inputs(TINY, seed=3)
    with torch.no_grad():
        out = ours(sample, t, ctx, ids)
    expected = run_ref(ref, sample, t, ctx, ids)
    assert out.shape == (2, 3, 4, 16, 16)
    assert rel_err(out, expected) <= 1e-5


def test_parity_two_tokens_four_frames_odd_size_scalar_t(
        tiny_pair: tuple[nn.Module, UNetSpatioTemporalConditionModel]) -> None:
    ref, ours = tiny_pair
    sample, _, ctx, ids = inputs(TINY, seed=4, f=4, hw=(10, 14), lc=2)  # 10 x 14 -> 5 x 7 -> back to 10 x 14
    with torch.no_grad():
        out = ours(sample, 0.37, ctx, ids)
    assert rel_err(out, run_ref(ref, sample, 0.37, ctx, ids)) <= 1e-5


def _diffusers_with_residuals(ref: nn.Module, down: list[torch.Tensor], mid: torch.Tensor,
                              args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """diffusers' forward (it takes no residuals) with a hand-written injection through hooks: each up block's
    skips get their residuals (the same last-in first-out split as the UNet), the mid output gets `mid`. Also
    returns the up blocks' outputs."""
    remaining = list(range(len(down)))
    features: list[torch.Tensor] = []
    handles = []

    def pre(module: nn.Module, a: tuple, kw: dict) -> tuple[tuple, dict]:
        n = len(module.resnets)
        idx = remaining[-n:]
        del remaining[-n:]
        kw["res_hidden_states_tuple"] = tuple(s + down[i] for s, i in zip(kw["res_hidden_states_tuple"], idx))
        return a, kw

    for block in ref.up_blocks:
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, out: features.append(out)))
    handles.append(ref.mid_block.register_forward_hook(lambda m, a, out: out + mid))
    try:
        out = run_ref(ref, *args)
    finally:
        for h in handles:
            h.remove()
    return out, features


def test_parity_controlnet_residuals_and_up_features(
        tiny_pair: tuple[nn.Module, UNetSpatioTemporalConditionModel]) -> None:
    ref, ours = tiny_pair
    args = inputs(TINY, seed=5)
    shapes, mid_shape = ours.skip_shapes(6, 16, 16)
    assert len(shapes) == 4  # conv_in, down 0 (1 layer, downsampler), down 1 (1 layer)
    g = torch.Generator().manual_seed(6)
    down = [torch.randn(s, generator=g) for s in shapes]
    mid = torch.randn(mid_shape, generator=g)
    with torch.no_grad():
        out, feats = ours(*args, down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid,
                          return_up_features=True)
        plain = ours(*args)
    expected, expected_feats = _diffusers_with_residuals(ref, down, mid, args)
    assert rel_err(out, expected) <= 1e-5
    assert rel_err(out, plain) > 1e-2  # the residuals matter
    assert [tuple(f.shape) for f in feats] == [(6, 64, 16, 16), (6, 32, 16, 16)]  # after the upsampler, (N, C, h, w)
    for a, b in zip(feats, expected_feats):
        assert rel_err(a, b) <= 1e-5


def test_gradients_match_diffusers(tiny_pair: tuple[nn.Module, UNetSpatioTemporalConditionModel]) -> None:
    ref, ours = tiny_pair
    sample, t, ctx, ids = inputs(TINY, seed=7, b=1, lc=2)  # 2 tokens: with 1, attn2's softmax is constant
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    ours(sample, t, ctx, ids).square().mean().backward()
    ref(sample, t, ctx, ids, return_dict=False)[0].square().mean().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    # a floor for tensors whose gradient is zero up to rounding (a bias right before a GroupNorm of 1 channel
    # per group, as at width 32): relative error is noise there
    floor = 1e-4 * max(g.abs().max().item() for g in ref_grads.values())
    for name, p in ours.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        err = (p.grad - ref_grads[name]).abs().max().item()
        assert err <= max(1e-4 * ref_grads[name].abs().max().item(), floor), name
    assert ours.down_blocks[0].resnets[0].time_mixer.mix_factor.grad.abs().item() > 0
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)


# -- Framer ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def framer_pair() -> tuple[nn.Module, UNetSpatioTemporalConditionModel]:
    return _pair(UNET_PRESETS["tiny-framer"], seed=8)


def test_framer_shared_part_matches_diffusers(framer_pair: tuple[nn.Module, UNetSpatioTemporalConditionModel]) -> None:
    """diffusers' class with in_channels 9 is Framer's UNet minus mask_token and the context layout: equal for
    one video (where the layouts coincide), and with the layout switched off for a batch."""
    ref, ours = framer_pair
    cfg = ours.config
    sample, t, ctx, ids = inputs(cfg, seed=9, b=2, lc=2)
    with torch.no_grad():
        single = ours(sample[:1], t[:1], ctx[:1], ids[:1])
        batched = ours(sample, t, ctx, ids)
        ours_plain = UNetSpatioTemporalConditionModel(replace(cfg, framer_temporal_context=False)).eval()
        ours_plain.load_state_dict(ours.state_dict())
        plain = ours_plain(sample, t, ctx, ids)
    expected = run_ref(ref, sample, t, ctx, ids)
    assert rel_err(single, expected[:1]) <= 1e-5
    assert rel_err(plain, expected) <= 1e-5
    assert rel_err(batched[1], expected[1]) > 1e-3  # Framer's layout mixes the videos' contexts (spec §7.8.1)


def test_framer_temporal_context_layout_by_hand() -> None:
    """The context each temporal attn2 receives: row r = (video b, pixel p) = b * L + p gets video r % B's
    first-frame tokens in Framer's layout, video b's in diffusers'."""
    torch.manual_seed(0)
    b, f, lc, h, w = 3, 2, 2, 4, 4
    block = TransformerSpatioTemporalModel(2, 16, 32, cross_attention_dim=8)
    x = torch.randn(b * f, 32, h, w)
    ctx = torch.randn(b * f, lc, 8)  # per frame; only frame 0 of each video is read
    first = ctx.reshape(b, f, lc, 8)[:, 0]
    rows = torch.arange(b * h * w)
    got: list[torch.Tensor] = []
    block.temporal_transformer_blocks[0].attn2.register_forward_pre_hook(lambda m, a: got.append(a[1]))
    for framer, owner in ((True, rows % b), (False, rows // (h * w))):
        block.framer_temporal_context = framer
        got.clear()
        with torch.no_grad():
            block(x, ctx, torch.zeros(b, f))
        assert torch.equal(got[0], first[owner])


def test_interp_condition_by_hand() -> None:
    model = UNetSpatioTemporalConditionModel(UNET_PRESETS["tiny-framer"])
    with torch.no_grad():
        model.mask_token.copy_(torch.arange(4.0).reshape(1, 1, 4, 1, 1) + 10)
    g = torch.Generator().manual_seed(10)
    start, end = torch.randn(2, 4, 8, 6, generator=g), torch.randn(2, 4, 8, 6, generator=g)
    cond = model.interp_condition(start, end, num_frames=5)
    assert cond.shape == (2, 5, 5, 8, 6)
    assert torch.equal(cond[:, 0, :4], start) and torch.equal(cond[:, -1, :4], end)
    for i in range(1, 4):
        for c in range(4):
            assert torch.equal(cond[:, i, c], torch.full((2, 8, 6), 10.0 + c))
    assert cond[:, [0, 4], 4].eq(0).all() and cond[:, 1:4, 4].eq(1).all()
    # uncond row (zero keyframes): the mask_token frames and the mask channel stay
    uncond = model.interp_condition(torch.zeros_like(start), torch.zeros_like(end), 5)
    assert torch.equal(uncond[:, 1:4], cond[:, 1:4]) and uncond[:, [0, 4], :4].eq(0).all()
    full = torch.cat([torch.randn(2, 5, 4, 8, 6), cond], dim=2)  # [c_in * x_t | cond] = 9 channels
    with torch.no_grad():
        out = model(full, 0.1, torch.randn(2, 2, 48), torch.tensor([[6.0, 127.0, 0.02]] * 2))
    assert out.shape == (2, 5, 4, 8, 6)
    with pytest.raises(ValueError, match=">= 3"):
        model.interp_condition(start, end, 2)
    with pytest.raises(ValueError, match="mask_token"):
        UNetSpatioTemporalConditionModel(TINY).interp_condition(start, end, 3)


# -- units, seams, init, errors ----------------------------------------------------------------------

def test_units_cover_resnets_and_transformers_in_forward_order() -> None:
    model = meta("svd-xt")
    units = model.units()
    assert len(units) == 38 and len({id(u) for u in units}) == 38  # 22 resnets + 16 transformers
    every = [m for m in model.modules() if isinstance(m, (SpatioTemporalResBlock, TransformerSpatioTemporalModel))]
    assert {id(m) for m in every} == {id(u) for u in units}
    names = {id(m): n for n, m in model.named_modules()}
    order = [names[id(u)] for u in units]
    assert order[:3] == ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0", "down_blocks.0.resnets.1"]
    assert order[12:17] == ["down_blocks.3.resnets.0", "down_blocks.3.resnets.1", "mid_block.resnets.0",
                            "mid_block.attentions.0", "mid_block.resnets.1"]
    assert order[-2:] == ["up_blocks.3.resnets.2", "up_blocks.3.attentions.2"]
    in_units = sum(p.numel() for u in units for p in u.parameters())
    assert 0.95 < in_units / SVD_XT_PARAMS < 1.0  # the root keeps conv_in, embeddings, resamplers, head


def test_units_checkpointed_give_same_gradients() -> None:
    from lora_core.distributed.parallelize import apply_activation_checkpointing

    model = UNetSpatioTemporalConditionModel(TINY)
    randomize_(model, seed=11)
    args = inputs(TINY, seed=12, b=1)

    def grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(*args).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    keys = list(model.state_dict())
    plain = grads()
    apply_activation_checkpointing(model.units())
    wrapped = grads()
    assert list(model.state_dict()) == keys
    for a, b in zip(plain, wrapped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_attention_goes_through_the_seam() -> None:
    model = UNetSpatioTemporalConditionModel(TINY)
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
        calls.append((tuple(q.shape), tuple(k.shape)))
        return attention_mod.attention(q, k, v, **kw)

    for m in model.modules():
        if isinstance(m, Attention):
            assert m.attn_op is attention_mod.attention
            m.attn_op = spy
    sample, t, ctx, ids = inputs(TINY, seed=13, b=1, lc=2)
    with torch.no_grad():
        model(sample, t, ctx, ids)
    assert len(calls) == 4 * 4  # 4 transformers (down 1, mid 1, up 2) x 4 attentions; q/k/v [B, L, NH, D]
    assert calls[0] == ((3, 256, 2, 16), (3, 256, 2, 16))  # spatial self: N = 3 frames x 256 pixels
    assert calls[1] == ((3, 256, 2, 16), (3, 2, 2, 16))  # spatial cross to the 2 tokens
    assert calls[2] == ((256, 3, 2, 16), (256, 3, 2, 16))  # temporal self: one 3-frame sequence per pixel
    assert calls[3] == ((256, 3, 2, 16), (256, 2, 2, 16))  # temporal cross to the first frame's tokens
    assert calls[4] == ((3, 64, 4, 16), (3, 64, 4, 16))  # mid at 8 x 8, width 64: 4 heads


def test_timestep_forms_agree() -> None:
    model = UNetSpatioTemporalConditionModel(TINY).eval()
    sample, _, ctx, ids = inputs(TINY, seed=14)
    with torch.no_grad():
        outs = [model(sample, t, ctx, ids) for t in (0.5, torch.tensor(0.5), torch.tensor([0.5]),
                                                     torch.tensor([0.5, 0.5]))]
        other = model(sample, torch.tensor([0.5, -1.0]), ctx, ids)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    assert rel_err(other[0], outs[0][0]) <= 1e-6 and rel_err(other[1], outs[0][1]) > 1e-3


def test_meta_build_then_init_weights() -> None:
    with torch.device("meta"):
        model = UNetSpatioTemporalConditionModel(UNET_PRESETS["tiny-framer"])
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.up_blocks[1].attentions[0].time_mixer.mix_factor.item() == 0.5
    assert model.mid_block.resnets[1].time_mixer.mix_factor.item() == 0.5
    sample, t, ctx, ids = inputs(model.config, seed=15, lc=2)
    out = model(sample, t, ctx, ids)
    assert out.shape == (2, 3, 4, 16, 16) and torch.isfinite(out).all()


def test_user_errors_are_value_errors() -> None:
    model = UNetSpatioTemporalConditionModel(TINY)
    sample, t, ctx, ids = inputs(TINY, seed=16)
    with pytest.raises(ValueError, match="in_channels=8"):
        model(sample[:, :, :4], t, ctx, ids)
    with pytest.raises(ValueError, match=r"\[2, Lc, 48\]"):
        model(sample, t, ctx[..., :16], ids)
    with pytest.raises(ValueError, match=r"added_time_ids .* \[2, 3\]"):
        model(sample, t, ctx, ids[:, :2])
    with pytest.raises(ValueError, match="timestep has shape"):
        model(sample, torch.zeros(3), ctx, ids)
    shapes, mid = model.skip_shapes(6, 16, 16)
    with pytest.raises(ValueError, match="pass both or neither"):
        model(sample, t, ctx, ids, down_block_additional_residuals=tuple(torch.zeros(s) for s in shapes))
    with pytest.raises(ValueError, match="has 3 tensors"):
        model(sample, t, ctx, ids, down_block_additional_residuals=tuple(torch.zeros(s) for s in shapes[:3]),
              mid_block_additional_residual=torch.zeros(mid))
    with pytest.raises(ValueError, match="multiple of 32"):
        replace(TINY, block_out_channels=(16, 64))
    with pytest.raises(ValueError, match="divisible by its 3 attention heads"):
        replace(TINY, num_attention_heads=(3, 4))
    with pytest.raises(ValueError, match="one int or 2"):
        replace(TINY, num_attention_heads=(2, 4, 4))
    with pytest.raises(ValueError, match="2 \\* out_channels \\+ 1"):
        replace(TINY, mask_token=True)
    with pytest.raises(ValueError, match="CrossAttnDownBlock2D"):
        replace(TINY, down_block_types=("CrossAttnDownBlock2D", "DownBlockSpatioTemporal"))
