"""QLoRA SFT of Qwen3-VL-8B-Instruct: setup -> pre-eval -> train -> post-eval -> save -> gate -> push.

The steps and their names follow `gemma3sft`, the Gemma 3 training script this job was ported from (not in this
repository), so its users find their way.

`main()` is a readable sequence of small steps. The steps live beside this module: the setup up to a trainable model
in job/train/prepare.py; the evals, the save, the gate and the push in job/train/finish.py; SFT_RESUME, drift and a
run that already finished in job/train/rerun.py.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

from job import outputs
from job.config.schema import JobConfig
from job.errors import JobError
from job.export.command import run_export
from job.inputs import Prepared, Timer
from job.model import _count_trainable_params, trainable_model
from job.train import best, distributed, micro_batch, resume
from job.train.finish import Trained, evaluate, finish, stored_pre_metrics
from job.train.preemption import PreemptionGuard
from job.train.prepare import prepare_run, start_tracking
from job.train.rerun import agreed_resume_plan, complete_finished_run
from job.train.trainer import Checkpointing, TrainingData, build_trainer
from job.utils import tracking

log = logging.getLogger("job.train")


def _during_train_eval(p: Prepared, run, guard: PreemptionGuard, resume_from: str | None
                       ) -> best.BestCheckpointCallback | None:
    """SFT_EVAL_STEPS' callback on SFT_EVAL_DURING_TRAIN_ROWS eval rows (None without SFT_EVAL_STEPS), with the
    best-so-far of the checkpoint continued: restored by rank 0 and broadcast, before the first step."""
    if p.cfg.eval.steps is None or p.label_set is None:  # no label set with SFT_EVAL_STEPS is refused in prepare_run
        return None
    restored = distributed.main_process_result(best.restore, p.paths.root, resume_from)
    rows = best.during_train_subset(p.cfg.data, p.cfg.eval, p.eval_ds)
    return best.BestCheckpointCallback(
        best.DuringTrainEval(p.cfg, rows, p.eval_collator, p.label_set, p.paths.root, run, restored), guard)


def _train(p: Prepared, model, run, guard: PreemptionGuard, resume_from: str | None):
    """The Trainer loop. Returns its result, or raises Preempted once the preemption checkpoint is uploaded."""
    report_to = ["wandb"] if run is not None else []
    saving = Checkpointing(p.paths.checkpoints, guard, remote=p.remote,
                           extra_files=(p.paths.eval / "pre_metrics.json", p.paths.eval / outputs.PRE_STAMP,
                                        p.paths.root / resume.FINGERPRINT_FILE,
                                        p.paths.root / best.BEST_DIR))
    trainer, uploader, preemption = build_trainer(
        p.cfg, model, TrainingData(p.processor, p.collator, p.train_ds), saving, p.run_id, report_to,
        _during_train_eval(p, run, guard, resume_from))
    micro = micro_batch.settle(p.cfg, trainer, p.train_ds, p.collator, resume_from, p.paths.root,
                               dict(trainer.memory_settings))
    guard.in_training = True
    try:
        # The Trainer's own collectives (DDP's gradient all-reduce) time out like the job's: exit 3, not a bug.
        with distributed.collective("the training step (DDP's gradient all-reduce)",
                                    f"all {distributed.world_size()} ranks"):
            result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        guard.in_training = False
    if uploader is not None:
        uploader.drain()
    # Agreed: a signal that reached one rank after the last step's vote stops every rank here, not that one alone.
    if distributed.any_rank(guard.requested, trainer.args.device, "the preemption vote after training"):
        if guard.signal is None:  # another rank (on another node) was signalled: this one exits 143 with it
            guard.signal = signal.SIGTERM
        # Ranks > 0 wait for rank 0's save and upload: torchrun tears down every rank once one exits.
        distributed.barrier("the wait for rank 0's preemption save and upload")
        if run is not None:
            run.mark_preempting()  # W&B shows the run as preempted, not crashed; it resumes under the same id
        saved = (
            f"checkpoint-{preemption.stopped_at} is COMPLETED" if preemption.saved else "no new checkpoint (no time)"
        )
        log.warning("preempted at step %s: %s", preemption.stopped_at, saved)
        guard.raise_if_requested(preemption.stopped_at)
    return trainer, result, micro


def _best_step(p: Prepared, model, final_step: int) -> dict | None:
    """SFT_EVAL_STEPS: load the best step's adapter (rank 0 evaluates, saves, pushes); its record for metrics.json."""
    if p.cfg.eval.steps is None or not distributed.is_main_process():
        return None
    state = best.load_best_adapter(model, p.paths.root)
    return None if state is None else {**state.to_json(), "final_step": final_step}


def run_job(cfg: JobConfig) -> dict[str, Any]:
    timer = Timer()
    with PreemptionGuard(cfg.train.preempt_grace_s) as guard:
        p = prepare_run(cfg, timer)
        plan = agreed_resume_plan(p)  # drift is refused here, before any model loads; rank 0 decides for all
        if plan.checkpoint is not None and plan.progress is not None and plan.progress.finished:
            return complete_finished_run(p, plan.checkpoint, plan.progress, timer)
        started = time.monotonic()
        model = trainable_model(p.cfg.model, p.cfg.lora, p.sources.model_path)
        params = _count_trainable_params(model)
        run = start_tracking(p)
        timer.track("model", started)
        try:
            resume_from = plan.checkpoint
            started = time.monotonic()
            # Rank 0's stored metrics decide whether the pre-eval (a collective) runs: the same answer on every rank.
            stored = distributed.main_process_result(stored_pre_metrics, p, resume_from) if resume_from else None
            pre = stored or evaluate("pre", p, model, run)
            timer.track("pre_eval", started)

            started = time.monotonic()
            trainer, result, micro = _train(p, model, run, guard, resume_from)
            timer.track("train", started)
            kept = _best_step(p, trainer.model, result.global_step)
            return finish(p, trainer.model, run, timer,
                           Trained(result, params, pre, resume_from, kept, trainer.state.log_history,
                                   micro.to_json()))
        finally:
            tracking.finish(run)


def main(cfg: JobConfig) -> dict[str, Any]:
    """`qwen3-sft run` in this process: the job, then SFT_EXPORT's export; user errors keep their type (and exit
    code)."""
    try:
        meta = run_job(cfg)
        # SFT_EXPORT=true: once the gate passed (a refusal raised above). The training model is out of scope by now,
        # so the export's bf16 model does not share the GPU with it; DDP: rank 0 exports, the others are done.
        if cfg.export.enabled and distributed.is_main_process():
            with PreemptionGuard(cfg.train.preempt_grace_s):  # a signal during the export is 143, as during the run
                meta["export"] = run_export(cfg, after_run=True)["publish"]
        return meta
    except JobError:
        raise
    except Exception as exc:
        raise RuntimeError(f"Qwen3-VL SFT failed: {exc}") from exc
