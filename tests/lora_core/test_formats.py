import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_core import FORMATS, KeyMap, inject_lora, load_lora, lora_layers, read_lora, save_lora
from tests.lora_core.test_layers import _randomize_lora


class Net(nn.Module):
    """Linear and conv targets with upstream-style names."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(8, 8), "o": nn.Linear(8, 8)})
                                     for _ in range(2)])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).mean((2, 3))
        for b in self.blocks:
            h = h + b["o"](torch.tanh(b["q"](h)))
        return self.head(h)


def _to_ext(name: str) -> str:
    return name.replace(".q", ".attn.to_q").replace(".o", ".attn.to_out.0").replace("head", "proj_out")


def _from_ext(name: str) -> str:
    out = name.replace(".attn.to_q", ".q").replace(".attn.to_out.0", ".o").replace("proj_out", "head")
    if out == name and name not in ("patch",):
        raise ValueError(name)
    return out


Net.lora_key_map = KeyMap(_to_ext, _from_ext)
TARGETS = ["patch", "q", "o", "head"]
X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))


def _trained(seed: int = 0, rank: int = 4, alpha: float = 8, **kw) -> nn.Module:
    torch.manual_seed(100)  # same base weights every time
    model = Net()
    inject_lora(model, TARGETS, rank=rank, alpha=alpha, **kw)
    _randomize_lora(model, seed)
    return model


def _base() -> nn.Module:
    torch.manual_seed(100)
    return Net()


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_every_format(tmp_path, fmt):
    model = _trained(use_rslora=(fmt == "kohya"))
    path = save_lora(model, tmp_path / f"l_{fmt}.safetensors", format=fmt, backbone="toy")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == fmt and meta["format_version"] == "1" and meta["backbone"] == "toy"
    assert meta["rank"] == "4" and json.loads(meta["targets"]) == list(lora_layers(model))
    prefix = {"native": "blocks.0.q.lora_A", "comfyui": "diffusion_model.blocks.0.q.lora_A.weight",
              "diffusers": "transformer.blocks.0.attn.to_q.lora_A.weight",
              "kohya": "lora_unet_blocks_0_q.lora_down.weight"}[fmt]
    assert prefix in keys
    fresh = _base()
    assert read_lora(path).format == fmt
    names = load_lora(fresh, path)
    assert sorted(names) == sorted(lora_layers(model))
    torch.testing.assert_close(fresh(X), model(X), rtol=1e-5, atol=1e-6)
    # loading into a model that already has LoRA (e.g. resuming) replaces its weights
    other = _trained(seed=7)
    load_lora(other, path)
    torch.testing.assert_close(other(X), model(X), rtol=1e-5, atol=1e-6)


def test_strength_and_multiple_files(tmp_path):
    m1, m2 = _trained(seed=1), _trained(seed=2, rank=2, alpha=1)
    p1 = save_lora(m1, tmp_path / "a.safetensors", format="comfyui")
    p2 = save_lora(m2, tmp_path / "b.safetensors", format="kohya")
    base = _base()
    y0 = base(X)
    zero = _base()
    load_lora(zero, p1, strength=0.0)
    torch.testing.assert_close(zero(X), y0)

    # reference: sum of the two deltas, each with its own strength, computed by hand
    ref = _base()
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if name in lora_layers(m1):
                d1 = lora_layers(m1)[name].delta_weight()
                d2 = lora_layers(m2)[name].delta_weight()
                mod.weight += 0.7 * d1 + 0.5 * d2
    both = _base()
    load_lora(both, [p1, p2], strength=[0.7, 0.5])
    assert lora_layers(both)["blocks.0.q"].lora_rank == 6
    torch.testing.assert_close(both(X), ref(X), rtol=1e-5, atol=1e-5)


def test_peft_adapter_reproduces_peft_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(100)
    base = Net()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "o", "patch"], rank_pattern={"o": 2},
                          alpha_pattern={"patch": 3}, init_lora_weights=True)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.eval()
    expected = pm(X)
    pm.save_pretrained(tmp_path / "adapter")
    ours = copy.deepcopy(base)
    names = load_lora(ours, tmp_path / "adapter")
    assert sorted(names) == ["blocks.0.o", "blocks.0.q", "blocks.1.o", "blocks.1.q", "patch"]
    assert lora_layers(ours)["blocks.0.o"].lora_rank == 2
    torch.testing.assert_close(ours(X), expected, rtol=1e-5, atol=1e-6)
    # the file alone (no adapter_config.json beside it) lacks the alpha and loads at alpha == rank
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((tmp_path / "adapter" / "adapter_model.safetensors").read_bytes())
    assert read_lora(lone).format == "peft"


def test_diffusers_format_folds_scale_into_B(tmp_path):
    """PEFT readers of a diffusers file assume alpha == rank, so the file carries scale * B."""
    model = _trained()
    path = save_lora(model, tmp_path / "d.safetensors", format="diffusers")
    sd = load_file(str(path))
    assert not any(k.endswith(".alpha") for k in sd)
    # scale folded into B: B_file = scale * B
    torch.testing.assert_close(sd["transformer.blocks.0.attn.to_q.lora_B.weight"],
                               lora_layers(model)["blocks.0.q"].lora_B.detach() * 2.0)


def test_mismatched_file_lists_problems_and_leaves_model_untouched(tmp_path):
    model = _trained()
    good = save_lora(model, tmp_path / "g.safetensors", format="comfyui")
    sd = load_file(str(good))
    sd["diffusion_model.blocks.0.q.lora_A.weight"] = torch.zeros(4, 5)        # mis-shaped
    sd["diffusion_model.blocks.9.q.lora_A.weight"] = torch.zeros(4, 8)        # unexpected module
    sd["diffusion_model.blocks.9.q.lora_B.weight"] = torch.zeros(8, 4)
    sd["diffusion_model.blocks.0.o.diff_b"] = torch.zeros(8)                  # unsupported key
    del sd["diffusion_model.head.lora_B.weight"]                              # incomplete module
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    target = _trained(seed=9)
    snapshot = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError) as e:
        load_lora(target, bad)
    msg = str(e.value)
    assert "bad.safetensors" in msg and "mis-shaped 'blocks.0.q'" in msg and "blocks.9.q" in msg
    assert "diff_b" in msg and "'head' is missing its B" in msg and "missing module 'head'" in msg
    for k, v in target.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    fresh = _base()
    with pytest.raises(ValueError):
        load_lora(fresh, bad)
    assert not lora_layers(fresh)  # nothing injected on failure


def test_corrupt_missing_pickle_and_wrong_backbone(tmp_path):
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="c.safetensors"):
        load_lora(_base(), corrupt)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lora(_base(), tmp_path / "nope.safetensors")
    pkl = tmp_path / "x.pt"
    torch.save({}, pkl)
    with pytest.raises(ValueError, match="pickle"):
        load_lora(_base(), pkl)
    path = save_lora(_trained(), tmp_path / "w.safetensors", backbone="cogvideox")
    with pytest.raises(ValueError, match="cogvideox"):
        load_lora(_base(), path, backbone="wan_ti2v")


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_lora(_base(), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="unknown LoRA format"):
        save_lora(_trained(), tmp_path / "x.safetensors", format="ckpt")
