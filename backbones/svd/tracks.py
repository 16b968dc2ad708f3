"""Point trajectories -> Framer's control video (spec svd-framer.md §7.4, §7.8 item 7; Framer
`models_diffusers/utils.py` `gen_gaussian_heatmap` / `generate_gassian_heatmap`, `app.py` `interpolate_trajectory`).

Shapes: F frames, P points (tracks), K clicks per track, H/W pixel height/width. Coordinates are pixel (x, y) of the
output resolution, x along W.

Nothing here imports OpenCV or SciPy (Framer uses both): the disk is OpenCV's filled-circle rasteriser re-written,
the resize is torch bilinear with cv2's geometry, and the spline is scipy's PCHIP re-written; the tests check the
last against scipy.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["gaussian_template", "render_heatmaps", "load_tracks", "interpolate_clicks", "pchip"]

TEMPLATE_SIZE, TEMPLATE_SIGMA = 200, 40.0  # Framer's gen_gaussian_heatmap(imgSize=200), sigma 40 px
SIDE = 20  # half box: the 200 px template is squeezed into ~40 x 40 px (effective sigma ~8 px, radius 20)


def _filled_disk(size: int, cx: int, cy: int, radius: int) -> np.ndarray:
    """OpenCV's `cv2.circle(img, (cx, cy), radius, 1, -1)` on a zero float image (LINE_8, no shift: its integer
    midpoint `Circle` routine filling horizontal spans, ends included, clipped to the image)."""
    img = np.zeros((size, size), np.float32)

    def hline(y: int, x1: int, x2: int) -> None:
        if 0 <= y < size and x1 < size and x2 >= 0:
            img[y, max(x1, 0):min(x2, size - 1) + 1] = 1.0

    err, dx, dy, plus, minus = 0, radius, 0, 1, (radius << 1) - 1
    while dx >= dy:
        hline(cy - dy, cx - dx, cx + dx)
        hline(cy + dy, cx - dx, cx + dx)
        hline(cy - dx, cx - dy, cx + dy)
        hline(cy + dx, cx - dy, cx + dy)
        dy += 1
        err += plus
        plus += 2
        mask = -1 if err > 0 else 0  # OpenCV: (err <= 0) - 1
        err -= minus & mask
        dx += mask
        minus -= mask & 2
    return img


def gaussian_template(size: int = TEMPLATE_SIZE, sigma: float = TEMPLATE_SIGMA) -> np.ndarray:
    """Framer's uint8 [size, size] blob: an isotropic Gaussian centred on pixel (size/2, size/2) (not the image
    centre: Framer's i - size/2), times a filled disk of radius size/2, normalised to peak 1 and then to 255 with
    truncation (`astype(np.uint8)`), in float32 as Framer. Framer evaluates the Gaussian in a per-pixel Python loop
    (scalar libm exp); this vectorised exp may differ in the last ulp, which cannot move a truncated uint8 level
    except on an exact integer boundary."""
    i = np.arange(size, dtype=np.float64)[:, None] - size / 2
    j = np.arange(size, dtype=np.float64)[None, :] - size / 2
    g = (1 / 2 / np.pi / sigma ** 2 * np.exp(-1 / 2 * (i ** 2 / sigma ** 2 + j ** 2 / sigma ** 2))).astype(np.float32)
    g = g * _filled_disk(size, size // 2, size // 2, size // 2)
    g = (g / np.max(g)).astype(np.float32)
    return (g / np.max(g) * 255).astype(np.uint8)


def _resize_bilinear(template: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """cv2.resize(template, (out_w, out_h)) (INTER_LINEAR, uint8): same half-pixel geometry, no antialiasing and
    the same edge clamping as torch's bilinear with align_corners=False; cv2 rounds an 11-bit fixed-point sum, this
    rounds the float one half up, so a level may differ by 1 (about 1% of the pixels, spec §7.8 item 7)."""
    out = F.interpolate(template[None, None], size=(out_h, out_w), mode="bilinear", align_corners=False)[0, 0]
    return torch.floor(out + 0.5).clamp_(0, 255)


def render_heatmaps(tracks: torch.Tensor, height: int, width: int, side: int = SIDE) -> torch.Tensor:
    """Framer's control video: tracks [F, P, 2] pixel (x, y) -> float32 [F, 3, H, W], values 0..255 (integers, not
    normalised; cast to the model dtype by the caller).

    Per frame a zero canvas; per point in order (later points overwrite earlier ones, no max-blend) the template
    resized to the box x1 = int(max(x - side, 1)), x2 = int(min(x + side, W - 1)) (y likewise) is written into
    canvas[y1:y2, x1:x2], so a box at a border is squashed, not cropped, and row/column 0 and H-1/W-1 are never
    painted. Points with x < 0, y < 0, x >= W or y >= H are skipped (as are boxes left empty). The gray canvas is
    repeated to 3 channels.

    Matches Framer exactly in the box geometry, the overwrite order, the skipped points and the template; the
    resized values may differ from cv2's by one level (see `_resize_bilinear`). Framer's app casts tracks to fp16
    before this (`app.py`): pass `tracks.half().float()` to reproduce its boxes at large coordinates.
    """
    if tracks.ndim != 3 or tracks.shape[-1] != 2:
        raise ValueError(f"tracks has shape {tuple(tracks.shape)}; expected [F, P, 2] pixel (x, y) per frame and point")
    if height < 2 or width < 2:
        raise ValueError(f"render_heatmaps height={height}, width={width}; expected at least 2 x 2 pixels")
    template = torch.from_numpy(gaussian_template()).float()
    pts = tracks.detach().to("cpu", torch.float64).tolist()
    canvas = torch.zeros(len(pts), height, width)
    cache: dict[tuple[int, int], torch.Tensor] = {}
    for f, frame in enumerate(pts):
        for x, y in frame:
            if not (0 <= x < width and 0 <= y < height):  # also drops NaN
                continue
            x1, x2 = int(max(x - side, 1)), int(min(x + side, width - 1))
            y1, y2 = int(max(y - side, 1)), int(min(y + side, height - 1))
            if x2 <= x1 or y2 <= y1:
                continue
            key = (y2 - y1, x2 - x1)
            if key not in cache:
                cache[key] = _resize_bilinear(template, *key)
            canvas[f, y1:y2, x1:x2] = cache[key]
    return canvas[:, None].expand(-1, 3, -1, -1).contiguous()


def load_tracks(path: str | Path, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Trajectories from a JSON file -> float32 [F, P, 2] pixel (x, y), rescaled to width x height when given.

    Format: {"frames": F, "width": W, "height": H, "tracks": [[[x, y] * F] * P]}: one list per track, one pair per
    frame, in pixels of a W x H image (x along the width).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"track file {path} does not exist; expected a JSON file "
                                '{"frames": F, "width": W, "height": H, "tracks": [[[x, y], ...F], ...P]}')
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"track file {path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"track file {path} holds a {type(data).__name__}; expected an object with keys "
                         "frames, width, height, tracks")
    missing = [k for k in ("frames", "width", "height", "tracks") if k not in data]
    if missing:
        raise ValueError(f"track file {path} lacks keys {missing}; expected frames, width, height, tracks")
    for key in ("frames", "width", "height"):
        v = data[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"track file {path}: {key}={v!r}; expected a positive integer")
    n_frames, src_w, src_h, raw = data["frames"], data["width"], data["height"], data["tracks"]
    if not isinstance(raw, list):
        raise ValueError(f"track file {path}: tracks is a {type(raw).__name__}; expected a list of tracks, each a "
                         f"list of {n_frames} [x, y] pairs")
    for p, track in enumerate(raw):
        if not isinstance(track, list) or len(track) != n_frames:
            got = len(track) if isinstance(track, list) else type(track).__name__
            raise ValueError(f"track file {path}: track {p} has {got} entries; expected frames={n_frames} [x, y] "
                             "pairs")
        for f, pair in enumerate(track):
            if (not isinstance(pair, list) or len(pair) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in pair)):
                raise ValueError(f"track file {path}: track {p} frame {f} is {pair!r}; expected [x, y], two finite "
                                 "numbers in pixels")
    tracks = torch.tensor(raw, dtype=torch.float32).reshape(len(raw), n_frames, 2).transpose(0, 1)  # [F, P, 2]
    scale = torch.tensor([(width or src_w) / src_w, (height or src_h) / src_h], dtype=torch.float32)
    return (tracks * scale).contiguous()


def pchip(t: torch.Tensor, y: torch.Tensor, t_new: torch.Tensor) -> torch.Tensor:
    """Monotone piecewise-cubic Hermite interpolation (scipy `PchipInterpolator`, extrapolating the end pieces):
    t [K] strictly increasing, y [K, D] -> [len(t_new), D]. Interior slopes: weighted harmonic mean of the
    neighbouring secants (0 at a sign change or a flat secant); ends: the one-sided three-point formula, zeroed
    if its sign differs from the end secant and limited to 3x it when the secants change sign; K = 2 is linear."""
    t, y, t_new = t.double(), y.double(), t_new.double()
    k = t.shape[0]
    if k < 2 or y.shape[0] != k:
        raise ValueError(f"pchip needs >= 2 knots and one y row per knot; got t {tuple(t.shape)}, y {tuple(y.shape)}")
    h = (t[1:] - t[:-1])[:, None]  # [K-1, 1]
    m = (y[1:] - y[:-1]) / h  # [K-1, D] secants
    if k == 2:
        d = torch.cat([m, m])
    else:
        w1, w2 = 2 * h[1:] + h[:-1], h[1:] + 2 * h[:-1]
        flat = (torch.sign(m[1:]) != torch.sign(m[:-1])) | (m[1:] == 0) | (m[:-1] == 0)
        safe0, safe1 = torch.where(flat, 1.0, m[:-1]), torch.where(flat, 1.0, m[1:])
        inner = torch.where(flat, 0.0, (w1 + w2) / (w1 / safe0 + w2 / safe1))

        def edge(h0: torch.Tensor, h1: torch.Tensor, m0: torch.Tensor, m1: torch.Tensor) -> torch.Tensor:
            e = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
            wrong_sign = torch.sign(e) != torch.sign(m0)
            overshoot = (torch.sign(m0) != torch.sign(m1)) & (e.abs() > 3 * m0.abs())
            return torch.where(wrong_sign, 0.0, torch.where(overshoot, 3 * m0, e))

        d = torch.cat([edge(h[0], h[1], m[0], m[1])[None], inner, edge(h[-1], h[-2], m[-1], m[-2])[None]])
    i = (torch.searchsorted(t, t_new, right=True) - 1).clamp(0, k - 2)  # piece of each new t
    hi = h[i]
    s = (t_new - t[i])[:, None] / hi
    s2, s3 = s * s, s * s * s
    return ((2 * s3 - 3 * s2 + 1) * y[i] + (s3 - 2 * s2 + s) * hi * d[i]
            + (-2 * s3 + 3 * s2) * y[i + 1] + (s3 - s2) * hi * d[i + 1])


def interpolate_clicks(points: torch.Tensor | Sequence[Sequence[Sequence[float]]], num_frames: int) -> torch.Tensor:
    """User clicks -> tracks float32 [F, P, 2]: points [P, K, 2] (a tensor, or per-track lists whose K may
    differ), each track a PCHIP spline through its K clicks at t = linspace(0, 1, K), sampled at
    linspace(0, 1, num_frames), x and y separately (Framer's `interpolate_trajectory`). A single click becomes a
    near-stationary track: a second click at (x + 1, y + 1) is appended first, as Framer's app does."""
    if num_frames < 1:
        raise ValueError(f"interpolate_clicks num_frames={num_frames}; expected >= 1")
    tracks = [torch.as_tensor(track, dtype=torch.float64) for track in points]
    t_new = torch.linspace(0, 1, num_frames, dtype=torch.float64)
    out = []
    for p, track in enumerate(tracks):
        if track.ndim != 2 or track.shape[0] < 1 or track.shape[1] != 2:
            raise ValueError(f"interpolate_clicks track {p} has shape {tuple(track.shape)}; expected [K, 2] pixel "
                             "(x, y) clicks, K >= 1")
        if track.shape[0] == 1:
            track = torch.cat([track, track + 1])
        out.append(pchip(torch.linspace(0, 1, track.shape[0], dtype=torch.float64), track, t_new))
    if not out:
        return torch.zeros(num_frames, 0, 2)
    return torch.stack(out, dim=1).float()  # [F, P, 2]
