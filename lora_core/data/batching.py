"""Which samples train at each micro-step: one global batch per micro-step, each from one bucket.

The global batch of micro-step m is a pure function of (seed, m); each data-parallel rank takes
its slice of it, so the samples, their noise and their crops do not depend on the number of
processes, and a resumed run continues at micro-step m without replaying the skipped ones.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lora_core.data.sampling import sample_rng


def epoch_batches(
    buckets: Sequence[Hashable], batch_size: int, seed: int, epoch: int, *, repeats: int = 1
) -> list[list[int]]:
    """All batches of `epoch` in training order, each from one bucket: a pure function of its arguments.

    Each sample appears `repeats` times per epoch (a fresh shuffle of its bucket per repeat).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (data.repeats), got {repeats}")
    rng = sample_rng(seed, epoch, "batches")
    groups: dict[Hashable, list[int]] = {}
    for i, b in enumerate(buckets):
        groups.setdefault(b, []).append(i)
    batches: list[list[int]] = []
    for b in sorted(groups, key=repr):  # repr: a fixed order for any hashable bucket id
        idx = np.concatenate([rng.permutation(groups[b]) for _ in range(repeats)])
        batches += [idx[s : s + batch_size].tolist() for s in range(0, len(idx), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class GlobalBatches:
    """The global batch (all data-parallel ranks together) of every micro-step.

    Micro-step m is batch m % per_epoch of epoch m // per_epoch of `epoch_batches`; a bucket's short
    last batch wraps around to `global_size` samples, so every rank always has its share.
    """

    buckets: Sequence[Hashable]
    global_size: int
    seed: int
    repeats: int = 1
    per_epoch: int = field(init=False)
    _epoch: tuple[int, list[list[int]]] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.global_size < 1:
            raise ValueError(
                f"global batch size must be >= 1 (train.batch_size x data-parallel ranks), got {self.global_size}"
            )
        self.buckets = list(self.buckets)
        if not self.buckets:
            raise ValueError("GlobalBatches needs at least one sample")
        self.per_epoch = len(self._batches(0))

    def _batches(self, epoch: int) -> list[list[int]]:
        # One epoch's order is reused for all its micro-steps (recomputing it is O(samples) per step).
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(self.buckets, self.global_size, self.seed, epoch, repeats=self.repeats))
        return self._epoch[1]

    def global_batch(self, micro: int) -> list[int]:
        """Sample indices of micro-step `micro`: `global_size` of them, all from one bucket."""
        if micro < 0:
            raise ValueError(f"micro-step must be >= 0, got {micro}")
        epoch, pos = divmod(micro, self.per_epoch)
        batch = self._batches(epoch)[pos]
        return [batch[i % len(batch)] for i in range(self.global_size)]  # a short last batch wraps around


def sample_seed(seed: int, micro: int, position: int) -> int:
    """Seed of the random draws (σ, noise, conditioning) of the sample at `position` of the global
    batch of micro-step `micro`."""
    return (seed * 1_000_003 + micro) * 65_537 + position
