"""`python -m backbones info NAME --preset P [--json] [--targets]`: components, parameter counts and
checkpoint keys of a backbone, built on the meta device (no memory, no download).

`python -m backbones plan --backbone NAME --preset P [--frames F --height H --width W] [--rank R]
[--gradient-checkpointing] [--offload-activations] [--world-size N --parallel fsdp --ulysses K]
[--gpu-memory 80GB] [--json] [section.key=value ...]`: the memory and time plan of one training step
(`backbones.plan`), without weights."""
from __future__ import annotations

import argparse
import json
import sys

import torch.nn as nn

from lora_core.inject import _matches, lora_targetable

from .loading import count_params
from .registry import backbone_names, get_backbone


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backbones")
    sub = ap.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="describe a backbone's components without allocating weights")
    info.add_argument("backbone", choices=backbone_names())
    info.add_argument("--preset", default=None)
    info.add_argument("--json", action="store_true", help="machine-readable output with every key and shape")
    info.add_argument("--targets", action="store_true", help="list the module names LoRA can target")
    plan = sub.add_parser("plan", help="memory/FLOPs plan of a training run, without weights")
    plan.add_argument("--backbone", choices=backbone_names())
    plan.add_argument("--preset")
    plan.add_argument("--config", help="YAML file with config values (as train.py --config)")
    plan.add_argument("--frames", type=int, help="data.num_frames")
    plan.add_argument("--height", type=int, help="data.height")
    plan.add_argument("--width", type=int, help="data.width")
    plan.add_argument("--batch-size", type=int, help="train.batch_size (per data-parallel rank)")
    plan.add_argument("--rank", type=int, help="lora.rank")
    plan.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    plan.add_argument("--offload-activations", action=argparse.BooleanOptionalAction, default=None)
    plan.add_argument("--world-size", type=int, default=1, help="number of GPUs")
    plan.add_argument("--parallel", choices=["ddp", "fsdp"])
    plan.add_argument("--ulysses", type=int)
    plan.add_argument("--optimizer", choices=["adamw", "adamw8bit"], help="optim.name")
    plan.add_argument("--gpu-memory", help="e.g. 24GB: say whether it fits and what to change if not")
    plan.add_argument("--json", action="store_true")
    plan.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:  # key=value overrides may sit between the flags
        return plan_main(plan.parse_intermixed_args(argv[1:]))
    args = ap.parse_args(argv)
    spec = get_backbone(args.backbone)
    preset = args.preset or spec.presets[-1]
    spec.check_preset(preset)
    comps = spec.component_specs(preset)
    declared = spec.components(preset)
    lora_parts = [n for n, c in declared.items() if "lora" in c.modes]
    targets = declared[lora_parts[0]].lora_targets if lora_parts else ()
    report: dict = {"backbone": spec.name, "preset": preset, "components": {},
                    "default_targets": [targets] if isinstance(targets, str) else list(targets)}
    if lora_parts:  # what the default targets adapt on the primary component, at the backbone's default rank
        module = comps[lora_parts[0]]
        hit = [m for n, m in module.named_modules() if n in set(lora_targetable(module)) and _matches(n, targets)]
        rank = spec.default_rank
        per_rank = sum((m.in_features if isinstance(m, nn.Linear) else m.weight[0].numel()) + m.weight.shape[0]
                       for m in hit)
        report["default_lora"] = {"component": lora_parts[0], "layers": len(hit), "rank": rank,
                                  "params": per_rank * rank, "params_per_rank": per_rank}
    for name, module in comps.items():
        entry = {"num_params": count_params(module),
                 "keys": {k: list(v.shape) for k, v in module.state_dict().items()}}
        report["components"][name] = entry
    if args.targets:
        report["targets"] = [t for n in lora_parts for t in
                             (lora_targetable(comps[n]) if len(lora_parts) == 1
                              else [f"{n}:{x}" for x in lora_targetable(comps[n])])]
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
        return 0
    print(f"{spec.name} ({preset})")
    for name, entry in report["components"].items():
        print(f"  {name:13s} {entry['num_params']:>15,d} parameters, {len(entry['keys'])} tensors")
    print(f"  default LoRA targets: {', '.join(report['default_targets'])}")
    if "default_lora" in report:
        d = report["default_lora"]
        print(f"  default LoRA: {d['layers']} layers of the {d['component']}, {d['params']:,} parameters at rank "
              f"{d['rank']}")
    if args.targets:
        print("  targetable modules:")
        for t in report["targets"]:
            print(f"    {t}")
    return 0


def plan_config(backbone: str | None, preset: str | None, overrides: list[str], config: str | None = None):
    """The config train.py would resolve for these flags and overrides (its `resolve_config`)."""
    import train
    argv = [*(["--backbone", backbone] if backbone else []), *(["--preset", preset] if preset else []),
            *(["--config", config] if config else []), *overrides]
    return train.resolve_config(train.parse_args(argv))


def plan_main(args: argparse.Namespace) -> int:
    from .plan import format_plan, plan_run
    over = []
    for flag, key in (("frames", "data.num_frames"), ("height", "data.height"), ("width", "data.width"),
                      ("batch_size", "train.batch_size"), ("rank", "lora.rank"), ("parallel", "parallel.mode"),
                      ("ulysses", "parallel.ulysses"), ("optimizer", "optim.name"),
                      ("gradient_checkpointing", "train.gradient_checkpointing"),
                      ("offload_activations", "train.offload_activations")):
        v = getattr(args, flag)
        if v is not None:
            over.append(f"{key}={json.dumps(v)}")
    if args.rank is not None and not any(o.startswith("lora.alpha=") for o in args.overrides):
        over.append(f"lora.alpha={float(args.rank)}")
    try:
        cfg, spec = plan_config(args.backbone, args.preset, over + list(args.overrides), args.config)
        result = plan_run(cfg, spec, args.world_size, gpu_memory=args.gpu_memory)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result.as_dict(), sys.stdout, indent=1)
        print()
    else:
        print(format_plan(result))
    return 0 if result.fits in (None, True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
