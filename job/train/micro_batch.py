"""SFT_PER_DEVICE_BATCH_SIZE=auto: the largest micro-batch that fits, with the effective batch the settings ask for.

Auto changes the speed, never the result. The effective batch (rows per optimizer step, all processes together) is
what the integer default gives: 2 x SFT_GRAD_ACCUM x processes (`effective_batch`). The search tries the micro-batch
sizes b that divide the per-process share of it (`candidates`), smallest first, and keeps the largest whose forward
and backward on the longest rows fits; gradient accumulation becomes share / b, so every optimizer step averages the
same rows as with any other b (the Trainer normalises the loss by the supervised tokens of the whole accumulation
window).

What one try runs (`try_size`): the batch the length-grouped sampler yields first at that size (job/train/sampler.py
moves the group holding the longest row to the front; each rank takes its own batch of that group), built with the
real training collator, through the trainer's model (4-bit, LoRA, gradient checkpointing and TRL's fused LM head, as
a training step runs it), then backward. It fits when it raises no out-of-memory error and, on CUDA, when its peak
allocated memory stays under (1 - HEADROOM) of the device's total: the rest is for what a probe does not see (the
CUDA context, the caching allocator's fragmentation over thousands of steps, the optimizer's LoRA states, NCCL's
buffers). Without SFT_GROUP_BY_LENGTH the batch is the longest rows of the split: no later batch pads longer.

The search leaves the training as it found it (`untouched`): the RNG streams (Python, NumPy, torch CPU and CUDA) are
restored, so dropout masks and the dataloader workers' seeds are the ones a hand-set run draws; every module's
train/eval mode is restored; gradients are dropped; no optimizer exists yet. A run with `auto` therefore trains the
adapter that a run with SFT_PER_DEVICE_BATCH_SIZE=b and SFT_GRAD_ACCUM=share/b trains (tests/runs_reference.py).

Every rank probes its own device and the smallest of the sizes that fit is taken (an all-reduce MIN): the ranks train
with one micro-batch. Not even one row fitting is NoMicroBatchFits (exit 2). The choice and every try (size, rows'
tokens, outcome, peak memory, seconds) go to the log and training_meta.json; rank 0 writes it into the resume
fingerprint file, which every checkpoint carries, and a resumed run takes it from there instead of searching again
(another size would draw other dropout masks: the resume would not be exact).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from job.config.schema import JobConfig
from job.data.loaders import LENGTH_COLUMN
from job.errors import NoMicroBatchFits
from job.train import distributed, resume
from job.train.sampler import LengthGroupedSampler

log = logging.getLogger("job.train")

AUTO = "auto"
DEFAULT_SIZE = 2  # the integer default of SFT_PER_DEVICE_BATCH_SIZE, whose effective batch `auto` keeps
HEADROOM = 0.10  # the share of the device's memory a fitting try leaves free (CUDA; the module docstring says why)
MAX_SIZE = 512  # the integer form's upper bound


@dataclass(frozen=True)
class Trial:
    """One try of the search: `rows` rows padded to `longest` tokens (`tokens` = rows x longest)."""

    rows: int
    longest: int
    tokens: int
    outcome: str  # "fits" | "out of memory" | "over the headroom"
    peak_bytes: int | None  # CUDA's peak allocated memory during the try (None on the CPU)
    seconds: float

    @property
    def fits(self) -> bool:
        return self.outcome == "fits"


@dataclass(frozen=True)
class MicroBatch:
    """The micro-batch a run trains with and how it was decided (`source`: setting, search or checkpoint-N)."""

    setting: int | str
    size: int
    grad_accum: int
    processes: int
    source: str
    trials: tuple[Trial, ...] = ()
    headroom: float | None = None
    device_bytes: int | None = None
    candidates: tuple[int, ...] = field(default=())

    @property
    def effective(self) -> int:
        return self.size * self.grad_accum * self.processes

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "effective": self.effective}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> MicroBatch:
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "trials": tuple(Trial(**t) for t in raw.get("trials", ())),
                      "candidates": tuple(raw.get("candidates", ()))})

    def describe(self) -> str:
        return (f"{self.size} row(s) x {self.grad_accum} accumulation x {self.processes} process(es) = "
                f"{self.effective} rows per optimizer step")


def effective_batch(train, processes: int) -> int:
    """Rows per optimizer step: the micro-batch (the integer default for auto) x SFT_GRAD_ACCUM x processes."""
    size = DEFAULT_SIZE if train.per_device_batch_size == AUTO else train.per_device_batch_size
    return size * train.grad_accum * processes


def candidates(share: int, rows_per_rank: int) -> list[int]:
    """The sizes tried, ascending: the divisors of each process's share of the effective batch, at most the rows a
    rank has and MAX_SIZE."""
    limit = min(share, max(1, rows_per_rank), MAX_SIZE)
    return [b for b in range(1, limit + 1) if share % b == 0]


def first_batch(lengths: Sequence[int], size: int, seed: int, world_size: int, rank: int, grouped: bool) -> list[int]:
    """The row indices of this rank's first batch at micro-batch `size` (the sampler's first group, this rank's
    share of it); not grouped: the longest rows."""
    if grouped:
        order = LengthGroupedSampler(lengths, batch_size=size, seed=seed, world_size=world_size).order()
    else:
        order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    return order[rank * size:(rank + 1) * size]


@contextlib.contextmanager
def untouched(model) -> Iterator[None]:
    """Run a probe on `model` and leave no trace: RNG streams restored, module modes restored, gradients dropped,
    cached memory released."""
    import numpy as np
    import torch

    cuda = torch.cuda.is_available()
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
           torch.cuda.get_rng_state_all() if cuda else None)
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for param in model.parameters():
            param.grad = None
        for module, training in modes:
            module.training = training
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def try_size(step: Callable[[dict], None], batch: dict, device) -> Trial:
    """`step(batch)` (forward and backward) once: does it fit, its peak memory (CUDA) and its seconds."""
    import torch

    cuda = getattr(device, "type", str(device)) == "cuda"
    mask = batch.get("attention_mask")
    longest = int(mask.sum(dim=-1).max()) if mask is not None else int(batch["input_ids"].shape[-1])
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.monotonic()
    outcome = "fits"
    try:
        step(batch)
    except torch.OutOfMemoryError:
        outcome = "out of memory"  # the exception (and the frames holding the try's tensors) is dropped here
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
        if outcome == "fits" and peak > (1 - HEADROOM) * torch.cuda.get_device_properties(device).total_memory:
            outcome = "over the headroom"
    seconds = time.monotonic() - started
    return Trial(int(batch["input_ids"].shape[0]), longest, int(batch["input_ids"].numel()), outcome, peak,
                 round(seconds, 3))


def search(sizes: Sequence[int], batch_of: Callable[[int], dict], step: Callable[[dict], None], device
           ) -> list[Trial]:
    """Try the sizes in ascending order until one does not fit (memory grows with the rows)."""
    trials = []
    for size in sizes:
        trial = try_size(step, batch_of(size), device)
        trials.append(trial)
        peak = f", peak {trial.peak_bytes / 2**30:.2f} GiB" if trial.peak_bytes is not None else ""
        log.info("micro-batch search: %d row(s), longest %d tokens (%d padded): %s%s, %.1f s", trial.rows,
                 trial.longest, trial.tokens, trial.outcome, peak, trial.seconds)
        if not trial.fits:
            break
    return trials


def fused_step(trainer) -> Callable[[dict], None]:
    """One micro-batch's forward and backward as the trainer's training step runs it (TRL's fused LM head: the loss
    over the supervised tokens, never the full logits), without its metrics, collectives or loss scaling."""
    model, device = trainer.model, trainer.args.device

    def step(batch: dict) -> None:
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        with trainer.compute_loss_context_manager():
            outputs = model(**inputs, use_cache=False, fused_lm_head=True)
            loss = -outputs.log_probs.sum() / outputs.label_mask.sum().clamp(min=1)
        loss.backward()

    return step


def searched(cfg: JobConfig, trainer, train_ds, collator, memory: dict[str, str]) -> MicroBatch:
    """Search on this rank's device, then agree with the other ranks on the smallest size that fits everywhere."""
    import torch

    processes = distributed.world_size()
    share = effective_batch(cfg.train, processes) // processes
    sizes = candidates(share, len(train_ds) // processes)
    grouped = cfg.train.group_by_length and LENGTH_COLUMN in train_ds.column_names
    lengths = train_ds[LENGTH_COLUMN] if LENGTH_COLUMN in train_ds.column_names else [1] * len(train_ds)

    def batch_of(size: int) -> dict:
        rows = first_batch(lengths, size, cfg.train.seed, processes, distributed.rank(), grouped)
        return collator([train_ds[i] for i in rows])

    device = trainer.args.device
    with untouched(trainer.model):
        trainer.model.train()
        trials = search(sizes, batch_of, fused_step(trainer), device)
    largest = max((t.rows for t in trials if t.fits), default=0)
    agreed = distributed.smallest(largest, device, "the micro-batch search's agreement")
    if agreed == 0:
        first = trials[0]
        why = ("fits on this rank's GPU but not on another rank's" if first.fits else "ran out of memory"
               if first.outcome == "out of memory" else f"peaked at {(first.peak_bytes or 0) / 2**30:.2f} GiB, "
               f"over the {HEADROOM:.0%} of the GPU's memory the search keeps free")
        levers = {name: value for name, value in memory.items() if name != "SFT_PER_DEVICE_BATCH_SIZE"}  # 1 row
        raise NoMicroBatchFits(first.longest, levers, why)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return MicroBatch(AUTO, agreed, share // agreed, processes, "search", tuple(trials),
                      HEADROOM if total else None, total, tuple(sizes))


def settle(cfg: JobConfig, trainer, train_ds, collator, resume_from: str | None, root: Path,
           memory: dict[str, str]) -> MicroBatch:
    """The micro-batch this run trains with, set on the trainer before train(): the setting's; with auto, the one
    recorded in the checkpoint it resumes, else the search's (recorded by rank 0 in the resume fingerprint)."""
    train = cfg.train
    if isinstance(train.per_device_batch_size, int):
        return MicroBatch(train.per_device_batch_size, train.per_device_batch_size, train.grad_accum,
                          distributed.world_size(), "setting")
    recorded = (distributed.main_process_result(resume.recorded_micro_batch, Path(resume_from))
                if resume_from else None)
    if resume_from and recorded is None:
        log.warning("%s records no micro-batch: searching again (the resume is exact only if the search picks "
                    "the size it was trained with)", Path(resume_from).name)
    if recorded is not None:
        chosen = replace(MicroBatch.from_json(recorded), source=Path(resume_from or "").name)
    else:
        chosen = searched(cfg, trainer, train_ds, collator, memory)
    trainer.use_micro_batch(chosen.size, chosen.grad_accum)
    if distributed.is_main_process():
        resume.record_micro_batch(root, recorded or chosen.to_json())
    how = ("taken from " + chosen.source if recorded is not None else
           f"the largest of {', '.join(map(str, chosen.candidates))} that fits")
    log.info("micro-batch: %s (SFT_PER_DEVICE_BATCH_SIZE=auto: %s)", chosen.describe(), how)
    return chosen
