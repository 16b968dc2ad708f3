"""Opening every media file once before training: its size, frame count and rate, and whether it decodes.

A broken file found here is reported by name and skipped (data.strict: an error) before any
model is loaded; short clips are shortened to the largest valid frame count or skipped. A start/end
pair opens both images and stands for a data.pair_frames-frame clip.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from lora_core.data.config import DataConfig, pair_frame_count, require_resolved
from lora_core.data.images import open_image
from lora_core.data.layouts import DataReport, Sample
from lora_core.data.rules import describe_frame_counts, smallest_valid_frames
from lora_core.data.sampling import available_frames, frame_count
from lora_core.data.video_io import _short, open_reader

logger = logging.getLogger(__name__)


def _probe_video(path: Path, verify: bool) -> dict[str, Any]:
    reader = open_reader(path, num_threads=1)
    n = len(reader)
    if n == 0:
        raise ValueError(f"{path} has no video frames")
    try:
        h, w = reader[0].shape[:2]
        if verify and n > 1:
            reader[n - 1]  # a truncated file often opens fine and fails only here
    except Exception as e:
        raise ValueError(f"cannot decode {path}: {_short(e)}; the file may be truncated") from e
    fps = float(reader.get_avg_fps())
    return dict(num_frames=n, fps=fps if math.isfinite(fps) and fps > 0 else 0.0, height=int(h), width=int(w))


def _probe_image(path: Path) -> dict[str, Any]:
    h, w = open_image(path).shape[:2]  # a full decode: catches truncated files and unreadable modes
    return dict(num_frames=1, fps=0.0, height=h, width=w)


def _probe_pair(s: Sample, cfg: DataConfig) -> dict[str, Any]:
    """Both images of pair `s` (each fully decoded); the start image's size is the pair's."""
    assert s.end is not None
    sizes = []
    for path in (s.path, s.end):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        sizes.append(open_image(path).shape[:2])
    (h, w), (eh, ew) = sizes
    return dict(num_frames=pair_frame_count(cfg), fps=0.0, height=h, width=w, end_height=eh, end_width=ew)


def frame_stride(cfg: DataConfig) -> int | None:
    """The source-frame stride with "stride" sampling; None with "fps" sampling (`select_frames` arg)."""
    return cfg.frame_stride if cfg.frame_sampling == "stride" else None


def clip_available(s: Sample, cfg: DataConfig) -> int:
    """Frames sample `s` holds under cfg's sampling (1 for an image, data.pair_frames for a pair)."""
    if s.is_pair:
        return pair_frame_count(cfg)
    return 1 if s.is_image else available_frames(s.num_frames, s.fps, cfg.fps or 0.0, stride=frame_stride(cfg))


def clip_frames(s: Sample, cfg: DataConfig) -> int:
    """Frames sample `s` trains with: the largest valid count it holds, up to num_frames (0: none);
    for a pair, data.pair_frames (validated as a valid count when the config was resolved)."""
    if s.is_pair:
        return pair_frame_count(cfg)
    assert cfg.num_frames is not None and cfg.frame_multiple is not None and cfg.frame_offset is not None
    return frame_count(clip_available(s, cfg), cfg.num_frames, cfg.frame_multiple, cfg.frame_offset)


def sampled_fps(s: Sample, cfg: DataConfig) -> float:
    """Frame rate of the frames sample `s` trains with (0 for images, and when it cannot be known;
    for a pair, the rate clips train at, data.fps, as the pair stands for such a clip)."""
    if s.is_pair:
        return float(cfg.fps or 0.0)
    if s.is_image:
        return 0.0
    if cfg.frame_sampling == "stride":
        return s.fps / (cfg.frame_stride or 1) if s.fps > 0 else 0.0
    # With an unknown source rate the frames are taken as they are, at the rate asked for.
    return float(cfg.fps) if cfg.fps else s.fps


def _describe_available(s: Sample, avail: int, cfg: DataConfig) -> str:
    if cfg.frame_sampling == "stride":
        return f"has {avail} frames at a stride of {cfg.frame_stride} ({s.num_frames} source frames)"
    src = f" ({s.num_frames} at {s.fps:g} fps)" if cfg.fps and s.fps and cfg.fps != s.fps else ""
    return f"has {avail} frames at {cfg.fps or s.fps:g} fps{src}"


def probe_samples(
    samples: Sequence[Sample], cfg: DataConfig, report: DataReport | None = None, progress: bool = True
) -> list[Sample]:
    """Open every file once (metadata, first and last frame) and drop the broken and, with
    short_clips="skip", the short ones. Samples probed before are kept as they are.

    With data.kind="image", videos and pairs are reported and skipped (data.strict: an error) without
    being opened. A pair whose start or end image is broken is skipped, reported naming that image.
    """
    from tqdm.auto import tqdm

    require_resolved(cfg, "probing the media")
    assert cfg.num_frames is not None and cfg.frame_multiple is not None and cfg.frame_offset is not None
    report = report or DataReport(cfg.strict)
    smallest = smallest_valid_frames(cfg.frame_multiple, cfg.frame_offset)
    counts = describe_frame_counts(cfg.frame_multiple, cfg.frame_offset)
    out: list[Sample] = []
    for s in tqdm(samples, desc="probing media", disable=not progress or len(samples) < 100):
        if s.is_pair and (cfg.kind == "image" or pair_frame_count(cfg) < 2):
            why = ("this backbone trains on images (data.kind=image)" if cfg.kind == "image"
                   else f"data.pair_frames resolves to {pair_frame_count(cfg)} frames (at least 2 needed)")
            report.skip(
                s.path, f"is the start image of a start/end pair (end {s.end}), but {why}",
                fix="remove the pair, or set data.pair_frames",
            )  # fmt: skip
            continue
        if cfg.kind == "image" and not s.is_image:
            report.skip(
                s.path, "is a video, but this backbone trains on images (data.kind=image)",
                fix="remove it from the dataset, or list only images",
            )  # fmt: skip
            continue
        if s.num_frames <= 0:
            try:
                if not s.path.is_file():
                    raise FileNotFoundError(f"{s.path} does not exist")
                if s.is_pair:
                    info = _probe_pair(s, cfg)
                elif s.is_image:
                    info = _probe_image(s.path)
                else:
                    info = _probe_video(s.path, cfg.verify_decode)
            except (ValueError, OSError) as e:
                if s.is_pair and str(s.end) in str(e):  # the end image is the broken one: report it by name
                    report.skip(s.end, f"{e} (the end image of the pair starting at {s.path.name}, which is left out)")
                else:
                    report.skip(s.path, str(e))
                continue
            s = replace(s, **info)
        if s.is_pair:
            pass  # its frame count is data.pair_frames, checked against the rules when the config was resolved
        elif s.is_image:
            if smallest > 1:  # e.g. counts k*4 with no offset: a still has no valid count
                report.skip(
                    s.path, f"is an image (1 frame), but frame counts here are {counts}",
                    fix="use clips, or data.frame_offset=1", strict_error=False,
                )  # fmt: skip
                continue
        else:
            avail = clip_available(s, cfg)
            if avail < cfg.num_frames:
                have = f"{_describe_available(s, avail, cfg)}, fewer than num_frames={cfg.num_frames}"
                use = frame_count(avail, cfg.num_frames, cfg.frame_multiple, cfg.frame_offset)
                if cfg.short_clips == "skip" or use == 0:
                    why = "" if use else f" and fewer than the smallest valid count {smallest} ({counts})"
                    report.skip(
                        s.path, have + why, fix="" if not use else "data.short_clips=shorten trains it shorter",
                        strict_error=False,
                    )  # fmt: skip
                    continue
                report.warn(s.path, "short", f"{have}; training it with {use} frames", level=logging.INFO)
        out.append(s)
    return out
