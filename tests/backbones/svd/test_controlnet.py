"""Framer's ControlNet and the trajectory heatmaps: checkpoint layout, the encoder against the UNet's down path,
zero init, residual scale and shapes, the heatmap CNN against a hand-written reference, residuals into the UNet;
the heatmap renderer against a numpy re-write of Framer's utils, PCHIP against scipy, the track file's errors.

Shapes: B videos, F frames, N = B * F; the tiny preset runs latents [2, 3, 9, 16, 16], heatmaps [2, 3, 3, 32, 32]
(stride 2, the tiny VAE's), context [2, 2, 48].
"""
from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.oracle import randomize_

from backbones.svd.controlnet import CONTROLNET_PRESETS, ControlNetSVDConfig, ControlNetSVDModel
from backbones.svd.tracks import (_filled_disk, gaussian_template, interpolate_clicks, load_tracks, pchip,
                                  render_heatmaps)
from backbones.svd.unet import UNET_PRESETS, UNetSpatioTemporalConditionModel

HERE = Path(__file__).parent
# spec svd-framer.md §0 / §7.3 (META: structural replica of Framer's controlnet_svd.py, diffusers 0.42.1 blocks)
FRAMER_CN_TENSORS, FRAMER_CN_PARAMS = 671, 682_024_417
B, NF, HW = 2, 3, (16, 16)


def reference_keys(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (HERE / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            rows.append((key, tuple(ast.literal_eval(shape))))
    return rows


def test_framer_layout_matches_checkpoint_keys() -> None:
    with torch.device("meta"):
        model = ControlNetSVDModel(CONTROLNET_PRESETS["framer"])
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == reference_keys("framer_controlnet_keys.txt")  # names, shapes and order
    assert len(ours) == FRAMER_CN_TENSORS
    assert sum(math.prod(s) for _, s in ours) == FRAMER_CN_PARAMS
    cfg = model.config
    assert (cfg.in_channels, cfg.num_frames, cfg.conditioning_channels, cfg.conditioning_stride) == (9, 25, 3, 8)


def test_tiny_preset_is_the_tiny_framer_encoder() -> None:
    unet_cfg, cn_cfg = UNET_PRESETS["tiny-framer"], CONTROLNET_PRESETS["tiny"]
    for name in ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim", "down_block_types",
                 "num_attention_heads", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                 "framer_temporal_context"):
        assert getattr(cn_cfg, name) == getattr(unet_cfg, name), name
    assert cn_cfg.conditioning_stride == 2  # VAE_PRESETS["tiny"]: 2x compression


def inputs(cfg, seed: int, lc: int = 2):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(B, NF, cfg.in_channels, *HW, generator=g)
    t = 0.25 * torch.log(torch.rand(B, generator=g) * 100 + 0.01)
    ctx = torch.randn(B, lc, cfg.cross_attention_dim, generator=g)
    ids = torch.stack([torch.full((B,), 6.0), torch.randint(0, 255, (B,), generator=g).float(),
                       torch.rand(B, generator=g) * 0.1], dim=1)
    s = 2
    cond = torch.rand(B, NF, 3, HW[0] * s, HW[1] * s, generator=g) * 255
    return sample, t, ctx, ids, cond


@pytest.fixture(scope="module")
def tiny_unet() -> UNetSpatioTemporalConditionModel:
    return randomize_(UNetSpatioTemporalConditionModel(UNET_PRESETS["tiny-framer"]), seed=3).eval()


def unet_down_path(unet, sample, t, ctx, ids):
    """The UNet's skips and mid output, captured by hooks during its own forward."""
    got: dict = {"skips": []}
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, out: got["skips"].append(out))]
    hooks += [b.register_forward_hook(lambda m, a, out: got["skips"].extend(out[1])) for b in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, out: got.__setitem__("mid", out)))
    with torch.no_grad():
        unet(sample, t, ctx, ids)
    for h in hooks:
        h.remove()
    return got["skips"], got["mid"]


def test_from_unet_encoder_equals_unet_down_path(tiny_unet) -> None:
    cn = ControlNetSVDModel.from_unet(tiny_unet, conditioning_embedding_out_channels=(8, 16)).eval()
    # a random heatmap encoder except its zero conv_out: the embedding adds exactly 0
    for name, p in cn.controlnet_cond_embedding.named_parameters():
        if not name.startswith("conv_out"):
            torch.nn.init.normal_(p, std=0.3)
    sample, t, ctx, ids, cond = inputs(cn.config, seed=0)
    ref_skips, ref_mid = unet_down_path(tiny_unet, sample, t, ctx, ids)
    with torch.no_grad():
        skips, mid = cn.encode(sample, t, ctx, ids, cond)
        down, mid_res = cn(sample, t, ctx, ids, cond)
    assert len(skips) == len(ref_skips) == len(tiny_unet.skip_shapes(B * NF, *HW)[0]) == 4
    for a, b in zip(skips, ref_skips):
        assert torch.equal(a, b)
    assert torch.equal(mid, ref_mid)
    # zero-initialised convs: every residual exactly 0, shapes = the UNet's skip shapes
    shapes, mid_shape = tiny_unet.skip_shapes(B * NF, *HW)
    assert [tuple(r.shape) for r in down] == shapes and tuple(mid_res.shape) == mid_shape
    assert all(torch.count_nonzero(r) == 0 for r in (*down, mid_res))


def test_from_unet_add_embedding_switch(tiny_unet) -> None:
    copied = ControlNetSVDModel.from_unet(tiny_unet, (8, 16))
    framer_like = ControlNetSVDModel.from_unet(tiny_unet, (8, 16), copy_add_embedding=False)
    w = tiny_unet.add_embedding.linear_1.weight
    assert torch.equal(copied.add_embedding.linear_1.weight, w)
    assert not torch.equal(framer_like.add_embedding.linear_1.weight, w)
    assert torch.equal(framer_like.time_embedding.linear_1.weight, tiny_unet.time_embedding.linear_1.weight)


@pytest.fixture(scope="module")
def random_cn() -> ControlNetSVDModel:
    return randomize_(ControlNetSVDModel(CONTROLNET_PRESETS["tiny"]), seed=5).eval()


def test_conditioning_changes_output_and_scale_multiplies(random_cn) -> None:
    sample, t, ctx, ids, cond = inputs(random_cn.config, seed=1)
    with torch.no_grad():
        down1, mid1 = random_cn(sample, t, ctx, ids, cond)
        down_h, mid_h = random_cn(sample, t, ctx, ids, cond, conditioning_scale=0.5)
        down0, _ = random_cn(sample, t, ctx, ids, torch.zeros_like(cond))
    for a, b in zip((*down1, mid1), (*down_h, mid_h)):
        torch.testing.assert_close(b, 0.5 * a, rtol=0, atol=0)
    assert (down1[0] - down0[0]).abs().max() > 1e-3  # the heatmaps reach the residuals


def test_cond_embedding_against_hand_written_cnn(random_cn) -> None:
    emb = random_cn.controlnet_cond_embedding
    x = torch.rand(4, 3, 32, 32) * 255
    sd = emb.state_dict()

    def conv(h, name, stride=1):
        return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=stride, padding=1)

    h = F.silu(conv(x, "conv_in"))  # 3 -> 8
    h = F.silu(conv(h, "blocks.0"))  # 8 -> 8
    h = F.silu(conv(h, "blocks.1", stride=2))  # 8 -> 16, /2
    ref = conv(h, "conv_out")  # 16 -> 32, no activation
    with torch.no_grad():
        out = emb(x)
    assert out.shape == (4, 32, 16, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_framer_cond_embedding_structure() -> None:
    with torch.device("meta"):
        emb = ControlNetSVDModel(CONTROLNET_PRESETS["framer"]).controlnet_cond_embedding
    strides = [m.stride[0] for m in emb.blocks]
    widths = [(m.in_channels, m.out_channels) for m in emb.blocks]
    assert strides == [1, 2, 1, 2, 1, 2]
    assert widths == [(16, 16), (16, 32), (32, 32), (32, 96), (96, 96), (96, 256)]
    assert (emb.conv_in.in_channels, emb.conv_out.out_channels) == (3, 320)


def test_residuals_drive_the_unet(tiny_unet, random_cn) -> None:
    sample, t, ctx, ids, cond = inputs(random_cn.config, seed=2)
    with torch.no_grad():
        down, mid = random_cn(sample, t, ctx, ids, cond, conditioning_scale=0.1)
        plain = tiny_unet(sample, t, ctx, ids)
        zero = tiny_unet(sample, t, ctx, ids, down_block_additional_residuals=tuple(torch.zeros_like(r) for r in down),
                         mid_block_additional_residual=torch.zeros_like(mid))
        controlled = tiny_unet(sample, t, ctx, ids, down_block_additional_residuals=down,
                               mid_block_additional_residual=mid)
    assert torch.equal(plain, zero)
    assert controlled.shape == plain.shape and torch.isfinite(controlled).all()
    assert (controlled - plain).abs().max() > 1e-4


def test_init_weights_zeroes_the_outputs() -> None:
    with torch.device("meta"):
        cn = ControlNetSVDModel(CONTROLNET_PRESETS["tiny"])
    cn.to_empty(device="cpu")
    cn.init_weights()
    sample, t, ctx, ids, cond = inputs(cn.config, seed=4)
    with torch.no_grad():
        skips, _ = cn.encode(sample, t, ctx, ids, cond)
        down, mid = cn(sample, t, ctx, ids, cond)
    assert all(torch.count_nonzero(r) == 0 for r in (*down, mid))
    assert skips[0].abs().max() > 0 and torch.isfinite(skips[-1]).all()


def test_input_errors(random_cn) -> None:
    sample, t, ctx, ids, cond = inputs(random_cn.config, seed=0)
    with pytest.raises(ValueError, match="controlnet_cond has shape"):
        random_cn(sample, t, ctx, ids, cond[..., :16, :16])
    with pytest.raises(ValueError, match="sample has shape"):
        random_cn(sample[:, :, :8], t, ctx, ids, cond)
    with pytest.raises(ValueError, match="mask_token"):
        ControlNetSVDConfig(mask_token=True)
    with pytest.raises(ValueError, match="with_id_feature"):
        ControlNetSVDConfig.from_config({"with_id_feature": True})
    cfg = ControlNetSVDConfig.from_config({"_class_name": "ControlNetSVDModel", "with_id_feature": False,
                                           "feature_channels": 160, "in_channels": 9})
    assert cfg.in_channels == 9


# -- heatmaps ------------------------------------------------------------------------------------------

def reference_template() -> np.ndarray:
    """Framer's gen_gaussian_heatmap, per-pixel loop as written there (disk from our cv2.circle re-write)."""
    size = 200
    g = np.zeros((size, size), np.float32)
    for i in range(size):
        for j in range(size):
            g[i, j] = 1 / 2 / np.pi / (40 ** 2) * np.exp(-1 / 2 * ((i - size / 2) ** 2 / (40 ** 2)
                                                                    + (j - size / 2) ** 2 / (40 ** 2)))
    g = g * _filled_disk(size, 100, 100, 100)
    g = (g / np.max(g)).astype(np.float32)
    return (g / np.max(g) * 255).astype(np.uint8)


def reference_resize(src: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """cv2.resize INTER_LINEAR geometry in float64: sx = (dx + 0.5) * scale - 0.5, clamped; round half up."""
    def axis(n_in, n_out):
        s = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        s = np.maximum(s, 0)
        i0 = np.minimum(np.floor(s).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, s - i0
    y0, y1, wy = axis(src.shape[0], out_h)
    x0, x1, wx = axis(src.shape[1], out_w)
    a = src.astype(np.float64)
    top = a[y0][:, x0] * (1 - wx) + a[y0][:, x1] * wx
    bot = a[y1][:, x0] * (1 - wx) + a[y1][:, x1] * wx
    return np.floor(top * (1 - wy[:, None]) + bot * wy[:, None] + 0.5).astype(np.uint8)


def reference_heatmaps(tracks: np.ndarray, h: int, w: int, side: int = 20) -> np.ndarray:
    tpl = reference_template()
    out = np.zeros((tracks.shape[0], 3, h, w), np.float32)
    for f in range(tracks.shape[0]):
        canvas = np.zeros((h, w), np.uint8)
        for x, y in tracks[f]:
            if x < 0 or y < 0 or x >= w or y >= h:
                continue
            x1, x2 = int(max(x - side, 1)), int(min(x + side, w - 1))
            y1, y2 = int(max(y - side, 1)), int(min(y + side, h - 1))
            canvas[y1:y2, x1:x2] = reference_resize(tpl, x2 - x1, y2 - y1)
        out[f] = canvas[None]
    return out


def test_gaussian_template() -> None:
    g = gaussian_template()
    assert g.dtype == np.uint8 and g.shape == (200, 200)
    assert g[100, 100] == 255 and g.max() == 255
    assert np.array_equal(g, reference_template())
    assert g[0, 0] == 0 and g[199, 199] == 0  # outside the disk
    assert g[100, 0] == int(255 * math.exp(-0.5 * (100 / 40) ** 2))  # 11: the disk edge at radius 100
    assert np.array_equal(g[100, 1:], g[100, 1:][::-1]) and np.array_equal(g[1:, 100], g[1:, 100][::-1])
    # the rasterised disk is the Euclidean one up to its boundary ring
    yy, xx = np.mgrid[:200, :200]
    r = np.hypot(yy - 100, xx - 100)
    disk = _filled_disk(200, 100, 100, 100) > 0
    assert disk[r <= 99].all() and not disk[r >= 101].any()


def test_render_heatmaps_against_reference() -> None:
    h, w = 64, 96
    tracks = np.array([
        [[40.3, 30.8], [50.0, 36.0], [2.5, 3.0], [95.5, 63.2], [-1.0, 10.0], [20.0, 64.0]],  # overlap, corners, out
        [[10.0, 60.0], [90.7, 5.1], [96.0, 10.0], [47.9, 31.1], [0.0, 0.0], [60.0, 20.0]],
    ], np.float32)
    ours = render_heatmaps(torch.from_numpy(tracks), h, w)
    ref = reference_heatmaps(tracks, h, w)
    assert ours.shape == (2, 3, h, w) and ours.dtype == torch.float32
    diff = np.abs(ours.numpy() - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02
    assert torch.equal(ours[:, 0], ours[:, 1]) and torch.equal(ours[:, 0], ours[:, 2])
    assert ours.max() <= 255 and ours.max() >= 250  # 0..255, not normalised
    assert ours[:, :, 0].abs().sum() == 0 and ours[:, :, -1].abs().sum() == 0  # rows 0 and H-1 never painted
    assert ours[:, :, :, 0].abs().sum() == 0 and ours[:, :, :, -1].abs().sum() == 0


def test_render_heatmaps_overwrites_and_skips() -> None:
    h, w = 64, 64
    first = render_heatmaps(torch.tensor([[[30.0, 30.0]]]), h, w)
    second = render_heatmaps(torch.tensor([[[40.0, 30.0]]]), h, w)
    both = render_heatmaps(torch.tensor([[[30.0, 30.0], [40.0, 30.0]]]), h, w)
    box = (slice(None), slice(None), slice(10, 50), slice(20, 60))  # the second point's box
    assert torch.equal(both[box], second[box])  # later points overwrite (no max-blend)
    assert torch.equal(both[..., :20], first[..., :20])
    outside = render_heatmaps(torch.tensor([[[-0.5, 30.0], [64.0, 30.0], [30.0, 70.0]]]), h, w)
    assert outside.abs().sum() == 0
    # squashed at a border, not cropped: x = 5 gives the box [1, 25), 24 columns holding the whole blob, its
    # peak included, so the painted width is 24 (a crop would keep 25 - 1 columns of the right part only)
    edge = render_heatmaps(torch.tensor([[[5.0, 30.0]]]), h, w)[0, 0]
    cols = edge.sum(0).nonzero().flatten()
    assert cols.min() == 1 and cols.max() == 24 and edge.max() >= 250
    # both ends show the blob's faint rim (the template is centred on pixel 100, so off by a level), a crop
    # would cut it mid-slope
    assert 0 < edge[30, 1] < 30 and 0 < edge[30, 24] < 30 and (edge[30, 1] - edge[30, 24]).abs() <= 2


# -- clicks and track files ------------------------------------------------------------------------------

def test_pchip_against_scipy() -> None:
    interpolate = pytest.importorskip("scipy.interpolate", reason="scipy is the PCHIP oracle (test extra)")
    g = np.random.default_rng(0)
    for k in (2, 3, 4, 7):
        t = np.sort(g.random(k))
        t[0], t[-1] = 0.0, 1.0
        y = g.normal(size=(k, 2)) * 50
        y[1:3, 0] = y[1, 0] if k > 3 else y[1:3, 0]  # a flat secant
        t_new = np.linspace(-0.1, 1.1, 37)
        ref = interpolate.PchipInterpolator(t, y)(t_new)
        ours = pchip(torch.tensor(t), torch.tensor(y), torch.tensor(t_new)).numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)
    clicks = [[[10.0, 20.0], [40.0, 25.0], [30.0, 60.0]], [[5.0, 5.0], [6.0, 50.0]]]
    tracks = interpolate_clicks(clicks, 14)
    assert tracks.shape == (14, 2, 2) and tracks.dtype == torch.float32
    tt = np.linspace(0, 1, 14)
    np.testing.assert_allclose(tracks[:, 0].numpy(),
                               interpolate.PchipInterpolator(np.linspace(0, 1, 3), clicks[0])(tt), rtol=1e-6)


def test_single_click_is_near_stationary() -> None:
    tracks = interpolate_clicks([[[10.0, 20.0]]], 5)
    expected = torch.tensor([[10.0, 20.0]]) + torch.linspace(0, 1, 5)[:, None]
    torch.testing.assert_close(tracks[:, 0], expected)
    with pytest.raises(ValueError, match="track 0"):
        interpolate_clicks([[[1.0, 2.0, 3.0]]], 5)


def test_load_tracks(tmp_path: Path) -> None:
    path = tmp_path / "tracks.json"
    raw = [[[10, 20], [12, 22], [14, 24]], [[100, 50], [90, 40], [80, 30.5]]]  # P=2 tracks of F=3 frames
    path.write_text(json.dumps({"frames": 3, "width": 200, "height": 100, "tracks": raw}))
    tracks = load_tracks(path)
    assert tracks.shape == (3, 2, 2)
    assert tracks[2, 1].tolist() == [80.0, 30.5]
    scaled = load_tracks(path, height=50, width=400)
    assert scaled[2, 1].tolist() == [160.0, 15.25]

    def bad(content: str, match: str) -> None:
        path.write_text(content)
        with pytest.raises(ValueError, match=match) as e:
            load_tracks(path)
        assert str(path) in str(e.value)

    bad("{not json", "not valid JSON")
    bad(json.dumps([1, 2]), "expected an object")
    bad(json.dumps({"frames": 3, "width": 200, "tracks": raw}), r"lacks keys \['height'\]")
    bad(json.dumps({"frames": 0, "width": 200, "height": 100, "tracks": raw}), "frames=0")
    bad(json.dumps({"frames": 4, "width": 200, "height": 100, "tracks": raw}), "track 0 has 3 entries")
    bad(json.dumps({"frames": 3, "width": 200, "height": 100, "tracks": [[[1, 2], [3], [4, 5]]]}),
        "track 0 frame 1")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tracks(tmp_path / "missing.json")
