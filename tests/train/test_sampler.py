"""LengthGroupedSampler: a reproducible permutation per (seed, epoch) with < 5% padding, resume and DDP sharding."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from benchmarks.common import skewed_lengths
from job.train.sampler import LengthGroupedSampler, padding_fraction

SKEWED = skewed_lengths(2000, seed=3)


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@pytest.mark.parametrize("n,batch_size,world_size", [(2000, 4, 1), (2000, 8, 1), (1003, 4, 1), (997, 4, 2), (7, 4, 1),
                                                     (3, 8, 1), (1, 1, 1), (205, 4, 1)])
def test_every_index_exactly_once(n, batch_size, world_size):
    sampler = LengthGroupedSampler(SKEWED[:n], batch_size=batch_size, seed=0, world_size=world_size)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(n)) and len(sampler) == n


def test_deterministic_under_seed_and_epoch_and_independent_of_global_rng():
    a = LengthGroupedSampler(SKEWED, batch_size=4, seed=7)
    a.set_epoch(3)
    torch.manual_seed(0)
    random.seed(0)
    first = list(a)
    torch.manual_seed(12345)  # what a resume does: restore the global RNG state at an arbitrary point
    torch.rand(100)
    b = LengthGroupedSampler(list(SKEWED), batch_size=4, seed=7)
    b.set_epoch(3)
    assert list(b) == first == list(a)


def test_different_seed_or_epoch_gives_a_different_order():
    sampler = LengthGroupedSampler(SKEWED, batch_size=4, seed=0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    other_seed = list(LengthGroupedSampler(SKEWED, batch_size=4, seed=1))
    assert epoch0 != epoch1 and epoch0 != other_seed
    # not just reordered batches: the batch compositions change too
    assert {frozenset(b) for b in _batches(epoch0, 4)} != {frozenset(b) for b in _batches(epoch1, 4)}


@pytest.mark.parametrize("batch_size", [4, 8])
def test_padding_under_5_percent_on_skewed_lengths_vs_random(batch_size):
    random_order = list(range(len(SKEWED)))
    random.Random(0).shuffle(random_order)
    baseline = padding_fraction(SKEWED, random_order, batch_size)
    for epoch in range(3):
        sampler = LengthGroupedSampler(SKEWED, batch_size=batch_size, seed=0)
        sampler.set_epoch(epoch)
        grouped = padding_fraction(SKEWED, list(sampler), batch_size)
        assert grouped <= 0.05, grouped
        assert baseline >= 0.3 and baseline > 6 * grouped, (baseline, grouped)


def test_random_across_groups_and_longest_batch_first():
    order = list(LengthGroupedSampler(SKEWED, batch_size=4, seed=0))
    maxima = [max(SKEWED[i] for i in b) for b in _batches(order, 4)]
    assert maxima[0] == max(SKEWED), "the batch with the longest row comes first (OOM at step 1, not later)"
    # Not a long-to-short (or short-to-long) sweep: batch maxima after the first are not monotone and the
    # first and second halves of the epoch have similar mean lengths.
    rest = maxima[1:]
    ups = sum(b > a for a, b in itertools.pairwise(rest))
    assert 0.3 < ups / (len(rest) - 1) < 0.7
    half = len(rest) // 2
    assert abs(sum(rest[:half]) / half - sum(rest[half:]) / (len(rest) - half)) < 0.15 * (sum(rest) / len(rest))


def test_partial_batch_is_last_so_batches_never_shift():
    lengths = SKEWED[:1003]  # 1003 = 250 * 4 + 3
    order = list(LengthGroupedSampler(lengths, batch_size=4, seed=0))
    batches = _batches(order, 4)
    assert [len(b) for b in batches] == [4] * 250 + [3]
    assert padding_fraction(lengths, order, 4) <= 0.05


@pytest.mark.parametrize("k", [1, 17, 120])
def test_resume_skipping_k_batches_continues_the_uninterrupted_order(k):
    """What HF's skip_first_batches sees after a resume in the middle of epoch 2: the rest of the same order."""
    batch_size = 4
    uninterrupted = LengthGroupedSampler(SKEWED, batch_size=batch_size, seed=42)
    uninterrupted.set_epoch(2)
    full = _batches(list(uninterrupted), batch_size)
    torch.manual_seed(999)  # the resumed process restores some other global RNG state
    resumed = LengthGroupedSampler(SKEWED, batch_size=batch_size, seed=42)
    resumed.set_epoch(2)
    loader = torch.utils.data.DataLoader(range(len(SKEWED)), batch_size=batch_size, sampler=resumed)
    from accelerate.data_loader import skip_first_batches

    after = [b.tolist() for b in skip_first_batches(loader, k)]
    assert after == full[k:]


@pytest.mark.parametrize("world_size", [1, 2])
def test_ddp_round_robin_covers_every_index_once(world_size):
    """accelerate's BatchSamplerShard hands consecutive batches to ranks 0, 1, 0, 1, ...; every rank computes the
    same order, so the ranks' shares are disjoint and together cover the epoch."""
    from accelerate.data_loader import BatchSamplerShard

    lengths, batch_size, ranks = SKEWED[:1000], 4, 2
    shares = []
    for rank in range(ranks):
        sampler = LengthGroupedSampler(lengths, batch_size=batch_size, seed=5, world_size=world_size)
        sampler.set_epoch(1)
        batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size=batch_size, drop_last=False)
        shares.append([b for b in BatchSamplerShard(batch_sampler, num_processes=ranks, process_index=rank)])
    seen = [i for share in shares for batch in share for i in batch]
    assert sorted(seen) == list(range(len(lengths)))
    assert not set(i for b in shares[0] for i in b) & set(i for b in shares[1] for i in b)
    if world_size == 2:  # both ranks' batches of one step come from one sorted group: similar lengths
        per_step = [max(max(lengths[i] for i in a), max(lengths[i] for i in b)) / min(max(lengths[i] for i in a),
                    max(lengths[i] for i in b)) for a, b in zip(*shares, strict=True)]
        assert sorted(per_step)[len(per_step) // 2] < 1.05


def test_dataset_column_and_numpy_lengths_are_accepted():
    import datasets
    import numpy as np

    column = datasets.Dataset.from_dict({"n": SKEWED[:50]})["n"]
    expected = list(LengthGroupedSampler(SKEWED[:50], batch_size=4, seed=0))
    assert list(LengthGroupedSampler(column, batch_size=4, seed=0)) == expected
    assert list(LengthGroupedSampler(np.array(SKEWED[:50]), batch_size=4, seed=0)) == expected


@pytest.mark.parametrize("kwargs,needle", [
    ({"lengths": []}, "lengths is empty"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"batch_size": -2}, "batch_size must be an integer >= 1"),
    ({"megabatch_mult": 0}, "megabatch_mult must be an integer >= 1"),
    ({"lengths": [5, None, 3]}, r"row 1: None"),
    ({"lengths": [5, -1]}, r"row 1: -1"),
])
def test_bad_arguments_raise_clear_value_errors(kwargs, needle):
    args = {"lengths": [10, 20, 30], "batch_size": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=needle):
        LengthGroupedSampler(**args)


def test_fewer_rows_than_batch_size_is_one_short_batch():
    order = list(LengthGroupedSampler([5, 50, 20], batch_size=8, seed=0))
    assert sorted(order) == [0, 1, 2]


def test_padding_fraction_values():
    assert padding_fraction([4, 2, 3, 3], [0, 1, 2, 3], 2) == pytest.approx(2 / 14)
    assert padding_fraction([4, 2, 3, 3], [0, 2, 1, 3], 2) == pytest.approx(2 / 14)
    assert padding_fraction([4, 3, 3, 2], [0, 1, 2, 3], 2) == pytest.approx(2 / 14)
    assert padding_fraction([4, 4, 2, 2], [0, 1, 2, 3], 2) == 0.0
    assert padding_fraction([5, 1, 1], [0, 1, 2], 2) == pytest.approx(4 / 11)  # [5, 1+4 pad], [1]
