"""On-disk cache of encoded features (VAE latents, text embeddings): one safetensors file per entry.

Media and text are separate entries with separate keys, so editing a caption or the trigger word
re-runs only the text encoder, never the VAE:
  media key = sha256 of the file's bytes + preprocessing plan (frames, resize, crop, bucket) + encoder id
              (a start/end pair: the start image's bytes; the plan carries the end image's and any
              sidecar file's content hash, `VideoDataset.preprocess_params`)
  text key  = the text + encoder id
Both include CACHE_FORMAT. Keys never contain a path or a timestamp, so copying or moving the
dataset or the cache keeps every entry valid; nothing ever has to be deleted by hand.

Reading tells corruption from trouble: an entry that is not a safetensors file, is truncated, or
whose header names another key or format is removed and recomputed; an I/O error (EIO, EACCES)
deletes nothing: the read is retried once, then an OSError names the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from lora_core.atomic import atomic_write
from lora_core.data import Sample

from .identity import INDEX_NAME, ContentIndex

logger = logging.getLogger(__name__)

CACHE_FORMAT = "2"  # bump when the key recipe or file layout changes; old entries then miss
_KEY_META, _FMT_META, _USER_META = "lora_core.key", "lora_core.format", "lora_core.meta"
_KEY_RE = re.compile(r"[0-9A-Za-z_-]{1,128}")  # a file name: no separators, no leading dot (temp files)
_MAX_HEADER = 100_000_000  # safetensors' own limit; a larger length field means garbage
_RETRY_DELAY_S = 0.5  # before the one retry of a failed read (NFS hiccups, a busy disk)


class CorruptEntry(ValueError):
    """The bytes of a cache entry cannot be what `put` wrote."""


def _read_entry(path: Path, header_only: bool) -> tuple[bytes, os.stat_result]:
    """The entry's bytes (only the 8-byte length and the JSON header if `header_only`) and its stat.

    The one place that touches the disk when reading, so I/O errors surface here as OSError.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not header_only:
            return f.read(), st
        head = f.read(8)
        if len(head) == 8 and int.from_bytes(head, "little") <= _MAX_HEADER:
            head += f.read(int.from_bytes(head, "little"))
        return head, st


def _parse_header(data: bytes, file_size: int, key: str) -> dict[str, Any]:
    """The safetensors header of an entry written by `put` for `key`; raises CorruptEntry otherwise."""
    if len(data) < 8:
        raise CorruptEntry(f"{file_size} bytes, shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > _MAX_HEADER or 8 + n > file_size or 8 + n > len(data):
        raise CorruptEntry(f"header length {n} does not fit a {file_size}-byte file: not a safetensors file")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptEntry(f"unreadable header ({e})") from e
    if not isinstance(header, dict):
        raise CorruptEntry("header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CorruptEntry("header metadata is not a JSON object")
    got = (meta.get(_KEY_META), meta.get(_FMT_META))
    if got != (key, CACHE_FORMAT):
        raise CorruptEntry(f"header names key {got[0]!r} format {got[1]!r}, expected {key!r} {CACHE_FORMAT!r}")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise CorruptEntry(f"malformed tensor table ({e})") from e
    if 8 + n + end != file_size:
        raise CorruptEntry(f"truncated or padded: the header describes {8 + n + end} bytes, the file has {file_size}")
    return header


def _json_blob(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str).encode()


class FeatureCache:
    """Entries under `dir`, one `<key[:2]>/<key>.safetensors` each, plus the content index of media files.

    The cache is not tied to an encoder: the encoder id is part of every key, so one folder can
    hold the features of several models side by side.
    """

    def __init__(self, dir: str | Path) -> None:
        self.dir = Path(dir).expanduser()
        self._index = ContentIndex(self.dir / INDEX_NAME)

    # ------------------------------------------------------------------ keys

    @staticmethod
    def _check_encoder_id(encoder_id: str) -> None:
        if not isinstance(encoder_id, str) or not encoder_id:
            raise ValueError(
                f"encoder_id={encoder_id!r} is invalid: expected a non-empty string naming the encoder and its "
                "weights, e.g. f'wan2.2-vae@{path_identity([vae_file])}'"
            )

    def media_key(self, sample: Sample, preprocess: Mapping[str, Any], encoder_id: str) -> str:
        """Key of the media features of `sample` read with plan `preprocess` (no caption in it).

        Hashes the file's bytes the first time it is seen at this (path, size, mtime); raises
        FileNotFoundError naming the file when it is gone.
        """
        self._check_encoder_id(encoder_id)
        if "caption" in preprocess:
            raise ValueError(
                f"media_key got a preprocess plan with a caption ({preprocess['caption']!r}); media features "
                "must not depend on the text: pass dataset.preprocess_params(i, include_caption=False)"
            )
        blob = {
            "format": CACHE_FORMAT,
            "kind": "media",
            "encoder": encoder_id,
            "sha256": self._index.sha256(sample.path),
            "preprocess": dict(preprocess),
        }
        return hashlib.sha256(_json_blob(blob)).hexdigest()[:40]

    def text_key(self, text: str, encoder_id: str) -> str:
        """Key of the text-encoder features of `text` (the final caption: trigger applied)."""
        self._check_encoder_id(encoder_id)
        if not isinstance(text, str):
            raise ValueError(f"text_key needs a str, got {type(text).__name__} {text!r}")
        blob = {"format": CACHE_FORMAT, "kind": "text", "encoder": encoder_id, "text": text}
        return hashlib.sha256(_json_blob(blob)).hexdigest()[:40]

    def flush(self) -> None:
        """Save newly computed content hashes (the build functions and `media_keys` call this)."""
        self._index.flush()

    @property
    def files_hashed(self) -> int:
        """Media files read to compute their hash in this process (0 when the index knew them all)."""
        return self._index.hashed

    # ------------------------------------------------------------------ entries

    def path_for(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(
                f"cache key {key!r} is invalid: expected 1-128 characters of [0-9A-Za-z_-], e.g. from media_key"
            )
        return self.dir / key[:2] / f"{key}.safetensors"  # 256 sub-folders keep directories small

    def _read(self, path: Path, header_only: bool) -> tuple[bytes, os.stat_result] | None:
        """`_read_entry` with one retry; None if the file does not exist. Never deletes anything."""
        for attempt in (1, 2):
            try:
                return _read_entry(path, header_only)
            except FileNotFoundError:
                return None
            except OSError as e:
                if attempt == 1:
                    logger.warning("reading cache entry %s failed (%s); retrying once", path, e)
                    time.sleep(_RETRY_DELAY_S)
                    continue
                raise OSError(
                    e.errno,
                    f"cannot read cache entry {path} ({e.strerror or e}), also on retry; the entry was left in "
                    f"place. Check the disk and the permissions of {self.dir}, or set train.cache_dir elsewhere",
                ) from e
        raise AssertionError("unreachable")

    def _drop_corrupt(self, path: Path, st: os.stat_result, why: str) -> None:
        try:
            now = path.stat()
        except FileNotFoundError:
            return  # another rank removed it already
        if (now.st_ino, now.st_size, now.st_mtime_ns) != (st.st_ino, st.st_size, st.st_mtime_ns):
            return  # replaced by a fresh `put` since we read it: not ours to delete
        logger.warning("cache entry %s is corrupt (%s); removed, it will be recomputed", path, why)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:  # the next put replaces it anyway
            logger.warning("cannot remove the corrupt cache entry %s: %s", path, e)

    def _header(self, key: str) -> dict[str, Any] | None:
        path = self.path_for(key)
        raw = self._read(path, header_only=True)
        if raw is None:
            return None
        data, st = raw
        try:
            return _parse_header(data, st.st_size, key)
        except CorruptEntry as e:
            self._drop_corrupt(path, st, str(e))
            return None

    def has(self, key: str) -> bool:
        """Whether a sound entry exists; reads the header only (a truncated file still counts as missing)."""
        return self._header(key) is not None

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The cached tensors, or None when missing or corrupt (a corrupt entry is reported and removed).

        Raises OSError naming the file when it cannot be read twice in a row.
        """
        path = self.path_for(key)
        raw = self._read(path, header_only=False)
        if raw is None:
            return None
        data, st = raw
        try:
            _parse_header(data, st.st_size, key)
            return load_bytes(data)
        except (CorruptEntry, SafetensorError) as e:
            self._drop_corrupt(path, st, str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None

    def metadata(self, key: str) -> dict[str, Any] | None:
        """The metadata given to `put`, or None when the entry is missing or corrupt."""
        header = self._header(key)
        return None if header is None else json.loads(header["__metadata__"].get(_USER_META, "{}"))

    def put(self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> Path:
        """Write an entry atomically (a temporary file in the same folder, then os.replace); return its path."""
        path = self.path_for(key)
        if not isinstance(tensors, Mapping) or not tensors:
            got = "an empty mapping" if isinstance(tensors, Mapping) else type(tensors).__name__
            raise ValueError(f"refusing to cache {got} for key {key}: expected a non-empty name -> tensor mapping")
        bad = {k: type(v).__name__ for k, v in tensors.items() if not isinstance(v, torch.Tensor)}
        bad.update({repr(k): "a non-str name" for k in tensors if not isinstance(k, str)})
        if bad:
            raise ValueError(f"cache entries hold str -> torch.Tensor; for key {key} these are not: {bad}")
        # clone: slices of a batch share storage, which safetensors refuses to save.
        data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        header = {
            _KEY_META: key,
            _FMT_META: CACHE_FORMAT,
            _USER_META: json.dumps(dict(metadata or {}), sort_keys=True, default=str),
        }
        # readers (other ranks) see the old entry or the whole new one, never half
        atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=header))
        return path
