"""The shared DDP and two-node runs (tests/runs.py): `qwen3-sft run` as a launcher of 2 gloo workers (ddp_run,
ddp_standalone_eval, ddp_preempted_run, ddp_bad_row_run), and two launchers on loopback as a PyTorchJob starts them
(two_node_run, two_node_chain, two_node_user_error)."""

from __future__ import annotations

import os
import signal
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from helpers import job_env
from runs_processes import DEADLINE_S, Forked, Run, free_port, log_has, wait_until
from runs_reference import GATE, NO_WANDB
from runs_scheduler import Ctx
from s3_proxy import AWS_ENV, FaultProxy, s3_client

# `qwen3-sft run` launching 2 workers (gloo): the launcher is forked, its workers are fresh interpreters
DDP = dict(SFT_NPROC_PER_NODE="2", SFT_MAX_STEPS="4", SFT_SAVE_STEPS="2", SFT_EVAL_SUBSET="4")


def ddp_run(ctx: Ctx) -> Run:
    # The gate refuses (the tiny model scores 0): the same launch shows the artifacts of a DDP run and the exit 4.
    # SFT_EVAL_STEPS: rank 0 scores during training while rank 1 waits in the same collective.
    return ctx.job(ctx.tmp, count=2, **DDP, **GATE, SFT_EVAL_STEPS="2")


def ddp_standalone_eval(ctx: Ctx) -> Run:
    ddp = ctx.result("ddp_run")
    return ctx.job(ctx.tmp, ["-m", "job", "eval"], **{k: v for k, v in DDP.items() if k != "SFT_NPROC_PER_NODE"},
                   SFT_EVAL_ADAPTER=str(ddp.out / "adapter"))


def ddp_bad_row_run(ctx: Ctx) -> Run:
    # SFT_BAD_ROWS=fail (the default): rank 0's preflight names the row; no weights load on either rank.
    return ctx.job(ctx.tmp, count=2, **DDP, **NO_WANDB, SFT_DATASET_URI=str(ctx.result("data_with_one_bad_row")))


@dataclass
class DDPPreempted:
    tmp: Path
    returncode: int
    signalled_s: float  # from the SIGTERM to the launcher's exit (informative: the tests assert no timings)

    @property
    def log(self) -> str:
        return (self.tmp / "log.txt").read_text(errors="replace")


def ddp_preempted_run(ctx: Ctx) -> DDPPreempted:
    """The launcher with 40 steps and 2 dataloader workers per rank, SIGTERMed (as Kubernetes does: the container's
    main process only; torch elastic's agent forwards it to each worker's process group, dataloader workers
    included) once checkpoint-2 is COMPLETED."""
    done = ctx.tmp / "out/checkpoints/checkpoint-2/COMPLETED"
    with ctx.slots.hold(ctx.priority, 2):
        env = job_env(ctx.tmp, ctx.tiny_assets, ctx.environ, **{
            **DDP, **NO_WANDB, "SFT_MAX_STEPS": "40", "SFT_EVAL_PRE": "false", "SFT_DATALOADER_NUM_WORKERS": "2"})
        proc = ctx.start(ctx.tmp, env)
        wait_until(done.exists, proc, "checkpoint-2/COMPLETED")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=120)
    return DDPPreempted(ctx.tmp, returncode, time.monotonic() - sent)


# Two nodes on loopback, as k8s/multinode/pytorchjob.yaml runs them (#32).
TWO_NODE_STEPS = 6
TWO_NODES = dict(SFT_MAX_STEPS=str(TWO_NODE_STEPS), SFT_SAVE_STEPS="2", SFT_EVAL_STEPS="2",
                 SFT_EVAL_DURING_TRAIN_ROWS="4", SFT_EVAL_PRE="false", SFT_SAVE_TOTAL_LIMIT="10",
                 SFT_PREEMPT_GRACE_S="60", SFT_RUN_ID="two-nodes", OMP_NUM_THREADS="1", **NO_WANDB)


@dataclass
class Nodes:
    """One launch of two nodes: node k's folder is tmp/node<k> (log.txt, out/); codes[k] its launcher's exit code."""

    tmp: Path
    codes: list[int]
    bucket: str | None = None

    def out(self, node: int) -> Path:
        return self.tmp / f"node{node}" / "out"

    def log(self, node: int) -> str:
        return (self.tmp / f"node{node}" / "log.txt").read_text(errors="replace")


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (/proc), parents first: a node's launcher, its workers (their own
    sessions, which the launcher's agent starts) and their dataloader workers."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while listed
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop(0))
        todo.extend(children.get(tree[-1], []))
    return tree


def signal_node(proc: Forked, sig: int) -> None:
    """Signal every process of a node, as the kubelet's SIGTERM (through an init that signals the group) or the
    node's end (SIGKILL) reaches them all."""
    for pid in process_tree(proc.pid):
        if pid == proc.pid:
            proc.send_signal(sig)
            continue
        with suppress(ProcessLookupError):  # exited in the meantime
            os.kill(pid, sig)


def start_nodes(ctx: Ctx, tmp: Path, endpoint: str | None, bucket: str | None,
                per_node: tuple[dict[str, str], dict[str, str]] = ({}, {})) -> list[Forked]:
    """Two launchers, each with its own empty output dir, meeting at 127.0.0.1 (a fresh port per launch)."""
    port, procs = free_port(), []
    for node in (0, 1):
        folder = tmp / f"node{node}"
        store = dict(SFT_CHECKPOINT_URI=f"s3://{bucket}/runs", AWS_ENDPOINT_URL=endpoint, **AWS_ENV) if bucket else {}
        env = job_env(folder, ctx.tiny_assets, ctx.environ, **TWO_NODES, **store, PET_NNODES="2",
                      PET_NODE_RANK=str(node), PET_NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      WORLD_SIZE="2", RANK=str(node), **per_node[node])
        procs.append(ctx.zygote.fork(["-m", "job", "run"], env, *(_log_file(folder),) * 2))
    return procs


def _log_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").touch()
    return folder / "log.txt"


def two_node_run(ctx: Ctx) -> Nodes:
    """TWO_NODES uninterrupted: the reference of two_node_chain."""
    bucket = "two-node-run"
    s3_client(ctx.s3).create_bucket(Bucket=bucket)
    with ctx.slots.hold(ctx.priority, 2):
        procs = start_nodes(ctx, ctx.tmp, ctx.s3, bucket)
        return Nodes(ctx.tmp, [proc.wait(timeout=DEADLINE_S) for proc in procs], bucket)


def two_node_chain(ctx: Ctx) -> dict[str, Nodes]:
    """TWO_NODES three times on the same store, each time on two new nodes with empty output dirs:
    - killed: both nodes SIGKILLed (every process) while the upload of checkpoint-4 is held by a proxy, so the store
      has checkpoint-2 COMPLETED: the resume step is an eval step (SFT_EVAL_STEPS = SFT_SAVE_STEPS);
    - sigterm_one: resumed from checkpoint-2; SIGTERM to node 1's processes only, in the step after the first step
      line of node 0 (rank 0's log);
    - final: resumed to the end."""
    bucket = "two-node-chain"
    s3_client(ctx.s3).create_bucket(Bucket=bucket)
    stages: dict[str, Nodes] = {}
    proxy = FaultProxy(int(ctx.s3.rsplit(":", 1)[1]))
    try:
        proxy.hold("/checkpoint-4/")
        with ctx.slots.hold(ctx.priority, 2):
            procs = start_nodes(ctx, ctx.tmp / "killed", proxy.url, bucket)
            wait_until(proxy.held.is_set, procs[0], "the upload of checkpoint-4")
            for proc in procs:
                signal_node(proc, signal.SIGKILL)
            stages["killed"] = Nodes(ctx.tmp / "killed", [proc.wait(timeout=60) for proc in procs], bucket)
        proxy.release()
    finally:
        proxy.close()
    with ctx.slots.hold(ctx.priority, 2):
        tmp = ctx.tmp / "sigterm_one"
        procs = start_nodes(ctx, tmp, ctx.s3, bucket)
        wait_until(log_has(tmp / "node0/log.txt", rf"step \d+/{TWO_NODE_STEPS} "), procs[0], "node 0's first step")
        signal_node(procs[1], signal.SIGTERM)
        stages["sigterm_one"] = Nodes(tmp, [proc.wait(timeout=120) for proc in procs], bucket)
    with ctx.slots.hold(ctx.priority, 2):
        procs = start_nodes(ctx, ctx.tmp / "final", ctx.s3, bucket)
        stages["final"] = Nodes(ctx.tmp / "final", [proc.wait(timeout=DEADLINE_S) for proc in procs], bucket)
    return stages


def two_node_user_error(ctx: Ctx) -> Nodes:
    """Node 1's SFT_OUTPUT_DIR is a file: a user error only node 1 finds, before any download or weights."""
    not_a_dir = ctx.tmp / "node1-output-is-a-file"
    not_a_dir.write_text("")
    with ctx.slots.hold(ctx.priority, 2):
        procs = start_nodes(ctx, ctx.tmp, None, None, ({}, {"SFT_OUTPUT_DIR": str(not_a_dir)}))
        return Nodes(ctx.tmp, [proc.wait(timeout=DEADLINE_S) for proc in procs])
