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


def sidecar_suffix_problem(suffix: object) -> str:
    """Why `suffix` cannot name sidecar files ("" when it can): a non-empty name part such as
    "tracks.json", with no leading dot and no path separator."""
    if not isinstance(suffix, str) or not suffix:
        return f"{suffix!r} is not a non-empty string"
    if suffix.startswith("."):
        return f"{suffix!r} starts with a dot (write {suffix.lstrip('.')!r})"
    if "/" in suffix or "\\" in suffix:
        return f"{suffix!r} holds a path separator"
    return ""


@dataclass(frozen=True)
class MediaRules:
    """Valid media for one backbone preset: what it trains on, how frames are picked, which sizes work.

    Valid frame counts are k * frame_multiple + frame_offset for k >= 0 with a result >= 1: Wan 4k+1
    (multiple 4, offset 1), CogVideoX 8k+1, AnimateDiff any count (multiple 1, offset 0).

    `image_pairs`: the backbone can train on start/end image pairs (`<id>_start.png` + `<id>_end.png`),
    each standing for a clip whose first and last frames are known and whose middle is not (first/last
    frame conditioning, keyframe interpolation); the dataset then scans and loads them (data.pairs).
    `sidecars`: suffixes of optional per-sample files beside the media that the backbone conditions on,
    e.g. "tracks.json" for `clip.tracks.json` beside `clip.mp4` (`<id>.tracks.json` for a pair); the
    dataset reports their paths in `meta` and keys the cache on their content.
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
    image_pairs: bool = False
    sidecars: tuple[str, ...] = ()

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
        if isinstance(self.sidecars, str) or not isinstance(self.sidecars, (tuple, list)):
            raise bad("sidecars", 'a tuple of file suffixes, e.g. ("tracks.json",)')
        object.__setattr__(self, "sidecars", tuple(self.sidecars))  # a list would make the rules unhashable
        for suffix in self.sidecars:
            problem = sidecar_suffix_problem(suffix)
            if problem:
                raise bad("sidecars", f'file suffixes without a leading dot, e.g. ("tracks.json",); {problem}')
        if self.image_pairs and self.kind == "image":
            raise bad("image_pairs", "False for an image backbone (a pair stands for a clip)")
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
