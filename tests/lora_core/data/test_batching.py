"""Batch order: epoch_batches, the global batch of each micro-step, data.repeats, per-sample seeds."""

from __future__ import annotations

from collections import Counter

import pytest

from lora_core.data import GlobalBatches, epoch_batches, sample_seed

BUCKETS = [(5, 32, 32)] * 7 + [(9, 32, 64)] * 5 + [(1, 64, 32)] * 3


def test_batch_order_is_a_pure_function_of_seed_and_epoch() -> None:
    a = epoch_batches(BUCKETS, 2, seed=1, epoch=0)
    # Pinned from the pre-split lora_core/data/pipeline.py (git 0fd3c69).
    assert a == [[2], [4, 6], [10], [8, 11], [12], [13, 14], [9, 7], [0, 3], [1, 5]]
    assert a == epoch_batches(BUCKETS, 2, seed=1, epoch=0)
    assert a != epoch_batches(BUCKETS, 2, seed=1, epoch=1) and a != epoch_batches(BUCKETS, 2, seed=2, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(15))  # every sample once per epoch
    assert all(len({BUCKETS[i] for i in b}) == 1 for b in a)  # one bucket per batch
    with pytest.raises(ValueError, match="repeats"):
        epoch_batches(BUCKETS, 2, 1, 0, repeats=0)


def _reference_global_batch(buckets: list, global_size: int, seed: int, micro: int) -> list[int]:
    """train.py's `Batches.global_batch` before it moved here, written out."""
    per_epoch = len(epoch_batches(buckets, global_size, seed, 0))
    epoch, pos = divmod(micro, per_epoch)
    batch = epoch_batches(buckets, global_size, seed, epoch)[pos]
    return [batch[i % len(batch)] for i in range(global_size)]


@pytest.mark.parametrize("global_size", [1, 2, 4])
def test_global_batches_match_the_train_py_formula(global_size: int) -> None:
    gb = GlobalBatches(BUCKETS, global_size, seed=11)
    assert gb.per_epoch == len(epoch_batches(BUCKETS, global_size, 11, 0))
    for micro in range(3 * gb.per_epoch + 2):  # across epoch boundaries
        batch = gb.global_batch(micro)
        assert batch == _reference_global_batch(BUCKETS, global_size, 11, micro), micro
        assert len(batch) == global_size and len({BUCKETS[i] for i in batch}) == 1
    # Asking out of order (a resumed run) gives the same batches: nothing depends on call history.
    assert GlobalBatches(BUCKETS, global_size, seed=11).global_batch(2 * gb.per_epoch + 1) == gb.global_batch(
        2 * gb.per_epoch + 1
    )


def test_short_last_batch_wraps_around() -> None:
    gb = GlobalBatches([(1, 32, 32)] * 3, 4, seed=0)  # one bucket of 3 samples, global batch 4
    assert gb.per_epoch == 1
    batch = gb.global_batch(0)
    assert len(batch) == 4 and batch[3] == batch[0] and sorted(batch[:3]) == [0, 1, 2]


@pytest.mark.parametrize("repeats", [1, 2, 3])
def test_repeats_show_each_sample_that_many_times_per_epoch(repeats: int) -> None:
    buckets = [(5, 32, 32)] * 6 + [(9, 32, 64)] * 4  # bucket sizes x repeats divide by 2: no wrap-around
    gb = GlobalBatches(buckets, 2, seed=3, repeats=repeats)
    assert gb.per_epoch == 5 * repeats
    seen = Counter(i for m in range(gb.per_epoch) for i in gb.global_batch(m))
    assert seen == {i: repeats for i in range(10)}
    nxt = Counter(i for m in range(gb.per_epoch, 2 * gb.per_epoch) for i in gb.global_batch(m))
    assert nxt == seen  # and again in the next epoch


def test_sample_seed_formula_and_distinctness() -> None:
    assert sample_seed(0, 0, 0) == 0
    assert sample_seed(3, 7, 2) == (3 * 1_000_003 + 7) * 65_537 + 2
    seeds = {sample_seed(5, m, p) for m in range(200) for p in range(16)}
    assert len(seeds) == 200 * 16


def test_global_batches_refuse_bad_sizes() -> None:
    with pytest.raises(ValueError, match="global batch size"):
        GlobalBatches(BUCKETS, 0, seed=0)
    with pytest.raises(ValueError, match="repeats"):
        GlobalBatches(BUCKETS, 2, seed=0, repeats=0)
