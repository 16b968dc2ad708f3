"""`infer.py --save-merged`: SD1.5 components written as a diffusers folder (`unet/`, `vae/`, `text_encoder/`,
`tokenizer/`, `scheduler/`, `model_index.json`), which `--ckpt-dir` and diffusers' `from_pretrained` load."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from lora_core.atomic import atomic_write

from ..spec import Components, Sources

SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}


def _config_json(cfg: object, cls: str) -> dict:
    out = {"_class_name": cls}
    for k, v in dataclasses.asdict(cfg).items():  # type: ignore[call-overload]
        out[k] = list(v) if isinstance(v, tuple) else v
    if cls == "AutoencoderKL":
        # not fields of VAEConfig (fixed there), but diffusers' defaults are ONE block each: without them
        # from_pretrained builds a smaller VAE and silently drops the other blocks' weights
        n = len(out["block_out_channels"])
        out.update(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n, act_fn="silu")
    if cls == "CLIPTextModel":  # what transformers' AutoConfig / AutoModel dispatch on
        out.update(architectures=[cls], model_type="clip_text_model")
    return out


def save_diffusers_folder(comps: Components, out: Path, sources: Sources | None = None,
                          max_shard_bytes: int = 10 * 2**30) -> Path:
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        if part not in comps:
            raise ValueError(f"exporting a diffusers folder needs the {part} component")
    src = sources.ckpt_dir if sources is not None else None
    if src is not None and src.exists() and src.resolve() == out.resolve():
        raise ValueError(f"cannot export into the checkpoint folder it was loaded from ({out}); pick another folder")
    for part, stem, cls in (("unet", "diffusion_pytorch_model", "UNet2DConditionModel"),
                            ("vae", "diffusion_pytorch_model", "AutoencoderKL"),
                            ("text_encoder", "model", "CLIPTextModel")):
        folder = out / part
        folder.mkdir(parents=True, exist_ok=True)
        module = comps[part]
        sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        atomic_write(folder / f"{stem}.safetensors", lambda p, s=sd: save_file(s, str(p), metadata={"format": "pt"}))
        cfg = getattr(module, "config", None) or getattr(module, "cfg", None)
        if cfg is not None and dataclasses.is_dataclass(cfg):
            (folder / "config.json").write_text(json.dumps(_config_json(cfg, cls), indent=2))
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok_src = Path(getattr(comps["tokenizer"], "source", ""))
    if tok_src.is_dir():
        for f in tok_src.iterdir():
            if f.is_file():
                shutil.copy2(f, tok_dir / f.name)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}, indent=2))
    return out
