"""What a backbone declares about the media it trains on; the data pipeline and infer.py follow it.

A backbone's VAE and denoiser fix which frame counts and sizes work (Wan's causal VAE takes 4k+1
frames, CogVideoX 1.0's 8k+1, AnimateDiff's motion modules any count) and how clips are sampled
(resampled to a frame rate, or every n-th source frame). `DataConfig` fields left at None are filled
from these rules by `resolve_data_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


def smallest_valid_frames(multiple: int, offset: int) -> int:
    """The smallest k * multiple + offset >= 1 (k >= 0)."""
    return offset if offset >= 1 else multiple


def largest_valid_frames(n: int, multiple: int, offset: int) -> int:
    """The largest k * multiple + offset <= n (k >= 0, result >= 1); 0 when even the smallest is > n."""
    if n < smallest_valid_frames(multiple, offset):
        return 0
    return (n - offset) // multiple * multiple + offset


def is_valid_frame_count(n: int, multiple: int, offset: int) -> bool:
    return n >= smallest_valid_frames(multiple, offset) and (n - offset) % multiple == 0


def describe_frame_counts(multiple: int, offset: int) -> str:
    """How valid counts read in messages: "4k+1", "8k+1", "any count"."""
    if multiple == 1 and offset <= 1:
        return "any count"
    return f"{multiple}k+{offset}" if offset else f"multiples of {multiple}"


@dataclass(frozen=True)
class MediaRules:
    """Valid media for one backbone preset: what it trains on, how frames are picked, which sizes work.

    Valid frame counts are k * frame_multiple + frame_offset for k >= 0 with a result >= 1: Wan 4k+1
    (multiple 4, offset 1), CogVideoX 8k+1, AnimateDiff any count (multiple 1, offset 0).
    """

    kind: Literal["image", "video"]
    frame_sampling: Literal["fps", "stride"]
    fps: float  # rate clips are resampled to with "fps" sampling; also the output frame rate
    frame_stride: int  # source frames between sampled frames with "stride" sampling (AnimateDiff: 4)
    frame_multiple: int
    frame_offset: int
    size_multiple: int  # height and width must be multiples of this (VAE stride x patch size)
    default_frames: int
    default_height: int
    default_width: int

    def __post_init__(self) -> None:
        # A backbone author's mistake, but it would surface far away (a data error at step 0), so say it here.
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"MediaRules.{name}={getattr(self, name)!r} is invalid: expected {expected}")

        if self.kind not in ("image", "video"):
            raise bad("kind", "'image' or 'video'")
        if self.frame_sampling not in ("fps", "stride"):
            raise bad("frame_sampling", "'fps' or 'stride'")
        if self.fps < 0:
            raise bad("fps", "a frame rate >= 0")
        for name in ("frame_stride", "frame_multiple", "size_multiple"):
            if getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        if self.frame_offset < 0:
            raise bad("frame_offset", "an integer >= 0")
        if self.kind == "image" and self.default_frames != 1:
            raise bad("default_frames", "1 for an image backbone")
        if not self.is_valid_frames(self.default_frames):
            eg = self.nearest_frames(self.default_frames)
            raise bad("default_frames", f"a valid count ({self.describe_frames()}), e.g. {eg}")
        for name in ("default_height", "default_width"):
            v = getattr(self, name)
            if v < self.size_multiple or v % self.size_multiple:
                eg = self.nearest_size(v)
                raise bad(name, f"a positive multiple of size_multiple={self.size_multiple}, e.g. {eg}")

    @property
    def smallest_frames(self) -> int:
        return smallest_valid_frames(self.frame_multiple, self.frame_offset)

    def describe_frames(self) -> str:
        return describe_frame_counts(self.frame_multiple, self.frame_offset)

    def is_valid_frames(self, n: int) -> bool:
        return is_valid_frame_count(n, self.frame_multiple, self.frame_offset)

    def largest_frames(self, n: int) -> int:
        """The largest valid count <= n, and at least the smallest valid count."""
        return max(self.smallest_frames, largest_valid_frames(n, self.frame_multiple, self.frame_offset))

    def nearest_frames(self, n: int) -> int:
        """The valid count closest to n (halfway cases round to even k, as Python's round)."""
        m, o = self.frame_multiple, self.frame_offset
        return max(self.smallest_frames, round((n - o) / m) * m + o)

    def nearest_size(self, n: int) -> int:
        """The positive multiple of size_multiple closest to n."""
        s = self.size_multiple
        return max(s, round(n / s) * s)
