"""Sample videos or images from a backbone, with any number of LoRAs (unmerged, or merged into the weights).

    python infer.py --backbone NAME --preset tiny --prompt "a red ball" --output out.mp4       # seconds, CPU
    python infer.py --backbone NAME --preset P --ckpt-dir FOLDER --lora runs/mine/lora.safetensors:0.8 --merge \
        --prompt "..." --output out.mp4
    python infer.py --backbone NAME --preset tiny --lora a.safetensors --save-merged merged/    # export only
    python infer.py --backbone NAME --help          # the options and input images that backbone adds

The README shows the commands of each family. Defaults (frames, size, steps, guidance, sampler options) come
from the backbone's preset. Everything a user can get wrong (LoRA files, checkpoint folder, images, sizes,
output name and folder) is checked before any model is built.

Shapes: C channels, F frames, H/W height/width (pixels).
"""
from __future__ import annotations

import argparse
import logging
import math
import re
import tempfile
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import torch.nn as nn

from backbones.registry import backbone_names, get_backbone
from backbones.spec import BackboneSpec, MediaRules, SampleRequest, Sources
from lora_core.data import load_image
from lora_core.formats import load_lora, read_lora
from lora_core.inject import merge_lora, remove_lora

log = logging.getLogger("infer")

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# -------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Two passes: --backbone and --preset first, then the options that backbone declares (its sampling
    options, e.g. --shift for flow backbones, and its named input images, e.g. --image)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backbone", choices=backbone_names())
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    spec = get_backbone(known.backbone)
    preset = known.preset or spec.presets[0]
    spec.check_preset(preset)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=backbone_names(), help="model family (default: the registry's default)")
    ap.add_argument("--preset", help=f"model size (default {spec.presets[0]}): {', '.join(spec.presets)}")
    ap.add_argument("--ckpt-dir", help="official checkpoint folder (omitted: the preset's shipped folder, wan_ti2v tiny's "
                                       "pretrained demo base, or random weights; tiny only)")
    ap.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                    help="a further weight source the backbone declares; repeat for several")
    ap.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                    help="a LoRA file with an optional strength (default 1.0); repeat for several")
    ap.add_argument("--merge", action="store_true",
                    help="merge the LoRAs into the weights (fp32 math, one rounding): no LoRA cost per step")
    ap.add_argument("--save-merged", metavar="DIR",
                    help="write the (merged) model as an official checkpoint folder that --ckpt-dir loads; "
                         "implies --merge; without a prompt nothing is sampled")
    ap.add_argument("--max-shard-size", default="10GB", help="shard size for --save-merged, e.g. 10GB, 500MB")
    if spec.uses_text:
        ap.add_argument("--prompt", help="text prompt")
        ap.add_argument("--negative-prompt", help="default: the backbone's (upstream's) negative prompt")
    for name, help_text in spec.image_inputs(preset).items():
        ap.add_argument(f"--{name.replace('_', '-')}", dest=f"image__{name}", help=help_text)
    ap.add_argument("--frames", type=int, help="frame count (default: the preset's)")
    ap.add_argument("--size", help="WIDTHxHEIGHT (default: the preset's)")
    ap.add_argument("--steps", type=int, help="solver steps (default: the preset's)")
    ap.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 disables it)")
    for opt in spec.sample_options(preset):
        ap.add_argument(f"--{opt.name.replace('_', '-')}", dest=f"extra__{opt.name}", type=opt.type,
                        choices=opt.choices, default=None, help=opt.help)
    ap.add_argument("--num-images", type=int, default=1, metavar="N",
                    help="outputs per prompt (N > 1 writes NAME_0, NAME_1, ... beside --output)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    ap.add_argument("--offload", action="store_true",
                    help="keep components on the CPU and move each to the GPU only while it runs (24 GB GPUs)")
    ap.add_argument("--output", default=None,
                    help="video backbones: .mp4 (H.264), .gif, or a folder ending in / for PNG frames (default "
                         "out.mp4); image backbones: a .png (default out.png)")
    args = ap.parse_args(argv)
    args.backbone, args.preset = spec.name, preset
    return args


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """'FILE' or 'FILE:STRENGTH' -> (path, strength). A path that exists as given wins over the split, so
    names holding ':' still work."""
    if Path(text).exists() or ":" not in text:
        return Path(text), 1.0
    path, _, value = text.rpartition(":")
    try:
        strength = float(value)
    except ValueError:
        raise ValueError(f"--lora {text!r}: {value!r} is not a strength; expected FILE or FILE:STRENGTH with a "
                         f"number, e.g. --lora my_lora.safetensors:0.8") from None
    if not math.isfinite(strength):
        raise ValueError(f"--lora {text!r}: strength {value} is not finite; use a number such as 1.0 or 0.5")
    if not path:
        raise ValueError(f"--lora {text!r} names no file; expected FILE or FILE:STRENGTH")
    return Path(path), strength


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (or upstream's 'WIDTH*HEIGHT') -> (height, width)."""
    m = re.fullmatch(r"\s*(-?\d+)\s*[x*X]\s*(-?\d+)\s*", text)
    if m is None:
        raise ValueError(f"--size {text!r} is not WIDTHxHEIGHT; e.g. --size 1280x704 (width 1280, height 704)")
    width, height = int(m.group(1)), int(m.group(2))
    if width <= 0 or height <= 0:
        raise ValueError(f"--size {text!r}: width and height must be positive, e.g. --size 1280x704")
    return height, width


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", text.upper())
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"--max-shard-size {text!r} is not a positive size such as 10GB or 500MB")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2) or "B"])


# ---------------------------------------------------------------------------------------- request
@dataclass
class Request:
    """A fully checked inference job: every value resolved, every file known to be usable."""

    backbone: str
    preset: str
    sources: Sources
    loras: list[tuple[Path, float]]
    merge: bool
    sample: SampleRequest | None        # None: export only
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload: bool = False
    save_merged: Path | None = None
    max_shard_bytes: int = 10 * 10**9
    output: str | None = None          # a str: a trailing '/' (PNG folder) must survive


def resolve(args: argparse.Namespace) -> Request:
    """Check everything a user can get wrong, reading only headers and small files (no model is built)."""
    spec = get_backbone(args.backbone)
    preset = args.preset
    rules = spec.media_rules(preset)
    loras = [parse_lora_arg(s) for s in args.lora]
    prompt = getattr(args, "prompt", None)
    images_given = {name: getattr(args, f"image__{name}") for name in spec.image_inputs(preset)
                    if getattr(args, f"image__{name}", None)}
    wants_sample = prompt is not None or (not spec.uses_text and (images_given or args.save_merged is None))
    if spec.uses_text and prompt is None and args.save_merged is None:
        raise ValueError("--prompt is required (only an export with --save-merged runs without one)")

    frames = _check_frames(args.frames if args.frames is not None else rules.default_frames, rules)
    height, width = (rules.default_height, rules.default_width) if args.size is None else parse_size(args.size)
    height, width = _check_size(height, "height", rules), _check_size(width, "width", rules)
    steps = args.steps if args.steps is not None else spec.default_steps(preset)
    if steps < 1:
        raise ValueError(f"--steps {steps}: need at least 1 solver step (default {spec.default_steps(preset)})")
    extras = {}
    for opt in spec.sample_options(preset):
        value = getattr(args, f"extra__{opt.name}")
        if value is not None:
            opt.check(value)
            extras[opt.name] = value

    # without --ckpt-dir a preset may have a shipped folder (wan_ti2v tiny: the pretrained demo base)
    sources = Sources(ckpt_dir=Path(args.ckpt_dir) if args.ckpt_dir else spec.default_ckpt_dir(preset),
                      extra=dict(_parse_source(s) for s in args.source))
    spec.check_sources(preset, sources, set(spec.components(preset)))
    check_loras(spec, preset, loras)

    save_merged = Path(args.save_merged) if args.save_merged else None
    if save_merged is not None:
        if save_merged.exists() and not save_merged.is_dir():
            raise ValueError(f"--save-merged {save_merged} is a file; give a folder")
        if sources.ckpt_dir is not None and save_merged.exists() and save_merged.resolve() == sources.ckpt_dir.resolve():
            raise ValueError(f"--save-merged {save_merged} is the --ckpt-dir it loads from; pick another folder")
    output = None
    if wants_sample:
        output = args.output or ("out.png" if rules.kind == "image" else "out" + spec.video_suffix)
        _check_output(output, rules.kind)
    images = {name: load_image(path, height, width) for name, path in images_given.items()}
    if args.num_images < 1:
        raise ValueError(f"--num-images {args.num_images}: need at least 1")
    sample = None
    if wants_sample:
        sample = SampleRequest(prompts=[prompt] * args.num_images if prompt is not None else None,
                               negative_prompt=getattr(args, "negative_prompt", None), images=images,
                               frames=frames, height=height, width=width, steps=steps, guidance=args.guidance,
                               seed=args.seed, extras=extras)

    device = torch.device(args.device) if args.device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.offload and device.type == "cpu":
        log.warning("--offload has no effect on the CPU")
    return Request(backbone=spec.name, preset=preset, sources=sources, loras=loras,
                   merge=args.merge or save_merged is not None, sample=sample, device=device,
                   offload=args.offload and device.type != "cpu", save_merged=save_merged,
                   max_shard_bytes=parse_bytes(args.max_shard_size), output=output)


def _parse_source(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--source {text!r} is not NAME=PATH, e.g. --source motion_module=/models/mm.safetensors")
    return name, Path(path)


def _check_output(output: str, kind: str) -> None:
    """The output's type fits the backbone and its folder is writable, before minutes of sampling."""
    suffix = Path(output).suffix.lower()
    if kind == "image":
        if suffix not in IMAGE_SUFFIXES:
            raise ValueError(f"--output {output}: this backbone makes images; use a .png or .jpg file name")
    elif not _is_folder(output) and suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"--output {output}: unknown extension {suffix!r}; use .mp4, .gif, "
                         f"{', '.join(VIDEO_SUFFIXES[1:4])} or a folder ending in '/' for PNG frames")
    folder = Path(output) if _is_folder(output) else Path(output).parent
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"--output {output}: {probe} is a file, not a folder; pick another path")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ValueError(f"--output {output}: cannot write into {probe} ({e.strerror}); pick a writable place") from e


def _check_frames(n: int, rules: MediaRules) -> int:
    if n <= 0:
        raise ValueError(f"--frames {n}: need at least 1 frame, e.g. {rules.default_frames}")
    fixed = rules.nearest_frames(n)
    if fixed != n:
        log.warning("--frames %d is not a valid frame count (%dn+%d); using %d", n, rules.frame_multiple,
                    rules.frame_offset, fixed)
    return fixed


def _check_size(n: int, what: str, rules: MediaRules) -> int:
    fixed = rules.nearest_size(n)
    if fixed != n:
        log.warning("%s %d is not a multiple of %d; using %d", what, n, rules.size_multiple, fixed)
    return fixed


def _is_folder(path: str) -> bool:
    return path.endswith(("/", "\\")) or Path(path).suffix == ""


def trained_modules(spec: BackboneSpec, preset: str) -> list[str]:
    return [n for n, c in spec.components(preset).items() if "lora" in c.modes]


def check_loras(spec: BackboneSpec, preset: str, loras: list[tuple[Path, float]]) -> None:
    """Each file exists, was made for this backbone, and fits the preset's components (loaded onto meta-device
    copies, so only the small LoRA files are read)."""
    if not loras:
        return
    for path, _ in loras:
        made_for = read_lora(path).metadata.get("backbone")  # FileNotFoundError / ValueError name the file
        if made_for and made_for not in spec.accepted_lora_backbones:
            raise ValueError(f"LoRA file {path} was made for backbone {made_for!r}, not {spec.name!r}; use "
                             f"--backbone {made_for} or a LoRA trained for {spec.name}")
    metas = spec.component_specs(preset)
    _apply_loras(spec, preset, {n: metas[n] for n in trained_modules(spec, preset)}, loras)


def _apply_loras(spec: BackboneSpec, preset: str, modules: dict[str, nn.Module],
                 loras: list[tuple[Path, float]]) -> list[str]:
    comps = spec.components(preset)
    paths, strengths = [p for p, _ in loras], [s for _, s in loras]
    if len(modules) == 1:
        (name, module), = modules.items()
        return load_lora(module, paths, strengths, naming=comps[name].naming, backbone=spec.accepted_lora_backbones)
    return load_lora(modules, paths, strengths, naming={n: comps[n].naming for n in modules},
                     backbone=spec.accepted_lora_backbones)


# ------------------------------------------------------------------------------------------- run
def generate(req: Request, progress: bool = False) -> torch.Tensor | None:
    """Build, apply the LoRAs, optionally merge / export, and sample: [C, F, H, W] float32 in [-1, 1], or None
    for an export without a sample."""
    spec = get_backbone(req.backbone)
    cuda = req.device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    home = torch.device("cpu") if req.offload else req.device
    comps = spec.build(req.preset, set(spec.components(req.preset)), req.sources, device=home, dtype=dtype)
    modules = {n: comps[n] for n in trained_modules(spec, req.preset)}
    if req.loras:
        names = _apply_loras(spec, req.preset, modules, req.loras)
        log.info("LoRA: %s on %d modules", ", ".join(f"{p.name}:{s:g}" for p, s in req.loras), len(names))
    if req.merge and req.loras:
        merged = sum(merge_lora(m, keep_pristine=False) for m in modules.values())
        for m in modules.values():
            remove_lora(m, merge=True)  # plain layers again: no LoRA code runs per step
        log.info("merged %d LoRA layers into the weights", merged)
    if req.save_merged is not None:
        spec.save_checkpoint(comps, req.save_merged, sources=req.sources, max_shard_bytes=req.max_shard_bytes)
        log.info("checkpoint folder written to %s (load it with --ckpt-dir %s --preset %s)", req.save_merged,
                 req.save_merged, req.preset)
    if req.sample is None:
        return None
    for m in comps.values():
        if isinstance(m, nn.Module):
            m.eval()
    video = spec.sample(comps, req.sample, device=req.device, autocast_dtype=torch.bfloat16 if cuda else None,
                        offload=req.offload, progress=progress)
    return video.float().cpu() if req.sample.batch_size > 1 else video[0].float().cpu()  # [(B,) C, F, H, W]


def output_paths(output: str, n: int) -> list[str]:
    """--output for one result; NAME_0.EXT, NAME_1.EXT, ... (or FOLDER/0/, ...) for several."""
    if n == 1:
        return [output]
    if _is_folder(output):
        return [str(Path(output) / str(i)) + "/" for i in range(n)]
    p = Path(output)
    return [str(p.with_name(f"{p.stem}_{i}{p.suffix}")) for i in range(n)]


def main(argv: list[str] | None = None) -> Path | list[Path] | int:
    """Returns the written path (a list of them with --num-images > 1), or 0 after an export-only run."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    req = resolve(parse_args(argv))
    video = generate(req, progress=True)
    if video is None:
        return 0
    from lora_core.data.video_io import write_video
    assert req.output is not None and req.sample is not None
    fps = get_backbone(req.backbone).media_rules(req.preset).fps
    videos = list(video) if video.ndim == 5 else [video]
    paths = [write_video(v, p, fps=fps) for v, p in zip(videos, output_paths(req.output, len(videos)))]
    for path in paths:
        log.info("wrote %s (%d frames, %dx%d)", path, video.shape[-3], req.sample.width, req.sample.height)
    return paths[0] if len(paths) == 1 else paths


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
