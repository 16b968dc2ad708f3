"""Still images in, and the one resize + crop every training and inference pixel goes through.

Letters: F frames, C channels (3, RGB), H height, W width.

`resize_crop` is torch's antialiased bilinear resize on the float tensor, the path video frames
have always taken; images (training stills and infer.py's conditioning image) go through it too,
so a LoRA is trained on pixels resized exactly as the ones it conditions on at inference, and the
video path (what the embedded default trains on) stays bit-identical. PIL's Lanczos, which infer.py
used before, would give images a sharper filter than the clips the model learnt from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F_nn

from lora_core.data.sampling import resize_crop_plan
from lora_core.data.video_io import _short

# Modes read as they are after PIL's convert("RGB") (CMYK and YCbCr by PIL's own conversion).
_RGB_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")
# Modes with an alpha channel: composited on white (see `_on_white`).
_ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa")
# 16-bit grayscale (16-bit PNGs open as one of these, or as "I" in older Pillow).
_GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_MODE_NAMES = {
    "F": "32-bit float", "I": "32-bit integer", "LAB": "CIE L*a*b*", "HSV": "HSV",
    "La": "premultiplied grayscale + alpha", "I;32": "32-bit integer",
}  # fmt: skip


def open_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 [H, W, 3] RGB, rotated upright by its EXIF orientation.

    16-bit grayscale is scaled to 8 bits (v / 257, rounded; 16-bit colour PIL itself reduces to its
    high byte), grayscale and palette images expanded
    to RGB, and transparent pixels composited on white. Raises FileNotFoundError for a missing file
    and ValueError naming the file for one PIL cannot read or a mode it cannot turn into RGB.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); re-export or delete it")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # phone photos store rotation in EXIF
            return _to_rgb(im, path)
    except ValueError:
        raise
    except Exception as e:
        why = _short(e)
        raise ValueError(f"cannot read image {path} ({'not a readable image' if str(path) in why else why})") from e


def _to_rgb(im: "Image.Image", path: Path) -> np.ndarray:  # noqa: F821
    mode = im.mode
    if mode in _GRAY16_MODES or mode == "I":
        return _gray16_to_rgb8(np.asarray(im), mode, path)
    if mode in _ALPHA_MODES or (mode in ("1", "L", "P", "RGB") and "transparency" in im.info):
        return _on_white(np.asarray(im.convert("RGBA")))
    if mode in _RGB_MODES:
        return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy shares it
    what = _MODE_NAMES.get(mode, "an unsupported pixel format")
    raise ValueError(
        f"cannot read image {path}: PIL mode {mode!r} ({what}) has no defined conversion to RGB here; "
        "save it as an 8- or 16-bit RGB/grayscale PNG or a JPEG"
    )


def _gray16_to_rgb8(a: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """uint16 (or int32 holding 16-bit values) [H, W] -> uint8 [H, W, 3]; 65535 -> 255, rounded."""
    v = a.astype(np.int64)
    if mode == "I" and v.size and (v.min() < 0 or v.max() > 65535):
        # 32-bit integer images (some TIFFs) have no agreed white level; guessing one would silently
        # change the brightness of the training data.
        raise ValueError(
            f"cannot read image {path}: PIL mode 'I' (32-bit integer) with values in [{v.min()}, {v.max()}], "
            "outside the 16-bit range it is read as; save it as an 8- or 16-bit PNG"
        )
    g = ((v + 128) // 257).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 4] -> [H, W, 3] composited on white.

    Dropping alpha would train on whatever colour the transparent pixels happen to store (often
    black or leftover garbage); white is the usual background of cut-outs and stickers.
    """
    rgb, alpha = rgba[..., :3].astype(np.float32), rgba[..., 3:].astype(np.float32) / 255.0
    return np.rint(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def resize_crop(
    frames: np.ndarray, resize: tuple[int, int], crop: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """uint8 [F, h, w, 3] -> float32 [C, F, H, W] in [-1, 1]: resized to `resize` (rh, rw) with
    antialiased bilinear filtering (skipped when already that size), then cropped to `size` (H, W)
    at `crop` (top, left)."""
    (rh, rw), (top, left), (out_h, out_w) = resize, crop, size
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [F, 3, h, w]
    out = torch.empty(x.shape[0], 3, out_h, out_w)
    for i in range(0, x.shape[0], 8):  # chunks: 49 frames of 1080p in float32 would be 1.2 GB
        chunk = x[i : i + 8].float()
        if chunk.shape[-2:] != (rh, rw):
            chunk = F_nn.interpolate(chunk, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + 8] = chunk[:, :, top : top + out_h, left : left + out_w]
    return out.div_(127.5).sub_(1.0).clamp_(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


def load_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file -> float32 [3, H, W] in [-1, 1]: scaled to cover (height, width) keeping its
    aspect, then center-cropped; the same pixels a training still of that size gets with crop=center."""
    if height < 1 or width < 1:
        raise ValueError(f"load_image needs a positive size, got height={height} width={width}")
    pixels = open_image(path)
    rh, rw, top, left = resize_crop_plan(*pixels.shape[:2], height, width, 0, 0, random_crop=False)
    return resize_crop(pixels[None], (rh, rw), (top, left), (height, width))[:, 0]  # [3, H, W]
