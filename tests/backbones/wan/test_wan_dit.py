"""Wan DiT: parity with diffusers, exact checkpoint layout, key map, sequence-parallel seam.

Shapes: B batch, N patch tokens; the tiny preset runs latents [2, 16, 3, 8, 8] (N = 3*4*4 = 48).
"""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from backbones.attention import attention
from backbones.wan.dit import DIT_PRESETS, WanDiT, WanDiTConfig
from backbones.wan.keymap import convert_state_dict, dit_from_diffusers, dit_to_diffusers
from tests.oracle import ThreadSP

KEYS_FILE = Path(__file__).with_name("wan_dit_keys.txt")
TINY = DIT_PRESETS["tiny"]
PARAMS_5B = 4_999_787_712


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize_(model: nn.Module, seed: int) -> None:
    """Random values for every parameter, including the zero/one-initialised ones (tables, norms, head)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "scale_shift_table" not in name and "modulation" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def tiny_inputs(seed: int = 0, b: int = 2, lat: tuple[int, int, int] = (3, 8, 8),
                lc: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, TINY.in_dim, *lat, generator=g)
    ctx = torch.randn(b, lc, TINY.text_dim, generator=g)
    return x, ctx


def token_timesteps(b: int, n_per_frame: int, n_frames: int, t: list[float]) -> torch.Tensor:
    """TI2V-style per-token timesteps [B, N]: first latent frame 0 (conditioning image), the rest t[b]."""
    ts = torch.tensor(t, dtype=torch.float32)[:, None].expand(b, n_per_frame * n_frames).clone()
    ts[:, :n_per_frame] = 0.0
    return ts


@pytest.fixture(scope="module")
def tiny_model() -> WanDiT:
    torch.manual_seed(0)
    model = WanDiT(TINY).eval()
    randomize_(model, seed=1)
    return model


# -- parity with diffusers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_pair() -> tuple[nn.Module, WanDiT]:
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference oracle (test extra)")
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024).eval()
    randomize_(ref, seed=2)
    ours = WanDiT(TINY).eval()
    ours.load_state_dict(convert_state_dict(ref.state_dict(), to="upstream"), strict=True)
    return ref, ours


def _timestep_embedding_fp64(timesteps: torch.Tensor, embedding_dim: int, flip_sin_to_cos: bool = False,
                             downscale_freq_shift: float = 1, scale: float = 1, max_period: int = 10000) -> torch.Tensor:
    """diffusers' Timesteps features computed in float64 like upstream (diffusers uses fp32)."""
    assert flip_sin_to_cos and downscale_freq_shift == 0 and scale == 1 and embedding_dim % 2 == 0
    half = embedding_dim // 2
    freqs = torch.pow(float(max_period), -torch.arange(half, dtype=torch.float64) / half)
    phase = timesteps.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1).float()


def _diffusers_forward(ref: nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    # The diffusers pipeline zero-pads prompt embeddings to 512 before the model; ours pads inside.
    ctx512 = torch.nn.functional.pad(ctx, (0, 0, 0, TINY.text_len - ctx.shape[1]))
    return ref(x, t, ctx512, return_dict=False)[0]


def _check_parity(ref: nn.Module, ours: WanDiT, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                  monkeypatch: pytest.MonkeyPatch, label: str) -> None:
    """Contract: <= 1e-5 against stock diffusers. Its fp32 timestep sinusoid (phase error ~1e-4 rad at
    t ~ 1000) dominates that gap, so with the oracle on upstream's float64 sinusoid the bound is 2e-6."""
    from diffusers.models import embeddings

    with torch.no_grad():
        got = ours(x, t, ctx)
        stock = _diffusers_forward(ref, x, t, ctx)
        monkeypatch.setattr(embeddings, "get_timestep_embedding", _timestep_embedding_fp64)
        fp64 = _diffusers_forward(ref, x, t, ctx)
    assert got.shape == stock.shape == x.shape and got.dtype == torch.float32
    err_stock, err_fp64 = rel_err(got, stock), rel_err(got, fp64)
    print(f"max rel err ({label}): vs stock diffusers {err_stock:.2e}, vs fp64-sinusoid diffusers {err_fp64:.2e}")
    assert err_stock <= 1e-5
    assert err_fp64 <= 2e-6


def test_parity_diffusers_scalar_timesteps(diffusers_pair: tuple[nn.Module, WanDiT],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    x, ctx = tiny_inputs(seed=3)
    _check_parity(*diffusers_pair, x, torch.tensor([999.0, 437.0]), ctx, monkeypatch, "1-D t, B=2")


def test_parity_diffusers_per_token_timesteps(diffusers_pair: tuple[nn.Module, WanDiT],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    x, ctx = tiny_inputs(seed=4, lc=7)
    t = token_timesteps(2, 16, 3, [999.0, 250.0])  # [B, N], diffusers' Wan2.2 TI2V path (timestep.ndim == 2)
    _check_parity(*diffusers_pair, x, t, ctx, monkeypatch, "[B, N] t")


# -- checkpoint layout -----------------------------------------------------------------------------

def _reference_keys() -> list[tuple[str, list[int]]]:
    rows = []
    for line in KEYS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split(" ", 1)
            rows.append((name, list(ast.literal_eval(shape))))
    return rows


def test_5b_meta_matches_checkpoint_layout() -> None:
    with torch.device("meta"):
        model = WanDiT(DIT_PRESETS["5b"])
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    want = _reference_keys()
    assert len(want) == 825
    assert got == want  # same names, shapes and order
    assert sum(p.numel() for p in model.parameters()) == PARAMS_5B
    assert not list(model.buffers())  # RoPE must not be state


# -- key map ---------------------------------------------------------------------------------------

def test_keymap_round_trip_and_matches_diffusers_5b() -> None:
    keys = [k for k, _ in _reference_keys()]
    theirs = [dit_to_diffusers(k) for k in keys]
    assert len(set(theirs)) == 825
    assert [dit_from_diffusers(k) for k in theirs] == keys
    diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference oracle (test extra)")
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
            out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    ref_shapes = {k: list(v.shape) for k, v in ref.state_dict().items()}
    assert {dit_to_diffusers(k): s for k, s in _reference_keys()} == ref_shapes


def test_keymap_module_names_for_lora_targets(diffusers_pair: tuple[nn.Module, WanDiT]) -> None:
    ref, ours = diffusers_pair
    examples = {
        "blocks.0.self_attn.q": "blocks.0.attn1.to_q",
        "blocks.1.self_attn.o": "blocks.1.attn1.to_out.0",
        "blocks.0.cross_attn.v": "blocks.0.attn2.to_v",
        "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj",
        "blocks.0.ffn.2": "blocks.0.ffn.net.2",
        "blocks.0.norm3": "blocks.0.norm2",
        "blocks.0.norm2": "blocks.0.norm3",
        "head.head": "proj_out",
        "head.norm": "norm_out",
        "time_projection.1": "condition_embedder.time_proj",
        "text_embedding.0": "condition_embedder.text_embedder.linear_1",
        "blocks.3.modulation": "blocks.3.scale_shift_table",
        "head.modulation": "scale_shift_table",
    }
    for up, df in examples.items():
        assert dit_to_diffusers(up) == df and dit_from_diffusers(df) == up
    # Every module holding parameters (every LoRA target candidate) maps onto a same-shaped diffusers one.
    their_modules, their_params = dict(ref.named_modules()), dict(ref.named_parameters())
    n_linear = 0
    for name, mod in ours.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv3d)):
            assert type(their_modules[dit_to_diffusers(name)]) is type(mod), name
            n_linear += 1
        for pname, p in mod.named_parameters(recurse=False):
            assert their_params[dit_to_diffusers(f"{name}.{pname}")].shape == p.shape
    assert n_linear == 1 + 2 + 2 + 1 + 1 + TINY.num_layers * 10


@pytest.mark.parametrize("bad", ["blocks.0.ffn.1", "blocks.0.modulation.weight", "scale_shift_table.weight",
                                 "transformer.blocks.0.attn1.to_q", "head.weight", "blocks.x.ffn.0", ""])
def test_keymap_unknown_name_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="not a known Wan DiT"):
        dit_to_diffusers(bad)
    with pytest.raises(ValueError, match="not a known Wan DiT"):
        dit_from_diffusers(bad)


def test_keymap_parameter_free_norms_take_no_weight() -> None:
    # The swap: upstream norm2 and diffusers norm3 are the parameter-free FFN pre-norms.
    with pytest.raises(ValueError, match="not a known Wan DiT upstream"):
        dit_to_diffusers("blocks.0.norm2.weight")
    with pytest.raises(ValueError, match="not a known Wan DiT diffusers"):
        dit_from_diffusers("blocks.0.norm3.weight")


def test_convert_state_dict_rejects_bad_target() -> None:
    with pytest.raises(ValueError, match="expected 'diffusers' or 'upstream'"):
        convert_state_dict({}, to="comfy")  # type: ignore[arg-type]


# -- batching and padding --------------------------------------------------------------------------

@pytest.mark.parametrize("per_token", [False, True])
def test_batch_equals_one_by_one(tiny_model: WanDiT, per_token: bool) -> None:
    x, ctx = tiny_inputs(seed=5, b=3)
    ctx[1, 12:] = 0  # shorter prompt for one sample: zero rows == fewer rows
    t = token_timesteps(3, 16, 3, [999.0, 500.0, 3.0]) if per_token else torch.tensor([999.0, 500.0, 3.0])
    with torch.no_grad():
        batched = tiny_model(x, t, ctx)
        single = [tiny_model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1, :12] if i == 1 else ctx[i:i + 1])
                  for i in range(3)]
    for i in range(3):
        assert rel_err(batched[i:i + 1], single[i]) <= 1e-5
    assert rel_err(single[0], single[2]) > 1e-2  # timesteps do matter


def test_scalar_t_equals_constant_per_token_t(tiny_model: WanDiT) -> None:
    x, ctx = tiny_inputs(seed=6)
    t = torch.tensor([700.0, 20.0])
    with torch.no_grad():
        a = tiny_model(x, t, ctx)
        b = tiny_model(x, t[:, None].expand(2, 48), ctx)
    assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("per_token", [False, True])
def test_padding_is_invisible(tiny_model: WanDiT, per_token: bool) -> None:
    x, ctx = tiny_inputs(seed=7)
    t = token_timesteps(2, 16, 3, [900.0, 100.0]) if per_token else torch.tensor([900.0, 100.0])
    with torch.no_grad():
        plain = tiny_model(x, t, ctx)
        padded = tiny_model(x, t, ctx, seq_len=61)
        if per_token:  # upstream style: timesteps already padded to seq_len
            padded_t = tiny_model(x, torch.cat([t, t[:, -1:].expand(2, 13)], 1), ctx, seq_len=61)
            assert rel_err(padded_t, plain) <= 1e-5
    assert rel_err(padded, plain) <= 1e-5


def test_k_lens_passed_only_with_padding(tiny_model: WanDiT) -> None:
    seen: list[torch.Tensor | None] = []

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k_lens: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(k_lens)
        return attention(q, k, v, k_lens=k_lens)

    x, ctx = tiny_inputs(seed=8)
    t = torch.tensor([1.0, 2.0])
    attn = tiny_model.blocks[0].self_attn
    attn.attn_op = spy
    try:
        with torch.no_grad():
            tiny_model(x, t, ctx)
            tiny_model(x, t, ctx, seq_len=50)
    finally:
        attn.attn_op = attention
    assert seen[0] is None
    assert seen[1] is not None and seen[1].tolist() == [48, 48]


# -- sequence-parallel seam ------------------------------------------------------------------------

class IdentitySP:
    size, rank = 1, 0

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return x


def test_sp_size_one_equals_plain(tiny_model: WanDiT) -> None:
    x, ctx = tiny_inputs(seed=9)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        plain = tiny_model(x, t, ctx)
        tiny_model.sp = IdentitySP()
        try:
            wrapped = tiny_model(x, t, ctx)
            wrapped_padded = tiny_model(x, t, ctx, seq_len=64)
        finally:
            tiny_model.sp = None
    assert torch.equal(wrapped, plain)
    assert rel_err(wrapped_padded, plain) <= 1e-5


@pytest.mark.parametrize("size,per_token,seq_len", [(2, True, None), (4, True, None), (2, False, 49), (3, True, 50)])
def test_sp_ranks_reassemble_plain_forward(tiny_model: WanDiT, size: int, per_token: bool,
                                           seq_len: int | None) -> None:
    # Grid 3 x 3 x 5 = 45 tokens: odd, so size 2 and 4 pad (1 and 3 identity-RoPE tokens).
    x, ctx = tiny_inputs(seed=10, lat=(3, 6, 10))
    t = token_timesteps(2, 15, 3, [950.0, 40.0]) if per_token else torch.tensor([950.0, 40.0])
    with torch.no_grad():
        plain = tiny_model(x, t, ctx)
    outs = ThreadSP(size).run(tiny_model, x, t, ctx, seq_len=seq_len)
    for out in outs:
        assert out.shape == plain.shape
        assert rel_err(out, plain) <= 1e-5


def test_sp_wrong_rope_slice_would_be_caught(tiny_model: WanDiT, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard for the test above: if every rank used rank 0's RoPE rows, the comparison must fail."""
    x, ctx = tiny_inputs(seed=10, lat=(3, 6, 10))
    t = torch.tensor([950.0, 40.0])
    with torch.no_grad():
        plain = tiny_model(x, t, ctx)
    original = WanDiT.rope_for_grid

    def rank0_rows(self: WanDiT, grid: tuple[int, int, int], total_len: int, device: torch.device) -> torch.Tensor:
        rope = original(self, grid, total_len, device)
        return rope[: total_len // self.sp.size].repeat(self.sp.size, 1, 1)

    monkeypatch.setattr(WanDiT, "rope_for_grid", rank0_rows)
    outs = ThreadSP(2).run(tiny_model, x, t, ctx)
    assert rel_err(outs[0], plain) > 1e-3


def test_sp_bad_rank_raises(tiny_model: WanDiT) -> None:
    class Bad(IdentitySP):
        size, rank = 2, 2

    x, ctx = tiny_inputs(seed=11)
    tiny_model.sp = Bad()
    try:
        with pytest.raises(ValueError, match="rank"):
            tiny_model(x, torch.tensor([1.0, 2.0]), ctx)
    finally:
        tiny_model.sp = None


# -- precision, checkpointing, construction, input errors ------------------------------------------

def test_bf16_autocast_keeps_fp32_islands(tiny_model: WanDiT) -> None:
    dtypes: dict[str, torch.dtype] = {}
    hooks = [
        tiny_model.time_projection.register_forward_hook(lambda m, i, o: dtypes.__setitem__("e0", o.dtype)),
        tiny_model.head.head.register_forward_hook(lambda m, i, o: dtypes.__setitem__("head", o.dtype)),
        tiny_model.blocks[0].ffn[0].register_forward_hook(lambda m, i, o: dtypes.__setitem__("ffn", o.dtype)),
        tiny_model.blocks[1].register_forward_hook(lambda m, i, o: dtypes.__setitem__("resid", o.dtype)),
    ]
    x, ctx = tiny_inputs(seed=12)
    t = torch.tensor([500.0, 10.0])
    try:
        with torch.no_grad():
            ref = tiny_model(x, t, ctx)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = tiny_model(x, t, ctx)
    finally:
        for h in hooks:
            h.remove()
    assert dtypes == {"e0": torch.float32, "head": torch.float32, "ffn": torch.bfloat16, "resid": torch.float32}
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 5e-2


def test_blocks_can_be_checkpointed_from_outside(tiny_model: WanDiT) -> None:
    class Checkpointed(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor | None) -> torch.Tensor:
            return checkpoint(self.inner, *args, use_reentrant=False)

    x, ctx = tiny_inputs(seed=13)
    t = token_timesteps(2, 16, 3, [600.0, 30.0])

    def grads() -> list[torch.Tensor]:
        tiny_model.zero_grad(set_to_none=True)
        tiny_model(x, t, ctx, seq_len=50).square().mean().backward()
        return [p.grad.clone() for p in tiny_model.parameters()]

    plain = grads()
    original = tiny_model.blocks
    tiny_model.blocks = nn.ModuleList([Checkpointed(b) for b in original])
    try:
        wrapped = grads()
    finally:
        tiny_model.blocks = original
        tiny_model.zero_grad(set_to_none=True)
    for a, b in zip(plain, wrapped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_meta_build_then_init_weights() -> None:
    with torch.device("meta"):
        model = WanDiT(TINY)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.blocks[0].self_attn.norm_q.weight, torch.ones(TINY.dim))
    assert torch.equal(model.blocks[0].norm3.bias, torch.zeros(TINY.dim))
    assert not model.head.head.weight.any()
    assert model.blocks[0].modulation.std().item() == pytest.approx(TINY.dim ** -0.5, rel=0.2)
    x, ctx = tiny_inputs(seed=14)
    out = model(x, torch.tensor([1.0, 999.0]), ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_rope_table_matches_axis_split() -> None:
    model = WanDiT(DIT_PRESETS["tiny"])
    assert model._rope_axes() == (24, 20, 20)  # head dim 64
    with torch.device("meta"):
        big = WanDiT(DIT_PRESETS["5b"])
    assert big._rope_axes() == (44, 42, 42)  # head dim 128
    rope = model.rope_for_grid((2, 3, 4), 26, torch.device("cpu"))
    assert rope.dtype == torch.float64 and rope.shape == (26, 32, 2)
    # token (fi=1, hi=2, wi=3): t-axis pairs rotate by angle 1 * inv_freq_t, etc.
    tok = (1 * 3 + 2) * 4 + 3
    inv_t = 1.0 / 10000 ** (torch.arange(0, 24, 2, dtype=torch.float64) / 24)
    inv_h = 1.0 / 10000 ** (torch.arange(0, 20, 2, dtype=torch.float64) / 20)
    angles = torch.cat([1 * inv_t, 2 * inv_h, 3 * inv_h])
    torch.testing.assert_close(rope[tok, :, 0], torch.cos(angles), rtol=0, atol=1e-15)
    torch.testing.assert_close(rope[tok, :, 1], torch.sin(angles), rtol=0, atol=1e-15)
    assert torch.equal(rope[24:, :, 0], torch.ones(2, 32)) and not rope[24:, :, 1].any()


def test_user_errors_are_value_errors(tiny_model: WanDiT) -> None:
    x, ctx = tiny_inputs(seed=15)
    t = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="in_dim"):
        tiny_model(x[:, :8], t, ctx)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        tiny_model(x[..., :7], t, ctx)
    with pytest.raises(ValueError, match="text_len"):
        tiny_model(x, t, torch.zeros(2, 513, TINY.text_dim))
    with pytest.raises(ValueError, match="seq_len=10"):
        tiny_model(x, t, ctx, seq_len=10)
    with pytest.raises(ValueError, match="per-token timesteps"):
        tiny_model(x, torch.zeros(2, 47), ctx)
    with pytest.raises(ValueError, match="num_heads"):
        WanDiTConfig(dim=130, num_heads=4)


# -- activation memory: what autograd keeps, and that the custom backward passes match autograd -----

def _saved(fn) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Tensors autograd keeps for backward during fn() (each storage once), and fn()'s output."""
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return list(seen.values()), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_function_matches_autograd(dtype: torch.dtype) -> None:
    from backbones.wan.dit import WanRMSNorm

    g = torch.Generator().manual_seed(20)
    norm = WanRMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(64, generator=g))
    x = torch.randn(2, 5, 64, generator=g).to(dtype).requires_grad_(True)
    gy = torch.randn(2, 5, 64, generator=g)

    def plain(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + norm.eps)).type_as(x) * norm.weight

    ref = plain(x)
    want = torch.autograd.grad(ref, (x, norm.weight), gy)
    saved, got = _saved(lambda: norm(x))
    assert torch.equal(got, ref)  # same forward ops, bit for bit
    have = torch.autograd.grad(got, (x, norm.weight), gy)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(have, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    # kept: x in its own dtype, the fp32 inverse RMS [..., 1] and the weight; no fp32 copy of x
    assert sorted(t.numel() for t in saved) == [10, 64, 640]
    assert all(t.dtype == dtype for t in saved if t.numel() == 640)


@pytest.mark.parametrize("per_token", [False, True])
def test_modulated_layer_norm_matches_autograd(per_token: bool) -> None:
    from backbones.wan.dit import WanLayerNorm

    g = torch.Generator().manual_seed(21)
    plain_norm = WanLayerNorm(64, 1e-6, elementwise_affine=False)
    affine = WanLayerNorm(64, 1e-6, elementwise_affine=True)
    with torch.no_grad():
        affine.weight.copy_(1 + 0.2 * torch.randn(64, generator=g))
        affine.bias.copy_(0.2 * torch.randn(64, generator=g))
    x = (3 + torch.randn(2, 7, 64, generator=g)).requires_grad_(True)
    lt = 7 if per_token else 1
    scale = (0.3 * torch.randn(2, lt, 64, generator=g)).requires_grad_(True)
    shift = (0.3 * torch.randn(2, lt, 64, generator=g)).requires_grad_(True)
    gy = torch.randn(2, 7, 64, generator=g)

    ref = plain_norm(x) * (1 + scale) + shift
    want = torch.autograd.grad(ref, (x, scale, shift), gy)
    got = plain_norm.modulate(x, scale, shift, torch.float32)
    assert torch.equal(got, ref)
    for a, b in zip(torch.autograd.grad(got, (x, scale, shift), gy), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    ref = affine(x)
    want = torch.autograd.grad(ref, (x, affine.weight, affine.bias), gy)
    got = affine.modulate(x, None, None, torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, (x, affine.weight, affine.bias), gy), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved, out = _saved(lambda: plain_norm.modulate(x, scale.detach(), shift.detach(), torch.bfloat16))
    assert out.dtype == torch.bfloat16
    big = [t.dtype for t in saved if t.numel() == x.numel()]
    # the normalised x in bf16, not fp32 copies of x; per-token modulation keeps its fp32 1 + scale
    assert sorted(big, key=str) == [torch.bfloat16] + [torch.float32] * per_token


def _lora_tiny(seed: int = 0) -> WanDiT:
    from lora_core.inject import inject_lora, lora_parameters

    torch.manual_seed(seed)
    model = WanDiT(TINY).train()
    randomize_(model, seed=1)
    inject_lora(model, ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
                        "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"], rank=4, alpha=4)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_bf16_training_keeps_no_fp32_token_activations_in_blocks() -> None:
    """Under bf16 autocast the blocks keep compute-dtype activations only (fp32 is for [..., 1] stats,
    modulation and parameters): no fp32 copies of the residual stream or of the q/k norms' inputs."""
    model = _lora_tiny()
    _, ctx = tiny_inputs(seed=23)
    block = model.blocks[0]
    with torch.no_grad():
        grid = (3, 4, 4)
        rope = model.rope_for_grid(grid, 48, torch.device("cpu")).float()
        e0 = torch.randn(2, 1, 6, TINY.dim)
        h = torch.randn(2, 48, TINY.dim)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            context = model.text_embedding(torch.nn.functional.pad(ctx, (0, 0, 0, TINY.text_len - 20)))
    h.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved, out = _saved(lambda: block(h, e0, context, rope, None))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    fp32_acts = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.numel() >= 48 * TINY.dim
                 and t.untyped_storage().data_ptr() not in params]
    assert out.dtype == torch.float32
    assert fp32_acts == []
