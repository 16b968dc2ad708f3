"""LoRA dropout masks as pure functions of (sample seed, layer, global token position, feature).

The layouts the trainer runs (1 process, DDP x2, Ulysses x2) are simulated in one process: a "rank"
is a dropout_scope holding that rank's sample seeds and token shard. The multi-process parity of the
whole model lives in tests/lora_core/distributed.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from lora_core import LoRAConv, LoRALinear, inject_lora, lora_layers
from lora_core import fused

D_IN, D_OUT, RANK, P = 24, 20, 4, 0.3
M64 = (1 << 64) - 1


def _layer(name: str = "blocks.0.self_attn.q", p: float = P, seed: int = 0) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(D_OUT, D_IN, generator=g) / D_IN ** 0.5)
        lin.bias.copy_(torch.randn(D_OUT, generator=g))
    lin.requires_grad_(False)
    layer = LoRALinear.from_linear(lin, RANK, alpha=2.0 * RANK, dropout=p, name=name)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(D_OUT, RANK, generator=g))  # B = 0 would hide the LoRA path
    return layer.train()


def _run(layer: LoRALinear, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, dA, dB) of one forward + backward."""
    y = layer(x)
    da, db = torch.autograd.grad(y, [layer.lora_A, layer.lora_B], dy)
    return y.detach(), da, db


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 sums over different row sets round differently: tolerance relative to the tensor's scale."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def _reference(layer: LoRALinear, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The math in float64 with an explicit keep-mask of x's shape."""
    x64 = x.double()
    xd = x64 * mask.double() / (1 - layer.lora_dropout)
    lora = (xd @ layer.lora_A.detach().double().t()) @ layer.lora_B.detach().double().t()
    return x64 @ layer.weight.double().t() + layer.bias.double() + layer.lora_scale * lora


def _py_mix(v: int) -> int:
    """splitmix64's finalizer, written out independently of lora_core."""
    v &= M64
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & M64
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & M64
    return v ^ (v >> 31)


# ----------------------------------------------------------------------------- the hash itself
def test_mix_matches_published_splitmix64_and_python_reference() -> None:
    # splitmix64 seeded with 0: its first output is mix(0 + 0x9E3779B97F4A7C15) = 0xE220A8397B1DCDAF
    # (Vigna's reference splitmix64.c; also the first value java.util.SplittableRandom(0) gives).
    golden = 0x9E3779B97F4A7C15
    assert fused._mix64(golden) == 0xE220A8397B1DCDAF
    values = [0, 1, golden, M64, 1 << 63, 12345678901234567, 0x0123456789ABCDEF]
    rand = torch.randint(-2**63, 2**63 - 1, (500,), generator=torch.Generator().manual_seed(0))
    values += [int(v) & M64 for v in rand]
    z = torch.tensor([fused._s64(v) for v in values], dtype=torch.int64)
    got = [int(v) & M64 for v in fused._mix64_(z.clone())]
    assert got == [_py_mix(v) for v in values]  # torch int64 wraps and masked shifts are logical


def test_keep_mask_matches_pure_python_definition() -> None:
    """keep_mask element (m, i) of group g at position q = first + m % per is kept iff
    mix(mix(k_g + q * ROW) + i * COL) without its last xor-shift, read as int64, < threshold."""
    key = fused.DropoutKey((fused._key(5, 77), fused._key(6, 77)), first_position=1000)
    rows, feats, p = 6, 7, 0.4
    got = fused.keep_mask(key, rows, feats, p, "cpu", torch.float32)
    thr = int((1 - p) * 2.0**64) - 2**63
    want = torch.empty(rows, feats)
    for m in range(rows):
        g, q = divmod(m, rows // 2)
        row = _py_mix(key.keys[g] + (1000 + q) * 0xD6E8FEB86659FD93)
        for i in range(feats):
            z = (row + i * 0x9E3779B97F4A7C15) & M64
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
            want[m, i] = float(fused._s64(z) < thr)
    assert torch.equal(got, want)


def test_any_slice_of_positions_is_generated_alone_and_chunking_is_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    k = (fused._key(3, 9),)
    whole = fused.keep_mask(fused.DropoutKey(k, 0), 40, D_IN, P, "cpu", torch.float32)
    part = fused.keep_mask(fused.DropoutKey(k, 17), 11, D_IN, P, "cpu", torch.float32)
    assert torch.equal(part, whole[17:28])
    monkeypatch.setattr(fused, "_CHUNK", 3 * D_IN + 5)  # several chunks of 3 rows
    assert torch.equal(fused.keep_mask(fused.DropoutKey(k, 0), 40, D_IN, P, "cpu", torch.float32), whole)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_keep_fraction_is_one_minus_p_and_seeds_differ(p: float) -> None:
    """(d) within 4 standard errors over 2e5 elements; different seeds/layers/positions differ."""
    rows, feats = 2000, 100
    n = rows * feats
    masks = {}
    for name, seed, layer in (("a", 1, 0), ("b", 2, 0), ("c", 1, 5)):
        m = fused.keep_mask(fused.DropoutKey((fused._key(seed, layer),)), rows, feats, p, "cpu", torch.float32)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert abs(m.mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n), (name, m.mean().item())
        masks[name] = m
    agree = 1 - p * (1 - p) * 2  # chance that two independent masks agree on an element
    for a, b in (("a", "b"), ("a", "c")):
        same = (masks[a] == masks[b]).float().mean().item()
        assert abs(same - agree) < 4 * math.sqrt(agree * (1 - agree) / n), (a, b, same)
    # neighbouring positions and features are not correlated: agreement of row q with row q + 1
    a = masks["a"]
    for shifted in ((a[1:] == a[:-1]), (a[:, 1:] == a[:, :-1])):
        same = shifted.float().mean().item()
        assert abs(same - agree) < 4 * math.sqrt(agree * (1 - agree) / shifted.numel()), same


# ----------------------------------------------------------------------------- layouts
def test_batch_of_two_equals_each_sample_alone() -> None:
    """(a) DDP: 2 samples on 1 process give the rows (and the summed gradients) of 1 sample per rank."""
    torch.manual_seed(0)
    layer = _layer()
    x = torch.randn(2, 9, D_IN)
    dy = torch.randn(2, 9, D_OUT)
    with fused.dropout_scope([101, 202]):
        y, da, db = _run(layer, x, dy)
    parts = []
    for b, seed in enumerate((101, 202)):
        torch.manual_seed(1000 + b)  # the CPU RNG state of a "rank" must not matter
        with fused.dropout_scope([seed]):
            parts.append(_run(layer, x[b:b + 1], dy[b:b + 1]))
    _close(y, torch.cat([p[0] for p in parts]))
    _close(da, parts[0][1] + parts[1][1])
    _close(db, parts[0][2] + parts[1][2])
    with torch.no_grad():  # dropout did act, and differently on the two samples
        layer.eval()
        y_eval = layer(x)
    assert not torch.allclose(y, y_eval)
    with fused.dropout_scope([101, 202]):
        key = fused.dropout_key((2, 9), fused.layer_id(layer.lora_name))
    masks = fused.keep_mask(key, 18, D_IN, P, "cpu", torch.float32).view(2, 9, D_IN)
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("middle", [(), (3,)])
def test_ulysses_shards_equal_halves_of_one_process(middle: tuple[int, ...]) -> None:
    """(b) T=10 tokens (x [B, T, *middle, I]) split 5 + 5 across two 'ranks': the outputs are the two
    halves of the one-process output and the LoRA gradients of the halves sum to its gradients."""
    torch.manual_seed(1)
    layer = _layer()
    seeds = [7, 8]
    x = torch.randn(2, 10, *middle, D_IN)
    dy = torch.randn(2, 10, *middle, D_OUT)
    with fused.dropout_scope(seeds):
        y, da, db = _run(layer, x, dy)
    halves = []
    for rank in range(2):
        with fused.dropout_scope(seeds):
            fused.set_token_shard(5 * rank, 5)
            halves.append(_run(layer, x[:, 5 * rank:5 * rank + 5], dy[:, 5 * rank:5 * rank + 5]))
    _close(torch.cat([h[0] for h in halves], dim=1), y)
    _close(halves[0][1] + halves[1][1], da)
    _close(halves[0][2] + halves[1][2], db)
    # the shard set at scope entry is the same as set_token_shard
    with fused.dropout_scope(seeds, token_offset=5, local_tokens=5):
        y1, *_ = _run(layer, x[:, 5:], dy[:, 5:])
    assert torch.equal(y1, halves[1][0])
    # the two shards do not reuse one mask, and the one-process output is the exact float64 math
    with fused.dropout_scope(seeds):
        key = fused.dropout_key(x.shape[:-1], fused.layer_id(layer.lora_name))
    rows = x[..., 0].numel()
    mask = fused.keep_mask(key, rows, D_IN, P, "cpu", torch.float32).view(x.shape)
    assert not torch.equal(mask[:, :5], mask[:, 5:])
    _close(y.double(), _reference(layer, x, mask))


def test_backward_regenerates_the_forward_mask_in_a_scope() -> None:
    """The gradients equal float64 autograd through the explicit mask (a backward that drew another
    mask, e.g. at another position, would fail)."""
    torch.manual_seed(2)
    layer = _layer()
    x = torch.randn(2, 6, D_IN, requires_grad=True)
    dy = torch.randn(2, 6, D_OUT)
    with fused.dropout_scope([3, 4], token_offset=12, local_tokens=6):
        y = layer(x)
        key = fused.dropout_key(x.shape[:-1], fused.layer_id(layer.lora_name))
    assert key.first_position == 12
    gx, ga, gb = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], dy)
    mask = fused.keep_mask(key, 12, D_IN, P, "cpu", torch.float32).view(x.shape)
    a64 = layer.lora_A.detach().double().requires_grad_()
    b64 = layer.lora_B.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    xd = x64 * mask.double() / (1 - P)
    y64 = x64 @ layer.weight.double().t() + layer.bias.double() + layer.lora_scale * (xd @ a64.t()) @ b64.t()
    wx, wa, wb = torch.autograd.grad(y64, [x64, a64, b64], dy.double())
    for got, want in ((y, y64), (gx, wx), (ga, wa), (gb, wb)):
        _close(got.double(), want)


def test_replicated_input_gets_the_same_mask_on_every_rank() -> None:
    """(c) text tokens (T != local_tokens) are not a shard: both ranks mask them as one process does;
    a layer flagged lora_replicated_input does so even when T == local_tokens."""
    torch.manual_seed(3)
    layer = _layer("blocks.0.cross_attn.k")
    ctx = torch.randn(2, 7, D_IN)
    with fused.dropout_scope([5, 6]):
        want = layer(ctx)
    for rank in range(2):
        with fused.dropout_scope([5, 6]):
            fused.set_token_shard(5 * rank, 5)
            assert torch.equal(layer(ctx), want), rank
    ctx5 = ctx[:, :5]
    with fused.dropout_scope([5, 6]):
        want5 = layer(ctx5)
    with fused.dropout_scope([5, 6], token_offset=5, local_tokens=5):
        assert not torch.equal(layer(ctx5), want5)  # taken for the second shard: the ambiguity
        layer.lora_replicated_input = True
        assert torch.equal(layer(ctx5), want5)


def test_mask_does_not_depend_on_earlier_calls_and_differs_per_layer() -> None:
    """(f) a layer's mask is independent of how many LoRA calls ran before it in the scope."""
    torch.manual_seed(4)
    first, second = _layer("blocks.0.ffn.0"), _layer("blocks.1.ffn.0")
    x = torch.randn(1, 8, D_IN)
    with fused.dropout_scope([9]):
        alone = second(x)
    with fused.dropout_scope([9]):
        for _ in range(3):
            first(x)
        torch.randn(5)  # nor on the CPU RNG
        after = second(x)
        again = second(x)
    assert torch.equal(alone, after) and torch.equal(after, again)
    with fused.dropout_scope([9]):
        masks = [fused.keep_mask(fused.dropout_key((1, 8), fused.layer_id(m.lora_name)), 8, D_IN, P, "cpu",
                                 torch.float32) for m in (first, second)]
    assert not torch.equal(*masks)


def _two_layer_block() -> nn.Module:
    torch.manual_seed(5)
    block = nn.Sequential(nn.Linear(D_IN, D_IN), nn.GELU(), nn.Linear(D_IN, D_OUT))
    inject_lora(block, ["0", "2"], RANK, 2.0 * RANK, dropout=P)
    with torch.no_grad():
        for m in lora_layers(block).values():
            m.lora_B.normal_()
    return block.train()


def test_checkpoint_recomputes_the_same_masks() -> None:
    """(e) non-reentrant checkpoint: backward inside the scope, or after it with the context_fn."""
    block = _two_layer_block()
    params = [p for m in lora_layers(block).values() for p in (m.lora_A, m.lora_B)]
    x = torch.randn(2, 6, D_IN, requires_grad=True)
    dy = torch.randn(2, 6, D_OUT)
    with fused.dropout_scope([1, 2], token_offset=6, local_tokens=6):
        y = block(x)
        want = torch.autograd.grad(y, [x, *params], dy)
    with fused.dropout_scope([1, 2], token_offset=6, local_tokens=6):
        y_ck = checkpoint(block, x, use_reentrant=False)
        torch.randn(3)
        got = torch.autograd.grad(y_ck, [x, *params], dy)
    assert torch.equal(y, y_ck)
    for g, w in zip(got, want):
        _close(g, w)
    # backward after the scope closed (and another one is open): the context_fn restores the forward's
    with fused.dropout_scope([1, 2], token_offset=6, local_tokens=6):
        y_ck = checkpoint(block, x, use_reentrant=False, context_fn=fused.dropout_checkpoint_context)
    with fused.dropout_scope([8, 9]):
        got = torch.autograd.grad(y_ck, [x, *params], dy)
    for g, w in zip(got, want):
        _close(g, w)
    assert fused._active is None


def test_composable_checkpoint_with_context_fn() -> None:
    """The hook-based checkpoint that distributed.parallelize applies takes the same context_fn."""
    from torch.distributed._composable import checkpoint as composable_checkpoint
    block = _two_layer_block()
    params = [p for m in lora_layers(block).values() for p in (m.lora_A, m.lora_B)]
    x = torch.randn(1, 5, D_IN, requires_grad=True)
    dy = torch.randn(1, 5, D_OUT)
    with fused.dropout_scope([4]):
        want = torch.autograd.grad(block(x), [x, *params], dy)
    composable_checkpoint(block, context_fn=fused.dropout_checkpoint_context)
    with fused.dropout_scope([4]):
        y = block(x)
    got = torch.autograd.grad(y, [x, *params], dy)
    for g, w in zip(got, want):
        _close(g, w)


# ----------------------------------------------------------------------------- rules and edges
def test_key_rules_per_sample_fallback_and_seed() -> None:
    lid = fused.layer_id("x")
    with fused.dropout_scope([1, 2]):
        per_sample = fused.dropout_key((2, 4), lid)
        one_row = fused.dropout_key((2,), lid)                    # x [B, I]: position 0
        folded = fused.dropout_key((6, 4), lid)                   # frames folded into the batch dim
        folded_again = fused.dropout_key((6, 4), lid)
        fixed = fused.dropout_key((2, 4), lid, seed=3)
    assert per_sample == one_row == fused.DropoutKey((fused._key(1, lid), fused._key(2, lid)), 0)
    assert len(folded.keys) == 1 and folded == folded_again and folded.keys[0] not in per_sample.keys
    with fused.dropout_scope([1, 3]):
        assert fused.dropout_key((6, 4), lid) != folded
    assert fixed == fused.DropoutKey((fused._key(3, lid),))
    # outside a scope: from the CPU RNG, so it follows torch.manual_seed
    torch.manual_seed(0)
    a = fused.dropout_key((2, 4), lid)
    torch.manual_seed(0)
    assert fused.dropout_key((2, 4), lid) == a and len(a.keys) == 1


def test_scope_restores_previous_and_shard_is_noop_outside() -> None:
    fused.set_token_shard(3, 4)  # no scope: nothing to update, nothing raised
    assert fused._active is None
    with fused.dropout_scope([1]):
        with pytest.raises(RuntimeError):
            with fused.dropout_scope([2, 3], token_offset=1, local_tokens=2):
                assert fused._active.seeds == (2, 3)
                raise RuntimeError("boom")
        assert fused._active.seeds == (1,) and fused._active.local_tokens is None
    assert fused._active is None


@pytest.mark.parametrize("kwargs,match", [
    ({"sample_seeds": []}, "one seed per sample"),
    ({"sample_seeds": [1.5]}, "integers"),
    ({"sample_seeds": [1], "token_offset": -1}, "offset"),
    ({"sample_seeds": [1], "local_tokens": 0}, "local_tokens"),
])
def test_bad_scope_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        with fused.dropout_scope(**kwargs):
            pass
    with pytest.raises(ValueError, match="offset"):
        fused.set_token_shard(-2, 4)


class _Log(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_p0_and_eval_run_no_mask_kernels() -> None:
    layouts = [_layer(p=0.0), _layer(p=P).eval()]
    x = torch.randn(2, 5, D_IN)
    for layer in layouts:
        with fused.dropout_scope([1, 2]), _Log() as log:
            layer(x)
        compute = [o for o in log.ops if o not in ("t", "view", "reshape", "_unsafe_view", "detach", "alias")]
        assert sorted(compute) == ["addmm", "addmm_", "mm"], log.ops


def test_saves_only_x_and_s_in_a_scope() -> None:
    layer = _layer()
    x = torch.randn(2, 16, D_IN, requires_grad=True)
    param_ptrs = {t.data_ptr() for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B)}
    saved: list[torch.Tensor] = []
    with fused.dropout_scope([1, 2]), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                                lambda t: t):
        layer(x)
    acts = [t for t in saved if t.data_ptr() not in param_ptrs]
    assert [tuple(t.shape) for t in acts] == [(32, D_IN), (32, RANK)]


# ----------------------------------------------------------------------------- conv
def test_conv_dropout_follows_the_scope() -> None:
    """LoRAConv: channel = feature, position = flattened spatial index of each sample's padded input;
    a batch of 2 equals each sample alone, and the output is the conv of the masked input."""
    torch.manual_seed(6)
    conv = nn.Conv2d(5, 6, 3, padding=1)
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    conv.requires_grad_(False)
    layer = LoRAConv.from_conv(conv, rank=3, alpha=6, dropout=P, name="vae.conv_in")
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.train()
    x = torch.randn(2, 5, 4, 6)
    with fused.dropout_scope([11, 12]):
        y = layer(x)
        key = fused.dropout_key((2, 24), fused.layer_id("vae.conv_in"))
    alone = []
    for i, s in enumerate((11, 12)):
        with fused.dropout_scope([s]):
            alone.append(layer(x[i:i + 1]))
    _close(y, torch.cat(alone))
    keep = fused.keep_mask(key, 48, 5, P, "cpu", torch.float32).view(2, 24, 5).transpose(1, 2).reshape(x.shape)
    delta = (layer.lora_B.detach() @ layer.lora_A.detach()).view(w.shape) * layer.lora_scale
    want = F.conv2d(x, w, b, padding=1) + F.conv2d(x * keep / (1 - P), delta, None, padding=1)
    _close(y, want)
    with fused.dropout_scope([11, 12]):
        assert torch.equal(layer(x), y)  # pure function of the scope
    layer.eval()
    _close(layer(x), F.conv2d(x, w + delta, b, padding=1))


def test_conv_unbatched_input_and_gradients() -> None:
    torch.manual_seed(7)
    layer = LoRAConv.from_conv(nn.Conv1d(3, 4, 3, padding=1), rank=2, alpha=2, dropout=P, name="c")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 10)
    with fused.dropout_scope([5]):
        y = layer(x)
        y_batched = layer(x[None])[0]
        y.square().sum().backward()
    assert y.shape == (4, 10) and torch.equal(y, y_batched)
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- devices
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_masks_equal_cpu_masks() -> None:
    """Integer math: the mask is the same on every device type (fp16 output as the bf16/fp16 GEMMs use)."""
    key = fused.DropoutKey((fused._key(1, 2), fused._key(3, 2)), first_position=4096)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cpu = fused.keep_mask(key, 2 * 3000, 512, P, "cpu", dtype)
        cuda = fused.keep_mask(key, 2 * 3000, 512, P, "cuda", dtype)
        assert torch.equal(cuda.cpu(), cpu), dtype
