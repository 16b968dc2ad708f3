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


# -- kernel floor: the heavy kernels of a step, replayed alone ----------------------------------------

_HEAVY = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention_for_cpu",
          "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_efficient_attention",
          "_scaled_dot_product_efficient_attention_backward", "_flash_attention_forward", "_flash_attention_backward",
          "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward")


class _TensorSpec(tuple):
    """(shape, stride, dtype, device) of a tensor argument seen while recording."""


def record_kernels(fn: Callable[[], Any]) -> list[tuple[Any, tuple, dict]]:
    """The GEMM, convolution and attention kernels (aten ops in `_HEAVY`) that fn() dispatches, forward and
    backward, in order, with each tensor argument reduced to its layout."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: list[tuple[Any, tuple, dict]] = []

    def spec(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return _TensorSpec((tuple(a.shape), a.stride(), a.dtype, a.device))
        return a

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.overloadpacket.__name__ in _HEAVY:
                calls.append((func, tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}))
            return func(*args, **kwargs)

    with _Recorder():
        fn()
    return calls


def without_dim(calls: Sequence[tuple[Any, tuple, dict]], dim: int) -> list[tuple[Any, tuple, dict]]:
    """The recorded calls none of whose tensor arguments has a dimension of size `dim` (pass the LoRA rank:
    what is left is the frozen model's own work)."""
    return [c for c in calls if not any(isinstance(a, _TensorSpec) and dim in a[0] for a in c[1])]


def kernel_signature(calls: Sequence[tuple[Any, tuple, dict]]) -> list[str]:
    """Sorted op + shapes of recorded calls: equal lists mean two models run the same heavy kernels."""
    return sorted(f"{f.overloadpacket.__name__}{[a[0] for a in args if isinstance(a, _TensorSpec)]}"
                  for f, args, _ in calls)


def gemm_gflop(calls: Sequence[tuple[Any, tuple, dict]]) -> float:
    """GFLOP of the recorded mm/addmm calls (2 M N K each); attention and convolutions not counted."""
    total = 0
    for f, args, _ in calls:
        mats = [a[0] for a in args if isinstance(a, _TensorSpec) and len(a[0]) == 2]
        if f.overloadpacket.__name__ in ("mm", "addmm", "addmm_") and len(mats) >= 2:
            (m, k), (_, n) = mats[-2], mats[-1]
            total += 2 * m * n * k
    return total / 1e9


def replay_kernels(calls: Sequence[tuple[Any, tuple, dict]], seed: int = 0) -> Callable[[], None]:
    """A function that runs the recorded kernels again, alone and in order, on random tensors of the recorded
    layouts (inputs made once, up front; outputs allocated by each call as in the real step). An attention
    backward gets the output and log-sum-exp of a real forward on its inputs, so its exponentials stay finite."""
    g = torch.Generator().manual_seed(seed)
    cache: dict[tuple, torch.Tensor] = {}

    def make(s: _TensorSpec, tag: Any = None) -> torch.Tensor:
        shape, stride, dtype, device = s
        key = (shape, stride, dtype, device, tag)
        if key not in cache:
            # a flat storage of the layout's extent viewed with its strides (broadcast strides of 0 included)
            n = 1 + sum((d - 1) * st for d, st in zip(shape, stride)) if all(shape) else 0
            flat = torch.randn(n, generator=g) if dtype.is_floating_point else torch.zeros(n, dtype=dtype)
            cache[key] = flat.to(device=device, dtype=dtype).as_strided(shape, stride)
        return cache[key]

    prepared = []
    for func, args, kwargs in calls:
        name = func.overloadpacket.__name__
        real = [make(a, i) if isinstance(a, _TensorSpec) else a for i, a in enumerate(args)]
        if name.endswith("_backward") and "attention" in name:  # (grad, q, k, v, out, lse, ...)
            with torch.no_grad():
                real[4:6] = getattr(torch.ops.aten, name.removesuffix("_backward"))(*real[1:4])[:2]
        prepared.append((func, tuple(real), {k: make(v) if isinstance(v, _TensorSpec) else v
                                             for k, v in kwargs.items()}))

    def run() -> None:
        with torch.no_grad():
            for func, args, kwargs in prepared:  # in-place ones (addmm_) accumulate into their cached input
                func(*args, **kwargs)

    return run
