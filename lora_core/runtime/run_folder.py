"""One run per output folder: a new run never mixes with an old one, two runs never share a folder at the same
time, and a resumed run continues the run it finds (or is refused, naming what changed).
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any, IO

from . import checkpoint as ckpt

LOCK_FILE = ".run.lock"
# what a run leaves behind; a folder holding only the cache, the sample data or config.yaml (--cache-only) is free
RUN_MARKERS = ("metrics.jsonl", "lora.safetensors")


def holds_run(out: Path) -> list[str]:
    """What in `out` shows that a run trained there (empty: nothing)."""
    found = [name for name in RUN_MARKERS if (out / name).is_file() and (out / name).stat().st_size > 0]
    if ckpt.list_checkpoints(out / "checkpoints"):
        found.append("checkpoints/")
    return found


class RunLock:
    """An exclusive lock on the output folder for the run's lifetime (flock: released by the OS when the process
    dies, so a killed run never leaves a stale lock). The holder's pid, host and start time are written inside,
    so a second run can name it."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self.file: IO[str] | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ValueError(f"output folder {self.path.parent} is in use by a running training ({holder}); wait "
                             "for it to finish, or give this run another --output") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        f.flush()
        self.file = f
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def check_fresh(out: Path, resume: str | None) -> None:
    """A run without --resume into a folder that holds a run is refused (its checkpoints would mix with, and be
    pruned by, the old run's), naming both ways out."""
    if resume:
        return
    found = holds_run(out)
    if found:
        raise ValueError(f"output folder {out} already holds a run ({', '.join(found)}); continue it with "
                         "--resume latest, or start a new run in another --output")


# config keys whose change makes a checkpoint mean something else: refused on resume
SHAPE_KEYS = ("model.backbone", "model.preset", "lora.rank", "lora.targets", "lora.exclude", "lora.rank_pattern",
              "components")
SCALE_KEYS = ("lora.alpha", "lora.alpha_pattern", "lora.use_rslora")


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(shape changes, scale changes) between a checkpoint's config and this run's, as 'key: old -> new'."""
    def diff(keys: tuple[str, ...]) -> list[str]:
        return [f"{k}: {_get(saved, k)!r} -> {_get(now, k)!r}" for k in keys if _get(saved, k) != _get(now, k)]
    return diff(SHAPE_KEYS), diff(SCALE_KEYS)


def check_resume_config(saved: dict[str, Any], now: dict[str, Any], source: Path) -> None:
    shape, scale = config_changes(saved, now)
    if shape:
        raise ValueError(f"--resume {source}: the trained tensors' shapes were fixed by the run's config, and this "
                         f"run changes {'; '.join(shape)}; resume with the values the run started with, or start a "
                         "new run in another --output")
    if scale:
        raise ValueError(f"--resume {source}: this run changes the LoRA scale ({'; '.join(scale)}), which would "
                         "leave the saved alpha disagreeing with the trained tensors; resume with the values the run "
                         "started with, or start a new run in another --output")
