"""FeatureCache entries and keys: atomic writes, corrupt vs unreadable entries, what a key depends on."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

import lora_core.cache.feature_cache as fc
from lora_core.atomic import new_file_mode
from lora_core.cache import FeatureCache
from lora_core.data import Sample

KEY, OTHER = "ab" * 20, "cd" * 20


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FeatureCache:
    monkeypatch.setattr(fc, "_RETRY_DELAY_S", 0.0)
    return FeatureCache(tmp_path / "cache")


def _entry(cache: FeatureCache, key: str = KEY) -> Path:
    return cache.put(key, {"latents": torch.arange(24.0).reshape(2, 3, 4), "mask": torch.ones(3, dtype=torch.bool)})


def test_put_get_roundtrip_metadata_and_no_temp_files(cache: FeatureCache) -> None:
    batch = torch.randn(2, 4, 3, 8, 8)
    path = cache.put(KEY, {"latents": batch[1], "mask": torch.ones(3, dtype=torch.bool)}, {"note": "x", "n": 3})
    got = cache.get(KEY)
    assert got is not None and torch.equal(got["latents"], batch[1]) and got["mask"].dtype == torch.bool
    assert cache.has(KEY) and cache.metadata(KEY) == {"note": "x", "n": 3}
    assert cache.get(OTHER) is None and not cache.has(OTHER)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind
    assert path.stat().st_mode & 0o777 == new_file_mode()  # the umask's mode, not mkstemp's 0600


def test_put_rejects_bad_keys_and_values(cache: FeatureCache) -> None:
    with pytest.raises(ValueError, match="'../x'"):
        cache.put("../x", {"a": torch.zeros(1)})
    with pytest.raises(ValueError, match="'a': 'list'"):
        cache.put(KEY, {"a": [1.0]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-empty"):
        cache.put(KEY, {})


def test_put_is_atomic(cache: FeatureCache, monkeypatch: pytest.MonkeyPatch) -> None:
    cache.put(KEY, {"x": torch.zeros(4)})

    def dies_mid_write(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(fc, "save_file", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        cache.put(KEY, {"x": torch.ones(4)})
    assert torch.equal(cache.get(KEY)["x"], torch.zeros(4))  # the old entry survived intact
    assert [p.name for p in cache.path_for(KEY).parent.iterdir()] == [f"{KEY}.safetensors"]


def _failing_reads(monkeypatch: pytest.MonkeyPatch, times: int, code: int = errno.EIO) -> list[Path]:
    """Make the next `times` entry reads raise OSError(code); returns the list of attempted paths."""
    real, attempts = fc._read_entry, []

    def flaky(path: Path, header_only: bool) -> tuple[bytes, os.stat_result]:
        attempts.append(path)
        if len(attempts) <= times:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, header_only)

    monkeypatch.setattr(fc, "_read_entry", flaky)
    return attempts


@pytest.mark.parametrize("method", ["get", "has"])
def test_one_io_error_is_retried_and_deletes_nothing(
    cache: FeatureCache, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    path = _entry(cache)
    attempts = _failing_reads(monkeypatch, times=1)
    got = getattr(cache, method)(KEY)
    assert len(attempts) == 2 and path.is_file()
    assert got is True if method == "has" else torch.equal(got["latents"], torch.arange(24.0).reshape(2, 3, 4))


@pytest.mark.parametrize("method", ["get", "has"])
@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES])
def test_a_lasting_io_error_raises_naming_the_file_and_keeps_it(
    cache: FeatureCache, monkeypatch: pytest.MonkeyPatch, method: str, code: int
) -> None:
    path = _entry(cache)
    before = path.read_bytes()
    _failing_reads(monkeypatch, times=99, code=code)
    with pytest.raises(OSError, match=f"cannot read cache entry {path}.*left in place") as info:
        getattr(cache, method)(KEY)
    assert info.value.errno == code
    assert path.read_bytes() == before  # a transient failure must never cost the entry


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[:-7], id="truncated-data"),
        pytest.param(lambda b: b[:100], id="truncated-header"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: os.urandom(300), id="garbage"),
        pytest.param(lambda b: b + b"\0" * 16, id="padded"),
    ],
)
@pytest.mark.parametrize("method", ["get", "has"])
def test_corrupt_entry_is_reported_and_removed(
    cache: FeatureCache, caplog: pytest.LogCaptureFixture, damage, method: str
) -> None:
    path = _entry(cache)
    path.write_bytes(damage(path.read_bytes()))
    with caplog.at_level(logging.WARNING):
        assert getattr(cache, method)(KEY) in (None, False)
    assert not path.exists() and str(path) in caplog.text and "corrupt" in caplog.text


def test_entry_whose_header_names_another_key_or_format_is_removed(
    cache: FeatureCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache.path_for(KEY).parent.mkdir(parents=True)
    shutil.copy(_entry(cache, OTHER), cache.path_for(KEY))  # a sound file, under the wrong name
    assert cache.get(KEY) is None and not cache.path_for(KEY).exists()
    assert cache.get(OTHER) is not None  # the original is fine
    monkeypatch.setattr(fc, "CACHE_FORMAT", "999")
    assert not cache.has(OTHER) and not cache.path_for(OTHER).exists()


def test_a_corrupt_entry_replaced_meanwhile_is_not_deleted(
    cache: FeatureCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another rank may rewrite an entry between our read and our unlink; the new file must survive."""
    path = _entry(cache)
    path.write_bytes(b"junk")
    real = fc._read_entry

    def read_then_rewrite(p: Path, header_only: bool) -> tuple[bytes, os.stat_result]:
        out = real(p, header_only)
        _entry(cache)  # the fresh put lands after our read
        return out

    monkeypatch.setattr(fc, "_read_entry", read_then_rewrite)
    assert cache.get(KEY) is None
    monkeypatch.setattr(fc, "_read_entry", real)
    assert cache.get(KEY) is not None


def test_text_key_depends_on_text_and_encoder_only(cache: FeatureCache, tmp_path: Path) -> None:
    k = cache.text_key("a red square", "te-a")
    assert k == FeatureCache(tmp_path / "elsewhere").text_key("a red square", "te-a")
    assert len({k, cache.text_key("a red square ", "te-a"), cache.text_key("a red square", "te-b")}) == 3
    assert cache.text_key("", "te-a") != k  # the empty caption of caption dropout has its own entry
    with pytest.raises(ValueError, match="encoder_id=''"):
        cache.text_key("x", "")


def test_media_key_is_content_plan_and_encoder(cache: FeatureCache, tmp_path: Path) -> None:
    a = tmp_path / "a" / "clip.mp4"
    a.parent.mkdir()
    a.write_bytes(b"v1" * 1000)
    plan = {"bucket": [17, 64, 64], "frames": [0, 1, 2], "resize": [64, 96], "crop": [0, 16]}
    k = cache.media_key(Sample(a, "cap", False, "clip.mp4"), plan, "vae-a")
    b = tmp_path / "b" / "renamed.mp4"
    b.parent.mkdir()
    shutil.copy(a, b)
    assert cache.media_key(Sample(b, "another caption", False, "renamed.mp4"), dict(plan), "vae-a") == k
    assert cache.media_key(Sample(a, "cap", False, "clip.mp4"), {**plan, "crop": [0, 0]}, "vae-a") != k
    assert cache.media_key(Sample(a, "cap", False, "clip.mp4"), plan, "vae-b") != k
    with pytest.raises(ValueError, match="include_caption=False"):
        cache.media_key(Sample(a, "cap", False, "clip.mp4"), {**plan, "caption": "cap"}, "vae-a")
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        cache.media_key(Sample(tmp_path / "gone.mp4", None, False, "gone.mp4"), plan, "vae-a")
