"""Time and peak memory of one Wan LoRA training step (forward, backward, AdamW step).

    python benchmarks/bench_train_step.py                      # CPU: the tiny preset at a few sizes
    python benchmarks/bench_train_step.py --device cuda        # GPU: the 5b preset, random weights,
                                                               # 704x1280 x 49 and x 121 frames, grad ckpt
Random weights stand in for the checkpoint (same shapes, so the same time and memory); latents and
text encodings are random tensors of the real shapes, so no VAE or text encoder runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones.registry import get_backbone  # noqa: E402
from benchmarks.common import summarize, sync, write_results  # noqa: E402
from backbones.spec import Batch  # noqa: E402
from lora_core.inject import inject_lora, lora_parameters  # noqa: E402
from lora_core.distributed import apply_activation_checkpointing  # noqa: E402


def saved_bytes(fn) -> int:
    """Bytes of tensors autograd keeps for backward during fn() (activation memory, any device)."""
    total = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()
    return total


def run_case(preset: str, frames: int, height: int, width: int, grad_ckpt: bool, device: torch.device,
             iters: int, warmup: int, rank: int) -> dict:
    spec = get_backbone("wan_ti2v")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dit = spec.random_dit(preset, device, dtype)
    inject_lora(dit, list(spec.default_targets), rank=rank, alpha=rank)
    if grad_ckpt:
        apply_activation_checkpointing(dit.blocks)
    opt = torch.optim.AdamW(lora_parameters(dit), lr=1e-4)
    z = dit.config.in_dim
    lat = torch.randn(1, z, (frames - 1) // 4 + 1, height // 16, width // 16, device=device)
    ctx = [torch.randn(64, dit.config.text_dim, device=device)]
    cfg = spec.objective_config(preset)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def loss_fn() -> torch.Tensor:
        with amp:
            return spec.training_loss({"dit": dit}, Batch({"latents": [lat[0]], "context": ctx}, [{}], [0]), cfg)

    def step() -> None:
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    act = saved_bytes(loss_fn)
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    import time
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    tokens = lat.shape[2] * lat.shape[3] * lat.shape[4] // 4
    row = {"preset": preset, "frames": frames, "size": f"{height}x{width}", "tokens": tokens,
           "grad_ckpt": grad_ckpt, "rank": rank, **{k: v for k, v in summarize(times).items()
                                                    if k in ("median_ms", "p25_ms", "p75_ms")},
           "saved_act_mb": act / 2**20}
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--cases", default=None, help="preset:frames:HxW:ckpt,... e.g. 5b:49:704x1280:1")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.cases:
        cases = []
        for c in args.cases.split(","):
            p, f, hw, ck = c.split(":")
            h, w = hw.split("x")
            cases.append((p, int(f), int(h), int(w), ck == "1"))
    elif device.type == "cuda":
        cases = [("5b", 49, 704, 1280, True), ("5b", 121, 704, 1280, True)]
    else:
        cases = [("tiny", 17, 64, 64, False), ("tiny", 49, 256, 256, False), ("tiny", 49, 256, 256, True)]
    iters = args.iters or (5 if device.type == "cuda" else 10)
    rows = []
    for case in cases:
        row = run_case(*case, device=device, iters=iters, warmup=2, rank=args.rank)
        print(row, flush=True)
        rows.append(row)
    cols = ["preset", "frames", "size", "tokens", "grad_ckpt", "rank", "median_ms", "p25_ms", "p75_ms",
            "saved_act_mb"] + (["peak_mem_gb"] if device.type == "cuda" else [])
    notes = ("saved_act_mb: bytes autograd keeps for backward in one step's forward (measured with "
             "saved_tensors_hooks). Random weights of the preset's exact shapes; one sample per step.")
    if device.type != "cuda":
        notes += (" Measured on CPU: the 5b preset at 704x1280 needs a GPU; no GPU numbers are estimated "
                  "here.")
    paths = write_results("train_step", device, rows, cols, {"iters": iters, "lora_rank": args.rank}, notes)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
