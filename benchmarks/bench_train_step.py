"""Time and peak memory of one Wan LoRA training step (forward, backward, AdamW step).

    python benchmarks/bench_train_step.py                      # CPU: the tiny preset at a few sizes
    python benchmarks/bench_train_step.py --device cuda        # GPU: the 5b preset, random weights,
                                                               # 704x1280 x 49 and x 121 frames, grad ckpt
    python benchmarks/bench_train_step.py --vs-diffusers       # ours vs diffusers WanTransformer3DModel + PEFT
                                                               # (width 512, 8 heads, 4 blocks, 1280 tokens)
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


# -- ours vs diffusers + PEFT ----------------------------------------------------------------------

class _ModuleTracker:
    """Names the innermost running module (block index folded to 'blocks.*'), for per-op attribution."""

    def __init__(self, *models: torch.nn.Module) -> None:
        import re
        self.names: dict[int, str] = {}
        for m in models:
            for n, mod in m.named_modules():
                self.names[id(mod)] = re.sub(r"blocks\.\d+", "blocks.*", n) or "<top>"
        self.stack: list[str] = []
        self.handles: list = []

    def __enter__(self) -> "_ModuleTracker":
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def pre(mod, args):
            self.stack.append(self.names.get(id(mod), type(mod).__name__))

        def post(mod, args, out):
            if self.stack:
                self.stack.pop()

        self.handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    @property
    def where(self) -> str:
        return self.stack[-1] if self.stack else "<top>"


def saved_bytes_profile(fn, model: torch.nn.Module, tracker: _ModuleTracker | None = None) -> dict:
    """Bytes autograd keeps for backward during fn(), counting each storage once: all of them, and
    activations only (storages that are not the model's parameters); per (module, shape, dtype) rows."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = act = 0
    rows: dict[tuple, list[int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total, act
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            nb = t.untyped_storage().nbytes()
            total += nb
            if key not in params:
                act += nb
                r = rows.setdefault((tracker.where if tracker else "?", tuple(t.shape), str(t.dtype)), [0, 0])
                r[0] += 1
                r[1] += nb
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if tracker is not None:
            with tracker:
                out = fn()
        else:
            out = fn()
    out.backward()
    prof = sorted(((k, v) for k, v in rows.items()), key=lambda kv: -kv[1][1])
    return {"total": total, "act": act, "rows": [{"module": k[0], "shape": list(k[1]), "dtype": k[2],
                                                  "count": v[0], "mb": v[1] / 2**20} for k, v in prof]}


def build_vs_diffusers(dim: int, heads: int, layers: int, ffn_dim: int, rank: int, seed: int = 0):
    """Our WanDiT and diffusers' WanTransformer3DModel with the same random weights and LoRA (PEFT)."""
    import dataclasses
    import math

    import diffusers
    from peft import LoraConfig

    from backbones.wan.dit import DIT_PRESETS, WanDiT
    from backbones.wan.keymap import convert_state_dict, dit_to_diffusers
    from lora_core.inject import lora_layers

    cfg = dataclasses.replace(DIT_PRESETS["5b"], dim=dim, num_heads=heads, num_layers=layers, ffn_dim=ffn_dim)
    ref = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=heads, attention_head_dim=dim // heads,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=ffn_dim, num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, rope_max_seq_len=1024)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim >= 2 and "scale_shift_table" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    ours = WanDiT(cfg)
    ours.load_state_dict(convert_state_dict(ref.state_dict(), to="upstream"), strict=True)

    spec = get_backbone("wan_ti2v")
    targets = list(spec.default_targets)
    inject_lora(ours, targets, rank=rank, alpha=rank)
    theirs = sorted({dit_to_diffusers(f"blocks.0.{t}").removeprefix("blocks.0.") for t in targets})
    ref.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=theirs, init_lora_weights=True))
    for p in ref.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        layers_ = lora_layers(ours)
        for name, m in layers_.items():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)  # non-zero B: every path live
            peft_mod = ref.get_submodule(dit_to_diffusers(name))
            peft_mod.lora_A["default"].weight.copy_(m.lora_A)
            peft_mod.lora_B["default"].weight.copy_(m.lora_B)
            peft_mod.lora_A["default"].weight.requires_grad_(True)
            peft_mod.lora_B["default"].weight.requires_grad_(True)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_ref = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert n_ours == n_ref, (n_ours, n_ref)
    return ours.train(), ref.train(), cfg, len(layers_)


def run_vs_diffusers(args: argparse.Namespace) -> None:
    import time as _time

    from benchmarks.common import (gemm_gflop, kernel_signature, record_kernels, replay_kernels, time_round_robin,
                                   without_dim)

    torch.manual_seed(0)
    ours, ref, cfg, n_lora = build_vs_diffusers(args.width, args.heads, args.blocks, args.ffn_dim, args.rank)
    frames, h, w = args.latent
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_dim, frames, h, w, generator=g)
    tokens = frames * (h // 2) * (w // 2)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)  # already text_len rows: no padding difference
    target = torch.randn(x.shape, generator=g)

    def loss_ours(amp: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = ours(x, t, ctx)
        return (out.float() - target).square().mean()

    def loss_ref(amp: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = ref(x, t, ctx, return_dict=False)[0]
        return (out.float() - target).square().mean()

    variants = {"ours": (lambda amp: loss_ours(amp), ours),
                "diffusers": (loss_ref, ref)}

    with torch.no_grad():
        a, b = ours(x, t, ctx), ref(x, t, ctx, return_dict=False)[0]
    fwd_err = ((a - b).abs().max() / b.abs().max()).item()
    # gradient parity on the LoRA parameters (same weights, same inputs)
    from backbones.wan.keymap import dit_to_diffusers
    from lora_core.inject import lora_layers
    loss_ours(False).backward()
    loss_ref(False).backward()
    gerr = 0.0
    for name, m in lora_layers(ours).items():
        pm = ref.get_submodule(dit_to_diffusers(name))
        for mine, theirs in ((m.lora_A, pm.lora_A["default"].weight), (m.lora_B, pm.lora_B["default"].weight)):
            gerr = max(gerr, ((mine.grad - theirs.grad).abs().max() / theirs.grad.abs().max()).item())
    print(f"parity: forward max rel err {fwd_err:.2e}, LoRA grad max rel err {gerr:.2e}", flush=True)

    def zero() -> None:
        for m in (ours, ref):
            for p in m.parameters():
                p.grad = None

    zero()
    tracker = _ModuleTracker(ours, ref)
    saved = {}
    for amp in (False, True):
        for name, (fn, model) in variants.items():
            saved[(name, amp)] = saved_bytes_profile(lambda fn=fn, amp=amp: fn(amp), model, tracker)
            zero()
    t0 = _time.perf_counter()
    iters = args.iters or 7
    steps = {k: (lambda fn=fn: fn(False).backward()) for k, (fn, _) in variants.items()}
    # Kernel floors, timed in the same rounds: the GEMM / convolution / attention kernels of a step replayed
    # alone (no elementwise ops, norms, Python). "base kernels": the frozen model's own (LoRA-rank GEMMs left
    # out), the same list for both models (checked); "our kernels": ours with its LoRA GEMMs.
    all_ours, all_ref = (record_kernels(steps[k]) for k in ("ours", "diffusers"))
    zero()
    base_ref = without_dim(all_ref, args.rank)
    if kernel_signature(without_dim(all_ours, args.rank)) != kernel_signature(base_ref):
        raise RuntimeError("ours and diffusers run different frozen-model kernels; the floor would not be shared")
    floors = {"floor: our kernels": replay_kernels(all_ours), "floor: base kernels": replay_kernels(base_ref)}
    gflop = {"ours": gemm_gflop(all_ours), "diffusers": gemm_gflop(all_ref),
             "floor: our kernels": gemm_gflop(all_ours), "floor: base kernels": gemm_gflop(base_ref)}
    times = time_round_robin({**steps, **floors}, iters=iters, warmup=1, device="cpu",
                             before={k: zero for k in steps}, clock=args.clock)
    times_bf16 = {}
    if args.bf16_time:
        steps16 = {k: (lambda fn=fn: fn(True).backward()) for k, (fn, _) in variants.items()}
        times_bf16 = time_round_robin(steps16, iters=iters, warmup=1, device="cpu",
                                      before={k: zero for k in steps16}, clock=args.clock)
    print(f"timing took {_time.perf_counter() - t0:.0f} s", flush=True)

    import statistics
    rows = []
    for name in (*variants, *floors):
        st = summarize(times[name])
        row = {"model": name, "tokens": tokens, "gemm_gflop": gflop[name], "fp32_median_ms": st["median_ms"],
               "fp32_p25_ms": st["p25_ms"], "fp32_p75_ms": st["p75_ms"],
               # per-round ratio: each round times every variant back to back, so drift cancels
               "fp32_round_ratio": statistics.median(a / b for a, b in zip(times[name], times["diffusers"]))}
        if times_bf16 and name in variants:
            row["bf16_median_ms"] = summarize(times_bf16[name])["median_ms"]
        for amp, tag in ((False, "fp32"), (True, "bf16")):
            if name in variants:
                row[f"saved_{tag}_mb"] = saved[(name, amp)]["total"] / 2**20
                row[f"saved_act_{tag}_mb"] = saved[(name, amp)]["act"] / 2**20
        rows.append(row)
    base = rows[1]
    ratio = {"model": "ratio ours/diffusers", "tokens": tokens}
    for k in rows[0]:
        if k not in ("model", "tokens", "fp32_round_ratio"):
            ratio[k] = rows[0][k] / base[k]
    ratio["fp32_round_ratio"] = rows[0]["fp32_round_ratio"]
    rows.insert(2, ratio)
    cols = list(rows[0].keys())
    from benchmarks.common import markdown_table
    print(markdown_table(rows, cols))
    if args.profile:
        for amp in (False, True):
            for name in variants:
                prof = saved[(name, amp)]["rows"]
                print(f"\n-- saved-for-backward, {name}, {'bf16 autocast' if amp else 'fp32'} "
                      f"(act {saved[(name, amp)]['act'] / 2**20:.1f} MiB; top {args.profile})")
                for r in prof[: args.profile]:
                    print(f"  {r['mb']:8.2f} MiB  x{r['count']:<3d} {r['dtype']:15s} {str(r['shape']):22s} {r['module']}")
    config = {"width": args.width, "heads": args.heads, "blocks": args.blocks, "ffn_dim": args.ffn_dim,
              "in_dim": cfg.in_dim, "text_dim": cfg.text_dim, "text_tokens": cfg.text_len,
              "latent": "x".join(map(str, args.latent)), "tokens": tokens, "batch": 1, "timestep": "scalar [B]",
              "lora_rank": args.rank, "lora_layers": n_lora, "iters": iters, "threads": torch.get_num_threads(),
              "clock": args.clock,
              "forward_rel_err": fwd_err, "lora_grad_rel_err": gerr}
    notes = ("Same weights, LoRA A/B and inputs for both; diffusers' LoRA is PEFT (add_adapter) on the mapped "
             "default targets. Times: forward + backward of an MSE loss (no optimizer step), fp32, both models "
             "timed round-robin in one process (interleaved), median of the rounds; the machine is shared, so "
             "only the ratios measured in the same rounds are meaningful. saved_*: bytes of storages autograd "
             "keeps for backward (saved_tensors_hooks, each storage once); saved_act_*: the same without the "
             "models' parameter storages (ours keeps references to its frozen fp32 weights, which cost no "
             "memory; diffusers under autocast keeps bf16 weight copies, which do). bf16 = torch.autocast('cpu', "
             "bfloat16). fp32_round_ratio: median over rounds of the ratio "
             "to diffusers measured in the same round. Floors: the GEMM, convolution and attention kernels a "
             "step dispatches (recorded with a TorchDispatchMode, forward and backward), replayed alone on "
             "random tensors of the same layouts in the same rounds; 'base kernels' leaves out the calls with "
             "a LoRA-rank dimension and is the same list for both models (the script checks), so no "
             "implementation with these kernels can take less; 'our kernels' adds our LoRA GEMMs. gemm_gflop: "
             "2MNK summed over the recorded mm/addmm calls.")
    if args.write:
        paths = write_results("train_step_vs_diffusers", "cpu", rows, cols, config, notes)
        if args.profile:
            import json
            data = json.loads(Path(paths[0]).read_text())
            data["saved_profile"] = {f"{n}_{'bf16' if amp else 'fp32'}": saved[(n, amp)]["rows"][:40]
                                     for (n, amp) in saved}
            Path(paths[0]).write_text(json.dumps(data, indent=1) + "\n")
        print("wrote", *paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--cases", default=None, help="preset:frames:HxW:ckpt,... e.g. 5b:49:704x1280:1")
    ap.add_argument("--vs-diffusers", action="store_true",
                    help="ours vs diffusers WanTransformer3DModel + PEFT LoRA, same weights and inputs (CPU)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--ffn-dim", type=int, default=2048)
    ap.add_argument("--latent", type=int, nargs=3, default=[5, 32, 32], metavar=("F", "H", "W"),
                    help="latent frames, height, width (patch 1x2x2: 5x32x32 -> 1280 tokens)")
    ap.add_argument("--profile", type=int, default=0, help="print the N largest saved-tensor groups per model")
    ap.add_argument("--bf16-time", action="store_true", help="also time the step under bf16 autocast")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (stable on a shared machine with --threads 1)")
    ap.add_argument("--no-write", dest="write", action="store_false")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vs_diffusers:
        run_vs_diffusers(args)
        return
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
