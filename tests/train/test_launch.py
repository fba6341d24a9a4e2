"""The launcher's pure parts (job/train/launch.py): whether to launch, which rank's code wins, how the code leaves
the process, and the error record a worker leaves for it. The launches themselves are in tests/train/test_ddp.py."""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import pytest

from job import cli, errors
from job.errors import ConfigError
from job.train import distributed, launch
from job.train.callbacks import add_missing_files
from job.train.launch import LaunchPlan, RankFailure

PYTORCHJOB_POD = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1", "MASTER_ADDR": "job-master-0",
                  "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1"}  # what the operator sets on a pod


# -- whether to launch ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("env", "setting", "gpus", "expected"), [
    ({}, None, 0, None),  # CPU, nothing asked: one process
    ({}, None, 1, None),  # one GPU: one process, no launcher in between
    ({}, None, 8, LaunchPlan(8)),  # every visible GPU
    ({}, 2, 0, LaunchPlan(2)),  # SFT_NPROC_PER_NODE on the CPU (gloo)
    ({}, 1, 8, None),  # SFT_NPROC_PER_NODE=1 forces one process
    ({}, 4, 8, LaunchPlan(4)),
    # a worker of torchrun or of the launcher never launches again, whatever the setting or the GPUs
    ({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2"}, None, 8, None),
    ({"TORCHELASTIC_RUN_ID": "x"}, 2, 8, None),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h"}, 2, 8, None),  # launched by hand, no torchrun
    # a PyTorchJob pod: WORLD_SIZE/RANK are the operator's node count and rank, not a worker's
    (PYTORCHJOB_POD, None, 8, LaunchPlan(8, 2, 1, "job-master-0:23456")),
    ({**PYTORCHJOB_POD, "PET_NPROC_PER_NODE": "1"}, None, 1, LaunchPlan(1, 2, 1, "job-master-0:23456")),
    ({**PYTORCHJOB_POD, "LOCAL_RANK": "3"}, None, 8, None),  # the launcher's worker inside that pod
])
def test_plan(env, setting, gpus, expected):
    assert launch.plan(env, setting, gpus) == expected


# -- which code wins --------------------------------------------------------------------------------------------------
def failure(rank: int, code: int, time: float, message: str = "") -> RankFailure:
    return RankFailure(rank, code, time, message)


@pytest.mark.parametrize(("failures", "signalled", "expected"), [
    ([], False, 0),
    ([], True, 143),  # signalled, and no worker left a record: preempted
    # rank 1 failed first (3); rank 0 was terminated by the agent afterwards and exited 143
    ([failure(0, 143, 10.5), failure(1, 3, 10.2)], False, 3),
    # rank 0's preflight failed (2), rank 1 exited 2 with it (PeerFailed) a little later
    ([failure(0, 2, 5.0), failure(1, 2, 5.1)], False, 2),
    ([failure(0, 4, 7.0), failure(1, 1, 7.3)], False, 4),  # a bystander's broken collective does not win
    # rank 1 relayed rank 0's preflight failure before rank 0 had written its own record
    ([failure(1, 2, 4.9, "rank 0 failed: preflight failed"), failure(0, 2, 5.0, "preflight failed")], False, 2),
    # rank 0 relayed node 1's user error (every_rank_ok) before rank 1 had written its own record
    ([failure(0, 2, 4.9, "rank 1 failed: invalid configuration"), failure(1, 2, 5.0, "invalid")], False, 2),
    # a worker code that is not in the contract (a library's sys.exit(5)) is reported as it is
    ([failure(0, 5, 2.0), failure(1, 143, 2.5)], False, 5),
    # no records (whole-second times): a signal death on the same second is taken for a terminated bystander
    ([failure(0, 143, 9.0), failure(1, 1, 9.0)], False, 1),
    ([failure(0, 137, 8.0), failure(1, 143, 9.0)], False, 137),  # OOM-killed first
    ([failure(0, 143, 3.0), failure(1, 143, 3.1)], True, 143),
])
def test_launcher_exit_code_is_the_first_failure(failures, signalled, expected):
    assert launch.launcher_exit_code(failures, signalled)[0] == expected


def test_a_relayed_failure_never_hides_rank_0s_own_message():
    relay, own = failure(1, 2, 4.9, "rank 0 failed: bad row"), failure(0, 2, 5.0, "bad row")
    assert launch.first_failure([relay, own]) == own
    relay, own = failure(0, 2, 4.9, "rank 1 failed: bad dir"), failure(1, 2, 5.0, "bad dir")
    assert launch.first_failure([relay, own]) == own


# -- what a failing rank tells the others --------------------------------------------------------------------------
def test_a_failure_with_an_empty_message_is_relayed_by_its_class_name():
    code, line = distributed.failure_record(AssertionError())  # a bare `assert`
    assert (code, line) == (1, "AssertionError")
    relay = errors.PeerFailed(0, code, line)
    assert relay.exit_code == 1  # docs/operations.md, Exit codes: a bug
    assert str(relay) == "rank 0 failed: AssertionError (full message in rank 0's log)"


def test_a_multi_line_message_is_relayed_on_one_line_with_its_code():
    code, line = distributed.failure_record(ConfigError(["SFT_A: bad", "SFT_B: worse"]))
    assert (code, line) == (2, "invalid configuration: - SFT_A: bad - SFT_B: worse")
    assert errors.PeerFailed(1, code, line).exit_code == 2


def test_a_relayed_code_the_contract_does_not_know_is_an_internal_error():
    assert errors.PeerFailed(1, 77, "sys.exit(77) in a library").exit_code == 1


def test_failures_from_child_failed_error():
    record = {launch.RECORD_KEY: {"exit_code": 2, "time": 100.25, "message": "preflight failed", "detail": ""}}
    failures = launch.failures_from({
        0: SimpleNamespace(exitcode=2, timestamp=100, error_file_data=record),
        1: SimpleNamespace(exitcode=-signal.SIGKILL, timestamp=101, error_file_data={}),
    })
    assert failures == [RankFailure(0, 2, 100.25, "preflight failed"), RankFailure(1, 137, 101.0)]
    code, first = launch.launcher_exit_code(failures, False)
    assert (code, first) == (2, failures[0])
    plan = LaunchPlan(2)
    assert launch.describe(failures[0], plan) == ("preflight failed", "")
    assert launch.describe(failures[1], plan)[0] == "rank 1 of 2 was killed by SIGKILL (exit 137); out of memory?"


def test_a_worker_record_is_what_torch_elastic_and_the_launcher_read(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / "attempt_0" / "1" / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    launch.write_error_record(3, "S3: throttled (after retries)")
    seen = ProcessFailure(local_rank=1, pid=1, exitcode=3, error_file=str(error_file))
    # torch's own format (what `@record` writes): torchrun's failure summary shows the message too
    assert seen.message["message"] == "S3: throttled (after retries)" and seen.timestamp > 0
    [from_agent] = launch.failures_from({1: seen})
    [from_dir] = launch.failures_in(tmp_path)  # after a signal, read from the log directory
    assert from_agent.code == from_dir.code == 3 and from_dir.rank == 1
    assert from_agent.time == from_dir.time and from_agent.message == from_dir.message


# -- how the code leaves the process ---------------------------------------------------------------------------------
# docs/operations.md's table (Exit codes): the job's code -> the PyTorchJob exit code. A PyTorchJob with restartPolicy
# ExitCode restarts on 128-255 and fails on 1-127, so exactly the retryable codes under 128 (1, 3) move up.
@pytest.mark.parametrize(("code", "pytorchjob_code"), [(0, 0), (1, 129), (2, 2), (3, 131), (4, 4), (137, 137),
                                                       (143, 143)])
def test_kubeflow_style_moves_exactly_the_retryable_codes_above_127(code, pytorchjob_code):
    assert errors.reported_code(code, "standard") == code
    assert errors.reported_code(code, "kubeflow") == pytorchjob_code


@pytest.mark.parametrize(("code", "kubeflow", "described"), [
    (5, 133, "rank 1 of 2 exited 5 without a message; its output is above"),
    (42, 170, "rank 1 of 2 exited 42 without a message; its output is above"),
    (127, 255, "rank 1 of 2 exited 127 without a message; its output is above"),
    (134, 134, "rank 1 of 2 was killed by SIGABRT (exit 134)"),
    (200, 200, "rank 1 of 2 exited 200 without a message; its output is above"),
])
def test_any_worker_code_is_reported_without_raising(code, kubeflow, described):
    # Codes outside the contract: below 128 they come from no rank of the job (a library's sys.exit), taken for an
    # internal error (retryable: 128 + code under `kubeflow`); 128 and above are signal deaths, retried as they are.
    assert errors.reported_code(code, "standard") == code
    assert errors.reported_code(code, "kubeflow") == kubeflow
    assert launch.describe(failure(1, code, 1.0), LaunchPlan(2)) == (described, "")


def test_worker_grace_fits_the_launcher_and_the_agent():
    assert launch.worker_grace_s(25, 25) == 23  # the launcher keeps 2 s to reap the workers and exit
    assert launch.worker_grace_s(60, 30) == 28  # an old torch's agent SIGKILLs at 30 s
    assert 0 < launch.worker_grace_s(0.2, 1) < 0.2


# -- the CLI in a worker ---------------------------------------------------------------------------------------------
# cli.main installs a root log handler on capsys's stderr: restored after each test (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("root_handlers_restored")


def test_a_launched_worker_records_its_error_instead_of_printing_it(tmp_path, monkeypatch, capsys):
    error_file = tmp_path / "error.json"
    for name in [n for n in list(__import__("os").environ) if n.startswith("SFT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SFT_LORA_RANK", "8")  # a mistyped setting: exit 2
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(launch.LAUNCHED_ENV, "1")
    assert cli.main(["run"]) == 2  # user error (docs/operations.md, Exit codes)
    assert "qwen3-sft: error" not in capsys.readouterr().err  # the launcher prints it, once
    record = json.loads(error_file.read_text())[launch.RECORD_KEY]
    assert record["exit_code"] == 2 and "did you mean SFT_LORA_R?" in record["message"]
    # under plain torchrun (no launcher of ours) the rank prints it as before, and records it for torchrun's summary
    monkeypatch.delenv(launch.LAUNCHED_ENV)
    assert cli.main(["run"]) == 2  # user error (docs/operations.md, Exit codes)
    assert "qwen3-sft: error: invalid configuration" in capsys.readouterr().err


def test_the_kubeflow_style_applies_to_the_process_kubernetes_watches_only(monkeypatch):
    for name in [n for n in list(__import__("os").environ) if n.startswith("SFT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SFT_EXIT_CODES", "kubeflow")
    monkeypatch.setattr(cli, "_cmd_config", lambda _args, _cfg: (_ for _ in ()).throw(RuntimeError("boom")))
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["config"].set_defaults(fn=cli._cmd_config)  # type: ignore
    assert cli.main(["config"]) == 129  # an internal error, retryable under restartPolicy ExitCode
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.main(["config"]) == 1  # a worker tells its launcher the real code


def test_other_nodes_rank_states_are_added_to_rank_0s_checkpoint(tmp_path):
    (tmp_path / "rng_state_0.pth").write_bytes(b"zero")
    added = add_missing_files(tmp_path, {"rng_state_0.pth": b"other", "rng_state_9.pth": b"nine"})
    assert added == ["rng_state_9.pth"]
    assert (tmp_path / "rng_state_0.pth").read_bytes() == b"zero"  # this node's own file is never overwritten
    assert (tmp_path / "rng_state_9.pth").read_bytes() == b"nine"
