"""Two nodes on the CPU, as k8s/multinode/pytorchjob.yaml runs them: two `qwen3-sft run` launchers on loopback
(PET_NNODES=2, PET_NODE_RANK, MASTER_ADDR/MASTER_PORT), one gloo worker each, each node with its own empty output dir,
one moto store (#32). Every decision is global rank 0's, broadcast; a node restarted on an empty disk gets the
checkpoint from the store; nothing hangs.

The runs are shared (tests/runs.py): two_node_run (uninterrupted), two_node_chain (killed while checkpoint-4
uploads, then SIGTERM to node 1 only, then to the end: a new pair of nodes each time) and two_node_user_error.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from runs_distributed import TWO_NODE_STEPS, TWO_NODES
from runs_processes import DEADLINE_S, free_port, zygote_env
from s3_proxy import s3_client
from safetensors.torch import load
from test_ddp import error_lines

from job.errors import ExitCode

pytestmark = pytest.mark.slow


def stored(endpoint: str, bucket: str, key: str) -> bytes | None:
    try:
        return s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3_client(endpoint).exceptions.NoSuchKey:
        return None


def stored_keys(endpoint: str, bucket: str, prefix: str) -> set[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}


def final_artifacts(keys: set[str]) -> set[str]:
    """The keys of what docs/outputs.md says the final upload holds (adapter/, eval/, metrics.json, training_meta.json,
    the preflight report, report/) and its COMPLETED marker."""
    names = {"adapter", "eval", "metrics.json", "training_meta.json", "preflight_report.json", "report", "COMPLETED"}
    return {k for k in keys if k.split("/")[0] in names}


def run_prefix() -> str:
    return f"runs/{TWO_NODES['SFT_RUN_ID']}/"


def test_two_nodes_killed_and_restarted_on_empty_disks_end_like_an_uninterrupted_run(
        two_node_run, two_node_chain, s3_endpoint):
    assert two_node_run.codes == [0, 0], two_node_run.log(0)[-3000:]
    killed, preempted, final = (two_node_chain[k] for k in ("killed", "sigterm_one", "final"))
    assert killed.codes == [-9, -9]
    assert final.codes == [0, 0], final.log(0)[-3000:] + final.log(1)[-3000:]
    # The stage after the kill resumed from checkpoint-2 (an eval step) on two empty disks: only rank 0 restored
    # the best-so-far, and both ranks agreed that step 2 needs no eval again (a mismatch was a gloo abort or a hang).
    resumed = preempted.log(0)
    assert "resume: the best step so far is 2 (from checkpoint-2)" in resumed, resumed[-3000:]
    assert "restored checkpoint-2 from" in preempted.log(1)  # node 1 has it from the store, not from node 0
    assert "eval at step 2 on" not in resumed and "collective mismatch" not in preempted.log(1)

    ref_prefix, prefix = run_prefix(), run_prefix()
    ref_final = final_artifacts(stored_keys(s3_endpoint, two_node_run.bucket, ref_prefix + "final/"))
    chain_final = final_artifacts(stored_keys(s3_endpoint, final.bucket, prefix + "final/"))
    for key in ("COMPLETED", "adapter/adapter_model.safetensors", "metrics.json", "training_meta.json"):
        assert key in chain_final, sorted(chain_final)
    assert chain_final == ref_final
    adapter = load(stored(s3_endpoint, final.bucket, prefix + "final/adapter/adapter_model.safetensors"))
    ref_adapter = load(stored(s3_endpoint, two_node_run.bucket, ref_prefix + "final/adapter/adapter_model.safetensors"))
    assert set(adapter) == set(ref_adapter)
    assert max((adapter[k] - ref_adapter[k]).abs().max().item() for k in adapter) <= 1e-6
    metrics = json.loads(stored(s3_endpoint, final.bucket, prefix + "final/metrics.json"))
    ref_metrics = json.loads(stored(s3_endpoint, two_node_run.bucket, ref_prefix + "final/metrics.json"))
    assert metrics["train"]["global_step"] == ref_metrics["train"]["global_step"] == TWO_NODE_STEPS
    assert [e["step"] for e in metrics["best"]["history"]] == [2, 4, 6]  # every eval step scored once
    assert metrics["best"]["step"] == ref_metrics["best"]["step"] and metrics["post"] == ref_metrics["post"]
    # rank 0 alone writes the outputs: node 1's output dir holds no adapter, in either run
    assert not (final.out(1) / "adapter").exists() and not (two_node_run.out(1) / "adapter").exists()


def test_sigterm_to_one_node_stops_both_at_one_checkpoint_and_both_exit_143(two_node_chain, s3_endpoint):
    stage = two_node_chain["sigterm_one"]
    node0, node1 = stage.log(0), stage.log(1)
    assert stage.codes == [ExitCode.PREEMPTED, ExitCode.PREEMPTED], node0[-3000:] + node1[-3000:]
    stopped = {int(s) for s in re.findall(r"preempted at step (\d+): checkpoint-\d+ is COMPLETED", node0)}
    assert len(stopped) == 1, node0[-3000:]
    step = stopped.pop()
    assert 2 < step <= TWO_NODE_STEPS
    assert stored(s3_endpoint, stage.bucket, f"{run_prefix()}checkpoint-{step}/COMPLETED") is not None
    # node 0 was not signalled: it was told by node 1's rank, and says so once like node 1
    message = (f"qwen3-sft: error: preempted by SIGTERM at step {step}; rerun with the same SFT_RUN_ID to resume "
               "from the newest COMPLETED checkpoint")
    assert error_lines(node0) == [message] and error_lines(node1) == [message], (node0[-2000:], node1[-2000:])
    assert "Traceback" not in node0 and "Traceback" not in node1


def test_a_user_error_on_node_1_is_exit_2_on_both_nodes_named_once(two_node_user_error):
    run = two_node_user_error
    node0, node1 = run.log(0), run.log(1)
    assert run.codes == [ExitCode.USER, ExitCode.USER], node0[-3000:] + node1[-3000:]
    problem = f"SFT_OUTPUT_DIR='{run.tmp / 'node1-output-is-a-file'}': {run.tmp / 'node1-output-is-a-file'} is a " \
              "file, not a directory"
    # node 1 prints its ConfigError as a single process does: the heading, then each problem on its own line
    assert error_lines(node1) == ["qwen3-sft: error: invalid configuration:"], node1[-3000:]
    assert node1.count(f"  - {problem}") == 1
    # node 0 points at node 1's rank with the message on one line, instead of a failure of its own
    assert error_lines(node0) == [f"qwen3-sft: error: rank 1 failed: invalid configuration: - {problem} (full "
                                  "message in rank 1's log)"], node0[-3000:]
    for log in (node0, node1):
        assert "loading model weights" not in log and "Traceback" not in log and "preflight" not in log


# -- a collective that never completes -----------------------------------------------------------------------------
STUCK = """
import os, sys, time
from job import errors
from job.train import distributed
# Shortened for the test; everything else is the job's own code on a real gloo group of two processes.
distributed.STEP_TIMEOUT_S, distributed.WAIT_TIMEOUT_S = 2, 4
distributed.init_process_group()
done = sys.argv[1]
try:
    if distributed.rank() == 0:
        distributed.any_rank(True, "cpu")  # rank 1 never joins this all-reduce...
    else:
        distributed.broadcast_from_main(None)  # ...and rank 0 never sends this broadcast
except BaseException as exc:
    print(errors.exit_code_for(exc), exc, sep="\\n", flush=True)
open(done + str(distributed.rank()), "w").close()
while not os.path.exists(done + "1"):  # rank 0 stays until rank 1 has timed out too: no peer is lost
    time.sleep(0.1)  # failsafe poll interval
"""


def two_ranks(zygote, tmp_path, code: str, *args: str) -> list[list[str]]:
    """`code` in two forked processes of one gloo group on loopback (ranks 0 and 1 of one node); their stdout lines."""
    env = {**zygote_env(dict(os.environ)), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2"}
    procs = [zygote.fork(["-c", code, *args], {**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                         tmp_path / f"out{r}.txt", tmp_path / f"err{r}.txt") for r in (0, 1)]
    assert [p.wait(timeout=DEADLINE_S) for p in procs] == [0, 0], [(tmp_path / f"err{r}.txt").read_text()[-2000:]
                                                                   for r in (0, 1)]
    return [(tmp_path / f"out{r}.txt").read_text().splitlines() for r in (0, 1)]


def test_a_collective_that_times_out_is_exit_3_naming_the_collective_and_the_ranks(zygote, tmp_path):
    out = two_ranks(zygote, tmp_path, STUCK, str(tmp_path / "done"))
    assert out[0][0] == out[1][0] == str(int(ExitCode.TRANSIENT)), out
    assert re.fullmatch(r"rank 0: the vote of every rank timed out \(.*Timed out waiting 2000ms.*\), waiting for all "
                        r"2 ranks", out[0][1]), out[0]
    assert re.fullmatch(r"rank 1: the broadcast of rank 0's result timed out \(.*Timed out waiting 4000ms.*\), "
                        r"waiting for rank 0", out[1][1]), out[1]


LOCAL_FIRST = """
from job import errors
from job.errors import DataError
from job.train import distributed
distributed.init_process_group()
ran = []
try:
    with distributed.local_main_first():
        ran.append(distributed.rank())
        if distributed.rank() == 0:
            raise DataError("train.jsonl:3: field 'image' is missing")
except BaseException as exc:
    print(errors.exit_code_for(exc), ran, exc, sep="\\n", flush=True)
"""


def test_a_failure_of_local_rank_0_first_is_its_exit_code_on_every_rank_which_skips_the_block(zygote, tmp_path):
    out = two_ranks(zygote, tmp_path, LOCAL_FIRST)
    assert out[0] == ["2", "[0]", "train.jsonl:3: field 'image' is missing"]
    # rank 1 never ran the block (the download its local rank 0 failed) and exits with rank 0's code
    assert out[1] == ["2", "[]", "rank 0 failed: train.jsonl:3: field 'image' is missing (full message in rank 0's "
                      "log)"]
