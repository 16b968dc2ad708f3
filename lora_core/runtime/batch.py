"""The one batch type the objectives take, and the reader that assembles it from the cache.

A micro-step's samples are fixed by (seed, micro-step) (`lora_core.data.GlobalBatches`); each sample's cached
fields are read (media-keyed and text-keyed entries apart), its droppable conditions are dropped by a pure
function of (seed, micro-step, sample index, condition), and a background thread reads the next micro-steps
while the current one trains.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_core.data import caption_dropped, sample_rng


@dataclass
class Batch:
    """One micro-batch for the objective. `fields[name][i]` is sample i's tensor (on the device); `meta[i]` its
    metadata (fps, frame indices, ...); `seeds[i]` seeds every random draw of sample i (so draws do not depend on
    the batch layout or the number of processes); `dropped[cond][i]` whether sample i's condition was dropped."""

    fields: dict[str, list[torch.Tensor]]
    meta: list[dict[str, Any]]
    seeds: list[int]
    dropped: dict[str, list[bool]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.seeds)

    def stack(self, name: str) -> torch.Tensor:
        """fields[name] stacked to [B, ...] (every sample of a batch shares its bucket, so shapes agree)."""
        return torch.stack(self.fields[name])

    def to(self, device: torch.device) -> "Batch":
        return Batch({k: [t.to(device, non_blocking=True) for t in v] for k, v in self.fields.items()},
                     self.meta, self.seeds, self.dropped)


def sample_seed(seed: int, micro: int, position: int) -> int:
    """Seed of the random draws (noise, timestep, conditioning) of the sample at `position` of the global batch
    of micro-step `micro`."""
    return (seed * 1_000_003 + micro) * 65_537 + position


def dropout_seed(sample: int) -> int:
    """LoRA-dropout seed of a sample, a stream apart from its objective draws."""
    return (sample * 0x9E3779B1 + 0x5851F42D) % (1 << 62)


def condition_dropped(seed: int, micro: int, index: int, condition: str, p: float) -> bool:
    """Whether sample `index` trains without `condition` at micro-step `micro`: fixed by its arguments.
    The caption keeps the stream it always had, so existing runs draw the same."""
    if condition == "caption":
        return caption_dropped(seed, micro, index, p)
    if p <= 0:
        return False
    if p >= 1:
        return True
    stream = f"{condition}_dropout"
    return bool(sample_rng(seed ^ zlib.crc32(stream.encode()), index, stream, micro).random() < p)


@dataclass(frozen=True)
class FieldSource:
    """Where a batch field comes from: the sample's media entry or its text entry."""

    name: str
    keyed_by: str   # "media" | "text"


@dataclass(frozen=True)
class DropRule:
    name: str
    fields: tuple[str, ...]
    null: str       # "empty_text" | "zeros" | "objective"
    p: float


class BatchReader:
    """Micro-step -> Batch on the CPU, read from the cache; `prefetch` micro-steps are read ahead by a thread."""

    def __init__(self, get_entry: Callable[[str], dict[str, torch.Tensor] | None],
                 media_keys: dict[int, str], text_keys: dict[int, str], empty_text_key: str | None,
                 fields: Sequence[FieldSource], drops: Sequence[DropRule], meta: Callable[[int], dict[str, Any]],
                 seed: int, describe: Callable[[int], str], prefetch: int = 2) -> None:
        self.get_entry, self.media_keys, self.text_keys = get_entry, media_keys, text_keys
        self.fields, self.drops, self.meta, self.seed, self.describe = list(fields), list(drops), meta, seed, describe
        self.empty: dict[str, torch.Tensor] = {}
        if empty_text_key is not None and any(d.null == "empty_text" for d in self.drops):
            self.empty = self._entry(empty_text_key, "the empty text (condition dropout)")
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-reader") if prefetch else None
        self._pending: dict[int, Future] = {}

    def _entry(self, key: str, what: str) -> dict[str, torch.Tensor]:
        entry = self.get_entry(key)
        if entry is None:
            raise ValueError(f"cache entry {key} of {what} is missing; it was built at start-up, so the cache "
                             "folder changed during training: run again to rebuild the missing entries")
        return entry

    def read(self, micro: int, indices: Sequence[int], positions: Sequence[int]) -> Batch:
        fields: dict[str, list[torch.Tensor]] = {f.name: [] for f in self.fields}
        dropped: dict[str, list[bool]] = {d.name: [] for d in self.drops}
        for idx in indices:
            entries: dict[str, dict[str, torch.Tensor]] = {}
            if idx in self.media_keys:
                entries["media"] = self._entry(self.media_keys[idx], self.describe(idx))
            if idx in self.text_keys:
                entries["text"] = self._entry(self.text_keys[idx], f"the caption of {self.describe(idx)}")
            values = {f.name: entries[f.keyed_by][f.name] for f in self.fields}
            for d in self.drops:
                is_dropped = condition_dropped(self.seed, micro, idx, d.name, d.p)
                dropped[d.name].append(is_dropped)
                if not is_dropped:
                    continue
                for name in d.fields:
                    values[name] = self.empty[name] if d.null == "empty_text" else (
                        torch.zeros_like(values[name]) if d.null == "zeros" else values[name])
            for name, t in values.items():
                fields[name].append(t)
        seeds = [sample_seed(self.seed, micro, pos) for pos in positions]
        return Batch(fields, [self.meta(i) for i in indices], seeds, dropped)

    def get(self, micro: int, plan: Callable[[int], tuple[list[int], list[int]]]) -> Batch:
        """The batch of `micro` (plan(micro) -> (dataset indices, global positions)), prefetching the next ones."""
        if self._pool is None:
            return self.read(micro, *plan(micro))
        for m in range(micro, micro + self.prefetch + 1):
            if m not in self._pending:
                self._pending[m] = self._pool.submit(self.read, m, *plan(m))
        for m in [m for m in self._pending if m < micro]:
            self._pending.pop(m).cancel()
        return self._pending.pop(micro).result()

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
