import copy
import json
import logging

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_core import FORMATS, KeyMap, inject_lora, load_lora, lora_layers, read_lora, save_lora
from lora_core.formats import LoRANaming
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


class _Unpicklable:
    pass


def test_corrupt_missing_pickle_and_wrong_backbone(tmp_path):
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="c.safetensors"):
        load_lora(_base(), corrupt)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lora(_base(), tmp_path / "nope.safetensors")
    pkl = tmp_path / "x.pt"
    torch.save({"w": _Unpicklable()}, pkl)  # loading it would run this module's code: refused
    with pytest.raises(ValueError, match=r"x\.pt is a pickle .*cannot be read without unpickling code"):
        load_lora(_base(), pkl)
    torch.save({}, pkl)
    with pytest.raises(ValueError, match="holds no tensors"):
        load_lora(_base(), pkl)
    path = save_lora(_trained(), tmp_path / "w.safetensors", backbone="cogvideox")
    with pytest.raises(ValueError, match="cogvideox"):
        load_lora(_base(), path, backbone="wan_ti2v")


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_lora(_base(), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="unknown LoRA format"):
        save_lora(_trained(), tmp_path / "x.safetensors", format="ckpt")


# -- several components in one file ----------------------------------------------------------------

class ToyUNet(nn.Module):
    """A conv and linears with diffusers-UNet-style names; reads the text encoder's states as context."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.down_blocks = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(8, 8)})])
        self.mid = nn.ModuleDict({"to_k": nn.Linear(8, 8), "to_out": nn.Linear(8, 8)})

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x).mean((2, 3))                                      # [B, 8]
        h = h + self.down_blocks[0]["proj"](h)
        return self.mid["to_out"](h * torch.tanh(self.mid["to_k"](ctx)).mean(1))


class ToyTextEncoder(nn.Module):
    """CLIP-text-style names (`text_model.encoder.layers.N.self_attn.q_proj`), as kohya's lora_te_ keys use."""

    def __init__(self) -> None:
        super().__init__()
        layer = lambda: nn.ModuleDict({"self_attn": nn.ModuleDict({"q_proj": nn.Linear(8, 8)}),  # noqa: E731
                                       "mlp": nn.ModuleDict({"fc1": nn.Linear(8, 16), "fc2": nn.Linear(16, 8)})})
        self.text_model = nn.Module()
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList([layer() for _ in range(2)])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = tokens                                                            # [B, L, 8]
        for lay in self.text_model.encoder.layers:
            h = h + lay["self_attn"]["q_proj"](h)
            h = h + lay["mlp"]["fc2"](torch.tanh(lay["mlp"]["fc1"](h)))
        return h


def _unet_to_ext(name: str) -> str:
    return name.replace("mid.", "mid_block.attentions.0.")


def _unet_from_ext(name: str) -> str:
    if name.startswith("mid."):
        raise ValueError(name)  # an own name is not an external one
    return name.replace("mid_block.attentions.0.", "mid.")


NAMINGS = {
    "unet": LoRANaming({"native": "unet.", "comfyui": "diffusion_model.", "diffusers": "unet.",
                        "kohya": "lora_unet_"}, KeyMap(_unet_to_ext, _unet_from_ext)),
    "text_encoder": LoRANaming({"native": "text_encoder.", "comfyui": "text_encoders.clip_l.",
                                "diffusers": "text_encoder.", "kohya": "lora_te_"}, KeyMap.identity()),
}
TOKENS = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))


def _pair(seed: int | None = None) -> dict[str, nn.Module]:
    torch.manual_seed(200)  # same base weights every time
    comps: dict[str, nn.Module] = {"unet": ToyUNet(), "text_encoder": ToyTextEncoder()}
    if seed is not None:
        inject_lora(comps["unet"], ["conv_in", "proj", "to_k", "to_out"], rank=4, alpha=8,
                    rank_pattern={"to_k": 2})
        inject_lora(comps["text_encoder"], ["q_proj", "fc1"], rank=3, alpha=1.5, use_rslora=True)
        for i, m in enumerate(comps.values()):
            _randomize_lora(m, seed + i)
    return comps


def _pair_out(comps: dict[str, nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    ctx = comps["text_encoder"](TOKENS)
    return ctx, comps["unet"](X, ctx)


@pytest.mark.parametrize("fmt", FORMATS)
def test_multi_component_round_trip_every_format(tmp_path, fmt):
    trained = _pair(seed=1)
    path = save_lora(trained, tmp_path / f"pair_{fmt}.safetensors", format=fmt, naming=NAMINGS, backbone="toy")
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert json.loads(meta["components"]) == ["unet", "text_encoder"] and meta["backbone"] == "toy"
    assert json.loads(meta["targets.text_encoder"]) == list(lora_layers(trained["text_encoder"]))
    assert "unet:conv_in" in json.loads(meta["targets"])
    te_key = {"native": "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A",
              "comfyui": "text_encoders.clip_l.text_model.encoder.layers.0.mlp.fc1.lora_A.weight",
              "diffusers": "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight",
              "kohya": "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"}[fmt]
    unet_key = {"native": "unet.mid.to_k.alpha", "comfyui": "diffusion_model.mid.to_k.alpha",
                "diffusers": "unet.mid_block.attentions.0.to_k.lora_A.weight",
                "kohya": "lora_unet_mid_to_k.alpha"}[fmt]
    assert te_key in keys and unet_key in keys
    lf = read_lora(path, NAMINGS)
    assert lf.format == fmt and not lf.unsupported and len(lf.modules) == 4 + 4
    assert set(lf.components.values()) == {"unet", "text_encoder"}
    fresh = _pair()
    names = load_lora(fresh, path, naming=NAMINGS)
    assert sorted(names) == sorted(f"{c}:{n}" for c, m in trained.items() for n in lora_layers(m))
    for got, want in zip(_pair_out(fresh), _pair_out(trained)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    resumed = _pair(seed=9)  # components that already carry LoRA get the file's weights
    load_lora(resumed, path, naming=NAMINGS)
    for got, want in zip(_pair_out(resumed), _pair_out(trained)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _hand_kohya() -> dict[str, torch.Tensor]:
    """An SD-style kohya file written by hand: per module lora_down [r, fan_in], lora_up [out, r], alpha."""
    g = torch.Generator().manual_seed(11)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    return {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": rnd(4, 8),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": rnd(8, 4),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0),
        "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_down.weight": rnd(2, 8),
        "lora_te_text_model_encoder_layers_1_mlp_fc1.lora_up.weight": rnd(16, 2),
        "lora_te_text_model_encoder_layers_1_mlp_fc1.alpha": torch.tensor(6.0),
        "lora_unet_conv_in.lora_down.weight": rnd(4, 3, 3, 3),
        "lora_unet_conv_in.lora_up.weight": rnd(8, 4, 1, 1),
        "lora_unet_conv_in.alpha": torch.tensor(1.0),
        "lora_unet_mid_to_k.lora_down.weight": rnd(4, 8),
        "lora_unet_mid_to_k.lora_up.weight": rnd(8, 4),  # no alpha: alpha == rank, scale 1
    }


def test_hand_written_kohya_two_components_match_formula(tmp_path, caplog):
    """First key lora_te_: detection from the first key alone read this as native and refused it."""
    sd = _hand_kohya()
    path = tmp_path / "sd15_kohya.safetensors"
    save_file(sd, str(path))
    assert next(iter(load_file(str(path)))).startswith("lora_te_")
    assert read_lora(path).format == "kohya" and not read_lora(path).unsupported
    comps = _pair()
    names = load_lora(comps, path, strength=0.5, naming=NAMINGS)
    assert sorted(names) == ["text_encoder:text_model.encoder.layers.0.self_attn.q_proj",
                             "text_encoder:text_model.encoder.layers.1.mlp.fc1", "unet:conv_in", "unet:mid.to_k"]
    ref = _pair()  # W + strength * alpha / r * up @ down, by hand
    with torch.no_grad():
        for comp, key, alpha in [("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", 2.0),
                                 ("text_encoder", "text_model.encoder.layers.1.mlp.fc1", 6.0),
                                 ("unet", "conv_in", 1.0), ("unet", "mid.to_k", None)]:
            stem = ("lora_te_" if comp == "text_encoder" else "lora_unet_") + key.replace(".", "_")
            down, up = sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"]
            r = down.shape[0]
            w = dict(ref[comp].named_modules())[key].weight
            w += (0.5 * (alpha if alpha is not None else r) / r * (up.flatten(1) @ down.flatten(1))).view(w.shape)
    for got, want in zip(_pair_out(comps), _pair_out(ref)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # into the UNet alone, the UNet part applies and the text-encoder keys are named: no component claims lora_te_
    unet = _pair()["unet"]
    with caplog.at_level(logging.WARNING, logger="lora_core.formats"):
        names = load_lora(unet, path, strength=0.5, naming=NAMINGS["unet"])
    assert sorted(names) == ["conv_in", "mid.to_k"]
    ctx = ref["text_encoder"](TOKENS).detach()  # the by-hand reference UNet, fed the same context
    torch.testing.assert_close(unet(X, ctx), ref["unet"](X, ctx), rtol=1e-5, atol=1e-6)
    warned = [r.getMessage() for r in caplog.records if r.name == "lora_core.formats"]
    assert len(warned) == 1 and "'lora_te_' (6 keys" in warned[0]
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in warned[0]
    lf = read_lora(path, NAMINGS["unet"])
    assert sorted(lf.skipped) == ["lora_te_"] and len(lf.skipped["lora_te_"]) == 6
    assert {pre for pre, _ in lf.modules} == {"lora_unet_"} and not lf.unsupported


def test_detection_counts_all_keys_and_names_foreign_ones(tmp_path):
    model = _trained()
    sd = load_file(str(save_lora(model, tmp_path / "c.safetensors", format="comfyui")))
    sd["lora_unet_blocks_0_q.lora_down.weight"] = torch.zeros(4, 8)  # one stray kohya key, sorted first
    mixed = tmp_path / "mixed.safetensors"
    save_file(sd, str(mixed))
    lf = read_lora(mixed)
    assert lf.format == "comfyui" and lf.foreign == {"lora_unet_blocks_0_q.lora_down.weight": "kohya"}
    assert len(lf.modules) == 6 and ("diffusion_model.", "blocks.0.q") in lf.modules
    with pytest.raises(ValueError, match=r"'lora_unet_blocks_0_q.lora_down.weight' \(a kohya key"):
        load_lora(_base(), mixed)


def test_diffusers_adapter_metadata_prefixed_per_component_and_plain(tmp_path):
    """diffusers pipelines write `<component>.lora_alpha`, a model's save_lora_adapter a plain `lora_alpha`."""
    g = torch.Generator().manual_seed(2)
    sd = {"unet.mid_block.attentions.0.to_k.lora_A.weight": torch.randn(4, 8, generator=g),
          "unet.mid_block.attentions.0.to_k.lora_B.weight": torch.randn(8, 4, generator=g),
          "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.randn(4, 8, generator=g),
          "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": torch.randn(16, 4, generator=g),
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 8, generator=g),
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 4, generator=g)}
    cfg = {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": False, "text_encoder.r": 4,
           "text_encoder.lora_alpha": 2, "text_encoder.alpha_pattern": {"fc1": 12}}
    path = tmp_path / "pipe.safetensors"
    save_file(sd, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(cfg)})
    comps = _pair()
    load_lora(comps, path, naming=NAMINGS)
    scales = {c: {n: m.lora_scale for n, m in lora_layers(comps[c]).items()} for c in comps}
    assert scales == {"unet": {"mid.to_k": 2.0},
                      "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": 0.5,
                                       "text_model.encoder.layers.0.mlp.fc1": 3.0}}
    plain = tmp_path / "model.safetensors"
    save_file({k.replace("unet.", "transformer.").replace("mid_block.attentions.0.to_k", "blocks.0.attn.to_q"): v
               for k, v in sd.items() if k.startswith("unet.")}, str(plain),
              metadata={"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 12, "use_rslora": True})})
    single = _base()
    load_lora(single, plain)
    assert lora_layers(single)["blocks.0.q"].lora_scale == 6.0  # rsLoRA: 12 / sqrt(4)


def test_multi_component_save_and_load_errors(tmp_path):
    trained = _pair(seed=1)
    with pytest.raises(ValueError, match="naming"):
        save_lora(trained, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="one LoRANaming per component"):
        save_lora(trained, tmp_path / "x.safetensors", naming={"unet": NAMINGS["unet"]})
    with pytest.raises(ValueError, match="both use the native prefix 'unet.'"):
        save_lora(trained, tmp_path / "x.safetensors",
                  naming={"unet": NAMINGS["unet"], "text_encoder": LoRANaming({"native": "unet."})})
    no_kohya = {**NAMINGS, "text_encoder": LoRANaming({"native": "text_encoder."})}
    with pytest.raises(ValueError, match="component 'text_encoder' has no kohya naming"):
        save_lora(trained, tmp_path / "x.safetensors", format="kohya", naming=no_kohya)
    with pytest.raises(ValueError, match="none of the components"):
        save_lora(_pair(), tmp_path / "x.safetensors", naming=NAMINGS)
    with pytest.raises(ValueError, match="unknown formats"):
        LoRANaming({"safetensors": ""})
    # a component without LoRA is skipped; loading that file where the text encoder has LoRA names the gap
    unet_only = {"unet": trained["unet"], "text_encoder": ToyTextEncoder()}
    path = save_lora(unet_only, tmp_path / "u.safetensors", format="kohya", naming=NAMINGS)
    assert json.loads(read_lora(path).metadata["components"]) == ["unet"]
    with pytest.raises(ValueError, match="missing module 'text_encoder:text_model.encoder.layers.0.mlp.fc1'"):
        load_lora(_pair(seed=2), path, naming=NAMINGS)


def test_default_naming_is_the_single_module_behaviour(tmp_path):
    naming = LoRANaming.default(Net.lora_key_map)
    assert naming.prefixes == {"native": "", "comfyui": "diffusion_model.", "diffusers": "transformer.",
                               "kohya": "lora_unet_", "peft": "base_model.model."}
    model = _trained()
    a = load_file(str(save_lora(model, tmp_path / "a.safetensors", format="diffusers")))
    b = load_file(str(save_lora(model, tmp_path / "b.safetensors", format="diffusers", naming=naming)))
    assert a.keys() == b.keys()
    c = load_file(str(save_lora(model, tmp_path / "c.safetensors", format="diffusers",
                                naming=LoRANaming.default(Net.lora_key_map, diffusers="denoiser."))))
    assert "denoiser.blocks.0.attn.to_q.lora_A.weight" in c  # the naming's prefix wins over KeyMap.prefix
    assert hash(naming) == hash(LoRANaming.default(Net.lora_key_map))
