"""Training checkpoints: `OUTPUT/checkpoints/step-N/`, written atomically, the last K kept.

A checkpoint holds the LoRA (safetensors), the optimizer and scheduler states, the step, the data
position and the RNG states, so a killed run resumes exactly. Optimizer states are torch tensors
saved with torch.save and read back with weights_only=True.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_folder, atomic_write

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]),
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints (a step-N folder holding state.json) under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def sweep_leftovers(root: str | Path) -> list[Path]:
    """Remove what a killed writer leaves behind: temporary `.step-N.*.tmp` folders and step-N folders without
    state.json (killed while pruning). Returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    gone = []
    for p in root.iterdir():
        if p.is_dir() and ((p.name.startswith(".step-") and ".tmp" in p.name)
                           or (_STEP_DIR.match(p.name) and not (p / "state.json").is_file())):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def check_checkpoint(path: Path, files: tuple[str, ...]) -> None:
    """ValueError naming the first file of checkpoint `path` that is missing or unreadable."""
    try:
        load_state(path)
        for name in files:
            f = path / name
            if not f.is_file():
                raise ValueError(f"checkpoint file {f} is missing")
            if f.suffix == ".safetensors":
                load_safetensors(f)
            else:
                load_tensors(f)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 (any decoding failure means a damaged file)
        raise ValueError(f"checkpoint {path} is damaged: {e}") from e


def resolve_resume(resume: str, root: str | Path, files: tuple[str, ...] = ()) -> Path | None:
    """`latest` -> the newest intact checkpoint under root (None if there is none; damaged newer ones are
    reported and passed over); else that checkpoint path, which must be intact."""
    if resume == "latest":
        for p in reversed(list_checkpoints(root)):
            try:
                check_checkpoint(p, files)
                return p
            except ValueError as e:
                log.warning("%s; falling back to the checkpoint before it", e)
        return None
    p = Path(resume)
    if not (p / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected a step-N folder with "
                                f"state.json, or 'latest')")
    check_checkpoint(p, files)
    return p


def save_checkpoint(root: str | Path, step: int, files: dict[str, Any], state: dict[str, Any],
                    keep_last: int = 2) -> Path:
    """Write `root/step-N/` atomically (a temporary folder renamed into place), then prune old ones.

    files: name -> callable(path) that writes the file (e.g. the LoRA), or a tensor dict (torch.save, read back
    with weights_only=True). state: JSON-serializable run state (step, data position, config...)."""
    root = Path(root)

    def write(tmp: Path) -> None:
        for name, content in files.items():
            if callable(content):
                content(tmp / name)
            else:
                torch.save(content, tmp / name)
        (tmp / "state.json").write_text(json.dumps(state, indent=1))

    final = atomic_folder(root / f"step-{step}", write)
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            # state.json first: a kill mid-prune leaves a folder that list_checkpoints ignores and the sweep removes
            (old / "state.json").unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
    sweep_leftovers(root)
    return final


def load_state(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "state.json"
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint file {f} is unreadable ({e})") from e


def load_tensors(path: str | Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (zip, pickle and I/O errors all mean the same here)
        raise ValueError(f"checkpoint file {path} is unreadable ({type(e).__name__}: {e})") from e


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file, written atomically."""
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=metadata))


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 (SafetensorError, OSError)
        raise ValueError(f"checkpoint file {path} is unreadable ({e})") from e
