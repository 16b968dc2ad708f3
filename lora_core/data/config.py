"""The data section of the config (`data.*`), and filling its backbone-dependent fields from MediaRules.

Fields that depend on the backbone (frame rate, frame counts, sizes, sampling) default to None,
meaning "from the backbone": `resolve_data_config(cfg, spec.media_rules(preset))` fills them and
checks the result against the backbone's rules. The dataset refuses an unresolved config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lora_core.data.rules import (
    MediaRules,
    describe_frame_counts,
    sidecar_suffix_problem,
    is_valid_frame_count,
    largest_valid_frames,
    smallest_valid_frames,
)

# DataConfig field <- MediaRules field, for the fields a backbone decides.
_FROM_RULES = {
    "kind": "kind",
    "frame_sampling": "frame_sampling",
    "fps": "fps",
    "frame_stride": "frame_stride",
    "num_frames": "default_frames",
    "frame_multiple": "frame_multiple",
    "frame_offset": "frame_offset",
    "height": "default_height",
    "width": "default_width",
    "size_multiple": "size_multiple",
}


@dataclass
class DataConfig:
    """Where the training media is and how it becomes [C, F, H, W] tensors in [-1, 1].

    None means "from the backbone" (see `resolve_data_config`).
    """

    path: str = ""
    media_root: str = ""  # where files named in a CSV/JSON live, when not next to that file
    kind: str | None = None  # "video" | "image" (an image backbone: videos in the dataset are skipped)
    captions: bool = True  # whether captions are read (set from the backbone: False for one without text)
    frame_sampling: str | None = None  # "fps" (resample to data.fps) | "stride" (every frame_stride-th frame)
    fps: float | None = None  # rate clips are resampled to with "fps" sampling; 0 keeps each clip's own rate
    frame_stride: int | None = None  # source frames between sampled frames with "stride" sampling
    num_frames: int | None = None  # most frames per clip, k * frame_multiple + frame_offset
    frame_multiple: int | None = None  # causal video VAEs want 4k+1 frames (Wan, Hunyuan); CogVideoX 1.0: 8k+1
    frame_offset: int | None = None
    height: int | None = None  # target size; with buckets, height * width is the target area
    width: int | None = None
    size_multiple: int | None = None  # Wan2.2 TI2V-5B: VAE stride 16 x patch 2 = 32
    buckets: bool = True
    max_aspect: float = 4.0  # widest/tallest bucket generated
    crop: str = "random"  # "random" | "center" (random is still a fixed function of seed, index)
    flip: bool = False  # mirror half the samples (the whole clip), chosen per sample by (seed, index); cached as such
    clip_start: str = "random"  # "random" | "head" | "center"
    short_clips: str = "shorten"  # "shorten" (longest valid count the clip has) | "skip"
    # Start/end image pairs (<id>_start.png + <id>_end.png, or start/end columns), each one sample that
    # stands for a pair_frames-frame clip of which only the first and last frames are known.
    # None: from the backbone (MediaRules.image_pairs); a backbone without pairs leaves them off.
    pairs: bool | None = None
    pair_frames: int | None = None  # clip length a pair stands for (>= 2, a valid count); None: num_frames
    # Suffixes of optional per-sample files beside the media ("tracks.json": clip.tracks.json beside
    # clip.mp4, <id>.tracks.json for a pair); None: the backbone's (MediaRules.sidecars).
    sidecars: list[str] | None = None
    # Probability that classifier-free-guidance training drops each of the backbone's conditions, by name
    # (its `conditions`, e.g. {caption: 0.1}); a condition not listed is never dropped.
    condition_dropout: dict[str, float] = field(default_factory=dict)
    trigger: str = ""  # prepended to every caption, or substituted for "[trigger]"
    strict: bool = False  # raise on any bad file or missing caption instead of skipping it
    repeats: int = 1  # times each sample appears per epoch
    verify_decode: bool = True  # probe decodes the last frame too, catching truncated files
    decode_threads: int = 0  # decord threads per reader; 0 = auto
    image_extensions: list[str] = field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp"])
    video_extensions: list[str] = field(
        default_factory=lambda: [".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"]
    )

    def __post_init__(self) -> None:
        self.validate()

    def unresolved(self) -> list[str]:
        """The backbone-dependent fields still None."""
        return [name for name in _FROM_RULES if getattr(self, name) is None]

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, its value and a valid alternative.

        Fields still None are not checked (they come from the backbone), nor are checks that need them.
        """

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"data.{name}={getattr(self, name)!r} is invalid: expected {expected}")

        for name, allowed in (
            ("kind", ("video", "image")),
            ("frame_sampling", ("fps", "stride")),
            ("crop", ("random", "center")),
            ("clip_start", ("random", "head", "center")),
            ("short_clips", ("shorten", "skip")),
        ):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise bad(name, " or ".join(repr(a) for a in allowed))
        if self.fps is not None and self.fps < 0:
            raise bad("fps", "a frame rate >= 0 (0 keeps each clip's own rate)")
        for name in ("frame_stride", "frame_multiple", "size_multiple"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise bad(name, "an integer >= 1")
        if self.frame_offset is not None and self.frame_offset < 0:
            raise bad("frame_offset", "an integer >= 0 (counts are k*frame_multiple + frame_offset)")
        n = self.num_frames
        if n is not None:
            if n < 1:
                raise bad("num_frames", "at least 1 frame")
            if self.kind == "image" and n != 1:
                raise bad("num_frames", "1 with data.kind='image' (images are 1-frame clips)")
            m, o = self.frame_multiple, self.frame_offset
            if m is not None and o is not None and not is_valid_frame_count(n, m, o):
                lo = largest_valid_frames(n, m, o)
                hi = lo + m if lo else smallest_valid_frames(m, o)
                eg = f"{lo} or {hi}" if lo else f"{hi}"
                raise bad("num_frames", f"{describe_frame_counts(m, o)} frames for this VAE, e.g. {eg}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is None:
                continue
            s = self.size_multiple or 1
            if v < s or v % s:
                fix = max(s, round(v / s) * s)
                raise bad(name, f"a positive multiple of data.size_multiple={s}, e.g. {fix}")
        if self.pair_frames is not None:
            pf = self.pair_frames
            if isinstance(pf, bool) or not isinstance(pf, int) or pf < 2:
                raise bad("pair_frames", "an integer >= 2 (a pair stands for a clip with a first and a last frame)")
            m, o = self.frame_multiple, self.frame_offset
            if m is not None and o is not None and not is_valid_frame_count(pf, m, o):
                lo = largest_valid_frames(pf, m, o)
                hi = lo + m if lo else smallest_valid_frames(m, o)
                eg = " or ".join(str(n) for n in (lo, hi) if n >= 2) or str(hi + m)
                raise bad("pair_frames", f"{describe_frame_counts(m, o)} frames for this VAE, e.g. {eg}")
        if self.pairs and self.kind == "image":
            raise bad("pairs", "false with data.kind='image' (a start/end pair stands for a clip)")
        if self.sidecars is not None:
            if isinstance(self.sidecars, str) or not isinstance(self.sidecars, (list, tuple)):
                raise bad("sidecars", 'a list of file suffixes, e.g. ["tracks.json"]')
            for suffix in self.sidecars:
                problem = sidecar_suffix_problem(suffix)
                if problem:
                    expected = 'a list of file suffixes without a leading dot, e.g. ["tracks.json"]'
                    raise bad("sidecars", f"{expected}; {problem}")
        if self.max_aspect < 1:
            raise bad("max_aspect", "a ratio >= 1, e.g. 4.0")
        for name, p in self.condition_dropout.items():
            if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p <= 1.0):
                raise ValueError(
                    f"data.condition_dropout.{name}={p!r} is invalid: expected a probability in [0, 1], e.g. 0.1"
                )
        if self.repeats < 1:
            raise bad("repeats", "an integer >= 1")
        for name in ("image_extensions", "video_extensions"):
            for ext in getattr(self, name):
                if not (isinstance(ext, str) and ext.startswith(".")):
                    raise bad(name, 'a list of extensions with a leading dot, e.g. [".mp4"]')


def resolve_data_config(cfg: DataConfig, rules: MediaRules) -> DataConfig:
    """A copy of `cfg` with its None fields taken from `rules`, checked against `rules`.

    Values the user set win, as long as the backbone can take them: frame counts must be counts the
    backbone accepts, sizes multiples of its size multiple, and an image backbone gets 1-frame samples.
    Pairs and sidecars come from the backbone too (`pairs`, `sidecars`); with pairs on, `pair_frames`
    defaults to `num_frames`.
    """
    if rules.kind == "image" and cfg.kind == "video":
        raise ValueError(
            "data.kind='video' is invalid: this backbone trains on images only; "
            "set data.kind=image or leave it unset"
        )
    filled = {name: getattr(rules, attr) for name, attr in _FROM_RULES.items() if getattr(cfg, name) is None}
    if (cfg.kind or rules.kind) == "image" and cfg.num_frames is None:
        filled["num_frames"] = 1  # a video backbone asked to train on stills only
    if cfg.pairs and not rules.image_pairs:
        raise ValueError(
            "data.pairs=true is invalid: this backbone does not train on start/end image pairs; "
            "set data.pairs=false or leave it unset"
        )
    if cfg.pairs is None:
        filled["pairs"] = rules.image_pairs and (cfg.kind or rules.kind) != "image"
    if cfg.sidecars is None:
        filled["sidecars"] = list(rules.sidecars)
    pairs = filled.get("pairs", cfg.pairs)
    if pairs and cfg.pair_frames is None:
        n = cfg.num_frames if cfg.num_frames is not None else filled.get("num_frames")
        if n is not None and n < 2:
            raise ValueError(
                f"data.pair_frames=None resolves to data.num_frames={n}, but a start/end pair stands for a clip "
                "of at least 2 frames; set data.pair_frames (a valid frame count >= 2) or data.pairs=false"
            )
        filled["pair_frames"] = n
    out = replace(cfg, **filled)  # __post_init__ validates the combination

    assert out.frame_multiple is not None and out.frame_offset is not None and out.size_multiple is not None
    m, o = out.frame_multiple, out.frame_offset
    first = smallest_valid_frames(m, o)
    if m % rules.frame_multiple or not rules.is_valid_frames(first):
        key = "frame_multiple" if m % rules.frame_multiple else "frame_offset"
        raise ValueError(
            f"data.{key}={getattr(out, key)!r} is invalid: data.frame_multiple={m} with data.frame_offset={o} "
            f"gives frame counts ({describe_frame_counts(m, o)}, e.g. {first}) this backbone cannot take; its counts "
            f"are {rules.describe_frames()}: use data.frame_multiple={rules.frame_multiple} (or a multiple of it) "
            f"and data.frame_offset={rules.frame_offset}, or leave both unset"
        )
    if out.size_multiple % rules.size_multiple:
        raise ValueError(
            f"data.size_multiple={out.size_multiple} is invalid: this backbone needs sizes that are multiples "
            f"of {rules.size_multiple}; use data.size_multiple={rules.size_multiple} (or a multiple of it)"
        )
    if out.pair_frames is not None and not rules.is_valid_frames(out.pair_frames):
        eg = rules.nearest_frames(out.pair_frames)
        while eg < 2:
            eg += rules.frame_multiple
        raise ValueError(
            f"data.pair_frames={out.pair_frames} is invalid: this backbone takes {rules.describe_frames()} "
            f"frames, e.g. {eg}"
        )
    return out


def pair_frame_count(cfg: DataConfig) -> int:
    """Frames a start/end pair stands for under `cfg`: data.pair_frames, else data.num_frames."""
    n = cfg.pair_frames if cfg.pair_frames is not None else cfg.num_frames
    assert n is not None, "a resolved config (require_resolved) has num_frames"
    return n


def require_resolved(cfg: DataConfig, what: str = "the dataset") -> None:
    """ValueError unless every backbone-dependent field of `cfg` is set."""
    missing = cfg.unresolved()
    if missing:
        names = ", ".join(f"data.{n}" for n in missing)
        raise ValueError(
            f"{what} needs a resolved data config, but {names} {'is' if len(missing) == 1 else 'are'} None "
            "(None means 'from the backbone'); resolve the config with the backbone's rules first: "
            "resolve_data_config(cfg, spec.media_rules(preset)), or load_dataset(cfg, rules=...), "
            "or set the fields explicitly"
        )

