"""The built-in sample dataset: small synthetic clips with captions, made locally (no download).

Moving coloured shapes on plain or gradient backgrounds, encoded as real H.264 mp4 with PyAV,
each with a same-name .txt caption that says what moves where; enough for a smoke run of the
whole pipeline (scan -> probe -> decode -> VAE -> LoRA step) and for overfitting checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from lora_core.data.video_io import write_video

logger = logging.getLogger(__name__)

_VERSION = 1  # bump when the generator changes, so existing folders are regenerated
_MANIFEST = ".sample_dataset.json"  # hidden, so scan_dataset does not take it for metadata

_COLOURS = {
    "red": (220, 40, 40), "yellow": (235, 210, 40), "white": (245, 245, 245), "green": (40, 190, 70),
    "orange": (240, 140, 30), "cyan": (40, 200, 220), "pink": (240, 120, 190), "black": (15, 15, 15),
}  # fmt: skip
_BACKGROUNDS = {
    "blue": (30, 60, 170), "dark green": (20, 80, 40), "grey": (120, 120, 120), "purple": (90, 40, 130),
}  # fmt: skip
_MOTIONS = ("left to right", "top to bottom", "right to left", "bottom to top")
_SHAPES = ("square", "circle")


def _scene(i: int) -> tuple[str, str, str, str, bool]:
    """(shape, colour, motion, background, gradient) of clip i; cycles through combinations."""
    colour = list(_COLOURS)[i % len(_COLOURS)]
    background = list(_BACKGROUNDS)[(i + i // len(_COLOURS)) % len(_BACKGROUNDS)]
    return _SHAPES[i % 2], colour, _MOTIONS[(i // 2 + i) % 4], background, (i // 4) % 2 == 1


def _render(i: int, height: int, width: int, frames: int) -> tuple[np.ndarray, str]:
    """uint8 [F, H, W, 3] clip i and its caption."""
    shape, colour, motion, background, gradient = _scene(i)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = np.empty((height, width, 3), np.float32)
    bg[:] = _BACKGROUNDS[background]
    if gradient:  # darker towards the bottom, so the background has structure to learn
        bg *= (1.0 - 0.6 * yy / max(1, height - 1))[..., None]
    r = max(3.0, min(height, width) / 6)
    video = np.empty((frames, height, width, 3), np.uint8)
    for f in range(frames):
        t = f / max(1, frames - 1)
        u = r + t * (width - 2 * r) if "left" in motion else r + t * (height - 2 * r)
        if motion in ("right to left", "bottom to top"):
            u = (width if "left" in motion else height) - u
        cx, cy = (u, height / 2) if "left" in motion else (width / 2, u)
        if shape == "square":
            mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
        else:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        frame = bg.copy()
        frame[mask] = _COLOURS[colour]
        video[f] = frame.round().astype(np.uint8)
    bg_words = f"a {background} gradient background" if gradient else f"a {background} background"
    article = "an" if colour[0] in "aeiou" else "a"
    return video, f"{article} {colour} {shape} moving {motion} on {bg_words}"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_sample_dataset(
    dir: str | Path, num_clips: int = 4, *, height: int = 64, width: int = 96, num_frames: int = 33, fps: float = 24
) -> Path:
    """Write clip_000.mp4 + clip_000.txt, ... into `dir` (a folder-of-clips dataset); return `dir`.

    Deterministic and idempotent: a folder already holding the same clips (checked by hash) is
    left untouched. Clips are H.264 yuv420p, so height and width must be even.
    """
    if num_clips < 1 or num_frames < 1:
        raise ValueError(f"need num_clips >= 1 and num_frames >= 1, got {num_clips} and {num_frames}")
    if height % 2 or width % 2 or height < 16 or width < 16:
        raise ValueError(f"height and width must be even and >= 16 for H.264, got {height}x{width}")
    out = Path(dir).expanduser()
    params = dict(version=_VERSION, num_clips=num_clips, height=height, width=width, num_frames=num_frames, fps=fps)
    manifest = out / _MANIFEST
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
            if old.get("params") == params and all(
                (out / name).is_file() and _sha(out / name) == sha for name, sha in old["files"].items()
            ):
                return out
        except (ValueError, KeyError, OSError):
            pass  # unreadable manifest: regenerate
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for i in range(num_clips):
        video, caption = _render(i, height, width, num_frames)
        clip, txt = out / f"clip_{i:03d}.mp4", out / f"clip_{i:03d}.txt"
        write_video(video, clip, fps=fps)
        txt.write_text(caption + "\n", encoding="utf-8")
        files[clip.name], files[txt.name] = _sha(clip), _sha(txt)
    manifest.write_text(json.dumps({"params": params, "files": files}, indent=1))
    logger.info(
        "wrote the sample dataset (%d clips, %dx%d, %d frames at %g fps) to %s",
        *(num_clips, width, height, num_frames, fps, out),
    )
    return out


def make_sample_images(dir: str | Path, num_images: int = 8, *, height: int = 64, width: int = 64) -> Path:
    """Write img_000.png + img_000.txt, ... (the same scenes as the clips, the shape where its motion starts);
    the embedded dataset of image backbones. Deterministic; an existing identical set is left untouched."""
    from PIL import Image

    if num_images < 1:
        raise ValueError(f"need num_images >= 1, got {num_images}")
    out = Path(dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        video, caption = _render(i, height, width, 2)
        caption = caption.replace(" moving ", " at the start of its way ")
        png, txt = out / f"img_{i:03d}.png", out / f"img_{i:03d}.txt"
        if not (png.is_file() and txt.is_file() and txt.read_text(encoding="utf-8").strip() == caption):
            Image.fromarray(video[0]).save(png)
            txt.write_text(caption + "\n", encoding="utf-8")
    logger.info("wrote the sample image dataset (%d images, %dx%d) to %s", num_images, width, height, out)
    return out
