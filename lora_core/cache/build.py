"""Filling the feature cache: media (VAE latents) and text (encoder embeddings) separately, sharded
across ranks.

Rank r encodes the misses among the samples with index i % world == r, so the build is
deterministic and needs no communication; the caller puts a barrier after it. `encode` is called
only for misses, so a fully cached dataset never loads a model (load it lazily inside `encode`).
A sample that fails to decode is reported by name once, skipped and returned in
`CacheStats.failed_indices`; it never stops the build.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_core.data import SampleReadError, VideoDataset

from .feature_cache import FeatureCache

logger = logging.getLogger(__name__)


@dataclass
class CacheStats:
    """What one rank's build did; `failed_indices` are dataset indices (media) or indices into `texts`."""

    hits: int = 0
    computed: int = 0
    failed: int = 0
    failed_indices: list[int] = field(default_factory=list)


def _check_shard(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank}, world={world} is not a valid shard: expected world >= 1 and 0 <= rank < world")


def _check_output(out: Any, what: str) -> Mapping[str, torch.Tensor]:
    if not isinstance(out, Mapping) or not out or not all(isinstance(v, torch.Tensor) for v in out.values()):
        got = {k: type(v).__name__ for k, v in out.items()} if isinstance(out, Mapping) else type(out).__name__
        raise ValueError(
            f"encode returned {got} for {what}; expected a non-empty mapping of name -> torch.Tensor "
            "for that one item (no batch dimension)"
        )
    return out


def _log(rank: int, msg: str, *args: Any) -> None:
    logger.log(logging.INFO if rank == 0 else logging.DEBUG, msg, *args)


def _media_params(dataset: VideoDataset, index: int) -> dict[str, Any]:
    return dataset.preprocess_params(index, include_caption=False)


def media_keys(
    dataset: VideoDataset,
    cache: FeatureCache,
    encoder_id: str,
    indices: Sequence[int] | None = None,
    *,
    progress: bool = True,
) -> dict[int, str]:
    """Media key of each sample index (default: all); decodes nothing, and hashes only files the
    content index does not know. A file that vanished or cannot be read since the probe is reported
    (ValueError with data.strict) and left out of the result."""
    from tqdm.auto import tqdm

    idx = range(len(dataset)) if indices is None else indices
    keys: dict[int, str] = {}
    try:
        # delay: the bar appears only when hashing new files takes a while
        for i in tqdm(idx, desc="hashing media", delay=3.0, leave=False, disable=not progress):
            s = dataset.samples[i]
            try:
                keys[i] = cache.media_key(s, _media_params(dataset, i), encoder_id)
            except OSError as e:
                dataset.report.skip(s.path, f"cannot read it to key its cache entry: {e}", fix="restore the file")
    finally:
        cache.flush()
    return keys


def build_media_cache(
    dataset: VideoDataset,
    cache: FeatureCache,
    encoder_id: str,
    encode: Callable[[dict[str, Any]], Mapping[str, torch.Tensor]],
    *,
    indices: Sequence[int] | None = None,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> CacheStats:
    """Encode this rank's missing media entries among `indices` (default: all samples).

    `encode(item)` gets one `dataset.load(i)` item (video [C, F, H, W] in [-1, 1], caption, key,
    path, index, ...) and returns tensors without a batch dimension, e.g. {"latents": [C', F', H', W']}.
    """
    from tqdm.auto import tqdm

    _check_shard(rank, world)
    idx = range(len(dataset)) if indices is None else indices
    mine = [i for i in idx if i % world == rank]
    # Hash only our shard: the ranks split the reading of the files too.
    keys = media_keys(dataset, cache, encoder_id, mine, progress=progress)
    stats = CacheStats(failed_indices=[i for i in mine if i not in keys])
    missing, first = [], set()
    for i, k in keys.items():
        if k not in first and not cache.has(k):
            missing.append(i)  # the first of identical samples (same bytes, same plan) encodes for all
        first.add(k)
    stats.hits = len(keys) - len(missing)
    bar = tqdm(missing, desc=f"caching media (rank {rank})", disable=not progress or not missing)
    for i in bar:
        s = dataset.samples[i]
        try:
            item = dataset.load(i)
        except SampleReadError as e:  # e.g. a clip corrupt in the middle, which the probe passed
            dataset.report.skip(s.path, str(e))  # the message names the file and the fix
            stats.failed_indices.append(i)
            continue
        out = _check_output(encode(item), f"sample {i} ({s.path})")
        meta = {"kind": "media", "encoder_id": encoder_id, "key": s.key, "path": str(s.path),
                "preprocess": _media_params(dataset, i)}  # fmt: skip
        cache.put(keys[i], out, meta)
        stats.computed += 1
    bar.close()
    stats.failed_indices.sort()
    stats.failed = len(stats.failed_indices)
    _log(rank, "media cache %s (rank %d of %d): %d reused, %d encoded, %d failed",
         cache.dir, rank, world, stats.hits, stats.computed, stats.failed)  # fmt: skip
    return stats


def _encode_texts(
    encode: Callable[[list[str]], list[Mapping[str, torch.Tensor]]], batch: list[str]
) -> list[Mapping[str, torch.Tensor] | ValueError]:
    """encode(batch); when that raises ValueError, each text alone, so that one text the encoder
    refuses (a tokenizer error) fails by itself. Other exceptions (out of memory) propagate."""
    try:
        outs = encode(batch)
    except ValueError as e:
        if len(batch) == 1:
            return [e]
        return [r for t in batch for r in _encode_texts(encode, [t])]
    if not isinstance(outs, Sequence) or len(outs) != len(batch):
        n = len(outs) if isinstance(outs, Sequence) else type(outs).__name__
        raise ValueError(f"encode returned {n} outputs for {len(batch)} texts; expected one mapping per text")
    return list(outs)


def build_text_cache(
    texts: Sequence[str],
    cache: FeatureCache,
    encoder_id: str,
    encode: Callable[[list[str]], list[Mapping[str, torch.Tensor]]],
    *,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 8,
    progress: bool = True,
) -> CacheStats:
    """Encode this rank's missing text entries, each distinct text once, `batch_size` at a time.

    Text i (its first occurrence in `texts`) belongs to rank i % world. `encode(list_of_texts)`
    returns one tensor mapping per text, without a batch dimension. A text whose encoding raises
    ValueError is reported and failed; `failed_indices` index into `texts` (duplicates included).
    """
    from tqdm.auto import tqdm

    _check_shard(rank, world)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: expected an integer >= 1")
    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}] is {type(t).__name__} {t!r}; expected a str (use '' for no caption)")
        first.setdefault(t, i)
    mine = [t for t, i in first.items() if i % world == rank]
    keys = {t: cache.text_key(t, encoder_id) for t in mine}
    missing = [t for t in mine if not cache.has(keys[t])]
    stats = CacheStats(hits=len(mine) - len(missing))
    failed: set[str] = set()
    bar = tqdm(total=len(missing), desc=f"caching text (rank {rank})", disable=not progress or not missing)
    for s in range(0, len(missing), batch_size):
        batch = missing[s : s + batch_size]
        for t, out in zip(batch, _encode_texts(encode, batch)):
            if isinstance(out, ValueError):
                logger.warning("cannot encode the text %r: %s; it is skipped", t[:200], out)
                failed.add(t)
                continue
            meta = {"kind": "text", "encoder_id": encoder_id, "text": t}
            cache.put(keys[t], _check_output(out, f"text {t[:80]!r}"), meta)
            stats.computed += 1
        bar.update(len(batch))
    bar.close()
    stats.failed_indices = [i for i, t in enumerate(texts) if t in failed]
    stats.failed = len(stats.failed_indices)
    _log(rank, "text cache %s (rank %d of %d): %d reused, %d encoded, %d failed",
         cache.dir, rank, world, stats.hits, stats.computed, stats.failed)  # fmt: skip
    return stats
