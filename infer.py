"""Sample a video from a backbone, with any number of LoRAs (unmerged, or merged into the weights).

    python infer.py --preset tiny --prompt "a red ball" --output out.mp4      # seconds on a CPU, no download
    python infer.py --preset 5b --ckpt-dir Wan2.2-TI2V-5B --lora runs/mine/lora.safetensors:0.8 --merge \
        --prompt "..." --image first.png --output out.mp4                     # 121 frames 1280x704, 50 steps
    python infer.py --preset tiny --lora a.safetensors --save-merged merged/  # export only (no --prompt)

Defaults come from the preset (5b: upstream's 121 frames at 1280x704, 50 UniPC steps, guidance 5, shift 5,
upstream's negative prompt; tiny: its media rules and 10 steps). Everything a user can get wrong (LoRA
files, checkpoint folder, image, sizes, output name) is checked before any model is built.

Shapes: F frames, H/W height/width (pixels).
"""
from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backbones.registry import backbone_names, get_backbone
from backbones.spec import BackboneSpec, MediaRules
from lora_core.formats import load_lora, read_lora
from lora_core.inject import merge_lora, remove_lora

log = logging.getLogger("infer")

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".gif")


# -------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="wan_ti2v", choices=backbone_names())
    ap.add_argument("--preset", default="tiny", help="model size: tiny (random weights, CPU) or 5b")
    ap.add_argument("--ckpt-dir", help="official checkpoint folder (random weights when omitted; tiny only)")
    ap.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                    help="a LoRA file with an optional strength (default 1.0); repeat for several")
    ap.add_argument("--merge", action="store_true",
                    help="merge the LoRAs into the weights (fp32 math, one rounding): no LoRA cost per step")
    ap.add_argument("--save-merged", metavar="DIR",
                    help="write the (merged) model as an official checkpoint folder that --ckpt-dir loads; "
                         "implies --merge; without --prompt nothing is sampled")
    ap.add_argument("--max-shard-size", default="10GB", help="DiT shard size for --save-merged, e.g. 10GB, 500MB")
    ap.add_argument("--prompt", help="text prompt")
    ap.add_argument("--negative-prompt", help="default: the backbone's (upstream's) negative prompt")
    ap.add_argument("--image", help="first frame (resized to cover the output size, then center-cropped)")
    ap.add_argument("--frames", type=int, help="frame count, 4n+1 (5b default 121)")
    ap.add_argument("--size", help="WIDTHxHEIGHT, multiples of 32 (5b default 1280x704)")
    ap.add_argument("--steps", type=int, help="solver steps (5b default 50, tiny 10)")
    ap.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 5; 1 disables it)")
    ap.add_argument("--shift", type=float, help="noise schedule shift (default 5)")
    ap.add_argument("--sampler", default="unipc", choices=["unipc", "euler"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    ap.add_argument("--offload", action="store_true",
                    help="keep components on the CPU and move each to the GPU only while it runs (24 GB GPUs)")
    ap.add_argument("--output", default="out.mp4", help=".mp4 (H.264), .gif, or a folder ending in / for PNGs")
    return ap.parse_args(argv)


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
    ckpt_dir: Path | None
    loras: list[tuple[Path, float]]
    merge: bool
    prompt: str | None
    negative_prompt: str | None
    image: torch.Tensor | None          # [3, H, W] in [-1, 1], already at (height, width)
    frames: int
    height: int
    width: int
    steps: int
    sample_kwargs: dict[str, Any] = field(default_factory=dict)   # guidance/shift when given
    sampler: str = "unipc"
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload: bool = False
    save_merged: Path | None = None
    max_shard_bytes: int = 10 * 10**9
    output: str | None = None          # a str: a trailing '/' (PNG folder) must survive


def resolve(args: argparse.Namespace) -> Request:
    """Check everything a user can get wrong, reading only headers and small files (no model is built)."""
    spec = get_backbone(args.backbone)
    spec.check_preset(args.preset)
    rules = spec.media_rules(args.preset)
    loras = [parse_lora_arg(s) for s in args.lora]
    if args.prompt is None and args.save_merged is None:
        raise ValueError("--prompt is required (only an export with --save-merged runs without one)")

    frames = _check_frames(args.frames if args.frames is not None else rules.default_frames, rules)
    height, width = (rules.default_height, rules.default_width) if args.size is None else parse_size(args.size)
    height, width = _check_size(height, "height", rules), _check_size(width, "width", rules)
    steps = args.steps if args.steps is not None else default_steps(spec, args.preset)
    if steps < 1:
        raise ValueError(f"--steps {steps}: need at least 1 solver step (5b uses 50)")
    kwargs: dict[str, Any] = {}
    if args.guidance is not None:
        kwargs["guidance"] = args.guidance
    if args.shift is not None:
        if not args.shift > 0:
            raise ValueError(f"--shift {args.shift} must be > 0 (5 for Wan2.2 TI2V-5B, 1 for no shift)")
        kwargs["shift"] = args.shift

    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else None
    if ckpt_dir is not None:
        spec.check_checkpoint(args.preset, ckpt_dir, {"dit", "vae", "text_encoder"})
    elif args.preset != "tiny":
        raise ValueError(f"--preset {args.preset} needs --ckpt-dir (the downloaded official folder); only the "
                         "tiny preset runs on random weights")
    check_loras(spec, args.preset, loras)

    save_merged = Path(args.save_merged) if args.save_merged else None
    if save_merged is not None:
        if save_merged.exists() and not save_merged.is_dir():
            raise ValueError(f"--save-merged {save_merged} is a file; give a folder")
        if ckpt_dir is not None and save_merged.exists() and save_merged.resolve() == ckpt_dir.resolve():
            raise ValueError(f"--save-merged {save_merged} is the --ckpt-dir it loads from; pick another folder")
    output = args.output if args.prompt is not None else None
    suffix = Path(args.output).suffix.lower()
    if output is not None and not _is_folder(output) and suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"--output {output}: unknown extension {suffix!r}; use .mp4, .gif, "
                         f"{', '.join(VIDEO_SUFFIXES[1:4])} or a folder ending in '/' for PNG frames")
    image = load_image(args.image, height, width) if args.image else None

    device = torch.device(args.device) if args.device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.offload and device.type == "cpu":
        log.warning("--offload has no effect on the CPU")
    return Request(backbone=spec.name, preset=args.preset, ckpt_dir=ckpt_dir, loras=loras,
                   merge=args.merge or save_merged is not None, prompt=args.prompt,
                   negative_prompt=args.negative_prompt, image=image, frames=frames, height=height, width=width,
                   steps=steps, sample_kwargs=kwargs, sampler=args.sampler, seed=args.seed, device=device,
                   offload=args.offload and device.type != "cpu", save_merged=save_merged,
                   max_shard_bytes=parse_bytes(args.max_shard_size), output=output)


def default_steps(spec: BackboneSpec, preset: str) -> int:
    return spec.default_steps(preset)


def _check_frames(n: int, rules: MediaRules) -> int:
    if n <= 0:
        raise ValueError(f"--frames {n}: a video needs at least 1 frame; frame counts are "
                         f"{rules.frame_stride}n+1, e.g. {rules.default_frames}")
    fixed = rules.nearest_frames(n)
    if fixed != n:
        log.warning("--frames %d is not %dn+1; using %d", n, rules.frame_stride, fixed)
    return fixed


def _check_size(n: int, what: str, rules: MediaRules) -> int:
    fixed = rules.nearest_size(n)
    if fixed != n:
        log.warning("%s %d is not a multiple of %d; using %d", what, n, rules.spatial_multiple, fixed)
    return fixed


def _is_folder(path: str) -> bool:
    return path.endswith(("/", "\\")) or Path(path).suffix == ""


def check_loras(spec: BackboneSpec, preset: str, loras: list[tuple[Path, float]]) -> None:
    """Each file exists, was made for this backbone, and fits the preset's DiT (loaded onto a meta-device
    copy, so only the small LoRA files are read)."""
    if not loras:
        return
    for path, _ in loras:
        made_for = read_lora(path).metadata.get("backbone")  # FileNotFoundError / ValueError name the file
        if made_for and made_for != spec.name:
            raise ValueError(f"LoRA file {path} was made for backbone {made_for!r}, not {spec.name!r}; use "
                             f"--backbone {made_for} or a LoRA trained for {spec.name}")
    meta_dit = spec.component_specs(preset)["dit"]
    load_lora(meta_dit, [p for p, _ in loras], [s for _, s in loras])  # ValueError naming file and keys


# ------------------------------------------------------------------------------------------ image
def load_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file -> [3, H, W] float32 in [-1, 1]: scaled to cover (height, width) keeping its aspect
    (Lanczos, as upstream TI2V), then center-cropped."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--image {path} does not exist")
    try:
        with Image.open(path) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {path} is not a readable image ({e}); use a PNG or JPEG") from e
    scale = max(width / img.width, height / img.height)
    new_w, new_h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((new_w, new_h), Image.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    img = img.crop((left, top, left + width, top + height))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return x.permute(2, 0, 1).float().div(127.5).sub(1.0)  # [3, H, W]


# ------------------------------------------------------------------------------------------- run
def generate(req: Request, progress: bool = False) -> torch.Tensor | None:
    """Build, apply the LoRAs, optionally merge / export, and sample: video [3, F, H, W] float32 in
    [-1, 1], or None for an export without a prompt."""
    spec = get_backbone(req.backbone)
    cuda = req.device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    home = torch.device("cpu") if req.offload else req.device
    comps = spec.build(req.preset, {"dit", "vae", "text_encoder"}, req.ckpt_dir, device=home, dtype=dtype)
    dit = comps.dit
    assert dit is not None
    if req.loras:
        names = load_lora(dit, [p for p, _ in req.loras], [s for _, s in req.loras])
        log.info("LoRA: %s on %d modules", ", ".join(f"{p.name}:{s:g}" for p, s in req.loras), len(names))
    if req.merge and req.loras:
        merged = merge_lora(dit, keep_pristine=False)
        remove_lora(dit, merge=True)  # plain Linear layers again: no LoRA code runs per step
        log.info("merged %d LoRA layers into the weights", merged)
    if req.save_merged is not None:
        save_checkpoint(spec, comps, req.save_merged, req.ckpt_dir, req.max_shard_bytes)
        log.info("checkpoint folder written to %s (load it with --ckpt-dir %s --preset %s)", req.save_merged,
                 req.save_merged, req.preset)
    if req.prompt is None:
        return None
    dit.eval()
    video = spec.sample(comps, [req.prompt], negative_prompt=req.negative_prompt, image=req.image,
                        frames=req.frames, height=req.height, width=req.width, steps=req.steps,
                        sampler=req.sampler, seed=req.seed, device=req.device,
                        autocast_dtype=torch.bfloat16 if cuda else None, offload=req.offload,
                        progress=progress, **req.sample_kwargs)
    return video[0].float().cpu()  # [3, F, H, W]


def save_checkpoint(spec: BackboneSpec, comps: Any, out_dir: Path, ckpt_dir: Path | None,
                    max_shard_bytes: int) -> Path:
    """Official-layout export, written by the backbone's spec."""
    return spec.save_checkpoint(comps, out_dir, source_dir=ckpt_dir, max_shard_bytes=max_shard_bytes)


def main(argv: list[str] | None = None) -> Path | int:
    """Returns the written video's path, or 0 after an export-only run."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    req = resolve(parse_args(argv))
    video = generate(req, progress=True)
    if video is None:
        return 0
    from lora_core.data.video_io import write_video
    assert req.output is not None
    path = write_video(video, req.output, fps=get_backbone(req.backbone).media_rules(req.preset).fps)
    log.info("wrote %s (%d frames, %dx%d)", path, video.shape[1], req.width, req.height)
    return path


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
