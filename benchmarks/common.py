"""Shared helpers for benchmark scripts: timing, machine description, JSON + markdown results.

Machines here are noisy (shared cores), so scripts time their variants round-robin in one process
(`time_round_robin`) and report each as a ratio to a baseline measured in the same rounds.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times_s: Sequence[float]) -> dict[str, float]:
    """Median and spread (interquartile range, min, max) in milliseconds."""
    ms = sorted(t * 1e3 for t in times_s)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "p25_ms": q[0], "p75_ms": q[2], "min_ms": ms[0],
            "max_ms": ms[-1], "n": len(ms)}


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_round_robin(fns: dict[str, Callable[[], Any]], iters: int, warmup: int,
                     device: torch.device | str, before: dict[str, Callable[[], Any]] | None = None,
                     clock: str = "wall") -> dict[str, list[float]]:
    """Times each fn `iters` times, interleaved (round r runs every fn once), after `warmup` rounds.

    Interleaving spreads a noisy neighbour over all variants instead of penalizing whichever ran during
    the burst. `before[name]` runs untimed before each call (e.g. dropping .grad).
    clock="cpu" measures process CPU time: with one thread (torch.set_num_threads(1)) it ignores time
    spent descheduled by other processes, the most stable CPU measure on a shared machine; with more
    threads it also counts OpenMP spin-waiting, so use wall time there. CUDA always uses wall time."""
    before = before or {}
    now = CLOCKS["wall"] if torch.device(device).type == "cuda" else CLOCKS[clock]
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + iters):
        for name, fn in fns.items():
            if name in before:
                before[name]()
            sync(device)
            t0 = now()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(now() - t0)
    return times


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str) -> dict[str, Any]:
    dev = torch.device(device)
    info: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    return info


def device_tag(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev).lower().replace("nvidia", "").strip().replace(" ", "-")
    return "cpu"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, device: torch.device | str, rows: Sequence[dict[str, Any]],
                  columns: Sequence[str], config: dict[str, Any], notes: str = "",
                  out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Writes <out_dir>/<name>_<device>_<date>.json and .md; returns both paths."""
    info = machine_info(device)
    stem = f"{name}_{device_tag(device)}_{_dt.date.today().isoformat()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps({"name": name, "machine": info, "config": config, "rows": list(rows)},
                                    indent=1, default=str))
    header = [f"# {name}", "",
              f"{info['date']} · torch {info['torch']} · {info.get('gpu', info['cpu'])} · "
              f"{info['torch_threads']} threads · device {info['device']}", "",
              "config: " + ", ".join(f"{k}={v}" for k, v in config.items()), ""]
    md_path.write_text("\n".join(header) + markdown_table(rows, columns) + "\n" + (f"\n{notes}\n" if notes else ""))
    return json_path, md_path
