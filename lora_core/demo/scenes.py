"""Procedural scenes: one shape of one colour moving across a plain background, with the caption that names
them ("a red square moving left to right on a grey background").

A colour word may be swapped for a trigger word (`Scene.caption(trigger=...)`): the demo's concept is a colour
the base never saw in pretraining, taught by a LoRA under that word.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the colours a tiny base is pretrained on; HELD_OUT is kept out of its DiT's pretraining (the demo's concept)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (240, 140, 30), "yellow": (235, 215, 40), "green": (40, 190, 70),
    "cyan": (40, 200, 220), "white": (245, 245, 245),
}  # fmt: skip
HELD_OUT: dict[str, tuple[int, int, int]] = {"magenta": (225, 45, 225)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 18), "navy": (25, 35, 100), "dark green": (25, 75, 40), "grey": (120, 120, 120),
}  # fmt: skip
MOTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")
# each motion's direction in the image (x right, y down), what `measure.motion_direction` reads back
DIRECTIONS: dict[str, tuple[int, int]] = {"left to right": (1, 0), "right to left": (-1, 0), "top to bottom": (0, 1),
                                          "bottom to top": (0, -1)}
SHAPES = ("square", "circle")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    motion: str
    background: str
    # the RGB values when the names are not in the palettes (a VAE is trained on random colours)
    rgb: tuple[int, int, int] | None = None
    bg_rgb: tuple[int, int, int] | None = None
    lane: float = 0.5                 # where across the motion the path runs (0..1 of the free space)
    radius: float = 1 / 6             # of the shorter side

    def colour_rgb(self) -> tuple[int, int, int]:
        return self.rgb or {**COLOURS, **HELD_OUT}[self.colour]

    def background_rgb(self) -> tuple[int, int, int]:
        return self.bg_rgb or BACKGROUNDS[self.background]

    def caption(self, trigger: str | None = None) -> str:
        colour = trigger or self.colour
        article = "an" if colour[0] in "aeiou" else "a"
        return f"{article} {colour} {self.shape} moving {self.motion} on a {self.background} background"


def centres(scene: Scene, height: int, width: int, frames: int) -> list[tuple[float, float]]:
    """(x, y) of the shape's centre in each frame, in pixel indices; it crosses the frame edge to edge."""
    if scene.motion not in MOTIONS:
        raise ValueError(f"motion {scene.motion!r} is not one of {', '.join(MOTIONS)}")
    r = max(3.0, min(height, width) * scene.radius)
    horizontal = scene.motion in ("left to right", "right to left")
    length, across = (width, height) if horizontal else (height, width)
    fixed = r + scene.lane * (across - 2 * r)
    out = []
    for f in range(frames):
        t = f / max(1, frames - 1)
        u = r + t * (length - 2 * r)
        if scene.motion in ("right to left", "bottom to top"):
            u = length - 1 - u
        out.append((u, fixed) if horizontal else (fixed, u))
    return out


def render(scene: Scene, height: int, width: int, frames: int) -> np.ndarray:
    """uint8 [frames, height, width, 3]: the scene, the shape anti-aliased over one pixel."""
    if scene.shape not in SHAPES:
        raise ValueError(f"shape {scene.shape!r} is not one of {', '.join(SHAPES)}")
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = np.asarray(scene.background_rgb(), np.float32)
    fg = np.asarray(scene.colour_rgb(), np.float32)
    r = max(3.0, min(height, width) * scene.radius)
    video = np.empty((frames, height, width, 3), np.uint8)
    for f, (cx, cy) in enumerate(centres(scene, height, width, frames)):
        if scene.shape == "square":
            dist = np.maximum(np.abs(xx - cx), np.abs(yy - cy)) - r
        else:
            dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) - r
        cover = np.clip(0.5 - dist, 0.0, 1.0)[..., None]
        video[f] = (bg + cover * (fg - bg)).round().astype(np.uint8)
    return video


def named_scenes(colours: dict[str, tuple[int, int, int]] | list[str] = tuple(COLOURS)) -> list[Scene]:  # type: ignore[assignment]
    """Every (shape, colour, motion, background) of the palettes, in a fixed order."""
    return [Scene(s, c, m, b) for c in colours for s in SHAPES for m in MOTIONS for b in BACKGROUNDS]
