import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_core import (LoRAConv, LoRALinear, disable_lora, inject_lora, lora_layers, merge_lora, remove_lora,
                       unmerge_lora)


def _randomize_lora(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.norm_q = nn.LayerNorm(16)
        self.ffn = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm_q(self.q(x)))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class CausalConv3d(nn.Conv3d):
    """Pads time on the front only inside its own forward, like the Wan VAE's convolution."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(cin, cout, k, padding=0)
        self._pad = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self._pad))


def test_linear_matches_hand_written_reference():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    layer = LoRALinear.from_linear(lin, rank=4, alpha=8)
    assert layer is lin and isinstance(lin, LoRALinear)
    _randomize_lora(nn.Sequential(layer))
    x = torch.randn(3, 5, 12)
    expected = x @ w.T + b + (8 / 4) * (x @ layer.lora_A.detach().T) @ layer.lora_B.detach().T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_rslora_scale_and_shapes():
    lin = LoRALinear.from_linear(nn.Linear(10, 6), rank=4, alpha=8, use_rslora=True)
    assert lin.lora_scale == pytest.approx(8 / 2)
    assert lin.lora_A.shape == (4, 10) and lin.lora_B.shape == (6, 4)
    assert torch.count_nonzero(lin.lora_B) == 0 and torch.count_nonzero(lin.lora_A) > 0


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_matches_delta_kernel_reference(dim):
    torch.manual_seed(dim)
    conv_t = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
    fconv = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
    conv = conv_t(4, 6, 3, padding=1, stride=2)
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    layer = LoRAConv.from_conv(conv, rank=3, alpha=6)
    assert layer.lora_A.shape == (3, 4 * 3 ** dim) and layer.lora_B.shape == (6, 3)
    _randomize_lora(nn.Sequential(layer))
    x = torch.randn(2, 4, *([7] * dim))
    delta = (layer.lora_B.detach() @ layer.lora_A.detach()).view(w.shape) * 2.0
    expected = fconv(x, w + delta, b, stride=2, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_grouped_conv_and_causal_subclass():
    torch.manual_seed(1)
    g = nn.Conv2d(4, 8, 3, padding=1, groups=2)
    wg = g.weight.detach().clone()
    LoRAConv.from_conv(g, rank=2, alpha=2)
    _randomize_lora(nn.Sequential(g))
    x = torch.randn(1, 4, 5, 5)
    dg = (g.lora_B.detach() @ g.lora_A.detach()).view(wg.shape)
    torch.testing.assert_close(g(x), F.conv2d(x, wg + dg, g.bias, padding=1, groups=2), rtol=1e-5, atol=1e-5)

    c = CausalConv3d(3, 5, 3)
    wc = c.weight.detach().clone()
    layer = LoRAConv.from_conv(c, rank=2, alpha=4)
    assert isinstance(layer, CausalConv3d) and isinstance(layer, LoRAConv)
    _randomize_lora(nn.Sequential(layer))
    x = torch.randn(1, 3, 4, 6, 6)
    delta = (layer.lora_B.detach() @ layer.lora_A.detach()).view(wc.shape) * 2.0
    expected = F.conv3d(F.pad(x, c._pad), wc + delta, c.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer(x).shape[2] == 4  # causal: time length kept


def test_injection_targets_freeze_and_init_output_unchanged():
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(2, 16)
    before = model(x)
    names = inject_lora(model, ["q", "ffn.0"], rank=4, alpha=4)
    assert names == ["blocks.0.q", "blocks.0.ffn.0", "blocks.1.q", "blocks.1.ffn.0"]
    assert "blocks.0.norm_q" not in names  # "q" matches dotted suffixes only
    torch.testing.assert_close(model(x), before)  # B = 0 at init
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in names for p in ("lora_A", "lora_B")}
    # base parameter names are unchanged, so a base checkpoint loads into the injected model
    base = Toy().state_dict()
    missing, unexpected = model.load_state_dict(base, strict=False)
    assert unexpected == [] and all(".lora_" in k for k in missing)


def test_regex_targets_exclude_and_patterns():
    model = Toy()
    names = inject_lora(model, r"blocks\.\d+\.(q|ffn\.2)", rank=4, alpha=4, exclude=["blocks.1.q"],
                        rank_pattern={r"ffn\.2": 8}, alpha_pattern={"q": 16})
    assert names == ["blocks.0.q", "blocks.0.ffn.2", "blocks.1.ffn.2"]
    layers = lora_layers(model)
    assert layers["blocks.0.ffn.2"].lora_rank == 8 and layers["blocks.0.q"].lora_rank == 4
    assert layers["blocks.0.q"].lora_scale == pytest.approx(16 / 4)


def test_injection_errors():
    with pytest.raises(ValueError, match="matched no Linear/Conv"):
        inject_lora(Toy(), ["nope"], rank=4, alpha=4)
    with pytest.raises(ValueError, match="LayerNorm"):
        inject_lora(Toy(), ["norm_q"], rank=4, alpha=4)
    m = Toy()
    inject_lora(m, ["q"], rank=4, alpha=4)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(m, ["q"], rank=4, alpha=4)


def test_merge_unmerge_and_disable():
    torch.manual_seed(0)
    model = Toy()
    base = copy.deepcopy(model)
    inject_lora(model, ["q", "ffn.0", "ffn.2", "head"], rank=4, alpha=8)
    _randomize_lora(model)
    x = torch.randn(5, 16)
    unmerged = model(x)
    assert not torch.allclose(unmerged, base(x))
    assert merge_lora(model) == 7
    merged = model(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    with disable_lora(model):
        torch.testing.assert_close(model(x), base(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(x), merged)  # re-merged on exit
    unmerge_lora(model)
    for (n, p), (_, q) in zip(base.named_parameters(), ((n, p) for n, p in model.named_parameters()
                                                        if ".lora_" not in n)):
        assert torch.equal(p, q), n


def test_unmerge_bit_exact_after_100_bf16_cycles():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64).to(torch.bfloat16)
    pristine = lin.weight.detach().clone()
    LoRALinear.from_linear(lin, rank=8, alpha=16)
    _randomize_lora(nn.Sequential(lin))
    for _ in range(100):
        lin.merge()
        assert not torch.equal(lin.weight, pristine)
        lin.unmerge()
    assert torch.equal(lin.weight, pristine)
    # the merge itself is computed in fp32 and rounded once
    lin.merge()
    expected = (pristine.float() + lin.delta_weight()).to(torch.bfloat16)
    assert torch.equal(lin.weight, expected)


def test_merged_model_has_no_lora_overhead_and_remove():
    model = Toy()
    inject_lora(model, ["q"], rank=4, alpha=4)
    _randomize_lora(model)
    x = torch.randn(2, 16)
    y = model(x)
    merge_lora(model, keep_pristine=False)
    with pytest.raises(ValueError, match="keep_pristine"):
        unmerge_lora(model)
    assert remove_lora(model, merge=True) == 2
    assert type(model.blocks[0].q) is nn.Linear
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_dropout_only_on_lora_path_in_training():
    torch.manual_seed(0)
    lin = LoRALinear.from_linear(nn.Linear(32, 32), rank=4, alpha=4, dropout=0.5)
    x = torch.randn(8, 32)
    lin.eval()
    base_out = F.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(lin(x), base_out)  # B = 0
    _randomize_lora(nn.Sequential(lin))
    lin.train()
    a, b = lin(x), lin(x)
    assert not torch.allclose(a, b)  # dropout active on the LoRA path
    lin.eval()
    torch.testing.assert_close(lin(x), lin(x))


def test_gradients_reach_lora_only():
    model = Toy()
    inject_lora(model, ["q", "ffn.2"], rank=4, alpha=4)
    _randomize_lora(model)
    model(torch.randn(3, 16)).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in n), n


def test_injection_names_layers_for_their_dropout_masks():
    import hashlib

    from lora_core import fused
    from lora_core.layers import strip_lora

    model = Toy()
    names = inject_lora(model, ["q", "head"], rank=4, alpha=4, dropout=0.2)
    layers = lora_layers(model)
    assert [layers[n].lora_name for n in names] == names
    # the id is blake2b-64 of the name: the same in every process (Python's hash() is salted per process)
    digest = int.from_bytes(hashlib.blake2b(b"blocks.1.q", digest_size=8).digest(), "little")
    assert fused.layer_id("blocks.1.q") % 2**64 == digest
    assert len({fused.layer_id(n) for n in names}) == len(names)
    assert LoRALinear.from_linear(nn.Linear(4, 4), rank=2, alpha=2).lora_name == ""
    q = layers["blocks.0.q"]
    strip_lora(q)
    assert type(q) is nn.Linear and not hasattr(q, "lora_name")


def test_injected_model_dropout_is_layout_invariant():
    """A whole injected model in a dropout scope: a batch of 2 gives the rows of each sample alone."""
    from lora_core import fused

    torch.manual_seed(0)
    model = Toy()
    inject_lora(model, ["q", "ffn.0", "ffn.2"], rank=4, alpha=4, dropout=0.3)
    _randomize_lora(model)
    x = torch.randn(2, 5, 16)
    with fused.dropout_scope([3, 4]):
        both = model(x)
    with fused.dropout_scope([3]):
        first = model(x[:1])
    with fused.dropout_scope([4]):
        second = model(x[1:])
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-5, atol=1e-6)
    model.eval()
    assert not torch.allclose(both, model(x))
