"""`LengthGroupedSampler`: batches of rows with similar token counts, in a random but reproducible order.

A Qwen3-VL row costs its text tokens plus one token per 32x32 px of its image, so rows of one dataset range from
~100 to ~1,300 tokens. Random batches pad every row to the longest row of its batch (40-50% of the tokens the GPU
processes are padding at batch 4-8 on mixed image sizes); grouping rows of similar length brings that to ~2%.

How the order of one epoch is built (a pure function of lengths, batch_size, world_size, seed and epoch):

1. a random permutation of all rows, from the sampler's own `torch.Generator` seeded by (seed, epoch);
2. cut into megabatches of `megabatch_mult * batch_size * world_size` rows; each megabatch is sorted by length
   (longest first; ties keep their random order);
3. each megabatch is cut into groups of `batch_size * world_size` consecutive rows: one step's batches across the
   ranks (accelerate's `BatchSamplerShard` hands consecutive batches to different ranks), so every rank gets rows
   of about the same length in the same step and no rank waits for a longer one;
4. the groups of the whole epoch are shuffled (random across groups: neither a long-to-short sweep nor the same
   neighbours every epoch), then the group holding the longest row is moved to the front, as HF's own
   LengthGroupedSampler does: a batch that does not fit in GPU memory fails at step 1, not hours into the run;
5. the rows that do not fill a whole group (fewer than batch_size * world_size, the shortest rows of the last
   megabatch) come last, so that batches are only ever cut at multiples of batch_size: a short batch in the middle
   would shift every batch after it.

The sampler never touches the global RNG. Resuming a run restores the global RNG state at a point that depends on
where the checkpoint was taken; an order drawn from the global RNG would then differ from the uninterrupted run's.
Here the order depends only on (seed, epoch), so HF's `skip_first_batches` lands on exactly the rows the
uninterrupted run would have seen next, and every DDP rank computes the same order before taking its share.

`set_epoch` must reach the sampler before each epoch's iteration. HF Trainer and accelerate forward it through their
wrappers, except in one case (accelerate 1.15): under DDP, after a mid-epoch resume, the sampler sits below
SkipBatchSampler -> BatchSamplerShard -> BatchSampler and neither `DataLoaderShard.set_epoch` nor the Trainer's extra
call reaches it, so a resume in epoch >= 1 would replay epoch 0's order. A trainer using this sampler should call
`sampler.set_epoch(epoch)` itself at the start of each epoch.

`megabatch_mult` trades randomness of batch composition for padding: a larger megabatch has closer neighbours in
length. 50 (HF's default) gives < 5% padding at batch sizes 4-8 on long-tailed multimodal lengths
(benchmarks/padding.py).
"""

from __future__ import annotations

import hashlib
import itertools
import numbers
from collections.abc import Iterator, Sequence

import torch


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed from (seed, epoch) without collisions between nearby pairs (seed+epoch would collide)."""
    digest = hashlib.blake2b(f"length-grouped:{int(seed)}:{int(epoch)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _as_lengths(lengths: Sequence[int]) -> torch.Tensor:
    values = lengths.tolist() if hasattr(lengths, "tolist") else list(lengths)
    if not values:
        raise ValueError("LengthGroupedSampler: lengths is empty; the training split has no rows")
    bad = [(i, v) for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0]
    if bad:
        shown = ", ".join(f"row {i}: {v!r}" for i, v in bad[:5])
        raise ValueError(f"LengthGroupedSampler: lengths must be non-negative integers (token counts); got {shown}")
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Yields every row index exactly once per epoch; consecutive `batch_size` indices have similar lengths.

    Plug into HF Trainer by overriding `_get_train_sampler` to return
    `LengthGroupedSampler(lengths, batch_size=per_device_batch_size, seed=data_seed)`; the Trainer (through
    accelerate) calls `set_epoch` at the start of each epoch. Under DDP pass `world_size` so that the batches of one
    step (one per rank) are also similar in length; the order stays identical on every rank.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, megabatch_mult: int = 50,
                 *, world_size: int = 1):
        for name, value in (("batch_size", batch_size), ("megabatch_mult", megabatch_mult), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LengthGroupedSampler: {name} must be an integer >= 1, got {value!r}")
        self.lengths = _as_lengths(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.megabatch_mult = megabatch_mult
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order())

    def order(self, epoch: int | None = None) -> list[int]:
        """The full index order of `epoch` (default: the current one)."""
        n = len(self.lengths)
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch if epoch is None else epoch))
        perm = torch.randperm(n, generator=generator)
        group = self.batch_size * self.world_size
        megabatch = self.megabatch_mult * group
        bounds = [*range(0, n, megabatch), n]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < group:
            del bounds[-2]  # a last megabatch smaller than one group joins the previous one
        groups: list[torch.Tensor] = []
        tail = perm[:0]
        for start, end in itertools.pairwise(bounds):
            chunk = perm[start:end]
            chunk = chunk[torch.sort(self.lengths[chunk], descending=True, stable=True).indices]
            full = (end - start) // group * group
            if full:
                groups.extend(chunk[:full].split(group))
            tail = chunk[full:]  # non-empty only for the last megabatch
        if groups:
            shuffled = torch.randperm(len(groups), generator=generator).tolist()
            groups = [groups[i] for i in shuffled]
            longest = max(range(len(groups)), key=lambda i: (int(self.lengths[groups[i][0]]), -i))
            groups[0], groups[longest] = groups[longest], groups[0]
        return torch.cat([*groups, tail]).tolist()


def padding_fraction(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """Pad tokens / all tokens when `order` is cut into consecutive batches, each right-padded to its longest row."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    values = lengths.tolist() if hasattr(lengths, "tolist") else list(lengths)
    order = list(order)
    real = pad = 0
    for start in range(0, len(order), batch_size):
        batch = [values[i] for i in order[start : start + batch_size]]
        real += sum(batch)
        pad += max(batch) * len(batch) - sum(batch)
    total = real + pad
    return pad / total if total else 0.0
