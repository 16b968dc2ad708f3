"""The pure sampling functions: pinned to the pre-split pipeline's outputs, stride sampling, caption dropout.

The PINNED numbers were computed once by the pre-split lora_core/data/pipeline.py (git 0fd3c69, read
with `git show HEAD:lora_core/data/pipeline.py`), so these tests prove the split and the generalised
frame counts change nothing for Wan (fps sampling at 24 fps, 4k+1 frames, multiples of 32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_core.data import (
    DataConfig,
    Sample,
    VideoDataset,
    apply_caption_dropout,
    available_frames,
    caption_dropped,
    frame_count,
    make_buckets,
    nearest_bucket,
    resize_crop,
    resize_crop_plan,
    sample_generator,
    select_frames,
    with_trigger,
)
from tests.lora_core.data.media import WAN_LIKE, cfg_for

# (num_src, src_fps, fps, count, seed, index, start) -> source indices, from the pre-split code.
PINNED_SELECT_FRAMES = [
    ((100, 24.0, 24.0, 17, 0, 0, "random"), list(range(3, 20))),
    ((100, 24.0, 24.0, 17, 0, 1, "random"), list(range(37, 54))),
    ((100, 24.0, 24.0, 17, 1, 0, "random"), list(range(54, 71))),
    ((300, 30.0, 24.0, 49, 7, 5, "random"), [23, 24, 25, 26, 28, 29, 30, 31, 33, 34, 35, 36, 38, 39, 40, 41, 43, 44,
                                             45, 46, 48, 49, 50, 51, 53, 54, 55, 56, 58, 59, 60, 61, 63, 64, 65, 66,
                                             68, 69, 70, 71, 73, 74, 75, 76, 78, 79, 80, 81, 83]),
    ((30, 30.0, 24.0, 21, 0, 0, "head"), [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18, 20, 21, 22, 23, 25]),
    ((200, 60.0, 24.0, 17, 3, 2, "center"), [79, 81, 84, 86, 89, 91, 94, 96, 99, 101, 104, 106, 109, 111, 114, 116, 119]),
    ((50, 12.0, 24.0, 17, 1, 1, "random"), [20, 20, 21, 21, 22, 22, 23, 23, 24, 24, 25, 25, 26, 26, 27, 27, 28]),
    ((100, 0.0, 24.0, 17, 2, 0, "random"), list(range(6, 23))),
    ((33, 24.0, 24.0, 17, 42, 3, "random"), list(range(16, 33))),
]  # fmt: skip
# (src_h, src_w, dst_h, dst_w, seed, index, random_crop) -> (resized_h, resized_w, top, left).
PINNED_RESIZE_CROP = [
    ((1080, 1920, 704, 1280, 0, 0, True), (720, 1280, 0, 0)),
    ((1080, 1920, 704, 1280, 0, 1, True), (720, 1280, 10, 0)),
    ((480, 832, 64, 64, 5, 1, True), (64, 111, 0, 28)),
    ((64, 96, 64, 64, 0, 0, True), (64, 96, 0, 1)),
    ((64, 96, 64, 64, 0, 0, False), (64, 96, 0, 16)),
    ((50, 70, 32, 32, 3, 4, True), (32, 45, 0, 0)),
    ((720, 1280, 480, 832, 9, 2, True), (480, 853, 0, 8)),
]


def test_select_frames_and_crops_match_the_pre_split_code() -> None:
    for args, expected in PINNED_SELECT_FRAMES:
        assert select_frames(*args) == expected, args
    long = select_frames(1000, 29.97, 24.0, 121, 123456789, 77)
    assert (long[0], long[-1], sum(long), len(long)) == (625, 774, 84625, 121)
    for args, expected in PINNED_RESIZE_CROP:
        assert resize_crop_plan(*args) == expected, args


def test_buckets_and_frame_counts_match_the_pre_split_code() -> None:
    assert make_buckets(64, 64, 32, 4.0) == [(32, 128), (64, 64), (96, 32), (128, 32)]
    table = make_buckets(704, 1280, 32, 4.0)
    assert (len(table), table[0], table[-1]) == (44, (480, 1856), (1856, 480))
    for (h, w), bucket in [((1080, 1920), (704, 1280)), ((1920, 1080), (1248, 704)), ((480, 640), (800, 1120)),
                           ((100, 100), (928, 960)), ((64, 96), (768, 1152))]:  # fmt: skip
        assert nearest_bucket(h, w, table) == bucket
    assert [frame_count(a, 49) for a in (1, 4, 5, 8, 48, 49, 100)] == [1, 1, 5, 5, 45, 49, 49]
    assert frame_count(40, 49, multiple=8) == 33
    cases = [(30, 30.0, 24.0), (1000, 29.97, 24.0), (10, 12.0, 24.0), (33, 24.0, 24.0)]
    assert [available_frames(*a) for a in cases] == [24, 801, 19, 33]
    assert [i for i in range(40) if caption_dropped(7, 100, i, 0.3)] == [1, 16, 18, 27, 28, 30, 31, 37]


def test_embedded_default_plans_match_the_pre_split_code() -> None:
    # The embedded default: make_sample_dataset's 4 clips (33 frames, 24 fps, 96x64) with the tiny
    # preset's data config (17 frames of 64x64). Pre-probed samples, so nothing is decoded.
    cfg = cfg_for(Path("unused"), num_frames=17, height=64, width=64)
    samples = [Sample(Path(f"clip_{i:03d}.mp4"), "c", False, f"clip_{i:03d}.mp4", 33, 24.0, 64, 96) for i in range(4)]
    pinned = {0: ([0, 7, 10, 5], [(0, 1), (0, 20), (0, 29), (0, 31)]),
              42: ([9, 13, 7, 16], [(0, 18), (0, 10), (0, 9), (0, 12)])}  # fmt: skip
    for seed, (starts, crops) in pinned.items():
        ds = VideoDataset(samples, cfg, seed=seed, progress=False)
        for i in range(4):
            p = ds.plan(i)
            assert p.bucket == (17, 64, 64) and p.resize == (64, 96)
            assert p.frames == list(range(starts[i], starts[i] + 17)) and p.crop == crops[i], (seed, i)


def test_video_resize_matches_the_pre_split_tensors() -> None:
    # Sums and pixels of the pre-split _resize_crop on this input (torch 2.13 CPU); the video path must not move.
    frames = np.random.default_rng(0).integers(0, 256, (3, 50, 70, 3), dtype=np.uint8)
    x = resize_crop(frames, (32, 45), (0, 6), (32, 32))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert x.double().sum().item() == pytest.approx(-16.013369619846344, abs=1e-4)
    assert [x[0, 1, 5, 7].item(), x[2, 2, 31, 0].item(), x[1, 0, 16, 16].item()] == pytest.approx(
        [0.22047007083892822, -0.4233551621437073, 0.19517719745635986], abs=1e-6
    )


# ----------------------------------------------------------------------------- stride sampling, frame counts


def test_stride_sampling_takes_every_nth_frame_from_a_seeded_start() -> None:
    # AnimateDiff-like: 16 frames at stride 4 span 61 source frames; the source rate does not matter.
    assert select_frames(100, 30.0, 8.0, 16, seed=0, index=0, start="head", stride=4) == list(range(0, 61, 4))
    assert select_frames(100, 0.0, 0.0, 16, seed=0, index=0, start="center", stride=4) == list(range(19, 80, 4))
    starts = {select_frames(100, 30.0, 8.0, 16, seed=s, index=3, stride=4)[0] for s in range(30)}
    assert len(starts) > 1 and min(starts) >= 0 and max(starts) <= 39
    again = [select_frames(100, 30.0, 8.0, 16, seed=s, index=3, stride=4)[0] for s in range(30)]
    assert again == [select_frames(100, 30.0, 8.0, 16, seed=s, index=3, stride=4)[0] for s in range(30)]
    with pytest.raises(ValueError, match="stride of 4"):
        select_frames(60, 30.0, 8.0, 16, seed=0, index=0, stride=4)
    assert available_frames(61, 30.0, 8.0, stride=4) == 16
    assert available_frames(60, 30.0, 8.0, stride=4) == 15
    assert available_frames(5, 30.0, 8.0, stride=1) == 5


def test_frame_count_with_any_multiple_and_offset() -> None:
    assert frame_count(40, 49, 8, 1) == 33  # CogVideoX 8k+1
    assert frame_count(15, 16, 1, 0) == 15  # AnimateDiff: any count
    assert frame_count(100, 16, 1, 0) == 16
    assert frame_count(10, 16, 4, 0) == 8  # multiples of 4
    assert frame_count(3, 16, 4, 0) == 0  # shorter than the smallest valid count
    assert frame_count(0, 49) == 0


# ----------------------------------------------------------------------------- captions, generators


def test_caption_dropout_and_trigger() -> None:
    draws = [caption_dropped(7, 100, i, 0.3) for i in range(2000)]
    assert draws == [caption_dropped(7, 100, i, 0.3) for i in range(2000)]
    assert 0.25 < np.mean(draws) < 0.35
    assert draws != [caption_dropped(7, 101, i, 0.3) for i in range(2000)]  # new step, new draw
    assert not caption_dropped(7, 0, 0, 0.0) and caption_dropped(7, 0, 0, 1.0)
    assert apply_caption_dropout("sks a dog", 7, 0, 0, 1.0) == ""
    assert with_trigger("a dog running", "sks") == "sks a dog running"
    assert with_trigger("photo of [trigger] running", "sks") == "photo of sks running"
    assert with_trigger("", "sks") == "sks" and with_trigger("a dog", "") == "a dog"


def test_per_sample_torch_generator() -> None:
    a = torch.randn(4, generator=sample_generator(1, 5, "noise", step=3))
    assert torch.equal(a, torch.randn(4, generator=sample_generator(1, 5, "noise", step=3)))
    assert not torch.equal(a, torch.randn(4, generator=sample_generator(1, 6, "noise", step=3)))
    assert not torch.equal(a, torch.randn(4, generator=sample_generator(1, 5, "timestep", step=3)))


def test_wan_like_rules_resolve_to_the_old_defaults() -> None:
    # The old DataConfig defaults (24 fps, 4k+1, multiples of 32) are what the Wan rules fill in.
    cfg = cfg_for(Path("x"))
    assert (cfg.fps, cfg.frame_multiple, cfg.frame_offset, cfg.size_multiple, cfg.frame_sampling) == (
        24.0, 4, 1, 32, "fps",
    )  # fmt: skip
    assert WAN_LIKE.kind == "video" and DataConfig().fps is None
