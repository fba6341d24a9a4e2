"""The SFTTrainer as this job uses it: its config, length-grouped batches, callbacks and save timing."""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from job.config.schema import JobConfig
from job.data.loaders import LENGTH_COLUMN
from job.errors import OutOfMemory
from job.model import has_cuda, keep_trainable_params_fp32
from job.storage.checkpoints import RemoteCheckpoints
from job.train.callbacks import CompletedMarkerCallback, LogCallback, RankStateCallback, RemoteCheckpointCallback
from job.train.micro_batch import AUTO, DEFAULT_SIZE
from job.train.preemption import PreemptionCallback, PreemptionGuard, leave_worker_signals_to_the_rank
from job.train.sampler import LengthGroupedSampler

log = logging.getLogger("job.train")


def compute_bf16() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def sft_config(cfg: JobConfig, output_dir: Path, run_id: str, report_to: list[str]):
    from trl import SFTConfig

    train, cuda = cfg.train, has_cuda()
    # auto: the integer default until the search's choice replaces it before training (Qwen3SFTTrainerMixin's
    # use_micro_batch, job/train/micro_batch.py); the effective batch is the same.
    size = DEFAULT_SIZE if train.per_device_batch_size == AUTO else train.per_device_batch_size
    return SFTConfig(
        output_dir=str(output_dir), run_name=run_id, seed=train.seed, data_seed=train.seed,
        max_steps=train.max_steps, num_train_epochs=train.num_epochs,
        per_device_train_batch_size=size, gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate, lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=train.warmup_ratio, weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps, save_strategy="steps", save_steps=train.save_steps,
        save_total_limit=train.save_total_limit, report_to=report_to, disable_tqdm=True,
        bf16=cuda and compute_bf16(), use_cpu=not cuda, optim="adamw_torch",
        # Non-reentrant checkpointing: works with frozen 4-bit inputs and PEFT without enable_input_require_grads.
        activation_checkpointing=cfg.model.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        # Workers decode and resize images while the GPU trains; pinned memory makes the host-to-device copy async.
        dataloader_num_workers=train.dataloader_num_workers, dataloader_pin_memory=cuda,
        # Not persistent: a new worker iterator each epoch draws its base seed from the global torch RNG. With
        # persistent workers the uninterrupted run draws once (epoch 0) but a resumed one draws again when it first
        # iterates the full loader (the epoch after the resume), shifting every later dropout mask: the resumed run
        # left the uninterrupted one at the first step of the next epoch (tests/train/test_resume_matrix.py, 2 workers).
        dataloader_persistent_workers=False,
        # Every LoRA parameter receives a gradient each step (the vision tower is frozen, not LoRA'd), so DDP's
        # unused-parameter search (an extra graph traversal per step) is not needed.
        ddp_find_unused_parameters=False, remove_unused_columns=False, max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True},
    )


if TYPE_CHECKING:
    from trl import SFTTrainer as _TrainerBase
else:
    _TrainerBase = object


# The overridden methods below are private Trainer API, checked against transformers 5.24.0 and TRL 1.16.0 (the
# versions installed for development and pinned for the image in docker/constraints.txt and requirements.lock):
# Trainer._get_train_sampler(train_dataset=None), Trainer._run_epoch(..., epoch=..., ...) (called with keywords),
# Trainer._save_checkpoint(model, trial), which SFTTrainer overrides and calls up to, and Trainer._train_batch_size
# (set by use_micro_batch as the Trainer's own hyperparameter search sets it). Check them again when either pin moves.
class Qwen3SFTTrainerMixin(_TrainerBase):
    """SFTTrainer plus length-grouped sampling (from preflight's token counts) and timed saves.

    Mixed into TRL's SFTTrainer when the first trainer is built (trainer_class). Importing TRL imports transformers'
    W&B integration, which prints "[INFO] Running in WANDB offline mode" to stdout when WANDB_MODE=offline: at import
    of this module it would come before the run's first log lines, and it would break tests/zygote.py (one JSON
    message per stdout line), which imports the job before forking job processes.
    """

    group_by_length = True
    last_save_s = 0.0
    memory_settings: tuple[tuple[str, str], ...] = ()  # what OutOfMemory names (memory_settings(cfg))

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not self.group_by_length or LENGTH_COLUMN not in getattr(dataset, "column_names", ()):
            return super()._get_train_sampler(train_dataset)
        # Its own generator seeded from data_seed: the order is a pure function of (seed, epoch), so a resumed
        # run skips exactly the batches the interrupted one consumed.
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self._length_sampler = LengthGroupedSampler(
            dataset[LENGTH_COLUMN], batch_size=self.args.per_device_train_batch_size, seed=seed,
            world_size=max(1, self.args.world_size))
        return self._length_sampler

    def _run_epoch(self, *args, **kwargs):
        # Under DDP after a mid-epoch resume, accelerate wraps the sampler too deeply for its set_epoch to
        # reach it; without this, epoch >= 1 of a resumed run would replay epoch 0's order.
        if getattr(self, "_length_sampler", None) is not None and "epoch" in kwargs:
            self._length_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        """One micro-batch; torch's OutOfMemoryError becomes OutOfMemory (exit 2) naming the step and the batch."""
        import torch

        try:
            return super().training_step(model, inputs, *args, **kwargs)
        except torch.OutOfMemoryError as exc:
            mask = inputs.get("attention_mask")
            longest = int(mask.sum(dim=-1).max()) if mask is not None else int(inputs["input_ids"].shape[-1])
            raise OutOfMemory(self.state.global_step + 1, int(inputs["input_ids"].shape[0]), longest,
                              dict(self.memory_settings)) from exc

    def use_micro_batch(self, size: int, grad_accum: int) -> None:
        """SFT_PER_DEVICE_BATCH_SIZE=auto's choice, before train(): train() reads both from here when it starts
        (the dataloader's batch size, the sampler's, and the accumulation of each optimizer step)."""
        self.args.per_device_train_batch_size = size
        self.args.gradient_accumulation_steps = grad_accum
        self._train_batch_size = self.args.train_batch_size
        self.memory_settings = tuple((name, f"auto (chose {size})" if value == AUTO else value)
                                     for name, value in self.memory_settings)

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        # accelerate's prepared loader wraps the torch DataLoader that starts the workers (base_dataloader); a loader
        # rebuilt to skip the batches of a resume takes its worker_init_fn from there.
        # A preemption signal reaches the workers too: the rank handles it.
        leave_worker_signals_to_the_rank(getattr(loader, "base_dataloader", loader))
        return loader

    def _save_checkpoint(self, model, trial):
        started = time.monotonic()
        super()._save_checkpoint(model, trial)
        self.last_save_s = time.monotonic() - started


def memory_settings(cfg: JobConfig) -> tuple[tuple[str, str], ...]:
    """The settings that lower a training step's memory, with their values, in the order an OOM message names them."""
    return (("SFT_PER_DEVICE_BATCH_SIZE", str(cfg.train.per_device_batch_size)),
            ("SFT_MAX_LENGTH", str(cfg.train.max_length)), ("SFT_IMAGE_MAX_PIXELS", str(cfg.image.max_pixels)),
            ("SFT_GRADIENT_CHECKPOINTING", str(cfg.model.gradient_checkpointing).lower()))


@dataclass(frozen=True)
class TrainingData:
    """What the Trainer trains on: the processor, the training collator and the (preflight-checked) split."""

    processor: Any
    collator: Any
    train_ds: Any


@dataclass(frozen=True)
class Checkpointing:
    """Where checkpoints go and what rides along: the Trainer's output dir, files copied into each checkpoint, the
    object-store sync (None without SFT_CHECKPOINT_URI) and the preemption guard that asks for one more save."""

    output_dir: Path
    guard: PreemptionGuard
    extra_files: tuple[Path, ...] = ()
    remote: RemoteCheckpoints | None = None


@functools.cache
def trainer_class() -> type:
    """Qwen3SFTTrainerMixin over TRL's SFTTrainer (the mixin's docstring says why TRL is imported only here)."""
    from trl import SFTTrainer

    return type("Qwen3SFTTrainer", (Qwen3SFTTrainerMixin, SFTTrainer), {"__module__": __name__})


def build_trainer(cfg: JobConfig, model, data: TrainingData, saving: Checkpointing, run_id: str,
                  report_to: list[str], during_train: TrainerCallback | None = None):
    """The trainer and, with a checkpoint URI, the background uploader.

    Callback order matters: every rank's RNG state is in rank 0's checkpoint before the local COMPLETED marker is
    written, and the marker before the upload snapshot is taken. `during_train` (SFT_EVAL_STEPS' eval) runs its
    step-end eval before the save of the same step, and before the preemption callback (added last) asks to stop.
    """
    from transformers import PrinterCallback

    uploader = None
    callbacks = [LogCallback(), *([during_train] if during_train is not None else []), RankStateCallback(),
                 CompletedMarkerCallback(extra_files=saving.extra_files)]
    if saving.remote is not None:
        uploader = RemoteCheckpointCallback(saving.remote, saving.output_dir.parent / ".upload-staging")
        callbacks.append(uploader)
    trainer = trainer_class()(
        model=model, args=sft_config(cfg, saving.output_dir, run_id, report_to), train_dataset=data.train_ds,
        data_collator=data.collator, processing_class=data.processor, callbacks=callbacks,
    )
    # LogCallback prints one line per logging step; the Trainer's PrinterCallback (disable_tqdm=True) would print
    # the same numbers again as a dict.
    trainer.remove_callback(PrinterCallback)
    trainer.group_by_length = cfg.train.group_by_length
    trainer.memory_settings = memory_settings(cfg)
    preemption = PreemptionCallback(saving.guard,
                                    lambda: trainer.last_save_s + (uploader.last_upload_s if uploader else 0.0))
    trainer.add_callback(preemption)
    keep_trainable_params_fp32(trainer.model)
    return trainer, uploader, preemption
