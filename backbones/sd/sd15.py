"""`--backbone sd15`: Stable Diffusion 1.5 text-to-image (UNet LoRA, optionally the CLIP text encoder too).

Weights: the diffusers folder (`runwayml/stable-diffusion-v1-5` layout) or the single LDM file
(`v1-5-pruned-emaonly.safetensors` and community fine-tunes), see `checkpoint.py`; `model.sources.vae` swaps the
VAE, `model.sources.tokenizer` gives a single file its tokenizer. Without weights, the `tiny` preset gets
deterministic random ones (the embedded default).

Training: DDPM (epsilon by default; v-prediction, min-SNR-gamma, noise offset: `objective.*`) on VAE latents
drawn per step from the cached mean/log-variance and scaled by 0.18215; CLIP-L text keeps all 77 tokens.
With `components.text_encoder.mode=lora` the text encoder trains too (its own learning rate:
`components.text_encoder.lr`): token ids are cached instead of encodings.

Shapes: B batch, H/W image height/width, h/w latent ones (H/8), L = 77 tokens, D text width.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lora_core.formats import KeyMap, LoRANaming

from ..encoders.clip import CLIP_TEXT_PRESETS, CLIPTextModel
from ..encoders.clip_tokenizer import CLIPTokenizer, build_tiny_clip_tokenizer
from ..objectives import ddpm
from ..objectives.ddpm_samplers import DDIM_PRESETS, cfg_model, make_sampler
from ..spec import (BackboneSpec, Batch, CacheField, Component, Components, Condition, MediaRules, SampleOption,
                    SampleRequest, Sources)
from ..loading import random_init
from . import checkpoint as ck
from .unet import UNET_PRESETS, UNet2DConditionModel
from .unet_ldm_keymap import unet_to_ldm
from .vae import VAE_PRESETS, AutoencoderKL

TEXT_PRESET = {"sd15": "clip-l", "tiny": "tiny"}
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")          # the diffusers LoRA script's: 128 layers on SD1.5
KOHYA_UNET_TARGETS = UNET_TARGETS + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")   # 192 modules
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # 72 CLIP Linears
# kohya / A1111 (`lora_unet_`, `lora_te_`), which ComfyUI and A1111 load; diffusers (`unet.`, `text_encoder.`),
# which StableDiffusionPipeline.load_lora_weights reads
UNET_NAMING = LoRANaming(prefixes={"native": "", "kohya": "lora_unet_", "diffusers": "unet."},
                         key_map=KeyMap.identity(prefix="unet."))
TEXT_NAMING = LoRANaming(prefixes={"native": "text_encoder.", "kohya": "lora_te_", "diffusers": "text_encoder."},
                         key_map=KeyMap.identity(prefix="text_encoder."))
_TINY_TOKENIZER: dict[str, Path] = {}
_NAMINGS: dict[str, LoRANaming] = {}


def unet_naming(preset: str) -> LoRANaming:
    """UNET_NAMING that also reads kohya files in LDM names (`lora_unet_input_blocks_1_1_...`, A1111-era)."""
    if preset not in _NAMINGS:
        _NAMINGS[preset] = dataclasses.replace(
            UNET_NAMING, alias=functools.partial(unet_to_ldm, config=UNET_PRESETS[preset]))
    return _NAMINGS[preset]


def tiny_tokenizer() -> CLIPTokenizer:
    if "dir" not in _TINY_TOKENIZER:
        _TINY_TOKENIZER["dir"] = build_tiny_clip_tokenizer(Path(tempfile.mkdtemp(prefix="tiny_clip_tok_")))
    return CLIPTokenizer(_TINY_TOKENIZER["dir"])


class SD15Spec(BackboneSpec):
    name = "sd15"
    presets = ("tiny", "sd15")
    random_presets = ("tiny",)
    default_rank = 4
    default_alpha = 4.0
    lora_file_metadata = {"ss_network_module": "networks.lora", "modelspec.architecture": "stable-diffusion-v1/lora",
                          "ss_base_model_version": "sd_v1"}

    def components(self, preset: str) -> dict[str, Component]:
        self.check_preset(preset)
        return {
            "unet": Component("unet", modes=("lora", "full", "frozen"), in_training=True, lora_targets=UNET_TARGETS,
                              naming=unet_naming(preset), description="UNet2DConditionModel (the denoiser)"),
            "text_encoder": Component("text_encoder", modes=("frozen", "lora"), lora_targets=TEXT_TARGETS,
                                      naming=TEXT_NAMING, description="CLIP ViT-L/14 text encoder"),
            "vae": Component("vae", description="AutoencoderKL (8x, 4 channels, scale 0.18215)"),
        }

    def sources(self, preset: str) -> dict[str, str]:
        return {"vae": "a separate VAE: a diffusers vae/ folder or one VAE file (LDM or diffusers names)",
                "tokenizer": "the CLIP tokenizer/ folder (needed beside a single checkpoint file)"}

    def media_rules(self, preset: str) -> MediaRules:
        self.check_preset(preset)
        size = 512 if preset == "sd15" else 64
        return MediaRules(kind="image", frame_sampling="fps", fps=1.0, frame_stride=1, frame_multiple=1,
                          frame_offset=0, size_multiple=64 if preset == "sd15" else 16, default_frames=1,
                          default_height=size, default_width=size)

    def preset_overrides(self, preset: str) -> dict[str, Any]:
        common = {"lora.save_format": "kohya", "lora.rank": 4, "lora.alpha": 4.0}
        if preset == "tiny":
            return {**common, "data.height": 64, "data.width": 64, "train.max_steps": 60, "train.log_every": 10,
                    "optim.lr": 1e-3, "validation.height": 64, "validation.width": 64, "validation.steps": 4}
        return {**common, "data.height": 512, "data.width": 512, "optim.lr": 1e-4, "validation.height": 512,
                "validation.width": 512, "validation.steps": 30, "validation.guidance": 7.5}

    def cache_fields(self, preset: str, trained: frozenset[str] = frozenset()) -> list[CacheField]:
        # one text field in both modes (token ids [77] when the text encoder trains, else its encoding [77, D]),
        # so the caption condition names a field the cache always has
        return [CacheField("latent_mean", "media"), CacheField("latent_logvar", "media"), CacheField("text", "text")]

    def conditions(self, preset: str) -> list[Condition]:
        return [Condition("caption", fields=("text",), null="empty_text")]

    def encoder_parts(self, preset: str, keyed_by: str, trained: frozenset[str] = frozenset()) -> set[str]:
        if keyed_by == "media":
            return {"vae"}
        return {"tokenizer"} if "text_encoder" in trained else {"text_encoder"}

    def objective_config(self, preset: str) -> ddpm.DDPMObjectiveConfig:
        return ddpm.DDPMObjectiveConfig(beta_schedule="scaled_linear", prediction="epsilon")

    def units(self, name: str, module: nn.Module) -> list[nn.Module]:
        if name == "unet":
            return module.units()  # type: ignore[operator]
        return list(module.text_model.encoder.layers)  # type: ignore[union-attr, arg-type]

    def sample_options(self, preset: str) -> list[SampleOption]:
        return [SampleOption("sampler", str, "solver (default ddim)", choices=("ddim", "euler", "dpmpp_2m"))]

    def default_steps(self, preset: str) -> int:
        return 4 if preset == "tiny" else 50

    def default_guidance(self, preset: str) -> float:
        return 7.5

    # ------------------------------------------------------------------------------ building
    def component_specs(self, preset: str) -> dict[str, nn.Module]:
        self.check_preset(preset)
        with torch.device("meta"):
            return {"unet": UNet2DConditionModel(UNET_PRESETS[preset]), "vae": AutoencoderKL(VAE_PRESETS[preset]),
                    "text_encoder": CLIPTextModel(CLIP_TEXT_PRESETS[TEXT_PRESET[preset]])}

    def _sources(self, sources: Sources, part: str) -> ck.Source:
        return ck.locate(part, sources.ckpt_dir, sources.extra.get("vae") if part == "vae" else None)

    def check_sources(self, preset: str, sources: Sources, parts: set[str]) -> None:
        self.check_preset(preset)
        super().check_sources(preset, sources, parts)
        unknown = set(parts) - {"unet", "vae", "text_encoder", "tokenizer"}
        if unknown:
            raise ValueError(f"unknown component(s) {sorted(unknown)} of backbone {self.name!r}")
        if sources.empty:
            return
        metas = SD15Spec.component_specs(self, preset)  # the SD1.5 parts (AnimateDiff's UNet adds motion modules)
        for part in sorted(set(parts) - {"tokenizer"}):
            if part == "vae" or sources.ckpt_dir is not None:
                ck.check(part, self._sources(sources, part), metas[part])
        if "text_encoder" in parts or "tokenizer" in parts:
            ck.tokenizer_folder(sources.ckpt_dir, sources.extra.get("tokenizer"))
        cfg_file = sources.ckpt_dir / "unet" / "config.json" if sources.ckpt_dir and sources.ckpt_dir.is_dir() else None
        if "unet" in parts and cfg_file is not None and cfg_file.is_file():
            want = UNET_PRESETS[preset]
            got = json.loads(cfg_file.read_text())
            if tuple(got.get("block_out_channels", want.block_out_channels)) != tuple(want.block_out_channels):
                raise ValueError(f"{cfg_file}: block_out_channels {got['block_out_channels']} but preset {preset!r} "
                                 f"expects {list(want.block_out_channels)}; pick the matching preset")

    def build(self, preset: str, parts: set[str], sources: Sources | None = None,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Components:
        sources = sources or Sources()
        self.check_sources(preset, sources, set(parts))
        comps: Components = {}
        metas = self.component_specs(preset)
        for part, seed in (("unet", 10), ("vae", 11), ("text_encoder", 12)):
            if part not in parts:
                continue
            module = metas[part]
            # the VAE runs in fp32 (its decoder overflows in fp16); the others in the load dtype
            part_dtype = torch.float32 if part == "vae" else dtype
            if sources.empty:
                module.to_empty(device=device)
                random_init(module, seed)
                module.to(part_dtype)
            else:
                ck.load(part, self._sources(sources, part), module, dtype=part_dtype, device=device)
            comps[part] = module.eval() if part != "unet" else module
        if "text_encoder" in parts or "tokenizer" in parts:
            comps["tokenizer"] = (tiny_tokenizer() if sources.empty else
                                  CLIPTokenizer(ck.tokenizer_folder(sources.ckpt_dir, sources.extra.get("tokenizer"))))
        return comps

    def save_checkpoint(self, comps: Components, out_dir: str | Path, sources: Sources | None = None,
                        max_shard_bytes: int = 10 * 2**30) -> Path:
        from .export import save_diffusers_folder
        return save_diffusers_folder(comps, Path(out_dir), sources=sources, max_shard_bytes=max_shard_bytes)

    # ---------------------------------------------------------------------------------- data
    @torch.no_grad()
    def encode_media(self, comps: Components, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        vae = comps["vae"]
        x = item["video"][:, 0][None].to(next(vae.parameters()).device)  # [1, 3, H, W]
        mean, logvar = vae.encode_dist(x)
        return {"latent_mean": mean[0].float().cpu(), "latent_logvar": logvar[0].float().cpu()}

    @torch.no_grad()
    def encode_text(self, comps: Components, texts: list[str],
                    trained: frozenset[str] = frozenset()) -> list[dict[str, torch.Tensor]]:
        ids = comps["tokenizer"](texts)  # [B, 77]
        if "text_encoder" in trained:
            return [{"text": row} for row in ids]
        enc = comps["text_encoder"]
        context = enc(ids.to(next(enc.parameters()).device)).float().cpu()  # [B, 77, D]
        return [{"text": c} for c in context]

    # ------------------------------------------------------------------------------ objective
    def training_loss(self, models: dict[str, nn.Module], batch: Batch, cfg: ddpm.DDPMObjectiveConfig) -> torch.Tensor:
        """DDPM on a latent drawn per step from the cached distribution (as the diffusers script samples
        `latent_dist` every step), every draw of sample i from its own generator."""
        mean, logvar = batch.stack("latent_mean"), batch.stack("latent_logvar")
        gens = [torch.Generator().manual_seed(s) for s in batch.seeds]
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(mean.device)
        x0 = (mean + torch.exp(0.5 * logvar) * eps) * self._scale(models)
        text = batch.stack("text")  # token ids [B, 77] when the text encoder trains, else [B, 77, D]
        context = models["text_encoder"](text) if "text_encoder" in models else text
        unet = models["unet"]
        inp = ddpm.training_inputs(x0, cfg, gens)
        pred = unet(inp.x_t, inp.t, context)
        return ddpm.weighted_mse(pred, inp.target, inp.weights)

    @staticmethod
    def _scale(models: dict[str, nn.Module]) -> float:
        return 0.18215  # the SD1.5 VAE's scaling_factor (vae/config.json); the tiny VAE keeps it

    # ------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, comps: Components, request: SampleRequest, *, device: torch.device | str = "cpu",
               autocast_dtype: torch.dtype | None = None, offload: bool = False,
               progress: bool = False) -> torch.Tensor:
        """Text to image with classifier-free guidance and a negative prompt. Returns [B, 3, 1, H, W] in [-1, 1]."""
        if not request.prompts:
            raise ValueError("backbone 'sd15' samples from text: give a prompt")
        device = torch.device(device)
        unet, vae, enc, tok = comps["unet"], comps["vae"], comps["text_encoder"], comps["tokenizer"]
        b = len(request.prompts)
        guidance = 7.5 if request.guidance is None else float(request.guidance)
        dt = next(enc.parameters()).dtype
        context = enc(tok(request.prompts).to(device)).to(dt)
        uncond = enc(tok([request.negative_prompt or ""] * b).to(device)).to(dt) if guidance != 1.0 else None
        factor = 2 ** (len(vae.encoder.down_blocks) - 1)
        shape = (b, 4, request.height // factor, request.width // factor)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed)).to(device)
        cfg = self.objective_config("")
        kind = request.extras.get("sampler") or "ddim"
        sampler = make_sampler(kind, cfg, **(DDIM_PRESETS["sd15"] if kind == "ddim" else {}))
        amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())

        def fn(ctx: torch.Tensor):  # noqa: ANN202
            return lambda x, t: unet(x.to(dt), t, ctx).float()

        model_fn = fn(context) if uncond is None else cfg_model(fn(context), fn(uncond), guidance)
        with amp:
            latents = sampler.sample(model_fn, noise, request.steps, progress=progress)
        image = vae.decode((latents / 0.18215).to(next(vae.parameters()).dtype)).float().clamp(-1, 1)
        return image[:, :, None]  # [B, 3, 1, H, W]
