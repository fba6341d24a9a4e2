"""The evaluation section: before and after training, and during it (the best step).
How to add a setting: job/config/sections/__init__.py.
"""

from __future__ import annotations

from typing import Any, Literal

from job.cards import ModelSpec
from job.config.sections.base import NOT_MEASURED, Section
from job.config.settings import env_name, setting
from job.metric_table import BEST_METRICS, EVAL_MODE_METRICS, PRIMARY, BestMetric


class EvalConfig(Section):
    max_new_tokens: int = setting(
        env="eval_max_new_tokens", card="eval_max_new_tokens", ge=1, le=8192, examples=["256"],
        doc="Generation bound; generation normally stops earlier at `<|im_end|>` or `<|endoftext|>`.")
    batch_size: int = setting(
        env="eval_batch_size", card="eval_batch_size", ge=1, le=512, examples=["8"], doc="Rows per generation batch.")
    do_sample: bool = setting(False, env="eval_do_sample", examples=["false"], doc="Sample instead of greedy decoding.")
    temperature: float = setting(
        0.7, env="eval_temperature", ge=0, le=10, examples=["0.7"],
        doc="Sampling temperature; used only with `SFT_EVAL_DO_SAMPLE=true`.")
    pre: bool = setting(
        True, env="eval_pre", examples=["true"],
        doc="Evaluate before training (the fresh LoRA is a no-op, so this scores the base model).")
    post: bool = setting(True, env="eval_post", examples=["true"], doc="Evaluate after training.")
    adapter: str | None = setting(
        None, env="eval_adapter", examples=["outputs/adapter"],
        doc="Unset: `$SFT_OUTPUT_DIR/adapter` if a run saved one there, else the base model. Adapter directory scored "
            "by `qwen3-sft eval`; `none` scores the base model. A value that is not an adapter directory (no "
            "`adapter_config.json`) is an error (exit 2), never a silent base-model score.")
    stop_tokens: tuple[str, ...] = setting(card="stop_tokens")
    # generate: trimmed decoding; score: each label's answer scored (probabilities, no generation); both; auto =
    # both when the training split gives the label set, else generate (job/eval/score.py resolves it)
    mode: Literal["auto", "generate", "score", "both"] = setting(
        "auto", env="eval_mode", examples=["both", "generate"],
        doc="`generate`: trimmed-decode generation. `score`: each label's probability (no generation; the argmax is "
            "the prediction). `both`: the two side by side. `auto` is `both` when the training split gives a label "
            "set, else `generate`. See [Classification evaluation](evaluation.md#classification-evaluation).")
    # every N optimizer steps, score SFT_EVAL_DURING_TRAIN_ROWS eval rows; the best step's adapter is the one kept
    steps: int | None = setting(
        None, env="eval_steps", ge=1, examples=["50"],
        doc="Unset: no eval during training. Every N optimizer steps, and at the last, score "
            "`SFT_EVAL_DURING_TRAIN_ROWS` eval rows in scoring mode; the adapter saved, gated and pushed is the best "
            "step's. In the resume fingerprint.")
    during_train_rows: int = setting(
        128, env="eval_during_train_rows", ge=1, examples=["128"],
        doc="N rows of the eval split (after `SFT_EVAL_SUBSET`) scored during training, stratified by label: every "
            "label keeps at least one row while N allows, otherwise its share; a label's rows in file order. Only "
            "with `SFT_EVAL_STEPS`.")
    best_metric: BestMetric = setting(
        PRIMARY, env="best_metric", examples=["macro_f1", "log_loss"],
        doc="What picks the best step (`log_loss` and `ece`: lower is better). A tie keeps the lower log-loss, then "
            "the earlier step. Only with `SFT_EVAL_STEPS`.")

    @staticmethod
    def rules(s: Any, card: ModelSpec) -> list[str]:
        problems = []
        if s.eval_do_sample and s.eval_temperature <= 0:
            problems.append("SFT_EVAL_DO_SAMPLE=true needs SFT_EVAL_TEMPERATURE > 0 (e.g. 0.7), or set "
                            "SFT_EVAL_DO_SAMPLE=false")
        unused = sorted({"best_metric", "eval_during_train_rows"} & s.model_fields_set) if s.eval_steps is None else []
        if unused:
            problems.append(f"{', '.join(env_name(f) for f in unused)} only apply with SFT_EVAL_STEPS (eval during "
                            "training): set SFT_EVAL_STEPS=N or unset them")
        # The eval during training scores (SFT_BEST_METRIC is one of BEST_METRICS): the mode must measure them.
        if s.eval_steps is not None and not set(BEST_METRICS) <= set(EVAL_MODE_METRICS[s.eval_mode]):
            best = f" and SFT_BEST_METRIC={s.best_metric}" if "best_metric" in s.model_fields_set else ""
            problems.append(f"SFT_EVAL_STEPS{best} score{'' if best else 's'} the labels during training, and "
                            f"SFT_EVAL_MODE={s.eval_mode} {NOT_MEASURED[s.eval_mode]}: use SFT_EVAL_MODE=auto, "
                            "score or both, or unset SFT_EVAL_STEPS")
        return problems
