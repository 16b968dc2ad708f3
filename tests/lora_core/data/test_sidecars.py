"""Sidecar files beside the media (clip.tracks.json), the cache keys of pairs and sidecars, and the sample
pair / tracks data."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from lora_core.cache import FeatureCache, media_keys
from lora_core.data import (
    PREPROCESS_VERSION,
    DataConfig,
    MediaRules,
    load_dataset,
    make_sample_dataset,
    make_sample_pairs,
    resolve_data_config,
    scan_dataset,
    sidecar_path,
)
from tests.lora_core.data.media import WAN_LIKE, make_clip

TRACKS = replace(WAN_LIKE, image_pairs=True, sidecars=("tracks.json",))
VAE = "fake-vae@1"


def _cfg(path: Path, rules: MediaRules = TRACKS, **kw) -> DataConfig:
    return resolve_data_config(DataConfig(**{**dict(path=str(path), num_frames=9, height=32, width=32), **kw}), rules)


def _clips(root: Path) -> None:
    for n in ("a", "b"):
        make_clip(root / f"{n}.mp4", n=12)
        (root / f"{n}.txt").write_text(n)


def test_sidecar_found_beside_the_clip_and_in_meta(tmp_path: Path) -> None:
    _clips(tmp_path)
    (tmp_path / "a.tracks.json").write_text('{"frames": 12, "tracks": []}')
    ds = load_dataset(_cfg(tmp_path), progress=False)
    by = {s.path.name: i for i, s in enumerate(ds.samples)}
    assert [s.path.name for s in ds.samples] == ["a.mp4", "b.mp4"]  # the .json is neither media nor metadata
    assert ds[by["a.mp4"]]["meta"]["sidecars"] == {"tracks.json": str(tmp_path / "a.tracks.json")}
    assert ds[by["b.mp4"]]["meta"]["sidecars"] == {}
    assert sidecar_path(ds.samples[by["b.mp4"]], "tracks.json") == tmp_path / "b.tracks.json"
    # Without the backbone declaring it, the file is not looked at.
    assert load_dataset(_cfg(tmp_path, WAN_LIKE), progress=False)[0]["meta"]["sidecars"] == {}


def test_an_image_sidecar_is_not_scanned_as_media(tmp_path: Path) -> None:
    _clips(tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.mask.png")
    assert sorted(s.path.name for s in scan_dataset(tmp_path, sidecars=("mask.png",))) == ["a.mp4", "b.mp4"]
    assert "a.mask.png" in {s.path.name for s in scan_dataset(tmp_path)}


def test_plain_clip_keys_are_what_they_were(tmp_path: Path) -> None:
    """A clip without sidecars keeps the exact plan (and so the cache key) it had before pairs and sidecars."""
    _clips(tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    for rules in (WAN_LIKE, TRACKS):
        ds = load_dataset(_cfg(tmp_path, rules), progress=False)
        keys = media_keys(ds, cache, VAE, progress=False)
        for i in range(len(ds)):
            params = ds.preprocess_params(i, include_caption=False)
            assert set(params) == {"version", "bucket", "frames", "resize", "crop"}
            assert set(ds.preprocess_params(i)) == {"version", "bucket", "frames", "resize", "crop", "caption"}
            p = ds.plan(i)
            old = dict(version=PREPROCESS_VERSION, bucket=list(p.bucket), frames=p.frames, resize=list(p.resize),
                       crop=list(p.crop))  # fmt: skip
            assert keys[i] == cache.media_key(ds.samples[i], old, VAE)


def test_the_key_follows_the_sidecar_content(tmp_path: Path) -> None:
    _clips(tmp_path)
    cache = FeatureCache(tmp_path / "cache")

    def key_of_a() -> str:
        ds = load_dataset(_cfg(tmp_path), progress=False)
        return media_keys(ds, cache, VAE, progress=False)[[s.path.name for s in ds.samples].index("a.mp4")]

    plain = key_of_a()
    side = tmp_path / "a.tracks.json"
    side.write_text('{"tracks": [[[1, 2]]]}')
    with_side = key_of_a()
    ds = load_dataset(_cfg(tmp_path), progress=False)
    assert set(ds.preprocess_params(0, include_caption=False)["sidecars"]) == {"tracks.json"}
    side.write_text('{"tracks": [[[3, 4]]]}')
    edited = key_of_a()
    assert len({plain, with_side, edited}) == 3
    side.write_text('{"tracks": [[[1, 2]]]}')
    assert key_of_a() == with_side  # content, not mtime
    side.unlink()
    assert key_of_a() == plain


def test_the_key_of_a_pair_follows_its_end_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for n in ("start", "end"):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(tmp_path / f"p_{n}.png")
    (tmp_path / "p.txt").write_text("p")
    cache = FeatureCache(tmp_path / "cache")

    def key() -> str:
        return media_keys(load_dataset(_cfg(tmp_path), progress=False), cache, VAE, progress=False)[0]

    first = key()
    ds = load_dataset(_cfg(tmp_path), progress=False)
    params = ds.preprocess_params(0, include_caption=False)
    assert set(params) == {"version", "bucket", "frames", "resize", "crop", "end"}
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "p_end.png")
    second = key()
    assert second != first
    (tmp_path / "p.tracks.json").write_text("{}")
    assert key() not in (first, second)


# ----------------------------------------------------------------------------- sample data


def test_sample_pairs_load_with_their_tracks(tmp_path: Path) -> None:
    folder = make_sample_pairs(tmp_path / "pairs", num_pairs=4, height=64, width=64, frames=5)
    again = {p.name: p.read_bytes() for p in folder.iterdir()}
    make_sample_pairs(folder, num_pairs=4, height=64, width=64, frames=5)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == again  # deterministic
    assert sorted(again)[:4] == ["pair_000.tracks.json", "pair_000.txt", "pair_000_end.png", "pair_000_start.png"]
    ds = load_dataset(_cfg(folder, pair_frames=5, height=64, width=64), progress=False)
    assert len(ds) == 4 and all(s.is_pair for s in ds.samples) and ds.buckets[0] == (5, 64, 64)
    item = ds[0]
    assert item["video"].shape == (3, 2, 64, 64) and item["meta"]["known_frames"] == [0, 4]
    assert item["caption"].startswith("a red square moving")
    tracks = json.loads(Path(item["meta"]["sidecars"]["tracks.json"]).read_text())
    assert (tracks["frames"], tracks["width"], tracks["height"]) == (5, 64, 64) and len(tracks["tracks"][0]) == 5
    # The track's first and last points sit on the shape (red) in the start and end image.
    start, end = (np.asarray(Image.open(folder / f"pair_000_{r}.png")) for r in ("start", "end"))
    for img, (x, y) in ((start, tracks["tracks"][0][0]), (end, tracks["tracks"][0][-1])):
        assert tuple(img[int(y), int(x)]) == (220, 40, 40)
    assert tracks["tracks"][0][0][0] < tracks["tracks"][0][-1][0]  # left to right


def test_sample_dataset_with_tracks(tmp_path: Path) -> None:
    plain = make_sample_dataset(tmp_path / "plain", num_clips=2, num_frames=9)
    assert not list(plain.glob("*.tracks.json"))
    folder = make_sample_dataset(tmp_path / "tracks", num_clips=2, num_frames=9, tracks=True)
    rules = MediaRules(
        kind="video", frame_sampling="fps", fps=24.0, frame_stride=1, frame_multiple=4, frame_offset=1,
        size_multiple=32, default_frames=9, default_height=64, default_width=96, image_pairs=True,
        sidecars=("tracks.json",),
    )  # fmt: skip
    ds = load_dataset(DataConfig(path=str(folder)), rules=rules, progress=False)
    assert len(ds) == 2 and not any(s.is_pair for s in ds.samples)
    meta = ds[1]["meta"]
    tracks = json.loads(Path(meta["sidecars"]["tracks.json"]).read_text())
    assert (tracks["frames"], tracks["width"], tracks["height"]) == (9, 96, 64) and len(tracks["tracks"][0]) == 9
    assert make_sample_dataset(folder, num_clips=2, num_frames=9, tracks=True) == folder  # idempotent
