"""On-disk cache of encoded samples (VAE latents, text embeddings): one safetensors file per sample.

A key hashes everything that decides the cached tensors: the source file (path, size and mtime,
or the content for small files), the preprocessing plan (frames, resize, crop, bucket, caption)
and the encoder identity. Editing a clip, a caption or the config therefore misses the cache
instead of silently training on stale latents; nothing ever has to be deleted by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from lora_core.data import Sample, SampleReadError, VideoDataset, collate

logger = logging.getLogger(__name__)

CACHE_FORMAT = "1"  # bump when the file layout changes; old entries then miss
_KEY_META, _ENC_META = "lora_core.key", "lora_core.encoder_id"
_FMT_META, _USER_META = "lora_core.format", "lora_core.meta"


def _file_identity(path: Path, content_hash_max_bytes: int) -> dict[str, Any]:
    st = path.stat()
    ident: dict[str, Any] = {"path": str(path.resolve()), "size": st.st_size}
    if st.st_size <= content_hash_max_bytes:
        # Small files: hash the bytes, so copying or touching the dataset keeps the cache valid.
        ident["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        ident["mtime_ns"] = st.st_mtime_ns
    return ident


def _plain(cfg: Any) -> Any:
    if cfg is None:
        return None
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"preprocess_cfg must be a dataclass or a mapping, got {type(cfg).__name__}")


class LatentCache:
    """Encoded samples under `dir`, one `<key>.safetensors` each, for one encoder (`encoder_id`).

    `encoder_id` names everything about the encoders that changes their output, e.g.
    "wan2.2-vae@<sha>|umt5-xxl@<sha>|bf16"; entries from another encoder never match.
    """

    def __init__(self, dir: str | Path, encoder_id: str, *, content_hash_max_bytes: int = 1 << 20) -> None:
        if not encoder_id:
            raise ValueError("LatentCache needs a non-empty encoder_id naming the VAE / text encoder and their weights")
        self.dir = Path(dir).expanduser()
        self.encoder_id = encoder_id
        self.content_hash_max_bytes = content_hash_max_bytes

    def key_for(self, sample: Sample | str | Path, preprocess_cfg: Mapping[str, Any] | Any | None) -> str:
        """Hex key of (file identity, preprocessing, encoder); raises FileNotFoundError if the file is gone."""
        path = Path(sample.path if isinstance(sample, Sample) else sample)
        if not path.is_file():
            raise FileNotFoundError(f"cannot key a cache entry for {path}: the file does not exist")
        blob = json.dumps(
            {
                "format": CACHE_FORMAT,
                "encoder": self.encoder_id,
                "file": _file_identity(path, self.content_hash_max_bytes),
                "preprocess": _plain(preprocess_cfg),
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:40]

    def path_for(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"  # 256 sub-folders keep directories small

    def _drop_corrupt(self, path: Path, why: str) -> None:
        logger.warning("cache entry %s is unusable (%s); it will be recomputed", path, why)
        path.unlink(missing_ok=True)

    def _header(self, key: str) -> tuple[Path, dict[str, str]] | None:
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # SafetensorError: truncated, empty, not safetensors
            self._drop_corrupt(path, str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None
        if meta.get(_KEY_META) != key or meta.get(_ENC_META) != self.encoder_id or meta.get(_FMT_META) != CACHE_FORMAT:
            self._drop_corrupt(path, "its header names another key, encoder or format")
            return None
        return path, meta

    def has(self, key: str) -> bool:
        """Whether a readable entry exists (reads the header only)."""
        return self._header(key) is not None

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The cached tensors, or None when missing or corrupt (a corrupt file is reported and removed)."""
        found = self._header(key)
        if found is None:
            return None
        path = found[0]
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            self._drop_corrupt(path, str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None

    def metadata(self, key: str) -> dict[str, Any] | None:
        """The metadata given to `put`, or None when the entry is missing or corrupt."""
        found = self._header(key)
        return None if found is None else json.loads(found[1].get(_USER_META, "{}"))

    def put(self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> Path:
        """Write an entry atomically: a temporary file in the same folder, then os.replace."""
        if not tensors:
            raise ValueError(f"refusing to cache an empty tensor dict for key {key}")
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"cache values must be tensors; {bad} are not")
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # clone: slices of a batch share storage, which safetensors refuses to save.
        data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        header = {
            _KEY_META: key,
            _ENC_META: self.encoder_id,
            _FMT_META: CACHE_FORMAT,
            _USER_META: json.dumps(dict(metadata or {}), sort_keys=True, default=str),
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(data, tmp, metadata=header)
            os.replace(tmp, path)  # readers see the old entry or the whole new one, never half
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


@dataclass
class CacheStats:
    hits: int = 0
    computed: int = 0
    failed: int = 0


def cache_keys(
    dataset: VideoDataset, cache: LatentCache, indices: Sequence[int] | None = None, include_caption: bool = True
) -> dict[int, str]:
    """Cache key of each sample index (stats the files; decodes nothing)."""
    idx = range(len(dataset)) if indices is None else indices
    return {i: cache.key_for(dataset.samples[i], dataset.preprocess_params(i, include_caption)) for i in idx}


def missing_indices(
    dataset: VideoDataset, cache: LatentCache, indices: Sequence[int] | None = None, include_caption: bool = True
) -> list[int]:
    """Indices with no usable entry: when empty, the trainer need not load the encoders at all."""
    return [i for i, k in cache_keys(dataset, cache, indices, include_caption).items() if not cache.has(k)]


def build_cache(
    dataset: VideoDataset,
    encode_fn: Callable[[dict[str, Any]], Mapping[str, torch.Tensor]],
    cache: LatentCache,
    *,
    indices: Sequence[int] | None = None,
    batch_size: int = 1,
    include_caption: bool = True,
    progress: bool = True,
) -> CacheStats:
    """Encode every sample of `indices` (default: all) that has no entry yet.

    `encode_fn(batch)` gets `collate` of dataset items (video [B, C, F, H, W], caption, key, path,
    index) and returns tensors with a leading B dimension; it is called only for misses, so a
    fully cached dataset never needs the model (load it lazily inside encode_fn). Ranks pass
    disjoint `indices`. Files that fail to decode are reported and counted (ValueError if strict).
    """
    from tqdm.auto import tqdm

    keys = cache_keys(dataset, cache, indices, include_caption)
    missing = [i for i, k in keys.items() if not cache.has(k)]
    stats = CacheStats(hits=len(keys) - len(missing))
    # Group misses by bucket so each encode_fn batch stacks.
    by_bucket: dict[Any, list[int]] = {}
    for i in missing:
        by_bucket.setdefault(dataset.buckets[i], []).append(i)
    batches = [g[s : s + batch_size] for g in by_bucket.values() for s in range(0, len(g), batch_size)]
    bar = tqdm(total=len(keys), initial=stats.hits, desc="caching latents", disable=not progress or not missing)
    for batch in batches:
        items = []
        for i in batch:
            try:
                items.append(dataset.load(i))
            except SampleReadError as e:
                dataset.report.skip(dataset.samples[i].path, str(e), fix="re-export or delete the file")
                stats.failed += 1
        if items:
            out = encode_fn(collate(items))
            for name, t in out.items():
                if not isinstance(t, torch.Tensor) or t.ndim == 0 or t.shape[0] != len(items):
                    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(
                        f"encode_fn returned {name!r} with shape {shape}; expected a tensor [B={len(items)}, ...]"
                    )
            for j, it in enumerate(items):
                i = it["index"]
                meta = {"key": it["key"], "path": it["path"], "encoder_id": cache.encoder_id,
                        "preprocess": dataset.preprocess_params(i, include_caption)}  # fmt: skip
                cache.put(keys[i], {name: t[j] for name, t in out.items()}, meta)
                stats.computed += 1
        bar.update(len(batch))
    bar.close()
    logger.info(
        "latent cache %s: %d reused, %d encoded, %d failed", cache.dir, stats.hits, stats.computed, stats.failed
    )
    return stats


class CachedDataset(Dataset):
    """Items from the cache: the cached tensors plus caption, key and index; needs no model."""

    def __init__(self, dataset: VideoDataset, cache: LatentCache, include_caption: bool = True) -> None:
        self.dataset, self.cache = dataset, cache
        self.keys = cache_keys(dataset, cache, None, include_caption)
        self.buckets = dataset.buckets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        tensors = self.cache.get(self.keys[index])
        if tensors is None:
            raise ValueError(
                f"no cache entry for {self.dataset.samples[index].path} (key {self.keys[index]}) in {self.cache.dir}; "
                "run build_cache first (it recomputes missing or corrupt entries)"
            )
        s = self.dataset.samples[index]
        return dict(tensors, caption=self.dataset.caption(index), key=s.key, path=str(s.path), index=index)
