"""Pure functions that decide what a sample becomes: its frames, its bucket, its crop, its caption.

Every random choice (clip start, crop, caption dropout, batch order) is a pure function of
(seed, index[, step | epoch]) through `sample_rng`, never of global RNG state, the rank, the
number of processes or DataLoader workers; so a run on 8 GPUs sees the same crops as on 1, and a
resumed run sees what the uninterrupted run would have.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from lora_core.data.rules import largest_valid_frames

_MASK64 = (1 << 64) - 1


def sample_rng(seed: int, index: int, stream: str, step: int = 0) -> np.random.Generator:
    """A generator that depends only on (seed, stream, step, index): never on rank, worker or call order.

    `stream` separates uses ("start", "crop", "caption_dropout", "batches"; the trainer may add
    "noise", "timestep", ...) so that drawing more of one never shifts another.
    """
    stream_id = zlib.crc32(stream.encode())  # stable across processes, unlike hash()
    return np.random.default_rng([seed & _MASK64, stream_id, step & _MASK64, index & _MASK64])


def sample_generator(seed: int, index: int, stream: str, step: int = 0) -> torch.Generator:
    """A CPU torch.Generator fixed by (seed, stream, step, index), e.g. for per-sample noise:
    torch.randn(shape, generator=sample_generator(seed, i, "noise", step))."""
    g = torch.Generator()
    g.manual_seed(int(sample_rng(seed, index, stream, step).integers(0, 2**63 - 1)))
    return g


def _source_step(src_fps: float, fps: float, stride: int | None) -> float:
    """Source frames between two sampled frames: `stride`, or src_fps / fps (1 when a rate is unknown)."""
    if stride is not None:
        return float(stride)
    return src_fps / fps if fps > 0 and src_fps > 0 else 1.0


def available_frames(num_src: int, src_fps: float, fps: float, *, stride: int | None = None) -> int:
    """How many frames a clip of `num_src` frames at `src_fps` holds from its first frame: resampled
    to `fps`, or, given `stride`, taking every stride-th source frame."""
    if num_src <= 0:
        return 0
    step = _source_step(src_fps, fps, stride)
    if step == 1.0:
        return num_src
    return int(math.floor((num_src - 1) / step + 1e-6)) + 1


def frame_count(available: int, num_frames: int, multiple: int = 4, offset: int = 1) -> int:
    """Largest k * multiple + offset <= min(available, num_frames); 0 if the clip has too few frames."""
    return largest_valid_frames(min(available, num_frames), multiple, offset)


def select_frames(
    num_src: int,
    src_fps: float,
    fps: float,
    count: int,
    seed: int,
    index: int,
    start: str = "random",
    *,
    stride: int | None = None,
) -> list[int]:
    """Source frame indices for `count` frames, from a start fixed by (seed, index).

    Frames are taken every src_fps / fps source frames (rounded down), so a 30 fps clip read at
    24 fps skips every fifth frame, and a 12 fps clip read at 24 fps repeats each frame; given
    `stride`, every stride-th source frame (AnimateDiff's 16 frames at stride 4 span 61 source frames).
    """
    step = _source_step(src_fps, fps, stride)
    max_start = int(math.floor(num_src - 1 - (count - 1) * step + 1e-6))
    if max_start < 0:
        rate = f"at a stride of {stride} source frames" if stride is not None else f"at {fps} fps"
        raise ValueError(f"a clip of {num_src} frames at {src_fps} fps holds fewer than {count} frames {rate}")
    if start == "random" and max_start > 0:
        first = int(sample_rng(seed, index, "start").integers(0, max_start + 1))
    else:
        first = max_start // 2 if start == "center" else 0
    return [first + int(math.floor(k * step + 1e-6)) for k in range(count)]


def make_buckets(height: int, width: int, multiple: int = 32, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """(H, W) sizes, multiples of `multiple`, with about the area height * width and aspect <= max_aspect."""
    area = height * width
    out = {(height, width)}
    h = multiple
    while h * multiple <= area:
        w = area // h // multiple * multiple  # widest multiple that stays within the area
        if w >= multiple and max(h / w, w / h) <= max_aspect:
            out.add((h, w))
        h += multiple
    return sorted(out)


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space, so 1:2 and 2:1 are symmetric)."""
    target = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def resize_crop_plan(
    src_h: int, src_w: int, dst_h: int, dst_w: int, seed: int, index: int, random_crop: bool = True
) -> tuple[int, int, int, int]:
    """(resized_h, resized_w, top, left): scale to cover (dst_h, dst_w) keeping aspect, then crop."""
    scale = max(dst_h / src_h, dst_w / src_w)
    rh, rw = max(dst_h, round(src_h * scale)), max(dst_w, round(src_w * scale))
    if random_crop:
        rng = sample_rng(seed, index, "crop")
        return rh, rw, int(rng.integers(0, rh - dst_h + 1)), int(rng.integers(0, rw - dst_w + 1))
    return rh, rw, (rh - dst_h) // 2, (rw - dst_w) // 2


def caption_dropped(seed: int, step: int, index: int, p: float) -> bool:
    """Whether sample `index` trains unconditioned at `step`; fixed by (seed, step, index)."""
    if p <= 0:
        return False
    if p >= 1:
        return True
    return bool(sample_rng(seed, index, "caption_dropout", step).random() < p)


def apply_caption_dropout(caption: str, seed: int, step: int, index: int, p: float) -> str:
    """`caption`, or "" (trigger included) when `caption_dropped(seed, step, index, p)`."""
    return "" if caption_dropped(seed, step, index, p) else caption


def with_trigger(caption: str, trigger: str) -> str:
    """Put `trigger` in place of "[trigger]", or in front of the caption."""
    if not trigger:
        return caption
    if "[trigger]" in caption:
        return caption.replace("[trigger]", trigger)
    return f"{trigger} {caption}" if caption else trigger
