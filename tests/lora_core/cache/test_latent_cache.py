"""Latent cache: keys, atomic writes, corrupt entries, build_cache without a model; sample dataset."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import lora_core.cache.latent_cache as cache_mod
from lora_core.cache import CachedDataset, LatentCache, build_cache, missing_indices
from lora_core.data import DataConfig, Sample, collate, load_dataset, scan_dataset
from lora_core.data.sample_data import make_sample_dataset
from lora_core.data.video_io import read_video


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sample_dataset(tmp_path_factory.mktemp("sample"), num_clips=4)


def _cfg(path: Path, **kw: Any) -> DataConfig:
    return DataConfig(**{"path": str(path), "num_frames": 9, "height": 32, "width": 32, **kw})


class FakeEncoder:
    """Stands in for VAE + text encoder: counts calls, and can refuse to run (no model loaded)."""

    def __init__(self, allowed: bool = True) -> None:
        self.calls, self.items, self.allowed = 0, 0, allowed

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if not self.allowed:
            raise AssertionError("encode_fn called although every entry is cached")
        self.calls += 1
        self.items += batch["video"].shape[0]
        v = batch["video"]  # [B, C, F, H, W]
        latents = torch.nn.functional.avg_pool3d(v, (1, 4, 4))  # [B, C, F, H/4, W/4]
        text = torch.stack([torch.full((4, 8), float(len(c))) for c in batch["caption"]])  # [B, L, D]
        return {"latents": latents, "text": text}


def test_sample_dataset_is_decodable_captioned_and_idempotent(tmp_path: Path) -> None:
    out = make_sample_dataset(tmp_path / "ds", num_clips=3, height=48, width=80, num_frames=17)
    clips = sorted(out.glob("*.mp4"))
    assert [c.name for c in clips] == ["clip_000.mp4", "clip_001.mp4", "clip_002.mp4"]
    for c in clips:
        assert read_video(c).shape == (17, 48, 80, 3)
        assert "moving" in c.with_suffix(".txt").read_text()
    mtimes = [c.stat().st_mtime_ns for c in clips]
    make_sample_dataset(tmp_path / "ds", num_clips=3, height=48, width=80, num_frames=17)
    assert [c.stat().st_mtime_ns for c in clips] == mtimes  # untouched the second time
    clips[0].write_bytes(b"damaged")
    make_sample_dataset(tmp_path / "ds", num_clips=3, height=48, width=80, num_frames=17)
    assert read_video(clips[0]).shape == (17, 48, 80, 3)  # regenerated
    samples = scan_dataset(out)
    assert len(samples) == 3 and all(s.caption for s in samples)


def test_put_get_roundtrip_and_metadata(tmp_path: Path) -> None:
    cache = LatentCache(tmp_path / "c", "vae-a")
    batch = torch.randn(2, 4, 3, 8, 8)
    path = cache.put("ab" * 20, {"latents": batch[1], "mask": torch.ones(3, dtype=torch.bool)}, {"note": "x", "n": 3})
    got = cache.get("ab" * 20)
    assert got is not None and torch.equal(got["latents"], batch[1]) and got["mask"].dtype == torch.bool
    assert cache.metadata("ab" * 20) == {"note": "x", "n": 3}
    assert cache.get("cd" * 20) is None
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind


def test_put_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = LatentCache(tmp_path, "vae-a")
    key = "ef" * 20
    cache.put(key, {"x": torch.zeros(4)})

    def dies_mid_write(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_mod, "save_file", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        cache.put(key, {"x": torch.ones(4)})
    assert torch.equal(cache.get(key)["x"], torch.zeros(4))  # the old entry survived intact
    assert [p.name for p in cache.path_for(key).parent.iterdir()] == [f"{key}.safetensors"]


def test_key_changes_with_file_config_and_encoder(tmp_path: Path) -> None:
    clip = tmp_path / "a.mp4"
    clip.write_bytes(b"v1" * 100)
    small, big = LatentCache(tmp_path / "c", "vae-a"), LatentCache(tmp_path / "c", "vae-a", content_hash_max_bytes=0)
    pre = {"frames": [0, 1, 2], "bucket": [9, 32, 32]}
    k = small.key_for(Sample(clip, "cap", False, "a.mp4"), pre)
    assert k == small.key_for(clip, dict(pre))  # a path or a Sample, same key
    assert k != small.key_for(clip, {**pre, "bucket": [9, 32, 64]})
    assert k != LatentCache(tmp_path / "c", "vae-b").key_for(clip, pre)
    kb = big.key_for(clip, pre)
    os.utime(clip, ns=(1, 1))
    assert small.key_for(clip, pre) == k  # small file: content hash, touching keeps the key
    assert big.key_for(clip, pre) != kb  # large file: mtime
    clip.write_bytes(b"v2" * 100)
    assert small.key_for(clip, pre) != k
    assert small.key_for(clip, _cfg(tmp_path)) != small.key_for(clip, _cfg(tmp_path, fps=16))  # dataclass cfg
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        small.key_for(tmp_path / "gone.mp4", pre)


def test_build_cache_reuses_entries_and_needs_no_model(sample_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(_cfg(sample_dir), seed=1, progress=False)
    cache = LatentCache(tmp_path / "cache", "fake-vae|fake-te")
    enc = FakeEncoder()
    stats = build_cache(ds, enc, cache, batch_size=2, progress=False)
    assert (stats.hits, stats.computed, stats.failed) == (0, 4, 0) and enc.calls == 2 and enc.items == 4
    assert missing_indices(ds, cache) == []
    again = build_cache(load_dataset(_cfg(sample_dir), seed=1, progress=False), FakeEncoder(allowed=False), cache, progress=False)
    assert (again.hits, again.computed) == (4, 0)
    cached = CachedDataset(ds, cache)
    item = cached[2]
    assert item["latents"].shape == (3, 9, 8, 8) and item["key"] == ds.samples[2].key
    direct = FakeEncoder()(collate([ds[2]]))
    assert torch.allclose(item["latents"], direct["latents"][0])
    batch = collate([cached[0], cached[1]])
    assert batch["latents"].shape == (2, 3, 9, 8, 8)


def test_config_or_caption_change_recomputes_only_what_changed(sample_dir: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    cache = LatentCache(tmp_path / "cache", "fake")
    build_cache(load_dataset(_cfg(data), progress=False), FakeEncoder(), cache, progress=False)
    (data / "clip_001.txt").write_text("a new caption")
    enc = FakeEncoder()
    stats = build_cache(load_dataset(_cfg(data), progress=False), enc, cache, progress=False)
    assert (stats.hits, stats.computed) == (3, 1)
    stats = build_cache(load_dataset(_cfg(data, height=64, width=64), progress=False), FakeEncoder(), cache, progress=False)
    assert stats.computed == 4  # a new size is a new tensor
    stats = build_cache(load_dataset(_cfg(data), seed=9, progress=False), FakeEncoder(), cache, progress=False)
    assert stats.computed > 0  # another seed crops another window


def test_corrupt_entry_is_reported_and_recomputed(sample_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = load_dataset(_cfg(sample_dir), progress=False)
    cache = LatentCache(tmp_path / "cache", "fake")
    build_cache(ds, FakeEncoder(), cache, progress=False)
    key = CachedDataset(ds, cache).keys[0]
    entry = cache.path_for(key)
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING):
        assert cache.get(key) is None
    assert str(entry) in caplog.text and not entry.exists()
    with pytest.raises(ValueError, match="run build_cache"):
        CachedDataset(ds, cache)[0]
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_bytes(os.urandom(64))  # garbage
    enc = FakeEncoder()
    stats = build_cache(ds, enc, cache, progress=False)
    assert (stats.hits, stats.computed, enc.items) == (3, 1, 1)
    assert cache.get(key) is not None


def test_encode_fn_with_wrong_batch_dim_is_rejected(sample_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(_cfg(sample_dir), progress=False)
    with pytest.raises(ValueError, match="'latents'.*B=1"):
        build_cache(ds, lambda b: {"latents": torch.zeros(3, 2)}, LatentCache(tmp_path, "x"), indices=[0], progress=False)
