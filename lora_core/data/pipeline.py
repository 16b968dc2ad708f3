"""Training data: find clips and captions, probe them, bucket them, and read [C, F, H, W] tensors.

Letters: B batch, C channels (3, RGB), F frames, H height, W width.

Every random choice (clip start, crop, caption dropout, batch order) is a pure function of
(seed, index[, step | epoch]) through `sample_rng`, never of global RNG state, the rank, the
number of processes or DataLoader workers; so a run on 8 GPUs sees the same crops as on 1, and a
resumed run sees what the uninterrupted run would have.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import zlib
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F_nn
from torch.utils.data import Dataset, Sampler

from lora_core.data.video_io import _short, decode_frames, open_reader

logger = logging.getLogger(__name__)

PREPROCESS_VERSION = 1  # bump when reading/resizing changes the tensors, so caches are rebuilt

ACCEPTED_LAYOUTS = """accepted dataset layouts (data.path may be the folder or the listed file):
  1. a folder of clips/images with same-name .txt captions (clip.mp4 + clip.txt), searched recursively
  2. prompts.txt + videos.txt, line-aligned (CogVideoX); video paths relative to the folder
  3. a CSV with a header: video,prompt | file,caption | WebVid videoid,contentUrl,name; media next to it
  4. metadata.json (a list) or .jsonl of {"video": ..., "caption": ...} (also file_path / prompt / text)"""

_MEDIA_KEYS = (
    "video", "video_path", "image", "image_path", "file_path", "file_name", "filename", "file",
    "path", "media", "media_path", "videoid", "contenturl",
)  # fmt: skip
_CAPTION_KEYS = ("caption", "prompt", "text", "description", "name")  # WebVid's caption column is "name"
_PROMPT_FILES = ("prompts.txt", "prompt.txt")
_VIDEO_LIST_FILES = ("videos.txt", "video.txt")
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- config


@dataclass
class DataConfig:
    """Where the training media is and how it becomes [C, F, H, W] tensors in [-1, 1]."""

    path: str = ""
    media_root: str = ""  # where files named in a CSV/JSON live, when not next to that file
    fps: float = 24.0  # rate clips are resampled to; 0 keeps each clip's own rate
    num_frames: int = 49  # most frames per clip, of the form k * frame_multiple + 1
    frame_multiple: int = 4  # causal video VAEs want 4n+1 frames (Wan, Hunyuan); CogVideoX 1.0: 8
    height: int = 480  # target size; with buckets, height * width is the target area
    width: int = 832
    size_multiple: int = 32  # Wan2.2 TI2V-5B: VAE stride 16 x patch 2
    buckets: bool = True
    max_aspect: float = 4.0  # widest/tallest bucket generated
    crop: str = "random"  # "random" | "center" (random is still a fixed function of seed, index)
    clip_start: str = "random"  # "random" | "head" | "center"
    short_clips: str = "shorten"  # "shorten" (longest k*m+1 the clip has) | "skip"
    caption_dropout: float = 0.0
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

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, its value and a valid alternative."""

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"DataConfig.{name}={getattr(self, name)!r} is invalid: expected {expected}")

        if self.fps < 0:
            raise bad("fps", "a frame rate >= 0 (0 keeps each clip's own rate)")
        if self.frame_multiple < 1:
            raise bad("frame_multiple", "an integer >= 1")
        if self.num_frames < 1 or (self.num_frames - 1) % self.frame_multiple:
            m = self.frame_multiple
            lo = max(1, (self.num_frames - 1) // m * m + 1)
            raise bad("num_frames", f"k*{m}+1 frames for this VAE, e.g. {lo} or {lo + m}")
        if self.size_multiple < 1:
            raise bad("size_multiple", "an integer >= 1")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < self.size_multiple or v % self.size_multiple:
                fix = max(self.size_multiple, round(v / self.size_multiple) * self.size_multiple)
                raise bad(name, f"a positive multiple of size_multiple={self.size_multiple}, e.g. {fix}")
        if self.max_aspect < 1:
            raise bad("max_aspect", "a ratio >= 1, e.g. 4.0")
        for name, allowed in (
            ("crop", ("random", "center")),
            ("clip_start", ("random", "head", "center")),
            ("short_clips", ("shorten", "skip")),
        ):
            if getattr(self, name) not in allowed:
                raise bad(name, " or ".join(repr(a) for a in allowed))
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise bad("caption_dropout", "a probability in [0, 1]")
        if self.repeats < 1:
            raise bad("repeats", "an integer >= 1")
        for name in ("image_extensions", "video_extensions"):
            for ext in getattr(self, name):
                if not (isinstance(ext, str) and ext.startswith(".")):
                    raise bad(name, 'a list of extensions with a leading dot, e.g. [".mp4"]')


# ----------------------------------------------------------------------------- samples, reports


@dataclass(frozen=True)
class Sample:
    """One media file and its caption; the probe fills the source metadata (0 = not probed)."""

    path: Path
    caption: str | None
    is_image: bool
    key: str  # stable id: path relative to the dataset root
    num_frames: int = 0  # source frames (1 for images)
    fps: float = 0.0  # source rate (0 for images or when the file does not say)
    height: int = 0
    width: int = 0


class DataReport:
    """Problems with input files, each logged once per file and kind; `strict` turns them into errors."""

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.skipped: dict[str, str] = {}
        self.warnings: dict[tuple[str, str], str] = {}

    def skip(self, path: str | Path, reason: str, *, fix: str = "", strict_error: bool = True) -> None:
        """Report `path` as skipped; in strict mode raise ValueError instead (when `strict_error`)."""
        msg = reason if str(path) in reason else f"{path}: {reason}"
        hint = f"; {fix}" if fix else ""
        if self.strict and strict_error:
            raise ValueError(f"{msg}{hint} (data.strict=true; set it to false to skip such files)")
        if str(path) not in self.skipped:
            self.skipped[str(path)] = reason
            logger.warning("skipped file: %s%s", msg, hint)

    def warn(
        self,
        path: str | Path,
        kind: str,
        message: str,
        *,
        strict_error: str | None = None,
        level: int = logging.WARNING,
    ) -> None:
        """Report something that does not stop `path` from training; in strict mode raise
        ValueError(`strict_error`) instead, when one is given."""
        msg = message if str(path) in message else f"{path}: {message}"
        if self.strict and strict_error:
            raise ValueError(f"{strict_error} (data.strict=true)")
        if (str(path), kind) not in self.warnings:
            self.warnings[(str(path), kind)] = message
            logger.log(level, "%s", msg)


# ----------------------------------------------------------------------------- scanning


def _exts(exts: Sequence[str] | None, default: Sequence[str]) -> frozenset[str]:
    return frozenset(e.lower() for e in (exts if exts is not None else default))


def scan_dataset(
    path: str | Path,
    *,
    strict: bool = False,
    video_extensions: Sequence[str] | None = None,
    image_extensions: Sequence[str] | None = None,
    media_root: str | Path | None = None,
    report: DataReport | None = None,
) -> list[Sample]:
    """Find (media, caption) pairs under `path` (a folder or a CSV/JSON/JSONL/prompts.txt file).

    Needs no model and decodes nothing, so a wrong path fails in seconds. Referenced files that do
    not exist are reported once and skipped (ValueError if `strict`); finding nothing usable raises
    ValueError naming `path` and the accepted layouts.
    """
    defaults = DataConfig()
    report = report or DataReport(strict)
    vids = _exts(video_extensions, defaults.video_extensions)
    imgs = _exts(image_extensions, defaults.image_extensions)
    root = Path(path).expanduser()
    if not str(path):
        raise ValueError(f"data.path is empty; set it to a dataset folder or file.\n{ACCEPTED_LAYOUTS}")
    if not root.exists():
        raise FileNotFoundError(f"dataset path {root} does not exist; set data.path to a dataset folder or file")
    base = Path(media_root).expanduser() if media_root else None
    if root.is_file():
        entries, base_dir, layout = _scan_file(root, vids | imgs)
    else:
        entries, base_dir, layout = _scan_folder(root, vids | imgs)
    samples = _resolve_entries(entries, base or base_dir, vids, imgs, report, root)
    if not samples:
        n_skip = len(report.skipped)
        skipped = f"; {n_skip} referenced file(s) were missing or skipped (see warnings)" if n_skip else ""
        raise ValueError(f"no usable clips or images found in {root} (read as: {layout}){skipped}.\n{ACCEPTED_LAYOUTS}")
    for s in samples:
        if s.caption is None:
            report.warn(
                s.path, "caption", "has no caption; training it with an empty caption",
                strict_error=f"{s.path} has no caption; add a same-name .txt or caption column, or data.strict=false",
            )  # fmt: skip
    n_img = sum(s.is_image for s in samples)
    logger.info(
        "found %d samples (%d videos, %d images) in %s as %s", len(samples), len(samples) - n_img, n_img, root, layout
    )
    return samples


# An entry is (reference as written, caption or None, where it came from for messages).
_Entry = tuple[str, str | None, str]


def _scan_file(f: Path, media: frozenset[str]) -> tuple[list[_Entry] | list[Path], Path, str]:
    suffix = f.suffix.lower()
    if suffix in (".csv", ".json", ".jsonl"):
        return _read_metadata(f), f.parent, f"metadata file {f.name}"
    if suffix == ".txt":
        pair = _cogvideo_pair(f.parent)
        if pair is None or f not in pair:
            raise ValueError(
                f"{f} is a .txt file but not half of a prompts.txt + videos.txt pair in {f.parent}; "
                f"pass the dataset folder instead.\n{ACCEPTED_LAYOUTS}"
            )
        return _read_cogvideo(*pair), f.parent, f"{pair[0].name} + {pair[1].name}"
    if suffix in media:
        return [f], f.parent, "single file"
    raise ValueError(f"cannot read a dataset from {f}: unknown file type {suffix!r}.\n{ACCEPTED_LAYOUTS}")


def _scan_folder(root: Path, media: frozenset[str]) -> tuple[list[_Entry] | list[Path], Path, str]:
    pair = _cogvideo_pair(root)
    if pair is not None:
        return _read_cogvideo(*pair), root, f"{pair[0].name} + {pair[1].name}"
    meta = _find_metadata(root)
    if meta is not None:
        return _read_metadata(meta), root, f"metadata file {meta.name}"
    return [p for p in _walk(root) if p.suffix.lower() in media], root, "folder of media + .txt captions"


def _walk(root: Path) -> list[Path]:
    """Files under `root`, sorted; hidden entries (.cache, macOS ._clip.mp4 forks) are left out."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).parts
        if any(part.startswith((".", "__")) for part in rel):
            continue
        if p.is_file():
            out.append(p)
    return sorted(out)


def _cogvideo_pair(folder: Path) -> tuple[Path, Path] | None:
    prompts = next((folder / n for n in _PROMPT_FILES if (folder / n).is_file()), None)
    videos = next((folder / n for n in _VIDEO_LIST_FILES if (folder / n).is_file()), None)
    return (prompts, videos) if prompts and videos else None


def _read_lines(f: Path) -> list[str]:
    lines = f.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _read_cogvideo(prompts: Path, videos: Path) -> list[_Entry]:
    p_lines, v_lines = _read_lines(prompts), _read_lines(videos)
    if len(p_lines) != len(v_lines):
        # Misaligned lists would silently pair clips with the wrong captions, so never guess.
        raise ValueError(
            f"{prompts} has {len(p_lines)} lines but {videos} has {len(v_lines)}; "
            "they must be line-aligned (one caption per video); fix the files"
        )
    return [(v.strip(), p.strip() or None, f"{videos.name}:{i + 1}") for i, (p, v) in enumerate(zip(p_lines, v_lines))]


def _find_metadata(root: Path) -> Path | None:
    tables = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in (".csv", ".json", ".jsonl")
    )
    named = [p for p in tables if p.stem.lower() == "metadata"]
    if named:
        return named[0]
    usable = []
    for p in tables:
        try:
            if _read_metadata(p):
                usable.append(p)
        except ValueError:
            logger.debug("%s does not look like dataset metadata", p)
    if len(usable) > 1:
        names = ", ".join(p.name for p in usable)
        raise ValueError(f"{root} holds several metadata files ({names}); set data.path to the one to train on")
    return usable[0] if usable else None


def _rows_to_entries(rows: list[Any], f: Path, line_of: list[int]) -> list[_Entry]:
    entries: list[_Entry] = []
    columns: set[str] = set()
    for row, line in zip(rows, line_of):
        where = f"{f.name}:{line}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with a video and a caption, got {type(row).__name__}")
        low = {str(k).strip().lower(): v for k, v in row.items()}
        columns |= set(low)
        # An empty cell is one bad row (reported later); no media column at all is a wrong file.
        refs = [str(low[k]).strip() for k in _MEDIA_KEYS if low.get(k) not in (None, "")]
        cap = next((low[k] for k in _CAPTION_KEYS if isinstance(low.get(k), str) and low[k].strip()), None)
        # Several candidate references (WebVid has videoid and contentUrl) are tried in order.
        entries.append(("\0".join(refs), cap.strip() if cap else None, where))
    if rows and not columns & set(_MEDIA_KEYS):
        found = ", ".join(sorted(columns)) or "none"
        raise ValueError(f"{f} has no media column; expected one of {', '.join(_MEDIA_KEYS)} (found {found})")
    return entries


def _read_metadata(f: Path) -> list[_Entry]:
    """Rows of a CSV / JSON / JSONL file as entries; ValueError when it has no media column."""
    suffix = f.suffix.lower()
    text = f.read_text(encoding="utf-8-sig", errors="replace")
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = list(reader)
        return _rows_to_entries(rows, f, list(range(2, len(rows) + 2)))
    if suffix == ".jsonl":
        rows, lines = [], []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{i} is not valid JSON ({e.msg}); fix or delete that line") from e
            lines.append(i)
        return _rows_to_entries(rows, f, lines)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(data, dict):
        listed = next((data[k] for k in ("data", "samples", "items", "videos") if isinstance(data.get(k), list)), None)
        if listed is not None:
            data = listed
        elif data and all(isinstance(v, str) for v in data.values()):
            data = [{"file": k, "caption": v} for k, v in data.items()]  # {"clip.mp4": "caption"}
    if not isinstance(data, list):
        raise ValueError(f"{f}: expected a JSON list of {{\"video\": ..., \"caption\": ...}} objects")
    return _rows_to_entries(data, f, list(range(1, len(data) + 1)))


class _Resolver:
    """Find a referenced media file: as a path, then by file name, then by stem (WebVid videoid)."""

    def __init__(self, base: Path, media: frozenset[str], report: DataReport) -> None:
        self.base, self.media, self.report = base, media, report
        self._by_name: dict[str, list[Path]] | None = None
        self._by_stem: dict[str, list[Path]] | None = None

    def _index(self) -> None:
        if self._by_name is None:
            self._by_name, self._by_stem = {}, {}
            if self.base.is_dir():
                for p in _walk(self.base):
                    if p.suffix.lower() in self.media:
                        self._by_name.setdefault(p.name, []).append(p)
                        self._by_stem.setdefault(p.stem, []).append(p)

    def resolve(self, ref: str) -> Path | None:
        if "://" in ref:
            ref = PurePosixPath(urlparse(ref).path).name  # contentUrl -> its file name
        p = Path(ref).expanduser()
        direct = p if p.is_absolute() else self.base / p
        if direct.is_file():
            return direct
        self._index()
        assert self._by_name is not None and self._by_stem is not None
        name = p.name
        hits = self._by_name.get(name) or ([] if p.suffix.lower() in self.media else self._by_stem.get(name, []))
        if len(hits) > 1:
            self.report.warn(ref, "ambiguous", f"{ref!r} matches {len(hits)} files under {self.base}; using {hits[0]}")
        return hits[0] if hits else None


def _resolve_entries(
    entries: list[_Entry] | list[Path],
    base: Path,
    vids: frozenset[str],
    imgs: frozenset[str],
    report: DataReport,
    root: Path,
) -> list[Sample]:
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    resolver = _Resolver(base, vids | imgs, report)
    for entry in entries:
        if isinstance(entry, Path):  # folder layout: caption from the same-name .txt
            media, caption = entry, _read_caption(entry.with_suffix(".txt"))
        else:
            refs, caption, where = entry
            if not refs.strip():
                report.skip(where, "names no media file", fix="fill in the video/file column or delete the row")
                continue
            media = next((m for m in (resolver.resolve(r) for r in refs.split("\0")) if m is not None), None)
            if media is None:
                first = refs.split("\0")[0]
                report.skip(
                    first, f"referenced at {where} but not found under {base}", fix="fix the path or data.media_root"
                )
                continue
        ext = media.suffix.lower()
        if ext not in vids | imgs:
            report.skip(media, f"extension {ext!r} is not in data.video_extensions or data.image_extensions")
            continue
        try:
            key = media.resolve().relative_to(root.resolve() if root.is_dir() else root.resolve().parent).as_posix()
        except ValueError:
            key = str(media.resolve())
        n = seen[key] = seen.get(key, 0) + 1
        samples.append(Sample(media, caption, ext in imgs, key if n == 1 else f"{key}#{n}"))
    return samples


def _read_caption(txt: Path) -> str | None:
    if not txt.is_file():
        return None
    text = txt.read_text(encoding="utf-8-sig", errors="replace").strip()
    return text or None


# ----------------------------------------------------------------------------- pure sampling functions


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


def available_frames(num_src: int, src_fps: float, fps: float) -> int:
    """How many frames at `fps` a clip of `num_src` frames at `src_fps` holds (from its first frame)."""
    if num_src <= 0:
        return 0
    if fps <= 0 or src_fps <= 0:
        return num_src
    step = src_fps / fps
    return int(math.floor((num_src - 1) / step + 1e-6)) + 1


def frame_count(available: int, num_frames: int, multiple: int = 4) -> int:
    """Largest k * multiple + 1 <= min(available, num_frames); 0 if the clip has no frames."""
    n = min(available, num_frames)
    return 0 if n < 1 else (n - 1) // multiple * multiple + 1


def select_frames(
    num_src: int, src_fps: float, fps: float, count: int, seed: int, index: int, start: str = "random"
) -> list[int]:
    """Source frame indices for `count` frames at `fps`, from a start fixed by (seed, index).

    Frames are taken every src_fps / fps source frames (rounded down), so a 30 fps clip read at
    24 fps skips every fifth frame, and a 12 fps clip read at 24 fps repeats each frame.
    """
    step = src_fps / fps if fps > 0 and src_fps > 0 else 1.0
    max_start = int(math.floor(num_src - 1 - (count - 1) * step + 1e-6))
    if max_start < 0:
        raise ValueError(f"a clip of {num_src} frames at {src_fps} fps holds fewer than {count} frames at {fps} fps")
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


# ----------------------------------------------------------------------------- probing


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


def _open_image(path: Path) -> "Image.Image":  # noqa: F821
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # phone photos store rotation in EXIF
            return im.convert("RGB")
    except Exception as e:
        why = _short(e)
        raise ValueError(f"cannot read image {path} ({'not a readable image' if str(path) in why else why})") from e


def _probe_image(path: Path) -> dict[str, Any]:
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes)")
    w, h = _open_image(path).size
    return dict(num_frames=1, fps=0.0, height=h, width=w)


def probe_samples(
    samples: Sequence[Sample], cfg: DataConfig, report: DataReport | None = None, progress: bool = True
) -> list[Sample]:
    """Open every file once (metadata, first and last frame) and drop the broken and, with
    short_clips="skip", the short ones. Samples probed before are kept as they are."""
    from tqdm.auto import tqdm

    report = report or DataReport(cfg.strict)
    out: list[Sample] = []
    for s in tqdm(samples, desc="probing media", disable=not progress or len(samples) < 100):
        if s.num_frames <= 0:
            try:
                if not s.path.is_file():
                    raise FileNotFoundError(f"{s.path} does not exist")
                info = _probe_image(s.path) if s.is_image else _probe_video(s.path, cfg.verify_decode)
            except (ValueError, OSError) as e:
                report.skip(s.path, str(e))
                continue
            s = replace(s, **info)
        if not s.is_image:
            avail = available_frames(s.num_frames, s.fps, cfg.fps)
            if avail < cfg.num_frames:
                src = f" ({s.num_frames} at {s.fps:g} fps)" if cfg.fps and s.fps and cfg.fps != s.fps else ""
                have = f"has {avail} frames at {cfg.fps or s.fps:g} fps{src}, fewer than num_frames={cfg.num_frames}"
                if cfg.short_clips == "skip":
                    report.skip(s.path, have, fix="data.short_clips=shorten trains it shorter", strict_error=False)
                    continue
                use = frame_count(avail, cfg.num_frames, cfg.frame_multiple)
                report.warn(s.path, "short", f"{have}; training it with {use} frames", level=logging.INFO)
        out.append(s)
    return out


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class ClipPlan:
    """Everything that decides a sample's tensor; a pure function of (cfg, sample, seed, index)."""

    bucket: tuple[int, int, int]  # (F, H, W)
    frames: list[int]  # source frame indices
    resize: tuple[int, int]  # (H, W) before the crop
    crop: tuple[int, int]  # (top, left)


class SampleReadError(ValueError):
    """A file that probed fine failed to decode later."""


class VideoDataset(Dataset):
    """Probed samples -> dict(video=[C, F, H, W] float in [-1, 1], caption, key, path, index).

    Items of one bucket (F, H, W) stack; batch them with `BucketBatchSampler` and `collate`.
    The caption has the trigger applied but no dropout: dropout depends on the step, which only
    the trainer knows (`apply_caption_dropout`).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        cfg: DataConfig,
        seed: int = 0,
        report: DataReport | None = None,
        progress: bool = True,
    ) -> None:
        cfg.validate()
        self.cfg, self.seed = cfg, seed
        self.report = report or DataReport(cfg.strict)
        self.samples = probe_samples(samples, cfg, self.report, progress)
        if not self.samples:
            raise ValueError(
                f"none of the {len(samples)} samples of {cfg.path or 'the dataset'} can be used "
                "(see the warnings above for each file); fix or replace the files"
            )
        table = [(cfg.height, cfg.width)]
        if cfg.buckets:
            table = make_buckets(cfg.height, cfg.width, cfg.size_multiple, cfg.max_aspect)
        self.buckets: list[tuple[int, int, int]] = []
        for s in self.samples:
            avail = 1 if s.is_image else available_frames(s.num_frames, s.fps, cfg.fps)
            frames = frame_count(avail, cfg.num_frames, cfg.frame_multiple)
            self.buckets.append((frames, *nearest_bucket(s.height, s.width, table)))
        self._bad: set[int] = set()
        counts: dict[tuple[int, int, int], int] = {}
        for b in self.buckets:
            counts[b] = counts.get(b, 0) + 1
        logger.info(
            "dataset: %d samples in %d buckets (F, H, W): %s; %d file(s) skipped",
            len(self.samples),
            len(counts),
            ", ".join(f"{b}x{n}" for b, n in sorted(counts.items())),
            len(self.report.skipped),
        )

    def __len__(self) -> int:
        return len(self.samples)

    def caption(self, index: int) -> str:
        return with_trigger(self.samples[index].caption or "", self.cfg.trigger)

    def plan(self, index: int, src_size: tuple[int, int] | None = None) -> ClipPlan:
        s, cfg = self.samples[index], self.cfg
        f, h, w = self.buckets[index]
        frames = [0] if s.is_image else select_frames(s.num_frames, s.fps, cfg.fps, f, self.seed, index, cfg.clip_start)
        sh, sw = src_size or (s.height, s.width)
        rh, rw, top, left = resize_crop_plan(sh, sw, h, w, self.seed, index, cfg.crop == "random")
        return ClipPlan((f, h, w), frames, (rh, rw), (top, left))

    def preprocess_params(self, index: int, include_caption: bool = True) -> dict[str, Any]:
        """What decides the tensors of sample `index`, for cache keys."""
        p = self.plan(index)
        out: dict[str, Any] = dict(
            version=PREPROCESS_VERSION, bucket=list(p.bucket), frames=p.frames, resize=list(p.resize), crop=list(p.crop)
        )
        if include_caption:
            out["caption"] = self.caption(index)
        return out

    def load(self, index: int) -> dict[str, Any]:
        """Read sample `index`; raise SampleReadError naming the file when it cannot be decoded."""
        s = self.samples[index]
        try:
            if s.is_image:
                frames = np.array(_open_image(s.path))[None]  # [1, H, W, 3], writable
            else:
                plan = self.plan(index)
                frames = decode_frames(open_reader(s.path, self.cfg.decode_threads), plan.frames)
        except SampleReadError:
            raise
        except Exception as e:
            raise SampleReadError(f"cannot decode {s.path}: {_short(e)}") from e
        plan = self.plan(index, frames.shape[1:3])  # decoded size wins if the probe was stale
        video = _resize_crop(frames, plan)
        return dict(video=video, caption=self.caption(index), key=s.key, path=str(s.path), index=index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self.load(index)
        except SampleReadError as e:
            self.report.skip(self.samples[index].path, str(e), fix="re-export or delete the file")
            self._bad.add(index)
        # Another sample of the same bucket keeps the batch stackable; chosen without randomness.
        n = len(self)
        for k in range(1, n):
            j = (index + k) % n
            if j not in self._bad and self.buckets[j] == self.buckets[index]:
                try:
                    return self.load(j)
                except SampleReadError as e:
                    self.report.skip(self.samples[j].path, str(e))
                    self._bad.add(j)
        raise ValueError(f"no readable sample left in bucket {self.buckets[index]}; fix the files reported above")


def _resize_crop(frames: np.ndarray, plan: ClipPlan) -> torch.Tensor:
    """uint8 [F, h, w, 3] -> float [C, F, H, W] in [-1, 1], by plan.resize then plan.crop."""
    _, out_h, out_w = plan.bucket
    (rh, rw), (top, left) = plan.resize, plan.crop
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [F, 3, h, w]
    out = torch.empty(x.shape[0], 3, out_h, out_w)
    for i in range(0, x.shape[0], 8):  # chunks: 49 frames of 1080p in float32 would be 1.2 GB
        chunk = x[i : i + 8].float()
        if chunk.shape[-2:] != (rh, rw):
            chunk = F_nn.interpolate(chunk, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + 8] = chunk[:, :, top : top + out_h, left : left + out_w]
    return out.div_(127.5).sub_(1.0).clamp_(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensor fields (video -> [B, C, F, H, W]); other fields become lists."""
    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) != 1:
                raise ValueError(
                    f"a batch mixes {k!r} shapes {sorted(shapes)}; use BucketBatchSampler so each batch is one bucket"
                )
            out[k] = torch.stack(vals)
        else:
            out[k] = vals
    return out


def load_dataset(cfg: DataConfig, seed: int = 0, progress: bool = True) -> VideoDataset:
    """scan_dataset + probe: a ready VideoDataset for `cfg` (fails before any model is loaded)."""
    cfg.validate()
    report = DataReport(cfg.strict)
    samples = scan_dataset(
        cfg.path,
        strict=cfg.strict,
        video_extensions=cfg.video_extensions,
        image_extensions=cfg.image_extensions,
        media_root=cfg.media_root or None,
        report=report,
    )
    return VideoDataset(samples, cfg, seed=seed, report=report, progress=progress)


# ----------------------------------------------------------------------------- batching


def epoch_batches(
    buckets: Sequence[Hashable], batch_size: int, seed: int, epoch: int, *, repeats: int = 1, drop_last: bool = False
) -> list[list[int]]:
    """All batches of `epoch` in training order, each from one bucket: a pure function of its arguments."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = sample_rng(seed, epoch, "batches")
    groups: dict[Hashable, list[int]] = {}
    for i, b in enumerate(buckets):
        groups.setdefault(b, []).append(i)
    batches: list[list[int]] = []
    for b in sorted(groups, key=repr):  # repr: a fixed order for any hashable bucket id
        idx = np.concatenate([rng.permutation(groups[b]) for _ in range(repeats)])
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            if len(chunk) == batch_size or not drop_last:
                batches.append(chunk.tolist())
    return [batches[i] for i in rng.permutation(len(batches))]


class BucketBatchSampler(Sampler[list[int]]):
    """This rank's share of `epoch_batches`: batch r, r + R, r + 2R, ... of the global order.

    The global list is padded (by wrapping around) to a multiple of `num_replicas`, so every rank
    steps the same number of times (uneven counts hang collectives). `set_epoch(e, start_batch=k)`
    resumes mid-epoch by index arithmetic, without iterating over the skipped batches.
    """

    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int,
        seed: int = 0,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        repeats: int = 1,
        drop_last: bool = False,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        self.buckets, self.batch_size, self.seed = list(buckets), batch_size, seed
        self.num_replicas, self.rank, self.repeats, self.drop_last = num_replicas, rank, repeats, drop_last
        self.epoch, self.start_batch = 0, 0
        if drop_last:
            counts: dict[Hashable, int] = {}
            for b in self.buckets:
                counts[b] = counts.get(b, 0) + 1
            for b, n in counts.items():
                if n * repeats < batch_size:
                    logger.warning(
                        "bucket %s has %d sample(s) < batch_size %d and drop_last is on: they are never used; "
                        "lower the batch size or turn drop_last off", b, n, batch_size,
                    )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def rank_batches(self, epoch: int) -> list[list[int]]:
        batches = epoch_batches(
            self.buckets, self.batch_size, self.seed, epoch, repeats=self.repeats, drop_last=self.drop_last
        )
        if not batches:
            return []
        total = -(-len(batches) // self.num_replicas) * self.num_replicas
        padded = [batches[i % len(batches)] for i in range(total)]
        return padded[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.rank_batches(self.epoch)[self.start_batch :]

    def __len__(self) -> int:
        return max(0, len(self.rank_batches(self.epoch)) - self.start_batch)
