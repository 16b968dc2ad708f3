"""LoRA files across the engine and diffusers/PEFT, both directions, on the tiny Wan DiT.

A file diffusers' own pipeline writes (with its prefixed `lora_adapter_metadata`) must load into our DiT at
diffusers' scale, and a diffusers-format file we write must load through diffusers' own loader; both are
checked on outputs against the diffusers model carrying the adapter. Shapes as in test_wan_dit.py.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import backbones.wan.spec  # noqa: F401  (attaches WanDiT.lora_key_map / backbone_name)
from backbones.wan.dit import WanDiT
from backbones.wan.keymap import convert_state_dict
from lora_core import inject_lora, load_lora, lora_layers, read_lora, save_lora
from tests.backbones.wan.test_wan_dit import TINY, _diffusers_forward, randomize_, rel_err, tiny_inputs
from tests.lora_core.test_layers import _randomize_lora

diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference oracle (test extra)")
peft = pytest.importorskip("peft", reason="PEFT builds the reference adapter (test extra)")

T = torch.tensor([999.0, 437.0])


def _tiny_diffusers() -> nn.Module:
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024).eval()
    randomize_(ref, seed=2)
    return ref


@pytest.fixture(scope="module")
def base_pair() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The reference model (no adapter) and its weights in our naming, copied so adapters never leak in."""
    ref = _tiny_diffusers()
    ours_sd = {k: v.clone() for k, v in convert_state_dict(ref.state_dict(), to="upstream").items()}
    return ref, ours_sd


def _ours(sd: dict[str, torch.Tensor]) -> WanDiT:
    model = WanDiT(TINY).eval()
    model.load_state_dict(sd, strict=True)
    return model


def _outputs(ref: nn.Module, ours: WanDiT) -> tuple[torch.Tensor, torch.Tensor]:
    x, ctx = tiny_inputs(seed=3)
    with torch.no_grad():
        return ours(x, T, ctx), _diffusers_forward(ref, x, T, ctx)


def test_file_saved_by_diffusers_pipeline_loads_at_its_alpha(tmp_path, base_pair) -> None:
    """diffusers' WanPipeline.save_lora_weights stores the LoraConfig as `transformer.lora_alpha` etc.;
    reading only a plain `lora_alpha` fell back to alpha == rank (scale 1 instead of 2) -- wrong output."""
    ref0, ours_sd = base_pair
    ref = copy.deepcopy(ref0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj"],
                          rank_pattern={"attn2.to_k": 2}, alpha_pattern={"to_v": 3})
    ref.add_adapter(cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:  # lora_B starts at zero: randomise it so the scale shows in the output
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    out_dir = tmp_path / "from_diffusers"
    diffusers.WanPipeline.save_lora_weights(out_dir, transformer_lora_layers=peft.get_peft_model_state_dict(ref),
                                            transformer_lora_adapter_metadata=cfg.to_dict())
    path = out_dir / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.lora_alpha"] == 8 and "lora_alpha" not in meta  # the layout this test is about

    lf = read_lora(path)
    assert lf.format == "diffusers" and len(lf.modules) == 2 * 9 and not lf.unsupported
    ours = _ours(ours_sd)
    names = load_lora(ours, path)
    assert len(names) == 18
    scales = {n: m.lora_scale for n, m in lora_layers(ours).items()}
    assert scales["blocks.0.self_attn.q"] == 2.0          # lora_alpha 8 / r 4
    assert scales["blocks.1.cross_attn.k"] == 4.0         # lora_alpha 8 / rank_pattern 2
    assert scales["blocks.0.cross_attn.v"] == 0.75        # alpha_pattern 3 / r 4
    got, want = _outputs(ref, ours)
    err = rel_err(got, want)
    print(f"diffusers-written LoRA in our DiT: max rel err {err:.2e}")
    assert err <= 1e-5
    with torch.no_grad():
        ref.disable_adapters()
        base = _outputs(ref, ours)[1]
    assert rel_err(base, want) > 1e-2  # the adapter changes the output, so the check above has teeth


def test_our_diffusers_file_loads_through_diffusers_loader(tmp_path, base_pair) -> None:
    ref0, ours_sd = base_pair
    ours = _ours(ours_sd)
    inject_lora(ours, ["self_attn.q", "self_attn.v", "cross_attn.k", "cross_attn.o", "ffn.0", "ffn.2", "head.head",
                       "patch_embedding"], rank=4, alpha=6, rank_pattern={"ffn.2": 2},
                alpha_pattern={"cross_attn.k": 1.5})
    _randomize_lora(ours, seed=3)
    with torch.no_grad():
        for m in lora_layers(ours).values():
            m.lora_B.mul_(0.3)
    path = save_lora(ours, tmp_path / "ours.safetensors", format="diffusers")
    state_dict = diffusers.WanPipeline.lora_state_dict(str(path))
    assert "transformer.blocks.0.ffn.net.2.lora_A.weight" in state_dict
    assert "transformer.patch_embedding.lora_A.weight" in state_dict
    ref = copy.deepcopy(ref0)
    ref.load_lora_adapter(state_dict, prefix="transformer", adapter_name="ours")
    got, want = _outputs(ref, ours)
    err = rel_err(got, want)
    print(f"our diffusers-format LoRA in diffusers' model: max rel err {err:.2e}")
    assert err <= 1e-5
    with torch.no_grad():
        ref.disable_adapters()
        base = _outputs(ref, ours)[1]
    assert rel_err(base, want) > 1e-2
