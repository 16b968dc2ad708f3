"""`python -m backbones info NAME --preset P [--json] [--targets]`: components, parameter counts and
checkpoint keys of a backbone, built on the meta device (no memory, no download)."""
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


if __name__ == "__main__":
    raise SystemExit(main())
