"""Identity of files for cache keys: the sha256 of a media file's bytes, and a cheap stat-based
identity of model weights.

Hashing a 100 GB dataset on every start would cost minutes, so `ContentIndex` remembers
(resolved path, size, mtime_ns) -> sha256 in a small JSON file inside the cache folder: a file is
read again only when it changes or moves. A copied or moved dataset is hashed once more, keeps
its keys, and so re-encodes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from lora_core.atomic import atomic_write

logger = logging.getLogger(__name__)

INDEX_NAME = "content_index.json"
_INDEX_VERSION = 1
_FLUSH_EVERY_S = 10.0  # while hashing a large dataset, save progress this often (a crash keeps most of it)

_Stat = tuple[int, int]  # (size, mtime_ns)


def hash_file(path: Path) -> str:
    """sha256 hex digest of the bytes of `path`, read in chunks (clips can be GBs)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive lock across processes, best effort: where flock is missing or refused (some network
    filesystems), an unlocked write only risks losing another rank's entries, i.e. one more hash."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


class ContentIndex:
    """(resolved path, size, mtime_ns) -> sha256, stored in the JSON file `file`.

    Several processes (ranks) may share one index: `flush` merges with what is on disk under a
    lock, and a lookup that misses first re-reads the file if another process has written it.
    """

    def __init__(self, file: str | Path) -> None:
        self.file = Path(file)
        self.hashed = 0  # files read in this process, for logs and tests
        self._entries: dict[str, list] = {}  # resolved path -> [size, mtime_ns, sha256]
        self._pending: dict[str, list] = {}  # entries not yet written to `file`
        self._disk_sig: tuple[int, int, int] | None = None  # stat of `file` when last read
        self._last_flush = time.monotonic()
        self._loaded = False

    def sha256(self, path: str | Path) -> str:
        """Content hash of `path`; raises FileNotFoundError naming it if it does not exist."""
        p = Path(path).expanduser()
        try:
            resolved = p.resolve(strict=True)
            st = resolved.stat()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"cannot identify {p}: the file does not exist (moved or deleted?)") from e
        name, sig = str(resolved), (st.st_size, st.st_mtime_ns)
        if not self._loaded:
            self._load()
        hit = self._lookup(name, sig)
        if hit is None and self._disk_changed():
            self._load()  # another rank may have hashed it meanwhile
            hit = self._lookup(name, sig)
        if hit is not None:
            return hit
        digest = hash_file(resolved)
        self.hashed += 1
        after = resolved.stat()
        # A file rewritten while we read it has no trustworthy hash to remember under either stat.
        if (after.st_size, after.st_mtime_ns) == sig:
            self._entries[name] = self._pending[name] = [*sig, digest]
        if time.monotonic() - self._last_flush > _FLUSH_EVERY_S:
            self.flush()
        return digest

    def _lookup(self, name: str, sig: _Stat) -> str | None:
        e = self._entries.get(name)
        return e[2] if e is not None and (e[0], e[1]) == sig else None

    def _sig(self) -> tuple[int, int, int] | None:
        try:
            st = self.file.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _disk_changed(self) -> bool:
        return self._sig() != self._disk_sig

    def _read_disk(self) -> dict[str, list]:
        """Entries on disk; an unreadable or foreign index counts as empty (it only saves hashing)."""
        try:
            raw = json.loads(self.file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning("content index %s is unreadable (%s); files will be hashed again", self.file, e)
            return {}
        if not isinstance(raw, dict) or raw.get("version") != _INDEX_VERSION or not isinstance(raw.get("files"), dict):
            return {}
        return {
            k: v
            for k, v in raw["files"].items()
            if isinstance(v, list) and len(v) == 3 and isinstance(v[0], int) and isinstance(v[1], int)
        }

    def _load(self) -> None:
        sig = self._sig()
        disk = self._read_disk()
        self._entries = {**disk, **self._pending}  # our unsaved hashes are at least as new
        self._disk_sig, self._loaded = sig, True

    def flush(self) -> None:
        """Write the new entries (merged with what other processes wrote); never raises on I/O errors,
        since a lost index only costs hashing again."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with _locked(self.file.with_name(self.file.name + ".lock")):
                merged = {**self._read_disk(), **self._pending}
                text = json.dumps({"version": _INDEX_VERSION, "files": merged})
                atomic_write(self.file, lambda tmp: tmp.write_text(text, encoding="utf-8"))  # never half an index
                self._disk_sig = self._sig()
        except OSError as e:
            logger.warning("cannot save the content index %s (%s); files will be hashed again next run", self.file, e)
            return
        self._entries, self._pending = merged, {}


def path_identity(paths: Sequence[str | Path]) -> str:
    """Identity of model weights, for encoder ids: (relative name, size, mtime_ns) of every file
    under the given files and folders, hashed. Reads no file, so multi-GB checkpoints cost a stat.

    Hidden entries (.git, download locks) are left out: they change without the weights changing.
    Raises FileNotFoundError naming a path that does not exist.
    """
    if isinstance(paths, (str, Path)):
        raise ValueError(f"path_identity takes a list of paths, got the single path {paths!r}; pass [{paths!r}]")
    if not paths:
        raise ValueError("path_identity needs at least one weights file or folder, got an empty list")
    rows: list[list] = []
    for n, given in enumerate(paths):
        root = Path(given).expanduser()
        if not root.exists():
            raise FileNotFoundError(
                f"cannot identify model weights at {root}: no such file or folder; check the checkpoint path"
            )
        if root.is_file():
            st = root.stat()
            rows.append([n, root.name, st.st_size, st.st_mtime_ns])
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):  # HF snapshots are symlinks
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(f for f in filenames if not f.startswith(".")):
                f = Path(dirpath, fn)
                st = f.stat()
                rows.append([n, f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
