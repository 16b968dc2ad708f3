"""CogVideoX transformer: exact checkpoint layout, parity with diffusers for the three positional schemes,
the sequence-parallel seam.

Shapes: B batch, F latent frames, N video tokens; the tiny preset's sample grid is 2 x 4 x 6 (latents
[B, 2, 16, 8, 12], N = 48) with 226 text tokens.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from backbones.cogvideox.transformer import (TRANSFORMER_PRESETS, CogVideoXConfig, CogVideoXTransformer3DModel,
                                             rotary_pos_embed_3d)
from tests.oracle import ThreadSP
from tests.oracle import randomize_ as _randomize_params

REFERENCE = Path(__file__).parent  # copies of ../shared/reference key lists
TINY = TRANSFORMER_PRESETS["tiny"]
TINY_ROPE = dataclasses.replace(TINY, use_rotary_positional_embeddings=True)
TINY_I2V = dataclasses.replace(TINY_ROPE, in_channels=32, use_learned_positional_embeddings=True)
# cogvideox.md §2.3, counted from diffusers 0.42.1 models built on the meta device.
PARAMS = {"2b": 1_693_783_872, "5b": 5_570_283_072, "5b-i2v": 5_570_479_680}
I2V_TABLE_NUMEL = 54_607_872


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize_(model: nn.Module, seed: int) -> None:
    """Every parameter (tests.oracle) and the learned table; the 2B's computed table (not stored) stays."""
    _randomize_params(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        stored = model.state_dict()
        for name, buf in model.named_buffers():
            if name in stored:
                buf.copy_(0.5 * torch.randn(buf.shape, generator=g))


def tiny_inputs(cfg: CogVideoXConfig, seed: int, b: int = 2, grid: tuple[int, int, int] = (2, 4, 6)
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f, h, w = grid
    x = torch.randn(b, f, cfg.in_channels, h * cfg.patch_size, w * cfg.patch_size, generator=g)
    ctx = torch.randn(b, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    t = torch.tensor([999, 437, 12, 600][:b])
    return x, ctx, t


def _diffusers_kwargs(cfg: CogVideoXConfig) -> dict[str, object]:
    return dict(num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, time_embed_dim=cfg.time_embed_dim,
                text_embed_dim=cfg.text_embed_dim, num_layers=cfg.num_layers, sample_width=cfg.sample_width,
                sample_height=cfg.sample_height, sample_frames=cfg.sample_frames, patch_size=cfg.patch_size,
                max_text_seq_length=cfg.max_text_seq_length,
                use_rotary_positional_embeddings=cfg.use_rotary_positional_embeddings,
                use_learned_positional_embeddings=cfg.use_learned_positional_embeddings)


def _pair(cfg: CogVideoXConfig, seed: int) -> tuple[nn.Module, CogVideoXTransformer3DModel]:
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference oracle (test extra)")
    ref = diffusers.CogVideoXTransformer3DModel(**_diffusers_kwargs(cfg)).eval()
    randomize_(ref, seed)
    ours = CogVideoXTransformer3DModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names, no key map
    return ref, ours


def _diffusers_rotary(cfg: CogVideoXConfig, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not cfg.use_rotary_positional_embeddings:
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    f, h, w = grid
    return get_3d_rotary_pos_embed(cfg.attention_head_dim, None, (h, w), f, grid_type="slice", max_size=(h, w))


# -- checkpoint layout -----------------------------------------------------------------------------

def _reference_keys(preset: str) -> list[tuple[str, list[int]]]:
    path = REFERENCE / f"cogvideox_{preset.replace('-', '_')}_transformer_keys.txt"
    if not path.exists():
        pytest.skip(f"{path} (the key list dumped from diffusers) is not present")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split(" ", 1)
            rows.append((name, list(ast.literal_eval(shape))))
    return rows


@pytest.mark.parametrize("preset", ["2b", "5b", "5b-i2v"])
def test_meta_model_matches_checkpoint_layout(preset: str) -> None:
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(TRANSFORMER_PRESETS[preset])
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == _reference_keys(preset)  # names, shapes and order
    assert sum(p.numel() for p in model.parameters()) == PARAMS[preset]
    buffers = sum(b.numel() for b in model.buffers())
    assert buffers == (I2V_TABLE_NUMEL if preset == "5b-i2v" else 0)  # the 2B's sin-cos table is never stored


def test_blocks_and_attention_seams() -> None:
    model = CogVideoXTransformer3DModel(TINY)
    assert model.blocks is model.transformer_blocks and len(model.blocks) == TINY.num_layers
    # apply_sequence_parallel wraps every module with an `attn_op` instance attribute
    seams = [m for m in model.modules() if "attn_op" in vars(m)]
    assert seams == [blk.attn1 for blk in model.blocks]


# -- parity with diffusers -------------------------------------------------------------------------

@pytest.mark.parametrize("label,cfg,grid", [
    ("sincos (2B), sample grid", TINY, (2, 4, 6)),
    ("sincos (2B), other grid: table recomputed", TINY, (3, 3, 5)),
    ("RoPE (5B)", TINY_ROPE, (2, 4, 6)),
    ("RoPE (5B), other grid", TINY_ROPE, (3, 3, 5)),
    ("I2V: 32 channels, learned table + RoPE", TINY_I2V, (2, 4, 6)),
    ("I2V, other frame count: upstream swaps in sin-cos", TINY_I2V, (3, 4, 6)),
])
def test_parity_with_diffusers(label: str, cfg: CogVideoXConfig, grid: tuple[int, int, int]) -> None:
    ref, ours = _pair(cfg, seed=len(label))
    x, ctx, t = tiny_inputs(cfg, seed=3, grid=grid)
    with torch.no_grad():
        got = ours(x, ctx, t)
        want = ref(x, ctx, t, image_rotary_emb=_diffusers_rotary(cfg, grid), return_dict=False)[0]
    assert got.shape == want.shape == (2, grid[0], cfg.out_channels, *x.shape[-2:])
    err = rel_err(got, want)
    print(f"max rel err {label}: {err:.2e}")
    assert err <= 1e-5


def test_parity_would_catch_a_wrong_position_scheme() -> None:
    """Guard for the test above: the same weights without RoPE must differ clearly from diffusers with it."""
    ref, ours = _pair(TINY_ROPE, seed=5)
    x, ctx, t = tiny_inputs(TINY_ROPE, seed=6)
    no_rope = CogVideoXTransformer3DModel(TINY).eval()
    no_rope.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        want = ref(x, ctx, t, image_rotary_emb=_diffusers_rotary(TINY_ROPE, (2, 4, 6)), return_dict=False)[0]
        assert rel_err(no_rope(x, ctx, t), want) > 1e-2


def test_rope_equals_pipeline_linspace_grid_at_training_size() -> None:
    """The pipeline's "linspace" positions at the sample size are the integers our table uses."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    f, h, w = 13, 30, 45  # 49 x 480 x 720
    cos, sin = rotary_pos_embed_3d(64, (f, h, w))
    ref_cos, ref_sin = get_3d_rotary_pos_embed(64, ((0, 0), (h, w)), (h, w), f, grid_type="linspace")
    assert cos.shape == (f * h * w, 64)
    assert torch.allclose(cos, ref_cos, atol=1e-5) and torch.allclose(sin, ref_sin, atol=1e-5)


def test_i2v_learned_table_text_rows_are_added() -> None:
    """The learned table covers text positions too (unlike the sin-cos one): zeroing them must matter."""
    model = CogVideoXTransformer3DModel(TINY_I2V).eval()
    randomize_(model, seed=10)
    x, ctx, t = tiny_inputs(TINY_I2V, seed=11)
    with torch.no_grad():
        full = model(x, ctx, t)
        model.patch_embed.pos_embedding[:, :TINY_I2V.max_text_seq_length] = 0
        assert rel_err(model(x, ctx, t), full) > 1e-3


# -- precision, checkpointing ----------------------------------------------------------------------

def test_bf16_autocast_computes_in_bf16_with_fp32_rope() -> None:
    model = CogVideoXTransformer3DModel(TINY_ROPE).eval()
    randomize_(model, seed=15)
    seen: dict[str, torch.dtype] = {}
    hooks = [model.blocks[0].attn1.to_q.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o.dtype)),
             model.blocks[0].attn1.norm_q.register_forward_pre_hook(
                 lambda m, i: seen.__setitem__("norm_in", i[0].dtype))]
    x, ctx, t = tiny_inputs(TINY_ROPE, seed=16)
    try:
        with torch.no_grad():
            ref = model(x, ctx, t)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, ctx, t)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"q": torch.bfloat16, "norm_in": torch.bfloat16}
    assert all(tab.dtype == torch.float32 for v in model._table_cache.values() for tab in v)  # RoPE cos/sin
    assert out.dtype == torch.bfloat16 and ref.dtype == torch.float32
    err = rel_err(out.float(), ref)
    print(f"bf16 autocast vs fp32: rel err {err:.2e}")
    assert err < 5e-2


def test_blocks_can_be_checkpointed_from_outside() -> None:
    from torch.distributed._composable import checkpoint  # what parallelize.apply_activation_checkpointing uses

    def grads(model: CogVideoXTransformer3DModel) -> list[torch.Tensor]:
        x, ctx, t = tiny_inputs(TINY_ROPE, seed=17)
        model(x, ctx, t).square().mean().backward()
        return [p.grad for p in model.parameters()]

    plain = CogVideoXTransformer3DModel(TINY_ROPE)
    randomize_(plain, seed=18)
    wrapped = CogVideoXTransformer3DModel(TINY_ROPE)
    wrapped.load_state_dict(plain.state_dict(), strict=True)
    for block in wrapped.blocks:
        checkpoint(block)
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # names survive
    for a, b in zip(grads(wrapped), grads(plain)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


# -- input errors ----------------------------------------------------------------------------------

def test_bad_inputs_raise() -> None:
    model = CogVideoXTransformer3DModel(TINY).eval()
    x, ctx, t = tiny_inputs(TINY, seed=7)
    with pytest.raises(ValueError, match="frames before channels"):
        model(x.transpose(1, 2), ctx, t)
    with pytest.raises(ValueError, match="max_text_seq_length=226"):
        model(x, ctx[:, :100], t)
    with pytest.raises(ValueError, match="expected \\[2\\]"):
        model(x, ctx, t[:1])
    i2v = CogVideoXTransformer3DModel(TINY_I2V).eval()
    xi, ctxi, ti = tiny_inputs(TINY_I2V, seed=7, grid=(2, 4, 4))
    with pytest.raises(ValueError, match="training resolution"):
        i2v(xi, ctxi, ti)
    with pytest.raises(ValueError, match="learned"):
        dataclasses.replace(TINY, use_learned_positional_embeddings=True)


# -- sequence-parallel seam ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rope_model() -> CogVideoXTransformer3DModel:
    model = CogVideoXTransformer3DModel(TINY_I2V).eval()
    randomize_(model, seed=8)
    return model


# Grid 2 x 4 x 6 = 48 video tokens, 226 text: size 2 pads nothing; 3 pads 2 text tokens; 5 pads 4 text
# and 2 video tokens (moved to the end of the last rank's chunk and masked).
@pytest.mark.parametrize("size", [2, 3, 5])
def test_sp_ranks_reassemble_plain_forward(rope_model: CogVideoXTransformer3DModel, size: int) -> None:
    x, ctx, t = tiny_inputs(TINY_I2V, seed=9)
    with torch.no_grad():
        plain = rope_model(x, ctx, t)
    outs = ThreadSP(size).run(rope_model, x, ctx, t)
    for out in outs:
        assert out.shape == plain.shape
        assert rel_err(out, plain) <= 1e-5


def test_sp_unmoved_padding_would_be_caught(rope_model: CogVideoXTransformer3DModel,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard for the test above: leaving the last rank's padding in place (not at the end) must fail."""
    x, ctx, t = tiny_inputs(TINY_I2V, seed=9)
    with torch.no_grad():
        plain = rope_model(x, ctx, t)
    original = CogVideoXTransformer3DModel.joint_layout

    def unmoved(self: CogVideoXTransformer3DModel, *args: object) -> object:
        layout = original(self, *args)
        layout.order = layout.inverse = None
        return layout

    monkeypatch.setattr(CogVideoXTransformer3DModel, "joint_layout", unmoved)
    outs = ThreadSP(5).run(rope_model, x, ctx, t)
    assert rel_err(outs[-1], plain) > 1e-4


def _ulysses_grad_body(rank: int, world: int) -> None:
    """Real Ulysses (gloo all-to-all) on 2 processes, RoPE model: forward equals a single process, and the SUM
    of the ranks' parameter gradients equals its gradient (text replicated forward, per-chunk backward)."""
    import torch.distributed as dist

    from lora_core import distributed as parallel

    info = parallel.init_distributed(ulysses=world, num_heads=TINY_ROPE.num_attention_heads)
    plain = CogVideoXTransformer3DModel(TINY_ROPE)
    randomize_(plain, seed=12)
    sharded = CogVideoXTransformer3DModel(TINY_ROPE)
    sharded.load_state_dict(plain.state_dict(), strict=True)
    assert parallel.apply_sequence_parallel(sharded, info) == TINY_ROPE.num_layers
    x, ctx, t = tiny_inputs(TINY_ROPE, seed=13, grid=(3, 3, 5))  # 45 tokens: 1 padded, moved and masked
    weight = torch.randn(x.shape[0], x.shape[1], TINY_ROPE.out_channels, *x.shape[-2:],
                         generator=torch.Generator().manual_seed(14))
    outs = {}
    for name, model in (("plain", plain), ("sharded", sharded)):
        out = model(x, ctx, t)
        (out * weight).sum().backward()
        outs[name] = out.detach()
    assert rel_err(outs["sharded"], outs["plain"]) <= 1e-5
    worst = 0.0
    for (name, p), q in zip(plain.named_parameters(), sharded.parameters()):
        g = q.grad.clone()
        dist.all_reduce(g, group=info.sp_group)  # SUM over the Ulysses group
        worst = max(worst, rel_err(g, p.grad))
        assert rel_err(g, p.grad) <= 1e-4, name
        if name == "patch_embed.text_proj.weight":  # one rank alone holds only its chunk's share
            assert rel_err(q.grad, p.grad) > 1e-2
    if rank == 0:
        print(f"ulysses x{world}: worst parameter-gradient rel err {worst:.2e}")


def test_ulysses_gradients_sum_to_single_process() -> None:
    from tests.lora_core.distributed._procs import spawn
    spawn(_ulysses_grad_body, 2)
