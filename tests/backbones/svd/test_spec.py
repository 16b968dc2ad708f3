"""`--backbone svd` and `--backbone framer` on the tiny presets: training through train.main (EDM objective,
cached conditioning, condition dropout, validation videos), the PEFT adapter folder both ways with PEFT itself,
one training step against a hand-written SVD_Xtend-style EDM step on diffusers' UNet, infer.py (image to video,
start/end interpolation, --merge) and the published counts.

Oracles: diffusers 0.42 (`UNetSpatioTemporalConditionModel`), PEFT (`PeftModel.from_pretrained`, `LoraConfig`,
`get_peft_model_state_dict`) and hand-written formulas (svd-framer.md §4.1).

Shapes: tiny clips are 4 frames of 32x32 (latents [4, 4, 16, 16]: the tiny VAE compresses 2x), CLIP tokens [N, 48].
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infer
import train
from backbones.objectives import edm
from backbones.registry import get_backbone
from backbones.spec import Batch
from backbones.svd.spec import UNET_NAMING
from lora_core.data.video_io import read_video
from lora_core.formats import load_lora, read_lora
from tests.oracle import rel_err

SVD, FRAMER = get_backbone("svd"), get_backbone("framer")
OURS_ONLY = ("mask_token", "framer_temporal_context")


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("svd")


@pytest.fixture(scope="module")
def images(root: Path) -> dict[str, Path]:
    out = {}
    for name, cols in (("start", slice(0, 16)), ("end", slice(16, 32))):
        a = np.zeros((32, 32, 3), np.uint8)
        a[:, cols] = (220, 40, 40)
        out[name] = root / f"{name}.png"
        Image.fromarray(a).save(out[name])
    return out


@pytest.fixture(scope="module")
def data(root: Path) -> Path:
    from lora_core.data.sample_data import make_sample_dataset
    return make_sample_dataset(root / "clips", num_clips=4)


def run(backbone: str, data: Path, out: Path, root: Path, images: dict[str, Path], *extra: str) -> int:
    imgs = f"{{image: {images['start']}}}" if backbone == "svd" else \
        f"{{image: {images['start']}, image_end: {images['end']}}}"
    return train.main(["--backbone", backbone, "--preset", "tiny", "--data", str(data), "--output", str(out),
                       f"train.cache_dir={root / ('cache_' + backbone)}", "train.log_every=0",
                       f"validation.images={imgs}", *extra])


@pytest.fixture(scope="module", params=["svd", "framer"])
def trained(request, data: Path, root: Path, images: dict[str, Path]) -> tuple[str, Path]:
    out = root / f"run_{request.param}"
    assert run(request.param, data, out, root, images, "--max-steps", "16", "optim.lr=1e-2",
               "validation.every=8") == 0
    return request.param, out


# ------------------------------------------------------------------------------------------ 1. training
def test_trains_a_lora_whose_objective_falls(trained: tuple[str, Path], data: Path, root: Path,
                                              images: dict[str, Path]) -> None:
    backbone, out = trained
    spec = get_backbone(backbone)
    assert len(losses(out)) == 16
    lf = read_lora(out / "lora.safetensors")
    assert lf.format == "diffusers" and lf.metadata["backbone"] == backbone
    assert sorted(p.name for p in (out / "samples").glob("*.mp4")) == ["step000008_0.mp4", "step000016_0.mp4"]
    video = read_video(out / "samples" / "step000016_0.mp4")
    assert video.shape == (4, 32, 32, 3)

    cfg, _ = train.resolve_config(train.parse_args(["--backbone", backbone, "--preset", "tiny", "--data", str(data),
                                                    "--output", str(root / "unused"),
                                                    f"train.cache_dir={root / ('cache_' + backbone)}"]))
    from lora_core.distributed import DistInfo
    ds = train.prepare_dataset(cfg, spec, DistInfo())
    cached = train.prepare_cache(cfg, spec, ds, DistInfo(), torch.device("cpu"))
    entries = [cached.cache.get(cached.media[i]) for i in cached.usable]
    n = 2 if backbone == "framer" else 1
    assert entries[0]["cond_latent"].shape == (n, 4, 16, 16) and entries[0]["clip_embeds"].shape == (n, 48)
    assert 0 < entries[0]["cond_sigma"].item() < 1  # ln σ_cond ~ N(-3, 0.5)
    draws = 6
    batch = Batch({k: [e[k] for e in entries] * draws for k in entries[0]}, [{}] * (draws * len(entries)),
                  [700 + k for k in range(draws * len(entries))])
    unet = spec.build("tiny", {"unet"})["unet"]
    with torch.no_grad():
        before = spec.training_loss({"unet": unet}, batch, cfg.objective).item()
        load_lora(unet, out / "lora.safetensors", naming=UNET_NAMING)
        after = spec.training_loss({"unet": unet}, batch, cfg.objective).item()
    print(f"{backbone} tiny: EDM objective on fixed draws {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (before, after)


def test_one_step_equals_a_hand_written_edm_step() -> None:
    """SVD_Xtend's step (§4.1, §4.3) on diffusers' UNet with our weights: x_σ = x0 + σε, input [c_in·x_σ ; cond],
    c_noise = ¼ln σ, ids (fps − 1, 127, σ_cond), D = c_skip·x_σ + c_out·F, loss = mean λ(σ)(D − x0)²."""
    diffusers = pytest.importorskip("diffusers")
    unet = SVD.build("tiny", {"unet"})["unet"]
    ref = diffusers.UNetSpatioTemporalConditionModel(
        **{k: v for k, v in asdict(unet.config).items() if k not in OURS_ONLY})
    ref.load_state_dict(unet.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    fields = {"latent_mean": [torch.randn(4, 4, 8, 8, generator=g) for _ in range(2)],
              "latent_logvar": [torch.randn(4, 4, 8, 8, generator=g) - 4 for _ in range(2)],
              "cond_latent": [torch.randn(1, 4, 8, 8, generator=g) for _ in range(2)],
              "cond_sigma": [torch.tensor(0.05), torch.tensor(0.11)],
              "clip_embeds": [torch.randn(1, 48, generator=g) for _ in range(2)]}
    cfg = SVD.objective_config("tiny")
    with torch.no_grad():
        ours = SVD.training_loss({"unet": unet}, Batch(fields, [{}, {}], [5, 6]), cfg).item()
        total = 0.0
        for i, seed in enumerate([5, 6]):
            gi = torch.Generator().manual_seed(seed)
            m, lv = fields["latent_mean"][i], fields["latent_logvar"][i]
            x0 = (m + torch.exp(0.5 * lv) * torch.randn(m.shape, generator=gi)) * 0.18215
            sigma = torch.exp(0.7 + 1.6 * torch.randn(1, generator=gi))
            x = x0 + sigma * torch.randn(x0.shape, generator=gi)
            c_in, c_skip, c_out = 1 / (sigma**2 + 1).sqrt(), 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1).sqrt()
            inp = torch.cat([c_in * x, fields["cond_latent"][i].expand(4, -1, -1, -1)], dim=1)[None]
            ids = torch.tensor([[6.0, 127.0, fields["cond_sigma"][i].item()]])
            out = ref(inp, 0.25 * sigma.log(), fields["clip_embeds"][i][None], ids).sample[0]
            d = c_skip * x + c_out * out
            total += ((sigma**2 + 1) / sigma**2 * ((d - x0) ** 2).mean()).item()
    want = total / 2
    assert abs(ours - want) <= 1e-5 * want, (ours, want)


# ------------------------------------------------------------------------------------------ 2. PEFT
@pytest.mark.parametrize("trained", ["svd"], indirect=True)  # diffusers has no Framer UNet (its mask token)
def test_peft_folder_loads_in_peft_with_the_same_output(trained: tuple[str, Path]) -> None:
    backbone, out = trained
    diffusers, peft = pytest.importorskip("diffusers"), pytest.importorskip("peft")
    cfg = json.loads((out / "unet_lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 8.0
    ours = SVD.build("tiny", {"unet"})["unet"]
    ref = diffusers.UNetSpatioTemporalConditionModel(
        **{k: v for k, v in asdict(ours.config).items() if k not in OURS_ONLY})
    ref.load_state_dict(ours.state_dict(), strict=True)
    model = peft.PeftModel.from_pretrained(ref, str(out / "unet_lora"))
    load_lora(ours, out / "lora.safetensors", naming=UNET_NAMING)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 16, 16, generator=g), torch.tensor([0.4])
    ctx, ids = torch.randn(1, 1, 48, generator=g), torch.tensor([[6.0, 127.0, 0.02]])
    with torch.no_grad():
        want = model(x, t, ctx, ids).sample
        got = ours(x, t, ctx, ids)
    assert rel_err(got, want) < 1e-5


def test_a_peft_folder_made_by_peft_loads_here(root: Path) -> None:
    diffusers, peft = pytest.importorskip("diffusers"), pytest.importorskip("peft")
    ours = SVD.build("tiny", {"unet"})["unet"]
    ref = diffusers.UNetSpatioTemporalConditionModel(
        **{k: v for k, v in asdict(ours.config).items() if k not in OURS_ONLY})
    ref.load_state_dict(ours.state_dict(), strict=True)
    torch.manual_seed(2)
    model = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                                     target_modules=["to_q", "to_v", "proj_in", "ff.net.2"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    folder = root / "peft_made"
    model.save_pretrained(str(folder))
    load_lora(ours, folder, naming=UNET_NAMING)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 4, 8, 16, 16, generator=g), torch.tensor([-0.2])
    ctx, ids = torch.randn(1, 1, 48, generator=g), torch.tensor([[6.0, 127.0, 0.02]])
    with torch.no_grad():
        assert rel_err(ours(x, t, ctx, ids), model(x, t, ctx, ids).sample) < 1e-5


# ------------------------------------------------------------------------------------------ 3. infer.py
def test_infer_image_to_video_and_interpolation(trained: tuple[str, Path], root: Path,
                                                images: dict[str, Path]) -> None:
    backbone, out = trained
    given = ["--image", str(images["start"])] + (["--image-end", str(images["end"])] if backbone == "framer" else [])
    plain, merged = root / f"{backbone}_plain.mp4", root / f"{backbone}_merged.mp4"
    common = ["--backbone", backbone, "--preset", "tiny", *given, "--frames", "4"]
    assert infer.main([*common, "--output", str(plain)]) == plain
    assert infer.main([*common, "--lora", str(out / "lora.safetensors"), "--merge", "--output", str(merged)]) == merged
    a, b = read_video(plain), read_video(merged)
    assert a.shape == b.shape == (4, 32, 32, 3) and not np.array_equal(a, b)
    if backbone == "framer":
        with pytest.raises(ValueError, match="--image-end"):
            infer.main(["--backbone", "framer", "--preset", "tiny", "--image", str(images["start"]),
                        "--output", str(root / "x.mp4")])


# ------------------------------------------------------------------------------------------ 4. counts, errors
def test_published_counts(capsys) -> None:
    from backbones.__main__ import main
    assert main(["info", "svd", "--preset", "svd-xt", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    counts = {n: c["num_params"] for n, c in r["components"].items()}
    assert counts == {"unet": 1_524_623_082, "vae": 97_742_847, "image_encoder": 632_076_800}
    assert main(["info", "framer", "--preset", "framer", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["default_lora"]["params"] == 52_117_504 and r["default_lora"]["rank"] == 64  # FramerTurbo's LoRA


def test_checkpoint_errors_name_the_folder(root: Path) -> None:
    from backbones.spec import Sources
    empty = root / "empty_ckpt"
    (empty / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"empty_ckpt/unet has no diffusion_pytorch_model\.safetensors"):
        SVD.check_sources("svd-xt", Sources(ckpt_dir=empty), {"unet"})
    with pytest.raises(ValueError, match="model.sources.framer"):
        FRAMER.check_sources("framer", Sources(ckpt_dir=empty), {"unet"})
    with pytest.raises(ValueError, match="needs --ckpt-dir"):
        SVD.check_sources("svd-xt", Sources(), {"unet"})


def test_edm_v_form_equals_the_weighted_denoising_loss() -> None:
    """§4.1: λ(σ)·c_out² = 1, so λ‖D − x0‖² equals ‖F − v_target‖² (the objective's two forms)."""
    g = torch.Generator().manual_seed(4)
    x0, noise, out = (torch.randn(3, 2, 4, 4, 4, generator=g) for _ in range(3))
    sigma = torch.tensor([0.01, 1.0, 80.0])
    x = x0 + sigma.view(-1, 1, 1, 1, 1) * noise
    d = edm.denoised(out, x, sigma)
    lam = (sigma**2 + 1) / sigma**2
    lhs = (lam.view(-1, 1, 1, 1, 1) * (d - x0) ** 2).mean(dim=(1, 2, 3, 4))
    v = (noise - sigma.view(-1, 1, 1, 1, 1) * x0) / (sigma**2 + 1).sqrt().view(-1, 1, 1, 1, 1)
    rhs = ((out - v) ** 2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-5)


def test_framer_follows_point_tracks_through_its_controlnet(root: Path, images: dict[str, Path]) -> None:
    """--tracks renders the heatmaps and adds the ControlNet's residuals; --controlnet-scale 0 is no control."""
    tracks = root / "tracks.json"
    tracks.write_text(json.dumps({"frames": 4, "width": 64, "height": 64,
                                  "tracks": [[[8, 8], [20, 16], [32, 24], [48, 32]]]}))
    common = ["--backbone", "framer", "--preset", "tiny", "--image", str(images["start"]), "--image-end",
              str(images["end"]), "--frames", "4"]
    outs = {}
    for name, extra in (("none", []), ("tracks", ["--tracks", str(tracks)]),
                        ("zero", ["--tracks", str(tracks), "--controlnet-scale", "0"])):
        path = root / f"framer_{name}/"
        infer.main([*common, *extra, "--output", str(path)])
        outs[name] = np.stack([np.asarray(Image.open(p)) for p in sorted(path.glob("*.png"))])
    assert not np.array_equal(outs["none"], outs["tracks"])
    assert np.array_equal(outs["none"], outs["zero"])
    bad = root / "bad_tracks.json"
    bad.write_text(json.dumps({"frames": 3, "width": 64, "height": 64, "tracks": [[[1, 1], [2, 2], [3, 3]]]}))
    with pytest.raises(ValueError, match="bad_tracks.json"):
        infer.main([*common, "--tracks", str(bad), "--output", str(root / "bad.mp4")])
