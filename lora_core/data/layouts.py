"""Finding (media, caption) pairs: folders with .txt captions, prompts.txt + videos.txt, CSV, JSON(L).

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from lora_core.data.config import DataConfig

logger = logging.getLogger(__name__)

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
# UTF-32 first: its little-endian mark begins with UTF-16's.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"), (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)  # fmt: skip


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
        entries, base_dir, layout = _scan_folder(root, vids | imgs, report)
    samples = _resolve_entries(entries, base or base_dir, vids, imgs, report, root)
    if not samples:
        n_skip = len(report.skipped)
        skipped = f"; {n_skip} referenced file(s) were missing or skipped (see warnings)" if n_skip else ""
        raise ValueError(f"no usable clips or images found in {root} (read as: {layout}){skipped}.\n{ACCEPTED_LAYOUTS}")
    for s in samples:
        if captions and s.caption is None:
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


def _scan_folder(
    root: Path, media: frozenset[str], report: DataReport
) -> tuple[list[_Entry] | list[Path], Path, str]:
    pair = _cogvideo_pair(root)
    if pair is not None:
        return _read_cogvideo(*pair), root, f"{pair[0].name} + {pair[1].name}"
    meta = _find_metadata(root, report)
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
    return [(v.strip(), p.strip() or None, f"{videos.name}:{i + 1}") for i, (p, v) in enumerate(zip(p_lines, v_lines))]


def _find_metadata(root: Path, report: DataReport) -> Path | None:
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
        except TextDecodeError as e:
            # Not silently: this may be the metadata the user meant, but it may also be an unrelated table.
            report.warn(p, "decode", f"{e}; not read as dataset metadata", strict_error=str(e))
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
    text = read_text(f)
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
            media, txt = entry, entry.with_suffix(".txt")
            try:
                caption = _read_caption(txt)
            except TextDecodeError as e:
                report.skip(
                    txt, f"{e} (the caption of {media.name}, which is left out)",
                    fix=f"or delete {txt.name} to train {media.name} without a caption",
                )  # fmt: skip
                continue
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
    text = read_text(txt).strip()
    return text or None
