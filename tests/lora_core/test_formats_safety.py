"""LoRA-file safety and ecosystem metadata: non-finite tensors refused, keys of components the model does not
have left out with a warning (everything else still strict), fp16/bf16 files, kohya / ModelSpec metadata."""
from __future__ import annotations

import copy
import datetime
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_core import FORMATS, load_lora, lora_layers, read_lora, save_lora
from tests.lora_core.test_formats import NAMINGS, X, _base, _pair, _trained

WAN_META = {"ss_network_module": "networks.lora_wan", "modelspec.architecture": "wan-2.2-ti2v-5b/lora",
            "modelspec.implementation": "https://github.com/Wan-Video/Wan2.2", "modelspec.resolution": "1280x704",
            "modelspec.title": "paper cut style"}


def _meta(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _te_keys(prefix: str = "lora_te1_") -> dict[str, torch.Tensor]:
    """Text-encoder keys of an SDXL-style kohya file: a component the toy denoiser does not have."""
    g = torch.Generator().manual_seed(8)
    return {f"{prefix}text_model_encoder_layers_{i}_mlp_fc1.{tail}": t for i in range(2) for tail, t in
            [("lora_down.weight", torch.randn(4, 8, generator=g)), ("lora_up.weight", torch.randn(16, 4, generator=g)),
             ("alpha", torch.tensor(4.0))]}


# -- 1. NaN / inf -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["comfyui", "kohya"])
def test_non_finite_file_is_refused_before_the_model_is_touched(tmp_path, fmt):
    sd = load_file(str(save_lora(_trained(), tmp_path / "g.safetensors", format=fmt)))
    keys = sorted(sd)
    b_key = next(k for k in keys if k.endswith(("lora_B.weight", "lora_up.weight")) and "head" in k)
    a_key = next(k for k in keys if k.endswith(("lora_A.weight", "lora_down.weight")) and "patch" in k)
    alpha_key = next(k for k in keys if k.endswith(".alpha") and ("blocks_1" in k or "blocks.1" in k))
    sd[b_key] = sd[b_key].clone()
    sd[b_key][0, 0] = float("nan")
    sd[a_key] = sd[a_key].clone()
    sd[a_key].view(-1)[:3] = float("inf")
    sd[alpha_key] = torch.tensor(float("nan"))
    bad = tmp_path / "diverged.safetensors"
    save_file(sd, str(bad))
    first = sorted([a_key, b_key, alpha_key])[0]
    with pytest.raises(ValueError) as e:
        read_lora(bad)
    msg = str(e.value)
    assert "diverged.safetensors" in msg and f"first {first!r}" in msg and f"3 of its {len(sd)} tensors" in msg
    target = _trained(seed=9)
    snapshot = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="NaN or inf"):
        load_lora(target, bad)
    assert all(torch.equal(v, snapshot[k]) for k, v in target.state_dict().items())
    fresh = _base()
    with pytest.raises(ValueError, match="NaN or inf"):
        load_lora(fresh, bad)
    assert not lora_layers(fresh)


def test_non_finite_in_a_half_precision_file_counts_its_values(tmp_path):
    sd = load_file(str(save_lora(_trained(), tmp_path / "g.safetensors", dtype=torch.float16)))
    sd["blocks.0.o.lora_B"] = sd["blocks.0.o.lora_B"].clone()
    sd["blocks.0.o.lora_B"][:2, 0] = float("inf")
    sd["blocks.0.o.lora_B"][3, 1] = float("nan")
    bad = tmp_path / "h.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(ValueError, match=r"first 'blocks.0.o.lora_B' \(1 NaN, 2 inf of 32\)"):
        load_lora(_base(), bad)


def test_save_refuses_non_finite_weights_and_fp16_overflow(tmp_path):
    model = _trained()
    with torch.no_grad():
        lora_layers(model)["blocks.1.q"].lora_B[0, 0] = 1e5  # finite in fp32 and bf16, inf in fp16
    with pytest.raises(ValueError, match=r"float16 overflows 1 tensors.*'blocks.1.q.lora_B'.*bfloat16"):
        save_lora(model, tmp_path / "o.safetensors", dtype=torch.float16)
    assert not (tmp_path / "o.safetensors").exists()
    path = save_lora(model, tmp_path / "o.safetensors", dtype=torch.bfloat16)
    assert float(read_lora(path).modules[("", "blocks.1.q")]["B"][0, 0]) == pytest.approx(1e5, rel=1e-2)
    with torch.no_grad():
        lora_layers(model)["head"].lora_A[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in 1 tensors, first 'head.lora_A'.*diverged"):
        save_lora(model, tmp_path / "n.safetensors")
    assert not (tmp_path / "n.safetensors").exists()


def test_non_finite_scale_from_a_lora_config_is_refused(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {"transformer.blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 8, generator=g),
          "transformer.blocks.0.attn.to_q.lora_B.weight": torch.randn(8, 4, generator=g)}
    path = tmp_path / "cfg.safetensors"
    save_file(sd, str(path), metadata={"lora_adapter_metadata": '{"r": 4, "lora_alpha": NaN}'})
    with pytest.raises(ValueError, match="'blocks.0.attn.to_q' gets a non-finite scale"):
        load_lora(_base(), path)


# -- 2. apply what fits, name what does not ------------------------------------------------------------

def test_unclaimed_prefixes_are_left_out_with_one_warning(tmp_path, caplog):
    model = _trained()
    sd = load_file(str(save_lora(model, tmp_path / "k.safetensors", format="kohya")))
    sd.update(_te_keys("lora_te1_"))
    sd.update(_te_keys("lora_te2_"))
    sd["lora_te2_text_model_encoder_layers_0_mlp_fc1.hada_w1_a"] = torch.zeros(4, 8)  # LoHa, not applied anyway
    path = tmp_path / "sdxl_style.safetensors"
    save_file(sd, str(path))
    lf = read_lora(path, NAMINGS["unet"])  # any naming whose kohya prefix is lora_unet_ only
    assert sorted(lf.skipped) == ["lora_te1_", "lora_te2_"]
    assert len(lf.skipped["lora_te1_"]) == 6 and len(lf.skipped["lora_te2_"]) == 7
    assert not lf.unsupported and all(pre == "lora_unet_" for pre, _ in lf.modules)
    assert not read_lora(path).skipped  # without a naming nothing is claimed, so nothing is set aside
    fresh = _base()
    with caplog.at_level(logging.WARNING, logger="lora_core.formats"):
        names = load_lora(fresh, path)
    assert sorted(names) == sorted(lora_layers(model))
    torch.testing.assert_close(fresh(X), model(X), rtol=1e-5, atol=1e-6)
    warned = [r for r in caplog.records if r.name == "lora_core.formats"]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    msg = warned[0].getMessage()
    assert "sdxl_style.safetensors" in msg and "'lora_te1_' (6 keys" in msg and "'lora_te2_' (7 keys" in msg
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha" in msg and "..." in msg


def test_comfyui_text_encoder_keys_are_left_out(tmp_path):
    """ComfyUI's generic text-encoder keys (`text_encoders.<module>`) in a ComfyUI file for the denoiser."""
    model = _trained()
    sd = load_file(str(save_lora(model, tmp_path / "c.safetensors", format="comfyui")))
    sd["text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"] = torch.zeros(4, 8)
    sd["text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.lora_B.weight"] = torch.zeros(16, 4)
    path = tmp_path / "with_te.safetensors"
    save_file(sd, str(path))
    fresh = _base()
    load_lora(fresh, path)
    torch.testing.assert_close(fresh(X), model(X), rtol=1e-5, atol=1e-6)
    assert list(read_lora(path, NAMINGS["unet"]).skipped) == ["text_encoders."]


def test_claimed_prefix_problems_still_fail_and_name_the_skipped_keys(tmp_path):
    sd = load_file(str(save_lora(_trained(), tmp_path / "k.safetensors", format="kohya")))
    sd.update(_te_keys())
    sd["lora_unet_blocks_7_q.lora_down.weight"] = torch.zeros(4, 8)  # a module the model does not have
    sd["lora_unet_blocks_7_q.lora_up.weight"] = torch.zeros(8, 4)
    sd["lora_unet_blocks_0_o.hada_w1_a"] = torch.zeros(4, 8)  # LoHa under the claimed prefix: not applied
    path = tmp_path / "wrong.safetensors"
    save_file(sd, str(path))
    target = _trained(seed=3)
    snapshot = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError) as e:
        load_lora(target, path)
    msg = str(e.value)
    assert "unexpected module 'blocks_7_q'" in msg and "lora_unet_blocks_0_o.hada_w1_a" in msg
    assert "left out, no component reads their prefix: 'lora_te1_' (6 keys" in msg
    assert all(torch.equal(v, snapshot[k]) for k, v in target.state_dict().items())
    # mis-shaped and half modules under the claimed prefix fail the same way
    sd = load_file(str(save_lora(_trained(), tmp_path / "k.safetensors", format="kohya")))
    sd.update(_te_keys())
    sd["lora_unet_head.lora_down.weight"] = torch.zeros(4, 5)
    del sd["lora_unet_patch.lora_up.weight"]
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"(?s)mis-shaped 'head'.*'patch' is missing its B"):
        load_lora(_base(), path)


def test_a_file_where_nothing_fits_still_raises(tmp_path):
    only_te = tmp_path / "te_only.safetensors"
    save_file(_te_keys(), str(only_te))
    with pytest.raises(ValueError, match=r"nothing in LoRA file .*te_only.safetensors fits Net.*'lora_te1_' \(6"):
        load_lora(_base(), only_te)
    # a lone UNet with its naming, given a file of text-encoder keys only
    with pytest.raises(ValueError, match="nothing in LoRA file"):
        load_lora(_pair()["unet"], only_te, naming=NAMINGS["unet"])
    # a PEFT folder's keys, for components whose namings have no peft prefix, are nobody's
    model = _trained()
    sd = load_file(str(save_lora(model, tmp_path / "c.safetensors", format="comfyui")))
    peft_like = tmp_path / "peft.safetensors"
    save_file({"base_model.model." + k.removeprefix("diffusion_model."): v for k, v in sd.items()
               if not k.endswith(".alpha")}, str(peft_like))
    with pytest.raises(ValueError, match="nothing in LoRA file"):
        load_lora(_pair(), peft_like, naming=NAMINGS)


# -- 3. saving dtype -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_half_precision_files_round_trip_into_fp32_masters(tmp_path, fmt, dtype):
    model = _trained(rank=3, alpha=1.5, use_rslora=True)  # effective alpha 1.5 * sqrt(3): no short binary form
    path = save_lora(model, tmp_path / f"{fmt}.safetensors", format=fmt, dtype=dtype)
    meta = _meta(path)
    assert meta["dtype"] == str(dtype).removeprefix("torch.")
    with safe_open(str(path), framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert {d for k, d in dtypes.items() if not k.endswith(".alpha")} == {dtype}
    assert {d for k, d in dtypes.items() if k.endswith(".alpha")} <= {torch.float32}  # documented choice
    for base_dtype in (torch.float32, torch.bfloat16):
        fresh = _base().to(base_dtype)
        load_lora(fresh, path)
        for name, m in lora_layers(fresh).items():
            assert m.lora_A.dtype == torch.float32 and m.lora_B.dtype == torch.float32, name
            src = lora_layers(model)[name]
            # A is the master rounded to the file dtype once, exactly; so is B in every format but diffusers,
            # whose B carries the scale (and whose reader then takes scale 1)
            torch.testing.assert_close(m.lora_A, src.lora_A.detach().to(dtype).float(), rtol=0, atol=0)
            if fmt != "diffusers":
                torch.testing.assert_close(m.lora_B, src.lora_B.detach().to(dtype).float(), rtol=0, atol=0)
                assert m.lora_scale == pytest.approx(src.lora_scale, rel=1e-6)  # fp32 alpha, not bf16's 0.4%
            delta = (m.lora_B @ m.lora_A.flatten(1)) * m.lora_scale
            want = (src.lora_B @ src.lora_A.flatten(1)).detach() * src.lora_scale
            torch.testing.assert_close(delta, want, rtol=0.05, atol=5e-3 * float(want.abs().max()))
    fresh = _base()
    load_lora(fresh, path)
    torch.testing.assert_close(fresh(X), model(X), rtol=0.02, atol=0.02)


def test_save_dtype_must_be_floating(tmp_path):
    with pytest.raises(ValueError, match="floating torch.dtype.*torch.int8"):
        save_lora(_trained(), tmp_path / "x.safetensors", dtype=torch.int8)
    assert _meta(save_lora(_trained(), tmp_path / "f.safetensors"))["dtype"] == "float32"


# -- 4. kohya / ModelSpec metadata -------------------------------------------------------------------------

def test_kohya_file_carries_caller_and_generic_metadata(tmp_path):
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    path = save_lora(_trained(), tmp_path / "style.safetensors", format="kohya", backbone="wan_ti2v",
                     metadata=WAN_META, dtype=torch.bfloat16)
    meta = _meta(path)
    assert {k: meta[k] for k in WAN_META} == WAN_META  # the caller's network module wins over networks.lora
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "8" and meta["dtype"] == "bfloat16"
    date = datetime.datetime.fromisoformat(meta["modelspec.date"])
    assert date.tzinfo is not None and before <= date <= datetime.datetime.now(datetime.timezone.utc)
    assert read_lora(path).format == "kohya"


def test_defaults_without_caller_metadata(tmp_path):
    meta = _meta(save_lora(_trained(), tmp_path / "my_lora.safetensors", format="kohya", backbone="toy"))
    assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.title"] == "my_lora"
    assert meta["modelspec.architecture"] == "toy/lora" and "modelspec.implementation" not in meta
    assert "modelspec.resolution" not in meta
    anonymous = _meta(save_lora(_trained(), tmp_path / "a.safetensors"))
    assert anonymous["backbone"] == "" and "modelspec.architecture" not in anonymous


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_with_backbone_metadata_loads_back(tmp_path, fmt):
    model = _trained()
    path = save_lora(model, tmp_path / f"{fmt}.safetensors", format=fmt, backbone="toy",
                     metadata={**WAN_META, "preset": "tiny"})
    meta = _meta(path)
    assert meta["modelspec.architecture"] == WAN_META["modelspec.architecture"] and meta["preset"] == "tiny"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.title"] == "paper cut style"
    # kohya's network module describes kohya keys; other formats must not claim it
    assert ("ss_network_module" in meta) == (fmt == "kohya")
    fresh = _base()
    assert sorted(load_lora(fresh, path, backbone="toy")) == sorted(lora_layers(model))
    torch.testing.assert_close(fresh(X), model(X), rtol=1e-5, atol=1e-6)


def test_bad_metadata_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'ss_network_dim' maps to int"):
        save_lora(_trained(), tmp_path / "x.safetensors", metadata={"ss_network_dim": 4})
    with pytest.raises(ValueError, match=r"modelspec.resolution must be '<width>x<height>'.*'1280,704'"):
        save_lora(_trained(), tmp_path / "x.safetensors", metadata={"modelspec.resolution": "1280,704"})
    assert not (tmp_path / "x.safetensors").exists()


def test_multi_component_kohya_file_metadata(tmp_path):
    path = save_lora(_pair(seed=1), tmp_path / "pair.safetensors", format="kohya", naming=NAMINGS, backbone="toy",
                     metadata={"modelspec.architecture": "toy-sd/lora"})
    meta = _meta(path)
    assert json.loads(meta["components"]) == ["unet", "text_encoder"]
    assert meta["modelspec.architecture"] == "toy-sd/lora" and meta["ss_network_dim"] == "4"
