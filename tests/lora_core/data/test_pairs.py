"""Start/end image pairs: scanning (folder and metadata layouts), pair_frames, probing, loading, batching."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_core.data import DataConfig, collate, epoch_batches, load_dataset, resolve_data_config, scan_dataset
from tests.lora_core.data.media import WAN_LIKE, cfg_for, make_clip, make_image

PAIRS = replace(WAN_LIKE, image_pairs=True)


def _cfg(path: Path, **kw) -> DataConfig:
    """A resolved config of a backbone that trains on pairs: 9 frames of 32x32 at 24 fps unless `kw` says otherwise."""
    return resolve_data_config(DataConfig(**{**dict(path=str(path), num_frames=9, height=32, width=32), **kw}), PAIRS)


def _flat(path: Path, grey: int, w: int = 48, h: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), grey, np.uint8)).save(path)
    return path


def _by_name(samples):
    return {s.path.name: s for s in samples}


# ----------------------------------------------------------------------------- scanning


def test_folder_pairs_mixed_with_clips_and_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _flat(tmp_path / "a_start.png", 10)
    _flat(tmp_path / "a_end.png", 200)
    (tmp_path / "a.txt").write_text("pair a")
    _flat(tmp_path / "sub" / "b_start.jpg", 10)
    _flat(tmp_path / "sub" / "b_end.png", 200)  # the halves may have different extensions
    (tmp_path / "sub" / "b_start.txt").write_text("pair b")  # the start's caption when <id>.txt is missing
    make_clip(tmp_path / "clip.mp4")
    (tmp_path / "clip.txt").write_text("a clip")
    make_image(tmp_path / "still.png")
    (tmp_path / "still.txt").write_text("a still")
    with caplog.at_level(logging.INFO):
        samples = scan_dataset(tmp_path, pairs=True)
    got = _by_name(samples)
    assert sorted(got) == ["a_start.png", "b_start.jpg", "clip.mp4", "still.png"]
    a, b = got["a_start.png"], got["b_start.jpg"]
    assert a.is_pair and a.end == tmp_path / "a_end.png" and a.caption == "pair a" and a.key == "a_start.png"
    assert b.end == tmp_path / "sub" / "b_end.png" and b.caption == "pair b" and b.key == "sub/b_start.jpg"
    assert not a.is_image and got["still.png"].is_image and not got["still.png"].is_pair
    assert not got["clip.mp4"].is_pair and got["clip.mp4"].caption == "a clip"
    assert "(1 videos, 1 images, 2 pairs)" in caplog.text
    assert hash(a) == hash(replace(a))  # still frozen and hashable


def test_pairs_off_is_todays_behaviour(tmp_path: Path) -> None:
    _flat(tmp_path / "a_start.png", 10)
    _flat(tmp_path / "a_end.png", 200)
    (tmp_path / "a.txt").write_text("pair a")
    samples = scan_dataset(tmp_path)
    assert sorted((s.path.name, s.caption, s.is_image, s.end) for s in samples) == [
        ("a_end.png", None, True, None), ("a_start.png", None, True, None),
    ]  # fmt: skip
    assert all(s.extra == () for s in samples)


def test_a_half_without_its_partner_is_reported_by_the_missing_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _flat(tmp_path / "ok_start.png", 10)
    _flat(tmp_path / "ok_end.png", 200)
    _flat(tmp_path / "lonely_start.png", 10)
    _flat(tmp_path / "orphan_end.jpg", 10)
    with caplog.at_level(logging.WARNING):
        samples = scan_dataset(tmp_path, pairs=True)
    assert [s.path.name for s in samples] == ["ok_start.png"]
    assert str(tmp_path / "lonely_end.png") in caplog.text and str(tmp_path / "orphan_start.jpg") in caplog.text
    with pytest.raises(ValueError, match=r"lonely_end\.png.*data\.strict"):
        scan_dataset(tmp_path, pairs=True, strict=True)


def test_metadata_json_pairs_aliases_and_extras(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for n in ("s1", "e1", "s2", "e2", "s3"):
        _flat(tmp_path / "img" / f"{n}.png", 50)
    make_clip(tmp_path / "c.mp4")
    rows = [
        {"start": "img/s1.png", "end": "img/e1.png", "caption": "one", "fps": 8, "motion_bucket_id": 127},
        {"start_image": "img/s2.png", "end_image": "img/e2.png", "prompt": "two", "tags": ["x"]},
        {"video": "c.mp4", "caption": "clip", "fps": 24.0, "note": "kept", "empty": None},
        {"first_frame": "img/s3.png", "caption": "no end"},
        {"first_frame": "img/s3.png", "last_frame": "img/gone.png", "caption": "end missing"},
    ]
    (tmp_path / "metadata.json").write_text(json.dumps(rows))
    with caplog.at_level(logging.WARNING):
        samples = scan_dataset(tmp_path, pairs=True)
    got = _by_name(samples)
    assert sorted(got) == ["c.mp4", "s1.png", "s2.png"]
    assert got["s1.png"].end == tmp_path / "img" / "e1.png" and got["s1.png"].caption == "one"
    assert got["s1.png"].extra == (("fps", 8), ("motion_bucket_id", 127))
    assert got["s2.png"].end == tmp_path / "img" / "e2.png" and got["s2.png"].extra == ()  # lists are left out
    assert got["c.mp4"].extra == (("fps", 24.0), ("note", "kept")) and not got["c.mp4"].is_pair
    assert "metadata.json:4" in caplog.text and "no end image" in caplog.text and "gone.png" in caplog.text
    # Pairs off: the rows naming only pairs name no media; the clip row stays what it was.
    plain = scan_dataset(tmp_path)
    assert [(s.path.name, s.end) for s in plain] == [("c.mp4", None)]


def test_csv_extra_columns_are_parsed_as_numbers(tmp_path: Path) -> None:
    make_clip(tmp_path / "a.mp4")
    make_clip(tmp_path / "b.mp4")
    (tmp_path / "metadata.csv").write_text(
        "video,caption,fps,motion_bucket_id,aesthetic,note,blank\n"
        "a.mp4,clip a,24,127,5.25,hello,\n"
        "b.mp4,clip b,-3,1e3,.5,007x,\n"
    )
    got = _by_name(scan_dataset(tmp_path))
    assert got["a.mp4"].extra == (("fps", 24), ("motion_bucket_id", 127), ("aesthetic", 5.25), ("note", "hello"))
    assert got["b.mp4"].extra == (("fps", -3), ("motion_bucket_id", 1000.0), ("aesthetic", 0.5), ("note", "007x"))
    assert isinstance(got["a.mp4"].extra[0][1], int) and hash(got["a.mp4"])
    ds = load_dataset(cfg_for(tmp_path), progress=False)
    i = [s.path.name for s in ds.samples].index("a.mp4")
    assert ds[i]["meta"]["extra"] == {"fps": 24, "motion_bucket_id": 127, "aesthetic": 5.25, "note": "hello"}
    assert ds.preprocess_params(i, include_caption=False)["extra"] == ds[i]["meta"]["extra"]


def test_csv_pairs(tmp_path: Path) -> None:
    _flat(tmp_path / "f.png", 10)
    _flat(tmp_path / "l.png", 200)
    (tmp_path / "metadata.csv").write_text("first_frame,last_frame,caption,fps\nf.png,l.png,a pair,12\n")
    (s,) = scan_dataset(tmp_path, pairs=True)
    assert (s.path.name, s.end.name, s.caption, s.extra) == ("f.png", "l.png", "a pair", (("fps", 12),))
    with pytest.raises(ValueError, match=r"no media column.*start/end columns"):
        scan_dataset(tmp_path)


# ----------------------------------------------------------------------------- config


def test_pair_frames_resolution_and_validation() -> None:
    cfg = resolve_data_config(DataConfig(path="x"), PAIRS)
    assert cfg.pairs is True and cfg.pair_frames == cfg.num_frames == 17
    assert resolve_data_config(DataConfig(path="x", pair_frames=9), PAIRS).pair_frames == 9
    assert resolve_data_config(DataConfig(path="x"), WAN_LIKE).pairs is False  # a backbone without pairs
    with pytest.raises(ValueError, match=r"data\.pair_frames=1 is invalid: expected an integer >= 2"):
        DataConfig(pair_frames=1)
    with pytest.raises(ValueError, match=r"data\.pair_frames=8 is invalid: expected 4k\+1 frames.*e\.g\. 5 or 9"):
        resolve_data_config(DataConfig(path="x", pair_frames=8), PAIRS)
    with pytest.raises(ValueError, match=r"data\.pair_frames=None resolves to data\.num_frames=1"):
        resolve_data_config(DataConfig(path="x", num_frames=1, pairs=True), PAIRS)
    with pytest.raises(ValueError, match=r"data\.pairs=true is invalid: this backbone does not train on"):
        resolve_data_config(DataConfig(path="x", pairs=True), WAN_LIKE)
    with pytest.raises(ValueError, match=r"data\.pairs=True is invalid.*data\.kind='image'"):
        DataConfig(kind="image", pairs=True)
    with pytest.raises(ValueError, match=r"MediaRules\.image_pairs=True is invalid"):
        replace(WAN_LIKE, kind="image", default_frames=1, image_pairs=True)
    with pytest.raises(ValueError, match=r"MediaRules\.sidecars=.*leading dot"):
        replace(WAN_LIKE, sidecars=(".tracks.json",))


# ----------------------------------------------------------------------------- loading


def test_a_pair_item_holds_exactly_the_two_known_frames(tmp_path: Path) -> None:
    _flat(tmp_path / "p_start.png", 0, w=64, h=32)
    _flat(tmp_path / "p_end.png", 255, w=64, h=32)
    (tmp_path / "p.txt").write_text("black to white")
    make_clip(tmp_path / "clip.mp4", w=64, h=32, n=20)
    (tmp_path / "clip.txt").write_text("a clip")
    cfg = _cfg(tmp_path, pair_frames=9, buckets=False)
    ds = load_dataset(cfg, progress=False)
    i = [s.path.name for s in ds.samples].index("p_start.png")
    c = 1 - i
    assert ds.buckets[i] == (9, 32, 32) == ds.buckets[c]  # the bucket's F is the clip length the pair stands for
    item = ds[i]
    assert item["video"].shape == (3, 2, 32, 32) and item["video"].dtype == torch.float32
    assert torch.allclose(item["video"][:, 0], torch.tensor(-1.0)) and torch.allclose(item["video"][:, 1], torch.tensor(1.0))
    meta = item["meta"]
    assert meta["known_frames"] == [0, 8] and meta["num_frames"] == 9 and meta["is_pair"] and not meta["is_image"]
    assert meta["frame_indices"] == [0, 1] and item["key"] == "p_start.png" and item["caption"] == "black to white"
    assert ds[c]["meta"]["known_frames"] == list(range(9)) and ds[c]["video"].shape == (3, 9, 32, 32)
    # Pairs never share a batch with the clips of their bucket: their videos do not stack.
    assert ds.batch_buckets[i] != ds.batch_buckets[c]
    for batch in epoch_batches(ds.batch_buckets, 2, seed=0, epoch=0):
        collate([ds[j] for j in batch])
    longer = load_dataset(replace(cfg, pair_frames=17), progress=False)
    assert longer.buckets[i] == (17, 32, 32) and longer[i]["meta"]["known_frames"] == [0, 16]
    assert longer[i]["video"].shape == (3, 2, 32, 32)


def test_pair_flip_and_crop_apply_to_both_images(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 255, 96).astype(np.uint8)[None, :, None], (32, 1, 3))
    Image.fromarray(ramp).save(tmp_path / "r_start.png")
    Image.fromarray(ramp).save(tmp_path / "r_end.png")
    cfg = _cfg(tmp_path, buckets=False, flip=True)
    for seed in range(6):
        ds = load_dataset(cfg, seed=seed, progress=False)
        video, plan = ds[0]["video"], ds.plan(0)
        assert torch.equal(video[:, 0], video[:, 1])  # same size: the same crop and flip
        assert (video[0, 0, 0, 0] > video[0, 0, 0, -1]).item() == plan.flip


def test_pair_end_image_of_another_size_is_cropped_at_the_same_fraction(tmp_path: Path) -> None:
    _flat(tmp_path / "p_start.png", 10, w=96, h=32)
    _flat(tmp_path / "p_end.png", 10, w=192, h=64)
    ds = load_dataset(_cfg(tmp_path, buckets=False), seed=1, progress=False)
    plan = ds.plan(0)
    end = ds.end_plan(0, plan)
    assert end.resize == (32, 96) and end.crop == plan.crop  # scaled to the same cover size
    geo = ds[0]["meta"]["end_geometry"]
    assert geo["source_size"] == [64, 192] and geo["resize"] == [32, 96] and geo["crop"] == list(plan.crop)


def test_broken_end_image_skips_the_pair_naming_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _flat(tmp_path / "ok_start.png", 10)
    _flat(tmp_path / "ok_end.png", 200)
    _flat(tmp_path / "bad_start.png", 10)
    (tmp_path / "bad_end.png").write_bytes(b"not a png")
    for n in ("ok", "bad"):
        (tmp_path / f"{n}.txt").write_text(n)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(_cfg(tmp_path), progress=False)
    assert [s.path.name for s in ds.samples] == ["ok_start.png"]
    assert str(tmp_path / "bad_end.png") in ds.report.skipped and "bad_end.png" in caplog.text
    assert ds.samples[0].num_frames == 9 and ds.samples[0].end_height == 32
    with pytest.raises(ValueError, match=r"bad_end\.png"):
        load_dataset(_cfg(tmp_path, strict=True), progress=False)


# ----------------------------------------------------------------------------- geometry


def _bright(path: Path, h: int, w: int, y: int, x: int) -> Path:
    a = np.zeros((h, w, 3), np.uint8)
    a[y, x] = 255
    Image.fromarray(a).save(path)
    return path


def _where(img: torch.Tensor) -> tuple[float, float]:
    """(row, column) of the brightness peak of [3, H, W], refined by the centroid of its 3x3 neighbourhood."""
    g = img.mean(0) + 1  # >= 0
    r, c = divmod(int(g.argmax()), g.shape[1])
    r0, c0 = max(0, r - 1), max(0, c - 1)
    win = g[r0 : r + 2, c0 : c + 2]
    rows, cols = torch.meshgrid(torch.arange(win.shape[0]) + r0, torch.arange(win.shape[1]) + c0, indexing="ij")
    return float((win * rows).sum() / win.sum()), float((win * cols).sum() / win.sum())


def _expected(geo: dict, y: int, x: int) -> tuple[float, float]:
    """Where the centre of source pixel (y, x) lands, as a pixel index, by the documented convention."""
    (sh, sw), (rh, rw), (top, left), (_, w) = geo["source_size"], geo["resize"], geo["crop"], geo["size"]
    xc, yc = (x + 0.5) * rw / sw - left, (y + 0.5) * rh / sh - top  # continuous, corner-based
    if geo["flip"]:
        xc = w - xc
    return yc - 0.5, xc - 0.5


@pytest.mark.parametrize("src", [(30, 50, 7, 31), (100, 140, 61, 22), (48, 40, 40, 3)])
def test_geometry_maps_a_bright_source_pixel_to_where_it_lands(tmp_path: Path, src) -> None:
    h, w, y, x = src
    _bright(tmp_path / "dot.png", h, w, y, x)
    flips = set()
    for seed in range(8):
        ds = load_dataset(cfg_for(tmp_path, buckets=False, flip=True), seed=seed, progress=False)
        item = ds[0]
        geo = item["meta"]["geometry"]
        assert geo["source_size"] == [h, w] and geo["size"] == [32, 32]
        ey, ex = _expected(geo, y, x)
        if not (0 <= ey < 31 and 0 <= ex < 31):
            continue  # cropped away for this seed
        gy, gx = _where(item["video"][:, 0])
        assert abs(gy - ey) <= 1 and abs(gx - ex) <= 1, (seed, geo, (gy, gx), (ey, ex))
        flips.add(geo["flip"])
    assert flips == {True, False}  # both orientations were checked


def test_pair_geometry_of_start_and_end(tmp_path: Path) -> None:
    _bright(tmp_path / "p_start.png", 40, 60, 10, 33)  # both land inside the 32x32 crop whatever the seed
    _bright(tmp_path / "p_end.png", 80, 120, 60, 55)
    ds = load_dataset(_cfg(tmp_path, buckets=False, flip=True), seed=2, progress=False)
    item = ds[0]
    for k, geo_key, (y, x) in ((0, "geometry", (10, 33)), (1, "end_geometry", (60, 55))):
        ey, ex = _expected(item["meta"][geo_key], y, x)
        gy, gx = _where(item["video"][:, k])
        assert abs(gy - ey) <= 1 and abs(gx - ex) <= 1, (geo_key, (gy, gx), (ey, ex))
