"""The built-in sample dataset: small synthetic clips with captions, made locally (no download).

Moving coloured shapes on plain or gradient backgrounds, encoded as real H.264 mp4 with PyAV,
each with a same-name .txt caption that says what moves where; enough for a smoke run of the
whole pipeline (scan -> probe -> decode -> VAE -> LoRA step) and for overfitting checks. The same
scenes also come as stills (`make_sample_images`) and as start/end image pairs (`make_sample_pairs`),
optionally with a `.tracks.json` sidecar holding the shape's centre in every frame:

    {"frames": F, "width": W, "height": H, "tracks": [[[x, y], ... one per frame], ... one per point]}

with one point (the shape's centre), in the coordinates of `VideoDataset.meta`'s geometry: continuous
pixel coordinates, (0, 0) the top-left corner of the frame, x along the width, pixel centres at +0.5.
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


def _centres(i: int, height: int, width: int, frames: int) -> list[tuple[float, float]]:
    """(cx, cy) of clip i's shape in each frame, in pixel indices (the centre of pixel j is j)."""
    _, _, motion, _, _ = _scene(i)
    r = max(3.0, min(height, width) / 6)
    out = []
    for f in range(frames):
        t = f / max(1, frames - 1)
        u = r + t * (width - 2 * r) if "left" in motion else r + t * (height - 2 * r)
        if motion in ("right to left", "bottom to top"):
            u = (width if "left" in motion else height) - u
        out.append((u, height / 2) if "left" in motion else (width / 2, u))
    return out


def _tracks(i: int, height: int, width: int, frames: int) -> dict:
    """The tracks.json content of clip i (format in the module docstring): its shape's centre per frame."""
    # +0.5: from pixel indices (as `_render` draws) to the corner-based coordinates of the geometry.
    track = [[round(cx + 0.5, 4), round(cy + 0.5, 4)] for cx, cy in _centres(i, height, width, frames)]
    return {"frames": frames, "width": width, "height": height, "tracks": [track]}


def _tracks_bytes(i: int, height: int, width: int, frames: int) -> bytes:
    return (json.dumps(_tracks(i, height, width, frames)) + "\n").encode()


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
    for f, (cx, cy) in enumerate(_centres(i, height, width, frames)):
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
    dir: str | Path,
    num_clips: int = 4,
    *,
    height: int = 64,
    width: int = 96,
    num_frames: int = 33,
    fps: float = 24,
    tracks: bool = False,
) -> Path:
    """Write clip_000.mp4 + clip_000.txt, ... into `dir` (a folder-of-clips dataset); return `dir`.

    With `tracks`, also clip_000.tracks.json, ...: the shape's centre in each of the num_frames source
    frames (format in the module docstring), a sidecar for MediaRules(sidecars=("tracks.json",)).
    Deterministic and idempotent: a folder already holding the same clips (checked by hash) is
    left untouched. Clips are H.264 yuv420p, so height and width must be even.
    """
    if num_clips < 1 or num_frames < 1:
        raise ValueError(f"need num_clips >= 1 and num_frames >= 1, got {num_clips} and {num_frames}")
    if height % 2 or width % 2 or height < 16 or width < 16:
        raise ValueError(f"height and width must be even and >= 16 for H.264, got {height}x{width}")
    params = dict(version=_VERSION, num_clips=num_clips, height=height, width=width, num_frames=num_frames, fps=fps)
    if tracks:  # only when asked, so existing folders keep their manifest
        params["tracks"] = True

    def clips():
        for i in range(num_clips):
            video, caption = _render(i, height, width, num_frames)
            side = {"tracks.json": _tracks_bytes(i, height, width, num_frames)} if tracks else {}
            yield f"clip_{i:03d}", video, caption, side
    return _write_clip_set(Path(dir).expanduser(), params, clips(), fps)


def _write_clip_set(out: Path, params: dict, clips, fps: float) -> Path:
    """Write (stem, uint8 video, caption, {sidecar suffix: bytes}) as stem.mp4 + stem.txt (+ sidecars) with a
    manifest of hashes; a folder already holding the same files for the same params is left untouched."""
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
    for stem, video, caption, sidecars in clips:
        clip, txt = out / f"{stem}.mp4", out / f"{stem}.txt"
        write_video(video, clip, fps=fps)
        txt.write_text(caption + "\n", encoding="utf-8")
        files[clip.name], files[txt.name] = _sha(clip), _sha(txt)
        for suffix, data in sidecars.items():
            side = out / f"{stem}.{suffix}"
            side.write_bytes(data)
            files[side.name] = _sha(side)
    manifest.write_text(json.dumps({"params": params, "files": files}, indent=1))
    logger.info("wrote the sample dataset (%d clips, %s) to %s", len(files) // 2 if not params.get("tracks")
                else len(files) // 3, ", ".join(f"{k}={v}" for k, v in params.items() if k != "version"), out)
    return out


def concept_scenes(colour: str = "magenta", num_clips: int = 8):
    """The scenes of `make_concept_dataset`: the colour on both shapes, every motion and background, and never
    `DEMO_HELD_OUT_SCENE` (the combination the demo prompt asks for, so its sample shows generalisation)."""
    from lora_core.demo import scenes as sc

    out = []
    i = 0
    while len(out) < num_clips:
        scene = sc.Scene(sc.SHAPES[i % 2], colour, sc.MOTIONS[(i // 2) % 4], list(sc.BACKGROUNDS)[(i + i // 4) % 4])
        if (scene.shape, scene.motion, scene.background) != DEMO_HELD_OUT_SCENE:
            out.append(scene)
        i += 1
    return out


# the demo's trigger word and the (shape, motion, background) of its prompt, left out of the concept dataset
DEMO_TRIGGER = "sks"
DEMO_HELD_OUT_SCENE = ("circle", "left to right", "black")


def demo_prompt(trigger: str = DEMO_TRIGGER) -> str:
    """The prompt the demo samples before and after: the held-out combination, the trigger for its colour."""
    from lora_core.demo import scenes as sc

    shape, motion, background = DEMO_HELD_OUT_SCENE
    return sc.Scene(shape, "magenta", motion, background).caption(trigger=trigger)


def make_concept_dataset(dir: str | Path, *, colour: str = "magenta", trigger: str = DEMO_TRIGGER, num_clips: int = 8,
                         height: int = 64, width: int = 64, num_frames: int = 17, fps: float = 24) -> Path:
    """The embedded demo's dataset: clips of a shape in `colour` (one a tiny base never saw in pretraining,
    `lora_core.demo.scenes.HELD_OUT`) captioned with `trigger` in place of the colour word, e.g.
    "a sks square moving left to right on a black background". Deterministic and idempotent like
    `make_sample_dataset`."""
    from lora_core.demo import scenes as sc

    if num_clips < 1 or num_frames < 1:
        raise ValueError(f"need num_clips >= 1 and num_frames >= 1, got {num_clips} and {num_frames}")
    params = dict(version=_VERSION, concept=colour, trigger=trigger, num_clips=num_clips, height=height,
                  width=width, num_frames=num_frames, fps=fps)
    clips = ((f"clip_{i:03d}", sc.render(scene, height, width, num_frames), scene.caption(trigger=trigger), {})
             for i, scene in enumerate(concept_scenes(colour, num_clips)))
    return _write_clip_set(Path(dir).expanduser(), params, clips, fps)


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


def _write_if_changed(path: Path, data: bytes) -> None:
    if not (path.is_file() and path.read_bytes() == data):
        path.write_bytes(data)


def make_sample_pairs(dir: str | Path, num_pairs: int = 8, *, height: int = 64, width: int = 64, frames: int = 4) -> Path:
    """Write start/end image pairs into `dir` (the folder layout of pairs); return `dir`.

    Pair i is the first and last frame of the sample clip i rendered with `frames` frames (the scenes
    of `make_sample_dataset`): pair_000_start.png + pair_000_end.png, the caption pair_000.txt, and
    pair_000.tracks.json with the shape's centre in each of the `frames` frames the pair stands for
    (format in the module docstring; frame 0 is the start image, frame frames-1 the end image).
    Load it with MediaRules(..., image_pairs=True, sidecars=("tracks.json",)) and data.pair_frames=frames.
    Deterministic; files already holding the same bytes are left untouched.
    """
    import io

    from PIL import Image

    if num_pairs < 1 or frames < 2:
        raise ValueError(f"need num_pairs >= 1 and frames >= 2 (a start and an end frame), got {num_pairs} and {frames}")
    if height < 8 or width < 8:
        raise ValueError(f"height and width must be >= 8, got {height}x{width}")
    out = Path(dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for i in range(num_pairs):
        video, caption = _render(i, height, width, frames)
        name = f"pair_{i:03d}"
        for role, frame in (("start", video[0]), ("end", video[-1])):
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="PNG")
            _write_if_changed(out / f"{name}_{role}.png", buf.getvalue())
        _write_if_changed(out / f"{name}.txt", (caption + "\n").encode())
        _write_if_changed(out / f"{name}.tracks.json", _tracks_bytes(i, height, width, frames))
    logger.info("wrote the sample pair dataset (%d pairs, %dx%d, %d frames each) to %s", num_pairs, width, height, frames, out)
    return out
