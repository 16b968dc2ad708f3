"""Test doubles of the cache tests: encoders that count their calls, and a dataset loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_core.data import DataConfig, VideoDataset, load_dataset


def load(path: Path, **kw: Any) -> VideoDataset:
    """The dataset at `path`, every backbone-dependent field set explicitly (None = "from the backbone")."""
    cfg = dict(path=str(path), kind="video", frame_sampling="fps", fps=24.0, frame_stride=1, num_frames=17,
               frame_multiple=4, frame_offset=1, height=64, width=64, size_multiple=32)  # fmt: skip
    # Only fields DataConfig has: the data package is gaining these while this is written.
    known = {k: v for k, v in cfg.items() if k in DataConfig.__dataclass_fields__}
    return load_dataset(DataConfig(**{**known, **kw}), seed=0, progress=False)


class MediaEncoder:
    """Stands in for the VAE: records which samples it encoded; can refuse to run (no model loaded)."""

    def __init__(self, allowed: bool = True) -> None:
        self.allowed, self.seen = allowed, []

    def __call__(self, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        if not self.allowed:
            raise AssertionError(f"encode called for {item['path']} although every entry is cached")
        self.seen.append(item["index"])
        video = item["video"]  # [C, F, H, W]
        return {"latents": torch.nn.functional.avg_pool3d(video[None], (1, 4, 4))[0]}  # [C, F, H/4, W/4]


class TextEncoder:
    """Stands in for the text encoder: records the texts; a text containing `refuse` raises ValueError."""

    def __init__(self, refuse: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.refuse = refuse

    def __call__(self, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        self.calls.append(list(texts))
        if self.refuse is not None and any(self.refuse in t for t in texts):
            raise ValueError(f"cannot tokenize a text containing {self.refuse!r}")
        return [{"context": torch.full((3, 8), float(len(t)))} for t in texts]

    @property
    def texts(self) -> list[str]:
        return [t for c in self.calls for t in c]
