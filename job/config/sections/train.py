"""The run and training section, and Weights & Biases.
How to add a setting: job/config/sections/__init__.py.
"""

from __future__ import annotations

from typing import Any, Literal

from job.cards import ModelSpec
from job.config.sections.base import Section
from job.config.settings import effective_save_steps, setting

_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a run id, a launch id


class TrainConfig(Section):
    output_dir: str = setting(
        "outputs", env="output_dir", min_length=1, examples=["/workspace/outputs"],
        doc="Everything the job writes (see [Outputs](outputs.md#the-output-directory)); checkpoints here are resumed "
            "from.")
    run_id: str | None = setting(
        None, env="run_id", pattern=_ID, examples=["sarcasm-2026-11-25"],
        doc="Unset: the run id of the newest checkpoint in `SFT_OUTPUT_DIR`, else `qwen3-sft-<12 hex>` derived from "
            "the data and the training settings. W&B run id and name, trainer run name, model card title, Hub commit "
            "message and the run's prefix under `SFT_CHECKPOINT_URI`. Unset, the id is a digest of what the resume "
            "fingerprint compares (the data's content fingerprint from preflight and the settings that shape "
            "training; not the output paths, logging or eval settings), printed as `run id: ...` after preflight: a "
            "restarted pod with the same data and settings gets the same id, so it continues the W&B run and finds "
            "its checkpoints under `SFT_CHECKPOINT_URI`. To start a fresh run on the same data and settings, set a "
            "new `SFT_RUN_ID` (a new W&B run and checkpoint prefix), or set `SFT_RESUME=never` to train again under "
            "the same id (the old checkpoints are moved aside).")
    seed: int = setting(
        42, env="seed", ge=0, examples=["42"],
        doc="`transformers.set_seed`, the data order seed and the subset selection.")
    max_steps: int = setting(
        -1, env="max_steps", ge=-1, examples=["500", "-1 (train SFT_NUM_EPOCHS epochs)"],
        doc="Optimizer steps; `-1` trains `SFT_NUM_EPOCHS` epochs.")
    num_epochs: float = setting(
        1.0, env="num_epochs", gt=0, le=1000, examples=["1", "2.5"], doc="Epochs, used when `SFT_MAX_STEPS=-1`.")
    # unset, it follows a short run (_derived below: effective_save_steps)
    save_steps: int = setting(
        50, env="save_steps", ge=1, examples=["50"],
        doc="Write a checkpoint every N steps. When not set, it is `min(50, SFT_MAX_STEPS)` for a run with "
            "`SFT_MAX_STEPS > 0`.")
    save_total_limit: int = setting(
        3, env="save_total_limit", ge=1, examples=["3"], doc="Checkpoints kept; the Trainer deletes older ones.")
    learning_rate: float = setting(
        env="learning_rate", card="learning_rate", gt=0, le=1, examples=["2e-4"],
        doc="Peak learning rate (AdamW, `adamw_torch`).")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = setting(
        "cosine", env="lr_scheduler_type", examples=["cosine"], doc="Learning-rate schedule.")
    warmup_ratio: float = setting(
        0.03, env="warmup_ratio", ge=0, lt=1, examples=["0.03"], doc="Warmup as a fraction of the total steps.")
    weight_decay: float = setting(0.0, env="weight_decay", ge=0, lt=1, examples=["0.0"], doc="AdamW weight decay.")
    max_grad_norm: float = setting(1.0, env="max_grad_norm", gt=0, examples=["1.0"], doc="Gradient clipping norm.")
    per_device_batch_size: int = setting(
        2, env="per_device_batch_size", ge=1, le=512, examples=["2"], doc="Rows per device per micro-batch.")
    grad_accum: int = setting(
        8, env="grad_accum", ge=1, le=4096, examples=["8"],
        doc="Gradient accumulation steps (effective batch = batch size x accumulation x processes).")
    max_length: int = setting(
        env="max_length", card="max_length", ge=64, le=262144, examples=["2048"],
        doc="Maximum tokens per row, visual tokens included. A longer row is an error naming it; rows are never "
            "truncated.")
    logging_steps: int = setting(
        10, env="logging_steps", ge=1, examples=["10"],
        doc="Log a line (loss, grad norm, learning rate, token accuracy) every N steps.")
    dataloader_num_workers: int = setting(
        2, env="dataloader_num_workers", ge=0, le=64, examples=["2"],
        doc="Training dataloader worker processes. They decode and resize images while the GPU trains; they stay "
            "alive across epochs, and memory is pinned on CUDA.")
    # batches of rows with similar token counts (lengths from preflight): far less padding than random batches
    group_by_length: bool = setting(
        True, env="group_by_length", examples=["true"],
        doc="Batches of rows with similar token counts, taken from preflight's lengths (visual tokens included). The "
            "order is random across groups and depends only on `SFT_SEED` and the epoch, so resume and DDP see the "
            "same order. The longest batch comes first, so an OOM shows at step 1. Padding drops from about 30-40% to "
            "under 5% (`benchmarks/padding.py`).")
    # seconds between SIGTERM and the forced exit (Kubernetes' grace period minus a margin)
    preempt_grace_s: float = setting(
        25.0, env="preempt_grace_s", gt=0, le=3600, examples=["25"],
        doc="Time budget after SIGTERM/SIGINT to finish the step, save, upload and exit 143. Keep it below the pod's "
            "`terminationGracePeriodSeconds`. See [Preemption and resume](operations.md#preemption-and-resume).")
    # processes per node for `run` (job/train/launch.py): unset = one per visible CUDA device; 1 = no launcher
    nproc_per_node: int | None = setting(
        None, env="nproc_per_node", ge=1, le=1024, examples=["8", "2 (on the CPU: gloo)", "1"],
        doc="Unset: one process per visible CUDA device. Worker processes `run` starts on this node through torch's "
            "elastic launcher (see [Multi-GPU](operations.md#multi-gpu)). `1` runs the job in the one process, "
            "whatever the GPUs; `N` on the CPU runs N gloo workers (the tests use 2). Ignored by a process that "
            "torchrun (or the launcher) started.")
    # how the exit code leaves the process: `kubeflow` moves retryable 1 and 3 to 129 and 131 (PyTorchJob ExitCode)
    exit_codes: Literal["standard", "kubeflow"] = setting(
        "standard", env="exit_codes", examples=["standard", "kubeflow"],
        doc="How the exit code leaves the process. `kubeflow` (set by `k8s/multinode/pytorchjob.yaml`): the retryable "
            "codes below 128 become 128 + code, 1 -> 129 and 3 -> 131, because a PyTorchJob with `restartPolicy: "
            "ExitCode` retries only 128-255 (see [Exit codes](operations.md#exit-codes)). Workers always hand their "
            "launcher the real code.")
    # what to do with COMPLETED checkpoints in SFT_OUTPUT_DIR / SFT_CHECKPOINT_URI (job/train/resume.py)
    resume: Literal["auto", "never", "require"] = setting(
        "auto", env="resume", examples=["auto", "never", "require"],
        doc="`auto`: continue the newest COMPLETED checkpoint (local, else from `SFT_CHECKPOINT_URI`) if there is "
            "one, refusing (exit 2) one trained with other settings, data or run id; a finished run is not trained "
            "again. `never`: start fresh; every output of the previous run is moved aside "
            "(`SFT_OUTPUT_DIR/replaced-<time>/`, `{run_id}.replaced-<time>/` in the store), not deleted; a retried "
            "pod of the same launch (`SFT_LAUNCH_ID`) continues the run instead. `require`: exit 2 when there is "
            "nothing to resume. See [Preemption and resume](operations.md#preemption-and-resume).")
    # one launch of the job, shared by its retries (k8s/job.yaml: the Job's uid): with SFT_RESUME=never, a retried pod
    # continues the run its launch's first pod started instead of starting it again (job/train/rerun.py)
    launch_id: str | None = setting(
        None, env="launch_id", pattern=_ID, examples=["0b7c8f0e-3a52-4c1f-9d7e-2f1a6c9b4e11"],
        doc="One launch of the job, shared by its retries: `k8s/job.yaml` sets the Job's uid "
            "(`batch.kubernetes.io/controller-uid`). With `SFT_RESUME=never`, the first pod of a launch starts over "
            "and records the launch (`resume_launch.json`, locally and beside the checkpoints in the store); a "
            "retried pod of that launch continues the run it started, on its disk or a fresh one. Unset, every start "
            "of a `never` run starts over (a `docker run` is a new launch).")

    @classmethod
    def _derived(cls, values: dict[str, Any], s: Any) -> dict[str, Any]:
        return {**values, "save_steps": effective_save_steps(s)}

    @staticmethod
    def rules(s: Any, card: ModelSpec) -> list[str]:
        # Only when both were set: SFT_MAX_STEPS=5 alone saves every min(50, 5) steps (effective_save_steps).
        if {"max_steps", "save_steps"} <= s.model_fields_set and s.max_steps > 0 and s.save_steps > s.max_steps:
            return [f"SFT_SAVE_STEPS={s.save_steps} exceeds SFT_MAX_STEPS={s.max_steps}: no resumable checkpoint "
                    "would be written before the end; lower SFT_SAVE_STEPS"]
        return []


class WandbConfig(Section):
    enabled: bool = setting(
        True, env="wandb_enabled", examples=["true"], doc="`false` turns Weights & Biases off entirely.")
