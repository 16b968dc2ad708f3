"""Building the media and text caches on real clips: what re-encodes, sharding, failing samples."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from lora_core.cache import FeatureCache, build_media_cache, build_text_cache, media_keys

from .fakes import MediaEncoder, TextEncoder, load

VAE, TE = "fake-vae@1", "fake-te@1"


def test_editing_a_caption_or_the_trigger_reencodes_only_text(data_dir: Path, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    ds = load(data_dir)
    texts = [ds.caption(i) for i in range(len(ds))]
    media, text = MediaEncoder(), TextEncoder()
    assert build_media_cache(ds, cache, VAE, media, progress=False).computed == 4
    assert build_text_cache(texts, cache, TE, text, progress=False).computed == 4
    (data_dir / "clip_001.txt").write_text("a new caption")
    ds = load(data_dir)
    stats = build_media_cache(ds, cache, VAE, MediaEncoder(allowed=False), progress=False)
    assert (stats.hits, stats.computed) == (4, 0)  # the VAE would not even be loaded
    text = TextEncoder()
    stats = build_text_cache([ds.caption(i) for i in range(len(ds))], cache, TE, text, progress=False)
    assert (stats.hits, stats.computed, text.texts) == (3, 1, ["a new caption"])
    ds = load(data_dir, trigger="sks")
    assert build_media_cache(ds, cache, VAE, MediaEncoder(allowed=False), progress=False).hits == 4
    text = TextEncoder()
    build_text_cache([ds.caption(i) for i in range(len(ds))], cache, TE, text, progress=False)
    assert len(text.texts) == 4 and all(t.startswith("sks ") for t in text.texts)


def test_cached_latents_are_what_encode_returned(data_dir: Path, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    ds = load(data_dir)
    build_media_cache(ds, cache, VAE, MediaEncoder(), progress=False)
    keys = media_keys(ds, cache, VAE)
    for i in range(len(ds)):
        got = cache.get(keys[i])
        assert torch.equal(got["latents"], MediaEncoder()(ds.load(i))["latents"])
    meta = cache.metadata(keys[2])
    assert meta["key"] == ds.samples[2].key and meta["encoder_id"] == VAE and "caption" not in meta["preprocess"]


def test_copying_the_dataset_keeps_every_media_key(data_dir: Path, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    ds = load(data_dir)
    build_media_cache(ds, cache, VAE, MediaEncoder(), progress=False)
    keys = media_keys(ds, cache, VAE)
    moved = Path(shutil.copytree(data_dir, tmp_path / "elsewhere" / "copy"))  # new paths, new mtimes
    assert moved.resolve() != data_dir.resolve()
    later = FeatureCache(tmp_path / "cache")  # a later run
    copy = load(moved)
    assert media_keys(copy, later, VAE) == keys
    assert later.files_hashed == 4  # each copied file read once ...
    assert build_media_cache(copy, later, VAE, MediaEncoder(allowed=False), progress=False).hits == 4
    assert media_keys(copy, FeatureCache(tmp_path / "cache"), VAE) == keys
    assert FeatureCache(tmp_path / "cache").files_hashed == 0  # ... and never again


def test_touching_keeps_the_key_and_new_bytes_change_it(data_dir: Path, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    keys = media_keys(load(data_dir), cache, VAE)
    clip = data_dir / "clip_000.mp4"
    os.utime(clip, ns=(10**18, 10**18))
    assert media_keys(load(data_dir), FeatureCache(tmp_path / "cache"), VAE) == keys
    shutil.copy(data_dir / "clip_002.mp4", clip)  # other bytes, same probe (size, frames)
    after = media_keys(load(data_dir), FeatureCache(tmp_path / "cache"), VAE)
    assert after[0] != keys[0] and {i: after[i] for i in (1, 2, 3)} == {i: keys[i] for i in (1, 2, 3)}


def test_a_truncated_entry_is_removed_and_recomputed(data_dir: Path, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    ds = load(data_dir)
    build_media_cache(ds, cache, VAE, MediaEncoder(), progress=False)
    entry = cache.path_for(media_keys(ds, cache, VAE)[1])
    entry.write_bytes(entry.read_bytes()[:-50])
    enc = MediaEncoder()
    stats = build_media_cache(ds, cache, VAE, enc, progress=False)
    assert (stats.hits, stats.computed, enc.seen) == (3, 1, [1])
    assert cache.get(media_keys(ds, cache, VAE)[1]) is not None


def _entries(cache: FeatureCache) -> dict[str, dict[str, torch.Tensor]]:
    return {p.stem: cache.get(p.stem) for p in cache.dir.glob("*/*.safetensors")}


def test_a_sharded_build_encodes_each_sample_once_and_equals_one_rank(data_dir: Path, tmp_path: Path) -> None:
    ds = load(data_dir)
    sharded, single = FeatureCache(tmp_path / "sharded"), FeatureCache(tmp_path / "single")
    encs = [MediaEncoder(), MediaEncoder()]
    for rank in (0, 1):  # one after the other, as if the ranks ran at once and met at a barrier
        stats = build_media_cache(ds, sharded, VAE, encs[rank], rank=rank, world=2, progress=False)
        assert (stats.hits, stats.computed) == (0, 2)
    assert encs[0].seen == [0, 2] and encs[1].seen == [1, 3]
    build_media_cache(ds, single, VAE, MediaEncoder(), progress=False)
    a, b = _entries(sharded), _entries(single)
    assert set(a) == set(b) and len(a) == 4 and all(torch.equal(a[k]["latents"], b[k]["latents"]) for k in a)
    texts = [f"caption {i}" for i in range(5)]
    tencs = [TextEncoder(), TextEncoder()]
    for rank in (0, 1):
        build_text_cache(texts, sharded, TE, tencs[rank], rank=rank, world=2, batch_size=2, progress=False)
    assert tencs[0].texts == texts[0::2] and tencs[1].texts == texts[1::2]
    assert all(sharded.has(sharded.text_key(t, TE)) for t in texts)
    with pytest.raises(ValueError, match="rank=2, world=2"):
        build_media_cache(ds, sharded, VAE, MediaEncoder(), rank=2, world=2, progress=False)


def test_a_sample_that_fails_to_decode_is_reported_once_and_skipped(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = load(data_dir)  # probed while the file was fine
    bad = data_dir / "clip_002.mp4"
    bad.write_bytes(b"\0\0\0\x18ftypisom" + os.urandom(5000))  # corrupt after the probe
    cache = FeatureCache(tmp_path / "cache")
    enc = MediaEncoder()
    with caplog.at_level(logging.WARNING):
        stats = build_media_cache(ds, cache, VAE, enc, progress=False)
        again = build_media_cache(ds, cache, VAE, enc, progress=False)
    assert (stats.computed, stats.failed, stats.failed_indices) == (3, 1, [2]) and enc.seen == [0, 1, 3]
    assert (again.hits, again.failed_indices) == (3, [2])
    assert [r.levelno for r in caplog.records if str(bad) in r.getMessage()] == [logging.WARNING]  # named, once
    keys = media_keys(ds, cache, VAE)
    assert [i for i, k in keys.items() if not cache.has(k)] == [2]


def test_text_cache_dedups_batches_and_fails_single_texts(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    texts = ["a", "b", "a", "c BAD", "", "d", "c BAD"]
    enc = TextEncoder(refuse="BAD")
    stats = build_text_cache(texts, cache, TE, enc, batch_size=2, progress=False)
    assert (stats.computed, stats.failed, stats.failed_indices) == (4, 2, [3, 6])
    assert sorted(set(enc.texts)) == ["", "a", "b", "c BAD", "d"] and enc.texts.count("a") == 1
    assert torch.equal(cache.get(cache.text_key("", TE))["context"], torch.zeros(3, 8))
    assert cache.metadata(cache.text_key("b", TE))["text"] == "b"
    again = build_text_cache(texts, cache, TE, TextEncoder(refuse="BAD"), progress=False)
    assert (again.hits, again.computed, again.failed_indices) == (4, 0, [3, 6])
    with pytest.raises(ValueError, match="2 outputs for 1 texts"):
        build_text_cache(["new"], cache, TE, lambda ts: [{"x": torch.zeros(1)}] * 2, progress=False)
    with pytest.raises(ValueError, match=r"texts\[1\] is NoneType"):
        build_text_cache(["x", None], cache, TE, enc, progress=False)  # type: ignore[list-item]


def test_encode_returning_no_tensors_is_rejected_by_name(data_dir: Path, tmp_path: Path) -> None:
    ds = load(data_dir)
    with pytest.raises(ValueError, match=r"sample 0 .*clip_000.mp4.*no batch dimension"):
        build_media_cache(ds, FeatureCache(tmp_path / "c"), VAE, lambda item: {"latents": [1.0]}, indices=[0],
                          progress=False)  # fmt: skip


def test_a_file_deleted_after_the_probe_is_left_out_and_failed(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = load(data_dir)
    (data_dir / "clip_001.mp4").unlink()
    cache = FeatureCache(tmp_path / "cache")
    with caplog.at_level(logging.WARNING):
        assert sorted(media_keys(ds, cache, VAE)) == [0, 2, 3]
    assert "clip_001.mp4" in caplog.text
    stats = build_media_cache(ds, cache, VAE, MediaEncoder(), progress=False)
    assert (stats.computed, stats.failed_indices) == (3, [1])
