"""SD UNet: exact diffusers layout, parity with diffusers (fp32, bf16), LDM key map, units, seams, errors.

Shapes: B batch; the tiny preset runs latents [2, 4, 16, 16] with text [2, 7, 32].
"""
from __future__ import annotations

import ast
import copy
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tests.oracle import randomize_

import backbones.attention as attention_mod
from backbones.sd.unet import UNET_PRESETS, UNet2DConditionModel, UNetConfig
from backbones.sd.unet_blocks import Attention, ResnetBlock2D, Transformer2DModel
from backbones.sd.unet_ldm_keymap import ldm_module_table, unet_from_ldm, unet_to_ldm

HERE = Path(__file__).parent
SHARED = Path("/work/shared/reference")
TINY = UNET_PRESETS["tiny"]
SD15_PARAMS = 859_520_964
LDM_PREFIX = "model.diffusion_model."

# A second layout for what the tiny preset leaves out: per-level head counts (1, 4, 2: heads != 8 and
# not all equal), linear projections (SD2 style), an upsampler after attention (LDM slot .2), two layers
# per block, padding-0 downsampling, [sin, cos] features with freq_shift 1.
ODD_KW = dict(sample_size=16, block_out_channels=(16, 32, 32), layers_per_block=2,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
              norm_num_groups=8, attention_head_dim=(1, 4, 2), use_linear_projection=True, downsample_padding=0,
              flip_sin_to_cos=False, freq_shift=1)
TINY_KW = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=32, norm_num_groups=8, attention_head_dim=2)


def reference_file(name: str) -> Path:
    """The copy next to this test, else the shared reference folder."""
    local = HERE / name
    return local if local.is_file() else SHARED / name


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()




def inputs(cfg: UNetConfig, seed: int, b: int = 2, hw: tuple[int, int] = (16, 16),
           lc: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, cfg.in_channels, *hw, generator=g), torch.randn(b, lc, cfg.cross_attention_dim, generator=g)


def skip_shapes(cfg: UNetConfig, b: int, hw: tuple[int, int]) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """Shapes of the skips (conv_in's output, then what each down block pushes) and of the mid output."""
    h, w = hw
    ch = cfg.block_out_channels
    shapes = [(b, ch[0], h, w)]
    for i, c in enumerate(ch):
        shapes += [(b, c, h, w)] * cfg.layers_per_block
        if i < len(ch) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((b, c, h, w))
    return shapes, (b, ch[-1], h, w)


def reference_keys() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in reference_file("sd15_unet_keys.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split(" ", 1)
            rows.append((name, tuple(ast.literal_eval(shape))))
    return rows


def ldm_rows() -> list[tuple[str, str, tuple[int, ...]]]:
    """UNet rows of the tsv: (diffusers name, LDM name without prefix, LDM shape)."""
    rows = []
    for line in reference_file("sd15_ldm_key_map.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        component, diffusers_name, ldm_name, shape = line.split("\t")
        if component == "unet":
            assert ldm_name.startswith(LDM_PREFIX)
            rows.append((diffusers_name, ldm_name[len(LDM_PREFIX):], tuple(ast.literal_eval(shape))))
    return rows


@pytest.fixture(scope="module")
def sd15_meta() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(UNET_PRESETS["sd15"])


def _pair(kw: dict, seed: int) -> tuple[nn.Module, UNet2DConditionModel]:
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference oracle (test extra)")
    ref = diffusers.UNet2DConditionModel(**kw).eval()
    randomize_(ref, seed)
    ours = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names: no key map
    return ref, ours


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[nn.Module, UNet2DConditionModel]:
    return _pair(TINY_KW, seed=1)


@pytest.fixture(scope="module")
def odd_pair() -> tuple[nn.Module, UNet2DConditionModel]:
    return _pair(ODD_KW, seed=2)


# -- layout ----------------------------------------------------------------------------------------

def test_sd15_meta_matches_checkpoint_layout(sd15_meta: UNet2DConditionModel) -> None:
    want = reference_keys()
    assert len(want) == 686
    assert [(k, tuple(v.shape)) for k, v in sd15_meta.state_dict().items()] == want  # names, shapes, order
    assert sum(p.numel() for p in sd15_meta.parameters()) == SD15_PARAMS
    assert not list(sd15_meta.buffers())


def test_sd15_heads_are_eight_of_width_c_over_8(sd15_meta: UNet2DConditionModel) -> None:
    """attention_head_dim=8 counts heads: head width 40/80/160, never 8."""
    widths = set()
    for name, m in sd15_meta.named_modules():
        if isinstance(m, Attention):
            assert m.heads == 8, name
            widths.add(m.to_q.out_features // m.heads)
    assert widths == {40, 80, 160}


def test_from_diffusers_config_equals_presets(tiny_pair: tuple[nn.Module, UNet2DConditionModel]) -> None:
    ref, _ = tiny_pair
    assert UNetConfig.from_diffusers(dict(ref.config)) == TINY  # every key diffusers writes is understood
    sd15_json = {  # runwayml/stable-diffusion-v1-5 unet/config.json, as published (lists, not tuples)
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
        "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
        "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    assert UNetConfig.from_diffusers(sd15_json) == UNET_PRESETS["sd15"]


# -- parity with diffusers -------------------------------------------------------------------------

def _check_parity(ref: nn.Module, ours: UNet2DConditionModel, b: int, hw: tuple[int, int],
                  timestep: torch.Tensor | int, control: bool, label: str, seed: int) -> None:
    x, ctx = inputs(ours.config, seed=seed, b=b, hw=hw)
    kwargs = {}
    if control:  # a ControlNet's residuals: one per skip plus one for the mid block
        g = torch.Generator().manual_seed(seed + 100)
        shapes, mid = skip_shapes(ours.config, b, hw)
        kwargs = dict(down_block_additional_residuals=tuple(torch.randn(s, generator=g) for s in shapes),
                      mid_block_additional_residual=torch.randn(mid, generator=g))
    with torch.no_grad():
        got = ours(x, timestep, ctx, **kwargs)
        want = ref(x, timestep, ctx, return_dict=False, **kwargs)[0]
        plain = ours(x, timestep, ctx) if control else None
    assert got.shape == want.shape == (b, ours.config.out_channels, *hw) and got.dtype == torch.float32
    err = rel_err(got, want)
    print(f"max rel err vs diffusers ({label}): {err:.2e}")
    # Contract: 1e-5. Measured 0 (the same ops in the same order), so the 1e-6 bound also catches eps-sized
    # mistakes: a transformer GroupNorm eps of 1e-5 instead of 1e-6 moves the output by ~2e-6.
    assert err <= 1e-6
    if control:
        assert rel_err(got, plain) > 1e-2  # the residuals are used


def test_parity_tiny(tiny_pair: tuple[nn.Module, UNet2DConditionModel]) -> None:
    _check_parity(*tiny_pair, b=2, hw=(16, 16), timestep=torch.tensor([999, 3]), control=False,
                  label="tiny, [B] t", seed=3)


def test_parity_tiny_odd_size_scalar_t_controlnet(tiny_pair: tuple[nn.Module, UNet2DConditionModel]) -> None:
    # 15 x 13: the downsampler rounds up and the upsampler must take the skip's size
    _check_parity(*tiny_pair, b=1, hw=(15, 13), timestep=421, control=True, label="tiny, 15x13, int t, control",
                  seed=4)


def test_parity_per_level_heads_linear_projection(odd_pair: tuple[nn.Module, UNet2DConditionModel]) -> None:
    _, ours = odd_pair
    heads = [m.heads for m in ours.modules() if isinstance(m, Attention)]
    assert set(heads) == {1, 4, 2} and isinstance(ours.down_blocks[0].attentions[0].proj_in, nn.Linear)
    _check_parity(*odd_pair, b=2, hw=(16, 16), timestep=torch.tensor([17.5, 640.0]), control=True,
                  label="heads (1, 4, 2), linear proj, pad 0, sin-cos", seed=5)


def test_gradients_match_diffusers(tiny_pair: tuple[nn.Module, UNet2DConditionModel]) -> None:
    ref, ours = tiny_pair
    x, ctx = inputs(TINY, seed=6)
    t = torch.tensor([250, 800])
    grads = []
    for model, call in ((ours, lambda: ours(x, t, ctx)), (ref, lambda: ref(x, t, ctx, return_dict=False)[0])):
        model.zero_grad(set_to_none=True)
        call().square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys()
    worst = max(rel_err(grads[0][k], grads[1][k]) for k in grads[1] if grads[1][k].abs().max() > 0)
    print(f"max rel grad err vs diffusers: {worst:.2e}")
    assert worst <= 1e-6  # measured 0; see _check_parity


def test_norm_eps_values(sd15_meta: UNet2DConditionModel) -> None:
    """Resnet and output GroupNorms 1e-5, the GroupNorm before each transformer 1e-6, LayerNorms 1e-5."""
    eps: dict[str, set[float]] = {"resnet": set(), "transformer": set(), "layer": set()}
    for name, m in sd15_meta.named_modules():
        if isinstance(m, nn.GroupNorm):
            eps["transformer" if ".attentions." in name else "resnet"].add(m.eps)
            assert m.num_groups == 32
        elif isinstance(m, nn.LayerNorm):
            eps["layer"].add(m.eps)
    assert eps == {"resnet": {1e-5}, "transformer": {1e-6}, "layer": {1e-5}}


# -- precision -------------------------------------------------------------------------------------

def _output_dtypes(model: nn.Module, run: Callable[[], None]) -> dict[str, torch.dtype]:
    """Output dtype of every named module during `run()` (first tensor of tuple outputs)."""
    seen: dict[str, torch.dtype] = {}

    def hook(name: str):  # noqa: ANN202
        def record(mod: nn.Module, args: tuple, out: object) -> None:
            while isinstance(out, (tuple, list)):
                out = out[0]
            if torch.is_tensor(out):
                seen[name] = out.dtype
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
def test_bf16_dtypes_match_diffusers_module_by_module(tiny_pair: tuple[nn.Module, UNet2DConditionModel],
                                                      mode: str) -> None:
    """diffusers' SD1.5 path up-casts nothing itself, so neither do we: every module's output dtype equals
    diffusers' under bf16 (whatever torch's autocast policy does to norms on this device), the timestep
    sinusoid is the fp32 island, and the values agree."""
    ref, ours = tiny_pair
    x, ctx = inputs(TINY, seed=7)
    t = torch.tensor([999, 10])
    with torch.no_grad():
        full = ours(x, t, ctx)
    if mode == "bf16_weights":  # copies: the fixtures stay fp32
        ours, ref = copy.deepcopy(ours).bfloat16(), copy.deepcopy(ref).bfloat16()
        x, ctx = x.bfloat16(), ctx.bfloat16()
    outs: dict[str, torch.Tensor] = {}
    dtypes = []
    for key, model, call in (("ours", ours, lambda: ours(x, t, ctx)),
                             ("ref", ref, lambda: ref(x, t, ctx, return_dict=False)[0])):
        def run(key: str = key, call: Callable[[], torch.Tensor] = call) -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
                outs[key] = call()
        dtypes.append(_output_dtypes(model, run))
    assert dtypes[0] == dtypes[1]
    assert dtypes[0]["time_proj"] == torch.float32  # the fp32 island
    assert dtypes[0]["conv_out"] == dtypes[0]["down_blocks.0.attentions.0.transformer_blocks.0.attn2"] == torch.bfloat16
    assert outs["ours"].dtype == torch.bfloat16
    err_ref, err_full = rel_err(outs["ours"], outs["ref"]), rel_err(outs["ours"], full)
    print(f"bf16 {mode}: rel err vs diffusers bf16 {err_ref:.2e}, vs our fp32 {err_full:.2e}")
    assert err_ref <= 1e-2
    assert err_full <= 5e-2


def test_timestep_features_are_fp32_cos_sin_under_autocast() -> None:
    model = UNet2DConditionModel(TINY)
    t = torch.tensor([0.0, 999.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.time_proj(t)
    assert feats.dtype == torch.float32 and feats.shape == (2, 32)
    freqs = torch.exp(-math.log(10000) * torch.arange(16, dtype=torch.float64) / 16)
    want = torch.cat([torch.cos(999.0 * freqs), torch.sin(999.0 * freqs)])
    torch.testing.assert_close(feats[1].double(), want, rtol=0, atol=2e-4)  # fp32 phases up to 999 rad
    assert torch.equal(feats[0], torch.cat([torch.ones(16), torch.zeros(16)]))  # cos first


# -- LDM key map -----------------------------------------------------------------------------------

def test_ldm_map_every_tsv_row_both_directions(sd15_meta: UNet2DConditionModel) -> None:
    header = reference_file("sd15_ldm_key_map.tsv").read_text().splitlines()[0]
    assert header.startswith("# component\tdiffusers_name\tldm_single_file_name")
    rows = ldm_rows()
    assert len(rows) == 686
    shapes = {k: tuple(v.shape) for k, v in sd15_meta.state_dict().items()}
    for diffusers_name, ldm_name, ldm_shape in rows:
        assert unet_to_ldm(diffusers_name) == ldm_name, diffusers_name
        assert unet_from_ldm(ldm_name) == diffusers_name, ldm_name
        assert shapes[diffusers_name] == ldm_shape, diffusers_name  # no reshape in either direction
    assert {r[0] for r in rows} == set(shapes)


def test_ldm_map_is_derived_from_the_layout(odd_pair: tuple[nn.Module, UNet2DConditionModel]) -> None:
    """On another layout the map still agrees with diffusers' own single-file converter."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    ref, ours = odd_pair
    sd = ref.state_dict()
    ldm = {LDM_PREFIX + unet_to_ldm(k, ours.config): v for k, v in sd.items()}
    assert len(ldm) == len(sd)
    assert ldm_module_table(ours.config)[0]["up_blocks.1.upsamplers.0.conv"][0] == "output_blocks.5.2.conv"
    back = single_file.convert_ldm_unet_checkpoint(ldm, dict(ref.config))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert {unet_from_ldm(k[len(LDM_PREFIX):], ours.config) for k in ldm} == set(sd)


def test_ldm_map_module_names_for_lora_targets(sd15_meta: UNet2DConditionModel) -> None:
    examples = {
        "down_blocks.0.resnets.0": "input_blocks.1.0",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
        "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k": "input_blocks.8.1.transformer_blocks.0.attn2.to_k",
        "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0":
            "input_blocks.8.1.transformer_blocks.0.attn1.to_out.0",
        "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.2.upsamplers.0.conv": "output_blocks.8.2.conv",
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj":
            "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj",
        "up_blocks.3.attentions.2": "output_blocks.11.1",
        "time_embedding.linear_2": "time_embed.2",
        "conv_out": "out.2",
    }
    for ours, ldm in examples.items():
        assert unet_to_ldm(ours) == ldm and unet_from_ldm(ldm) == ours
    # every module holding weights (every LoRA target candidate) maps and maps back
    n = 0
    for name, mod in sd15_meta.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            assert unet_from_ldm(unet_to_ldm(name)) == name
            n += 1
    assert n == (686 - 96) // 2 + 96  # weight+bias modules, plus 16 transformers x 6 bias-free q/k/v


@pytest.mark.parametrize("bad", ["down_blocks.0", "down_blocks.0.resnets.0.in_layers.0.weight",
                                 "down_blocks.0.attentions.0.transformer_blocks.0.weight",
                                 "down_blocks.3.attentions.0.norm.weight", "down_blocks.3.downsamplers.0.conv.weight",
                                 "input_blocks.0.0.weight", "unet.conv_in.weight", "conv_in.scale", ""])
def test_ldm_map_unknown_diffusers_name_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="not a known SD UNet diffusers"):
        unet_to_ldm(bad)


@pytest.mark.parametrize("bad", ["input_blocks.1", "input_blocks.1.0.norm1.weight",
                                 "input_blocks.1.1.transformer_blocks.0.weight", "input_blocks.10.1.norm.weight",
                                 "input_blocks.12.0.op.weight", "model.diffusion_model.input_blocks.0.0.weight",
                                 "conv_in.weight", "out.1.weight", ""])
def test_ldm_map_unknown_ldm_name_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="not a known SD UNet LDM"):
        unet_from_ldm(bad)


# -- units, seams, construction --------------------------------------------------------------------

def test_units_cover_resnets_and_transformers_in_forward_order(sd15_meta: UNet2DConditionModel) -> None:
    units = sd15_meta.units()
    assert len(units) == 38 and len({id(u) for u in units}) == 38
    every = [m for m in sd15_meta.modules() if isinstance(m, (ResnetBlock2D, Transformer2DModel))]
    assert {id(m) for m in every} == {id(u) for u in units}
    names = {id(m): n for n, m in sd15_meta.named_modules()}
    order = [names[id(u)] for u in units]
    assert order[:5] == ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0", "down_blocks.0.resnets.1",
                         "down_blocks.0.attentions.1", "down_blocks.1.resnets.0"]
    assert order[14:17] == ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
    assert order[-2:] == ["up_blocks.3.resnets.2", "up_blocks.3.attentions.2"]
    in_units = sum(p.numel() for u in units for p in u.parameters())
    assert 0.9 < in_units / SD15_PARAMS < 1.0  # the root keeps only the small remainder


def test_units_checkpointed_give_same_gradients() -> None:
    from lora_core.distributed.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    model = UNet2DConditionModel(TINY)
    randomize_(model, seed=8)
    x, ctx = inputs(TINY, seed=9)
    t = torch.tensor([100, 900])

    def grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(x, t, ctx).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    keys = list(model.state_dict())
    plain = grads()
    apply_activation_checkpointing(model.units())
    wrapped = grads()
    assert list(model.state_dict()) == keys  # names unchanged by checkpointing
    for a, b in zip(plain, wrapped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_attention_goes_through_the_seam(monkeypatch: pytest.MonkeyPatch) -> None:
    model = UNet2DConditionModel(TINY)
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
        calls.append((tuple(q.shape), tuple(k.shape)))
        return attention_mod.attention(q, k, v, **kw)

    for m in model.modules():
        if isinstance(m, Attention):
            assert m.attn_op is attention_mod.attention
            m.attn_op = spy
    x, ctx = inputs(TINY, seed=10, b=1)
    with torch.no_grad():
        model(x, 5, ctx)
    # 4 transformers (down 1, mid 1, up 2) x (self, cross); q/k/v arrive as [B, L, NH, D]
    assert len(calls) == 8
    assert calls[0] == ((1, 256, 2, 16), (1, 256, 2, 16)) and calls[1] == ((1, 256, 2, 16), (1, 7, 2, 16))
    assert calls[2] == ((1, 64, 2, 32), (1, 64, 2, 32))  # mid block at 8 x 8, width 64
    assert attention_mod.last_backend() == "sdpa"


def test_timestep_forms_agree() -> None:
    model = UNet2DConditionModel(TINY).eval()
    x, ctx = inputs(TINY, seed=11)
    with torch.no_grad():
        outs = [model(x, t, ctx) for t in (500, torch.tensor(500), torch.tensor([500]), torch.tensor([500, 500]),
                                           500.0)]
        other = model(x, torch.tensor([500, 20]), ctx)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    assert rel_err(other[0], outs[0][0]) <= 1e-6  # per-sample timesteps: sample 0 unchanged
    assert rel_err(other[1], outs[0][1]) > 1e-3  # timesteps matter


def test_meta_build_then_init_weights() -> None:
    with torch.device("meta"):
        model = UNet2DConditionModel(TINY)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.conv_norm_out.weight, torch.ones(32))
    assert torch.equal(model.mid_block.attentions[0].transformer_blocks[0].norm1.bias, torch.zeros(64))
    x, ctx = inputs(TINY, seed=12)
    out = model(x, torch.tensor([1, 999]), ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_user_errors_are_value_errors() -> None:
    model = UNet2DConditionModel(TINY)
    x, ctx = inputs(TINY, seed=13)
    with pytest.raises(ValueError, match="in_channels=4"):
        model(x[:, :3], 1, ctx)
    with pytest.raises(ValueError, match=r"\[2, Lc, 32\]"):
        model(x, 1, ctx[..., :16])
    with pytest.raises(ValueError, match=r"\[2, Lc, 32\]"):
        model(x, 1, ctx[:1])
    with pytest.raises(ValueError, match="timestep has shape"):
        model(x, torch.tensor([1, 2, 3]), ctx)
    shapes, mid = skip_shapes(TINY, 2, (16, 16))
    with pytest.raises(ValueError, match="pass both or neither"):
        model(x, 1, ctx, mid_block_additional_residual=torch.zeros(mid))
    with pytest.raises(ValueError, match="has 3 tensors; this UNet has 4 skips"):
        model(x, 1, ctx, down_block_additional_residuals=tuple(torch.zeros(s) for s in shapes[:3]),
              mid_block_additional_residual=torch.zeros(mid))
    with pytest.raises(ValueError, match="not divisible by norm_num_groups"):
        UNetConfig(block_out_channels=(320, 644, 1280, 1280))
    with pytest.raises(ValueError, match="attention heads"):
        UNetConfig(attention_head_dim=7)
    with pytest.raises(ValueError, match="gives head counts for 2 levels"):
        UNetConfig(attention_head_dim=(8, 8))
    with pytest.raises(ValueError, match="'SimpleCrossAttnDownBlock2D'"):
        UNetConfig(down_block_types=("SimpleCrossAttnDownBlock2D",) * 4)
    with pytest.raises(ValueError, match="3 up_block_types"):
        UNetConfig(up_block_types=("UpBlock2D",) * 3)
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        UNetConfig.from_diffusers({"class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="'motion_max_seq_length' is unknown"):
        UNetConfig.from_diffusers({"motion_max_seq_length": 32})
