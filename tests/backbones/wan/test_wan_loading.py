"""Loading Wan checkpoints from folders in the official (and diffusers) layout that the tests write."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backbones.registry import get_backbone
from backbones.wan.keymap import dit_to_diffusers
from backbones.wan.spec import T5_FILE, TOKENIZER_DIR, VAE_FILE
from backbones.encoders.t5 import convert_t5_state_dict
from backbones.encoders.t5_tokenizer import build_tiny_tokenizer, save_tokenizer
from backbones.wan.vae_keymap import convert_vae_state_dict

HERE = Path(__file__).parent
SPEC = get_backbone("wan_ti2v")


def _shards(sd: dict, folder: Path, stem: str, n: int) -> None:
    """Write sd as n safetensors shards + index, the way the hub folders are laid out."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    weight_map = {}
    for i in range(n):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[i::n]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def source():
    """Random tiny components (the 'downloaded' weights) with every tensor non-trivial."""
    comps = SPEC.build("tiny", {"dit", "vae", "text_encoder"})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in (comps["dit"], comps["vae"], comps["text_encoder"]):
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return comps


@pytest.fixture(scope="module")
def official(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("Wan2.2-TI2V-tiny")
    _shards(source["dit"].state_dict(), root, "diffusion_pytorch_model", 3)
    cfg = source["dit"].config
    (root / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": cfg.dim, "ffn_dim": cfg.ffn_dim,
                                                  "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
                                                  "in_dim": cfg.in_dim, "model_type": "ti2v"}))
    torch.save(source["vae"].state_dict(), root / VAE_FILE)
    torch.save({k: v.to(torch.bfloat16) for k, v in source["text_encoder"].state_dict().items()}, root / T5_FILE)
    save_tokenizer(build_tiny_tokenizer(), root)
    assert (root / TOKENIZER_DIR / "tokenizer.json").is_file()
    return root


def _same_outputs(a, b, tol=1e-5, t5_tol=1e-5):
    video, latents = torch.rand(1, 3, 5, 32, 32) * 2 - 1, torch.randn(1, 16, 2, 4, 4)
    ctx = torch.randn(1, 7, 64)
    t = torch.tensor([500.0])
    with torch.no_grad():
        torch.testing.assert_close(a["dit"](latents, t, ctx), b["dit"](latents, t, ctx), rtol=tol, atol=tol)
        torch.testing.assert_close(a["vae"].encode(video), b["vae"].encode(video), rtol=tol, atol=tol)
        torch.testing.assert_close(a["vae"].decode(latents), b["vae"].decode(latents), rtol=tol, atol=tol)
    ea, eb = SPEC.encode_text(a, ["a cat"]), SPEC.encode_text(b, ["a cat"])
    torch.testing.assert_close(ea[0], eb[0], rtol=t5_tol, atol=t5_tol)


def test_official_layout_loads_unchanged(source, official):
    loaded = SPEC.build("tiny", {"dit", "vae", "text_encoder"}, official)
    assert not any(p.is_meta for p in loaded["dit"].parameters())
    # the T5 file ships in bf16; load it in fp32 and compare with a bf16-rounded source
    ref = SPEC.build("tiny", {"text_encoder"})
    ref["text_encoder"].load_state_dict({k: v.to(torch.bfloat16).float()
                                      for k, v in source["text_encoder"].state_dict().items()})
    source_rounded = {**source, "text_encoder": ref["text_encoder"]}
    _same_outputs(source_rounded, loaded)
    bf16 = SPEC.build("tiny", {"dit"}, official, dtype=torch.bfloat16)
    assert bf16["dit"].blocks[0].self_attn.q.weight.dtype == torch.bfloat16


def test_diffusers_layout_loads_through_the_key_maps(source, tmp_path):
    root = tmp_path / "Wan2.2-TI2V-tiny-Diffusers"
    dit_sd = {dit_to_diffusers(k): v for k, v in source["dit"].state_dict().items()}
    _shards(dit_sd, root / "transformer", "diffusion_pytorch_model", 2)
    (root / "vae").mkdir(parents=True)
    save_file(convert_vae_state_dict(source["vae"].state_dict(), to="diffusers"),
              str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    t5_sd = {k: v.contiguous() for k, v in convert_t5_state_dict(source["text_encoder"].state_dict(), to="hf").items()}
    t5_sd.pop("encoder.embed_tokens.weight")  # tied to shared.weight; safetensors refuses shared storage
    _shards(t5_sd, root / "text_encoder", "model", 2)
    (root / "tokenizer").mkdir()
    build_tiny_tokenizer().save(str(root / "tokenizer" / "tokenizer.json"))
    (root / "model_index.json").write_text("{}")
    loaded = SPEC.build("tiny", {"dit", "vae", "text_encoder"}, root)
    _same_outputs(source, loaded)


def test_errors_name_the_file_before_any_compute(official, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SPEC.build("tiny", {"dit"}, tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        SPEC.build("tiny", {"dit"}, empty)
    # a missing shard
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in official.iterdir():
        if f.is_file() and "00002-of" not in f.name:
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match="00002-of-00003"):
        SPEC.check_checkpoint("tiny", broken, {"dit"})
    # the right files for another size: preset mismatch names keys and shapes
    with pytest.raises(ValueError, match="does not fit") as e:
        SPEC.build("5b", {"dit"}, official)
    assert "mis-shaped" in str(e.value) and "(DiT)" in str(e.value)
    # a foreign checkpoint (another model's keys)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({"model.layers.0.weight": torch.zeros(2, 2)}, str(foreign / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="missing.*blocks.0|unexpected.*model.layers.0"):
        SPEC.build("tiny", {"dit"}, foreign)
    # a missing VAE file
    novae = tmp_path / "novae"
    novae.mkdir()
    for f in official.iterdir():
        if f.is_file() and f.name != VAE_FILE:
            (novae / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match=VAE_FILE):
        SPEC.check_checkpoint("tiny", novae, {"vae"})
    # a corrupt .pth
    (novae / VAE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=VAE_FILE):
        SPEC.check_checkpoint("tiny", novae, {"vae"})


def test_info_cli_lists_exact_keys_without_weights():
    out = subprocess.run([sys.executable, "-m", "backbones", "info", "wan_ti2v", "--preset", "5b", "--json",
                          "--targets"], capture_output=True, text=True, check=True,
                         cwd=HERE.parents[2])
    info = json.loads(out.stdout)
    comps = info["components"]
    assert comps["dit"]["num_params"] == 4_999_787_712
    assert comps["vae"]["num_params"] == 704_688_668
    assert comps["text_encoder"]["num_params"] == 5_680_910_336
    for name, fname in (("dit", "wan_dit_keys.txt"), ("vae", "wan_vae_keys.txt"), ("text_encoder", "wan_t5_keys.txt")):
        lines = [ln for ln in (HERE / fname).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        assert len(comps[name]["keys"]) == len(lines), name
    assert "blocks.29.ffn.2" in info["targets"] and "blocks.0.norm3" not in info["targets"]
    assert info["default_targets"][0] == "self_attn.q"
