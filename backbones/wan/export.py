"""Writing a Wan2.2 TI2V checkpoint folder in the official `Wan-AI/Wan2.2-TI2V-5B` layout.

    OUT/config.json                                              the DiT config, as the hub's config.json
    OUT/diffusion_pytorch_model-0000N-of-0000M.safetensors       DiT shards (upstream parameter names)
    OUT/diffusion_pytorch_model.safetensors.index.json           {"metadata": {"total_size"}, "weight_map"}
    OUT/Wan2.2_VAE.pth                                           flat VAE state dict
    OUT/models_t5_umt5-xxl-enc-bf16.pth                          flat umT5 encoder state dict
    OUT/google/umt5-xxl/tokenizer.json                           (+ the other tokenizer files)

`WanTI2VSpec.build(preset, parts, ckpt_dir=OUT)` loads it back. infer.py uses it for `--save-merged`
(a DiT with LoRA merged in); it also turns the tiny preset's random weights into a real folder.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lora_core.inject import lora_layers

from lora_core.atomic import atomic_write

from ..spec import Components
from .dit import WanDiTConfig
from .spec import T5_FILE, TOKENIZER_DIR, VAE_FILE
from ..encoders.t5_tokenizer import save_tokenizer

log = logging.getLogger(__name__)

DIT_STEM = "diffusion_pytorch_model"
# what the hub shards hold (transformers/diffusers `max_shard_size="10GB"`, decimal)
DEFAULT_SHARD_BYTES = 10 * 10**9
_SHARD_RE = re.compile(rf"^{DIT_STEM}-\d{{5}}-of-\d{{5}}\.safetensors$")


def dit_config_json(cfg: WanDiTConfig) -> dict:
    """The hub config.json of `Wan-AI/Wan2.2-TI2V-5B` (keys of upstream `WanModel.__init__`), plus the
    constructor arguments it leaves at their defaults, so that a non-5b size is described completely."""
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.33.0",
        "model_type": "ti2v",
        "patch_size": list(cfg.patch_size),
        "text_len": cfg.text_len,
        "in_dim": cfg.in_dim,
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "text_dim": cfg.text_dim,
        "out_dim": cfg.out_dim,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "qk_norm": cfg.qk_norm,
        "cross_attn_norm": cfg.cross_attn_norm,
        "eps": cfg.eps,
    }


def _shard_plan(sd: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Keys grouped into shards of at most max_shard_bytes (a single larger tensor gets its own shard)."""
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


def save_dit(dit: nn.Module, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write the DiT's weights as official shards + index + config.json; returns the shard paths.

    The DiT must carry no unmerged LoRA (merge and strip it first); weights keep their dtype."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be > 0 (the hub uses 10GB)")
    layers = lora_layers(dit)
    if layers:
        raise ValueError(f"the DiT still has {len(layers)} LoRA layers (first: {next(iter(layers))}); merge and "
                         "strip them (lora_core.remove_lora(dit, merge=True)) before exporting")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach() for k, v in dit.state_dict().items()}
    plan = _shard_plan(sd, max_shard_bytes)
    names = [f"{DIT_STEM}-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    # shards of an earlier export with another shard count would otherwise linger next to the new ones
    for old in out.iterdir():
        if _SHARD_RE.match(old.name) and old.name not in names:
            old.unlink()
    weight_map: dict[str, str] = {}
    total = 0
    for keys, name in zip(plan, names):
        # one shard at a time on the CPU, so a GPU-resident 5B never needs a second full copy
        tensors = {k: sd[k].to("cpu").contiguous() for k in keys}
        atomic_write(out / name, lambda p, t=tensors: save_file(t, str(p), metadata={"format": "pt"}))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in keys})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / f"{DIT_STEM}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = getattr(dit, "config", None)
    assert isinstance(cfg, WanDiTConfig), "save_dit expects a WanDiT"
    (out / "config.json").write_text(json.dumps(dit_config_json(cfg), indent=2))
    return [out / n for n in names]


def save_checkpoint(comps: Components, out_dir: str | Path, *, source_dir: str | Path | None = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """A complete official-layout folder from loaded components (DiT, VAE, text encoder, tokenizer).

    With `source_dir` in the official layout, the VAE / text-encoder / tokenizer files are linked (or
    copied) unchanged from it; otherwise they are written from the modules in memory, in the dtype they
    hold (the tiny preset's fp32 encoder keeps the upstream file name, so loading needs no special case)."""
    for part in ("dit", "vae", "text_encoder", "tokenizer"):
        if part not in comps:
            raise ValueError(f"exporting a checkpoint folder needs the {part} component")
    out = Path(out_dir)
    src = Path(source_dir) if source_dir is not None else None
    if src is not None and src.resolve() == out.resolve():
        raise ValueError(f"cannot export into the checkpoint folder it was loaded from ({out}); pick another folder")
    shards = save_dit(comps["dit"], out, max_shard_bytes)
    official = src is not None and (src / VAE_FILE).is_file()
    for module, file in ((comps["vae"], VAE_FILE), (comps["text_encoder"], T5_FILE)):
        if official and (src / file).is_file():  # type: ignore[operator]
            _link_or_copy(src / file, out / file)  # type: ignore[operator]
        else:
            sd = {k: v.detach().to("cpu") for k, v in module.state_dict().items()}
            atomic_write(out / file, lambda p, s=sd: torch.save(s, p))
    tok_src = Path(getattr(comps["tokenizer"], "source", ""))
    if tok_src.is_file():  # the folder the tokenizer was read from (official google/umt5-xxl or diffusers tokenizer/)
        dest = out / TOKENIZER_DIR
        dest.mkdir(parents=True, exist_ok=True)
        for f in tok_src.parent.iterdir():
            if f.is_file():
                _link_or_copy(f, dest / f.name)
    else:
        save_tokenizer(comps["tokenizer"].tok, out)
    log.info("wrote %s: %d DiT shard(s), VAE, text encoder, tokenizer", out, len(shards))
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows one (the 11 GB text encoder is not duplicated), else a copy."""
    if dst.exists():
        if dst.samefile(src):
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
