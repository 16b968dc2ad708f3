"""What a backbone supplies so that train.py, infer.py and the data pipeline stay backbone-agnostic.

Shapes: B batch, C/F/H/W video channels/frames/height/width, c/f/h/w latent ones, L text tokens, D width.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn


@dataclass
class Components:
    """Loaded parts of a backbone; a part that was not asked for is None."""

    dit: nn.Module | None = None          # the denoiser LoRA trains (DiT or UNet)
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MediaRules:
    """Valid input sizes: frames = 4n+1 etc. Used by the data pipeline and infer.py."""

    fps: float
    frame_stride: int        # frames must be frame_stride * n + 1
    spatial_multiple: int    # height and width must be multiples of this
    default_frames: int
    default_height: int
    default_width: int

    def valid_frames(self, n: int) -> int:
        """The largest valid frame count <= n (at least 1)."""
        return max(1, (n - 1) // self.frame_stride * self.frame_stride + 1)

    def nearest_frames(self, n: int) -> int:
        return max(1, round((n - 1) / self.frame_stride) * self.frame_stride + 1)

    def nearest_size(self, n: int) -> int:
        return max(self.spatial_multiple, round(n / self.spatial_multiple) * self.spatial_multiple)


class BackboneSpec:
    """Base class; one subclass per family, registered in `backbones.registry`."""

    name: str = ""
    presets: tuple[str, ...] = ()
    default_targets: tuple[str, ...] = ()
    default_rank: int = 32
    default_alpha: float = 32.0

    def media_rules(self, preset: str) -> MediaRules:
        raise NotImplementedError

    def preset_overrides(self, preset: str) -> dict[str, Any]:
        """Config values (dotted keys) a preset implies, e.g. gradient checkpointing on for 5b."""
        return {}

    def check_preset(self, preset: str) -> None:
        if preset not in self.presets:
            raise ValueError(f"backbone {self.name!r} has no preset {preset!r}; choose one of "
                             f"{', '.join(self.presets)}")

    # ---- building and loading
    def build(self, preset: str, parts: set[str], ckpt_dir: str | Path | None = None,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Components:
        """Build the asked-for parts ({"dit", "vae", "text_encoder"}); weights from `ckpt_dir` (validated
        before any compute) or, without one, deterministic random weights."""
        raise NotImplementedError

    def check_checkpoint(self, preset: str, ckpt_dir: str | Path, parts: set[str]) -> None:
        """Fail fast (FileNotFoundError/ValueError naming the file) if the folder cannot provide `parts`."""
        raise NotImplementedError

    def save_checkpoint(self, comps: Components, out_dir: str | Path, source_dir: str | Path | None = None,
                        max_shard_bytes: int = 10 * 2**30) -> Path:
        """Write the components as a checkpoint folder in the official layout (`--ckpt-dir` loads it)."""
        raise ValueError(f"exporting a checkpoint folder is not implemented for backbone {self.name!r}")

    def default_steps(self, preset: str) -> int:
        """Sampling steps infer.py uses when --steps is not given."""
        return 50

    def component_specs(self, preset: str) -> dict[str, nn.Module]:
        """Each component built on the meta device (no memory), for `python -m backbones info`."""
        raise NotImplementedError

    def blocks(self, dit: nn.Module) -> nn.ModuleList:
        """The repeated blocks (gradient checkpointing and FSDP units)."""
        return dit.blocks  # type: ignore[return-value]

    # ---- data
    @torch.no_grad()
    def encode_video(self, comps: Components, video: torch.Tensor) -> torch.Tensor:
        """video [B, C, F, H, W] in [-1, 1] -> latents [B, c, f, h, w]."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_text(self, comps: Components, prompts: list[str]) -> list[torch.Tensor]:
        """prompts -> one [L_i, D] tensor each (trimmed to the real length)."""
        raise NotImplementedError

    # ---- objective
    def training_loss(self, dit: nn.Module, latents: torch.Tensor, context: list[torch.Tensor],
                      sample_seeds: list[int], cfg: Any) -> torch.Tensor:
        """Scalar loss for a batch; every random draw of sample i comes from sample_seeds[i]."""
        raise NotImplementedError

    # ---- sampling
    @torch.no_grad()
    def sample(self, comps: Components, prompts: list[str], **kwargs: Any) -> torch.Tensor:
        """Videos [B, C, F, H, W] in [-1, 1]."""
        raise NotImplementedError
