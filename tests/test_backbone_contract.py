"""The backbone contract, exercised by a family of another shape than Wan, defined entirely in this file.

`ToySpec` is a UNet-like image denoiser with no text encoder: it colourises, conditioned on the grey version of
the image (an image condition, dropped with `data.condition_dropout.image`), with its own objective (a noise
prediction MSE with its own `objective.*` section) and its own VAE. Registered here and nowhere else, it trains,
resumes exactly and samples through train.py and infer.py: adding a family needs no change outside its module.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import infer
import train
from backbones import registry
from backbones.spec import (BackboneSpec, Batch, CacheField, Component, Components, Condition, MediaRules,
                            SampleOption, SampleRequest, Sources)
from lora_core.formats import LoRANaming, load_lora, read_lora

NAME = "toy_colorize"


# ------------------------------------------------------------------------------------------ the family
class ToyVAE(nn.Module):
    """[B, 3, H, W] in [-1, 1] <-> [B, 4, H/4, W/4]."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 4, stride=4)
        self.dec = nn.ConvTranspose2d(4, 3, 4, stride=4)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.dec(z).clamp(-1, 1)


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(4, ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.time = nn.Linear(16, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm(x))) + self.time(temb)[:, :, None, None]
        return x + self.conv2(F.silu(h))


class ToyUNet(nn.Module):
    """Noisy latent [B, 4, h, w] + condition [B, 1, h, w] + t [B] -> predicted noise [B, 4, h, w]."""

    def __init__(self, ch: int = 16) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(5, ch, 3, padding=1)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList([ResBlock(ch) for _ in range(2)])
        self.up = nn.ConvTranspose2d(ch, ch, 2, stride=2)
        self.conv_out = nn.Conv2d(2 * ch, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-torch.arange(8, dtype=torch.float32) * 0.7)
        temb = torch.cat([torch.sin(t[:, None] * freqs * 10), torch.cos(t[:, None] * freqs * 10)], dim=1)
        h0 = self.conv_in(torch.cat([x, cond], dim=1))
        h = self.down(h0)
        for block in self.blocks:
            h = block(h, temb)
        return self.conv_out(torch.cat([self.up(h), h0], dim=1))


@dataclass
class ToyObjectiveConfig:
    """x_t = (1 - t) x0 + t eps, t ~ U(t_min, 1); the UNet predicts eps."""

    t_min: float = 0.02
    loss_weight: float = 1.0

    def validate(self) -> None:
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"objective.t_min={self.t_min} must be in [0, 1)")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def grey(z: torch.Tensor) -> torch.Tensor:
    return z.mean(dim=-3, keepdim=True)


class ToySpec(BackboneSpec):
    name = NAME
    presets = ("tiny",)
    uses_text = False

    def components(self, preset: str) -> dict[str, Component]:
        return {"unet": Component("unet", modes=("lora", "full", "frozen"), in_training=True,
                                  lora_targets=("conv_in", "conv1", "conv2", "time", "conv_out"),
                                  naming=LoRANaming(prefixes={"native": "", "comfyui": "diffusion_model.",
                                                              "kohya": "lora_unet_"})),
                "vae": Component("vae")}

    def media_rules(self, preset: str) -> MediaRules:
        return MediaRules(kind="image", frame_sampling="fps", fps=1.0, frame_stride=1, frame_multiple=1,
                          frame_offset=0, size_multiple=16, default_frames=1, default_height=32, default_width=32)

    def cache_fields(self, preset: str, trained: frozenset[str] = frozenset()) -> list[CacheField]:
        return [CacheField("latents", "media"), CacheField("cond", "media")]

    def conditions(self, preset: str) -> list[Condition]:
        return [Condition("image", fields=("cond",), null="zeros")]

    def encoder_parts(self, preset: str, keyed_by: str, trained: frozenset[str] = frozenset()) -> set[str]:
        return {"vae"}

    def objective_config(self, preset: str) -> ToyObjectiveConfig:
        return ToyObjectiveConfig()

    def preset_overrides(self, preset: str) -> dict[str, Any]:
        return {"data.height": 32, "data.width": 32, "optim.lr": 1e-2, "train.max_steps": 20,
                "lora.rank": 4, "lora.alpha": 4.0}

    def units(self, name: str, module: nn.Module) -> list[nn.Module]:
        return list(module.blocks)

    def image_inputs(self, preset: str) -> dict[str, str]:
        return {"image": "the image whose grey version conditions the output (required)"}

    def sample_options(self, preset: str) -> list[SampleOption]:
        return [SampleOption("t_end", float, "last noise level of the sampler (default 0)")]

    def default_steps(self, preset: str) -> int:
        return 4

    def component_specs(self, preset: str) -> dict[str, nn.Module]:
        with torch.device("meta"):
            return {"unet": ToyUNet(), "vae": ToyVAE()}

    def build(self, preset: str, parts: set[str], sources: Sources | None = None,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Components:
        self.check_sources(preset, sources or Sources(), parts)
        out: Components = {}
        if "unet" in parts:
            with seeded(10):
                out["unet"] = ToyUNet().to(device=device, dtype=dtype)
        if "vae" in parts:
            with seeded(11):
                out["vae"] = ToyVAE().to(device).eval()
        return out

    @torch.no_grad()
    def encode_media(self, comps: Components, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        z = comps["vae"].encode(item["video"][:, 0][None])[0]  # [3, 1, H, W] -> [4, h, w]
        return {"latents": z, "cond": grey(z)}

    def training_loss(self, models: dict[str, nn.Module], batch: Batch, cfg: ToyObjectiveConfig) -> torch.Tensor:
        x0, cond = batch.stack("latents"), batch.stack("cond")
        ts, noises = [], []
        for seed in batch.seeds:
            g = torch.Generator().manual_seed(seed)
            ts.append(cfg.t_min + (1 - cfg.t_min) * torch.rand(1, generator=g))
            noises.append(torch.randn(x0.shape[1:], generator=g))
        t, eps = torch.cat(ts).to(x0.device), torch.stack(noises).to(x0.device)
        x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        return cfg.loss_weight * F.mse_loss(models["unet"](x_t, cond, t).float(), eps)

    @torch.no_grad()
    def sample(self, comps: Components, request: SampleRequest, *, device: torch.device | str = "cpu",
               autocast_dtype: torch.dtype | None = None, offload: bool = False,
               progress: bool = False) -> torch.Tensor:
        if "image" not in request.images:
            raise ValueError("backbone toy_colorize needs --image (the picture to colourise)")
        unet, vae = comps["unet"], comps["vae"]
        cond = grey(vae.encode(request.images["image"][None].to(device)))
        g = torch.Generator().manual_seed(request.seed)
        x = torch.randn(cond.shape[0], 4, *cond.shape[2:], generator=g).to(device)
        t_end = request.extras.get("t_end") or 0.0
        grid = torch.linspace(1.0, float(t_end), request.steps + 1)
        for t, t_next in zip(grid[:-1], grid[1:]):
            eps = unet(x, cond, t.expand(x.shape[0]).to(device))
            x0 = (x - t * eps) / (1 - t).clamp_min(1e-3)
            x = (1 - t_next) * x0 + t_next * eps
        return vae.decode(x)[:, :, None]  # [B, 3, 1, H, W]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def toy_registered():
    registry.register(NAME, ToySpec, replace=True)
    yield
    registry.unregister(NAME)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Six colourful 40x48 images (a video beside them is reported and skipped: this is an image family)."""
    root = tmp_path_factory.mktemp("toy_images")
    rng = np.random.default_rng(0)
    for i in range(6):
        img = np.zeros((40, 48, 3), np.uint8)
        img[..., i % 3] = 200
        img[rng.integers(0, 20):, rng.integers(0, 24):] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(root / f"img_{i}.png")
    return root


def run(images: Path, out: Path, *extra: str) -> int:
    return train.main(["--backbone", NAME, "--preset", "tiny", "--data", str(images), "--output", str(out),
                       "train.log_every=0", *extra])


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


# ------------------------------------------------------------------------------------------ tests
def test_toy_family_trains_its_lora_with_its_own_objective(images, tmp_path):
    out = tmp_path / "run"
    assert run(images, out, "--max-steps", "30", "data.condition_dropout={image: 0.2}", "objective.t_min=0.05") == 0
    lf = read_lora(out / "lora.safetensors")
    assert lf.format == "comfyui" and lf.metadata["backbone"] == NAME
    assert len(lf.modules) == 2 + 2 * 3   # conv_in, conv_out + 2 blocks x (conv1, conv2, time)
    saved = (out / "config.yaml").read_text()
    assert "t_min: 0.05" in saved and "frame_multiple: 1" in saved
    assert len(losses(out)) == 30
    # the objective on every cached sample with fixed draws, before and after the LoRA
    spec = registry.get_backbone(NAME)
    vae, unet = spec.build("tiny", {"vae"})["vae"], spec.build("tiny", {"unet"})["unet"]
    items = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))[4:36, 8:40]).permute(2, 0, 1)
             for p in sorted(images.glob("*.png"))]
    with torch.no_grad():
        z = [spec.encode_media({"vae": vae}, {"video": (x.float() / 127.5 - 1)[:, None]}) for x in items]

    def eval_loss() -> float:
        with torch.no_grad():
            batch = Batch({"latents": [e["latents"] for e in z] * 8, "cond": [e["cond"] for e in z] * 8},
                          [{}] * (8 * len(z)), list(range(8 * len(z))))
            return spec.training_loss({"unet": unet}, batch, ToyObjectiveConfig(t_min=0.05)).item()

    before = eval_loss()
    load_lora(unet, out / "lora.safetensors")
    after = eval_loss()
    assert after < 0.75 * before, (before, after)
    with pytest.raises(ValueError, match="objective.t_min"):
        run(images, tmp_path / "bad", "objective.t_min=2")
    with pytest.raises(ValueError, match="objective.nope"):
        run(images, tmp_path / "bad2", "objective.nope=1")


def test_toy_family_resumes_exactly(images, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["data.condition_dropout={image: 0.3}", "lora.dropout=0.1"]
    assert run(images, straight, "--max-steps", "6", *common) == 0
    assert run(images, resumed, "--max-steps", "3", "train.ckpt_every=3", *common) == 0
    assert run(images, resumed, "--max-steps", "6", "--resume", "latest", *common) == 0
    a, b = losses(straight), losses(resumed)
    assert [json.loads(x)["step"] for x in open(resumed / "metrics.jsonl")] == list(range(1, 7))
    assert a == b, (a, b)


def test_toy_family_samples_through_infer(images, tmp_path):
    out = tmp_path / "run"
    assert run(images, out, "--max-steps", "4") == 0
    lora = out / "lora.safetensors"
    png = tmp_path / "colour.png"
    path = infer.main(["--backbone", NAME, "--image", str(images / "img_0.png"), "--lora", f"{lora}:0.7", "--merge",
                       "--t-end", "0.0", "--output", str(png)])
    assert Path(path) == png and png.is_file()
    arr = np.asarray(Image.open(png))
    assert arr.shape == (32, 32, 3) and arr.std() > 0
    # no text: --prompt does not exist for this family; its image input is required by its sampler
    with pytest.raises(SystemExit):
        infer.parse_args(["--backbone", NAME, "--prompt", "x"])
    with pytest.raises(ValueError, match="needs --image"):
        infer.main(["--backbone", NAME, "--output", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="makes images"):
        infer.main(["--backbone", NAME, "--image", str(images / "img_0.png"), "--output", str(tmp_path / "x.mp4")])


def test_toy_family_refuses_what_it_lacks(images, tmp_path):
    with pytest.raises(ValueError, match="sequence parallel"):
        from lora_core import distributed
        distributed.init_distributed(2, ToySpec().sequence_parallel("tiny"))
    with pytest.raises(ValueError, match="components.text_encoder"):
        run(images, tmp_path / "x", "components={text_encoder: {mode: lora}}")
    with pytest.raises(ValueError, match="components.vae.mode"):
        run(images, tmp_path / "y", "components={vae: {mode: lora}}")


def test_toy_family_full_fine_tuning_by_pattern(images, tmp_path):
    """mode=full trains the parameters its patterns name, directly (no LoRA), and saves them as the artifact;
    everything else stays bit-identical to the base."""
    out = tmp_path / "full"
    assert run(images, out, "--max-steps", "3", "components={unet: {mode: full, full_patterns: ['blocks\\..*']}}",
               "train.ckpt_every=2") == 0
    assert not (out / "lora.safetensors").exists()
    from safetensors.torch import load_file
    trained = load_file(str(out / "unet.safetensors"))
    base = ToySpec().build("tiny", {"unet"})["unet"].state_dict()
    assert trained and all(k.startswith("blocks.") for k in trained)
    assert sum(k.startswith("blocks.") for k in base) == len(trained)
    assert any(not torch.equal(trained[k], base[k]) for k in trained)
    ck = load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert sorted(k.split("/", 1)[1] for k in ck) == sorted(trained)


def test_toy_family_starts_from_an_existing_lora(images, tmp_path):
    first = tmp_path / "first"
    assert run(images, first, "--max-steps", "3") == 0
    second = tmp_path / "second"
    assert run(images, second, "--max-steps", "1", f"lora.init_from={first / 'lora.safetensors'}",
               "optim.lr=0") == 0
    a, b = read_lora(first / "lora.safetensors"), read_lora(second / "lora.safetensors")
    for key, m in a.modules.items():
        torch.testing.assert_close(b.modules[key]["B"].float(), m["B"].float(), rtol=0, atol=1e-2)
    assert any(m["B"].abs().max() > 0 for m in a.modules.values())
