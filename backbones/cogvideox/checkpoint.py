"""CogVideoX checkpoint folders: checking, loading and writing the official diffusers layout.

    <ckpt>/model_index.json
    <ckpt>/scheduler/scheduler_config.json
    <ckpt>/transformer/config.json + diffusion_pytorch_model.safetensors           (2B: one file)
                                  or diffusion_pytorch_model-0000N-of-0000M.safetensors + .index.json (5B)
    <ckpt>/vae/config.json + diffusion_pytorch_model.safetensors
    <ckpt>/text_encoder/config.json + model-0000N-of-0000M.safetensors + model.safetensors.index.json
    <ckpt>/tokenizer/spiece.model (+ tokenizer_config.json, special_tokens_map.json, added_tokens.json)

Every check reads headers and small JSON files only; a missing key is reported with the shard file the
index assigns it to (or the folder when there is no index). Module names equal the files' names (no key map),
except the T5 encoder's tied embedding alias `encoder.embed_tokens.weight`, which the file does not store.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lora_core.atomic import atomic_write

from ..encoders.t5 import T5V11Config, _check_v11_config
from ..loading import (
    expected_shapes,
    load_safetensors_into,
    safetensors_shapes,
    sharded_safetensors,
    validate,
)
from .transformer import CogVideoXConfig
from .vae import CogVideoXVAEConfig

WEIGHTS_STEM = "diffusion_pytorch_model"
T5_STEM = "model"
T5_IGNORED = ("decoder.", "lm_head.")
T5_EMBED = ("shared.weight", "encoder.embed_tokens.weight")
# transformer/config.json keys that decide the architecture (compared with the preset before any load)
ARCH_KEYS = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
             "text_embed_dim", "time_embed_dim", "patch_size", "max_text_seq_length",
             "use_rotary_positional_embeddings", "use_learned_positional_embeddings")
# diffusers CogVideoXTransformer3DModel arguments that are fixed in CogVideoX 1.0 (not fields of our config)
_FIXED_TRANSFORMER = {"flip_sin_to_cos": True, "freq_shift": 0, "activation_fn": "gelu-approximate",
                      "timestep_activation_fn": "silu", "norm_elementwise_affine": True, "ofs_embed_dim": None,
                      "patch_size_t": None, "patch_bias": True}
_SHARD_RE = re.compile(r"^(diffusion_pytorch_model|model)-\d{5}-of-\d{5}\.safetensors$")


def folder_of(ckpt_dir: Path, part: str) -> Path:
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt_dir} does not exist (expected the downloaded "
                                f"THUDM/CogVideoX-* diffusers folder with transformer/, vae/, text_encoder/, "
                                f"tokenizer/)")
    folder = ckpt_dir / part
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt_dir} has no {part}/ subfolder (the official diffusers "
                                f"layout has transformer/, vae/, text_encoder/, tokenizer/, scheduler/)")
    return folder


def _index_map(folder: Path, stem: str) -> dict[str, str]:
    index = folder / f"{stem}.safetensors.index.json"
    if not index.is_file():
        return {}
    return json.loads(index.read_text())["weight_map"]


def check_weights(folder: Path, stem: str, model: nn.Module, what: str,
                  found_filter: Any = None) -> list[Path]:
    """Every key and shape of `model` (built on meta) is in the folder's safetensors; headers only.
    Missing keys are named with the shard the index assigns them to."""
    files = sharded_safetensors(folder, stem)
    headers = safetensors_shapes(files)
    found = {k: s for k, (_, s) in headers.items()}
    if found_filter is not None:
        found = found_filter(found)
    expected = expected_shapes(model)
    missing = [k for k in expected if k not in found]
    if missing:
        weight_map = _index_map(folder, stem)
        where = weight_map.get(missing[0])
        if where is not None:
            raise ValueError(f"checkpoint file {folder / where} ({what}) lacks {len(missing)} key(s) that "
                             f"{stem}.safetensors.index.json assigns to the checkpoint (first: "
                             f"{', '.join(missing[:5])}); the file is truncated or from another model: re-download it")
        source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
        raise ValueError(f"checkpoint file {source} ({what}) lacks {len(missing)} key(s) (first: "
                         f"{', '.join(missing[:5])}); is it the right folder for this preset?")
    source = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    validate(expected, found, f"{source} ({what})")
    return files


def t5_found(found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Header shapes of a transformers T5 file as the encoder's state dict sees them (tied alias filled)."""
    out = {k: s for k, s in found.items() if not k.startswith(T5_IGNORED)}
    for a, b in (T5_EMBED, T5_EMBED[::-1]):
        if a in out and b not in out:
            out[b] = out[a]
    return out


def check_transformer_config(folder: Path, want: CogVideoXConfig, preset: str) -> None:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        return  # shapes are checked anyway; config.json double-checks the flags shapes cannot show (RoPE)
    try:
        got = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}); re-download transformer/") from e
    for key in ARCH_KEYS:
        if key in got and got[key] != getattr(want, key):
            raise ValueError(f"{cfg_file}: {key}={got[key]!r} but preset {preset!r} expects "
                             f"{getattr(want, key)!r}; pick the preset that matches this checkpoint "
                             f"(2b: 30 layers, sin-cos positions; 5b: 42 layers, RoPE; 5b-i2v: 32 input channels)")


def check_vae_config(folder: Path, scaling_factor: float, preset: str) -> None:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        return
    got = json.loads(cfg_file.read_text()).get("scaling_factor")
    if got is not None and abs(float(got) - scaling_factor) > 1e-6:
        raise ValueError(f"{cfg_file}: scaling_factor={got} but preset {preset!r} uses {scaling_factor} "
                         f"(2b: 1.15258426, 5b / 5b-i2v: 0.7); pick the preset that matches this checkpoint")


def check_scheduler_config(ckpt_dir: Path, snr_shift: float, preset: str) -> None:
    cfg_file = ckpt_dir / "scheduler" / "scheduler_config.json"
    if not cfg_file.is_file():
        return
    got = json.loads(cfg_file.read_text()).get("snr_shift_scale")
    if got is not None and abs(float(got) - snr_shift) > 1e-9:
        raise ValueError(f"{cfg_file}: snr_shift_scale={got} but preset {preset!r} trains and samples with "
                         f"{snr_shift} (2b: 3.0, 5b: 1.0); pick the preset that matches this checkpoint")


def check_t5(folder: Path, model: nn.Module, cfg: T5V11Config, preset: str) -> list[Path]:
    if (folder / "config.json").is_file():
        _check_v11_config(folder / "config.json", cfg, preset)
    return check_weights(folder, T5_STEM, model, "text_encoder", found_filter=t5_found)


def tokenizer_folder(ckpt_dir: Path) -> Path:
    folder = folder_of(ckpt_dir, "tokenizer")
    if not (folder / "spiece.model").is_file():
        raise FileNotFoundError(f"tokenizer file {folder / 'spiece.model'} is missing from the checkpoint")
    return folder


def load_weights(model: nn.Module, folder: Path, stem: str, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    load_safetensors_into(model, sharded_safetensors(folder, stem), dtype=dtype, device=device)
    return model


# ---------------------------------------------------------------------------------------- writing
def _shard_plan(sd: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def save_weights(sd: dict[str, torch.Tensor], folder: Path, stem: str, max_shard_bytes: int) -> list[Path]:
    """One `<stem>.safetensors`, or `<stem>-0000N-of-0000M.safetensors` + index when it exceeds max_shard_bytes
    (transformers / diffusers `save_pretrained` naming)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be > 0 (the hub uses 10GB shards)")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():  # files of an earlier export would mix with the new ones
        if _SHARD_RE.match(old.name) or old.name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json"):
            old.unlink()
    plan = _shard_plan(sd, max_shard_bytes)
    if len(plan) == 1:
        tensors = {k: sd[k].detach().to("cpu").contiguous() for k in plan[0]}
        path = folder / f"{stem}.safetensors"
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        return [path]
    names = [f"{stem}-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    weight_map: dict[str, str] = {}
    total = 0
    for keys, name in zip(plan, names):
        tensors = {k: sd[k].detach().to("cpu").contiguous() for k in keys}
        atomic_write(folder / name, lambda p, t=tensors: save_file(t, str(p), metadata={"format": "pt"}))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in keys})
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [folder / n for n in names]


def transformer_config_json(cfg: CogVideoXConfig) -> dict[str, Any]:
    return {"_class_name": "CogVideoXTransformer3DModel", "_diffusers_version": "0.42.1",
            **dataclasses.asdict(cfg), **_FIXED_TRANSFORMER}


def vae_config_json(cfg: CogVideoXVAEConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"_class_name": "AutoencoderKLCogVideoX", "_diffusers_version": "0.42.1"}
    for k, v in dataclasses.asdict(cfg).items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def t5_config_json(cfg: T5V11Config) -> dict[str, Any]:
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": cfg.dim, "d_kv": cfg.head_dim,
            "d_ff": cfg.dim_ffn, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
            "vocab_size": cfg.vocab, "relative_attention_num_buckets": cfg.num_buckets,
            "relative_attention_max_distance": cfg.max_dist, "layer_norm_epsilon": cfg.eps,
            "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True,
            "dropout_rate": 0.1, "initializer_factor": 1.0, "pad_token_id": 0, "eos_token_id": 1,
            "decoder_start_token_id": 0, "tie_word_embeddings": False, "is_encoder_decoder": True,
            "use_cache": True, "torch_dtype": "float32"}


def scheduler_config_json(snr_shift: float) -> dict[str, Any]:
    """THUDM/CogVideoX-{2b,5b} scheduler/scheduler_config.json (only snr_shift_scale differs)."""
    return {"_class_name": "CogVideoXDDIMScheduler", "_diffusers_version": "0.42.1", "beta_start": 0.00085,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False, "clip_sample_range": 1.0,
            "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
            "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": snr_shift, "steps_offset": 0,
            "timestep_spacing": "trailing", "trained_betas": None}


def model_index_json(i2v: bool) -> dict[str, Any]:
    return {"_class_name": "CogVideoXImageToVideoPipeline" if i2v else "CogVideoXPipeline",
            "_diffusers_version": "0.42.1", "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
            "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
            "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLCogVideoX"]}


def copy_tokenizer(source: str | Path, out: Path) -> None:
    src = Path(source)
    src = src if src.is_dir() else src.parent
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
