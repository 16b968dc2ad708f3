"""SD1.5 LoRA files from the wider ecosystem: kohya files in LDM names (A1111-era), diffusers' legacy spellings."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from backbones.sd.sd15 import SD15Spec, unet_naming
from backbones.sd.unet import UNET_PRESETS
from backbones.sd.unet_ldm_keymap import unet_to_ldm
from lora_core.formats import load_lora, read_lora


def _unet():
    return SD15Spec().build("tiny", {"unet"})["unet"]


def _pair(m: torch.nn.Module, r: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, m.in_features, generator=g), torch.randn(m.out_features, r, generator=g)


def test_kohya_file_in_ldm_names_loads_onto_the_diffusers_named_unet(tmp_path):
    unet = _unet()
    mods = dict(unet.named_modules())
    names = [n for n in mods if n.endswith(("attn1.to_q", "attn2.to_v"))]
    tensors, want = {}, {}
    for i, n in enumerate(names):
        a, b = _pair(mods[n], seed=i)
        key = "lora_unet_" + unet_to_ldm(n, UNET_PRESETS["tiny"]).replace(".", "_")
        assert "input_blocks" in key or "output_blocks" in key or "middle_block" in key
        tensors.update({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(1.0)})
        want[n] = mods[n].weight.detach() + 0.5 * b @ a          # alpha / r = 1 / 2
    f = tmp_path / "ldm_kohya.safetensors"
    save_file(tensors, str(f))
    assert read_lora(f).format == "kohya"
    assert sorted(load_lora(unet, f, naming=unet_naming("tiny"))) == sorted(names)
    for n in names:
        x = torch.randn(3, mods[n].in_features)
        torch.testing.assert_close(mods[n](x), torch.nn.functional.linear(x, want[n], mods[n].bias),
                                   rtol=1e-5, atol=1e-5)


def test_legacy_diffusers_spellings_are_read(tmp_path):
    unet = _unet()
    mods = dict(unet.named_modules())
    attn = next(n[: -len(".to_q")] for n in mods if n.endswith("attn1.to_q"))
    legacy = {}
    for layer, module_name in (("to_q", f"{attn}.to_q"), ("to_out", f"{attn}.to_out.0")):
        a, b = _pair(mods[module_name])
        legacy[f"unet.{attn}.processor.{layer}_lora.down.weight"] = a
        legacy[f"unet.{attn}.processor.{layer}_lora.up.weight"] = b
    ff = next(n for n in mods if n.endswith("ff.net.2"))
    a, b = _pair(mods[ff])
    legacy[f"unet.{ff}.lora.down.weight"], legacy[f"unet.{ff}.lora.up.weight"] = a, b
    f = tmp_path / "legacy.safetensors"
    save_file(legacy, str(f))
    assert read_lora(f).format == "diffusers"
    got = load_lora(unet, f, naming=unet_naming("tiny"))
    assert sorted(got) == sorted([f"{attn}.to_q", f"{attn}.to_out.0", ff])
    # no alpha anywhere: the ecosystem's convention alpha == rank, scale 1
    x = torch.randn(2, mods[ff].in_features)
    torch.testing.assert_close(mods[ff](x), x @ (mods[ff].weight + b @ a).T + mods[ff].bias, rtol=1e-5, atol=1e-5)


def test_default_and_kohya_target_sets_count_as_documented():
    """On the real SD1.5 sizes (meta device): the diffusers script's 128 UNet layers, kohya's 192 modules,
    the 72 CLIP Linears."""
    from backbones.sd.sd15 import KOHYA_UNET_TARGETS, TEXT_TARGETS, UNET_TARGETS
    from lora_core.inject import inject_lora
    metas = SD15Spec().component_specs("sd15")
    assert len(inject_lora(metas["unet"], list(UNET_TARGETS), 4, 4.0)) == 128
    metas = SD15Spec().component_specs("sd15")
    assert len(inject_lora(metas["unet"], list(KOHYA_UNET_TARGETS), 4, 4.0)) == 192
    assert len(inject_lora(metas["text_encoder"], list(TEXT_TARGETS), 4, 4.0)) == 72
