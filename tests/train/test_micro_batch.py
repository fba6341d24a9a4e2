"""SFT_PER_DEVICE_BATCH_SIZE=auto (job/train/micro_batch.py): which sizes are tried on which rows, a search that
leaves no trace, and, on the shared runs, the choice under an injected memory ceiling, its record and its reuse on
resume. That the adapter equals the hand-set run's is asserted where the runs are compared with the reference run
(tests/test_model_gradients.py, tests/train/test_resume_matrix.py, tests/train/test_preemption.py)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from runs_reference import AUTO, STEPS

from job.cards import ModelCards
from job.config.schema import build_cfg
from job.train import micro_batch
from job.train.sampler import LengthGroupedSampler


def test_auto_keeps_the_effective_batch_of_the_integer_default_and_tries_its_divisors():
    train = build_cfg(ModelCards().qwen3_vl_8b_instruct, {"SFT_PER_DEVICE_BATCH_SIZE": "auto"}).train
    assert micro_batch.effective_batch(train, 1) == 16 and micro_batch.effective_batch(train, 4) == 64
    assert micro_batch.candidates(16, 1000) == [1, 2, 4, 8, 16]
    assert micro_batch.candidates(12, 1000) == [1, 2, 3, 4, 6, 12]
    assert micro_batch.candidates(16, 5) == [1, 2, 4]  # never more rows than a rank has
    assert micro_batch.candidates(2048, 10_000)[-1] == 512  # the integer form's bound
    hand_set = build_cfg(ModelCards().qwen3_vl_8b_instruct, {"SFT_PER_DEVICE_BATCH_SIZE": "4"}).train
    assert micro_batch.effective_batch(hand_set, 2) == 64


def test_each_rank_probes_its_share_of_the_samplers_first_group():
    lengths = [random.Random(3).randint(50, 900) for _ in range(200)]
    order = LengthGroupedSampler(lengths, batch_size=4, seed=7, world_size=2).order()
    first, second = (micro_batch.first_batch(lengths, 4, 7, 2, rank, grouped=True) for rank in (0, 1))
    assert first == order[:4] and second == order[4:8]
    assert max(lengths[i] for i in first + second) == max(lengths)  # the longest row is in the first step
    assert sorted(lengths[i] for i in micro_batch.first_batch(lengths, 3, 7, 1, 0, grouped=False)) == sorted(
        lengths)[-3:]


def test_the_search_stops_at_the_first_size_over_the_ceiling_and_leaves_no_trace():
    """A real torch.OutOfMemoryError above 300 tokens; dropout draws from the RNG in every try. Afterwards the RNG
    streams, the module modes and the gradients are as before."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    model[2].eval()  # a mixed state, as a PEFT model has

    def batch_of(rows: int) -> dict:
        return {"input_ids": torch.ones(rows, 100, dtype=torch.long), "features": torch.randn(rows, 8)}

    def step(batch: dict) -> None:
        if batch["input_ids"].numel() > 300:
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")
        model(batch["features"]).sum().backward()

    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with micro_batch.untouched(model):
        model.train()
        trials = micro_batch.search([1, 2, 3, 4, 6], batch_of, step, torch.device("cpu"))
    assert [(t.rows, t.tokens, t.outcome, t.peak_bytes) for t in trials] == [
        (1, 100, "fits", None), (2, 200, "fits", None), (3, 300, "fits", None), (4, 400, "out of memory", None)]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert all(p.grad is None for p in model.parameters())


def test_the_record_round_trips():
    trial = micro_batch.Trial(2, 116, 232, "out of memory", None, 0.01)
    chosen = micro_batch.MicroBatch("auto", 1, 2, 1, "search", (trial,), None, None, (1, 2))
    raw = json.loads(json.dumps(chosen.to_json()))
    assert raw["effective"] == 2 and micro_batch.MicroBatch.from_json(raw) == chosen


# -- the shared runs (tests/runs.py) ----------------------------------------------------------------------------------
def _searched(out) -> dict:
    return json.loads((out / "training_meta.json").read_text())["micro_batch"]


@pytest.mark.slow
def test_auto_picks_the_size_the_ceiling_allows_and_records_it(pre_eval_off_run):
    """runs_reference.AUTO: one row fits under the ceiling, two do not: 1 row x 2 accumulation, REFERENCE's batch
    (whose adapter this run must equal: tests/test_model_gradients.py)."""
    run = pre_eval_off_run
    assert run.env["TEST_TOKEN_CEILING"] == AUTO["TEST_TOKEN_CEILING"]
    record = _searched(run.out)
    trials = record.pop("trials")
    assert record == {"setting": "auto", "size": 1, "grad_accum": 2, "processes": 1, "effective": 2,
                      "source": "search", "headroom": None, "device_bytes": None, "candidates": [1, 2]}
    assert [(t["rows"], t["outcome"]) for t in trials] == [(1, "fits"), (2, "out of memory")]
    assert trials[1]["tokens"] == 2 * trials[1]["longest"] > 150 >= trials[0]["tokens"] == trials[0]["longest"]
    assert ("micro-batch: 1 row(s) x 2 accumulation x 1 process(es) = 2 rows per optimizer step "
            "(SFT_PER_DEVICE_BATCH_SIZE=auto: the largest of 1, 2 that fits)") in run.log
    for step in range(2, STEPS + 1, 2):  # every checkpoint carries the choice, for a resume
        fingerprint = json.loads((run.out / f"checkpoints/checkpoint-{step}/resume_fingerprint.json").read_text())
        assert fingerprint["micro_batch"] == {**record, "trials": trials}
        assert fingerprint["settings"]["SFT_PER_DEVICE_BATCH_SIZE"] == "auto"


@pytest.mark.slow
def test_a_resumed_auto_run_trains_with_the_recorded_micro_batch(interrupted_chain):
    """The chain's later stages run without the ceiling: a new search would pick 2 rows (and the chain would not end
    where the reference run ends); each takes the first stage's choice from the checkpoint it resumes."""
    log = interrupted_chain.log
    assert log.count("micro-batch search: ") == 2  # the first stage's two tries, and no other search
    resumed = log.count("(SFT_PER_DEVICE_BATCH_SIZE=auto: taken from checkpoint-")
    assert resumed == log.count("resuming from ") >= 3
    record = _searched(interrupted_chain.out)
    assert (record["size"], record["grad_accum"]) == (1, 2) and record["source"].startswith("checkpoint-")
    assert [(t["rows"], t["outcome"]) for t in record["trials"]] == [(1, "fits"), (2, "out of memory")]
