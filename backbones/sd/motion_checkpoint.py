"""AnimateDiff motion-module weights in the layouts they are published in, loaded unchanged, and written back.

- the original file (`mm_sd_v15_v2.ckpt`, `v3_sd15_mm.ckpt`, `mm_sd_v15.ckpt`, or their `.safetensors`
  conversions): a flat dict or `{"state_dict": ...}` of original names (`...motion_modules.0.temporal_transformer.
  ...attention_blocks.0.to_q.weight`), `pos_encoder.pe` tables included; a `.ckpt` is read with
  `torch.load(weights_only=True)` only;
- the diffusers `MotionAdapter` folder (`config.json` + `diffusion_pytorch_model.safetensors`), or one safetensors
  file in diffusers names.

The adapter layout (levels, channels, modules per level, transformer layers, mid block, table length) is read
from the keys and shapes of an original file, or from config.json; head count and GroupNorm groups are not in
the shapes and come from the preset (8 heads and 32 groups for every published SD1.5 module). Position tables
are never loaded: `motion.SinusoidalPositionalEmbedding` recomputes them; a file's table only gives its length
(v1: 24 frames, v2/v3: 32). Keys and shapes are checked against the meta-device adapter before any tensor loads.

Shapes: C channels of a level; L the position-table length.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_core.atomic import atomic_write

from ..loading import expected_shapes, safetensors_shapes, sharded_safetensors, validate
from .checkpoint import _read_single
from .motion import MotionAdapter, MotionAdapterConfig
from .motion_keymap import motion_from_original, motion_state_dict_from_original, motion_state_dict_to_original

__all__ = ["MotionSource", "locate_motion", "motion_config", "check_motion", "load_motion", "save_original",
           "save_motion_adapter_folder", "MOTION_SUFFIXES", "DIFFUSERS_VERSION"]

MOTION_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")
DIFFUSERS_VERSION = "0.42.1"   # written into config.json; any diffusers >= 0.25 reads the MotionAdapter folder
_PE = re.compile(r"\.(?:pos_embed|attention_blocks\.\d+\.pos_encoder)\.pe$")


@dataclass(frozen=True)
class MotionSource:
    """Where a motion module's tensors are: `layout` "original" (one file, original names) or "diffusers"
    (a MotionAdapter folder's shards, or one file in diffusers names); `config` the folder's config.json."""

    files: tuple[Path, ...]
    layout: str
    config: Path | None = None

    @property
    def where(self) -> str:
        return str(self.files[0]) if len(self.files) == 1 else f"{self.files[0].parent} ({len(self.files)} shards)"


def _raw_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    sd = _read_single(path)  # weights-only for pickles; None for safetensors (headers only)
    if sd is None:
        return {k: s for k, (_, s) in safetensors_shapes([path]).items()}
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def locate_motion(path: Path) -> MotionSource:
    """The motion source at `path` (a file or a MotionAdapter folder); errors name the path and what was expected."""
    if not path.exists():
        raise FileNotFoundError(f"motion module {path} does not exist (expected mm_sd_v15_v2.ckpt / .safetensors or "
                                "a diffusers MotionAdapter folder)")
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"motion-module folder {path} has no config.json (expected a diffusers "
                                    "MotionAdapter folder: config.json + diffusion_pytorch_model.safetensors)")
        if any(path.glob("*.bin")) and not any(path.glob("*.safetensors")):
            raise ValueError(f"{path} holds only .bin (pickle) weights; convert them to .safetensors")
        return MotionSource(tuple(sharded_safetensors(path, "diffusion_pytorch_model")), "diffusers", cfg)
    if path.suffix not in MOTION_SUFFIXES:
        raise ValueError(f"motion module {path} is not a {'/'.join(MOTION_SUFFIXES)} file")
    keys = _raw_shapes(path)
    if not keys:
        raise ValueError(f"motion module {path} holds no tensors")
    if any(".temporal_transformer." in k for k in keys):
        return MotionSource((path,), "original")
    if any(".motion_modules." in k for k in keys):
        return MotionSource((path,), "diffusers")
    raise ValueError(f"{path} holds no motion-module keys (first key {next(iter(keys))!r}); expected an AnimateDiff "
                     "motion module (keys like 'down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight')")


def _shapes(src: MotionSource) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(diffusers name -> shape without the tables, raw table key -> shape)."""
    raw: dict[str, tuple[int, ...]] = {}
    for f in src.files:
        raw.update(_raw_shapes(f))
    tables = {k: s for k, s in raw.items() if _PE.search(k)}
    out: dict[str, tuple[int, ...]] = {}
    for k, s in raw.items():
        if k in tables or k == "animatediff_config":
            continue
        try:
            name = motion_from_original(k) if src.layout == "original" else k
        except ValueError as e:
            raise ValueError(f"{src.where}: {e}") from None
        if name is not None:
            out[name] = s
    return out, tables


def motion_config(src: MotionSource, default: MotionAdapterConfig) -> MotionAdapterConfig:
    """The adapter layout of `src`: config.json for a folder, else read from the key shapes; heads and norm
    groups from `default`."""
    if src.config is not None:
        try:
            raw = json.loads(src.config.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{src.config} is not valid JSON: {e}") from None
        try:
            return MotionAdapterConfig.from_diffusers(raw, norm_across_frames=default.norm_across_frames)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{src.config}: {e}") from None
    shapes, tables = _shapes(src)

    def count(pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for k in shapes if (m := rx.match(k))})

    levels = count(r"^down_blocks\.(\d+)\.motion_modules\.")
    if levels == 0:
        raise ValueError(f"{src.where}: no down_blocks motion modules found; not a motion module for an SD UNet")
    channels = []
    for i in range(levels):
        key = f"down_blocks.{i}.motion_modules.0.proj_in.weight"
        if key not in shapes:
            raise ValueError(f"{src.where}: missing {key} (a truncated motion module?)")
        channels.append(shapes[key][1])
    mid_layers = count(r"^mid_block\.motion_modules\.(\d+)\.")
    length = max((s[1] for s in tables.values() if len(s) == 3), default=default.motion_max_seq_length)
    return dataclasses.replace(
        default, block_out_channels=tuple(channels),
        motion_layers_per_block=count(r"^down_blocks\.0\.motion_modules\.(\d+)\."),
        motion_transformer_layers_per_block=count(r"^down_blocks\.0\.motion_modules\.0\.transformer_blocks\.(\d+)\."),
        use_motion_mid_block=mid_layers > 0, motion_mid_block_layers_per_block=max(mid_layers, 1),
        motion_transformer_layers_per_mid_block=max(
            count(r"^mid_block\.motion_modules\.0\.transformer_blocks\.(\d+)\."), 1),
        motion_max_seq_length=int(length))


def _expected(cfg: MotionAdapterConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        meta = MotionAdapter(cfg)
    return {k: s for k, s in expected_shapes(meta).items() if not _PE.search(k)}


def check_motion(src: MotionSource, cfg: MotionAdapterConfig) -> None:
    """Keys and shapes of `src` fit the adapter `cfg` (headers only for safetensors)."""
    validate(_expected(cfg), _shapes(src)[0], f"{src.where} (motion module)")


def load_motion(src: MotionSource, cfg: MotionAdapterConfig) -> dict[str, torch.Tensor]:
    """The motion module's tensors in diffusers names (tables dropped), checked first."""
    check_motion(src, cfg)
    sd: dict[str, torch.Tensor] = {}
    for f in src.files:
        got = _read_single(f)
        sd.update(load_file(str(f)) if got is None else got)
    if src.layout == "original":
        sd = motion_state_dict_from_original(sd)
    return {k: v for k, v in sd.items() if not _PE.search(k) and isinstance(v, torch.Tensor)}


def save_original(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A motion state dict (diffusers names, tables included) as an original-layout `.safetensors`, which the
    official code and ComfyUI-AnimateDiff-Evolved load (both position tables per block written, as the original)."""
    # clone: the two tables of a block are one tensor, which safetensors refuses to write twice
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in motion_state_dict_to_original(state_dict).items()}
    atomic_write(path, lambda p: save_file(sd, str(p), metadata={"format": "pt", **(metadata or {})}))
    return path


def adapter_config_json(cfg: MotionAdapterConfig) -> dict:
    """diffusers MotionAdapter config.json."""
    out: dict = {"_class_name": "MotionAdapter", "_diffusers_version": DIFFUSERS_VERSION}
    for f in dataclasses.fields(cfg):
        if f.name == "norm_across_frames":
            continue  # ours (a forward-time choice), not a diffusers key
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    out["conv_in_channels"] = None
    return out


def save_motion_adapter_folder(state_dict: dict[str, torch.Tensor], cfg: MotionAdapterConfig, folder: Path) -> Path:
    """A diffusers MotionAdapter folder (config.json + diffusion_pytorch_model.safetensors, `pos_embed.pe`
    included as diffusers saves it): `MotionAdapter.from_pretrained` and `model.sources.motion_module` load it."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write(folder / "diffusion_pytorch_model.safetensors",
                 lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(adapter_config_json(cfg), indent=2)))
    return folder
