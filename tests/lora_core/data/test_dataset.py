"""VideoDataset on real encoded clips: fps and stride sampling, buckets, bad input, determinism, metadata."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from lora_core.data import (
    DataConfig,
    VideoDataset,
    collate,
    epoch_batches,
    load_dataset,
    make_buckets,
    nearest_bucket,
    scan_dataset,
)
from tests.lora_core.data.media import IMAGE_LIKE, STRIDE_LIKE, WAN_LIKE, cfg_for, make_clip, make_image


def _levels(video: torch.Tensor) -> np.ndarray:
    """Mean grey level of each frame of [C, F, H, W] in [-1, 1], back in 0..255."""
    return ((video.mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()


def test_fps_resampling_reads_the_right_frames(tmp_path: Path) -> None:
    make_clip(tmp_path / "c30.mp4", w=64, h=64, n=30, fps=30, levels=True)
    (tmp_path / "c30.txt").write_text("grey ramp")
    ds = load_dataset(cfg_for(tmp_path, num_frames=49, clip_start="head", buckets=False), progress=False)
    item = ds[0]
    assert ds.buckets[0] == (21, 32, 32)  # 24 frames at 24 fps -> longest 4n+1 is 21
    assert item["video"].shape == (3, 21, 32, 32)
    expected = 8 * np.floor(np.arange(21) * 30 / 24)
    assert np.abs(_levels(item["video"]) - expected).max() < 3
    meta = item["meta"]
    old = dict(fps=24.0, frame_indices=ds.plan(0).frames, num_frames=21, source_fps=30.0, is_image=False)
    assert {k: meta[k] for k in old} == old
    assert meta["known_frames"] == list(range(21)) and not meta["is_pair"]
    assert meta["geometry"] == dict(source_size=[64, 64], resize=[32, 32], crop=[0, 0], flip=False, size=[32, 32])
    assert meta["sidecars"] == {} and meta["extra"] == {}
    assert meta["frame_indices"][:6] == [0, 1, 2, 3, 5, 6]


def test_stride_sampling_reads_every_nth_frame(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_clip(tmp_path / "ramp.mp4", w=32, h=32, n=30, fps=30, levels=True)
    make_clip(tmp_path / "short.mp4", w=32, h=32, n=20, fps=30)
    for n in ("ramp", "short"):
        (tmp_path / f"{n}.txt").write_text(n)
    cfg = cfg_for(tmp_path, STRIDE_LIKE, num_frames=8, clip_start="head", buckets=False)
    with caplog.at_level(logging.INFO):
        ds = load_dataset(cfg, progress=False)
    by_name = {s.path.name: i for i, s in enumerate(ds.samples)}
    item = ds[by_name["ramp.mp4"]]
    assert item["video"].shape == (3, 8, 32, 32)
    assert np.abs(_levels(item["video"]) - 8 * np.arange(0, 29, 4)).max() < 3  # source frames 0, 4, ..., 28
    assert item["meta"]["frame_indices"] == list(range(0, 29, 4))
    assert item["meta"]["fps"] == pytest.approx(7.5) and item["meta"]["source_fps"] == 30.0
    # 20 source frames hold 5 at stride 4: shortened (any count is valid here), not skipped.
    assert ds.buckets[by_name["short.mp4"]][0] == 5 and "training it with 5 frames" in caplog.text
    assert ds[by_name["short.mp4"]]["meta"]["frame_indices"] == [0, 4, 8, 12, 16]


def test_shapes_multiples_of_32_and_bucket_aspect(tmp_path: Path) -> None:
    make_clip(tmp_path / "wide.avi", w=70, h=50, n=12, codec="mpeg4")  # odd-ish size, 7:5
    make_clip(tmp_path / "tall.mp4", w=32, h=96, n=12)
    make_image(tmp_path / "img.webp", w=90, h=30)
    for n in ("wide", "tall", "img"):
        (tmp_path / f"{n}.txt").write_text(n)
    ds = load_dataset(cfg_for(tmp_path, height=64, width=64, num_frames=9), progress=False)
    table = make_buckets(64, 64, 32, 4.0)
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in table)
    for i, s in enumerate(ds.samples):
        f, h, w = ds.buckets[i]
        assert (h, w) == nearest_bucket(s.height, s.width, table)
        assert ds[i]["video"].shape == (3, f, h, w)
        assert ds[i]["video"].dtype == torch.float32
        assert -1.0 <= ds[i]["video"].min() and ds[i]["video"].max() <= 1.0
    by_name = {s.path.name: (i, b) for i, (s, b) in enumerate(zip(ds.samples, ds.buckets))}
    assert by_name["tall.mp4"][1][1] > by_name["tall.mp4"][1][2]  # tall clip -> tall bucket
    assert by_name["img.webp"][1] == (1, 32, 128)  # images are 1-frame clips; 3:1 -> 1:4 is nearest
    assert by_name["wide.avi"][1][0] == 9
    img_meta = ds[by_name["img.webp"][0]]["meta"]
    old = dict(fps=0.0, frame_indices=[0], num_frames=1, source_fps=0.0, is_image=True)
    assert {k: img_meta[k] for k in old} == old and img_meta["known_frames"] == [0] and not img_meta["is_pair"]


@pytest.mark.skipif("libvpx-vp9" not in av.codecs_available, reason="this PyAV build has no VP9 encoder")
def test_vp9_webm_clip(tmp_path: Path) -> None:
    make_clip(tmp_path / "v.webm", w=64, h=32, n=10, codec="libvpx-vp9")
    (tmp_path / "v.txt").write_text("vp9")
    ds = load_dataset(cfg_for(tmp_path, num_frames=9), progress=False)
    assert ds[0]["video"].shape == (3, 9, 32, 32)


def test_short_clip_shorten_vs_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_clip(tmp_path / "five.mp4", n=5)
    make_clip(tmp_path / "long.mp4", n=20)
    for n in ("five", "long"):
        (tmp_path / f"{n}.txt").write_text(n)
    with caplog.at_level(logging.INFO):
        ds = load_dataset(cfg_for(tmp_path, num_frames=17), progress=False)
    assert sorted(ds.buckets) == [(5, 32, 32), (17, 32, 32)]
    assert caplog.text.count("five.mp4") == 1 and "training it with 5 frames" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ds = load_dataset(cfg_for(tmp_path, num_frames=17, short_clips="skip"), progress=False)
    assert [s.path.name for s in ds.samples] == ["long.mp4"]
    assert caplog.text.count("five.mp4") == 1 and "skipped file" in caplog.text


def test_clip_below_the_smallest_valid_count_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Counts k*4 (no offset): a 3-frame clip and a still have no valid count, even with short_clips=shorten.
    make_clip(tmp_path / "three.mp4", n=3)
    make_clip(tmp_path / "long.mp4", n=20)
    make_image(tmp_path / "still.png")
    for n in ("three", "long", "still"):
        (tmp_path / f"{n}.txt").write_text(n)
    rules = replace(WAN_LIKE, frame_offset=0, default_frames=8)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(cfg_for(tmp_path, rules, height=32, width=32), progress=False)
    assert [s.path.name for s in ds.samples] == ["long.mp4"] and ds.buckets == [(8, 32, 32)]
    assert "three.mp4" in caplog.text and "smallest valid count 4" in caplog.text and "still.png" in caplog.text


# ----------------------------------------------------------------------------- kinds, resolution


def test_image_backbone_skips_videos_by_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_image(tmp_path / "a.png", w=48, h=32)
    make_clip(tmp_path / "clip.mp4")
    for n in ("a", "clip"):
        (tmp_path / f"{n}.txt").write_text(n)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(DataConfig(path=str(tmp_path), buckets=False), rules=IMAGE_LIKE, progress=False)
    assert [s.path.name for s in ds.samples] == ["a.png"] and ds.cfg.num_frames == 1
    assert "clip.mp4" in caplog.text and "trains on images" in caplog.text
    assert ds[0]["video"].shape == (3, 1, 32, 32) and ds[0]["meta"]["is_image"]
    with pytest.raises(ValueError, match=r"clip\.mp4.*trains on images"):
        load_dataset(DataConfig(path=str(tmp_path), strict=True), rules=IMAGE_LIKE, progress=False)


def test_unresolved_config_is_refused_with_the_fix(tmp_path: Path) -> None:
    make_clip(tmp_path / "a.mp4")
    (tmp_path / "a.txt").write_text("a")
    cfg = DataConfig(path=str(tmp_path), num_frames=9, height=32, width=32)
    with pytest.raises(ValueError, match=r"data\.kind.*data\.fps.*resolve_data_config"):
        load_dataset(cfg, progress=False)
    with pytest.raises(ValueError, match=r"VideoDataset.*resolve the config with the backbone's rules"):
        VideoDataset(scan_dataset(tmp_path), cfg, progress=False)
    ds = load_dataset(cfg, rules=WAN_LIKE, progress=False)
    assert ds.cfg.frame_multiple == 4 and cfg.frame_multiple is None  # the caller's config is not mutated
    assert ds[0]["video"].shape == (3, 9, 32, 32)


# ----------------------------------------------------------------------------- bad input


def _bad_files(root: Path) -> list[str]:
    make_clip(root / "good.mp4", n=12)
    (root / "random.mp4").write_bytes(np.random.default_rng(1).bytes(4096))
    (root / "empty.mp4").write_bytes(b"")
    full = make_clip(root / "full_tmp.mp4", n=30).read_bytes()
    (root / "full_tmp.mp4").unlink()
    (root / "truncated.mp4").write_bytes(full[: len(full) // 2])
    (root / "notanimage.png").write_bytes(b"PNG? no")
    for n in ["good", "random", "empty", "truncated", "notanimage"]:
        (root / f"{n}.txt").write_text(n)
    return ["random.mp4", "empty.mp4", "truncated.mp4", "notanimage.png"]


def test_corrupt_empty_truncated_reported_once_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = _bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lora_core"):
        ds = load_dataset(cfg_for(tmp_path), progress=False)
        for i in range(len(ds)):
            ds[i]
    assert [s.path.name for s in ds.samples] == ["good.mp4"]
    for name in bad:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum(str(tmp_path / name) in m for m in warnings) == 1, name
    assert set(ds.report.skipped) == {str(tmp_path / name) for name in bad}


@pytest.mark.parametrize("name", ["random.mp4", "empty.mp4", "truncated.mp4", "notanimage.png"])
def test_strict_raises_naming_the_file(tmp_path: Path, name: str) -> None:
    _bad_files(tmp_path)
    for other in {"random.mp4", "empty.mp4", "truncated.mp4", "notanimage.png"} - {name}:
        (tmp_path / other).unlink()
    with pytest.raises(ValueError, match=name):
        load_dataset(cfg_for(tmp_path, strict=True), progress=False)


def test_all_files_broken_raises(tmp_path: Path) -> None:
    (tmp_path / "x.mp4").write_bytes(b"garbage" * 100)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="none of the 1 samples"):
        load_dataset(cfg_for(tmp_path), progress=False)


def test_file_broken_after_probe_is_substituted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for n in ("a", "b"):
        make_clip(tmp_path / f"{n}.mp4", n=12)
        (tmp_path / f"{n}.txt").write_text(n)
    ds = load_dataset(cfg_for(tmp_path), progress=False)
    (tmp_path / "a.mp4").write_bytes(b"broken now")
    with caplog.at_level(logging.WARNING):
        item = ds[0]
    assert item["key"] == "b.mp4" and "a.mp4" in caplog.text
    strict = load_dataset(cfg_for(tmp_path / "b.mp4", strict=True), progress=False)
    (tmp_path / "b.mp4").write_bytes(b"broken too")
    with pytest.raises(ValueError, match="b.mp4"):
        strict[0]


# ----------------------------------------------------------------------------- determinism


def _crop_dataset(root: Path, seed: int) -> VideoDataset:
    make_clip(root / "a.mp4", w=96, h=64, n=30)
    make_clip(root / "b.mp4", w=96, h=64, n=30)
    for n in ("a", "b"):
        (root / f"{n}.txt").write_text(n)
    return load_dataset(cfg_for(root, num_frames=9, buckets=False), seed=seed, progress=False)


def test_same_seed_and_index_same_sample(tmp_path: Path) -> None:
    ds = _crop_dataset(tmp_path, seed=3)
    first = ds[1]["video"]
    ds[0]
    assert torch.equal(ds[1]["video"], first)  # not affected by what was read before
    again = load_dataset(ds.cfg, seed=3, progress=False)
    assert torch.equal(again[1]["video"], first)
    plans = {(tuple(p.frames), p.crop) for p in (VideoDataset(ds.samples, ds.cfg, seed=s).plan(1) for s in range(8))}
    assert len(plans) > 1  # the seed does move the window and the crop


def test_dataloader_workers_do_not_change_samples(tmp_path: Path) -> None:
    ds = _crop_dataset(tmp_path, seed=5)
    batches = epoch_batches(ds.buckets, 2, seed=5, epoch=0)
    one = [b["video"] for b in torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate)]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=2)
    two = [b["video"] for b in loader]
    assert len(one) == 1 and one[0].shape == (2, 3, 9, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_collate_refuses_mixed_buckets() -> None:
    items = [dict(video=torch.zeros(3, 1, 32, 32), key="a"), dict(video=torch.zeros(3, 5, 32, 32), key="b")]
    with pytest.raises(ValueError, match="mixes 'video' shapes"):
        collate(items)
    out = collate([items[0], items[0]])
    assert out["video"].shape == (2, 3, 1, 32, 32) and out["key"] == ["a", "a"]


def test_flip_mirrors_a_fixed_half_of_the_samples_and_enters_the_cache_key(tmp_path):
    """data.flip: each sample mirrored or not by (seed, index), the whole clip at once; the choice is part of
    the preprocessing plan, so a cached latent is never reused for the other orientation."""
    from lora_core.data import DataConfig, load_dataset
    from lora_core.data.sample_data import make_sample_images
    folder = make_sample_images(tmp_path / "imgs", num_images=8)
    base = dict(path=str(folder), num_frames=1, height=64, width=64, fps=0.0, frame_multiple=1, frame_offset=0,
                size_multiple=16, kind="image", frame_sampling="fps", frame_stride=1, crop="center")
    plain = load_dataset(DataConfig(**base), seed=3, progress=False)
    flipped = load_dataset(DataConfig(**base, flip=True), seed=3, progress=False)
    which = [flipped.plan(i).flip for i in range(len(flipped))]
    assert 0 < sum(which) < len(which)
    for i, f in enumerate(which):
        a, b = plain.load(i)["video"], flipped.load(i)["video"]
        assert torch.equal(b, a.flip(-1) if f else a)
        assert (flipped.preprocess_params(i) != plain.preprocess_params(i)) == f
    again = load_dataset(DataConfig(**base, flip=True), seed=3, progress=False)
    assert [again.plan(i).flip for i in range(len(again))] == which
