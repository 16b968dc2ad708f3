"""The one image loader: pixel modes (16-bit, grayscale, alpha, palette, CMYK), EXIF, cover + center crop,
and that training stills and infer.py's conditioning image get the same pixels."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_core.data import load_dataset, load_image, open_image
from tests.lora_core.data.media import cfg_for


def _png16(path: Path, a: np.ndarray) -> Path:
    """Write uint16 [H, W, C] (C = 1, 2, 3, 4) as a 16-bit PNG, by hand: PIL cannot write 16-bit colour PNGs."""
    h, w, c = a.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))  # filter byte 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


GRAY16 = np.array([[0, 257 * 10, 32768, 65535], [1000, 40000, 65000, 128]], dtype=np.uint16)
GRAY16_AS_8 = np.array([[0, 10, 128, 255], [4, 156, 253, 0]], dtype=np.uint8)  # round(v / 257)


def test_16bit_grayscale_png_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    f = tmp_path / "g16.png"
    Image.fromarray(GRAY16).save(f)  # PIL writes mode "I;16" as a 16-bit PNG
    with Image.open(f) as im:
        assert im.mode == "I;16"  # the file really is 16-bit
    a = open_image(f)
    assert a.dtype == np.uint8 and a.shape == (2, 4, 3)
    assert np.array_equal(a, np.repeat(GRAY16_AS_8[..., None], 3, axis=-1))
    x = load_image(f, 2, 4)  # same size: no resize, exact values
    assert torch.equal(x, torch.from_numpy(GRAY16_AS_8).float().div(127.5).sub(1.0).expand(3, 2, 4))
    # The same file hand-written (big-endian samples, as in the PNG spec) reads the same.
    assert np.array_equal(open_image(_png16(tmp_path / "h16.png", GRAY16[..., None])), a)


def test_16bit_png_trains_with_its_real_values(tmp_path: Path) -> None:
    # Before: PIL's convert("RGB") clipped I;16 to 255, so this trained as an all-white frame.
    Image.fromarray(np.full((32, 32), 16448, np.uint16)).save(tmp_path / "grey.png")  # 16448 / 257 = 64
    (tmp_path / "grey.txt").write_text("mid grey")
    ds = load_dataset(cfg_for(tmp_path, buckets=False), progress=False)
    video = ds[0]["video"]
    assert video.shape == (3, 1, 32, 32)
    assert torch.allclose(video, torch.full_like(video, 64 / 127.5 - 1))


def test_16bit_colour_pngs(tmp_path: Path) -> None:
    rgb = np.array([[[0, 32768, 65535], [2570, 51400, 257]]], dtype=np.uint16)  # [1, 2, 3]
    assert np.array_equal(open_image(_png16(tmp_path / "rgb16.png", rgb)), [[[0, 128, 255], [10, 200, 1]]])
    rgba = np.array([[[65535, 0, 0, 65535], [0, 0, 0, 0]]], dtype=np.uint16)  # opaque red, transparent
    assert np.array_equal(open_image(_png16(tmp_path / "rgba16.png", rgba)), [[[255, 0, 0], [255, 255, 255]]])


def test_32bit_integer_and_float_images(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert np.array_equal(open_image(tmp_path / "i.tif")[..., 0], [[0, 128, 255]])  # 16-bit range: read as 16-bit
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match=r"big\.tif.*'I'.*\[0, 70000\]"):
        open_image(tmp_path / "big.tif")
    Image.fromarray(np.array([[0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"f\.tif.*mode 'F' \(32-bit float\)"):
        open_image(tmp_path / "f.tif")


def test_grayscale_palette_and_cmyk(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8)).save(tmp_path / "l.png")
    assert np.array_equal(open_image(tmp_path / "l.png"), [[[0, 0, 0], [100, 100, 100], [255, 255, 255]]])
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2])
    pal.save(tmp_path / "p.png")
    assert np.array_equal(open_image(tmp_path / "p.png"), [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]])
    pal.save(tmp_path / "pt.png", transparency=1)  # palette entry 1 transparent: composited on white
    assert np.array_equal(open_image(tmp_path / "pt.png"), [[[255, 0, 0], [255, 255, 255], [0, 0, 255]]])
    Image.new("CMYK", (2, 1), (255, 0, 0, 0)).save(tmp_path / "c.tif")  # pure cyan ink
    assert np.array_equal(open_image(tmp_path / "c.tif"), [[[0, 255, 255], [0, 255, 255]]])


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128], [0, 0, 0, 0]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    # opaque red stays; transparent red (and transparent black) become white; half-transparent black is grey
    expected = [[[255, 0, 0], [255, 255, 255], [127, 127, 127], [255, 255, 255]]]
    assert np.array_equal(open_image(tmp_path / "a.png"), expected)
    la = np.array([[[0, 255], [0, 0]]], dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert np.array_equal(open_image(tmp_path / "la.png"), [[[0, 0, 0], [255, 255, 255]]])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    im = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as phones write portrait photos
    im.save(tmp_path / "phone.jpg", exif=exif)
    assert open_image(tmp_path / "phone.jpg").shape == (40, 20, 3)


def test_load_image_covers_and_center_crops(tmp_path: Path) -> None:
    stripes = np.zeros((64, 300, 3), dtype=np.uint8)
    stripes[:, :100] = (255, 0, 0)
    stripes[:, 100:200] = (0, 255, 0)
    stripes[:, 200:] = (0, 0, 255)
    Image.fromarray(stripes).save(tmp_path / "s.png")
    x = load_image(tmp_path / "s.png", 64, 64)  # already covers: no resize, the middle 64 columns
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert torch.equal(x, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 64, 64))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "r.png")
    y = load_image(tmp_path / "r.png", 64, 96)  # upscaled to 96x77, then cropped
    assert y.shape == (3, 64, 96) and y.min() >= -1 and y.max() <= 1
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png", 64, 64)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png", 64, 64)


def test_training_stills_and_inference_images_share_one_resize(tmp_path: Path) -> None:
    # A still trained with crop=center at 32x32 gets exactly the pixels infer.py's load_image gives.
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(tmp_path / "still.png")
    (tmp_path / "still.txt").write_text("a still")
    ds = load_dataset(cfg_for(tmp_path, buckets=False, crop="center"), progress=False)
    assert torch.equal(ds[0]["video"][:, 0], load_image(tmp_path / "still.png", 32, 32))
