"""`--backbone sd15` end to end on the tiny preset: training through train.main (kohya LoRA, loss falls,
exact resume, validation images, the text encoder with its own learning rate), the published weight layouts
(diffusers folder, LDM single file, .ckpt, separate VAE, tokenizer source) loaded unchanged, LoRA interop with
diffusers + PEFT, infer.py (merge, --save-merged, samplers) and the meta-device parameter counts.

Oracles: diffusers 0.42 (`UNet2DConditionModel`, `AutoencoderKL`, its single-file converters, its LoRA
loader and writer), PEFT (`LoraConfig`, `get_peft_model_state_dict`) and transformers (`CLIPTextModel`,
`CLIPTokenizer`), all with the same random weights; never our own writer read back by our own reader alone.

Shapes: latents [B, 4, 32, 32] of 64x64 images (the tiny VAE compresses 2x), text [B, 77, 32] on the tiny
preset; the UNet parity inputs are [2, 4, 16, 16] with text [2, 7, 32].
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.oracle import randomize_

import infer
import train
from backbones.encoders.clip import LDM_CLIP_PREFIX, POSITION_IDS_KEY, clip_to_ldm
from backbones.encoders.clip_tokenizer import CLIPTokenizer, build_tiny_clip_tokenizer
from backbones.registry import get_backbone
from backbones.sd import checkpoint as ck
from backbones.sd.sd15 import UNET_NAMING, SD15Spec
from backbones.sd.unet import UNET_PRESETS
from backbones.sd.unet_ldm_keymap import unet_to_ldm
from backbones.sd.vae_ldm_keymap import LDM_VAE_PREFIX, convert_vae_ldm_state_dict
from backbones.spec import Batch, Sources
from lora_core.distributed import DistInfo
from lora_core.formats import load_lora, read_lora

ROOT = Path(__file__).resolve().parents[3]
TINY_UNET = UNET_PRESETS["tiny"]
UNET_PREFIX = "model.diffusion_model."
# diffusers' constructor arguments for the tiny preset (the same values as UNET_PRESETS["tiny"])
TINY_UNET_KW = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
                    attention_head_dim=2)
# 4 Transformer2DModels (down 0, mid, up 1 x 2 layers) x attn1/attn2 x to_q/to_k/to_v/to_out.0
TINY_ATTN_MODULES = 32
TINY_TE_MODULES = 2 * 6  # 2 CLIP layers x q/k/v/out_proj, fc1, fc2
CAPTIONS = ["a red ball on green grass", "a blue sky over the city", "a woman in a red light", "night street art",
            "a green tree by the water", "the sun over a house"]
ATTN_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()




def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    unequal = [k for k in a if not torch.equal(a[k].float(), b[k].float())]
    assert not unequal, unequal[:5]


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


class NotAStateDict:
    """Pickled into a .ckpt: loading it would need this class's code, which a weights-only load refuses."""

    def __init__(self) -> None:
        self.weights = {"x": torch.zeros(2)}


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sd15")


@pytest.fixture(scope="module")
def images(root: Path) -> Path:
    """Six captioned images (64x64 and 80x96, to be resized and cropped) and a captioned video beside them."""
    from lora_core.data.video_io import write_video
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        h, w = (64, 64) if i % 2 else (80, 96)
        img = np.zeros((h, w, 3), np.uint8)
        img[..., i % 3] = 180
        img[rng.integers(0, h // 2):, rng.integers(0, w // 2):] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(caption + "\n")
    clip = torch.rand(3, 5, 32, 32) * 2 - 1  # [C, F, H, W] in [-1, 1]
    write_video(clip, folder / "clip.mp4", fps=8)
    (folder / "clip.txt").write_text("a moving ball\n")
    return folder


def sd15_args(images: Path, out: Path, root: Path, *extra: str) -> list[str]:
    return ["--backbone", "sd15", "--preset", "tiny", "--data", str(images), "--output", str(out),
            f"train.cache_dir={root / 'cache'}", "train.log_every=0", *extra]


def run(images: Path, out: Path, root: Path, *extra: str) -> int:
    return train.main(sd15_args(images, out, root, *extra))


TRAIN_STEPS = 40
PROMPTS = ["a red ball", "a blue sky"]


@pytest.fixture(scope="module")
def trained(images: Path, root: Path) -> Path:
    """40 steps at lr 1e-2 (the preset default 1e-3 needs ~4x the steps for a clear fall), sampling both
    validation prompts every 20 steps."""
    out = root / "run"
    assert run(images, out, root, "--max-steps", str(TRAIN_STEPS), "optim.lr=1e-2", "validation.every=20",
               f"validation.prompts={json.dumps(PROMPTS)}") == 0
    return out


def tiny_unet() -> nn.Module:
    return get_backbone("sd15").build("tiny", {"unet"})["unet"]


# --------------------------------------------------------------------------------- 1. training end to end
def test_dataset_reports_and_skips_the_video(images: Path, root: Path) -> None:
    cfg, spec = train.resolve_config(train.parse_args(sd15_args(images, root / "unused", root)))
    ds = train.prepare_dataset(cfg, spec, DistInfo())
    assert len(ds) == len(CAPTIONS)
    assert all(s.path.suffix == ".png" for s in ds.samples)
    (path, reason), = ds.report.skipped.items()
    assert path.endswith("clip.mp4") and "video" in reason
    assert {ds.caption(i) for i in range(len(ds))} == set(CAPTIONS)


def test_trains_a_kohya_lora_whose_loss_falls(trained: Path, images: Path, root: Path) -> None:
    lora = trained / "lora.safetensors"
    sd = load_file(str(lora))
    lf = read_lora(lora)
    assert lf.format == "kohya" and lf.metadata["backbone"] == "sd15"
    assert lf.metadata["ss_network_module"] == "networks.lora"
    assert len(lf.modules) == TINY_ATTN_MODULES
    assert all(k.startswith("lora_unet_") for k in sd)
    base = "lora_unet_" + ATTN_Q.replace(".", "_")
    assert base == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{base}.lora_down.weight"].shape == (4, 32) and sd[f"{base}.lora_up.weight"].shape == (32, 4)
    assert sd[f"{base}.alpha"].item() == 4.0
    assert sd["lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight"].abs().max() > 0
    assert len(losses(trained)) == TRAIN_STEPS

    # the objective over every cached sample with fixed draws, before and after the LoRA
    cfg, spec = train.resolve_config(train.parse_args(sd15_args(images, root / "unused", root)))
    ds = train.prepare_dataset(cfg, spec, DistInfo())
    cached = train.prepare_cache(cfg, spec, ds, DistInfo(), torch.device("cpu"))
    entries = [(cached.cache.get(cached.media[i]), cached.cache.get(cached.text[i])) for i in cached.usable]
    assert len(entries) == len(CAPTIONS)
    assert entries[0][0]["latent_mean"].shape == (4, 32, 32)  # the tiny VAE compresses 2x
    assert entries[0][1]["text"].shape == (77, 32)  # the frozen text encoder's encoding is cached
    unet = tiny_unet()

    draws = 8  # per sample, each with its own seed: the same timesteps and noise before and after
    batch = Batch({"latent_mean": [m["latent_mean"] for m, _ in entries] * draws,
                   "latent_logvar": [m["latent_logvar"] for m, _ in entries] * draws,
                   "text": [t["text"] for _, t in entries] * draws},
                  [{}] * (draws * len(entries)), [900 + k for k in range(draws * len(entries))])

    def eval_loss() -> float:
        with torch.no_grad():
            return spec.training_loss({"unet": unet}, batch, cfg.objective).item()

    before = eval_loss()
    load_lora(unet, lora, naming=UNET_NAMING)
    after = eval_loss()
    print(f"sd15 tiny: objective on fixed draws {before:.4f} -> {after:.4f} after {TRAIN_STEPS} steps")
    assert after < 0.85 * before, (before, after)


def test_validation_images_are_written(trained: Path) -> None:
    files = sorted((trained / "samples").glob("*.png"))
    assert [f.name for f in files] == [f"step{s:06d}_{i}.png" for s in (20, 40) for i in range(len(PROMPTS))]
    arrays = {f.name: png(f) for f in files}
    assert all(a.shape == (64, 64, 3) and a.std() > 0 for a in arrays.values())
    assert not np.array_equal(arrays["step000020_0.png"], arrays["step000020_1.png"])   # the prompt matters
    assert not np.array_equal(arrays["step000020_0.png"], arrays["step000040_0.png"])   # the LoRA changed


def test_resume_is_exact(images: Path, root: Path) -> None:
    straight, resumed = root / "straight", root / "resumed"
    common = ["lora.dropout=0.1", "data.condition_dropout={caption: 0.3}", "lora.save_dtype=fp32"]
    assert run(images, straight, root, "--max-steps", "6", *common) == 0
    assert run(images, resumed, root, "--max-steps", "3", "train.ckpt_every=3", *common) == 0
    assert (resumed / "checkpoints" / "step-3" / "state.json").is_file()
    assert run(images, resumed, root, "--max-steps", "6", "--resume", "latest", *common) == 0
    a, b = losses(straight), losses(resumed)
    assert [json.loads(x)["step"] for x in open(resumed / "metrics.jsonl")] == list(range(1, 7))
    assert a == b, (a, b)
    same_state(load_file(str(straight / "lora.safetensors")), load_file(str(resumed / "lora.safetensors")))


# ------------------------------------------------------------------------------ 2. text-encoder LoRA
def test_text_encoder_lora_trains_with_its_own_learning_rate(images: Path, root: Path, monkeypatch) -> None:
    spec = get_backbone("sd15")
    calls: list[set[str]] = []
    real_build = spec.build

    def build(preset, parts, *a, **kw):  # noqa: ANN001, ANN202
        calls.append(set(parts))
        return real_build(preset, parts, *a, **kw)

    monkeypatch.setattr(spec, "build", build)
    te = ["components={text_encoder: {mode: lora, lr: 5e-5}}", "optim.lr=1e-3", "lora.save_dtype=fp32",
          "data.condition_dropout={caption: 0.5}"]  # dropped captions take the empty text's token ids
    out = root / "te"
    steps = 8
    assert run(images, out, root, "--max-steps", str(steps), *te) == 0
    # the text cache needed only the tokenizer; the text encoder was built once, to train
    assert {"tokenizer"} in calls
    assert [c for c in calls if "text_encoder" in c] == [{"unet", "text_encoder"}]

    sd = load_file(str(out / "lora.safetensors"))
    te_keys, unet_keys = [k for k in sd if k.startswith("lora_te_")], [k for k in sd if k.startswith("lora_unet_")]
    assert len(te_keys) + len(unet_keys) == len(sd)
    assert len(te_keys) == 3 * TINY_TE_MODULES and len(unet_keys) == 3 * TINY_ATTN_MODULES
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in sd
    te_up = max(sd[k].abs().max().item() for k in te_keys if k.endswith("lora_up.weight"))
    unet_up = max(sd[k].abs().max().item() for k in unet_keys if k.endswith("lora_up.weight"))
    # B starts at zero and Adam moves a weight by about lr per step: the text encoder trained, at its own rate
    assert 0 < te_up <= 2 * steps * 5e-5 and unet_up > 5 * te_up, (te_up, unet_up)

    cfg, spec_ = train.resolve_config(train.parse_args(sd15_args(images, root / "unused", root, *te)))
    trainer = train.build_models(cfg, spec_, DistInfo())
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups == {"unet": pytest.approx(1e-3), "text_encoder": pytest.approx(5e-5)}
    ds = train.prepare_dataset(cfg, spec_, DistInfo())
    cached = train.prepare_cache(cfg, spec_, ds, DistInfo(), torch.device("cpu"))
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.CLIPTokenizer.from_pretrained(str(build_tiny_clip_tokenizer(root / "hf_tok")))
    for i in cached.usable:
        entry = cached.cache.get(cached.text[i])
        assert set(entry) == {"text"} and entry["text"].dtype == torch.int64  # token ids, not encodings
        want = hf_tok(ds.caption(i), padding="max_length", max_length=77, truncation=True).input_ids
        assert entry["text"].tolist() == want


# ------------------------------------------------------------------------------ 3. weight layouts
@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    """Random tiny UNet / VAE / text encoder (every parameter random), and a second VAE."""
    comps = SD15Spec().build("tiny", {"unet", "vae", "text_encoder"})
    out = {n: {k: v.detach().clone() for k, v in randomize_(comps[n], s).state_dict().items()}
           for n, s in (("unet", 1), ("vae", 2), ("text_encoder", 3))}
    out["vae2"] = {k: v.detach().clone() for k, v in randomize_(comps["vae"], 4).state_dict().items()}
    return out


def diffusers_vae(sd: dict[str, torch.Tensor]) -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                  layers_per_block=1, norm_num_groups=8, sample_size=32)
    vae.load_state_dict(sd, strict=True)
    return vae


def ldm_state_dict(w: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The weights as one SD1.x single file, with what real ones carry besides (position_ids, schedule)."""
    sd = {UNET_PREFIX + unet_to_ldm(k, TINY_UNET): v for k, v in w["unet"].items()}
    sd.update({LDM_VAE_PREFIX + k: v for k, v in convert_vae_ldm_state_dict(w["vae"], to="ldm").items()})
    sd.update({clip_to_ldm(k): v for k, v in w["text_encoder"].items()})
    sd[LDM_CLIP_PREFIX + POSITION_IDS_KEY] = torch.arange(77)[None]
    sd["alphas_cumprod"] = torch.linspace(1, 0.01, 1000)
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def layouts(root: Path, weights) -> dict[str, Path]:
    """The same weights as a diffusers folder (written by diffusers/transformers' save_pretrained), an LDM
    .safetensors single file, and two .ckpt files (a flat dict, and LDM's {"state_dict": ...})."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    folder = root / "diffusers_folder"
    unet = diffusers.UNet2DConditionModel(**TINY_UNET_KW)
    unet.load_state_dict(weights["unet"], strict=True)
    unet.save_pretrained(folder / "unet")
    diffusers_vae(weights["vae"]).save_pretrained(folder / "vae")
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=638, eos_token_id=639, pad_token_id=639))
    own = te.state_dict()  # transformers 5 names its keys without `text_model.`; older versions with it
    strip = not any(k.startswith("text_model.") for k in own)
    te.load_state_dict({(k.removeprefix("text_model.") if strip else k): v
                        for k, v in weights["text_encoder"].items()}, strict=False)
    same_state({k: v for k, v in te.state_dict().items() if "position_ids" not in k},
               {(k.removeprefix("text_model.") if strip else k): v for k, v in weights["text_encoder"].items()})
    te.save_pretrained(folder / "text_encoder")
    build_tiny_clip_tokenizer(folder / "tokenizer")

    single = root / "single"  # no tokenizer/ beside these files
    single.mkdir()
    ldm = ldm_state_dict(weights)
    save_file(ldm, str(single / "model.safetensors"))
    torch.save(ldm, single / "flat.ckpt")
    torch.save({"state_dict": ldm, "global_step": 1}, single / "nested.ckpt")
    return {"folder": folder, "tokenizer": folder / "tokenizer", "safetensors": single / "model.safetensors",
            "ckpt": single / "flat.ckpt", "nested_ckpt": single / "nested.ckpt"}


def test_ldm_file_agrees_with_diffusers_converters(weights) -> None:
    """The single file built with our key maps reads back through diffusers' own converters."""
    sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
    diffusers = pytest.importorskip("diffusers")
    ldm = ldm_state_dict(weights)
    unet_cfg = dict(diffusers.UNet2DConditionModel(**TINY_UNET_KW).config)
    theirs = sfu.convert_ldm_unet_checkpoint(ldm, unet_cfg)
    same_state(theirs, weights["unet"])
    vae_cfg = {"down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    same_state(sfu.convert_ldm_vae_checkpoint(ldm, vae_cfg), weights["vae"])
    clip = sfu.convert_ldm_clip_checkpoint(ldm)
    clip.pop(POSITION_IDS_KEY)
    same_state(clip, weights["text_encoder"])


ALL = {"unet", "vae", "text_encoder"}


@pytest.mark.parametrize("layout", ["folder", "safetensors", "ckpt", "nested_ckpt"])
def test_every_layout_loads_the_same_weights(layouts, weights, layout: str) -> None:
    spec = SD15Spec()
    extra = {} if layout == "folder" else {"tokenizer": layouts["tokenizer"]}
    comps = spec.build("tiny", ALL, Sources(ckpt_dir=layouts[layout], extra=extra))
    for part in sorted(ALL):
        same_state(comps[part].state_dict(), weights[part])
    text = ["a red ball"]
    assert torch.equal(comps["tokenizer"](text), CLIPTokenizer(layouts["tokenizer"])(text))


def test_a_ckpt_that_needs_code_is_refused(root: Path) -> None:
    bad = root / "pickled.ckpt"
    torch.save({"state_dict": NotAStateDict()}, bad)
    with pytest.raises(ValueError, match=r"pickled\.ckpt.*convert it to \.safetensors"):
        SD15Spec().build("tiny", {"unet"}, Sources(ckpt_dir=bad))


def test_single_file_needs_a_tokenizer_source(root: Path, layouts, weights) -> None:
    spec = SD15Spec()
    single = layouts["safetensors"]
    with pytest.raises(FileNotFoundError, match=r"model\.sources\.tokenizer"):
        spec.build("tiny", ALL, Sources(ckpt_dir=single))
    with pytest.raises(FileNotFoundError, match=r"model\.sources\.tokenizer"):
        spec.check_sources("tiny", Sources(ckpt_dir=single), {"unet", "tokenizer"})
    same_state(spec.build("tiny", {"unet"}, Sources(ckpt_dir=single))["unet"].state_dict(), weights["unet"])
    # a tokenizer/ folder beside the file is found without model.sources.tokenizer
    beside = root / "beside"
    beside.mkdir()
    (beside / "model.safetensors").symlink_to(single)
    build_tiny_clip_tokenizer(beside / "tokenizer")
    comps = spec.build("tiny", {"text_encoder"}, Sources(ckpt_dir=beside / "model.safetensors"))
    same_state(comps["text_encoder"].state_dict(), weights["text_encoder"])
    assert Path(comps["tokenizer"].source) == beside / "tokenizer"


@pytest.mark.parametrize("kind", ["ldm_bare", "ldm_prefixed", "diffusers_file", "diffusers_folder"])
def test_a_separate_vae_replaces_the_checkpoints(root: Path, layouts, weights, kind: str) -> None:
    vae2 = weights["vae2"]
    path = root / f"vae_{kind}.safetensors"
    if kind == "ldm_bare":
        save_file({k: v.contiguous() for k, v in convert_vae_ldm_state_dict(vae2, to="ldm").items()}, str(path))
    elif kind == "ldm_prefixed":
        save_file({LDM_VAE_PREFIX + k: v.contiguous()
                   for k, v in convert_vae_ldm_state_dict(vae2, to="ldm").items()}, str(path))
    elif kind == "diffusers_file":
        save_file(vae2, str(path))
    else:
        path = root / "vae2_folder"
        diffusers_vae(vae2).save_pretrained(path)
    sources = Sources(ckpt_dir=layouts["safetensors"], extra={"vae": path, "tokenizer": layouts["tokenizer"]})
    comps = SD15Spec().build("tiny", ALL, sources)
    same_state(comps["vae"].state_dict(), vae2)
    same_state(comps["unet"].state_dict(), weights["unet"])


def test_wrong_or_truncated_files_fail_before_any_load(root: Path, layouts, weights, monkeypatch) -> None:
    def no_load(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("weights were loaded before the sources were checked")

    monkeypatch.setattr(ck, "load", no_load)
    spec = SD15Spec()
    tok = {"tokenizer": layouts["tokenizer"]}
    data = layouts["safetensors"].read_bytes()
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(truncated))):
        spec.build("tiny", ALL, Sources(ckpt_dir=truncated, extra=tok))
    ldm = ldm_state_dict(weights)
    ldm.pop(UNET_PREFIX + "input_blocks.0.0.weight")  # conv_in
    ldm[UNET_PREFIX + "out.2.weight"] = torch.zeros(4, 32, 5, 5)
    wrong = root / "wrong.safetensors"
    save_file(ldm, str(wrong))
    with pytest.raises(ValueError, match=re.escape(str(wrong)) + r".*1 missing.*conv_in\.weight.*mis-shaped"):
        spec.build("tiny", ALL, Sources(ckpt_dir=wrong, extra=tok))
    with pytest.raises(ValueError, match=re.escape(str(truncated))):
        spec.build("tiny", ALL, Sources(ckpt_dir=layouts["safetensors"], extra={**tok, "vae": truncated}))
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        spec.build("tiny", ALL, Sources(ckpt_dir=root / "nowhere.safetensors", extra=tok))
    with pytest.raises(ValueError, match="model.sources.motion_module"):
        spec.check_sources("tiny", Sources(ckpt_dir=layouts["folder"], extra={"motion_module": truncated}), ALL)
    # train.py checks the sources before it scans the data or builds anything
    with pytest.raises(ValueError, match=re.escape(str(wrong))):
        train.main(["--backbone", "sd15", "--preset", "tiny", "--ckpt-dir", str(wrong), "--data",
                    str(root / "no_data_here"), "--output", str(root / "never"),
                    f"model.sources={{tokenizer: {layouts['tokenizer']}}}"])
    assert not (root / "never").exists()


# ------------------------------------------------------------------------------ 4. LoRA interop
def diffusers_unet(sd: dict[str, torch.Tensor]) -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.UNet2DConditionModel(**TINY_UNET_KW).eval()
    ref.load_state_dict(sd, strict=True)
    return ref


def merged_from_training(base: dict[str, torch.Tensor], trainable: Path) -> tuple[dict[str, torch.Tensor], float]:
    """The base weights with W + scale * B @ A of a run's final training state (its fp32 LoRA masters and
    scales, `checkpoints/step-N/trainable.safetensors`): what the run trained, independent of any LoRA file."""
    state = load_file(str(trainable))
    merged = {k: v.clone() for k, v in base.items()}
    scales = set()
    for key in [k for k in state if k.endswith(".lora_A")]:
        name = key[len("unet/"):-len(".lora_A")]
        scale = state[f"unet/{name}.lora_scale"].item()
        merged[f"{name}.weight"] += scale * state[f"unet/{name}.lora_B"] @ state[key]
        scales.add(scale)
    (scale,) = scales
    return merged, scale


def diffusers_load_lora(ref: nn.Module, file: Path) -> None:
    """diffusers' own reading of an SD LoRA file: `StableDiffusionPipeline.lora_state_dict` (with the stored
    LoraConfig, `lora_adapter_metadata`, when the file has one), then `load_lora_adapter` under `unet.`."""
    pipe_cls = pytest.importorskip("diffusers").StableDiffusionPipeline
    state, alphas, metadata = pipe_cls.lora_state_dict(str(file), return_lora_metadata=True)
    ref.load_lora_adapter(state, prefix="unet", network_alphas=None if metadata else alphas, metadata=metadata)


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=g)


@torch.no_grad()
def ours_out(unet: nn.Module) -> torch.Tensor:
    x, t, ctx = unet_inputs()
    return unet.eval()(x, t, ctx)


@torch.no_grad()
def theirs_out(ref: nn.Module) -> torch.Tensor:
    x, t, ctx = unet_inputs()
    return ref(x, t, encoder_hidden_states=ctx).sample


def test_diffusers_format_lora_loads_in_diffusers(images: Path, root: Path) -> None:
    """Trained with alpha 8 at rank 4 (scale 2, folded into B: diffusers files carry no alpha)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    out = root / "diffusers_fmt"
    assert run(images, out, root, "--max-steps", "6", "optim.lr=1e-2", "lora.alpha=8", "lora.save_format=diffusers",
               "lora.save_dtype=fp32") == 0
    lora = out / "lora.safetensors"
    sd = load_file(str(lora))
    assert len(sd) == 2 * TINY_ATTN_MODULES
    assert f"unet.{ATTN_Q}.lora_A.weight" in sd and all(k.startswith("unet.") for k in sd)
    base = tiny_unet()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    base_out = ours_out(base)
    ref = diffusers_unet(base_sd)
    diffusers_load_lora(ref, lora)
    load_lora(base, lora, naming=UNET_NAMING)
    mine, theirs = ours_out(base), theirs_out(ref)
    err, delta_err = rel_err(mine, theirs), rel_err(mine - base_out, theirs - base_out)
    print(f"project diffusers-format LoRA in diffusers: rel err {err:.2e}, of the LoRA's effect {delta_err:.2e}")
    assert (theirs - base_out).abs().max() > 1e-3  # the LoRA does something
    assert err <= 1e-5 and delta_err <= 1e-4
    # ... and it is what the run trained (scale 2 included): diffusers' UNet with the training state merged
    merged, scale = merged_from_training(base_sd, out / "checkpoints" / "step-6" / "trainable.safetensors")
    assert scale == 2.0
    trained_out = theirs_out(diffusers_unet(merged))
    assert rel_err(theirs - base_out, trained_out - base_out) <= 1e-4


def test_peft_lora_saved_by_diffusers_loads_in_the_project(root: Path, weights) -> None:
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict
    ref = diffusers_unet(weights["unet"])
    base_out = theirs_out(ref)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                             init_lora_weights=False)  # B random, not zero
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)  # PEFT draws A and B from the global generator
        ref.add_adapter(config)
    theirs = theirs_out(ref)
    folder = root / "peft_lora"
    diffusers.StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(ref),
        unet_lora_adapter_metadata=ref.peft_config["default"].to_dict())
    file = folder / "pytorch_lora_weights.safetensors"
    keys = load_file(str(file))
    assert len(keys) == 2 * TINY_ATTN_MODULES and f"unet.{ATTN_Q}.lora_B.weight" in keys

    ours = SD15Spec().build("tiny", {"unet"})["unet"]
    ours.load_state_dict(weights["unet"])
    names = load_lora(ours, file, naming=UNET_NAMING)
    assert len(names) == TINY_ATTN_MODULES
    mine = ours_out(ours)
    err, delta_err = rel_err(mine, theirs), rel_err(mine - base_out, theirs - base_out)
    print(f"diffusers+PEFT LoRA (alpha 12, r 4) in the project: rel err {err:.2e}, of its effect {delta_err:.2e}")
    assert (theirs - base_out).abs().max() > 1e-2
    assert err <= 1e-5 and delta_err <= 1e-4

    # what diffusers itself reads back from that file, the project reads too
    back = diffusers_unet(weights["unet"])
    diffusers_load_lora(back, file)
    assert rel_err(mine, theirs_out(back)) <= 1e-5


def test_kohya_files_load_in_diffusers_and_in_ldm_names(trained: Path, root: Path) -> None:
    """The project's kohya file (diffusers module names, `.alpha`) gives in diffusers' kohya reader what it
    gives in the project; the same file renamed to LDM module names (`lora_unet_input_blocks_1_1_...`, as
    A1111-era tools write them) loads through the spec's naming onto the same layers."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    file = trained / "lora.safetensors"
    sd = load_file(str(file))
    unet = tiny_unet()
    base_sd = {k: v.clone() for k, v in unet.state_dict().items()}
    base_out = ours_out(unet)
    ref = diffusers_unet(base_sd)
    diffusers_load_lora(ref, file)
    theirs = theirs_out(ref)
    naming = get_backbone("sd15").components("tiny")["unet"].naming
    load_lora(unet, file, naming=naming)
    mine = ours_out(unet)
    err, delta_err = rel_err(mine, theirs), rel_err(mine - base_out, theirs - base_out)
    print(f"project kohya LoRA in diffusers: rel err {err:.2e}, of its effect {delta_err:.2e}")
    assert (theirs - base_out).abs().max() > 1e-3
    assert err <= 1e-5 and delta_err <= 1e-4
    # what the run trained (its fp32 state), up to the file's bf16 rounding of A and B
    final_state = trained / "checkpoints" / f"step-{TRAIN_STEPS}" / "trainable.safetensors"
    merged, scale = merged_from_training(base_sd, final_state)
    assert scale == 1.0  # alpha 4, rank 4
    trained_err = rel_err(theirs - base_out, theirs_out(diffusers_unet(merged)) - base_out)
    print(f"  vs the trained fp32 state: rel err of the effect {trained_err:.2e}")
    assert trained_err <= 2e-2

    modules = {n.replace(".", "_"): n for n, _ in unet.named_modules()}
    renamed = {}
    for k, v in sd.items():
        body, _, role = k[len("lora_unet_"):].partition(".")
        renamed["lora_unet_" + unet_to_ldm(modules[body], TINY_UNET).replace(".", "_") + "." + role] = v
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in renamed
    assert "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_out_0.alpha" in renamed
    ldm_file = root / "kohya_ldm.safetensors"
    save_file(renamed, str(ldm_file))
    fresh = tiny_unet()
    assert len(load_lora(fresh, ldm_file, naming=naming)) == TINY_ATTN_MODULES
    assert torch.equal(ours_out(fresh), mine)
    with pytest.raises(ValueError, match=r"input_blocks_1_1_transformer_blocks_0_attn1_to_q.*no Linear/Conv"):
        load_lora(tiny_unet(), ldm_file, naming=UNET_NAMING)  # the plain naming knows only diffusers names


# ------------------------------------------------------------------------------ 5. infer.py
def test_infer_merges_samples_and_exports_a_diffusers_folder(trained: Path, root: Path) -> None:
    lora = trained / "lora.safetensors"
    plain, merged = root / "plain.png", root / "merged.png"
    assert infer.main(["--backbone", "sd15", "--preset", "tiny", "--prompt", "a red ball", "--output",
                       str(plain)]) == plain
    assert infer.main(["--backbone", "sd15", "--preset", "tiny", "--lora", f"{lora}:0.8", "--merge", "--prompt",
                       "a red ball", "--output", str(merged)]) == merged
    a, b = png(plain), png(merged)
    assert a.shape == b.shape == (64, 64, 3) and b.std() > 0
    assert not np.array_equal(a, b)

    out = root / "merged_folder"
    assert infer.main(["--backbone", "sd15", "--preset", "tiny", "--lora", f"{lora}:0.8",
                       "--save-merged", str(out)]) == 0
    for f in ("unet/diffusion_pytorch_model.safetensors", "unet/config.json", "vae/config.json",
              "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json",
              "model_index.json"):
        assert (out / f).is_file(), f
    # expected: W + 0.8 * alpha / rank * up @ down, computed here from the file's tensors
    base = tiny_unet().state_dict()
    sd = load_file(str(lora))
    names = {n.replace(".", "_"): n for n in (k.rsplit(".", 1)[0] for k in base)}
    want = {k: v.clone() for k, v in base.items()}
    for key in [k for k in sd if k.endswith(".lora_down.weight")]:
        body = key[len("lora_unet_"):-len(".lora_down.weight")]
        up, down, alpha = (sd[key.replace("lora_down.weight", s)].float()
                           for s in ("lora_up.weight", "lora_down.weight", "alpha"))
        name = names[body] + ".weight"
        want[name] = base[name] + 0.8 * alpha.item() / down.shape[0] * (up @ down)
    back = SD15Spec().build("tiny", {"unet"}, Sources(ckpt_dir=out))["unet"].state_dict()
    changed = [k for k in base if not torch.equal(base[k], want[k])]
    assert len(changed) == TINY_ATTN_MODULES
    for k in base:
        torch.testing.assert_close(back[k], want[k], rtol=1e-6, atol=1e-7)
    # --ckpt-dir of the export samples what the in-memory merge sampled
    again = root / "again.png"
    assert infer.main(["--backbone", "sd15", "--preset", "tiny", "--ckpt-dir", str(out), "--prompt", "a red ball",
                       "--output", str(again)]) == again
    assert np.abs(png(again).astype(int) - b.astype(int)).max() <= 1

    # diffusers and transformers load the export as the same networks
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    ours = SD15Spec().build("tiny", {"vae", "text_encoder"}, Sources(ckpt_dir=out))
    same_state(diffusers.UNet2DConditionModel.from_pretrained(out / "unet").state_dict(), back)
    same_state(diffusers.AutoencoderKL.from_pretrained(out / "vae").state_dict(), ours["vae"].state_dict())
    te = transformers.AutoModel.from_pretrained(out / "text_encoder")
    assert type(te).__name__ == "CLIPTextModel"
    own = {k.removeprefix("text_model."): v for k, v in ours["text_encoder"].state_dict().items()}
    same_state({k.removeprefix("text_model."): v for k, v in te.state_dict().items() if "position_ids" not in k}, own)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_infer_samplers_run(root: Path, sampler: str) -> None:
    ddim = root / "ddim.png"
    if not ddim.is_file():
        infer.main(["--backbone", "sd15", "--preset", "tiny", "--prompt", "a blue sky", "--output", str(ddim)])
    path = root / f"{sampler}.png"
    assert infer.main(["--backbone", "sd15", "--preset", "tiny", "--prompt", "a blue sky", "--sampler", sampler,
                       "--output", str(path)]) == path
    img = png(path)
    assert img.shape == (64, 64, 3) and img.std() > 0
    assert not np.array_equal(img, png(ddim))


# ------------------------------------------------------------------------------ 6. parameter counts
def test_info_counts_the_sd15_components() -> None:
    proc = subprocess.run([sys.executable, "-m", "backbones", "info", "sd15", "--preset", "sd15", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    counts = {n: c["num_params"] for n, c in report["components"].items()}
    # the published SD1.5 numbers (animatediff-sd15.md, counted on diffusers/transformers meta models)
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert len(report["components"]["unet"]["keys"]) == 686
    assert len(report["components"]["vae"]["keys"]) == 248
    assert report["default_targets"] == ["to_q", "to_k", "to_v", "to_out.0"]
