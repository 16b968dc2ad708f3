"""Ours vs diffusers (+ PEFT LoRA) for the UNet / transformer denoisers, same weights, CPU fp32.

    python benchmarks/bench_denoisers_vs_diffusers.py [--family sd15|svd|cogvideox|all] [--iters N] [--no-write]

For each family: our model at its tiny preset with random weights, diffusers' class built with the same config
and loaded with our state dict (same names), LoRA rank 8 on to_q/to_k/to_v/to_out.0 (ours: inject_lora;
diffusers: PEFT LoraConfig + add_adapter, or peft.inject_adapter_in_model for SVD, A/B copied from ours, B non-zero). Reports median forward+backward
time (interleaved round-robin, benchmarks.common.time_round_robin), saved-for-backward bytes (unique storages)
in fp32 and bf16 autocast, the ratios ours/diffusers, and the output relative error (sanity check).
Structure follows bench_train_step.py --vs-diffusers (Wan).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backbones.registry import get_backbone  # noqa: E402
from benchmarks.bench_train_step import saved_bytes_profile  # noqa: E402
from benchmarks.common import markdown_table, summarize, time_round_robin, write_results  # noqa: E402
from lora_core.inject import inject_lora, lora_layers  # noqa: E402
from tests.oracle import randomize_  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# --size bench: the official layouts (SD1.5, SVD-xt, CogVideoX-2B) narrowed so that one fp32 step takes about a
# second on 2 CPU cores, large enough for the GEMMs and attention to dominate as they do at full size.
BENCH_SIZES = {
    "sd15": dict(block_out_channels=(128, 256, 512, 512), sample_size=32),             # 8 heads, CLIP-L width 768
    "svd": dict(block_out_channels=(128, 256, 512, 512), num_attention_heads=(2, 4, 8, 8), num_frames=4),
    "cogvideox": dict(num_attention_heads=8, num_layers=4, sample_frames=17, sample_height=32, sample_width=32),
}
RANK = 8
FAMILIES = ("sd15", "svd", "cogvideox")


def saved_bytes(fn, model: torch.nn.Module) -> tuple[int, int]:
    """(all, activations-only) bytes of storages autograd keeps for backward during fn(), each storage once."""
    prof = saved_bytes_profile(fn, model)
    return prof["total"], prof["act"]


def add_lora(ours: torch.nn.Module, ref: torch.nn.Module, seed: int = 0) -> int:
    """Same LoRA on both: ours via inject_lora, diffusers via PEFT; A/B copied from ours (B random, non-zero)."""
    from peft import LoraConfig

    inject_lora(ours, TARGETS, rank=RANK, alpha=RANK)
    lcfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=True)
    if hasattr(ref, "add_adapter"):
        ref.add_adapter(lcfg)
    else:  # UNetSpatioTemporalConditionModel has no PeftAdapterMixin: PEFT's own in-place injection
        from peft import inject_adapter_in_model
        inject_adapter_in_model(lcfg, ref, adapter_name="default")
    for p in ref.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 100)
    layers = lora_layers(ours)
    with torch.no_grad():
        for name, m in layers.items():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.02)
            pm = ref.get_submodule(name)  # same module names on both sides
            for mine, theirs in ((m.lora_A, pm.lora_A["default"].weight), (m.lora_B, pm.lora_B["default"].weight)):
                theirs.copy_(mine)
                theirs.requires_grad_(True)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_ref = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert n_ours == n_ref, (n_ours, n_ref)
    return len(layers)


# -- families: each returns ours, ref, call_ours(), call_ref(), config dict ------------------------

def build_sd15(size: str = "tiny"):
    import diffusers

    from backbones.sd.unet import UNET_PRESETS, UNet2DConditionModel

    ours = get_backbone("sd15").build("tiny", {"unet"})["unet"] if size == "tiny" else UNet2DConditionModel(
        dataclasses.replace(UNET_PRESETS["sd15"], **BENCH_SIZES["sd15"]))
    ref = diffusers.UNet2DConditionModel(**asdict(ours.config))
    randomize_(ref, 1)
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, ours.config.in_channels, 32, 32, generator=g)
    ctx = torch.randn(1, 77, ours.config.cross_attention_dim, generator=g)
    t = torch.tensor([500])
    cfg = {"input": "latent 1x4x32x32", "context": f"1x77x{ours.config.cross_attention_dim}",
           "block_out_channels": ours.config.block_out_channels}
    return ours, ref, (lambda: ours(x, t, ctx)), (lambda: ref(x, t, ctx, return_dict=False)[0]), cfg


def build_svd(size: str = "tiny"):
    import diffusers

    from backbones.svd.unet import UNET_PRESETS, UNetSpatioTemporalConditionModel

    ours = get_backbone("svd").build("tiny", {"unet"})["unet"] if size == "tiny" else UNetSpatioTemporalConditionModel(
        dataclasses.replace(UNET_PRESETS["svd-xt"], **BENCH_SIZES["svd"]))
    ref = diffusers.UNetSpatioTemporalConditionModel(
        **{k: v for k, v in asdict(ours.config).items() if k not in ("mask_token", "framer_temporal_context")})
    randomize_(ref, 2)
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(2)
    hw = 16 if size == "tiny" else 32
    x = torch.randn(1, 4, ours.config.in_channels, hw, hw, generator=g)
    t = torch.tensor([0.25])
    ctx = torch.randn(1, 1, ours.config.cross_attention_dim, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02]])
    cfg = {"input": f"1x4x{ours.config.in_channels}x{hw}x{hw}", "context": f"1x1x{ours.config.cross_attention_dim}",
           "added_time_ids": "[[6,127,0.02]]", "block_out_channels": ours.config.block_out_channels}
    return (ours, ref, (lambda: ours(x, t, ctx, ids)), (lambda: ref(x, t, ctx, ids, return_dict=False)[0]), cfg)


def build_cogvideox(size: str = "tiny"):
    import diffusers

    from backbones.cogvideox.transformer import TRANSFORMER_PRESETS, CogVideoXTransformer3DModel

    c = TRANSFORMER_PRESETS["tiny"] if size == "tiny" else dataclasses.replace(
        TRANSFORMER_PRESETS["2b"], **BENCH_SIZES["cogvideox"])
    ref = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=c.num_attention_heads, attention_head_dim=c.attention_head_dim,
        in_channels=c.in_channels, out_channels=c.out_channels, time_embed_dim=c.time_embed_dim,
        text_embed_dim=c.text_embed_dim, num_layers=c.num_layers, sample_width=c.sample_width,
        sample_height=c.sample_height, sample_frames=c.sample_frames, patch_size=c.patch_size,
        max_text_seq_length=c.max_text_seq_length, use_rotary_positional_embeddings=c.use_rotary_positional_embeddings,
        use_learned_positional_embeddings=c.use_learned_positional_embeddings)
    randomize_(ref, 3)
    ours = CogVideoXTransformer3DModel(c)
    ours.load_state_dict(ref.state_dict(), strict=True)
    if c.use_rotary_positional_embeddings:
        raise NotImplementedError("tiny preset with RoPE: pass image_rotary_emb to diffusers")
    g = torch.Generator().manual_seed(3)
    f, h, w = (2, 4, 6) if size == "tiny" else (5, 16, 16)
    x = torch.randn(1, f, c.in_channels, h * c.patch_size, w * c.patch_size, generator=g)
    ctx = torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=g)
    t = torch.tensor([500])
    cfg = {"input": "x".join(map(str, x.shape)), "context": "x".join(map(str, ctx.shape)),
           "heads": c.num_attention_heads, "head_dim": c.attention_head_dim, "layers": c.num_layers}
    return ours, ref, (lambda: ours(x, ctx, t)), (lambda: ref(x, ctx, t, return_dict=False)[0]), cfg


BUILDERS = {"sd15": build_sd15, "svd": build_svd, "cogvideox": build_cogvideox}


def run_family(family: str, iters: int, size: str = "tiny") -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    ours, ref, call_ours, call_ref, cfg = BUILDERS[family](size)
    ours.eval(), ref.eval()
    with torch.no_grad():
        base_ref = call_ref()
    n_lora = add_lora(ours, ref)
    ours.train(), ref.train()
    with torch.no_grad():
        a, b = call_ours(), call_ref()
    fwd_err = ((a - b).abs().max() / b.abs().max()).item()
    lora_effect = ((b - base_ref).abs().max() / base_ref.abs().max()).item()  # LoRA path is live
    target = torch.randn(b.shape, generator=torch.Generator().manual_seed(9))

    def loss(call, amp: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = call()
        return (out.float() - target).square().mean()

    variants = {"ours": (call_ours, ours), "diffusers": (call_ref, ref)}

    def zero() -> None:
        for m in (ours, ref):
            for p in m.parameters():
                p.grad = None

    loss(call_ours, False).backward()
    loss(call_ref, False).backward()
    # over all LoRA grads together: per layer would divide by ~0 where a gradient vanishes in exact arithmetic
    # (SVD's cross-attention over a 1-token context: softmax of one key is 1, so to_q/to_k get only rounding noise)
    diff = scale = 0.0
    for name, m in lora_layers(ours).items():
        pm = ref.get_submodule(name)
        for mine, theirs in ((m.lora_A, pm.lora_A["default"].weight), (m.lora_B, pm.lora_B["default"].weight)):
            diff = max(diff, (mine.grad - theirs.grad).abs().max().item())
            scale = max(scale, theirs.grad.abs().max().item())
    gerr = diff / scale
    zero()
    print(f"[{family}] lora layers {n_lora}; forward rel err {fwd_err:.2e} (LoRA changes output by "
          f"{lora_effect:.2e}); LoRA grad rel err {gerr:.2e}", flush=True)

    saved = {}
    for amp in (False, True):
        for name, (call, model) in variants.items():
            saved[(name, amp)] = saved_bytes(lambda call=call, amp=amp: loss(call, amp), model)
            zero()
    steps = {k: (lambda call=call: loss(call, False).backward()) for k, (call, _) in variants.items()}
    times = time_round_robin(steps, iters=iters, warmup=1, device="cpu", before={k: zero for k in steps})

    rows = []
    for name in variants:
        st = summarize(times[name])
        row = {"family": family, "model": name, "fp32_median_ms": st["median_ms"], "fp32_p25_ms": st["p25_ms"],
               "fp32_p75_ms": st["p75_ms"],
               "fp32_round_ratio": statistics.median(x / y for x, y in zip(times[name], times["diffusers"]))}
        for amp, tag in ((False, "fp32"), (True, "bf16")):
            row[f"saved_{tag}_mb"] = saved[(name, amp)][0] / 2**20
            row[f"saved_act_{tag}_mb"] = saved[(name, amp)][1] / 2**20
        row["out_rel_err"] = f"{fwd_err:.1e}" if name == "ours" else None  # strings: the md table keeps the exponent
        row["lora_grad_rel_err"] = f"{gerr:.1e}" if name == "ours" else None
        rows.append(row)
    o, d = rows
    ratio = {"family": family, "model": "ratio ours/diffusers"}
    for k in o:
        if k.endswith("_ms") or k.endswith("_mb"):
            ratio[k] = o[k] / d[k] if d[k] else None
    ratio["fp32_round_ratio"] = o["fp32_round_ratio"]
    rows.append(ratio)
    cfg = {**cfg, "lora_layers": n_lora, "forward_rel_err": fwd_err, "lora_grad_rel_err": gerr,
           "lora_output_effect": lora_effect}
    return rows, cfg


COLUMNS = ["family", "model", "fp32_median_ms", "fp32_p25_ms", "fp32_p75_ms", "fp32_round_ratio", "saved_fp32_mb",
           "saved_act_fp32_mb", "saved_bf16_mb", "saved_act_bf16_mb", "out_rel_err", "lora_grad_rel_err"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=(*FAMILIES, "all"), default="all")
    ap.add_argument("--iters", type=int, default=7, help="timed rounds (>= 7 recommended)")
    ap.add_argument("--size", choices=("tiny", "bench"), default="tiny",
                    help="tiny: the test presets (per-call overheads dominate); bench: see BENCH_SIZES")
    ap.add_argument("--no-write", dest="write", action="store_false")
    args = ap.parse_args()
    fams = FAMILIES if args.family == "all" else (args.family,)
    rows, configs = [], {}
    for fam in fams:
        r, c = run_family(fam, args.iters, args.size)
        rows += r
        configs[fam] = c
        print(markdown_table(r, COLUMNS), flush=True)
    print()
    print(markdown_table(rows, COLUMNS))
    if args.write:
        config = {"size": args.size, "families": ",".join(fams), "lora_rank": RANK, "lora_alpha": RANK, "targets": "/".join(TARGETS),
                  "iters": args.iters, "warmup": 1, "threads": torch.get_num_threads(), "batch": 1,
                  **{f"{f}.{k}": v for f, c in configs.items() for k, v in c.items()}}
        notes = ("Machine: the 2 CPU cores are shared with other work, so absolute times are noisy; compare only "
                 "the ratios, which come from interleaved round-robin rounds in one process "
                 "(fp32_round_ratio: median over rounds of ours/diffusers measured in the same round). "
                 "Same weights (diffusers model randomized, state dict loaded into ours, same names), same LoRA "
                 "A/B (PEFT add_adapter, B non-zero) and inputs. Times: forward + backward of an MSE loss, fp32, "
                 "no optimizer step. saved_*: bytes of storages autograd keeps for backward (saved_tensors_hooks, "
                 "each storage once); saved_act_*: the same without the models' parameter storages. "
                 "bf16 = torch.autocast('cpu', bfloat16) (memory only, not timed). out_rel_err: max |ours - "
                 "diffusers| / max |diffusers| of the LoRA'd forward, fp32; lora_grad_rel_err: the same over all LoRA A/B "
                 "gradients together.")
        paths = write_results("denoisers_vs_diffusers" + ("_bench" if args.size == "bench" else ""), "cpu", rows, COLUMNS, config, notes)
        print("wrote", *paths)


if __name__ == "__main__":
    main()
