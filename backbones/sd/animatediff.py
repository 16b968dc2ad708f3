"""`--backbone animatediff`: AnimateDiff motion modules on an SD1.5-family UNet (motion LoRA, or the motion
modules trained in full).

Weights: an SD1.5-family base as `--ckpt-dir` (a diffusers folder or a single LDM file, e.g. a community
fine-tune; `model.sources.vae` when it ships without a VAE, `model.sources.tokenizer` beside a single file, as
`--backbone sd15`) plus `model.sources.motion_module`: the original `mm_sd_v15_v2.ckpt` / `.safetensors` (v1 and v3
modules without a mid block too) or a diffusers MotionAdapter folder; a `motion_adapter/` folder inside
`--ckpt-dir` (what `infer.py --save-merged` writes) is found without it. Without a motion module on a real base
the modules start new, each an identity (zero `proj_out`, the original `zero_initialize`): train them with
`components.unet.mode=full`. Without any weights the `tiny` preset gets deterministic random ones.

Training (SWIFT's recipe, animatediff-sd15.md §6): `lora` mode puts LoRA on the 12 Linears of every motion
module (252 layers on SD1.5 + v1-5-2, 5,135,360 parameters at rank 8, alpha 32); `full` mode trains the motion
modules' own parameters (`.*motion_modules.*`), the spatial UNet stays frozen. DDPM with AnimateDiff's `linear`
betas, ε target, one timestep per video; 16 frames every 4th source frame; each frame VAE-encoded on its own and
scaled by 0.18215; caption dropout via `data.condition_dropout={caption: 0.1}`. `objective.motion_norm` picks the
motion modules' GroupNorm: "per_frame" (the original and ComfyUI, default) or "all_frames" (diffusers, SWIFT).

Files: LoRA mode writes `lora.safetensors` (`lora.save_format`, native by default), `lora_diffusers.safetensors`
(`unet.` prefix, `AnimateDiffPipeline.load_lora_weights`) and `motion_lora.safetensors` (the original MotionLoRA
layout, ComfyUI-AnimateDiff-Evolved); full mode writes `motion_module.safetensors` (original layout) and a
diffusers `motion_adapter/` folder. Reading also takes original MotionLoRA `.ckpt` files, SWIFT checkpoint folders
and SD1.5 image LoRAs (kohya, diffusers) on the spatial layers.

Shapes: B videos, F frames, H/W frame height/width, h/w latent ones (H/8), L = 77 tokens, D text width.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from safetensors.torch import save_file

from lora_core.atomic import atomic_write
from lora_core.formats import read_lora, save_lora
from lora_core.inject import lora_layers

from ..encoders.clip import CLIP_TEXT_PRESETS, CLIPTextModel
from ..objectives import ddpm
from ..objectives.ddpm_samplers import DDIM_PRESETS, cfg_model, make_sampler
from ..spec import BackboneSpec, Batch, Component, Components, MediaRules, SampleOption, SampleRequest, Sources
from . import checkpoint as ck
from . import motion_checkpoint as mck
from .motion import MOTION_ADAPTER_PRESETS, AnimateDiffTransformer3D, MotionAdapter, MotionAdapterConfig
from .motion_lora import from_original_lora, to_original_lora
from ..loading import random_init, seeded
from .sd15 import TEXT_PRESET, SD15Spec, unet_naming
from .unet import UNET_PRESETS, UNet2DConditionModel
from .unet_motion import UNetMotionModel
from .vae import VAE_PRESETS, AutoencoderKL

log = logging.getLogger(__name__)

MOTION_PRESET = {"sd15": "v1-5-2", "tiny": "tiny"}
# SWIFT's LoRA targets (§6.4): every Linear of every motion module, 12 per module
MOTION_LORA_TARGETS = (r".*motion_modules\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|"
                       r"to_out\.0)|ff\.net\.(0\.proj|2)))")
MOTION_PARAMETERS = (r".*motion_modules\..*",)
SCALE = 0.18215          # the SD1.5 VAE's scaling_factor
DECODE_CHUNK = 16        # frames per VAE decode call (diffusers' decode_chunk_size)


@dataclass
class AnimateDiffObjectiveConfig(ddpm.DDPMObjectiveConfig):
    """`objective.*` of AnimateDiff: DDPM with the `linear` betas, plus the motion modules' GroupNorm mode."""

    beta_schedule: Literal["scaled_linear", "linear"] = "linear"
    motion_norm: Literal["per_frame", "all_frames"] = "per_frame"

    def validate(self) -> None:
        super().validate()
        if self.motion_norm not in ("per_frame", "all_frames"):
            raise ValueError(f"objective.motion_norm={self.motion_norm!r} is not one of 'per_frame' (original "
                             f"AnimateDiff, ComfyUI) or 'all_frames' (diffusers, SWIFT)")


def set_motion_norm(unet: nn.Module, mode: str) -> None:
    across = {"per_frame": False, "all_frames": True}[mode]
    for m in unet.modules():
        if isinstance(m, AnimateDiffTransformer3D):
            m.norm_across_frames = across


def motion_naming(preset: str):  # noqa: ANN201
    """The SD1.5 UNet naming (kohya with LDM aliases, diffusers `unet.`, native) that also reads original
    MotionLoRA files."""
    return dataclasses.replace(unet_naming(preset), convert=from_original_lora)


class AnimateDiffSpec(SD15Spec):
    name = "animatediff"
    presets = ("tiny", "sd15")
    random_presets = ("tiny",)
    default_rank = 8
    default_alpha = 32.0
    lora_file_metadata = {"modelspec.architecture": "animatediff-sd15/lora", "ss_base_model_version": "sd_v1"}
    lora_backbones = ("sd15",)   # SD1.5 image LoRAs apply to the spatial layers
    video_suffix = ".gif"

    def components(self, preset: str) -> dict[str, Component]:
        comps = super().components(preset)
        comps["unet"] = Component(
            "unet", modes=("lora", "full", "frozen"), in_training=True, lora_targets=MOTION_LORA_TARGETS,
            full_patterns=MOTION_PARAMETERS, naming=motion_naming(preset),
            description="UNetMotionModel: the SD1.5 UNet with AnimateDiff motion modules")
        return comps

    def sources(self, preset: str) -> dict[str, str]:
        return {"motion_module": "the motion module: mm_sd_v15_v2.ckpt / .safetensors or a diffusers MotionAdapter "
                                 "folder", **super().sources(preset)}

    def media_rules(self, preset: str) -> MediaRules:
        self.check_preset(preset)
        tiny = preset == "tiny"
        return MediaRules(kind="video", frame_sampling="stride", fps=8.0, frame_stride=4, frame_multiple=1,
                          frame_offset=0, size_multiple=16 if tiny else 64, default_frames=8 if tiny else 16,
                          default_height=32 if tiny else 256, default_width=32 if tiny else 256)

    def preset_overrides(self, preset: str) -> dict[str, Any]:
        common = {"lora.save_format": "native", "lora.rank": 8, "lora.alpha": 32.0, "lora.dropout": 0.05,
                  "data.flip": True}
        if preset == "tiny":
            return {**common, "train.max_steps": 40, "train.log_every": 10, "optim.lr": 1e-3,
                    "validation.frames": 8, "validation.height": 32, "validation.width": 32, "validation.steps": 4}
        return {**common, "optim.lr": 1e-4, "optim.weight_decay": 0.01, "train.gradient_checkpointing": True,
                "validation.frames": 16, "validation.height": 256, "validation.width": 256,
                "validation.steps": 25, "validation.guidance": 8.0}

    def objective_config(self, preset: str) -> AnimateDiffObjectiveConfig:
        return AnimateDiffObjectiveConfig()

    def sample_options(self, preset: str) -> list[SampleOption]:
        return [*super().sample_options(preset),
                SampleOption("motion_norm", str, "motion-module GroupNorm: per_frame (original, ComfyUI; default) "
                             "or all_frames (diffusers)", choices=("per_frame", "all_frames"))]

    def default_steps(self, preset: str) -> int:
        return 4 if preset == "tiny" else 25

    # ------------------------------------------------------------------------------ building
    def _motion_source(self, sources: Sources) -> mck.MotionSource | None:
        path = sources.extra.get("motion_module")
        if path is None and sources.ckpt_dir is not None and (sources.ckpt_dir / "motion_adapter").is_dir():
            path = sources.ckpt_dir / "motion_adapter"
        return mck.locate_motion(path) if path is not None else None

    def _motion_config(self, preset: str, sources: Sources) -> tuple[MotionAdapterConfig, mck.MotionSource | None]:
        src = self._motion_source(sources)
        default = MOTION_ADAPTER_PRESETS[MOTION_PRESET[preset]]
        return (default, None) if src is None else (mck.motion_config(src, default), src)

    def component_specs(self, preset: str) -> dict[str, nn.Module]:
        return self._meta(preset, MOTION_ADAPTER_PRESETS[MOTION_PRESET[preset]])

    def _meta(self, preset: str, motion: MotionAdapterConfig) -> dict[str, nn.Module]:
        self.check_preset(preset)
        with torch.device("meta"):
            return {"unet": UNetMotionModel(UNET_PRESETS[preset], motion), "vae": AutoencoderKL(VAE_PRESETS[preset]),
                    "text_encoder": CLIPTextModel(CLIP_TEXT_PRESETS[TEXT_PRESET[preset]])}

    def check_sources(self, preset: str, sources: Sources, parts: set[str]) -> None:
        self.check_preset(preset)
        BackboneSpec.check_sources(self, preset, sources, parts)  # unknown source names; weights for real presets
        base = Sources(sources.ckpt_dir, {k: v for k, v in sources.extra.items() if k != "motion_module"})
        if base.empty and preset not in self.random_presets:
            raise ValueError(f"--preset {preset} of backbone 'animatediff' needs --ckpt-dir: the SD1.5-family base "
                             "(a diffusers folder or a single .safetensors), besides model.sources.motion_module")
        SD15Spec.check_sources(self, preset, base, set(parts))
        if "unet" in parts:
            cfg, src = self._motion_config(preset, sources)
            if src is not None:
                try:
                    self._meta(preset, cfg)  # the motion UNet refuses a module made for another UNet layout
                except ValueError as e:
                    raise ValueError(f"{src.where}: {e}") from None
                mck.check_motion(src, cfg)

    def build(self, preset: str, parts: set[str], sources: Sources | None = None,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Components:
        sources = sources or Sources()
        self.check_sources(preset, sources, set(parts))
        base = Sources(sources.ckpt_dir, {k: v for k, v in sources.extra.items() if k != "motion_module"})
        comps = SD15Spec.build(self, preset, set(parts) - {"unet"}, base, device, dtype) \
            if set(parts) - {"unet"} else {}
        if "unet" in parts:
            comps["unet"] = self._build_unet(preset, sources, base, device, dtype)
        return comps

    def _build_unet(self, preset: str, sources: Sources, base: Sources, device: torch.device | str,
                    dtype: torch.dtype) -> UNetMotionModel:
        cfg, src = self._motion_config(preset, sources)
        with torch.device("meta"):
            unet = UNetMotionModel(UNET_PRESETS[preset], cfg)
            spatial = UNet2DConditionModel(UNET_PRESETS[preset])
        if base.empty:  # the random tiny base: the same 2D weights as `--backbone sd15 --preset tiny`
            spatial.to_empty(device=device)
            random_init(spatial, 10)
        else:
            ck.load("unet", self._sources(base, "unet"), spatial, dtype=dtype, device=device)
        state = {k: v.to(device=device, dtype=dtype) for k, v in spatial.state_dict().items()}
        if src is not None:
            state.update({k: v.to(device=device, dtype=dtype) for k, v in mck.load_motion(src, cfg).items()})
        else:
            state.update(self._new_motion_modules(cfg, random=base.empty, device=device, dtype=dtype))
            if not base.empty:
                log.warning("no motion module given (model.sources.motion_module): the motion modules start new, "
                            "each an identity (zero proj_out); train them with components.unet.mode=full")
        # the load pre-hooks put the recomputed position tables in; nothing else may be left out
        unet.load_state_dict(state, strict=True, assign=True)
        unet.to(device)
        left = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
        if left:
            raise AssertionError(f"motion UNet tensors left unfilled: {left[:3]}")
        return unet

    @staticmethod
    def _new_motion_modules(cfg: MotionAdapterConfig, *, random: bool, device: torch.device | str,
                            dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Motion modules with no file: deterministic random ones on the random tiny base (so a LoRA on any of
        them trains from step 0), else PyTorch's default init with proj_out zeroed (identity modules)."""
        with torch.device("meta"):
            adapter = MotionAdapter(cfg)
        adapter.to_empty(device=device)
        if random:
            random_init(adapter, 13)
        else:
            with seeded(14):
                adapter.init_weights(zero_init_proj_out=True)
        return {k: v.to(dtype) for k, v in adapter.state_dict().items() if not k.endswith(".pe")}

    def save_checkpoint(self, comps: Components, out_dir: str | Path, sources: Sources | None = None,
                        max_shard_bytes: int = 10 * 2**30) -> Path:
        """The SD1.5 part as a diffusers folder (`--backbone sd15` and diffusers load it) plus the motion module
        as `motion_adapter/` (diffusers MotionAdapter) and `motion_module.safetensors` (original layout);
        `--backbone animatediff --ckpt-dir OUT` loads the lot."""
        from .export import save_diffusers_folder
        out = Path(out_dir)
        unet: UNetMotionModel = comps["unet"]
        with torch.device("meta"):
            spatial = UNet2DConditionModel(unet.config)
        sd = unet.state_dict()
        spatial.load_state_dict({k: v for k, v in sd.items() if ".motion_modules." not in k}, strict=True,
                                assign=True)
        save_diffusers_folder({**comps, "unet": spatial}, out, sources=sources, max_shard_bytes=max_shard_bytes)
        self._save_motion(unet, out, out / "motion_module.safetensors")
        return out

    @staticmethod
    def _save_motion(unet: UNetMotionModel, folder: Path, original: Path) -> list[Path]:
        motion = unet.motion_state_dict()
        cfg = dataclasses.replace(unet.motion_config, norm_across_frames=False)
        meta = {"backbone": "animatediff", "motion_max_seq_length": str(cfg.motion_max_seq_length)}
        return [mck.save_original(motion, original, meta), mck.save_motion_adapter_folder(motion, cfg, folder /
                                                                                            "motion_adapter")]

    def save_full(self, name: str, module: nn.Module, out_dir: Path, trained: list[str]) -> list[Path]:
        if name != "unet":
            return super().save_full(name, module, out_dir, trained)
        spatial = [k for k in trained if ".motion_modules." not in k]
        if spatial:  # full_patterns widened beyond the motion modules: keep every trained tensor too
            return [*super().save_full(name, module, out_dir, trained),
                    *self._save_motion(module, out_dir, out_dir / "motion_module.safetensors")]
        return self._save_motion(module, out_dir, out_dir / "motion_module.safetensors")  # type: ignore[arg-type]

    def export_lora(self, models: dict[str, nn.Module], out_dir: Path, written: Path, metadata: dict[str, str],
                    dtype: torch.dtype) -> list[Path]:
        """`lora_diffusers.safetensors` (unless `written` is one) and, when every LoRA layer is in a motion
        module, `motion_lora.safetensors` in the original MotionLoRA layout."""
        unet = models.get("unet")
        if unet is None or len(models) != 1:
            return []
        out: list[Path] = []
        if read_lora(written).format != "diffusers":
            naming = self.components(metadata.get("preset", "tiny"))["unet"].naming
            out.append(save_lora(unet, out_dir / "lora_diffusers.safetensors", format="diffusers", backbone=self.name,
                                 naming=naming, metadata=metadata, dtype=dtype))
        if all(".motion_modules." in n for n in lora_layers(unet)):
            sd = to_original_lora(unet, dtype=dtype)
            path = out_dir / "motion_lora.safetensors"
            atomic_write(path, lambda p: save_file(sd, str(p), metadata={"backbone": self.name, "format": "pt"}))
            out.append(path)
        return out

    # ---------------------------------------------------------------------------------- data
    @torch.no_grad()
    def encode_media(self, comps: Components, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Each frame encoded on its own (as SWIFT folds frames into the batch): [4, F, h, w] mean/log-variance."""
        vae = comps["vae"]
        video = item["video"]  # [3, F, H, W]
        frames = video.permute(1, 0, 2, 3).to(next(vae.parameters()).device)  # [F, 3, H, W]
        means, logvars = zip(*(vae.encode_dist(frames[i:i + DECODE_CHUNK])
                               for i in range(0, len(frames), DECODE_CHUNK)))
        mean, logvar = torch.cat(means), torch.cat(logvars)  # [F, 4, h, w]
        return {"latent_mean": mean.permute(1, 0, 2, 3).float().cpu(),
                "latent_logvar": logvar.permute(1, 0, 2, 3).float().cpu()}

    # ------------------------------------------------------------------------------ objective
    def training_loss(self, models: dict[str, nn.Module], batch: Batch, cfg: ddpm.DDPMObjectiveConfig) -> torch.Tensor:
        """ε-MSE on latents [B, 4, F, h, w] drawn per step from the cached distribution; one t per video."""
        set_motion_norm(models["unet"], getattr(cfg, "motion_norm", "per_frame"))
        return super().training_loss(models, batch, cfg)

    # ------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, comps: Components, request: SampleRequest, *, device: torch.device | str = "cpu",
               autocast_dtype: torch.dtype | None = None, offload: bool = False,
               progress: bool = False) -> torch.Tensor:
        """Text to video: DDIM on the linear betas (leading spacing, offset 1), classifier-free guidance with a
        negative prompt, the VAE decoding DECODE_CHUNK frames at a time. Returns [B, 3, F, H, W] in [-1, 1]."""
        if not request.prompts:
            raise ValueError("backbone 'animatediff' samples from text: give a prompt")
        device = torch.device(device)
        unet, vae, enc, tok = comps["unet"], comps["vae"], comps["text_encoder"], comps["tokenizer"]
        set_motion_norm(unet, request.extras.get("motion_norm") or "per_frame")
        b, f = len(request.prompts), request.frames
        if f > unet.motion_config.motion_max_seq_length:
            raise ValueError(f"--frames {f}: this motion module's position table holds "
                             f"{unet.motion_config.motion_max_seq_length} frames; ask for at most that many")
        guidance = self.default_guidance("") if request.guidance is None else float(request.guidance)
        dt = next(enc.parameters()).dtype
        context = enc(tok(request.prompts).to(device)).to(dt)
        uncond = enc(tok([request.negative_prompt or ""] * b).to(device)).to(dt) if guidance != 1.0 else None
        factor = 2 ** (len(vae.encoder.down_blocks) - 1)
        shape = (b, 4, f, request.height // factor, request.width // factor)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed)).to(device)
        cfg = self.objective_config("")
        kind = request.extras.get("sampler") or "ddim"
        sampler = make_sampler(kind, cfg, **(DDIM_PRESETS["animatediff"] if kind == "ddim" else {}))
        amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        udt = next(unet.parameters()).dtype

        def fn(ctx: torch.Tensor):  # noqa: ANN202
            return lambda x, t: unet(x.to(udt), t, ctx).float()

        model_fn = fn(context) if uncond is None else cfg_model(fn(context), fn(uncond), guidance)
        with amp:
            latents = sampler.sample(model_fn, noise, request.steps, progress=progress)  # [B, 4, F, h, w]
        z = (latents / SCALE).permute(0, 2, 1, 3, 4).reshape(b * f, *latents.shape[1:2], *latents.shape[3:])
        vdt = next(vae.parameters()).dtype
        frames = torch.cat([vae.decode(z[i:i + DECODE_CHUNK].to(vdt)).float()
                            for i in range(0, len(z), DECODE_CHUNK)])  # [B*F, 3, H, W]
        video = frames.reshape(b, f, *frames.shape[1:]).permute(0, 2, 1, 3, 4)
        return video.clamp(-1, 1)


__all__ = ["AnimateDiffSpec", "AnimateDiffObjectiveConfig", "MOTION_LORA_TARGETS", "MOTION_PARAMETERS",
           "set_motion_norm", "motion_naming"]
