"""What pretraining a tiny base takes, whatever the family: a seeded AdamW loop with a cosine schedule that
records its losses, and the record written beside the weights."""
from __future__ import annotations

import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def train_loop(name: str, params: Iterable[torch.nn.Parameter], loss_fn: Callable[[int], torch.Tensor], steps: int,
               lr: float, *, warmup: int = 50, weight_decay: float = 0.0, log_every: int = 100,
               clip: float = 1.0) -> dict[str, Any]:
    """`steps` AdamW steps of `loss_fn(step)` (which draws its own batch from a seeded generator), linear warm-up
    then cosine decay to lr/20; returns {"steps", "lr", "seconds", "first_loss", "final_loss"} (the final loss
    is the mean of the last 5% of steps)."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        frac = min(1.0, (step + 1) / max(1, warmup))
        decay = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps - 1)))
        for g in opt.param_groups:
            g["lr"] = lr * frac * decay
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            window = losses[-log_every:]
            log.info("%s step %d/%d loss %.5f (%.1f s)", name, step + 1, steps, sum(window) / len(window),
                     time.perf_counter() - start)
    tail = losses[-max(1, steps // 20):]
    return {"steps": steps, "lr": lr, "seconds": round(time.perf_counter() - start, 1),
            "first_loss": round(losses[0], 6), "final_loss": round(sum(tail) / len(tail), 6)}


def write_record(folder: str | Path, record: dict[str, Any]) -> Path:
    """`folder/pretraining.json`: how the weights beside it were made (command, seeds, steps, losses, machine)."""
    record = {**record, "torch": torch.__version__, "machine": platform.machine(),
              "threads": torch.get_num_threads()}
    path = Path(folder) / "pretraining.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
