"""infer.py end to end on the tiny preset: a LoRA trained for a few steps, unmerged vs merged, strengths,
several LoRAs, first-frame conditioning, the official-layout export round trip, and every user error
raised before a model is built. Videos are 9 frames at 64x64 (or 64x96) with 4 solver steps."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import infer
import train
from backbones.registry import get_backbone

PROMPT = "a red ball rolling on grass"
FAST = ["--prompt", PROMPT, "--frames", "9", "--steps", "4", "--device", "cpu"]


def resolve(*argv: str) -> infer.Request:
    return infer.resolve(infer.parse_args([*FAST, *argv]))


def generate(*argv: str) -> torch.Tensor:
    video = infer.generate(resolve(*argv))
    assert video is not None
    return video


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA trained for 5 steps by train.py (ComfyUI format, backbone metadata)."""
    out = tmp_path_factory.mktemp("run")
    assert train.main(["--preset", "tiny", "--output", str(out), "--max-steps", "5", "train.log_every=0",
                       "optim.lr=5e-3", "validation.at_end=false"]) == 0
    return out / "lora.safetensors"


@pytest.fixture(scope="module")
def lora_b(lora: Path) -> Path:
    """A second LoRA for the same modules: lora's A with fresh random B of the same magnitude."""
    tensors = load_file(str(lora))
    with safe_open(str(lora), framework="pt") as f:
        meta = f.metadata()
    g = torch.Generator().manual_seed(1)
    for k, t in tensors.items():
        if k.endswith("lora_B.weight"):
            tensors[k] = torch.randn(t.shape, generator=g) * t.std()
    path = lora.with_name("lora_b.safetensors")
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.fixture(scope="module")
def videos(lora: Path) -> dict[str, torch.Tensor]:
    return {"base": generate(), "lora": generate("--lora", str(lora)),
            "merged": generate("--lora", str(lora), "--merge")}


@pytest.fixture
def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model build fails the test: user errors must come before compute."""
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("a model was built before the user error was reported")
    monkeypatch.setattr(type(get_backbone("wan_ti2v")), "build", refuse)


# ------------------------------------------------------------------------------------ LoRA numerics
def test_merged_matches_unmerged(videos: dict[str, torch.Tensor]) -> None:
    v = videos
    assert v["lora"].shape == (3, 9, 64, 64)
    effect = (v["lora"] - v["base"]).abs().max().item()
    gap = (v["lora"] - v["merged"]).abs().max().item()
    assert effect > 1e-3, "the trained LoRA should change the video"
    assert gap < 1e-4 and gap < effect / 50, (gap, effect)


def test_strength_zero_is_the_base_model(lora: Path, videos: dict[str, torch.Tensor]) -> None:
    assert torch.equal(generate("--lora", f"{lora}:0"), videos["base"])
    assert torch.equal(generate("--lora", f"{lora}:0", "--merge"), videos["base"])


def test_two_loras(lora: Path, lora_b: Path, videos: dict[str, torch.Tensor]) -> None:
    both = generate("--lora", f"{lora}:0.7", "--lora", f"{lora_b}:0.5")
    both_merged = generate("--lora", f"{lora}:0.7", "--lora", f"{lora_b}:0.5", "--merge")
    assert (both - both_merged).abs().max() < 1e-4
    assert (both - videos["lora"]).abs().max() > 1e-3
    # strengths add up: the same LoRA twice at 1 is that LoRA at 2
    twice = generate("--lora", str(lora), "--lora", str(lora))
    doubled = generate("--lora", f"{lora}:2")
    assert (twice - doubled).abs().max() < 1e-4
    assert (doubled - videos["lora"]).abs().max() > 1e-3


def test_negative_prompt_is_used(videos: dict[str, torch.Tensor]) -> None:
    assert (generate("--negative-prompt", "blurry") - videos["base"]).abs().max() > 1e-4


# ------------------------------------------------------------------------------- image conditioning
def _image(path: Path, w: int, h: int) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_load_image_covers_and_center_crops(tmp_path: Path) -> None:
    stripes = np.zeros((64, 300, 3), dtype=np.uint8)
    stripes[:, :100] = (255, 0, 0)
    stripes[:, 100:200] = (0, 255, 0)
    stripes[:, 200:] = (0, 0, 255)
    Image.fromarray(stripes).save(tmp_path / "s.png")
    x = infer.load_image(tmp_path / "s.png", 64, 64)   # already covers: no resize, middle 64 columns
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert torch.equal(x, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 64, 64))
    y = infer.load_image(_image(tmp_path / "r.png", 50, 40), 64, 96)  # upscaled to 96x77, then cropped
    assert y.shape == (3, 64, 96) and y.min() >= -1 and y.max() <= 1
    with pytest.raises(FileNotFoundError, match="nope.png"):
        infer.load_image(tmp_path / "nope.png", 64, 64)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="bad.png"):
        infer.load_image(tmp_path / "bad.png", 64, 64)


def test_causal_vae_frame0_depends_on_latent_frame0_only() -> None:
    """Why the next test may decode the image latent alone: the decoder's first chunk is latent frame 0."""
    spec = get_backbone("wan_ti2v")
    vae = spec.build("tiny", {"vae"})["vae"]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, vae.cfg.z_dim, 3, 4, 4, generator=g)
    z2 = z.clone()
    z2[:, :, 1:] = torch.randn(z2[:, :, 1:].shape, generator=g)
    a, b, alone = vae.decode(z), vae.decode(z2), vae.decode(z[:, :, :1])
    assert alone.shape[2] == 1 and a.shape[2] == 9
    assert torch.allclose(a[:, :, 0], b[:, :, 0], atol=1e-6)
    assert torch.allclose(a[:, :, 0], alone[:, :, 0], atol=1e-5)
    assert (a[:, :, 1:] - b[:, :, 1:]).abs().max() > 1e-3


def test_image_conditioning_keeps_the_first_frame(tmp_path: Path, lora: Path,
                                                  videos: dict[str, torch.Tensor]) -> None:
    req = resolve("--image", str(_image(tmp_path / "first.png", 120, 80)), "--lora", str(lora))
    image = req.sample.images.get("image")
    assert image is not None and image.shape == (3, 64, 64)
    video = infer.generate(req)
    assert video is not None
    spec = get_backbone("wan_ti2v")
    comps = spec.build("tiny", {"vae"}, spec.default_ckpt_dir("tiny"))   # infer.py's default: the shipped base
    first = comps["vae"].decode(spec.encode_video(comps, image[None, :, None]))[0, :, 0]  # [3, H, W]
    assert torch.allclose(video[:, 0], first, atol=1e-5)
    assert (videos["lora"][:, 0] - first).abs().max() > 1e-2  # unconditioned: a different first frame
    assert (video[:, 1:] - videos["lora"][:, 1:]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ export
def test_save_merged_round_trip(tmp_path: Path, lora: Path, videos: dict[str, torch.Tensor]) -> None:
    out = tmp_path / "merged"
    # export only (no --prompt), small shards so the index really spans several files
    assert infer.main(["--lora", str(lora), "--save-merged", str(out), "--max-shard-size", "300KB"]) == 0
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[-1] == f"diffusion_pytorch_model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    dit_keys = set(get_backbone("wan_ti2v").component_specs("tiny")["dit"].state_dict())
    assert set(index["weight_map"]) == dit_keys  # no lora_A/lora_B left, nothing missing
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["_class_name"] == "WanModel" and (cfg["dim"], cfg["num_layers"], cfg["in_dim"]) == (128, 2, 16)
    for f in ("Wan2.2_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/tokenizer.json"):
        assert (out / f).is_file(), f
    # the folder alone (no LoRA) gives the merged-LoRA video
    from_folder = generate("--ckpt-dir", str(out))
    assert (from_folder - videos["merged"]).abs().max() < 1e-5

    # a missing shard is reported before any model is built
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[1]):
        resolve("--ckpt-dir", str(broken))


# ------------------------------------------------------------------------------------------ output
def test_mp4_gif_and_frames(tmp_path: Path) -> None:
    import decord
    path = infer.main([*FAST, "--size", "96x64", "--output", str(tmp_path / "out.mp4")])
    assert path == tmp_path / "out.mp4"
    reader = decord.VideoReader(str(path))
    assert len(reader) == 9 and reader[0].shape == (64, 96, 3)
    assert abs(reader.get_avg_fps() - 24) < 1e-3

    from lora_core.data.video_io import read_video
    gif = infer.main([*FAST, "--frames", "5", "--steps", "1", "--output", str(tmp_path / "out.gif")])
    assert read_video(gif).shape == (5, 64, 64, 3)
    folder = infer.main([*FAST, "--frames", "5", "--steps", "1", "--output", str(tmp_path / "frames") + "/"])
    assert len(list(Path(folder).glob("*.png"))) == 5


def test_defaults_follow_the_preset() -> None:
    spec = get_backbone("wan_ti2v")
    req = infer.resolve(infer.parse_args(["--prompt", "x", "--device", "cpu"]))
    s = req.sample
    assert (s.frames, s.height, s.width, s.steps) == (17, 64, 64, 10)
    assert s.extras == {} and s.guidance is None  # guidance 5 / shift 5 / upstream negative: spec.sample's defaults
    rules = spec.media_rules("5b")
    assert (rules.default_frames, rules.default_width, rules.default_height) == (121, 1280, 704)
    assert spec.default_steps("5b") == 50
    assert infer.parse_size("1280x704") == (704, 1280) and infer.parse_size("1280*704") == (704, 1280)


def test_sizes_and_frames_are_corrected_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="infer"):
        req = resolve("--frames", "10", "--size", "70x50")
    assert (req.sample.frames, req.sample.height, req.sample.width) == (9, 64, 64)
    text = caplog.text
    assert "--frames 10 is not a valid frame count (4n+1); using 9" in text
    assert "width 70 is not a multiple of 32; using 64" in text and "height 50" in text


# ------------------------------------------------------------------------------------- user errors
@pytest.mark.parametrize("argv, match", [
    (["--frames", "0"], "at least 1 frame"),
    (["--frames", "-5"], "at least 1 frame"),
    (["--size", "0x64"], "must be positive"),
    (["--size", "64by64"], "WIDTHxHEIGHT"),
    (["--steps", "0"], "at least 1 solver step"),
    (["--shift", "0"], "must be > 0"),
    (["--lora", "a.safetensors:strong"], "'strong' is not a strength"),
    (["--lora", "a.safetensors:"], "is not a strength"),
    (["--lora", "a.safetensors:inf"], "not finite"),
    (["--output", "out.avi"], "unknown extension"),
    (["--preset", "5b"], "needs --ckpt-dir"),
    (["--preset", "huge"], "no preset 'huge'"),
])
def test_bad_arguments(no_build: None, argv: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        infer.main([*FAST, *argv])


def test_prompt_required_unless_exporting(no_build: None) -> None:
    with pytest.raises(ValueError, match="--prompt is required"):
        infer.main([])


def test_missing_lora_file(no_build: None, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        infer.main([*FAST, "--lora", f"{tmp_path / 'nope.safetensors'}:0.5"])


def test_lora_for_another_backbone(no_build: None, lora: Path, tmp_path: Path) -> None:
    with safe_open(str(lora), framework="pt") as f:
        meta = dict(f.metadata())
    other = tmp_path / "other.safetensors"
    save_file(load_file(str(lora)), str(other), metadata={**meta, "backbone": "cogvideox"})
    with pytest.raises(ValueError, match=r"other.safetensors was made for backbone 'cogvideox', not 'wan_ti2v'"):
        infer.main([*FAST, "--lora", str(lora), "--lora", str(other)])


def test_misfitting_lora_names_file_and_keys(no_build: None, lora: Path, tmp_path: Path) -> None:
    tensors = load_file(str(lora))
    tensors["diffusion_model.blocks.7.self_attn.q.lora_A.weight"] = torch.zeros(4, 128)
    tensors["diffusion_model.blocks.7.self_attn.q.lora_B.weight"] = torch.zeros(128, 4)
    bad = tmp_path / "misfit.safetensors"
    save_file(tensors, str(bad), metadata={"backbone": "wan_ti2v"})
    with pytest.raises(ValueError, match=r"(?s)misfit\.safetensors.*does not fit.*blocks\.7\.self_attn\.q"):
        infer.main([*FAST, "--lora", str(bad)])


def test_missing_checkpoint_folder(no_build: None, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        infer.main([*FAST, "--ckpt-dir", str(tmp_path / "Wan2.2-TI2V-5B")])


def test_missing_image(no_build: None, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="first.png"):
        infer.main([*FAST, "--image", str(tmp_path / "first.png")])


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_merge_and_offload(lora: Path) -> None:
    un = generate("--lora", str(lora), "--device", "cuda")
    merged = generate("--lora", str(lora), "--merge", "--device", "cuda")
    offload = generate("--lora", str(lora), "--merge", "--device", "cuda", "--offload")
    assert un.shape == merged.shape == offload.shape == (3, 9, 64, 64)
    assert (un - merged).abs().mean() < 2e-2       # bf16 rounding of the merged weights
    assert (merged - offload).abs().mean() < 1e-2  # merged on the CPU vs on the GPU: last-bit differences


def test_unwritable_output_fails_before_any_build(no_build: None, tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match=r"file\.txt is a file"):
        infer.main([*FAST, "--output", str(tmp_path / "file.txt" / "out.mp4")])


def test_options_come_from_the_backbone() -> None:
    args = infer.parse_args(["--backbone", "wan_ti2v", "--prompt", "x", "--shift", "3", "--sampler", "euler"])
    req = infer.resolve(args)
    assert req.sample.extras == {"shift": 3.0, "sampler": "euler"}
    with pytest.raises(SystemExit):
        infer.parse_args(["--backbone", "wan_ti2v", "--prompt", "x", "--sampler", "ddim"])


def test_num_images_writes_one_file_each(tmp_path: Path) -> None:
    paths = infer.main([*FAST, "--frames", "1", "--steps", "1", "--num-images", "2", "--output",
                        str(tmp_path / "v.gif")])
    assert [p.name for p in paths] == ["v_0.gif", "v_1.gif"] and all(p.is_file() for p in paths)
    with pytest.raises(ValueError, match="--num-images 0"):
        infer.main([*FAST, "--num-images", "0"])
