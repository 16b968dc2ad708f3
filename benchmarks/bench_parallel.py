"""Distributed LoRA training step: per-rank activation memory and step time against the Ulysses size K
and the data-parallel size, on whatever this machine has (CPU + gloo here; CUDA + NCCL with --device cuda).

    python benchmarks/bench_parallel.py                       # CPU, ~3 minutes on 2 cores
    python benchmarks/bench_parallel.py --tokens 4096 --iters 5
    python benchmarks/bench_parallel.py --device cuda --dim 3072 --heads 24 --layers 4 --tokens 27280

Each case spawns its processes (torch.multiprocessing, env init), builds one DiT bigger than the tiny
preset with LoRA on the default targets, applies `lora_core.distributed.parallelize` exactly as train.py does
and times forward + backward of a fixed per-data-parallel-rank batch of one sample.

Columns, per rank (the max over ranks):
  saved_MB   bytes autograd keeps for backward, beyond parameters: unique storages seen by
             torch.autograd.graph.saved_tensors_hooks during the forward (under activation
             checkpointing only what the checkpoints keep). With Ulysses the per-token part falls as 1/K;
             the replicated text context (text_len tokens through the cross-attention k/v) does not.
  param_MB   bytes of this rank's parameters (FSDP2 shards the frozen base over all ranks)
  rss_MB     peak resident set size of the process (everything: torch, model, buffers, allocator slack)
  step_ms    median wall time of one step, with spread; on a CPU shared by K processes it measures
             contention, not scaling (each process gets 1 thread; the machine may have fewer cores)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import summarize, write_results  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def saved_bytes_hooks(seen: dict[int, int]) -> torch.autograd.graph.saved_tensors_hooks:
    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _worker(rank: int, world: int, port: int, case: dict[str, Any], args: dict[str, Any], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args["threads"])
    from backbones.wan.dit import WanDiT, WanDiTConfig
    from lora_core import distributed as parallel
    from lora_core.inject import inject_lora
    cfg = WanDiTConfig(dim=args["dim"], ffn_dim=4 * args["dim"], num_heads=args["heads"], num_layers=args["layers"],
                       in_dim=16, out_dim=16, text_dim=64)
    info = parallel.init_distributed(case["ulysses"], cfg.num_heads)
    device = info.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        dit = WanDiT(cfg)
    dit.to_empty(device=device)
    torch.manual_seed(0)
    dit.init_weights()
    nn.init.xavier_uniform_(dit.head.head.weight)
    dit.to(dtype)
    inject_lora(dit, ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                      "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"], args["rank"], float(args["rank"]))
    model = parallel.parallelize(dit, dit.blocks, info, mode=case["mode"], gradient_checkpointing=case["ckpt"])
    # one sample per data-parallel rank; frames x (2h) x (2w) latents -> tokens = frames * h * w
    f, hw = args["frames"], args["hw"]
    g = torch.Generator().manual_seed(1 + info.dp_rank)
    x = torch.randn(1, 16, f, 2 * hw, 2 * hw, generator=g).to(device)
    t = torch.full((1,), 500.0, device=device)
    ctx = torch.randn(1, 64, 64, generator=g).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    params = [p for p in dit.parameters() if p.requires_grad]

    def step(seen: dict[int, int] | None) -> None:
        with amp, (saved_bytes_hooks(seen) if seen is not None else torch.autograd.graph.saved_tensors_hooks(
                lambda t: t, lambda t: t)):
            loss = model(x, t, ctx).float().pow(2).mean()
        loss.backward()
        for p in params:
            p.grad = None

    seen: dict[int, int] = {}
    step(seen)  # warm-up, and the saved-bytes count
    times = []
    for _ in range(args["iters"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        parallel.barrier(info)
        t0 = time.perf_counter()
        step(None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    local = sum((p.to_local() if parallel._is_dtensor(p) else p).nbytes for p in dit.parameters())
    row = {"saved_MB": sum(seen.values()) / 2**20, "param_MB": local / 2**20,
           "rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "step_ms": statistics.median(times) * 1e3, "times": times}
    if device.type == "cuda":
        row["peak_alloc_MB"] = torch.cuda.max_memory_allocated() / 2**20
    rows = [None] * world
    torch.distributed.all_gather_object(rows, row) if info.distributed else rows.__setitem__(0, row)
    if info.is_main:
        Path(out).write_text(json.dumps(rows))
    parallel.shutdown()


CASES = [  # (label, processes, ulysses, mode, activation checkpointing)
    ("single", 1, 1, "ddp", False),
    ("ulysses2", 2, 2, "ddp", False),
    ("ulysses4", 4, 4, "ddp", False),
    ("ddp2", 2, 1, "ddp", False),
    ("ddp4", 4, 1, "ddp", False),
    ("fsdp2", 2, 1, "fsdp", False),
    ("fsdp4", 4, 1, "fsdp", False),
    ("fsdp2_x_ulysses2", 4, 2, "fsdp", False),
    ("single_ckpt", 1, 1, "ddp", True),
    ("ulysses2_ckpt", 2, 2, "ddp", True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--frames", type=int, default=2, help="latent frames")
    ap.add_argument("--hw", type=int, default=32, help="patch grid height = width (latent size / 2)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES))
    a = ap.parse_args()
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the spawned ranks pick gloo + CPU
    args = vars(a)
    tokens = a.frames * a.hw * a.hw
    wanted = a.cases.split(",")
    rows: list[dict[str, Any]] = []
    base: dict[str, float] = {}
    for label, nproc, k, mode, ckpt in CASES:
        if label not in wanted or a.heads % k:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "rows.json")
            case = {"ulysses": k, "mode": mode, "ckpt": ckpt}
            t0 = time.perf_counter()
            mp.spawn(_worker, args=(nproc, free_port(), case, args, out), nprocs=nproc, join=True)
            per_rank = json.loads(Path(out).read_text())
        times = [t for r in per_rank for t in r["times"]]
        row = {"case": label, "procs": nproc, "dp": nproc // k, "ulysses": k, "mode": mode if nproc > 1 else "-",
               "ckpt": ckpt, "tokens/rank": tokens // k,
               **{key: max(r[key] for r in per_rank) for key in ("saved_MB", "param_MB", "rss_MB")},
               **{f"step_{k2}": v for k2, v in summarize(times).items() if k2 in ("median_ms", "p25_ms", "p75_ms")}}
        if "peak_alloc_MB" in per_rank[0]:
            row["peak_alloc_MB"] = max(r["peak_alloc_MB"] for r in per_rank)
        if not ckpt and nproc == 1:
            base = {"saved": row["saved_MB"], "param": row["param_MB"]}
        if base:
            row["saved_vs_single"] = row["saved_MB"] / base["saved"]
            row["param_vs_single"] = row["param_MB"] / base["param"]
        rows.append(row)
        print(f"{label:18s} saved {row['saved_MB']:8.1f} MB  params {row['param_MB']:7.1f} MB  rss "
              f"{row['rss_MB']:7.0f} MB  step {row['step_median_ms']:8.0f} ms  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    columns = ["case", "procs", "dp", "ulysses", "mode", "ckpt", "tokens/rank", "saved_MB", "saved_vs_single",
               "param_MB", "param_vs_single", "rss_MB", "step_median_ms", "step_p25_ms", "step_p75_ms"]
    if rows and "peak_alloc_MB" in rows[0]:
        columns.append("peak_alloc_MB")
    notes = (f"DiT dim {a.dim}, {a.heads} heads, {a.layers} layers, ffn {4 * a.dim}, text_len 512 (replicated), "
             f"LoRA rank {a.rank} on the 10 default targets, {tokens} video tokens per sample, one sample per "
             f"data-parallel rank, {a.threads} thread(s) per process. Memory columns are per rank (max over ranks). "
             + ("CPU + gloo: step times of several processes sharing this machine's cores measure contention, "
                "not speed-up; only the memory columns carry over to GPUs." if a.device == "cpu" else ""))
    json_path, md_path = write_results("parallel", a.device, rows, columns,
                                       config={k2: v for k2, v in args.items() if k2 != "cases"}, notes=notes)
    print(md_path.read_text())
    print(f"written {json_path} and {md_path}")


if __name__ == "__main__":
    main()
