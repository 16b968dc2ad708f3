"""Content index (sha256 remembered per path, size, mtime) and the stat-based identity of model weights."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import lora_core.cache.identity as identity
from lora_core.cache import ContentIndex, path_identity


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file actually read for its hash."""
    seen: list[Path] = []
    real = identity.hash_file

    def counting(path: Path) -> str:
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(identity, "hash_file", counting)
    return seen


def test_a_file_is_hashed_once_until_it_changes(tmp_path: Path, hashes: list[Path]) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"frames" * 1000)
    idx = ContentIndex(tmp_path / "cache" / "index.json")
    sha = idx.sha256(clip)
    assert idx.sha256(clip) == sha and len(hashes) == 1
    idx.flush()
    fresh = ContentIndex(tmp_path / "cache" / "index.json")  # the next run
    assert fresh.sha256(clip) == sha and len(hashes) == 1 and fresh.hashed == 0
    os.utime(clip, ns=(10**18, 10**18))  # touched: new mtime, same bytes
    assert fresh.sha256(clip) == sha and len(hashes) == 2  # read again once, same identity
    assert fresh.sha256(clip) == sha and len(hashes) == 2
    clip.write_bytes(b"other!" * 1000)  # same size, new bytes
    assert fresh.sha256(clip) != sha
    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        fresh.sha256(tmp_path / "gone.mp4")


def test_ranks_sharing_an_index_keep_each_others_hashes(tmp_path: Path, hashes: list[Path]) -> None:
    files = [tmp_path / f"c{i}.mp4" for i in range(4)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 100)
    index_file = tmp_path / "index.json"
    rank0, rank1 = ContentIndex(index_file), ContentIndex(index_file)
    rank0.sha256(files[0]), rank1.sha256(files[1])  # both loaded the (empty) index before either wrote
    rank0.flush()
    rank1.sha256(files[0])  # a miss re-reads the index rank 0 wrote instead of hashing
    rank1.flush()
    on_disk = json.loads(index_file.read_text())["files"]
    assert {str(files[0].resolve()), str(files[1].resolve())} <= set(on_disk)  # the second write merged
    assert hashes == files[:2]


def test_a_damaged_index_only_costs_hashing_again(tmp_path: Path, hashes: list[Path]) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x" * 64)
    index_file = tmp_path / "index.json"
    index_file.write_text("{not json")
    idx = ContentIndex(index_file)
    sha = idx.sha256(clip)
    idx.flush()
    assert ContentIndex(index_file).sha256(clip) == sha and len(hashes) == 1


def test_path_identity_follows_size_mtime_and_names_without_reading(tmp_path: Path) -> None:
    weights = tmp_path / "vae"
    (weights / "sub").mkdir(parents=True)
    big = weights / "model.safetensors"
    with open(big, "wb") as f:
        f.truncate(64 << 30)  # 64 GiB, sparse: reading it would take minutes
    (weights / "sub" / "config.json").write_text("{}")
    t0 = time.perf_counter()
    ident = path_identity([weights])
    assert time.perf_counter() - t0 < 2.0
    assert ident == path_identity([str(weights)]) and len(ident) == 16
    (weights / ".git").mkdir()
    (weights / ".git" / "FETCH_HEAD").write_text("x")  # VCS metadata is not the weights
    assert path_identity([weights]) == ident
    os.utime(big, ns=(1, 1))
    touched = path_identity([weights])
    assert touched != ident
    (weights / "sub" / "config.json").write_text('{"a": 1}')
    assert path_identity([weights]) != touched
    single = path_identity([big])
    assert single != path_identity([big, weights / "sub" / "config.json"])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        path_identity([big, tmp_path / "missing.pth"])
    with pytest.raises(ValueError, match="list of paths"):
        path_identity(str(big))  # type: ignore[arg-type]
