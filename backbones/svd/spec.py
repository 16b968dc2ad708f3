"""`--backbone svd` (Stable Video Diffusion image-to-video) and `--backbone framer` (Framer: interpolation between a
start and an end frame on the SVD-xt UNet), LoRA on the UNet, trained with the model's own EDM parameterisation.

Weights: `--ckpt-dir` = the SVD diffusers folder (`stabilityai/stable-video-diffusion-img2vid-xt`: unet/, vae/,
image_encoder/, feature_extractor/, scheduler/; the plain or the `.fp16` files). Framer adds
`model.sources.framer` = `checkpoints/framer_512x320` (its unet/ replaces SVD's; its controlnet/ is the point-track
ControlNet). Every key and shape is checked from the headers before anything loads. The tiny presets run on
deterministic random weights.

Training (svd-framer.md §4.1, §8.2, §8.3), what the published FramerTurbo loop gets wrong done right:
- EDM v-prediction with EDM c_noise (σ_data = 1): ln σ ~ N(0.7, 1.6), the UNet sees c_in·x_σ and c_noise = ¼ln σ,
  loss λ(σ)·‖D − x₀‖² with D = c_skip·x_σ + c_out·F (`backbones.objectives.edm`), not DDPM ε;
- the conditioning latents are the VAE **mode** of the noise-augmented conditioning frame(s), **unscaled**, with
  σ_cond drawn per sample (ln σ_cond ~ N(−3, 0.5)) and passed as the third time id. σ_cond and the augmentation
  are drawn once per clip when the media cache is filled (a generator seeded by the frame's content), so the VAE
  stays out of the training loop; the published trainers redraw them every step;
- CLIP image embeddings of the clean frame(s) with the pipeline's own preprocessing (antialiased resize + CLIP
  normalisation);
- the fps id as inference passes it (fps − 1 = 6 for the default 7), motion bucket 127;
- condition dropout (`data.condition_dropout.image`, 0.1 by default) as the pipeline's unconditional branch: zero
  CLIP tokens and zero conditioning latents (Framer: the mask token and mask channel stay);
- no offset noise.
Framer's conditioning: the start latent at frame 0, the UNet's `mask_token` between, the end latent at the last
frame, a mask channel, [start, end] CLIP tokens.

Files: `lora.safetensors` (`lora.save_format`, diffusers `unet.` keys by default) and `unet_lora/` (a PEFT adapter
folder: adapter_config.json + adapter_model.safetensors, what FramerTurbo writes, so `PeftModel.from_pretrained`
on the UNet loads it unchanged).

Shapes: B videos, F frames, H/W pixels, h/w latents, Z = 4 latent channels, N conditioning images (SVD 1, Framer
2), D the CLIP projection width (1024).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lora_core.atomic import atomic_write
from lora_core.formats import KeyMap, LoRANaming
from lora_core.inject import lora_layers

from ..encoders.clip_vision import (CLIP_VISION_PRESETS, CLIPVisionConfig, CLIPVisionModelWithProjection,
                                    clip_vision_file_key, encode_image)
from ..loading import expected_shapes, load_safetensors_into, random_init, safetensors_shapes, validate
from ..objectives import edm
from ..objectives.edm_samplers import (SVD_FPS, SVD_MAX_GUIDANCE, SVD_MIN_GUIDANCE, SVD_MOTION_BUCKET_ID,
                                       SVD_NOISE_AUG_STRENGTH, SVD_SAMPLERS, added_time_ids, sample_svd, svd_sampler)
from ..spec import (BackboneSpec, Batch, CacheField, Component, Components, Condition, MediaRules, SampleOption,
                    SampleRequest, Sources)
from .controlnet import CONTROLNET_PRESETS, ControlNetSVDModel
from .tracks import load_tracks, render_heatmaps
from .unet import UNET_PRESETS, UNetSpatioTemporalConditionModel, UNetSpatioTemporalConfig, set_temporal_context_layout
from .vae import VAE_PRESETS, AutoencoderKLTemporalDecoder, TemporalDecoderVAEConfig

SCALE = 0.18215
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")   # SVD_Xtend's LoRA
# FramerTurbo's (§8.1): 52,117,504 parameters at r 64 on the Framer UNet
TURBO_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
UNET_NAMING = LoRANaming(prefixes={"native": "", "diffusers": "unet.", "kohya": "lora_unet_",
                                   "peft": "base_model.model."}, key_map=KeyMap.identity(prefix="unet."))
# Framer's ControlNet beside the UNet in one file: its own prefix in every format
CONTROLNET_NAMING = LoRANaming(prefixes={"native": "controlnet.", "diffusers": "controlnet.",
                                         "kohya": "lora_controlnet_"},
                               key_map=KeyMap.identity(prefix="controlnet."))
TRACKS_SIDECAR = "tracks.json"   # <clip>.tracks.json beside <clip>.mp4, <id>.tracks.json beside an image pair
_SEEDS = {"unet": 30, "vae": 31, "image_encoder": 32, "controlnet": 33}
# the tiny presets: the UNet's context width is the tiny CLIP's projection width
TINY_CLIP = dataclasses.replace(CLIP_VISION_PRESETS["tiny"], projection_dim=UNET_PRESETS["tiny"].cross_attention_dim)


@dataclass
class SVDObjectiveConfig(edm.EDMObjectiveConfig):
    """`objective.*`: EDM plus the conditioning ids training feeds, as inference will (the UNet gets fps − 1).

    Per sample, in this order: a metadata column (`fps`, `motion_bucket_id` in metadata.json/jsonl/CSV); else,
    when asked, a value from the clip (`fps_from_clip`: the rate of the sampled frames, rounded;
    `estimate_motion`: `estimate_motion_bucket` of the clip); else `fps` / `motion_bucket_id` here."""

    fps: int = SVD_FPS
    motion_bucket_id: int = SVD_MOTION_BUCKET_ID
    fps_from_clip: bool = False
    estimate_motion: bool = False

    def validate(self) -> None:
        super().validate()
        for key in ("fps", "motion_bucket_id"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"objective.{key}={v!r} must be an integer >= 1 (SVD: fps 7, motion bucket 127)")
        for key in ("fps_from_clip", "estimate_motion"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"objective.{key}={getattr(self, key)!r} must be true or false")


@dataclass
class FramerObjectiveConfig(SVDObjectiveConfig):
    """Framer adds its ControlNet: `controlnet` calls the frozen ControlNet in training on samples with point
    tracks (a trained ControlNet, `components.controlnet.mode=lora|full`, is always called);
    `controlnet_scale` scales its residuals, as infer.py's --controlnet-scale."""

    controlnet: bool = False
    controlnet_scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.controlnet, bool):
            raise ValueError(f"objective.controlnet={self.controlnet!r} must be true or false")
        v = self.controlnet_scale
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"objective.controlnet_scale={v!r} must be a finite number (1.0: Framer's)")


MOTION_REFERENCE = 0.05  # mean |frame difference| (fraction of the pixel range) that estimate_motion_bucket maps to 127


def estimate_motion_bucket(video: torch.Tensor) -> float:
    """A motion-bucket id for a clip [3, F, H, W] in [-1, 1] from its mean absolute frame-to-frame difference
    (fraction of the pixel range), scaled linearly so MOTION_REFERENCE maps to 127 and clamped to 1..255.

    A heuristic proxy, not SVD's own measure (its buckets come from optical-flow magnitudes over its training
    set, which this does not compute): it orders clips by motion, but the absolute value is uncalibrated. Give
    calibrated values as a `motion_bucket_id` metadata column instead."""
    if video.shape[1] < 2:
        return float("nan")
    diff = (video[:, 1:].float() - video[:, :-1].float()).abs().mean().item() / 2.0
    return float(min(255.0, max(1.0, round(127.0 * diff / MOTION_REFERENCE))))


def _content_seed(x: torch.Tensor) -> int:
    return int.from_bytes(hashlib.sha256(x.detach().float().cpu().numpy().tobytes()).digest()[:8], "little")


def _weights(folder: Path, stem: str) -> list[Path]:
    """`<stem>.safetensors` (or its shards), else the `.fp16` variant; FileNotFoundError naming the folder."""
    for name in (stem, f"{stem}.fp16"):
        single, index = folder / f"{name}.safetensors", folder / f"{name}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
        if single.is_file():
            return [single]
    raise FileNotFoundError(f"{folder} has no {stem}.safetensors (nor {stem}.fp16.safetensors); expected the "
                            f"official diffusers layout")


class SVDSpec(BackboneSpec):
    name = "svd"
    presets = ("tiny", "svd", "svd-xt")
    random_presets = ("tiny",)
    default_rank = 16
    default_alpha = 16.0
    uses_text = False
    lora_file_metadata = {"modelspec.architecture": "stable-video-diffusion/lora"}
    framer = False
    conditioning_images = 1

    # ------------------------------------------------------------------------------ declarations
    def unet_preset(self, preset: str) -> str:
        return preset

    def components(self, preset: str) -> dict[str, Component]:
        self.check_preset(preset)
        return {
            "unet": Component("unet", modes=("lora", "full", "frozen"), in_training=True,
                              lora_targets=TURBO_TARGETS if self.framer else ATTENTION_TARGETS, naming=UNET_NAMING,
                              description="UNetSpatioTemporalConditionModel (EDM v-prediction denoiser)"),
            "vae": Component("vae", description="AutoencoderKLTemporalDecoder (8x, 4 channels, scale 0.18215)"),
            "image_encoder": Component("image_encoder", description="CLIP ViT-H/14 image encoder + projection"),
        }

    def media_rules(self, preset: str) -> MediaRules:
        self.check_preset(preset)
        # start/end image pairs train the frames they know (svd-framer.md §8.2 #9); Framer reads point tracks
        extra = dict(image_pairs=True, sidecars=(TRACKS_SIDECAR,) if self.framer else ())
        if preset.startswith("tiny"):
            return MediaRules(kind="video", frame_sampling="stride", fps=7.0, frame_stride=4, frame_multiple=1,
                              frame_offset=0, size_multiple=16, default_frames=4, default_height=32,
                              default_width=32, **extra)
        frames = UNET_PRESETS[self.unet_preset(preset)].num_frames
        h, w = (320, 512) if self.framer else (576, 1024)
        return MediaRules(kind="video", frame_sampling="stride", fps=7.0, frame_stride=4, frame_multiple=1,
                          frame_offset=0, size_multiple=64, default_frames=frames, default_height=h, default_width=w,
                          **extra)

    def cache_fields(self, preset: str, trained: frozenset[str] = frozenset()) -> list[CacheField]:
        names = ["latent_mean", "latent_logvar", "frame_mask", "cond_latent", "cond_sigma", "clip_embeds", "motion"]
        return [CacheField(n, "media") for n in names + (["tracks"] if self.framer else [])]

    def conditions(self, preset: str) -> list[Condition]:
        return [Condition("image", fields=("cond_latent", "clip_embeds"), null="zeros")]

    def encoder_parts(self, preset: str, keyed_by: str, trained: frozenset[str] = frozenset()) -> set[str]:
        return {"vae", "image_encoder"} if keyed_by == "media" else set()

    def objective_config(self, preset: str) -> SVDObjectiveConfig:
        return FramerObjectiveConfig() if self.framer else SVDObjectiveConfig()

    def preset_overrides(self, preset: str) -> dict[str, Any]:
        common = {"lora.rank": 64 if self.framer else 16, "lora.alpha": 64.0 if self.framer else 16.0,
                  "lora.save_format": "diffusers", "data.condition_dropout": {"image": 0.1}, "data.buckets": False}
        if preset.startswith("tiny"):
            return {**common, "lora.rank": 8, "lora.alpha": 8.0, "train.max_steps": 40, "train.log_every": 10,
                    "optim.lr": 1e-3, "validation.frames": 4, "validation.height": 32, "validation.width": 32,
                    "validation.steps": 4}
        rules = self.media_rules(preset)
        return {**common, "optim.lr": 1e-4, "optim.warmup_steps": 500, "optim.grad_clip": 1.0,
                "train.gradient_checkpointing": True, "validation.frames": rules.default_frames,
                "validation.height": rules.default_height, "validation.width": rules.default_width,
                "validation.steps": 25}

    def units(self, name: str, module: nn.Module) -> list[nn.Module]:
        return module.units()  # type: ignore[operator]

    def image_inputs(self, preset: str) -> dict[str, str]:
        return {"image": "the conditioning (first) frame"}

    def images_from_sample(self, preset: str, video: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"image": video[:, 0]}
        if self.framer:
            out["image_end"] = video[:, -1]
        return out

    def sample_options(self, preset: str) -> list[SampleOption]:
        return [SampleOption("sampler", str, "euler (the pipeline's) or dpm++ (EDM DPM-Solver++, 2nd order; same "
                             "continuous preconditioning, fewer steps)", choices=SVD_SAMPLERS),
                SampleOption("min_guidance", float, "guidance of the first frame (default 1.0)"),
                SampleOption("max_guidance", float, "guidance of the last frame (default 3.0; <= 1 turns CFG off)"),
                SampleOption("fps", int, "the fps id (default 7; the UNet gets fps - 1)"),
                SampleOption("motion_bucket_id", int, "motion amount id (default 127)"),
                SampleOption("noise_aug_strength", float, "noise added to the conditioning frame(s) (default 0.02)"),
                SampleOption("decode_chunk_size", int, "frames per VAE decode (default: all)")]

    def default_steps(self, preset: str) -> int:
        return 4 if preset.startswith("tiny") else 25

    def default_guidance(self, preset: str) -> float:
        return SVD_MAX_GUIDANCE

    def sources(self, preset: str) -> dict[str, str]:
        return {}

    # ------------------------------------------------------------------------------ building
    def _configs(self, preset: str) -> tuple[UNetSpatioTemporalConfig, TemporalDecoderVAEConfig, CLIPVisionConfig]:
        self.check_preset(preset)
        tiny = preset.startswith("tiny")
        return (UNET_PRESETS[self.unet_preset(preset)], VAE_PRESETS["tiny" if tiny else "svd"],
                TINY_CLIP if tiny else CLIP_VISION_PRESETS["vit-h-14"])

    def component_specs(self, preset: str) -> dict[str, nn.Module]:
        u, v, c = self._configs(preset)
        with torch.device("meta"):
            out = {"unet": UNetSpatioTemporalConditionModel(u), "vae": AutoencoderKLTemporalDecoder(v),
                   "image_encoder": CLIPVisionModelWithProjection(c)}
            if self.framer:
                out["controlnet"] = ControlNetSVDModel(CONTROLNET_PRESETS["tiny" if preset == "tiny" else "framer"])
            return out

    def _files(self, preset: str, sources: Sources) -> dict[str, tuple[Any, Any]]:
        """part -> (a function giving its weight files, rename) from the folders. A random preset without
        --ckpt-dir may still take a ControlNet folder (model.sources.controlnet), the rest staying random."""
        root = sources.ckpt_dir
        if root is None:
            cn = sources.extra.get("controlnet")
            return {} if cn is None else {"controlnet": (lambda: _weights(cn, "diffusion_pytorch_model"), None)}
        if not root.is_dir():
            raise FileNotFoundError(f"checkpoint folder {root} does not exist (expected the diffusers folder of "
                                    "stabilityai/stable-video-diffusion-img2vid-xt)")
        unet_root = sources.extra.get("framer", root) if self.framer else root
        files = {"unet": (lambda: _weights(unet_root / "unet", "diffusion_pytorch_model"), None),
                 "vae": (lambda: _weights(root / "vae", "diffusion_pytorch_model"), None),
                 "image_encoder": (lambda: _weights(root / "image_encoder", "model"), clip_vision_file_key)}
        if self.framer:  # a fine-tuned ControlNet folder (train.py's controlnet/) replaces Framer's own
            cn_dir = sources.extra.get("controlnet", unet_root / "controlnet")
            files["controlnet"] = (lambda: _weights(cn_dir, "diffusion_pytorch_model"), None)
        return files

    def check_sources(self, preset: str, sources: Sources, parts: set[str]) -> None:
        self.check_preset(preset)
        super().check_sources(preset, sources, parts)
        if sources.empty:
            return
        random_ok = preset in self.random_presets and set(sources.extra) <= {"controlnet"}
        if sources.ckpt_dir is None and not random_ok:
            raise ValueError(f"backbone {self.name!r} needs --ckpt-dir: the SVD diffusers folder (its VAE and image "
                             "encoder" + (", with model.sources.framer for Framer's UNet)" if self.framer else ")"))
        if self.framer and "framer" not in sources.extra and sources.ckpt_dir is not None and (
                "unet" in parts or ("controlnet" in parts and "controlnet" not in sources.extra)):
            raise ValueError("backbone 'framer' needs model.sources.framer=/path/to/checkpoints/framer_512x320 "
                             "(its unet/ replaces SVD's); infer.py: --source framer=...")
        files = self._files(preset, sources)
        metas = self.component_specs(preset)
        for part in sorted(set(parts) & set(files)):
            locate, rename = files[part]
            paths = locate()
            found = {}
            for k, (_, shape) in safetensors_shapes(paths).items():
                name = rename(k) if rename else k
                if name is not None:
                    found[name] = shape
            where = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent} ({len(paths)} shards)"
            validate(expected_shapes(metas[part]), found, f"{where} ({part})")

    def build(self, preset: str, parts: set[str], sources: Sources | None = None,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Components:
        sources = sources or Sources()
        self.check_sources(preset, sources, set(parts))
        metas = self.component_specs(preset)
        files = None if sources.empty else self._files(preset, sources)
        comps: Components = {}
        for part in ("unet", "vae", "image_encoder", "controlnet"):
            if part not in parts or part not in metas:
                continue
            module = metas[part]
            part_dtype = torch.float32 if part == "vae" else dtype  # the VAE decodes in fp32 (force_upcast)
            if files is None or part not in files:
                module.to_empty(device=device)
                random_init(module, _SEEDS[part])
                module.to(part_dtype)
            else:
                locate, rename = files[part]
                load_safetensors_into(module, locate(), rename=rename, dtype=part_dtype, device=device)
            comps[part] = module if part == "unet" else module.eval()
        return comps

    # ---------------------------------------------------------------------------------- data
    def _condition_frames(self, video: torch.Tensor) -> torch.Tensor:
        """[3, F, H, W] -> the conditioning frames [N, 3, H, W] (SVD: the first; Framer: first and last)."""
        return video[:, [0, -1]].permute(1, 0, 2, 3) if self.framer else video[:, :1].permute(1, 0, 2, 3)

    @torch.no_grad()
    def encode_media(self, comps: Components, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per-frame VAE posteriors [F, Z, h, w] (zeros at frames without ground truth: the middle of an image pair)
        and `frame_mask` [F] (1 = known); the conditioning latents [N, Z, h, w] = VAE mode of the frame(s)
        noise-augmented with σ_cond (one draw per clip, seeded by the frame content), unscaled; σ_cond; CLIP
        embeddings [N, D] of the clean frame(s); `motion`, the clip's estimated motion bucket (NaN for a pair);
        Framer: `tracks` [F, P, 2], the clip's point tracks on the training frames (P = 0 without a tracks file)."""
        vae, clip = comps["vae"], comps["image_encoder"]
        dev = next(vae.parameters()).device
        video = item["video"].to(dev)  # [3, K, H, W] in [-1, 1]: the K known frames
        meta = item.get("meta") or {}
        n_frames = int(meta.get("num_frames") or video.shape[1])
        known = list(meta.get("known_frames") or range(video.shape[1]))
        where = item.get("path", "the sample")
        if len(known) != video.shape[1] or known[0] != 0 or (self.framer and known[-1] != n_frames - 1):
            raise ValueError(f"{where}: frames {known} of {n_frames} are known; {self.name} needs the first"
                             + (" and the last" if self.framer else ""))
        mean_k, logvar_k = vae.encode_dist(video.permute(1, 0, 2, 3))  # [K, Z, h, w]
        mean = mean_k.new_zeros((n_frames, *mean_k.shape[1:]))
        logvar = torch.zeros_like(mean)
        mean[known], logvar[known] = mean_k, logvar_k
        mask = torch.zeros(n_frames)
        mask[known] = 1.0
        cond = self._condition_frames(video)  # [N, 3, H, W]: video[:, 0] (and video[:, -1]) are frames 0 (and F-1)
        cfg = self.objective_config("")
        g = torch.Generator().manual_seed(_content_seed(cond))
        sigma = edm.draw_cond_sigmas([g], cfg)  # [1]
        noisy = cond + sigma.item() * torch.randn(cond.shape, generator=g).to(dev)
        cond_latent, _ = vae.encode_dist(noisy)
        embeds = encode_image(clip, cond.to(next(clip.parameters()).dtype))[:, 0]  # [N, D]
        motion = estimate_motion_bucket(video) if len(known) == n_frames else float("nan")
        out = {"latent_mean": mean.float().cpu(), "latent_logvar": logvar.float().cpu(), "frame_mask": mask,
               "cond_latent": cond_latent.float().cpu(), "cond_sigma": sigma[0].float().cpu(),
               "clip_embeds": embeds.float().cpu(), "motion": torch.tensor(motion, dtype=torch.float32)}
        if self.framer:
            out["tracks"] = self._clip_tracks(meta, n_frames, where)
        return out

    def _clip_tracks(self, meta: dict[str, Any], n_frames: int, where: str) -> torch.Tensor:
        """[F, P, 2] pixel (x, y) of the training frames from the sample's tracks file (source pixels of the clip or
        the pair's start image, one entry per source frame, or per pair frame), mapped through the resize, crop
        and flip the frames went through; [F, 0, 2] without a file."""
        path = (meta.get("sidecars") or {}).get(TRACKS_SIDECAR)
        if path is None:
            return torch.zeros(n_frames, 0, 2)
        geo = meta["geometry"]
        sh, sw = geo["source_size"]
        tracks = load_tracks(path, height=sh, width=sw)  # [Fs, P, 2] in source pixels
        if meta.get("is_pair"):
            if tracks.shape[0] != n_frames:
                raise ValueError(f"track file {path}: {tracks.shape[0]} frames, but the pair {where} stands for "
                                 f"{n_frames} (data.pair_frames)")
        else:
            idx = list(meta.get("frame_indices") or [0])
            if tracks.shape[0] <= max(idx):
                raise ValueError(f"track file {path}: {tracks.shape[0]} frames, but the clip {where} has frame "
                                 f"{max(idx)}; expected one [x, y] per source frame")
            tracks = tracks[idx]
        return map_points(tracks, geo)

    # ------------------------------------------------------------------------------ objective
    def frozen_in_training(self, preset: str, objective: Any, trained: frozenset[str]) -> set[str]:
        if self.framer and getattr(objective, "controlnet", False) and "controlnet" not in trained:
            return {"controlnet"}
        return set()

    def check_dataset(self, preset: str, dataset: Any, trained: frozenset[str], objective: Any) -> None:
        """Framer needs >= 3 frames per sample; a run that calls the ControlNet needs samples with tracks (each
        tracks file is parsed here, before any model loads); metadata fps / motion_bucket_id must be numbers."""
        with_tracks = 0
        for i in range(len(dataset)):
            meta, path = dataset.meta(i), dataset.samples[i].path
            n = meta["num_frames"]
            if self.framer and n < 3:
                raise ValueError(f"{path}: {n} frame(s); Framer interpolates between a start and an end frame and "
                                 "needs >= 3 (data.frames, or data.pair_frames for image pairs)")
            for key in ("fps", "motion_bucket_id"):
                v = (meta.get("extra") or {}).get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 1):
                    raise ValueError(f"{path}: metadata {key}={v!r}; expected a number >= 1")
            tracks = (meta.get("sidecars") or {}).get(TRACKS_SIDECAR)
            if tracks is not None and self.framer:
                load_tracks(tracks)
                with_tracks += 1
        uses = "controlnet" in trained or bool(getattr(objective, "controlnet", False))
        if self.framer:
            logging.getLogger(__name__).info(
                "%d of %d samples have point tracks (%s)%s", with_tracks, len(dataset), TRACKS_SIDECAR,
                "; the ControlNet runs on them" if uses else "; the ControlNet is off in training "
                "(components.controlnet.mode=lora|full trains it, objective.controlnet=true calls it frozen)")
        if self.framer and uses and not with_tracks:
            how = "components.controlnet.mode trains" if "controlnet" in trained else "objective.controlnet=true calls"
            raise ValueError(f"{how} the ControlNet from point tracks, but no sample of {dataset.cfg.path} has a "
                             f"<name>.{TRACKS_SIDECAR} beside it (format: {{\"frames\": F, \"width\": W, "
                             f"\"height\": H, \"tracks\": [[[x, y] per frame] per point]}})")

    def _unet_input(self, unet: nn.Module, x: torch.Tensor, cond_latent: torch.Tensor) -> torch.Tensor:
        """[B, F, Z, h, w] scaled noisy latents + [B, N, Z, h, w] conditioning latents -> the UNet's input."""
        f = x.shape[1]
        if self.framer:
            inner = getattr(unet, "module", unet)
            cond = inner.interp_condition(cond_latent[:, 0], cond_latent[:, 1], f)
        else:
            cond = cond_latent[:, :1].expand(-1, f, -1, -1, -1)
        return torch.cat([x, cond.to(x.dtype)], dim=2)

    def _time_ids(self, batch: Batch, cfg: SVDObjectiveConfig, device: torch.device) -> torch.Tensor:
        """[B, 3] (fps − 1, motion bucket, σ_cond) per sample: metadata column, else the clip (when asked), else
        the config (SVDObjectiveConfig)."""
        fps, motion = [], []
        for i, meta in enumerate(batch.meta):
            extra = meta.get("extra") or {}
            f = extra.get("fps")
            if f is None and cfg.fps_from_clip and (meta.get("fps") or 0) > 0:
                f = max(1, round(float(meta["fps"])))
            fps.append(float(cfg.fps if f is None else f))
            m = extra.get("motion_bucket_id")
            est = float(batch.fields["motion"][i]) if "motion" in batch.fields else float("nan")
            if m is None and cfg.estimate_motion and math.isfinite(est):
                m = est
            motion.append(float(cfg.motion_bucket_id if m is None else m))
        sig = batch.stack("cond_sigma").flatten()
        return added_time_ids(torch.tensor(fps), torch.tensor(motion), sig.cpu(), batch=len(batch), device=device)

    def _train_control(self, models: dict[str, nn.Module], batch: Batch, sample: torch.Tensor, c_noise: torch.Tensor,
                       embeds: torch.Tensor, ids: torch.Tensor, scale: float) -> dict[str, Any]:
        """The ControlNet's residuals for the UNet (§7.3: added to the skips and the mid block), zero for samples
        without tracks (control off for them); {} when the ControlNet is not in training or nothing to control."""
        net = models.get("controlnet")
        if net is None:
            return {}
        trained = any(p.requires_grad for p in net.parameters())
        tracks = batch.fields["tracks"]
        has = torch.tensor([t.shape[1] > 0 for t in tracks], dtype=torch.bool)
        if not has.any() and not trained:
            return {}  # a trained ControlNet runs anyway: DDP expects every rank to call it each step
        inner = getattr(net, "module", net)
        stride = inner.config.conditioning_stride
        b, f, _, h, w = sample.shape
        heat = []
        for t, meta in zip(tracks, batch.meta):
            ph, pw = meta["geometry"]["size"] if "geometry" in meta else (h * stride, w * stride)
            pts = t.float().cpu() * torch.tensor([w * stride / pw, h * stride / ph])
            heat.append(render_heatmaps(pts, h * stride, w * stride))
        heat_t = torch.stack(heat).to(sample.device, sample.dtype)  # [B, F, 3, H, W] in 0..255
        with contextlib.nullcontext() if trained else torch.no_grad():
            down, mid = net(sample, c_noise, embeds, ids, heat_t, conditioning_scale=scale)
        keep = has.to(sample.device).repeat_interleave(f)  # [B·F]

        def gate(r: torch.Tensor) -> torch.Tensor:
            return r * keep.view(-1, 1, 1, 1).to(r.dtype)
        return {"down_block_additional_residuals": tuple(gate(r) for r in down),
                "mid_block_additional_residual": gate(mid)}

    def training_loss(self, models: dict[str, nn.Module], batch: Batch, cfg: SVDObjectiveConfig) -> torch.Tensor:
        """EDM loss on the known frames. Frames without ground truth (an image pair's middle) enter the UNet noised
        from the data prior N(0, σ_data²) (drawn from a stream apart from the documented EDM draws) and get no loss:
        never copies of a known frame (§8.2 #9)."""
        mean, logvar = batch.stack("latent_mean"), batch.stack("latent_logvar")  # [B, F, Z, h, w]
        dev = mean.device
        mask = batch.stack("frame_mask").to(dev) > 0 if "frame_mask" in batch.fields else None  # [B, F]
        gens = [torch.Generator().manual_seed(s) for s in batch.seeds]
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(dev)
        x0 = (mean + torch.exp(0.5 * logvar) * eps) * SCALE
        if mask is not None and not bool(mask.all()):
            fill = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(s ^ 0x5A17))
                                for s in batch.seeds]).to(dev) * cfg.sigma_data
            x0 = torch.where(mask[..., None, None, None], x0, fill)
        else:
            mask = None
        inp = edm.training_inputs(x0, cfg, gens)
        if self.framer:  # per-video temporal context in training (see set_temporal_context_layout)
            for m in models.values():
                set_temporal_context_layout(m, False)
        unet = models["unet"]
        wdt = next(unet.parameters()).dtype
        sample = self._unet_input(unet, inp.model_input, batch.stack("cond_latent").to(dev)).to(wdt)
        ids = self._time_ids(batch, cfg, dev).to(wdt)
        embeds = batch.stack("clip_embeds").to(dev, wdt)
        control = self._train_control(models, batch, sample, inp.c_noise, embeds, ids,
                                      float(getattr(cfg, "controlnet_scale", 1.0)))
        out = unet(sample, inp.c_noise, embeds, ids, **control)
        return edm.edm_loss(out.float(), inp, cfg, mask)

    # ------------------------------------------------------------------------------- sampling
    def _request_images(self, request: SampleRequest) -> torch.Tensor:
        if "image" not in request.images:
            raise ValueError(f"backbone {self.name!r} animates an image: give --image (validation.images.image)")
        images = [request.images["image"]]
        if self.framer:
            if "image_end" not in request.images:
                raise ValueError("backbone 'framer' interpolates between two frames: give --image and --image-end "
                                 "(validation.images: {image: ..., image_end: ...})")
            images.append(request.images["image_end"])
        return torch.stack(images)  # [N, 3, H, W]

    @torch.no_grad()
    def sample(self, comps: Components, request: SampleRequest, *, device: torch.device | str = "cpu",
               autocast_dtype: torch.dtype | None = None, offload: bool = False,
               progress: bool = False) -> torch.Tensor:
        """The pipeline: CLIP tokens and noise-augmented VAE-mode latents of the conditioning frame(s), Euler on
        Karras σ with per-frame guidance from min to max, zeros for the unconditional branch. [1, 3, F, H, W]."""
        device = torch.device(device)
        unet, vae, clip = comps["unet"], comps["vae"], comps["image_encoder"]
        ex = request.extras
        aug = SVD_NOISE_AUG_STRENGTH if ex.get("noise_aug_strength") is None else float(ex["noise_aug_strength"])
        lo = SVD_MIN_GUIDANCE if ex.get("min_guidance") is None else float(ex["min_guidance"])
        hi = (SVD_MAX_GUIDANCE if request.guidance is None else float(request.guidance)) \
            if ex.get("max_guidance") is None else float(ex["max_guidance"])
        images = self._request_images(request).to(device)  # [N, 3, H, W]
        if self.framer and request.frames < 3:
            raise ValueError(f"--frames {request.frames}: Framer needs >= 3 (start, in-between, end)")
        wdt = next(unet.parameters()).dtype
        g = torch.Generator().manual_seed(request.seed)
        embeds = encode_image(clip, images[None].to(next(clip.parameters()).dtype)).to(wdt)  # [1, N, D]
        noisy = images + aug * torch.randn(images.shape, generator=g).to(device)
        cond, _ = vae.encode_dist(noisy)  # [N, Z, h, w], the mode, unscaled
        cond = cond[None]  # [1, N, Z, h, w]
        factor = vae.cfg.spatial_factor
        shape = (1, request.frames, 4, request.height // factor, request.width // factor)
        noise = torch.randn(shape, generator=g).to(device)
        ids = added_time_ids(ex.get("fps") or SVD_FPS, ex.get("motion_bucket_id") or SVD_MOTION_BUCKET_ID, aug,
                             batch=1, device=device).to(wdt)
        do_cfg = hi > 1
        if do_cfg:  # [uncond; cond]: zero CLIP tokens and zero latents (Framer keeps its mask token)
            cond, embeds = torch.cat([torch.zeros_like(cond), cond]), torch.cat([torch.zeros_like(embeds), embeds])
            ids = torch.cat([ids, ids])
        amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())

        control = self._control(comps, request, device, do_cfg)
        layout = [m for m in (unet, control[0] if control else None) if m is not None]
        before = [set_temporal_context_layout(m, self.framer) for m in layout]  # Framer's, as released

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            inp = self._unet_input(unet, x, cond).to(wdt)
            if control is None:
                return unet(inp, t, embeds, ids).float()
            net, heat, scale = control
            down, mid = net(inp, t, embeds, ids, heat, conditioning_scale=scale)
            return unet(inp, t, embeds, ids, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).float()

        try:
            with amp:
                latents = sample_svd(model_fn, noise, svd_sampler(ex.get("sampler") or "euler"), request.steps, lo,
                                     hi, request.frames, progress=progress)
        finally:
            for m, was in zip(layout, before):
                set_temporal_context_layout(m, was)
        z = (latents[0] / SCALE).to(next(vae.parameters()).dtype)  # [F, Z, h, w]
        frames = vae.decode(z, num_frames=request.frames, decode_chunk_size=ex.get("decode_chunk_size")).float()
        return frames.permute(1, 0, 2, 3)[None].clamp(-1, 1)  # [1, 3, F, H, W]

    def _control(self, comps: Components, request: SampleRequest, device: torch.device,
                 doubled: bool) -> tuple[nn.Module, torch.Tensor, float] | None:
        """(ControlNet, heatmaps [B, F, 3, H, W] in 0..255, scale) when point tracks are given (Framer)."""
        path = request.extras.get("tracks")
        if path is None:
            return None
        if "controlnet" not in comps:
            raise ValueError(f"--tracks: backbone {self.name!r} has no ControlNet; use --backbone framer")
        tracks = load_tracks(path, request.height, request.width)
        if tracks.shape[0] != request.frames:
            raise ValueError(f"--tracks {path}: {tracks.shape[0]} frames, but --frames is {request.frames}")
        net = comps["controlnet"]
        heat = render_heatmaps(tracks, request.height, request.width)[None].to(device, next(net.parameters()).dtype)
        scale = 1.0 if request.extras.get("controlnet_scale") is None else float(request.extras["controlnet_scale"])
        return net, (torch.cat([heat, heat]) if doubled else heat), scale  # both CFG branches get the control

    # ------------------------------------------------------------------------------- files
    def export_lora(self, models: dict[str, nn.Module], out_dir: Path, written: Path, metadata: dict[str, str],
                    dtype: torch.dtype) -> list[Path]:
        """`<component>_lora/` per LoRA-trained component (`unet_lora/`, Framer's `controlnet_lora/`): the PEFT
        adapter folder FramerTurbo writes (`base_model.model.<name>.lora_A.weight`, adapter_config.json with r,
        lora_alpha and the adapted module names), so `PeftModel.from_pretrained` on that model loads it."""
        out = []
        for name in ("unet", "controlnet"):
            if name in models:
                folder = write_peft_folder(models[name], out_dir / f"{name}_lora", dtype, self.name)
                if folder is not None:
                    out.append(folder)
        return out

    def save_full(self, name: str, module: nn.Module, out_dir: Path, trained: list[str]) -> list[Path]:
        """A fully fine-tuned ControlNet: `controlnet/diffusion_pytorch_model.safetensors`, its whole state dict in
        Framer's layout (the keys of checkpoints/framer_512x320/controlnet), so `model.sources.controlnet=<that
        folder>` (infer.py `--source controlnet=...`) loads it in place of Framer's. Never a pickle."""
        if name != "controlnet":
            return super().save_full(name, module, out_dir, trained)
        from lora_core.runtime.checkpoint import save_tensors
        sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        path = out_dir / "controlnet" / "diffusion_pytorch_model.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        return [save_tensors(sd, path, metadata={"backbone": self.name, "format": "pt"})]


def write_peft_folder(module: nn.Module, folder: Path, dtype: torch.dtype, backbone: str) -> Path | None:
    """A PEFT LoRA adapter folder of `module`'s LoRA layers; None when PEFT's one r / lora_alpha cannot describe
    them (per-layer ranks or rsLoRA: the engine's own files still do)."""
    layers = lora_layers(module)
    ranks = {m.lora_rank for m in layers.values()}
    alphas = {float(m.lora_alpha) for m in layers.values()}
    if not layers or len(ranks) != 1 or len(alphas) != 1 or any(m.lora_use_rslora for m in layers.values()):
        return None
    sd = {}
    for name, m in layers.items():
        sd[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().reshape(m.lora_A.shape[0], -1).to(dtype).cpu().contiguous()
        sd[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().reshape(m.lora_B.shape[0], -1).to(dtype).cpu().contiguous()
    cfg = {"peft_type": "LORA", "r": ranks.pop(), "lora_alpha": alphas.pop(), "target_modules": sorted(layers),
           "lora_dropout": 0.0, "bias": "none", "init_lora_weights": "gaussian", "task_type": None,
           "base_model_name_or_path": None, "fan_in_fan_out": False, "modules_to_save": None,
           "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
           "inference_mode": True}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "adapter_model.safetensors",
                 lambda p: save_file(sd, str(p), metadata={"format": "pt", "backbone": backbone}))
    atomic_write(folder / "adapter_config.json", lambda p: p.write_text(json.dumps(cfg, indent=2)))
    return folder


def map_points(points: torch.Tensor, geometry: dict[str, Any]) -> torch.Tensor:
    """Pixel (x, y) of the source [..., 2] -> the same points on the training frames, through the dataset's resize
    to `resize` (h, w), crop at `crop` (top, left) and optional left-right flip (`geometry` as the dataset's
    meta["geometry"]). Pixel centres: a source pixel centre x maps to (x + ½)·rw/sw − ½ − left."""
    sh, sw = geometry["source_size"]
    rh, rw = geometry["resize"]
    top, left = geometry["crop"]
    x = (points[..., 0] + 0.5) * (rw / sw) - 0.5 - left
    y = (points[..., 1] + 0.5) * (rh / sh) - 0.5 - top
    if geometry.get("flip"):
        x = geometry["size"][1] - 1 - x
    return torch.stack([x, y], dim=-1)


class FramerSpec(SVDSpec):
    name = "framer"
    presets = ("tiny", "framer")
    default_rank = 64     # FramerTurbo's r 64 / alpha 64
    default_alpha = 64.0
    lora_file_metadata = {"modelspec.architecture": "framer-svd-xt/lora"}
    framer = True
    conditioning_images = 2
    embedded_sample = "pairs"   # the tiny default trains on start/end pairs (with point tracks) made on the fly

    def unet_preset(self, preset: str) -> str:
        return "tiny-framer" if preset == "tiny" else "framer"

    def sources(self, preset: str) -> dict[str, str]:
        return {"framer": "Framer's checkpoints/framer_512x320 folder (unet/, controlnet/)",
                "controlnet": "a ControlNet folder (diffusion_pytorch_model.safetensors) replacing Framer's, e.g. "
                              "the controlnet/ a full ControlNet fine-tune writes"}

    def image_inputs(self, preset: str) -> dict[str, str]:
        return {"image": "the start frame", "image_end": "the end frame"}

    def components(self, preset: str) -> dict[str, Component]:
        return {**super().components(preset),
                "controlnet": Component("controlnet", modes=("frozen", "lora", "full"), lora_targets=TURBO_TARGETS,
                                        naming=CONTROLNET_NAMING,
                                        description="ControlNetSVDModel (point-track control; "
                                        "called in sampling when --tracks is given)")}

    def sample_options(self, preset: str) -> list[SampleOption]:
        return [*super().sample_options(preset),
                SampleOption("tracks", str, "point tracks JSON ({frames, width, height, tracks: [[[x, y] x F] x P]}): "
                             "the ControlNet follows them"),
                SampleOption("controlnet_scale", float, "ControlNet residual scale (default 1.0)")]

    def media_rules(self, preset: str) -> MediaRules:
        rules = super().media_rules(preset)
        return rules if preset != "tiny" else dataclasses.replace(rules, default_frames=4)


__all__ = ["SVDSpec", "FramerSpec", "SVDObjectiveConfig", "FramerObjectiveConfig", "estimate_motion_bucket",
           "map_points", "write_peft_folder", "CONTROLNET_NAMING", "UNET_NAMING", "ATTENTION_TARGETS", "TURBO_TARGETS"]
