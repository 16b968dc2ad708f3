"""LoRA linear forward+backward: time and activation memory against the frozen base layer.

    python benchmarks/bench_lora.py                        # CPU fp32, M=2048, a few minutes on 2 cores
    python benchmarks/bench_lora.py --shapes all --ranks 16,32,64,128 --iters 5
    python benchmarks/bench_lora.py --device cuda          # M=27,280 (Wan 5B, 81 frames 704x1280), bf16

Variants, all sharing one base weight (frozen) and, for the LoRA ones, the same A/B values:
  base        frozen nn.Linear, x requires grad (backward = dX only): the baseline of every ratio
  merged      a plain nn.Linear holding W + scale*B A (what inference after merging costs)
  ours        lora_core.layers.LoRALinear (the fused autograd Function in lora_core.fused)
  peft_style  eager PEFT-style module: fp32 adapter, nn.Identity dropout, x.to(A.dtype),
              lora_B(lora_A(x)) * scale, then added to the base output
  peft        peft.get_peft_model on a one-Linear module (row skipped when peft is not installed)
  ours_kernels  the GEMM kernels `ours` dispatches (forward and backward, recorded with a TorchDispatchMode),
              replayed alone on random tensors of the same layouts: the floor of this implementation with
              these BLAS calls (what is left above it is Python, autograd and allocation)

Memory: `saved_MB` is the bytes autograd keeps for backward beyond the parameters (unique storages seen
by torch.autograd.graph.saved_tensors_hooks during the forward; x counts when a variant keeps it);
`peak_MB` (CUDA only) is the peak allocation of one forward+backward above what was allocated before.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record_kernels, replay_kernels, summarize, time_round_robin, write_results  # noqa: E402
from lora_core.layers import LoRALinear  # noqa: E402

# Wan2.2 TI2V-5B: dim 3072, FFN 14336; 1024 is the small reference case.
SHAPES = {"1024x1024": (1024, 1024), "3072x3072": (3072, 3072), "3072x14336": (3072, 14336),
          "14336x3072": (14336, 3072)}
DEFAULT_CPU_PLAN = {"1024x1024": [16, 32, 64, 128], "3072x3072": [32]}
VARIANTS = ("base", "merged", "ours", "peft_style", "peft")


class PeftStyleLoRA(nn.Module):
    """What PEFT's lora.Linear.forward does for one adapter (peft/tuners/lora/layer.py), eagerly."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(a.shape[1], a.shape[0], bias=False, device=a.device, dtype=torch.float32)
        self.lora_B = nn.Linear(b.shape[1], b.shape[0], bias=False, device=b.device, dtype=torch.float32)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
        self.lora_dropout = nn.Identity()
        self.scaling = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        result = result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return result.to(dtype)


class _One(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _shared_linear(base: nn.Linear) -> nn.Linear:
    """A new nn.Linear module holding the same (frozen) weight and bias tensors."""
    lin = nn.Linear(base.in_features, base.out_features, device="meta")
    lin.weight, lin.bias = base.weight, base.bias
    return lin


def build_variants(d_in: int, d_out: int, rank: int, alpha: float, dtype: torch.dtype,
                   device: torch.device, names: list[str]) -> dict[str, nn.Module]:
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(d_in, d_out)
    with torch.no_grad():  # init on CPU with a seed, then move: identical weights on every device
        base.weight.copy_(torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in))
        base.bias.copy_(torch.randn(d_out, generator=g) * 0.1)
    base = base.to(device=device, dtype=dtype).requires_grad_(False)

    ours = LoRALinear.from_linear(_shared_linear(base), rank, alpha)
    with torch.no_grad():  # B random so the LoRA path is not a no-op
        ours.lora_A.copy_(torch.randn(rank, d_in, generator=g) / math.sqrt(d_in))
        ours.lora_B.copy_(torch.randn(d_out, rank, generator=g) / math.sqrt(rank))
    a, b, scale = ours.lora_A.detach(), ours.lora_B.detach(), ours.lora_scale

    out: dict[str, nn.Module] = {}
    for name in names:
        if name == "base":
            out[name] = base
        elif name == "ours":
            out[name] = ours
        elif name == "merged":
            merged = nn.Linear(d_in, d_out, device=device, dtype=dtype).requires_grad_(False)
            with torch.no_grad():
                merged.weight.copy_((base.weight.float() + scale * b @ a).to(dtype))
                merged.bias.copy_(base.bias)
            out[name] = merged
        elif name == "peft_style":
            out[name] = PeftStyleLoRA(_shared_linear(base), a, b, scale)
        elif name == "peft":
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                print("peft not installed: skipping the peft row")
                continue
            model = get_peft_model(_One(_shared_linear(base)),
                                   LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0))
            layer = model.base_model.model.lin
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
            assert layer.scaling["default"] == scale
            out[name] = model
    return out


def saved_activation_bytes(mod: nn.Module, x: torch.Tensor) -> int:
    params = {p.untyped_storage().data_ptr() for p in mod.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mod(x)
    del y
    return sum(seen.values())


def bench_config(d_in: int, d_out: int, rank: int, tokens: int, dtype: torch.dtype, device: torch.device,
                 names: list[str], iters: int | None, warmup: int, budget_s: float,
                 clock: str = "wall") -> list[dict[str, Any]]:
    mods = build_variants(d_in, d_out, rank, alpha=float(rank), dtype=dtype, device=device, names=names)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d_in, generator=g).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(tokens, d_out, generator=g).to(device=device, dtype=dtype)

    if "ours" in mods and "peft_style" in mods:  # the two LoRA implementations must agree
        y_ours, y_ref = mods["ours"](x), mods["peft_style"](x)
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        err = ((y_ours.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
        if err > tol:
            raise RuntimeError(f"ours and peft_style disagree: relative error {err:.2e} > {tol}")
        del y_ours, y_ref

    def step(mod: nn.Module) -> Any:
        return lambda: mod(x).backward(dy)

    def clear(mod: nn.Module) -> Any:
        def f() -> None:  # set_to_none, as an optimizer step would: no gradient-accumulation add
            x.grad = None
            for p in mod.parameters():
                p.grad = None
        return f

    fns = {k: step(m) for k, m in mods.items()}
    before = {k: clear(m) for k, m in mods.items()}
    if "ours" in mods:  # our layer's GEMMs alone, replayed in the same rounds
        before["ours"]()
        fns["ours_kernels"] = replay_kernels(record_kernels(fns["ours"]))
        before["ours"]()
    if iters is None:  # fit the rounds into the time budget of this configuration
        probe = time_round_robin({"base": fns["base"]}, iters=1, warmup=1, device=device, before=before)["base"][0]
        iters = int(max(5, min(50, budget_s / (probe * len(fns) * 1.3))))
    times = time_round_robin(fns, iters=iters, warmup=warmup, device=device, before=before, clock=clock)

    rows = []
    base_sum = summarize(times["base"])
    base_med = base_sum["median_ms"]
    flop_ratio = 1 + 1.5 * rank * (d_in + d_out) / (d_in * d_out)  # notes §3.6: extra LoRA GEMM FLOPs
    for name in fns:
        mod = mods.get(name)
        s = summarize(times[name])
        paired = sorted(t / b for t, b in zip(times[name], times["base"]))
        row = {"shape": f"{d_in}->{d_out}", "M": tokens, "r": rank, "variant": name,
               "median_ms": s["median_ms"], "iqr_ms": s["p75_ms"] - s["p25_ms"],
               "ratio": s["median_ms"] / base_med, "paired_ratio": paired[len(paired) // 2],
               "min_ratio": s["min_ms"] / base_sum["min_ms"],
               "flop_ratio": flop_ratio if name in ("ours", "ours_kernels", "peft_style", "peft") else 1.0,
               "saved_MB": saved_activation_bytes(mod, x) / 2**20 if mod is not None else None, "n": s["n"]}
        if device.type == "cuda" and mod is not None:
            clear(mod)()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before_b = torch.cuda.memory_allocated()
            mod(x).backward(dy)
            torch.cuda.synchronize()
            row["peak_MB"] = (torch.cuda.max_memory_allocated() - before_b) / 2**20
        rows.append(row)
    noise = [abs(r["paired_ratio"] - 1) for r in rows if r["variant"] == "merged"]
    if noise and noise[0] > 0.03:
        print(f"warning: merged (same cost as base) measured x{1 + noise[0]:.3f}: this run is noisy; "
              "try --threads 1 --clock cpu, or compare min_ratio")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default=None,
                    help=f"comma list of {','.join(SHAPES)} or 'all' (default CPU: 1024x1024 all ranks, "
                         "3072x3072 r=32; default CUDA: all)")
    ap.add_argument("--ranks", default=None, help="comma list (default: 16,32,64,128; on CPU see --shapes)")
    ap.add_argument("--tokens", type=int, default=None, help="M (default: 2048 on CPU, 27280 on CUDA)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--iters", type=int, default=None, help="timed rounds (default: fit --budget per config)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget", type=float, default=25.0, help="seconds of timing per (shape, rank) when no --iters")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu = process CPU time: with --threads 1, immune to time lost to other processes")
    ap.add_argument("--name", default="bench_lora")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    tokens = args.tokens or (27_280 if cuda else 2048)
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad or "base" not in names:
        raise ValueError(f"--variants {args.variants!r}: must include 'base' and only use {VARIANTS}")

    all_ranks = [16, 32, 64, 128]
    if args.shapes is None and args.ranks is None and not cuda:
        plan = DEFAULT_CPU_PLAN
    else:
        shape_names = list(SHAPES) if args.shapes in (None, "all") else args.shapes.split(",")
        unknown = [s for s in shape_names if s not in SHAPES]
        if unknown:
            raise ValueError(f"--shapes: unknown {unknown}; choose from {list(SHAPES)} or 'all'")
        ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else all_ranks
        plan = {s: ranks for s in shape_names}

    rows: list[dict[str, Any]] = []
    for shape, ranks in plan.items():
        d_in, d_out = SHAPES[shape]
        for r in ranks:
            new = bench_config(d_in, d_out, r, tokens, dtype, device, names, args.iters, args.warmup, args.budget,
                               args.clock)
            for row in new:
                print(f"{row['shape']:>12} r={r:<4} {row['variant']:>10}  {row['median_ms']:9.2f} ms  "
                      f"x{row['ratio']:.3f} (paired x{row['paired_ratio']:.3f}, min x{row['min_ratio']:.3f}, "
                      f"flops x{row['flop_ratio']:.3f})  "
                      + (f"saved {row['saved_MB']:.1f} MB" if row["saved_MB"] is not None else "")
                      + (f"  peak {row['peak_MB']:.0f} MB" if "peak_MB" in row else ""),
                      flush=True)
            rows += new

    cols = ["shape", "M", "r", "variant", "median_ms", "iqr_ms", "ratio", "paired_ratio", "min_ratio", "flop_ratio",
            "saved_MB"]
    cols += ["peak_MB"] if cuda else []
    cols += ["n"]
    notes = ("ratio = median / median of `base` in the same run; paired_ratio = median over rounds of "
             "(variant time / base time in that round); min_ratio = fastest / fastest base (robust to "
             "neighbours on a shared machine); flop_ratio = 1 + 1.5 r (I+O)/(I O), the "
             "FLOP-only floor (notes §3.6). Forward+backward, base weight frozen, x requires grad. "
             "ours_kernels: the GEMMs `ours` dispatches, replayed alone in the same rounds (its kernel floor).")
    config = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "tokens": tokens,
              "plan": plan, "variants": names, "iters": args.iters, "warmup": args.warmup, "clock": args.clock,
              "threads": torch.get_num_threads()}
    j, m = write_results(args.name, device, rows, cols, config, notes)
    print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
