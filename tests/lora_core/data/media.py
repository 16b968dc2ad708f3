"""Test media written on the fly (real encoded clips, images) and the configs the data tests use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from lora_core.data import DataConfig, MediaRules, resolve_data_config

# Wan2.2 TI2V's rules (24 fps, 4k+1 frames, sizes in multiples of 32), the defaults the data tests use.
WAN_LIKE = MediaRules(
    kind="video", frame_sampling="fps", fps=24.0, frame_stride=1, frame_multiple=4, frame_offset=1,
    size_multiple=32, default_frames=17, default_height=64, default_width=64,
)  # fmt: skip
# AnimateDiff-like: any frame count, every 4th source frame, sizes in multiples of 8.
STRIDE_LIKE = MediaRules(
    kind="video", frame_sampling="stride", fps=8.0, frame_stride=4, frame_multiple=1, frame_offset=0,
    size_multiple=8, default_frames=16, default_height=32, default_width=32,
)  # fmt: skip
IMAGE_LIKE = MediaRules(
    kind="image", frame_sampling="fps", fps=0.0, frame_stride=1, frame_multiple=1, frame_offset=0,
    size_multiple=8, default_frames=1, default_height=32, default_width=32,
)  # fmt: skip


def make_clip(
    path: Path, w: int = 64, h: int = 32, n: int = 20, fps: int = 24, codec: str = "libx264", levels: bool = False
) -> Path:
    """Encode a real clip with PyAV. With `levels`, frame k is flat grey 8*k (its index is readable back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "0"} if codec == "libx264" else ({"qscale": "1"} if codec == "mpeg4" else {})
        for k in range(n):
            if levels:
                a = np.full((h, w, 3), 8 * k, np.uint8)
            else:
                a = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, (10 * k) % 256)], -1).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def make_image(path: Path, w: int = 40, h: int = 30) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def cfg_for(path: Path, rules: MediaRules = WAN_LIKE, **kw: Any) -> DataConfig:
    """A resolved config for the data at `path`: 9 frames of 32x32 at 24 fps unless `kw` says otherwise."""
    base: dict[str, Any] = dict(path=str(path), num_frames=9, height=32, width=32, fps=24.0)
    if rules is not WAN_LIKE:
        base = dict(path=str(path))
    base.update(kw)
    return resolve_data_config(DataConfig(**base), rules)


def pairs(samples: list[Any]) -> list[tuple[str, str | None]]:
    return sorted((s.path.name, s.caption) for s in samples)
