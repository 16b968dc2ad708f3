"""write_video / read_video round trips, and the decord narrow-frame workaround."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from lora_core.data.video_io import read_video, to_uint8_frames, write_video


def _gradient_video(f: int, h: int, w: int) -> np.ndarray:
    """uint8 [F, H, W, 3] with smooth content that survives lossy coding."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = [np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), np.full_like(xx, 20 * k)], -1) for k in range(f)]
    return np.stack(frames).astype(np.uint8)


def test_mp4_round_trip_from_float_fchw(tmp_path: Path) -> None:
    ref = _gradient_video(9, 64, 96)
    x = torch.from_numpy(ref).permute(0, 3, 1, 2).float() / 127.5 - 1  # [F, C, H, W] in [-1, 1]
    out = write_video(x, tmp_path / "a.mp4", fps=24)
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert float(s.average_rate) == 24
    back = read_video(out)
    assert back.shape == (9, 64, 96, 3) and back.dtype == np.uint8
    assert np.abs(back.astype(int) - ref).mean() < 4


def test_cfhw_and_uint8_layouts_agree(tmp_path: Path) -> None:
    ref = _gradient_video(5, 32, 64)
    cfhw = torch.from_numpy(ref).permute(3, 0, 1, 2).float() / 127.5 - 1  # [C, F, H, W]
    assert np.array_equal(to_uint8_frames(cfhw), ref)
    assert np.array_equal(to_uint8_frames(torch.from_numpy(ref)), ref)
    assert np.array_equal(to_uint8_frames(cfhw[None]), ref)  # [1, C, F, H, W]
    write_video(ref, tmp_path / "u.mp4")
    assert read_video(tmp_path / "u.mp4").shape == (5, 32, 64, 3)


def test_odd_size_is_padded_to_even(tmp_path: Path) -> None:
    write_video(_gradient_video(3, 51, 71), tmp_path / "odd.mp4")
    assert read_video(tmp_path / "odd.mp4").shape == (3, 52, 72, 3)


def test_narrow_frames_decode_with_three_channels(tmp_path: Path) -> None:
    # decord 0.6 returns [H, W, 4] for width 48 and fails get_batch; read_video must still be exact.
    ref = _gradient_video(6, 32, 48)
    write_video(ref, tmp_path / "narrow.mp4", crf=0)
    back = read_video(tmp_path / "narrow.mp4")
    assert back.shape == (6, 32, 48, 3)
    assert np.abs(back.astype(int) - ref).mean() < 4


def test_gif_and_png_folder(tmp_path: Path) -> None:
    ref = _gradient_video(4, 20, 30)
    gif = write_video(ref, tmp_path / "a.gif", fps=10)
    assert read_video(gif).shape == (4, 20, 30, 3)
    folder = write_video(ref, str(tmp_path / "frames") + "/")
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert np.array_equal(read_video(folder), ref)  # PNG is lossless
    write_video(ref, tmp_path / "noext")
    assert (tmp_path / "noext" / "00003.png").is_file()


@pytest.mark.skipif("libvpx-vp9" not in av.codecs_available, reason="this PyAV build has no VP9 encoder")
def test_webm_vp9(tmp_path: Path) -> None:
    write_video(_gradient_video(5, 32, 64), tmp_path / "a.webm")
    assert read_video(tmp_path / "a.webm").shape == (5, 32, 64, 3)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    v = _gradient_video(3, 8, 8)
    with pytest.raises(ValueError, match=r"\.xyz"):
        write_video(v, tmp_path / "a.xyz")
    with pytest.raises(ValueError, match="batch of 2"):
        write_video(torch.zeros(2, 3, 4, 8, 8), tmp_path / "b.mp4")
    with pytest.raises(ValueError, match="layout"):
        to_uint8_frames(torch.zeros(5, 7, 8, 8))
    bad = tmp_path / "junk.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(ValueError, match="junk.mp4"):
        read_video(bad)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")
