"""A contact sheet: a few frames of each video side by side, one labelled row per video, as one PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .measure import as_frames


def contact_sheet(rows: dict[str, object], path: str | Path, columns: int = 5, scale: int = 2) -> Path:
    """Write `rows` (label -> video, any form `measure.as_frames` reads) as a PNG at `path`: `columns` frames
    evenly spaced from first to last, each enlarged `scale` times (nearest), the label above each row."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("contact_sheet needs at least one video")
    strips = []
    for label, video in rows.items():
        frames = as_frames(video).round().clip(0, 255).astype(np.uint8)
        picks = np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int)
        tiles = [np.kron(frames[i], np.ones((scale, scale, 1), np.uint8)) for i in picks]
        gap = np.full((tiles[0].shape[0], 2, 3), 255, np.uint8)
        strip = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
        strips.append((label, strip))
    width = max(s.shape[1] for _, s in strips)
    band = 14
    sheet = Image.new("RGB", (width, sum(s.shape[0] + band for _, s in strips)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for label, strip in strips:
        draw.text((2, y + 1), label, fill=(0, 0, 0))
        sheet.paste(Image.fromarray(strip), (0, y + band))
        y += band + strip.shape[0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
