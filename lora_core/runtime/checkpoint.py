"""Training checkpoints: `OUTPUT/checkpoints/step-N/`, written atomically, the last K kept.

A checkpoint holds the LoRA (safetensors), the optimizer and scheduler states, the step, the data
position and the RNG states, so a killed run resumes exactly. Optimizer states are torch tensors
saved with torch.save and read back with weights_only=True.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """`latest` -> newest complete checkpoint under root (None if there is none); else a path."""
    if resume == "latest":
        ckpts = list_checkpoints(root)
        return ckpts[-1] if ckpts else None
    p = Path(resume)
    if not (p / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected a step-N folder with "
                                f"state.json, or 'latest')")
    return p


def save_checkpoint(root: str | Path, step: int, files: dict[str, Any], state: dict[str, Any],
                    keep_last: int = 2) -> Path:
    """Write `root/step-N/` atomically: a temp folder renamed into place, then prune old ones.

    files: name -> callable(path) that writes the file (e.g. the LoRA), or a picklable tensor dict.
    state: JSON-serializable run state (step, data position, config...)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, content in files.items():
        if callable(content):
            content(tmp / name)
        else:
            torch.save(content, tmp / name)
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "state.json").read_text())


def load_tensors(path: str | Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)
