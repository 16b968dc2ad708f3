"""The one atomic file writer: every file the engine writes (LoRAs, checkpoints, cache entries, merged models,
videos) goes through it, so readers see the old file or the whole new one, never half of one, and the file gets
the permissions the user's umask gives a new file (0644 by default), not the 0600 of a temporary file.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

_UMASK: int | None = None


def _umask() -> int:
    global _UMASK
    if _UMASK is None:  # reading the umask means setting it; do it once per process
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def new_file_mode() -> int:
    return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` to write a temporary file beside `path`, then rename it into place (os.replace).
    The temporary file is removed if `write` fails (or is interrupted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_folder(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a folder through `write(tmp_folder)`, then rename it into place (replacing an old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
