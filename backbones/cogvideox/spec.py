"""`--backbone cogvideox`: CogVideoX 1.0 text-to-video (2B, 5B), v-prediction DDPM with zero terminal SNR.

Checkpoint: `--ckpt-dir` = the official diffusers folder (THUDM/CogVideoX-2b, -5b): transformer/, vae/,
text_encoder/ (T5 v1.1 XXL), tokenizer/ (spiece.model), scheduler/; loaded unchanged (diffusers names, no key
map; see `checkpoint.py`). The tiny preset runs on deterministic random weights without one.

Training (cogvideox.md §5.3): the cached VAE posterior is drawn afresh every step, scaled by the preset's VAE
scaling_factor, put in the transformer's frames-before-channels layout, noised at t ~ U{0..999} on the preset's
schedule (SNR shift, zero terminal SNR) and trained with plain v-MSE (exactly the official 1/(1-abar)-weighted
x0 loss). LoRA on attn1's to_q/to_k/to_v/to_out.0 of every block, rank 128 / alpha 64 by default (THUDM),
saved in diffusers format (`transformer.transformer_blocks.N.attn1.to_q.lora_A.weight`, alpha folded into B).

Sampling (§5.4): CogVideoXDDIM (2B) or the DPM-Solver++ SDE (5B), CFG 6 with the negative prompt's T5 encoding
(default ""), optional dynamic CFG, VAE tiling / slicing.

Image to video (preset 5b-i2v, §9): the clip's first frame is noise-augmented in pixel space (sigma =
exp(N(-3, 0.5)), THUDM's finetune) and its VAE posterior cached with the clip; each step draws its latent,
scales it, pads it with zero latent frames and concatenates it to the noisy latent on channels (noisy first).
Deviation: THUDM re-draws the augmentation and re-encodes the frame every step (VAE in the training loop);
here it is drawn once per clip when the media cache is filled (a generator seeded by the frame's content), so
the VAE stays out of training and the cache stays valid. The "image" condition is dropped to zero latents
with data.condition_dropout.image (SAT's noised_image_dropout 0.05, the 5b-i2v default). Sampling takes
request.images["image"] (infer.py --image), encoded without augmentation, as CogVideoXImageToVideoPipeline.

Shapes: B batch, F/H/W pixel frames/height/width, f/h/w latent ones (f = (F-1)/4 + 1, h = H/8), C = 16 latent
channels, T = 226 text tokens, D the T5 width (4096; 32 on tiny).
"""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lora_core.formats import KeyMap, LoRANaming

from ..encoders.spm_tokenizer import T5SpmTokenizer, save_tiny_t5_tokenizer
from ..encoders.t5 import T5_V11_PRESETS, T5V11Encoder, encode_prompts_t5, load_t5_v11
from ..loading import on_device
from ..objectives import ddpm
from ..spec import (
    BackboneSpec,
    Batch,
    CacheField,
    Component,
    Components,
    Condition,
    MediaRules,
    SampleOption,
    SampleRequest,
    Sources,
)
from . import checkpoint as ck
from .samplers import (
    DEFAULT_SAMPLER,
    cogvideox_objective,
    initial_latents,
    make_cogvideox_sampler,
    sample_cogvideox,
)
from .transformer import TRANSFORMER_PRESETS, CogVideoXTransformer3DModel
from .vae import VAE_PRESETS, AutoencoderKLCogVideoX, sample_latent

PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
VAE_PRESET = {"tiny": "tiny", "tiny-i2v": "tiny", "2b": "2b", "5b": "5b", "5b-i2v": "5b"}
T5_PRESET = {"tiny": "tiny", "tiny-i2v": "tiny", "2b": "xxl", "5b": "xxl", "5b-i2v": "xxl"}
# vae/config.json scaling_factor per preset (cogvideox.md §0.2); the tiny VAE preset keeps the 5B's
SCALING_FACTOR = {"tiny": VAE_PRESETS["tiny"].scaling_factor, "tiny-i2v": VAE_PRESETS["tiny"].scaling_factor,
                  "2b": 1.15258426, "5b": 0.7, "5b-i2v": 0.7}
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attn1 of every block: the official LoRA scripts' targets
# our module names are diffusers' (identity map): diffusers `transformer.`, kohya / CogVideoX-Fun `lora_unet_`,
# ComfyUI `diffusion_model.`, PEFT folders
TRANSFORMER_NAMING = LoRANaming.default(KeyMap.identity(prefix="transformer."))
CogVideoXTransformer3DModel.lora_key_map = KeyMap.identity(prefix="transformer.")  # type: ignore[attr-defined]
CogVideoXTransformer3DModel.backbone_name = "cogvideox"  # type: ignore[attr-defined]
_TINY_TOKENIZER: dict[str, Path] = {}
_SEEDS = {"transformer": 20, "vae": 21, "text_encoder": 22}
I2V_PRESETS = ("5b-i2v", "tiny-i2v")
TINY_PRESETS = ("tiny", "tiny-i2v")
IMAGE_NOISE = (-3.0, 0.5)  # log-normal sigma of the I2V first-frame augmentation (THUDM finetune)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_tokenizer() -> T5SpmTokenizer:
    """The tiny T5 tokenizer, written once per process into a temporary folder."""
    if "dir" not in _TINY_TOKENIZER:
        _TINY_TOKENIZER["dir"] = save_tiny_t5_tokenizer(Path(tempfile.mkdtemp(prefix="tiny_t5_tok_")))
    return T5SpmTokenizer(_TINY_TOKENIZER["dir"])


def preset_of(transformer: nn.Module) -> str:
    """The preset whose transformer config this module has (sampling gets components, not a preset)."""
    module = getattr(transformer, "module", transformer)  # a DDP wrapper
    cfg = getattr(module, "config", None)
    for name, want in TRANSFORMER_PRESETS.items():
        if cfg == want:
            return name
    if cfg is not None and cfg.use_learned_positional_embeddings:
        return "5b-i2v"
    return "5b" if cfg is not None and cfg.use_rotary_positional_embeddings else "2b"


class CogVideoXSpec(BackboneSpec):
    name = "cogvideox"
    presets = ("tiny", "tiny-i2v", "2b", "5b", "5b-i2v")
    random_presets = TINY_PRESETS
    default_rank = 128
    default_alpha = 64.0
    lora_file_metadata = {"modelspec.architecture": "cogvideox/lora",
                          "modelspec.implementation": "https://github.com/THUDM/CogVideo"}

    # ------------------------------------------------------------------------------ declarations
    def components(self, preset: str) -> dict[str, Component]:
        self.check_preset(preset)
        return {
            "transformer": Component("transformer", modes=("lora", "full", "frozen"), in_training=True,
                                     lora_targets=TARGETS, naming=TRANSFORMER_NAMING,
                                     description="CogVideoXTransformer3DModel (the denoiser, v-prediction)"),
            "vae": Component("vae", description="AutoencoderKLCogVideoX (4x8x8, 16 channels)"),
            "text_encoder": Component("text_encoder", description="T5 v1.1 XXL encoder + SentencePiece tokenizer"),
        }

    def media_rules(self, preset: str) -> MediaRules:
        self.check_preset(preset)
        # 8k+1 frames: the VAE encodes 4k+1, but only an odd latent count decodes back to 4(f-1)+1 frames
        if preset in TINY_PRESETS:
            return MediaRules(kind="video", frame_sampling="fps", fps=8.0, frame_stride=1, frame_multiple=8,
                              frame_offset=1, size_multiple=16, default_frames=9, default_height=64,
                              default_width=96)
        return MediaRules(kind="video", frame_sampling="fps", fps=8.0, frame_stride=1, frame_multiple=8,
                          frame_offset=1, size_multiple=16, default_frames=49, default_height=480,
                          default_width=720)

    def cache_fields(self, preset: str, trained: frozenset[str] = frozenset()) -> list[CacheField]:
        fields = [CacheField("latent_mean", "media"), CacheField("latent_logvar", "media"), CacheField("text", "text")]
        if preset in I2V_PRESETS:
            fields += [CacheField("image_mean", "media"), CacheField("image_logvar", "media")]
        return fields

    def conditions(self, preset: str) -> list[Condition]:
        conds = [Condition("caption", fields=("text",), null="empty_text")]
        if preset in I2V_PRESETS:  # the objective zeroes the image latents of a dropped sample
            conds.append(Condition("image", fields=(), null="objective"))
        return conds

    def image_inputs(self, preset: str) -> dict[str, str]:
        if preset in I2V_PRESETS:
            return {"image": "first frame (resized to cover the output size, then center-cropped)"}
        return {}

    def encoder_parts(self, preset: str, keyed_by: str, trained: frozenset[str] = frozenset()) -> set[str]:
        return {"vae"} if keyed_by == "media" else {"text_encoder", "tokenizer"}

    def objective_config(self, preset: str) -> ddpm.DDPMObjectiveConfig:
        self.check_preset(preset)
        return cogvideox_objective(preset)

    def preset_overrides(self, preset: str) -> dict[str, Any]:
        self.check_preset(preset)
        if preset in TINY_PRESETS:
            return {"lora.rank": 8, "lora.alpha": 8.0, "lora.save_format": "diffusers", "data.num_frames": 9,
                    "data.height": 64, "data.width": 96, "data.fps": 8.0, "train.gradient_checkpointing": False,
                    "train.max_steps": 30, "train.log_every": 10, "optim.lr": 1e-3, "validation.frames": 9,
                    "validation.height": 64, "validation.width": 96, "validation.steps": 4,
                    **self._i2v_overrides(preset)}
        return {"lora.rank": 128, "lora.alpha": 64.0, "lora.save_format": "diffusers", "data.num_frames": 49,
                "data.height": 480, "data.width": 720, "data.fps": 8.0, "train.gradient_checkpointing": True,
                "optim.lr": 1e-4, "validation.frames": 49, "validation.height": 480, "validation.width": 720,
                "validation.steps": 50, "validation.guidance": 6.0, **self._i2v_overrides(preset)}

    @staticmethod
    def _i2v_overrides(preset: str) -> dict[str, Any]:
        """I2V: SAT's noised_image_dropout 0.05; one size (its learned position table fixes the latent grid)."""
        return {"data.condition_dropout": {"image": 0.05}, "data.buckets": False} if preset in I2V_PRESETS else {}

    def sequence_parallel(self, preset: str) -> int | None:
        self.check_preset(preset)
        return TRANSFORMER_PRESETS[preset].num_attention_heads  # the transformer's `sp` / `attn_op` seams

    def units(self, name: str, module: nn.Module) -> list[nn.Module]:
        if name == "transformer":
            return list(module.transformer_blocks)  # type: ignore[arg-type]
        if name == "text_encoder":
            return list(module.encoder.block)  # type: ignore[union-attr, arg-type]
        return []

    def sample_options(self, preset: str) -> list[SampleOption]:
        default = DEFAULT_SAMPLER.get(preset, "ddim")
        return [SampleOption("sampler", str, f"solver (default {default}: DDIM for 2B, DPM for 5B)",
                             choices=("ddim", "dpm")),
                SampleOption("dynamic_cfg", _flag, "on/off: CogVideoX's dynamic (wave-like) guidance scale "
                             "(default off)"),  # type: ignore[arg-type]
                SampleOption("vae_tiling", _flag, "on/off: decode with VAE tiling and slicing (default on, "
                             "off on tiny)")]  # type: ignore[arg-type]

    def default_steps(self, preset: str) -> int:
        return 4 if preset in TINY_PRESETS else 50

    def default_guidance(self, preset: str) -> float:
        return 6.0

    # ------------------------------------------------------------------------------ building
    def component_specs(self, preset: str) -> dict[str, nn.Module]:
        self.check_preset(preset)
        with torch.device("meta"):
            return {"transformer": CogVideoXTransformer3DModel(TRANSFORMER_PRESETS[preset]),
                    "vae": AutoencoderKLCogVideoX(VAE_PRESETS[VAE_PRESET[preset]]),
                    "text_encoder": T5V11Encoder(T5_V11_PRESETS[T5_PRESET[preset]])}

    def check_sources(self, preset: str, sources: Sources, parts: set[str]) -> None:
        self.check_preset(preset)
        super().check_sources(preset, sources, parts)
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown component(s) {sorted(unknown)} of backbone {self.name!r}; "
                             f"choose from {', '.join(PARTS)}")
        ckpt_dir = sources.ckpt_dir
        if ckpt_dir is None:
            return
        ckpt_dir = Path(ckpt_dir)
        metas = self.component_specs(preset)
        if "transformer" in parts:
            folder = ck.folder_of(ckpt_dir, "transformer")
            ck.check_transformer_config(folder, TRANSFORMER_PRESETS[preset], preset)
            ck.check_weights(folder, ck.WEIGHTS_STEM, metas["transformer"], "transformer")
            ck.check_scheduler_config(ckpt_dir, cogvideox_objective(preset).snr_shift, preset)
        if "vae" in parts:
            folder = ck.folder_of(ckpt_dir, "vae")
            ck.check_vae_config(folder, SCALING_FACTOR[preset], preset)
            ck.check_weights(folder, ck.WEIGHTS_STEM, metas["vae"], "vae")
        if "text_encoder" in parts:
            ck.check_t5(ck.folder_of(ckpt_dir, "text_encoder"), metas["text_encoder"],
                        T5_V11_PRESETS[T5_PRESET[preset]], preset)
        if "text_encoder" in parts or "tokenizer" in parts:
            ck.tokenizer_folder(ckpt_dir)

    def build(self, preset: str, parts: set[str], sources: Sources | str | Path | None = None,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Components:
        if not isinstance(sources, Sources):
            sources = Sources(ckpt_dir=Path(sources) if sources is not None else None)
        parts = set(parts)
        self.check_sources(preset, sources, parts)  # every check before any allocation
        comps: Components = {}
        ckpt_dir = sources.ckpt_dir
        if ckpt_dir is None:
            for part in ("transformer", "vae", "text_encoder"):
                if part in parts:
                    comps[part] = self.random_component(preset, part, device, dtype)
            if "text_encoder" in parts or "tokenizer" in parts:
                comps["tokenizer"] = tiny_tokenizer()
            comps["preset"] = preset
            return comps
        ckpt_dir = Path(ckpt_dir)
        metas = self.component_specs(preset)
        if "transformer" in parts:
            comps["transformer"] = ck.load_weights(metas["transformer"], ckpt_dir / "transformer", ck.WEIGHTS_STEM,
                                                   dtype, device)
        if "vae" in parts:  # fp32 as released (force_upcast)
            comps["vae"] = ck.load_weights(metas["vae"], ckpt_dir / "vae", ck.WEIGHTS_STEM, torch.float32,
                                           device).eval()
        if "text_encoder" in parts:
            comps["text_encoder"] = load_t5_v11(ckpt_dir / "text_encoder", T5_PRESET[preset], dtype=dtype,
                                                device=device)
        if "text_encoder" in parts or "tokenizer" in parts:
            comps["tokenizer"] = T5SpmTokenizer(ck.tokenizer_folder(ckpt_dir))
        comps["preset"] = preset  # not a network: tells encode_media / sample the preset (I2V caches more)
        return comps

    def random_component(self, preset: str, part: str, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> nn.Module:
        """Deterministic random weights (the same in every process): modules built with their own init under
        a fixed seed."""
        with _seeded(_SEEDS[part]):
            if part == "transformer":
                return CogVideoXTransformer3DModel(TRANSFORMER_PRESETS[preset]).to(device=device, dtype=dtype)
            if part == "vae":
                return AutoencoderKLCogVideoX(VAE_PRESETS[VAE_PRESET[preset]]).to(device).eval()
            return T5V11Encoder(T5_V11_PRESETS[T5_PRESET[preset]]).to(device=device, dtype=dtype).eval()

    def save_checkpoint(self, comps: Components, out_dir: str | Path, sources: Sources | None = None,
                        max_shard_bytes: int = 10 * 2**30) -> Path:
        """The official diffusers layout, which `--ckpt-dir` and diffusers' `from_pretrained` load."""
        from lora_core.inject import lora_layers
        out = Path(out_dir)
        for part in ("transformer", "vae", "text_encoder", "tokenizer"):
            if part not in comps:
                raise ValueError(f"exporting a CogVideoX folder needs the {part} component")
        src = sources.ckpt_dir if sources is not None else None
        if src is not None and Path(src).exists() and out.exists() and Path(src).resolve() == out.resolve():
            raise ValueError(f"cannot export into the checkpoint folder it was loaded from ({out}); pick another")
        tr = comps["transformer"]
        if lora_layers(tr):
            raise ValueError("the transformer still has LoRA layers; merge and strip them "
                             "(lora_core.remove_lora(transformer, merge=True)) before exporting")
        out.mkdir(parents=True, exist_ok=True)
        preset = preset_of(tr)
        ck.save_weights(dict(tr.state_dict()), out / "transformer", ck.WEIGHTS_STEM, max_shard_bytes)
        (out / "transformer" / "config.json").write_text(_dumps(ck.transformer_config_json(tr.config)))
        vae = comps["vae"]
        ck.save_weights(dict(vae.state_dict()), out / "vae", ck.WEIGHTS_STEM, max_shard_bytes)
        (out / "vae" / "config.json").write_text(_dumps(ck.vae_config_json(vae.config)))
        enc = comps["text_encoder"]
        sd = {k: v for k, v in enc.state_dict().items() if k != ck.T5_EMBED[1]}  # the file stores `shared` only
        ck.save_weights(sd, out / "text_encoder", ck.T5_STEM, max_shard_bytes)
        (out / "text_encoder" / "config.json").write_text(_dumps(ck.t5_config_json(enc.cfg)))
        ck.copy_tokenizer(comps["tokenizer"].source, out / "tokenizer")
        (out / "scheduler").mkdir(exist_ok=True)
        (out / "scheduler" / "scheduler_config.json").write_text(
            _dumps(ck.scheduler_config_json(cogvideox_objective(preset).snr_shift)))
        (out / "model_index.json").write_text(_dumps(ck.model_index_json(preset in I2V_PRESETS)))
        return out

    # ---------------------------------------------------------------------------------- data
    @torch.no_grad()
    def encode_media(self, comps: Components, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        """item["video"] [3, F, H, W] in [-1, 1] -> the posterior, mean / logvar [16, f, h, w] float32 (cpu)."""
        vae = comps["vae"]
        x = item["video"][None].to(next(vae.parameters()).device)
        mean, logvar = vae.encode(x)
        out = {"latent_mean": mean[0].float().cpu(), "latent_logvar": logvar[0].float().cpu()}
        if comps.get("preset") in I2V_PRESETS:
            image = augment_image(item["video"][:, :1].float().cpu())  # [3, 1, H, W]
            mean, logvar = vae.encode(image[None].to(x.device))
            out.update(image_mean=mean[0].float().cpu(), image_logvar=logvar[0].float().cpu())
        return out

    @torch.no_grad()
    def encode_text(self, comps: Components, texts: list[str],
                    trained: frozenset[str] = frozenset()) -> list[dict[str, torch.Tensor]]:
        """texts -> {"text": [226, D]} each: all 226 T5 states, pad slots included (no mask, as upstream)."""
        enc = comps["text_encoder"]
        context = encode_prompts_t5(enc, comps["tokenizer"], list(texts), device=next(enc.parameters()).device)
        return [{"text": c} for c in context.float().cpu()]

    # ------------------------------------------------------------------------------ objective
    def training_loss(self, models: dict[str, nn.Module], batch: Batch, cfg: ddpm.DDPMObjectiveConfig) -> torch.Tensor:
        """v-MSE on a posterior draw per step (the diffusers script's `latent_dist.sample()` per batch); every
        draw of sample i (posterior, t, noise) from a generator seeded with batch.seeds[i]."""
        transformer = models["transformer"]
        preset = preset_of(transformer)
        mean, logvar = batch.stack("latent_mean"), batch.stack("latent_logvar")  # [B, C, f, h, w]
        gens = [torch.Generator().manual_seed(s) for s in batch.seeds]
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(mean.device)
        x0 = (mean + torch.exp(0.5 * logvar) * eps) * SCALING_FACTOR[preset]
        x0 = x0.permute(0, 2, 1, 3, 4).contiguous()  # [B, f, C, h, w]: the transformer's layout
        image = None
        if _is_i2v(transformer):
            if "image_mean" not in batch.fields:
                raise ValueError("the I2V transformer needs the image_mean / image_logvar cache fields "
                                 "(train it with --preset 5b-i2v)")
            im, ilv = batch.stack("image_mean"), batch.stack("image_logvar")  # [B, C, 1, h, w]
            ieps = torch.stack([torch.randn(im.shape[1:], generator=g) for g in gens]).to(im.device)
            image = (im + torch.exp(0.5 * ilv) * ieps) * SCALING_FACTOR[preset]
            dropped = batch.dropped.get("image")
            if dropped is not None and any(dropped):
                keep = torch.tensor([not d for d in dropped], dtype=image.dtype, device=image.device)
                image = image * keep[:, None, None, None, None]
            image = pad_image_latents(image.permute(0, 2, 1, 3, 4), x0.shape[1])  # [B, f, C, h, w]
        inp = ddpm.training_inputs(x0, cfg, gens)
        text = batch.stack("text")  # [B, 226, D]
        x_in = inp.x_t if image is None else torch.cat([inp.x_t, image.to(inp.x_t.dtype)], dim=2)
        pred = transformer(x_in, text, inp.t)
        return ddpm.weighted_mse(pred, inp.target, inp.weights)

    # ------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, comps: Components, request: SampleRequest, *, device: torch.device | str = "cpu",
               autocast_dtype: torch.dtype | None = None, offload: bool = False,
               progress: bool = False) -> torch.Tensor:
        """Text to video with classifier-free guidance. Returns [B, 3, F, H, W] float32 in [-1, 1]."""
        if not request.prompts:
            raise ValueError("backbone 'cogvideox' samples from text: give a prompt")
        tr, vae, enc, tok = comps["transformer"], comps["vae"], comps["text_encoder"], comps["tokenizer"]
        preset = preset_of(tr)
        i2v = _is_i2v(tr)
        image = request.images.get("image")
        if i2v and image is None:
            raise ValueError("the CogVideoX-5b-I2V animates an image: give --image (validation.images.image)")
        device = torch.device(device)
        b = len(request.prompts)
        guidance = 6.0 if request.guidance is None else float(request.guidance)
        kind = request.extras.get("sampler") or DEFAULT_SAMPLER.get(preset, "ddim")
        dynamic = bool(request.extras.get("dynamic_cfg") or False)
        tiling = request.extras.get("vae_tiling")
        tiling = preset not in TINY_PRESETS if tiling is None else bool(tiling)
        tdt = next(tr.parameters()).dtype
        with on_device(enc, device, offload):
            context = encode_prompts_t5(enc, tok, list(request.prompts), device=device)
            if guidance > 1.0:  # the pipeline's order: [negative; positive]
                neg = encode_prompts_t5(enc, tok, [request.negative_prompt or ""] * b, device=device)
                context = torch.cat([neg, context])
        context = context.to(tdt)
        gen = torch.Generator().manual_seed(request.seed)
        cond = None
        if i2v:  # the pipeline's order: the image posterior draw, then the starting noise, on one generator
            with on_device(vae, device, offload):
                mean, logvar = vae.encode(image[None, :, None].to(device))  # [1, C, 1, h, w]
            z = sample_latent(mean.float(), logvar.float(), gen) * SCALING_FACTOR[preset]
        latents = initial_latents(b, request.frames, request.height, request.width, gen, device=device)
        if i2v:
            cond = pad_image_latents(z.permute(0, 2, 1, 3, 4).expand(b, -1, -1, -1, -1), latents.shape[1])
            cond = (torch.cat([cond, cond]) if guidance > 1.0 else cond).to(tdt)
        sampler = make_cogvideox_sampler(preset, kind)
        amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = x.to(tdt) if cond is None else torch.cat([x.to(tdt), cond], dim=2)
            return tr(x, context, t).float()

        with on_device(tr, device, offload), amp:
            latents = sample_cogvideox(model_fn, latents, sampler, request.steps, guidance, dynamic, gen,
                                       progress=progress)
        z = latents.permute(0, 2, 1, 3, 4) / SCALING_FACTOR[preset]  # [B, C, f, h, w]
        with on_device(vae, device, offload):
            if tiling:
                vae.enable_tiling()
                vae.enable_slicing()
            else:
                vae.disable_tiling()
                vae.disable_slicing()
            video = vae.decode(z.to(next(vae.parameters()).dtype))
        return video.float().clamp(-1, 1)


def _is_i2v(transformer: nn.Module) -> bool:
    cfg = getattr(transformer, "module", transformer).config
    return cfg.in_channels == 2 * cfg.out_channels


def pad_image_latents(image: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, 1, C, h, w] first-frame latents -> [B, frames, C, h, w], zero latent frames after it (I2V)."""
    pad = image.new_zeros(image.shape[0], frames - image.shape[1], *image.shape[2:])
    return torch.cat([image, pad], dim=1)


def augment_image(image: torch.Tensor) -> torch.Tensor:
    """image [3, 1, H, W] in [-1, 1] + sigma * N(0, I), sigma = exp(N(-3, 0.5)) (THUDM's I2V finetune). Drawn from a
    generator seeded by the frame's bytes: the same clip gets the same draw in every process and run."""
    import zlib
    g = torch.Generator().manual_seed(zlib.crc32(image.numpy().tobytes()))
    sigma = torch.exp(torch.randn((), generator=g) * IMAGE_NOISE[1] + IMAGE_NOISE[0])
    return image + sigma * torch.randn(image.shape, generator=g)


def _flag(text: str | bool) -> bool:
    """A command-line switch value: on/off, true/false, yes/no, 1/0."""
    if isinstance(text, bool):
        return text
    v = str(text).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a switch value; use on or off")


def _dumps(obj: Any) -> str:
    import json
    return json.dumps(obj, indent=2) + "\n"
