"""`--backbone wan_ti2v`: Wan2.2 TI2V-5B (flow matching, first-frame image conditioning).

Checkpoint folders (both load unchanged):
- official `Wan-AI/Wan2.2-TI2V-5B`: config.json, diffusion_pytorch_model-0000N-of-00003.safetensors + index,
  Wan2.2_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/tokenizer.json;
- diffusers `Wan-AI/Wan2.2-TI2V-5B-Diffusers`: transformer/, vae/, text_encoder/, tokenizer/ (through the key maps).
Without a folder the preset gets deterministic random weights (the tiny preset's embedded default).

Shapes: B batch, F/H/W video frames/height/width, f/h/w latent ones, Z latent channels, L text tokens.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from lora_core.data.sample_data import demo_prompt
from lora_core.formats import KeyMap, LoRANaming

from ..objectives import flow
from ..loading import (expected_shapes, load_pth, load_safetensors_into, load_state_dict_into, on_device,
                       safetensors_shapes, sharded_safetensors, validate)
from ..spec import (BackboneSpec, Batch, CacheField, Component, Components, Condition, MediaRules, SampleOption,
                    SampleRequest, Sources)
from .dit import DIT_PRESETS, WanDiT
from .keymap import dit_from_diffusers, dit_to_diffusers
from ..encoders.t5 import T5_PRESETS, UMT5Encoder, encode_prompts, t5_from_hf
from ..encoders.t5_tokenizer import WanTokenizer, build_tiny_tokenizer
from .vae import VAE_PRESETS, WanVAE
from .vae_keymap import vae_from_diffusers

VAE_FILE = "Wan2.2_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
# upstream's shared_config.sample_neg_prompt, used when no negative prompt is given
DEFAULT_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                           "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                           "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
PARTS = ("dit", "vae", "text_encoder")
# the tiny pretrained base shipped with the project (made by `python -m backbones.wan.pretrain_tiny`)
TINY_BASE = Path(__file__).parent / "tiny_base"
# the embedded demo's prompt, sampled before and after: "a sks circle moving left to right on a black background"
# (the concept dataset, `make_concept_dataset`, shows magenta shapes captioned "sks" in every other combination)
DEMO_PROMPT = demo_prompt()

WanDiT.lora_key_map = KeyMap(dit_to_diffusers, dit_from_diffusers, prefix="transformer.")  # type: ignore[attr-defined]
WanDiT.backbone_name = "wan_ti2v"  # type: ignore[attr-defined]
# LoRA keys of the DiT: original names under diffusion_model. (ComfyUI), lora_unet_ (kohya / musubi-tuner),
# diffusers names under transformer.
DIT_NAMING = LoRANaming(prefixes={"native": "", "comfyui": "diffusion_model.", "kohya": "lora_unet_",
                                  "diffusers": "transformer."}, key_map=WanDiT.lora_key_map)  # type: ignore[attr-defined]


def _layout(ckpt_dir: Path) -> str:
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt_dir} does not exist (expected the downloaded "
                                f"Wan-AI/Wan2.2-TI2V-5B folder)")
    if (ckpt_dir / "transformer").is_dir() or (ckpt_dir / "model_index.json").is_file():
        return "diffusers"
    return "official"


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class WanTI2VSpec(BackboneSpec):
    name = "wan_ti2v"
    presets = ("tiny", "5b")
    random_presets = ("tiny",)
    default_rank = 32
    default_alpha = 32.0
    patch = (1, 2, 2)
    # what LoRA managers and musubi-tuner read from a kohya-format file
    lora_file_metadata = {"ss_network_module": "networks.lora_wan",
                          "modelspec.architecture": "wan-2.2-ti2v-5b/lora",
                          "modelspec.implementation": "https://github.com/Wan-Video/Wan2.2"}
    embedded_sample = "concept"
    default_targets = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                       "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")

    def components(self, preset: str) -> dict[str, Component]:
        self.check_preset(preset)
        return {
            "dit": Component("dit", modes=("lora", "frozen"), in_training=True, lora_targets=self.default_targets,
                             naming=DIT_NAMING, description="WanModel DiT (the denoiser)"),
            "vae": Component("vae", description="Wan2.2 VAE (16x16x4 compression, 48 channels)"),
            "text_encoder": Component("text_encoder", description="umT5-XXL encoder + tokenizer"),
        }

    def media_rules(self, preset: str) -> MediaRules:
        self.check_preset(preset)
        if preset == "tiny":
            return MediaRules(kind="video", frame_sampling="fps", fps=24.0, frame_stride=1, frame_multiple=4,
                              frame_offset=1, size_multiple=32, default_frames=17, default_height=64,
                              default_width=64)
        return MediaRules(kind="video", frame_sampling="fps", fps=24.0, frame_stride=1, frame_multiple=4,
                          frame_offset=1, size_multiple=32, default_frames=121, default_height=704,
                          default_width=1280)

    def cache_fields(self, preset: str, trained: frozenset[str] = frozenset()) -> list[CacheField]:
        return [CacheField("latents", "media"), CacheField("context", "text")]

    def conditions(self, preset: str) -> list[Condition]:
        return [Condition("caption", fields=("context",), null="empty_text")]

    def encoder_parts(self, preset: str, keyed_by: str, trained: frozenset[str] = frozenset()) -> set[str]:
        return {"vae"} if keyed_by == "media" else {"text_encoder"}

    def objective_config(self, preset: str) -> flow.FlowObjectiveConfig:
        return flow.FlowObjectiveConfig(timestep_sampling="logit_normal", shift=5.0, first_frame_prob=0.2)

    def sequence_parallel(self, preset: str) -> int | None:
        return DIT_PRESETS[preset].num_heads

    def units(self, name: str, module: nn.Module) -> list[nn.Module]:
        return list(module.blocks)  # type: ignore[arg-type]

    def sample_options(self, preset: str) -> list[SampleOption]:
        return [SampleOption("shift", float, "noise schedule shift (default 5; 1 = no shift)",
                             valid=lambda v: v > 0, expected="> 0 (5 for Wan2.2 TI2V-5B, 1 for no shift)"),
                SampleOption("sampler", str, "solver (default unipc)", choices=("unipc", "euler"))]

    def image_inputs(self, preset: str) -> dict[str, str]:
        return {"image": "first frame (resized to cover the output size, then center-cropped)"}

    def preset_overrides(self, preset: str) -> dict[str, Any]:
        self.check_preset(preset)
        if preset == "tiny":
            # the embedded default: a few clips, a model that takes milliseconds a step
            return {"data.num_frames": 17, "data.height": 64, "data.width": 64, "data.fps": 24.0,
                    "train.gradient_checkpointing": False, "train.max_steps": 100, "train.log_every": 10,
                    "optim.lr": 1e-3, "validation.frames": 17,
                    "validation.height": 64, "validation.width": 64,
                    # the demo: the trained concept sampled with and without the LoRA, next to it
                    "validation.prompts": [DEMO_PROMPT], "validation.at_end": True,
                    "validation.compare_base": True}
        return {"data.num_frames": 49, "data.height": 704, "data.width": 1280, "data.fps": 24.0,
                "train.gradient_checkpointing": True, "validation.frames": 121,
                "validation.height": 704, "validation.width": 1280, "validation.steps": 50}

    def default_steps(self, preset: str) -> int:
        return 10 if preset == "tiny" else 50  # 5b: upstream's 50

    def default_ckpt_dir(self, preset: str) -> Path | None:
        return TINY_BASE if preset == "tiny" and (TINY_BASE / "config.json").is_file() else None

    def default_guidance(self, preset: str) -> float:
        return 5.0

    def save_checkpoint(self, comps: Components, out_dir: str | Path, sources: Sources | None = None,
                        max_shard_bytes: int = 10 * 2**30) -> Path:
        from .export import save_checkpoint
        source_dir = sources.ckpt_dir if sources is not None else None
        return save_checkpoint(comps, Path(out_dir), source_dir=source_dir, max_shard_bytes=max_shard_bytes)

    def check_sources(self, preset: str, sources: Sources, parts: set[str]) -> None:
        self.check_preset(preset)
        super().check_sources(preset, sources, parts)
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown component(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
        if sources.ckpt_dir is not None:
            self.check_checkpoint(preset, sources.ckpt_dir, set(parts))

    # ------------------------------------------------------------------------------ building
    def component_specs(self, preset: str) -> dict[str, nn.Module]:
        self.check_preset(preset)
        with torch.device("meta"):
            return {"dit": WanDiT(DIT_PRESETS[preset]), "vae": WanVAE(VAE_PRESETS[preset]),
                    "text_encoder": UMT5Encoder(T5_PRESETS[preset])}

    def _files(self, ckpt_dir: Path, layout: str) -> dict[str, Any]:
        if layout == "official":
            return {"dit": lambda: sharded_safetensors(ckpt_dir), "vae": ckpt_dir / VAE_FILE,
                    "text_encoder": ckpt_dir / T5_FILE, "tokenizer": ckpt_dir / TOKENIZER_DIR}
        return {"dit": lambda: sharded_safetensors(ckpt_dir / "transformer"),
                "vae": lambda: sharded_safetensors(ckpt_dir / "vae"),
                "text_encoder": lambda: sharded_safetensors(ckpt_dir / "text_encoder", "model"),
                "tokenizer": ckpt_dir / "tokenizer"}

    def check_checkpoint(self, preset: str, ckpt_dir: str | Path, parts: set[str]) -> None:
        """Every file exists and every key/shape fits, reading headers only (the .pth files are mmapped)."""
        self.check_preset(preset)
        ckpt_dir = Path(ckpt_dir)
        layout = _layout(ckpt_dir)
        files = self._files(ckpt_dir, layout)
        metas = self.component_specs(preset)
        for part in sorted(parts):
            if part == "dit":
                shards = files["dit"]()
                found = {(dit_from_diffusers(k) if layout == "diffusers" else k): s
                         for k, (_, s) in safetensors_shapes(shards).items()}
                validate(expected_shapes(metas["dit"]), found, f"{shards[0].parent} (DiT)")
                self._check_config(ckpt_dir if layout == "official" else ckpt_dir / "transformer", preset)
            elif part in ("vae", "text_encoder"):
                src = files[part]
                if callable(src):
                    rename = vae_from_diffusers if part == "vae" else t5_from_hf
                    shards = src()
                    found = {}
                    for k, (_, s) in safetensors_shapes(shards).items():
                        new = _try(rename, k)
                        if new is not None:
                            found[new] = s
                    validate(expected_shapes(metas[part]), found, f"{shards[0].parent} ({part})")
                else:
                    sd = load_pth(src)
                    validate(expected_shapes(metas[part]), {k: tuple(v.shape) for k, v in sd.items()}, str(src))
                tok = files["tokenizer"]
                if part == "text_encoder" and not (tok / "tokenizer.json").is_file():
                    raise FileNotFoundError(f"tokenizer file {tok / 'tokenizer.json'} is missing from the checkpoint")
            else:
                raise ValueError(f"unknown component {part!r}; choose from {', '.join(PARTS)}")

    def _check_config(self, folder: Path, preset: str) -> None:
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            return  # shapes were already validated; config.json only double-checks the sizes
        cfg = json.loads(cfg_file.read_text())
        want = DIT_PRESETS[preset]
        pairs = {"dim": want.dim, "ffn_dim": want.ffn_dim, "num_layers": want.num_layers,
                 "num_heads": want.num_heads, "in_dim": want.in_dim}
        if "num_attention_heads" in cfg:  # diffusers naming
            cfg = {"dim": cfg["num_attention_heads"] * cfg["attention_head_dim"], "ffn_dim": cfg.get("ffn_dim"),
                   "num_layers": cfg.get("num_layers"), "num_heads": cfg["num_attention_heads"],
                   "in_dim": cfg.get("in_channels")}
        for k, v in pairs.items():
            if k in cfg and cfg[k] is not None and cfg[k] != v:
                raise ValueError(f"{cfg_file}: {k}={cfg[k]} but preset {preset!r} expects {v}; "
                                 f"pick the preset that matches this checkpoint")

    def build(self, preset: str, parts: set[str], sources: Sources | str | Path | None = None,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Components:
        if not isinstance(sources, Sources):
            sources = Sources(ckpt_dir=Path(sources) if sources is not None else None)
        # every check before any allocation (a random 5b text encoder would allocate 5.7B parameters first)
        self.check_sources(preset, sources, set(parts))
        comps: Components = {}
        ckpt_dir = sources.ckpt_dir
        if ckpt_dir is None:
            if "dit" in parts:
                comps["dit"] = self.random_dit(preset, device, dtype)
            if "vae" in parts:
                with _seeded(1):
                    comps["vae"] = WanVAE(VAE_PRESETS[preset]).to(device).eval()
            if "text_encoder" in parts:
                with _seeded(2):
                    enc = UMT5Encoder(T5_PRESETS[preset])
                    nn.init.normal_(enc.token_embedding.weight, std=1.0)
                comps["text_encoder"] = enc.to(device).eval()
                comps["tokenizer"] = WanTokenizer.from_tokenizer(build_tiny_tokenizer())
            return comps
        layout = _layout(ckpt_dir)
        files = self._files(ckpt_dir, layout)
        metas = self.component_specs(preset)
        if "dit" in parts:
            dit = metas["dit"]
            load_safetensors_into(dit, files["dit"](), dtype=dtype, device=device,
                                  rename=dit_from_diffusers if layout == "diffusers" else None)
            comps["dit"] = dit
        for part, rename in (("vae", vae_from_diffusers), ("text_encoder", t5_from_hf)):
            if part not in parts:
                continue
            model = metas[part]
            # the VAE runs in fp32 (upstream); the text encoder ships in bf16 and runs in the load dtype
            part_dtype = torch.float32 if part == "vae" else dtype
            src = files[part]
            if callable(src):
                load_safetensors_into(model, src(), dtype=part_dtype, device=device,
                                      rename=lambda k, r=rename: _try(r, k))
            else:
                load_state_dict_into(model, load_pth(src), str(src), dtype=part_dtype, device=device)
            comps[part] = model.eval()
        if "text_encoder" in parts:
            comps["tokenizer"] = WanTokenizer(files["tokenizer"])
        return comps

    def random_dit(self, preset: str, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, seed: int = 0) -> WanDiT:
        """Deterministic random DiT (same weights in every process and run): the tiny embedded default,
        and the 5b size for benchmarks. The head is not zeroed, so blocks receive gradients."""
        with torch.device("meta"):
            dit = WanDiT(DIT_PRESETS[preset])
        dit.to_empty(device=device)
        with _seeded(seed), torch.no_grad():
            dit.init_weights()
            nn.init.xavier_uniform_(dit.head.head.weight)
        return dit.to(dtype)

    # ---------------------------------------------------------------------------------- data
    @torch.no_grad()
    def encode_video(self, comps: Components, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, F, H, W] in [-1, 1] -> latents [B, 48, f, h, w] float32."""
        vae = comps["vae"]
        dev = next(vae.parameters()).device
        return vae.encode(video.to(dev)).float()

    @torch.no_grad()
    def encode_media(self, comps: Components, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"latents": self.encode_video(comps, item["video"][None])[0].cpu()}

    @torch.no_grad()
    def encode_text(self, comps: Components, texts: list[str],
                    trained: frozenset[str] = frozenset()) -> list[dict[str, torch.Tensor]]:
        """texts -> {"context": [L_i, 4096]} each, trimmed to the real length (upstream)."""
        enc = comps["text_encoder"]
        dev = next(enc.parameters()).device
        return [{"context": c.float().cpu()} for c in encode_prompts(enc, comps["tokenizer"], texts, device=dev)]

    @staticmethod
    def pad_context(context: list[torch.Tensor], device: torch.device | str) -> torch.Tensor:
        """list of [L_i, D] -> [B, max L_i, D] zero-padded (the DiT zero-pads to 512 anyway, unmasked)."""
        longest = max(c.shape[0] for c in context)
        out = torch.zeros(len(context), max(longest, 1), context[0].shape[1], device=device)
        for i, c in enumerate(context):
            out[i, : c.shape[0]] = c.to(device)
        return out

    # ------------------------------------------------------------------------------ objective
    def training_loss(self, models: dict[str, nn.Module], batch: Batch,
                      cfg: flow.FlowObjectiveConfig) -> torch.Tensor:
        """Flow matching with TI2V first-frame conditioning.

        Sample i's sigma, noise and conditioning coin come from a generator seeded with batch.seeds[i], so
        they do not depend on the batch layout or the number of processes."""
        dit = models["dit"]
        latents = batch.stack("latents")
        xs, ts, masks, targets = [], [], [], []
        dev = latents.device
        for i, seed in enumerate(batch.seeds):
            g = torch.Generator().manual_seed(seed)
            x0 = latents[i : i + 1].float()
            sigma = flow.sample_sigmas(1, g, mode=cfg.timestep_sampling, shift=cfg.shift,
                                       logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)
            noise = torch.randn(x0.shape, generator=g).to(dev)
            x_t, t_tok, mask, _ = flow.condition_training_batch(x0, noise, sigma.to(dev), cfg.first_frame_prob,
                                                                g, patch=self.patch)
            xs.append(x_t)
            ts.append(t_tok)
            masks.append(mask)
            targets.append(flow.flow_target(x0, noise))
        ctx = self.pad_context(batch.fields["context"], dev)
        pred = dit(torch.cat(xs), torch.cat(ts), ctx)
        return flow.masked_mse(pred, torch.cat(targets), torch.cat(masks))

    # ------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, comps: Components, request: SampleRequest, *, device: torch.device | str = "cpu",
               autocast_dtype: torch.dtype | None = None, offload: bool = False,
               progress: bool = False) -> torch.Tensor:
        """Text (+ first frame) to video; request.images["image"] [3, H, W] in [-1, 1] at (height, width).
        Returns [B, 3, frames, height, width] float32 in [-1, 1]."""
        dit, vae = comps["dit"], comps["vae"]
        prompts = request.prompts
        if not prompts:
            raise ValueError("backbone 'wan_ti2v' samples from text: give a prompt")
        sampler = request.extras.get("sampler") or "unipc"
        shift = request.extras.get("shift")
        shift = 5.0 if shift is None else float(shift)
        guidance = 5.0 if request.guidance is None else float(request.guidance)
        if sampler not in ("unipc", "euler"):
            raise ValueError(f"sampler {sampler!r} is not one of 'unipc', 'euler'")
        device = torch.device(device)
        b = len(prompts)
        with on_device(comps["text_encoder"], device, offload):
            context = self.pad_context([e["context"] for e in self.encode_text(comps, prompts)], device)
            uncond = None
            if guidance != 1.0:
                # the tiny base learned its unconditional from the empty caption (condition dropout), not from
                # upstream's negative prompt, which the 5B's training saw
                tiny = getattr(dit, "config", None) == DIT_PRESETS["tiny"]
                neg = request.negative_prompt or ("" if tiny else DEFAULT_NEGATIVE_PROMPT)
                uncond = self.pad_context([e["context"] for e in self.encode_text(comps, [neg] * b)], device)
        z = vae.cfg.z_dim
        frames, height, width = request.frames, request.height, request.width
        shape = (b, z, (frames - 1) // 4 + 1, height // 16, width // 16)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed)).to(device)
        condition, mask = None, None
        image = request.images.get("image")
        if image is not None:
            with on_device(vae, device, offload):
                z_first = self.encode_video(comps, image[None, :, None].expand(b, -1, -1, -1, -1).to(device))
            mask = flow.first_frame_mask(b, *shape[2:], torch.ones(b, dtype=torch.bool, device=device))
            condition = (z_first, mask)
        amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())

        def token_fn(ctx: torch.Tensor) -> flow.TokenModelFn:
            return lambda x, t_tok: dit(x, t_tok, ctx).float()

        model_fn = flow.with_token_timesteps(token_fn(context), mask, self.patch)
        if uncond is not None:
            model_fn = flow.cfg_model(model_fn, flow.with_token_timesteps(token_fn(uncond), mask, self.patch),
                                      guidance)
        solver = flow.FlowUniPCSampler(shift=shift) if sampler == "unipc" else flow.FlowEulerSampler(shift=shift)
        with on_device(dit, device, offload), amp:
            latents = solver.sample(model_fn, noise, steps=request.steps, condition=condition, progress=progress)
        with on_device(vae, device, offload):
            return vae.decode(latents.to(next(vae.parameters()).dtype)).float()


def _try(fn: Any, name: str) -> str | None:
    """Key-map lookups raise on names that are not part of the model (e.g. a decoder in an HF T5 file)."""
    try:
        return fn(name)
    except (ValueError, KeyError):
        return None
