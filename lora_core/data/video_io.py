"""Video files in and out: H.264 mp4 (PyAV), GIF and PNG-frame folders; decord reading.

Letters: F frames, C channels (3, RGB), H height, W width.

Float videos are in [-1, 1] (what the VAE decodes to); uint8 videos are [F, H, W, C].
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write

logger = logging.getLogger(__name__)

# Extensions written through PyAV, with the encoder tried first for each.
_CONTAINER_CODECS: dict[str, tuple[str, ...]] = {
    ".mp4": ("libx264", "h264", "mpeg4"),
    ".mov": ("libx264", "h264", "mpeg4"),
    ".mkv": ("libx264", "h264", "mpeg4"),
    ".webm": ("libvpx-vp9", "libvpx"),
}


def to_uint8_frames(frames: torch.Tensor | np.ndarray, layout: str | None = None) -> np.ndarray:
    """Convert a video to uint8 [F, H, W, C] (C = 3).

    Accepted inputs: float tensor [F, C, H, W] or [C, F, H, W] (or [1, C, F, H, W]) in [-1, 1],
    or uint8 [F, H, W, C] (tensor or array). `layout` ("FCHW", "CFHW", "FHWC") settles the
    case where the shape alone is ambiguous (e.g. 3 frames of 3 channels); otherwise the axis of
    size 1 or 3 is taken as channels, and [C, F, H, W] wins a tie (it is what the VAE returns).
    """
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy array video, got {type(frames).__name__}")
    x = frames.detach().cpu()
    if x.ndim == 5:
        if x.shape[0] != 1:
            raise ValueError(
                f"write_video got a batch of {x.shape[0]} videos (shape {tuple(x.shape)}); "
                "pass one video at a time, e.g. video[0]"
            )
        x = x[0]
    if x.ndim != 4:
        raise ValueError(
            f"expected a 4-D video [F, C, H, W], [C, F, H, W] or uint8 [F, H, W, C], got shape {tuple(x.shape)}"
        )
    if layout is None:
        if x.dtype == torch.uint8:
            layout = "FHWC"
        elif x.shape[0] in (1, 3) and x.shape[1] not in (1, 3):
            layout = "CFHW"
        elif x.shape[1] in (1, 3):
            layout = "FCHW" if x.shape[0] not in (1, 3) else "CFHW"
        else:
            raise ValueError(
                f"cannot tell the channel axis of a float video of shape {tuple(x.shape)}: expected "
                "[F, C, H, W] or [C, F, H, W] with C = 1 or 3; pass layout='FCHW' or 'CFHW'"
            )
    layout = layout.upper()
    if layout not in ("FCHW", "CFHW", "FHWC"):
        raise ValueError(f"layout must be 'FCHW', 'CFHW' or 'FHWC', got {layout!r}")
    if layout == "CFHW":
        x = x.permute(1, 2, 3, 0)
    elif layout == "FCHW":
        x = x.permute(0, 2, 3, 1)
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ValueError(f"expected a float video in [-1, 1] or uint8, got dtype {x.dtype}")
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    if x.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[-1]} (video shape after layout {tuple(x.shape)})")
    if x.shape[0] == 0:
        raise ValueError("cannot write a video with 0 frames")
    return np.ascontiguousarray(x.numpy())


def _is_frame_folder(path: str | Path) -> bool:
    return str(path).endswith(("/", "\\")) or Path(path).suffix == ""


def write_video(
    frames: torch.Tensor | np.ndarray,
    path: str | Path,
    fps: float = 24,
    *,
    crf: int = 18,
    layout: str | None = None,
) -> Path:
    """Write a video [F, C, H, W] / [C, F, H, W] float in [-1, 1] or uint8 [F, H, W, C] to `path`.

    The suffix picks the format: .mp4/.mov/.mkv -> H.264 yuv420p (odd sizes are padded by one
    edge pixel, since 4:2:0 chroma needs even sizes), .webm -> VP9, .gif -> animated GIF
    (PIL), .png/.jpg/.webp -> one still image (a single frame), no suffix or a trailing "/" -> a folder of
    00000.png, 00001.png, ...
    Returns the written path.
    """
    video = to_uint8_frames(frames, layout)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if _is_frame_folder(path):
        return _write_png_folder(video, Path(path))
    path = Path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        return _write_gif(video, path, fps)
    if suffix in _IMAGE_SUFFIXES:
        if len(video) != 1:
            raise ValueError(f"cannot write {len(video)} frames to the image {path}; use a video suffix or a "
                             "folder ending in '/'")
        return _write_image(video[0], path)
    if suffix in _CONTAINER_CODECS:
        return _write_av(video, path, fps, crf, _CONTAINER_CODECS[suffix])
    raise ValueError(
        f"cannot write {path}: unknown extension {suffix!r}; use .mp4 (H.264), .mov, .mkv, .webm, "
        ".gif, or a folder path ending in '/' for PNG frames"
    )


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _write_image(frame: np.ndarray, path: Path) -> Path:
    from PIL import Image

    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: Image.fromarray(frame).save(tmp, format=fmt))


def _write_png_folder(video: np.ndarray, folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(video):
        Image.fromarray(frame).save(folder / f"{i:05d}.png")
    return folder


def _write_gif(video: np.ndarray, path: Path, fps: float) -> Path:
    from PIL import Image

    images = [Image.fromarray(f) for f in video]
    # GIF stores delays in 1/100 s, so rates above 50 fps are not representable.
    duration_ms = max(20, int(round(1000 / fps)))
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path


def _pick_encoder(candidates: tuple[str, ...], path: Path) -> str:
    import av

    for name in candidates:
        if name in av.codecs_available:
            return name
    raise ValueError(
        f"cannot write {path}: none of the encoders {candidates} is available in this PyAV build; "
        "install a PyAV wheel with libx264 (pip install av) or write a .gif / PNG folder instead"
    )


def _write_av(video: np.ndarray, path: Path, fps: float, crf: int, candidates: tuple[str, ...]) -> Path:
    import av

    codec = _pick_encoder(candidates, path)
    f, h, w, _ = video.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        logger.debug("padding %s from %dx%d to %dx%d for yuv420p", path, w, h, w + pad_w, h + pad_h)
        video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    # PyAV wants a rational rate; limit_denominator keeps 23.976 as 24000/1001.
    rate = Fraction(fps).limit_denominator(1001)

    def write(tmp: Path) -> None:  # the temporary name keeps the suffix: PyAV picks the container from it
        with av.open(str(tmp), mode="w") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width = w + pad_w
            stream.height = h + pad_h
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(crf), "preset": "medium"}
            elif codec.startswith("libvpx"):
                stream.options = {"crf": str(max(crf, 4)), "b": "0"}
            else:
                stream.options = {"qscale": "2"}
            for frame in video:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    return atomic_write(path, write)  # a reader never sees a half-written file


def decode_frames(reader: "decord.VideoReader", indices: list[int]) -> np.ndarray:  # noqa: F821
    """Decode `indices` from an open decord reader as uint8 [F, H, W, 3].

    decord 0.6 infers the channel count from the padded row stride, so narrow frames (e.g. width
    48) come back as [H, W, 4] with garbage in the padding and `get_batch` fails; the rows are
    re-cut to W * 3 bytes here, frame by frame, which gives the exact pixels.
    """
    if not indices:
        raise ValueError("decode_frames needs at least one frame index")
    first = reader[indices[0]].asnumpy()
    if first.ndim == 3 and first.shape[2] == 3:
        return reader.get_batch(list(indices)).asnumpy()
    out = []
    for i, idx in enumerate(indices):
        raw = first if i == 0 else reader[idx].asnumpy()
        h, w = raw.shape[:2]
        out.append(raw.reshape(h, -1)[:, : w * 3].reshape(h, w, 3))
    return np.stack(out)


def open_reader(path: str | Path, num_threads: int = 0) -> "decord.VideoReader":  # noqa: F821
    """Open `path` with decord on the CPU; any failure becomes a ValueError naming the file."""
    import decord

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes); re-export or delete it")
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=num_threads)
    except Exception as e:  # decord raises RuntimeError or DECORDError; ffmpeg's reason goes to stderr
        why = _short(e)
        why = "not a readable video" if str(path) in why else why
        raise ValueError(f"cannot decode {path} ({why}); is it a complete video file? re-export or delete it") from e


def _short(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][-200:] if lines else type(e).__name__


def read_video(path: str | Path) -> np.ndarray:
    """Read a whole video as uint8 [F, H, W, C]: decord for video files, PIL for .gif / PNG folders."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise ValueError(f"{path} is a folder with no .png frames")
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    reader = open_reader(path)
    n = len(reader)
    if n == 0:
        raise ValueError(f"{path} has no video frames")
    try:
        return decode_frames(reader, list(range(n)))
    except Exception as e:
        raise ValueError(f"cannot decode all {n} frames of {path}: {_short(e)}") from e
