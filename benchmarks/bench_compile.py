"""Eager vs `torch.compile`d repeated blocks (`parallelize(..., compile=True)`) for one LoRA training step
(forward + backward + AdamW on the LoRA parameters) of the Wan DiT, with and without activation checkpointing.

    python benchmarks/bench_compile.py                        # CPU inductor, tiny preset, ~4 minutes on 2 cores
    python benchmarks/bench_compile.py --tokens 512 --iters 20
    python benchmarks/bench_compile.py --device cuda --preset tiny --tokens 4096

Every variant is built from the same seed, parallelized exactly as train.py does (single process) and timed
interleaved with the others (`time_round_robin`, median after warm-up). compile_s is the first step of a
compiled variant minus its median step: dynamo capture + AOTAutograd + inductor codegen (cold unless the
inductor cache under /tmp already holds these graphs; `--fresh-cache` points it at an empty dir).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import summarize, sync, time_round_robin, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--frames", type=int, default=8, help="latent frames (tokens = frames * h/2 * w/2)")
    ap.add_argument("--hw", type=int, default=8, help="latent height = width")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh-cache", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.fresh_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_bench_")
    torch.set_num_threads(args.threads)
    from backbones.registry import get_backbone
    from lora_core.distributed import DistInfo, parallelize
    from lora_core.inject import inject_lora, lora_parameters

    dev = torch.device(args.device)
    spec = get_backbone("wan_ti2v")
    torch.manual_seed(0)
    base = spec.random_dit(args.preset, dtype=torch.float32).to(dev)
    inject_lora(base, list(spec.default_targets), 16, 16.0)
    with torch.no_grad():
        for p in lora_parameters(base):
            p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, args.frames, args.hw, args.hw, generator=g).to(dev)
    t = (torch.rand(1, args.frames * (args.hw // 2) ** 2, generator=g) * 1000).to(dev)
    ctx = torch.randn(1, 32, base.text_embedding[0].in_features, generator=g).to(dev)
    tokens = t.shape[1]

    variants = {}
    for ckpt in (False, True):
        for comp in (False, True):
            name = ("compiled" if comp else "eager") + ("+ckpt" if ckpt else "")
            m = copy.deepcopy(base)
            model = parallelize(m, m.blocks, DistInfo(device=dev), gradient_checkpointing=ckpt, compile=comp)
            opt = torch.optim.AdamW(lora_parameters(m), lr=1e-4)
            variants[name] = (model, opt)

    def step_fn(model, opt):
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            model(x, t, ctx).float().pow(2).mean().backward()
            opt.step()
        return step

    fns = {k: step_fn(*v) for k, v in variants.items()}
    first = {}
    for name, fn in fns.items():  # the first step of each variant, timed alone (includes compilation)
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        first[name] = time.perf_counter() - t0
        print(f"{name}: first step {first[name]:.2f} s", flush=True)
    times = time_round_robin(fns, args.iters, args.warmup, dev)
    rows = []
    base_ms = {False: summarize(times["eager"])["median_ms"], True: summarize(times["eager+ckpt"])["median_ms"]}
    for name in fns:
        s = summarize(times[name])
        ckpt = name.endswith("+ckpt")
        rows.append({"variant": name, "median_ms": s["median_ms"], "p25_ms": s["p25_ms"], "p75_ms": s["p75_ms"],
                     "vs_eager": s["median_ms"] / base_ms[ckpt],
                     "first_step_s": first[name],
                     "compile_s": first[name] - s["median_ms"] / 1e3 if name.startswith("compiled") else None})
        print(rows[-1], flush=True)
    config = {"preset": args.preset, "tokens": tokens, "batch": 1, "rank": 16, "iters": args.iters,
              "warmup": args.warmup, "threads": args.threads, "dtype": "fp32",
              "backend": "inductor", "fresh_cache": args.fresh_cache}
    notes = ("step = forward + backward + AdamW(LoRA). vs_eager: median ratio to eager with the same checkpointing "
             "(< 1 = compiled faster). compile_s = first step - median step.")
    if not args.no_write:
        for p in write_results("compile", dev, rows, ["variant", "median_ms", "p25_ms", "p75_ms", "vs_eager",
                                                      "first_step_s", "compile_s"], config, notes):
            print("wrote", p)


if __name__ == "__main__":
    main()
