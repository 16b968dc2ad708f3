"""Finding (media, caption) pairs: folders with .txt captions, prompts.txt + videos.txt, CSV, JSON(L).

With `pairs` (a backbone that trains on start/end image pairs), `<id>_start.png` + `<id>_end.png`
in one folder, or a metadata row with `start` and `end` columns, are one sample standing for a
clip whose first and last frames are known. Metadata rows keep their other scalar columns (fps,
motion_bucket_id, ...) as `Sample.extra`.

Text files are decoded strictly: UTF-8 (with or without a byte-order mark) or UTF-16/32 with a
byte-order mark. Anything else is reported with the file and the offset of the first bad byte,
rather than trained on as U+FFFD garbage: an undecodable caption skips its sample (data.strict:
an error), an undecodable metadata or prompt/video list fails the scan (it is the whole dataset).
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import urlparse

from lora_core.data.config import DataConfig

logger = logging.getLogger(__name__)

ACCEPTED_LAYOUTS = """accepted dataset layouts (data.path may be the folder or the listed file):
  1. a folder of clips/images with same-name .txt captions (clip.mp4 + clip.txt), searched recursively
  2. prompts.txt + videos.txt, line-aligned (CogVideoX); video paths relative to the folder
  3. a CSV with a header: video,prompt | file,caption | WebVid videoid,contentUrl,name; media next to it
  4. metadata.json (a list) or .jsonl of {"video": ..., "caption": ...} (also file_path / prompt / text)
  with a backbone that trains on image pairs (data.pairs): <id>_start.png + <id>_end.png (+ <id>.txt) in a
  folder, or metadata rows with start and end columns (start_image/end_image, first_frame/last_frame)"""

_MEDIA_KEYS = (
    "video", "video_path", "image", "image_path", "file_path", "file_name", "filename", "file",
    "path", "media", "media_path", "videoid", "contenturl",
)  # fmt: skip
_CAPTION_KEYS = ("caption", "prompt", "text", "description", "name")  # WebVid's caption column is "name"
_START_KEYS = ("start", "start_image", "first_frame")
_END_KEYS = ("end", "end_image", "last_frame")
# Columns that name files or captions; every other scalar column of a row is kept as Sample.extra.
_REFERENCE_KEYS = frozenset(_MEDIA_KEYS + _CAPTION_KEYS + _START_KEYS + _END_KEYS)
_START_SUFFIX, _END_SUFFIX = "_start", "_end"  # <id>_start.png + <id>_end.png in the folder layout
_PROMPT_FILES = ("prompts.txt", "prompt.txt")
_VIDEO_LIST_FILES = ("videos.txt", "video.txt")
# UTF-32 first: its little-endian mark begins with UTF-16's.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"), (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)  # fmt: skip


# ----------------------------------------------------------------------------- samples, reports


@dataclass(frozen=True)
class Sample:
    """One media file (or start/end image pair) and its caption; the probe fills the source metadata
    (0 = not probed).

    A pair has `path` = the start image and `end` = the end image, `is_image` False (it stands for a
    clip: the probe sets `num_frames` to data.pair_frames), and the start image's size as its size.
    """

    path: Path
    caption: str | None
    is_image: bool  # a still (1 frame); False for clips and pairs
    key: str  # stable id: path relative to the dataset root (a pair's: its start image's)
    num_frames: int = 0  # source frames (1 for images, data.pair_frames for a pair)
    fps: float = 0.0  # source rate (0 for images, pairs, or when the file does not say)
    height: int = 0
    width: int = 0
    end: Path | None = None  # the end image of a start/end pair
    end_height: int = 0  # size of the end image (probed), 0 for other samples
    end_width: int = 0
    # Extra scalar columns of the sample's metadata row, as (column, value) in row order (hashable).
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def is_pair(self) -> bool:
        return self.end is not None


def sidecar_path(sample: Sample, suffix: str) -> Path:
    """Where the sidecar file `suffix` ("tracks.json") of `sample` is, whether or not it exists: the
    media path with its extension replaced (clip.mp4 -> clip.tracks.json); for a pair, `<id>.tracks.json`
    beside the start image `<id>_start.png` (a start image without the `_start` suffix: its own stem)."""
    stem = sample.path.stem
    if sample.is_pair and stem.lower().endswith(_START_SUFFIX) and len(stem) > len(_START_SUFFIX):
        stem = stem[: -len(_START_SUFFIX)]
    return sample.path.with_name(f"{stem}.{suffix}")


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


# ----------------------------------------------------------------------------- text files


class TextDecodeError(ValueError):
    """A text file that is neither UTF-8 nor UTF-16/32 with a byte-order mark; names file and offset."""

    def __init__(self, path: Path, offset: int, detail: str) -> None:
        self.path, self.offset = path, offset
        super().__init__(
            f"{path}: {detail} at byte offset {offset}; save it as UTF-8 (or UTF-16 with a byte-order mark)"
        )


def read_text(path: Path) -> str:
    """The text of `path`, decoded strictly (see the module docstring); TextDecodeError otherwise."""
    data = path.read_bytes()
    bom, encoding, name = next(((b, e, n) for b, e, n in _BOMS if data.startswith(b)), (b"", "utf-8", "UTF-8"))
    try:
        text = data[len(bom) :].decode(encoding)
    except UnicodeDecodeError as e:
        offset = len(bom) + e.start
        bad = data[offset : offset + 1].hex() or "end of file"
        raise TextDecodeError(path, offset, f"not valid {name} (byte 0x{bad})") from None
    nul = text.find("\0")
    if nul >= 0:
        # Valid UTF-8 but never a caption: typically UTF-16 saved without a byte-order mark.
        offset = len(bom) + len(text[:nul].encode(encoding))
        raise TextDecodeError(path, offset, "a NUL character (UTF-16 without a byte-order mark?)")
    return text


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
    captions: bool = True,
    pairs: bool = False,
    sidecars: Sequence[str] = (),
) -> list[Sample]:
    """Find (media, caption) pairs under `path` (a folder or a CSV/JSON/JSONL/prompts.txt file).

    Needs no model and decodes nothing, so a wrong path fails in seconds. Referenced files that do
    not exist are reported once and skipped (ValueError if `strict`); finding nothing usable raises
    ValueError naming `path` and the accepted layouts.

    With `pairs`, start/end image pairs are one sample each (see the module docstring); a start image
    without its end (or the reverse) is reported naming the missing file and skipped (ValueError if
    `strict`). Without, `a_start.png` is an image like any other. Files named by a `sidecars` suffix
    (`clip.tracks.json`) belong to their sample and are never read as media or metadata.
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
    side = tuple(f".{x}".lower() for x in sidecars)
    if root.is_file():
        entries, base_dir, layout = _scan_file(root, vids | imgs, pairs)
    else:
        entries, base_dir, layout = _scan_folder(root, vids | imgs, report, pairs, side)
        if pairs and entries and isinstance(entries[0], Path):
            entries = _group_pairs(entries, imgs, report)  # type: ignore[arg-type]
    samples = _resolve_entries(entries, base or base_dir, vids, imgs, report, root)
    if not samples:
        n_skip = len(report.skipped)
        skipped = f"; {n_skip} referenced file(s) were missing or skipped (see warnings)" if n_skip else ""
        raise ValueError(f"no usable clips or images found in {root} (read as: {layout}){skipped}.\n{ACCEPTED_LAYOUTS}")
    for s in samples:
        if captions and s.caption is None:
            report.warn(
                s.path, "caption", "has no caption; training it with an empty caption",
                strict_error=f"{s.path} has no caption; add {_caption_hint(s)} or a caption column, or data.strict=false",
            )  # fmt: skip
    n_img, n_pair = sum(s.is_image for s in samples), sum(s.is_pair for s in samples)
    logger.info(
        "found %d samples (%d videos, %d images, %d pairs) in %s as %s",
        *(len(samples), len(samples) - n_img - n_pair, n_img, n_pair, root, layout),
    )
    return samples


def _caption_hint(s: Sample) -> str:
    """Where a caption file of `s` would be read from, for messages."""
    if s.is_pair:
        return f"{sidecar_path(s, 'txt').name} (or {s.path.with_suffix('.txt').name})"
    return "a same-name .txt"


class _Entry(NamedTuple):
    """A metadata row or list line: references as written (candidates joined by NUL), caption or None,
    where it came from (for messages); a pair row's end reference; the row's extra scalar columns."""

    refs: str
    caption: str | None
    where: str
    end_refs: str = ""
    extra: tuple[tuple[str, Any], ...] = ()
    pair: bool = False


@dataclass(frozen=True)
class _FolderPair:
    """`<id>_start.<ext>` + `<id>_end.<ext>` found side by side in the folder layout."""

    start: Path
    end: Path


_Entries = list[_Entry] | list[Path] | list[Path | _FolderPair]


def _scan_file(f: Path, media: frozenset[str], pairs: bool = False) -> tuple[_Entries, Path, str]:
    suffix = f.suffix.lower()
    if suffix in (".csv", ".json", ".jsonl"):
        return _read_metadata(f, pairs), f.parent, f"metadata file {f.name}"
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


def _scan_folder(
    root: Path, media: frozenset[str], report: DataReport, pairs: bool = False, sidecars: tuple[str, ...] = ()
) -> tuple[_Entries, Path, str]:
    pair = _cogvideo_pair(root)
    if pair is not None:
        return _read_cogvideo(*pair), root, f"{pair[0].name} + {pair[1].name}"
    meta = _find_metadata(root, report, pairs, sidecars)
    if meta is not None:
        return _read_metadata(meta, pairs), root, f"metadata file {meta.name}"
    files = [p for p in _walk(root) if p.suffix.lower() in media and not p.name.lower().endswith(sidecars or ("\0",))]
    layout = "folder of media + .txt captions" + (" (and start/end image pairs)" if pairs else "")
    return files, root, layout


def _pair_role(p: Path, imgs: frozenset[str]) -> tuple[str, str] | None:
    """("start" | "end", id) for an image named <id>_start.<ext> / <id>_end.<ext>; None otherwise."""
    if p.suffix.lower() not in imgs:
        return None
    stem = p.stem
    for role, suffix in (("start", _START_SUFFIX), ("end", _END_SUFFIX)):
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return role, stem[: -len(suffix)]
    return None


def _group_pairs(files: list[Path], imgs: frozenset[str], report: DataReport) -> list[Path | _FolderPair]:
    """Folder files with each <id>_start + <id>_end image of one folder made one `_FolderPair`, at the
    place of its start image; a half without its partner is reported naming the missing file."""
    halves: dict[tuple[str, Path, str], list[Path]] = {}
    for p in files:
        role = _pair_role(p, imgs)
        if role is not None:
            halves.setdefault((role[0], p.parent, role[1]), []).append(p)
    out: list[Path | _FolderPair] = []
    for p in files:
        role = _pair_role(p, imgs)
        if role is None:
            out.append(p)
            continue
        kind, ident = role
        other = "end" if kind == "start" else "start"
        mine, partner = halves[(kind, p.parent, ident)], halves.get((other, p.parent, ident))
        if p != mine[0]:
            report.skip(
                p, f"is another {kind} image of the pair {ident!r}; {mine[0].name} is used",
                fix=f"keep one {ident}{_START_SUFFIX if kind == 'start' else _END_SUFFIX} image", strict_error=False,
            )  # fmt: skip
            continue
        if partner is None:
            missing = p.parent / f"{ident}_{other}{p.suffix}"
            report.skip(
                p, f"is the {kind} image of a pair, but its {other} image {missing} is missing "
                f"(no {ident}_{other} with any of data.image_extensions beside it)",
                fix=f"add {missing.name}, or rename {p.name} to train it as a plain image",
            )  # fmt: skip
            continue
        if kind == "start":
            out.append(_FolderPair(p, partner[0]))
    return out


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
    lines = read_text(f).splitlines()
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
    return [_Entry(v.strip(), p.strip() or None, f"{videos.name}:{i + 1}") for i, (p, v) in enumerate(zip(p_lines, v_lines))]


def _find_metadata(
    root: Path, report: DataReport, pairs: bool = False, sidecars: tuple[str, ...] = ()
) -> Path | None:
    tables = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in (".csv", ".json", ".jsonl")
        and not p.name.lower().endswith(sidecars or ("\0",))  # clip.tracks.json is not a table of the dataset
    )
    named = [p for p in tables if p.stem.lower() == "metadata"]
    if named:
        return named[0]
    usable = []
    for p in tables:
        try:
            if _read_metadata(p, pairs):
                usable.append(p)
        except TextDecodeError as e:
            # Not silently: this may be the metadata the user meant, but it may also be an unrelated table.
            report.warn(p, "decode", f"{e}; not read as dataset metadata", strict_error=str(e))
        except ValueError:
            logger.debug("%s does not look like dataset metadata", p)
    if len(usable) > 1:
        names = ", ".join(p.name for p in usable)
        raise ValueError(f"{root} holds several metadata files ({names}); set data.path to the one to train on")
    return usable[0] if usable else None


_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _csv_value(v: str) -> Any:
    """A CSV cell as int or float where it reads as one ("25", "0.5", "1e-3"), else the stripped string."""
    t = v.strip()
    if _INT_RE.fullmatch(t):
        return int(t)
    if _FLOAT_RE.fullmatch(t):
        return float(t)
    return t


def _extra_columns(row: dict[Any, Any], from_csv: bool) -> tuple[tuple[str, Any], ...]:
    """The row's scalar columns other than media, caption and pair references, as (column, value);
    empty cells and non-scalar values (lists, objects) are left out, so a Sample stays hashable."""
    out = []
    for k, v in row.items():
        if k is None or str(k).strip().lower() in _REFERENCE_KEYS or v is None or v == "":
            continue  # k None: the cells of a CSV row longer than its header
        if from_csv and isinstance(v, str):
            v = _csv_value(v)
        if isinstance(v, (str, int, float, bool)):
            out.append((str(k).strip(), v))
    return tuple(out)


def _first_ref(low: dict[str, Any], keys: Sequence[str]) -> str:
    return next((str(low[k]).strip() for k in keys if low.get(k) not in (None, "")), "")


def _rows_to_entries(
    rows: list[Any], f: Path, line_of: list[int], pairs: bool = False, from_csv: bool = False
) -> list[_Entry]:
    entries: list[_Entry] = []
    columns: set[str] = set()
    pair_keys = set(_START_KEYS + _END_KEYS)
    for row, line in zip(rows, line_of):
        where = f"{f.name}:{line}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with a video and a caption, got {type(row).__name__}")
        low = {str(k).strip().lower(): v for k, v in row.items()}
        columns |= set(low)
        # An empty cell is one bad row (reported later); no media column at all is a wrong file.
        refs = [str(low[k]).strip() for k in _MEDIA_KEYS if low.get(k) not in (None, "")]
        cap = next((low[k] for k in _CAPTION_KEYS if isinstance(low.get(k), str) and low[k].strip()), None)
        cap = cap.strip() if cap else None
        extra = _extra_columns(row, from_csv)
        start, end = _first_ref(low, _START_KEYS), _first_ref(low, _END_KEYS)
        if pairs and (start or end):
            entries.append(_Entry(start, cap, where, end, extra, pair=True))
            continue
        # Several candidate references (WebVid has videoid and contentUrl) are tried in order.
        entries.append(_Entry("\0".join(refs), cap, where, extra=extra))
    media_columns = set(_MEDIA_KEYS) | (pair_keys if pairs else set())
    if rows and not columns & media_columns:
        found = ", ".join(sorted(columns)) or "none"
        why = ""
        if columns & pair_keys:
            why = "; its start/end columns name image pairs, which only a backbone that trains on pairs reads"
        raise ValueError(
            f"{f} has no media column; expected one of {', '.join(sorted(media_columns, key=_column_order))} "
            f"(found {found}){why}"
        )
    return entries


def _column_order(k: str) -> int:
    order = _MEDIA_KEYS + _START_KEYS + _END_KEYS
    return order.index(k)


def _read_metadata(f: Path, pairs: bool = False) -> list[_Entry]:
    """Rows of a CSV / JSON / JSONL file as entries; ValueError when it has no media column."""
    suffix = f.suffix.lower()
    text = read_text(f)
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = list(reader)
        return _rows_to_entries(rows, f, list(range(2, len(rows) + 2)), pairs, from_csv=True)
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
        return _rows_to_entries(rows, f, lines, pairs)
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
    return _rows_to_entries(data, f, list(range(1, len(data) + 1)), pairs)


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
    entries: _Entries,
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
        end: Path | None = None
        extra: tuple[tuple[str, Any], ...] = ()
        if isinstance(entry, Path):  # folder layout: caption from the same-name .txt
            media = entry
            caption = _folder_caption(media, [media.with_suffix(".txt")], report)
        elif isinstance(entry, _FolderPair):  # <id>.txt, else <id>_start.txt
            media, end = entry.start, entry.end
            ident = media.stem[: -len(_START_SUFFIX)]
            caption = _folder_caption(media, [media.with_name(f"{ident}.txt"), media.with_suffix(".txt")], report)
        else:
            caption, extra = entry.caption, entry.extra
            found = _resolve_row(entry, resolver, base, report)
            if found is None:
                continue
            media, end = found
        if caption is _UNREADABLE:
            continue
        bad = [p for p in (media, end) if p is not None and p.suffix.lower() not in (imgs if end else vids | imgs)]
        if bad:
            ext = bad[0].suffix.lower()
            if end is None:
                report.skip(media, f"extension {ext!r} is not in data.video_extensions or data.image_extensions")
            else:
                report.skip(bad[0], f"is half of a start/end image pair, but {ext!r} is not in data.image_extensions")
            continue
        try:
            key = media.resolve().relative_to(root.resolve() if root.is_dir() else root.resolve().parent).as_posix()
        except ValueError:
            key = str(media.resolve())
        n = seen[key] = seen.get(key, 0) + 1
        is_image = end is None and media.suffix.lower() in imgs
        samples.append(Sample(media, caption, is_image, key if n == 1 else f"{key}#{n}", end=end, extra=extra))
    return samples


_UNREADABLE: Any = object()  # a caption file that exists but cannot be decoded: the sample is left out


def _folder_caption(media: Path, candidates: list[Path], report: DataReport) -> Any:
    """The caption of `media` from the first of `candidates` that exists; None when none does,
    _UNREADABLE (reported) when it cannot be decoded."""
    txt = next((t for t in candidates if t.is_file()), candidates[0])
    try:
        return _read_caption(txt)
    except TextDecodeError as e:
        report.skip(
            txt, f"{e} (the caption of {media.name}, which is left out)",
            fix=f"or delete {txt.name} to train {media.name} without a caption",
        )  # fmt: skip
        return _UNREADABLE


def _resolve_row(entry: _Entry, resolver: _Resolver, base: Path, report: DataReport) -> tuple[Path, Path | None] | None:
    """(media, end image or None) of a metadata row; None (reported) when a file it names is missing."""
    where = entry.where
    if entry.pair:
        for ref, role, keys in ((entry.refs, "start", _START_KEYS), (entry.end_refs, "end", _END_KEYS)):
            if not ref:
                other = "end" if role == "start" else "start"
                report.skip(
                    where, f"names the {other} image of a pair but no {role} image",
                    fix=f"fill in the {' / '.join(keys)} column or delete the row",
                )  # fmt: skip
                return None
        start, end = resolver.resolve(entry.refs), resolver.resolve(entry.end_refs)
        for path, ref, role in ((start, entry.refs, "start"), (end, entry.end_refs, "end")):
            if path is None:
                report.skip(
                    ref, f"referenced at {where} as the {role} image of a pair but not found under {base}",
                    fix="fix the path or data.media_root",
                )  # fmt: skip
                return None
        assert start is not None and end is not None
        return start, end
    refs = entry.refs
    if not refs.strip():
        report.skip(where, "names no media file", fix="fill in the video/file column or delete the row")
        return None
    media = next((m for m in (resolver.resolve(r) for r in refs.split("\0")) if m is not None), None)
    if media is None:
        first = refs.split("\0")[0]
        report.skip(first, f"referenced at {where} but not found under {base}", fix="fix the path or data.media_root")
        return None
    return media, None


def _read_caption(txt: Path) -> str | None:
    if not txt.is_file():
        return None
    text = read_text(txt).strip()
    return text or None
