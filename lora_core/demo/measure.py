"""Measuring a concept in generated frames, with no model: the moving object's colour and its direction.

Frames are uint8 [F, H, W, 3] or float [F, H, W, 3] in 0..255 (or a [3, F, H, W] tensor in [-1, 1], as the
samplers return). The background of a frame is its per-channel median (the object covers a minority of the
pixels); the object is every pixel further than `threshold` (RGB units, 0..255) from it.
"""
from __future__ import annotations

import numpy as np


def as_frames(video: object) -> np.ndarray:
    """[F, H, W, 3] float32 in 0..255 from uint8 frames or a [3, F, H, W] tensor / array in [-1, 1]."""
    arr = np.asarray(video.detach().float().cpu() if hasattr(video, "detach") else video)  # type: ignore[attr-defined]
    if arr.ndim == 4 and arr.shape[0] == 3 and arr.shape[-1] != 3:  # [3, F, H, W] in [-1, 1]
        return ((np.moveaxis(arr, 0, -1).astype(np.float32) + 1.0) * 127.5).clip(0, 255)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3] or a video [3, F, H, W], got shape {arr.shape}")
    return arr.astype(np.float32)


def _object_masks(frames: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    bg = np.median(frames.reshape(frames.shape[0], -1, 3), axis=1)            # [F, 3]
    dist = np.linalg.norm(frames - bg[:, None, None, :], axis=-1)             # [F, H, W]
    return dist > threshold, bg


def object_colour(video: object, threshold: float = 60.0) -> np.ndarray | None:
    """Mean RGB (0..255) of the object's core over all frames: of the pixels that stand out, the half furthest
    from the background (a blurred edge, part background, would pull the colour towards it); None when no pixel
    stands out."""
    frames = as_frames(video)
    bg = np.median(frames.reshape(frames.shape[0], -1, 3), axis=1)
    dist = np.linalg.norm(frames - bg[:, None, None, :], axis=-1)
    mask = dist > threshold
    if not mask.any():
        return None
    core = mask & (dist >= np.median(dist[mask]))
    return frames[core].mean(axis=0)


def motion_direction(video: object, threshold: float = 60.0) -> np.ndarray | None:
    """Unit (dx, dy) of the object's centroid from the first frames to the last (x right, y down); None when
    the object is not found in both, or does not move."""
    frames = as_frames(video)
    mask, _ = _object_masks(frames, threshold)
    yy, xx = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]
    cents = [(xx[m].mean(), yy[m].mean()) if m.sum() else None for m in mask]
    k = max(1, len(cents) // 4)
    first = [c for c in cents[:k] if c is not None]
    last = [c for c in cents[-k:] if c is not None]
    if not first or not last:
        return None
    d = np.mean(last, axis=0) - np.mean(first, axis=0)
    n = float(np.linalg.norm(d))
    return d / n if n > 1e-6 else None


def colour_progress(base: np.ndarray | None, tuned: np.ndarray | None, target: tuple[int, int, int]) -> float:
    """How far the tuned colour moved from the base's towards the target: 1 - d(tuned, target) / d(base, target)
    (1 = reached it, 0 = no closer, negative = further). An object not found counts as black."""
    t = np.asarray(target, np.float32)
    b = np.zeros(3, np.float32) if base is None else base
    u = np.zeros(3, np.float32) if tuned is None else tuned
    return float(1.0 - np.linalg.norm(u - t) / max(1e-6, float(np.linalg.norm(b - t))))
